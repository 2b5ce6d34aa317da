"""The read floor of a batch-1 matmul: one Triton kernel that streams a buffer as large as the packed weight
and does nothing else, timed beside the matmul kernels (``bench.kernel_latency``, path ``read floor``).

A batch-1 low-bit matmul must at least read its weight once; this kernel reads the same number of bytes from
one contiguous buffer with wide loads on a grid of a few programs per multiprocessor, so its time is what
moving those bytes costs in this measurement (launch and the memory system's ramp included). A matmul near it
is bound by its bytes; one far above it by something else (its decode, its prologue, its split-K tail).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 4096  # int32 words a program reads per step (16 KiB in flight per program a step)
PROGRAMS_PER_SM = 4


@triton.jit
def _read_kernel(src_ptr, out_ptr, n_words, BLOCK: tl.constexpr):
    """Program ``p`` xors the steps ``p, p + grid, ...`` of ``BLOCK`` words and stores its xor: every word is
    read, and the result depends on every word, so nothing is optimized away."""
    pid = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    acc = tl.zeros((BLOCK,), dtype=tl.int32)
    for start in range(pid * BLOCK, n_words, tl.num_programs(0) * BLOCK):
        words = tl.load(src_ptr + start + offs, mask=start + offs < n_words, other=0, eviction_policy="evict_first")
        acc ^= words
    tl.store(out_ptr + pid, tl.xor_sum(acc, axis=0))


def programs(device: torch.device) -> int:
    """The grid: :data:`PROGRAMS_PER_SM` programs a multiprocessor (4 on a CPU, for the interpreter)."""
    if device.type != "cuda":
        return 4
    return PROGRAMS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count


def read_xor(src: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Stream ``src`` (int32, contiguous) once; the programs' xors (``out``, ``[programs]`` int32)."""
    if src.dtype != torch.int32 or not src.is_contiguous():
        raise ValueError(f"read_xor streams a contiguous int32 buffer, got {src.dtype} (contiguous: {src.is_contiguous()})")
    grid = programs(src.device)
    out = torch.empty(grid, dtype=torch.int32, device=src.device) if out is None else out
    _read_kernel[(grid,)](src, out, src.numel(), BLOCK=BLOCK)
    return out


def read_calls(nbytes: int, device: torch.device, copies: int):
    """A maker for :func:`bench.timing.time_side_by_side`: one call per buffer of ``nbytes`` (rounded up to whole
    steps of :data:`BLOCK` words, so the loads are unmasked 16-byte vectors), ``copies`` of them to rotate through."""
    out = torch.empty(programs(device), dtype=torch.int32, device=device)
    n_words = -(-nbytes // (4 * BLOCK)) * BLOCK

    def make() -> list:
        buffers = [torch.randint(-(2**31), 2**31 - 1, (n_words,), dtype=torch.int32, device=device) for _ in range(copies)]
        return [lambda b=b: read_xor(b, out) for b in buffers]

    return make

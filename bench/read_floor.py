"""The read floor of a batch-1 matmul: Triton kernels that stream a buffer as large as the packed weight and do
nothing else, timed beside the matmul kernels (``bench.kernel_latency``, path ``read floor``).

A batch-1 low-bit matmul must at least read its weight once; these kernels read the same number of bytes from one
contiguous buffer with wide loads, so the fastest of them is what moving those bytes costs in this measurement
(launch and the memory system's ramp included). A matmul near it is bound by its bytes; one far above it by
something else (its decode, its prologue, its split-K tail).

The floor is the best of a few :data:`LAYOUTS` of the same loop, timed side by side: a grid of a few programs a
multiprocessor striding over the buffer (``stride``, the only one before session 27) waits for each step's loads
before the next and leaves a tail of programs with one step more than the others (18 MB on 528 programs of 16 KiB
steps: a fifth of them take a third step alone), so alone it overstates the floor wherever the bytes are not a whole
number of rounds; a program per block (``blocks``, ``blocks_8k``) lets the hardware keep as many loads in flight as
fit and spreads the tail over small blocks.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl


class Layout(NamedTuple):
    block: int  # int32 words a program reads per step (4096: 16 KiB in flight per program a step)
    programs_per_sm: int | None  # a grid-stride grid of this many programs a multiprocessor; None: a program per block


LAYOUTS = {"stride": Layout(4096, 4), "blocks": Layout(4096, None), "blocks_8k": Layout(2048, None)}
BLOCK = max(layout.block for layout in LAYOUTS.values())  # buffers are whole steps of this (unmasked 16-byte loads)


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


def layout_of(name: str) -> Layout:
    if name not in LAYOUTS:
        raise ValueError(f"unknown read-floor layout {name!r}; choose from {sorted(LAYOUTS)}")
    return LAYOUTS[name]


def programs(device: torch.device, n_words: int = 0, layout: str = "stride") -> int:
    """The grid of ``layout`` for ``n_words``: a program per block, or ``programs_per_sm`` programs a multiprocessor
    (4 in all on a CPU, for the interpreter)."""
    block, per_sm = layout_of(layout)
    if per_sm is None:
        return max(1, -(-n_words // block))
    if device.type != "cuda":
        return 4
    return per_sm * torch.cuda.get_device_properties(device).multi_processor_count


def read_xor(src: torch.Tensor, out: torch.Tensor | None = None, layout: str = "stride") -> torch.Tensor:
    """Stream ``src`` (int32, contiguous) once in ``layout``; the programs' xors (``out``, ``[programs]`` int32)."""
    if src.dtype != torch.int32 or not src.is_contiguous():
        raise ValueError(f"read_xor streams a contiguous int32 buffer, got {src.dtype} (contiguous: {src.is_contiguous()})")
    grid = programs(src.device, src.numel(), layout)
    out = torch.empty(grid, dtype=torch.int32, device=src.device) if out is None else out
    if out.numel() < grid:
        raise ValueError(f"read_xor needs {grid} output words for layout {layout!r}, got {out.numel()}")
    _read_kernel[(grid,)](src, out, src.numel(), BLOCK=LAYOUTS[layout].block)
    return out


def read_calls(nbytes: int, device: torch.device, copies: int, layout: str = "stride"):
    """A maker for :func:`bench.timing.time_side_by_side`: one call per buffer of ``nbytes`` (rounded up to whole
    steps of :data:`BLOCK` words, so the loads are unmasked 16-byte vectors), ``copies`` of them to rotate through,
    each streamed in ``layout``."""
    layout_of(layout)
    n_words = -(-nbytes // (4 * BLOCK)) * BLOCK
    out = torch.empty(programs(device, n_words, layout), dtype=torch.int32, device=device)

    def make() -> list:
        buffers = [torch.randint(-(2**31), 2**31 - 1, (n_words,), dtype=torch.int32, device=device) for _ in range(copies)]
        return [lambda b=b: read_xor(b, out, layout) for b in buffers]

    return make


def fastest(times: dict[str, dict[str, float]]) -> tuple[dict[str, float], dict[str, str]]:
    """The floor from each layout's times (``{layout: {mode: us}}``): per mode the least time, and which layout gave it."""
    modes = next(iter(times.values())).keys()
    best = {mode: min(times, key=lambda layout: times[layout][mode]) for mode in modes}
    return {mode: times[layout][mode] for mode, layout in best.items()}, best

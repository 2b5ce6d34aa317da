"""A warp-specialized prototype of the batch-64 low-bit GEMM's loop, to time before building the kernel: what the
design sketched in bench/results/kernel_latency_h200.md (session 24) would cost.

    python -m bench.ws_gemm --shapes 8192x8192 --batches 64 --stages 2,3 --split-k 1,2,4

``qkernels.gemm_wgmma`` runs one warpgroup a program that loads its words into registers, waits on its activation
boxes and issues its wgmmas, with CTA barriers around every box; session 24's ablations found those parts running
one after another (the wgmma loop alone 21 us at 8192^2 and 64 rows for 8.9 us of tensor work). Here a program has
a producer warp that brings each chunk's words (``[BLOCK_N, 32]`` int32 by TMA) and activation box (four steps of
``[BLOCK_M, 64]``) into a ring of ``STAGES`` buffers with one ``full`` and one ``empty`` mbarrier each, and consumer
warpgroups (the default partition, ``BLOCK_N / 64`` of them, sharing each box) that read the words from shared
memory, decode them with the GEMM's own asm (:func:`qkernels.gemm_wgmma._slot_weights`) and issue the wgmmas, one
step in flight, freeing a chunk's buffer once its last step has retired. What it leaves out, to be added only if the
loop is fast: the group scales and zero points (every scale is 1 and every zero point 0, so the product is
``codes @ x^T``) and the split-K reduction (each split stores its partial sums; the script adds them). W4 codes only
(``uint4`` with a run of 32). The weight copies that the timing rotates over are made once a cell, shared by every
config.

Written and compiled for sm_90 in session 24 (triton 3.6 and 3.9; ``qkernels.compile_check`` compiles it); it had
not run on a GPU when committed: its first run checks every config against ``codes @ x^T`` before timing it.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, warpgroup_mma, warpgroup_mma_wait
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from qkernels.gemm_wgmma import RUN, _slot_weights
from qkernels.gluon_compat import async_load, reinterpret
from qkernels.pack import PackedWeight, dequantize_packed

SLOTS = gl.constexpr(8)  # W4: a word holds a slot of each of 8 runs of 32 K, so a chunk (32 words a row) is 256 K
STEP = gl.constexpr(64)  # K of an activation step tile (two slots)
STEPS = gl.constexpr(SLOTS.value * RUN.value // STEP.value)  # step tiles a chunk's box


@gluon.jit
def _producer(x_desc, w_desc, xs, ws, full, empty, first, n_chunks, off_m, off_n, STAGES: gl.constexpr):
    """One warp: chunk ``i``'s words and activation box into buffer ``i % STAGES`` once the consumers freed it."""
    for i in range(n_chunks):
        s = i % STAGES
        mbarrier.wait(empty.index(s), ((i // STAGES) & 1) ^ 1)  # (a fresh barrier passes the first round)
        mbarrier.expect(full.index(s), x_desc.block_type.nbytes + w_desc.block_type.nbytes)
        chunk = first + i
        async_load(x_desc, [chunk * STEPS, off_m, 0], full.index(s), xs.index(s))
        async_load(w_desc, [off_n, chunk * RUN], full.index(s), ws.index(s))


@gluon.jit
def _consumers(xs, ws, full, empty, n_chunks, out_ptr, pid_n, split, BLOCK_N: gl.constexpr, BLOCK_M: gl.constexpr,
               STAGES: gl.constexpr, NUM_WARPS: gl.constexpr):
    """The default partition: decode chunk ``i``'s words (scale 1, zero point 0) two slots a step and run each step's
    wgmmas on the box's step tile, one step in flight (its A registers held until the wait that retires it, as in
    ``qkernels.gemm_wgmma``); a chunk's buffer is freed at the next chunk's first step, once its last step has retired.
    Then the partial sums into ``out[split, n, m]`` (stored here: triton 3.6 fails to return a tensor from the default
    partition)."""
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NUM_WARPS, 1], instr_shape=[16, BLOCK_M, 16])
    a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)
    tiles = reinterpret(xs, gl.float16, [STAGES * STEPS, BLOCK_M, STEP],
                        gl.NVMMASharedLayout(swizzle_byte_width=2 * STEP, element_bitwidth=16, rank=2))
    one = gl.full([BLOCK_N], 1.0, gl.float16, gl.SliceLayout(1, a_layout))[:, None]
    zero = gl.full([BLOCK_N], 0.0, gl.float16, gl.SliceLayout(1, a_layout))[:, None]
    acc = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, mma)
    held0 = gl.zeros([BLOCK_N, RUN], gl.float16, a_layout)
    held1 = gl.zeros([BLOCK_N, RUN], gl.float16, a_layout)
    for i in range(n_chunks):
        s = i % STAGES
        mbarrier.wait(full.index(s), (i // STAGES) & 1)
        words = ws.index(s).load(a_layout)
        for step in gl.static_range(STEPS):
            tile = tiles.index(s * STEPS + step)
            a0 = _slot_weights(words, one, zero, 2 * step, 4, True)
            acc = warpgroup_mma(a0, tile.slice(0, RUN, dim=1).permute((1, 0)), acc, is_async=True)
            a1 = _slot_weights(words, one, zero, 2 * step + 1, 4, True)
            acc = warpgroup_mma(a1, tile.slice(RUN, RUN, dim=1).permute((1, 0)), acc, is_async=True)
            acc, held0, held1 = warpgroup_mma_wait(num_outstanding=2, deps=(acc, held0, held1))  # the previous step retires
            held0 = a0
            held1 = a1
            if step == 0:  # the previous chunk's last step has retired: its buffer goes back to the producer
                mbarrier.arrive(empty.index((i + STAGES - 1) % STAGES), count=1, pred=i > 0)
    acc, held0, held1 = warpgroup_mma_wait(num_outstanding=0, deps=(acc, held0, held1))
    rows = pid_n * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, mma))[:, None]
    cols = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, mma))[None, :]
    gl.store(out_ptr + (split * gl.num_programs(0) * BLOCK_N + rows) * BLOCK_M + cols, acc)


@gluon.jit
def _ws_gemm_kernel(x_desc, w_desc, out_ptr, n_chunks_total, BLOCK_N: gl.constexpr, BLOCK_M: gl.constexpr, STAGES: gl.constexpr,
                    SPLIT_K: gl.constexpr, NUM_WARPS: gl.constexpr):
    """Program (tile along N, K split): its partial sums ``[BLOCK_N, BLOCK_M]`` (fp32) into ``out[split, n, m]``."""
    pid_n = gl.program_id(0)
    split = gl.program_id(1)
    per_split = gl.cdiv(n_chunks_total, SPLIT_K)
    first = split * per_split
    n_chunks = gl.minimum(first + per_split, n_chunks_total) - first
    xs = gl.allocate_shared_memory(gl.float16, [STAGES, STEPS, BLOCK_M, STEP], x_desc.layout)
    ws = gl.allocate_shared_memory(gl.int32, [STAGES, BLOCK_N, RUN], w_desc.layout)
    full = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for s in gl.static_range(STAGES):
        mbarrier.init(full.index(s), count=1)
        mbarrier.init(empty.index(s), count=1)
    gl.warp_specialize(
        [(_consumers, (xs, ws, full, empty, n_chunks, out_ptr, pid_n, split, BLOCK_N, BLOCK_M, STAGES, NUM_WARPS)),
         (_producer, (x_desc, w_desc, xs, ws, full, empty, first, n_chunks, 0, pid_n * BLOCK_N, STAGES))],
        [1], [40])


def descriptors(x: torch.Tensor, words: torch.Tensor, block_n: int) -> tuple[TensorDescriptor, TensorDescriptor]:
    """The activations as ``[K / 64, M, 64]`` step tiles (a chunk's four in one box) and the words ``[N, K / 8]`` in
    ``[block_n, 32]`` boxes."""
    m, k = x.shape
    step, steps = STEP.value, STEPS.value
    x_layout = gl.NVMMASharedLayout(swizzle_byte_width=2 * step, element_bitwidth=16, rank=3)
    x_desc = TensorDescriptor(x, [k // step, m, step], [step, x.stride(0), 1], [steps, m, step], x_layout)
    w_layout = gl.NVMMASharedLayout.get_default_for([block_n, RUN.value], gl.int32)
    w_desc = TensorDescriptor(words, list(words.shape), list(words.stride()), [block_n, RUN.value], w_layout)
    return x_desc, w_desc


def ws_gemm(x: torch.Tensor, words: torch.Tensor, block_n: int = 128, stages: int = 2, split_k: int = 1,
            out: torch.Tensor | None = None) -> torch.Tensor:
    """``codes @ x^T`` per K split (fp32 ``[split_k, N, M]``) for W4 words ``[N, K / 8]`` (run 32) and ``x [M, K]``
    (fp16, M a power of two from 16 to 64 and 16-byte aligned rows, K a multiple of 256)."""
    m, k = x.shape
    n = words.shape[0]
    if m not in (16, 32, 64) or k % (SLOTS.value * RUN.value) or n % block_n or block_n not in (64, 128, 256):
        raise ValueError(f"ws_gemm takes M in (16, 32, 64), K a multiple of 256, N a multiple of block_n in (64, 128, 256); "
                         f"got M={m}, K={k}, N={n}, block_n={block_n}")
    out = torch.empty(split_k, n, m, device=x.device, dtype=torch.float32) if out is None else out
    x_desc, w_desc = descriptors(x, words, block_n)
    num_warps = block_n // 16
    _ws_gemm_kernel[(n // block_n, split_k)](x_desc, w_desc, out, k // (SLOTS.value * RUN.value), BLOCK_N=block_n, BLOCK_M=m, STAGES=stages,
                                             SPLIT_K=split_k, NUM_WARPS=num_warps, num_warps=num_warps)
    return out


def main(argv: list[str] | None = None) -> int:
    from bench.config_ab import cells, parse_grid, write_json
    from bench.kernel_latency import clone_packed, fp16_calls
    from bench.timing import copies_for, gpu_name, steady_interleaved
    from qkernels import lowbit_matmul as lm

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="8192x8192", help="comma list of INxOUT")
    parser.add_argument("--batches", default="64", help="comma list of 16, 32, 64")
    parser.add_argument("--block-n", default="128", help="comma list of weight rows a program (64: one consumer warpgroup)")
    parser.add_argument("--stages", default="2,3", help="comma list of ring depths (chunks)")
    parser.add_argument("--split-k", default="1,2,4", help="comma list of K splits")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    try:
        kinds, shapes, batches = parse_grid("w4g128", args.shapes, args.batches)
    except ValueError as err:
        parser.error(str(err))
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9:
        print("needs a Hopper GPU: nothing to time", file=sys.stderr)
        return 1
    ints = lambda text: [int(v) for v in text.split(",") if v]  # noqa: E731
    rows = []
    print(f"GPU: {gpu_name()}")
    for k, n, _, pw, m, x in cells(kinds, shapes, batches):
        packed = [pw] + [clone_packed(pw) for _ in range(copies_for(pw.nbytes()) - 1)]  # rotating copies, every config's
        copies = [lm.kernel_tensors(p)[0] for p in packed]
        calls = {"cublas": fp16_calls(x, n)[1](), "gemm_wgmma": [lambda p=p: lm.PATHS["wgmma"](x, p) for p in packed]}
        reference = None
        for block_n in ints(args.block_n):
            for stages in ints(args.stages):
                for split in ints(args.split_k):
                    label = f"ws block_n={block_n} stages={stages} split_k={split}"
                    try:
                        got = ws_gemm(x, copies[0], block_n, stages, split).sum(0).t()
                        if reference is None:
                            reference = torch_reference(x, pw)
                        error = ((got - reference).norm() / reference.norm()).item()
                    except Exception as err:  # noqa: BLE001 - a config that fails is reported, not timed
                        print(f"{label}: failed {type(err).__name__}: {err}", flush=True)
                        continue
                    print(f"{label}: relative error {error:.1e}", flush=True)
                    if error < 1e-2:
                        outs = torch.empty(split, n, m, device="cuda")
                        calls[label] = [lambda w=w, b=block_n, st=stages, sp=split, o=outs: ws_gemm(x, w, b, st, sp, o) for w in copies]
        times = steady_interleaved(calls)
        for label, us in times.items():
            row = dict(K=k, N=n, M=m, variant=label, us=us, x_cublas=times["cublas"] / us)
            rows.append(row)
            print(f"| {k}x{n} | {m} | {label} | {us:.2f} | {row['x_cublas']:.2f} |", flush=True)
    if args.json:
        write_json(args.json, dict(gpu=gpu_name(), rows=rows))
    return 0


def torch_reference(x: torch.Tensor, pw: PackedWeight) -> torch.Tensor:
    """``x @ codes^T`` in fp32, the codes read back from the packed weight with every scale 1 and zero point 0."""
    zero = None if pw.zero is None else torch.zeros_like(pw.zero)
    codes = dequantize_packed(replace(pw, scale=torch.ones_like(pw.scale), zero=zero))
    return x.float() @ codes.t()


if __name__ == "__main__":
    sys.exit(main())

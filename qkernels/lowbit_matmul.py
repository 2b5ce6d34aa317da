"""Packed low-bit weight matmuls ``y = x @ W^T`` with fp16/bf16 activations (W1..W4, ternary).

Weights come as a :class:`qkernels.pack.PackedWeight` (codes packed along K in chunks, fp16 scales and
optional zero points per group). Four GPU paths here, chosen by the number of activation rows ``M``
(:func:`pick_path`); at batch 1 the weights of :func:`gemv_mma_preferred` take a fifth,
:mod:`qkernels.gemv_mma` (a GEMV on ``mma.sync`` tensor cores, in Gluon), and on Hopper GPUs the
batches above the GEMV's and the MMA kernel's rows a sixth, :mod:`qkernels.gemm_wgmma` (``wgmma`` with
the weights decoded in registers, in Gluon), where it fits (:func:`wgmma_fits`); a seventh, :mod:`qkernels.gemm_ws`
(warp-specialized, up to 64 rows, Hopper), runs only when named (``path="wgmma_ws"``: not faster yet). The four:

* **GEMV** (``M <= 8`` where the MMA kernel does not run or is slower), meant to be memory bound: a
  program takes one activation row, ``BLOCK_N`` weight rows and one K split, a chunk (a cache line per
  row) per step, the next step's loads issued before this step's arithmetic. Two kernels:

  - **fp16 pairs** (fp16 activations, ``uint1``/``uint2``/``uint3``/``uint4``, zero points that fp16
    subtracts exactly: :func:`pairs_fit`; uint3 builds each pair from both planes, :func:`_pair_fma3`).
    Slot ``s`` and slot ``s + SLOTS/2`` of a word sit 16 bits apart, so
    one ``lop3`` drops both codes into the mantissas of an fp16 pair of 1024s, one ``fma.rn.f16x2``
    takes off the offset and the zero point and divides by 16 (``(code - zero) / 16``, exact) and one
    more multiplies by the activation pair and adds: 1.5 instructions per code plus a shift shared by
    two pairs. A quad of pairs stays inside one scale group per half and sums at most 16 products in
    fp16; the 1/16 keeps the sums finite (W4: activations below about 17000). Then its two groups'
    scales take the sums into fp32.
  - **fp32** (bf16, ``ternary5``, other zero points): a code placed in the top mantissa
    bits of 1.0 reads as ``1 + code / 2**b`` (one shift and one mask-or, no int->float conversion),
    one FMA; the scale is applied once per group to the tile of partial sums, the offset and zero
    point once per group with the group's activation sum:
    ``sum_k (q_k - z) x_k = 2**b * (sum_k v_k x_k - sum_k x_k) - z * sum_k x_k``.
* **MMA** (fp16 activations, ``uint1``/``uint2``/``uint3``/``uint4``, ``M <= MMA_MAX_M``; picked for
  :data:`MMA_AUTO_LAYOUTS` up to ``MMA_AUTO_MAX_M`` rows, or ``MMA_AUTO_ROWS``, where the wgmma GEMM does not
  run; uint3's high plane by a second ``prmt``, :func:`_slot3_fp16`): tensor
  cores for small batches, the batch padded to 16. One ``prmt`` gathers a byte of two neighbouring words,
  one ``lop3`` drops two codes into the mantissas of ``1024.0`` (fp16x2), one ``fma.f16x2`` takes off 1024
  and the bit position: per two codes three instructions, no int->float conversion. Each slot of a chunk is
  one dot of depth ``run`` with its contiguous run of activations, and Triton loads the words straight into
  the MMA operand layout (the decode is a pure one-input inline asm, which its dot-operand hoisting
  accepts). Up to ``MMA_FOLD_MIN_M`` rows the codes are dotted raw and the activation sums for the zero
  points come from a second dot with a tile of ones (no cross-thread reduction in the loop, no rounding of
  the weights); above it (``FOLD``) two more fp16x2 ops make ``(code - zero) * scale`` in the operand layout
  and one dot per slot does the rest.
* **GEMM** (the other layouts, bf16, and batches up to ``DEQUANT_MIN_M``): tensor cores with swapped
  operands (``y^T = W x^T``), so the weight tile is the wide MMA operand and a small batch is the
  narrow one. Codes become fp16/bf16 ``1024 + q`` through the same exponent trick (``0x6400 | q``),
  are dotted raw, and the group's scale, zero point and offset are applied to the ``[BLOCK_N,
  BLOCK_M]`` dot result.
* **dequant + cuBLAS** for large ``M`` where the wgmma GEMM does not run (bf16, ternary5, short runs,
  GPUs other than Hopper) or lost (W3 above 256 rows, grouped W4 with a short K above 256): the matmul
  is compute bound there.

``reference_matmul`` is the plain-torch definition every kernel is tested against.

Split-K (``split_k > 1``): the splits of a tile write fp32 partial sums and the last one to finish adds
them up in order (``_store_transposed``): no zeroed output, no atomics on ``y``, the same bits every run.

Status (H100, 8192^2, steady state; bench/results/kernel_latency_h100.md, sessions 6-9): correct at
real sizes; batch 1 W4 17.8 us (fp16-pair GEMV), W2 12.9, ternary 11.0, W1 12.3 (tensor-core GEMV):
2.70-4.37x cuBLAS fp16; batch 16 W4 23.3 (MMA); batch 64 W4 36.7 (folded MMA, 1.35x); batch 1024
dequant + cuBLAS 0.70x. Short of the memory bound (a kernel that only reads the W4 words in this tiling
took 14.3 us). Nsight Compute (session 8, W1): both GEMVs then issued 0.4-0.55 instructions per cycle
per scheduler with no pipe and not DRAM saturated: bound by latency. Session 10 (H200 only; no H100
was lent): the wgmma GEMM at 1024 rows, 8192^2: W4 0.89x cuBLAS, W2 0.95x, ternary 1.00x, W1 0.97x
(dequant + cuBLAS 0.78-0.81x); bench/results/kernel_latency_h200.md. Session 11 (H200): the wgmma GEMM from
9 rows, 8192^2 W4 at 16 / 64 / 1024 rows 1.73x / 1.30x / 0.97x cuBLAS fp16. Session 12 (H200): batch 1 on
the tensor-core GEMV for every grouped kind on Hopper, TMA-fed: 8192^2 W4 13.4 us (2.87x), W2 11.4
(3.37x), ternary 10.7 (3.61x), W1 11.5 (3.36x); W1 10.6 with routes (groups in their own MMA columns).
Session 14 (H200, kernels timed side by side with cuBLAS): the wgmma GEMM at 64 rows with four-step
activation boxes W4 1.29x, W2 1.39x, ternary 1.71x, W1 1.48x; split tails at 4096x14336 and 1024 rows
0.775x-0.864x. Session 16 (H200): W3 g128 on fast kernels, 8192^2 batch 1 17.7 us (2.20x, tensor-core GEMV;
it took 28.8 on the fp32 GEMV), 16 and 64 rows 1.22x and 1.28x (wgmma GEMM).
"""

from __future__ import annotations

import functools
import importlib.util
import os
from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl

from qkernels.pack import CODE_BITS, PackedWeight, dequantize_packed


@dataclass(frozen=True)
class GemvConfig:
    block_n: int = 32
    num_warps: int = 4
    split_k: int = 1  # programs along K; the last to finish a tile adds up the partial sums
    num_stages: int = 2


@dataclass(frozen=True)
class GemmConfig:
    block_n: int = 128
    block_m: int = 64
    num_warps: int = 4
    num_stages: int = 3
    block_k: int = 128  # at most: the dot depth is a whole number of slot runs of one chunk
    split_k: int = 1


@dataclass(frozen=True)
class MmaConfig:
    block_n: int = 64
    num_warps: int = 4
    split_k: int = 4
    num_stages: int = 2


GEMV_MAX_M = 8
MMA_MAX_M = 128  # rows the MMA kernel takes (activation tiles of 16, 32 or 64 rows; two tiles above 64)
MMA_MAX_BLOCK_M = 64  # activation rows per program: the best probe configs at 128 rows (H100, session 6) used two tiles of 64
MMA_AUTO_MAX_M = 16  # rows up to which pick_path chooses it, unless MMA_AUTO_ROWS says more
MMA_FOLD_MIN_M = 16  # above this many rows the MMA kernel folds scales and zeros into fp16 weights (FOLD)
# H100, 64 rows, steady state (session 6, bench/results/kernel_latency_h100.md): the folded MMA kernel beat
# the GEMM at all seven shapes for W4 (8192^2: 36.7 us vs 84.9, cuBLAS 49.6) and grouped W2 (41.8 vs 83.7),
# and for ternary as uint2 at five (8192^2: 50.4 vs 78.0; not 4096^2 and 14336x4096). Grouped W1 won at
# four shapes (8192^2 63.6 vs 83.1) but lost by 20-47% at three (14336x4096: 106.1 vs 71.9), so it keeps
# the GEMM above 16 rows and dequant + cuBLAS above 64 (at 128 rows 113.3 us against the MMA kernel's 118.7).
# At 96 and 128 rows (two 64-row tiles) the folded kernel took W4 62.2 / 62.6 us, W2 73.6 / 75.8, ternary
# 91.2 / 92.2 at 8192^2 against dequant + cuBLAS 113-120 at 128 (cuBLAS 50.4-50.9).
MMA_AUTO_ROWS: dict[tuple[str, bool], int] = {("uint4", True): 128, ("uint2", True): 128, ("uint2", False): 128}
MMA_SHARED_BUDGET = 200 * 1024  # bytes of pipelined tiles per program (the H100 has 227 KiB)
# The layouts the dispatcher sends to the MMA kernel (which takes all of UINT_LAYOUTS): its uint3 branch (_slot3_fp16,
# session 16) is right in the interpreter but not yet timed on a GPU, so W3 keeps the pair GEMV at 2-8 rows and the
# wgmma GEMM or the GEMM above (path="mma" runs it)
MMA_AUTO_LAYOUTS = ("uint1", "uint2", "uint4")
# H100 (session 6): above 64 rows the GEMM's 128-row tiles took 214-250 us at 96 and 128 rows (8192^2) against
# dequant + cuBLAS 113-120 at 128 rows, every kind; at 64 rows the GEMM won (83-85 vs 118).
DEQUANT_MIN_M = 65
GEMM_MIN_RUN = 16  # a tensor-core dot needs a depth of at least 16
# Tuned tile configs: GEMV by (layout, several groups per row), GEMM by batch bucket (a power of two).
GEMV_CONFIGS: dict[tuple[str, bool], GemvConfig] = {  # best of bench.kernel_latency --tune on H100, 8192^2, batch 1
    ("uint4", True): GemvConfig(block_n=64, num_warps=4, split_k=4),
    ("uint3", True): GemvConfig(block_n=64, num_warps=4, split_k=4),
    ("uint2", True): GemvConfig(block_n=64, num_warps=4, split_k=4),
    ("uint2", False): GemvConfig(block_n=128, num_warps=8, split_k=4),
    ("uint1", True): GemvConfig(block_n=64, num_warps=4, split_k=2),
}
# The layouts of the fp16-pair GEMV, the tensor-core GEMV, the MMA kernel and the wgmma GEMM: uint3 (a two-bit plane
# and a one-bit plane) as two planes of pairs (_pair_fma3, gemv_mma._decode_slot3, _slot3_fp16,
# gemm_wgmma._slot_weights3). H200, steady state, W3 g128 (session 16,
# bench/results/kernel_latency_h200.md): the pair GEMV at batch 1 20.4 us at 8192^2 against 29.1 on the fp32 GEMV,
# 18.3 against 29.3 at 14336x4096, 21.5 against 25.9 at 4096x14336 (the tensor-core GEMV beat both: GEMV_MMA_KEYS);
# 16 and 64 rows on the wgmma GEMM 1.07x-1.45x of cuBLAS (4096^2 at 64 rows 0.82x; the Triton MMA kernel's uint3
# branch is not yet timed), 128 and 256 rows 0.58x-0.92x against 0.42x-0.54x for dequant + cuBLAS (but 4096^2 at
# 256 rows: 30.2 us against 27.1), which wins at 1024 rows (8192^2: 242.7 us against 261.9).
UINT_LAYOUTS = ("uint1", "uint2", "uint3", "uint4")
GEMV_MMA_RUN = 32  # the tensor-core GEMV's words per row and chunk (qkernels/gemv_mma.py)
# Batch 1 on the tensor-core GEMV (qkernels/gemv_mma.py) for these (layout, grouped) keys: H100, steady state,
# seven layer shapes (session 9, bench/results/kernel_latency_h100.md): faster than the fp16-pair GEMV at all
# seven for grouped W1 and W2 (8192^2: 12.3 us against 14.4, 12.9 against 14.3) and at six for ternary as
# uint2 (11.0 against 12.5; tied at 4096x14336). Grouped W4 only where K >= 2N and N <= 4096 (14336x4096:
# 16.0 against 19.2); elsewhere it tied or lost (28672x8192: 66.0 against 52.3) and keeps the pair GEMV.
# On Hopper GPUs grouped W4 takes it at every shape: on an H200 (session 12, with its TMA feed) it beat the pair
# GEMV at all seven (8192^2: 13.3 us against 15.9; 28672x8192: 40.8 against 43.8; 8192x28672: 38.1 against 48.8).
# Grouped W3 too (H200, session 16, its plain-load branch against the pair GEMV; us): 8192^2 17.6 against 20.3,
# 14336x4096 17.2 against 18.3, 4096x14336 17.0 against 21.4, 8192x28672 51.0 against 66.5, 28672x8192 51.2 against 59.9.
GEMV_MMA_KEYS = {("uint1", True), ("uint2", True), ("uint2", False), ("uint3", True)}


def long_k(pw: PackedWeight) -> bool:
    """A long K: at least twice the rows, and at most 4096 rows (14336x4096 among the benchmark's shapes), where
    the batch-1 kernels want more K splits."""
    return pw.k >= 2 * pw.n and pw.n <= 4096


def gemv_mma_preferred(pw: PackedWeight, hopper: bool = False) -> bool:
    """Batch 1 goes to the tensor-core GEMV for :data:`GEMV_MMA_KEYS`, and for grouped W4 on a Hopper GPU
    or elsewhere with a long K (the shape rule under which it won on the H100)."""
    return gemv_key(pw) in GEMV_MMA_KEYS or (gemv_key(pw) == ("uint4", True) and (hopper or long_k(pw)))


GEMV_PAIR_CONFIGS: dict[tuple[str, bool], GemvConfig] = {  # the fp16-pair GEMV: bench.kernel_latency --tune, H100, 8192^2 (session 7)
    ("uint4", True): GemvConfig(block_n=64, num_warps=4, split_k=4, num_stages=2),
    ("uint2", True): GemvConfig(block_n=128, num_warps=4, split_k=4, num_stages=1),
    ("uint2", False): GemvConfig(block_n=64, num_warps=4, split_k=4, num_stages=2),
    ("uint1", True): GemvConfig(block_n=64, num_warps=4, split_k=2, num_stages=2),
    ("uint3", True): GemvConfig(block_n=64, num_warps=4, split_k=2, num_stages=2),  # H200, session 16: 20.4 us at 8192^2
}
GEMV_PAIR_LONG_K_CONFIGS = {  # the same, with K >= 2N and N <= 4096 (:func:`long_k`)
    ("uint3", True): GemvConfig(block_n=64, num_warps=4, split_k=4, num_stages=2),  # 14336x4096: 18.3 us against 26.1
}
MMA_CONFIGS: dict[tuple[str, bool], MmaConfig] = {  # H100, 8192^2, batch 16 (session 3 search; grouped W2 and W1 session 6)
    ("uint4", True): MmaConfig(block_n=64, num_warps=4, split_k=4, num_stages=3),
    ("uint2", True): MmaConfig(block_n=128, num_warps=8, split_k=2, num_stages=3),
    ("uint2", False): MmaConfig(block_n=64, num_warps=4, split_k=4),
    ("uint1", True): MmaConfig(block_n=128, num_warps=8, split_k=2, num_stages=3),
}
MMA_FOLD_CONFIGS: dict[tuple[str, bool], MmaConfig] = {  # H100, 8192^2, 64 rows (session 6, bench.kernel_latency --tune)
    ("uint4", True): MmaConfig(block_n=128, num_warps=8, split_k=4, num_stages=2),
    ("uint2", True): MmaConfig(block_n=128, num_warps=8, split_k=2, num_stages=3),
    ("uint2", False): MmaConfig(block_n=128, num_warps=8, split_k=2, num_stages=2),
    ("uint1", True): MmaConfig(block_n=64, num_warps=4, split_k=2, num_stages=2),
}
# At batch 1 the MMA kernel beat the fp32 GEMV for these (layout, grouped) keys on the H100, 8192^2 (W4 22.7 us
# vs 25.4, W1 23.5 vs 27.0, ternary as uint2 18.6 vs 21.9); for grouped uint2 the GEMV won (23.8 vs 27.4).
# The fp16-pair GEMV beats the MMA kernel for all four (session 5: W4 18.8 vs 23.1, W2 16.1 vs 27.2,
# ternary 13.4 vs 18.6, W1 16.5 vs 23.0), so this only counts where it does not fit.
MMA_AT_BATCH_1 = {("uint4", True), ("uint1", True), ("uint2", False)}
GEMM_CONFIGS: dict[int, GemmConfig] = {  # by batch bucket (a power of two)
    16: GemmConfig(block_n=64, block_m=16, num_warps=4, num_stages=2, block_k=128, split_k=4),
    64: GemmConfig(block_n=64, block_m=64, num_warps=4, num_stages=2, block_k=128, split_k=4),
    256: GemmConfig(block_n=128, block_m=128, num_warps=8, num_stages=2, block_k=128),
    1024: GemmConfig(block_n=128, block_m=256, num_warps=8, num_stages=2, block_k=64),
}


# ----------------------------------------------------------------------------- decoding helpers


@triton.jit
def _shift(x, AMOUNT: tl.constexpr):
    """``x << AMOUNT`` for AMOUNT >= 0, else ``x >> -AMOUNT`` (the caller masks the bits it keeps)."""
    if AMOUNT >= 0:
        return x << AMOUNT
    else:
        return x >> (-AMOUNT)


@triton.jit
def _unit_float(words, high, SLOT: tl.constexpr, LAYOUT: tl.constexpr, BITS: tl.constexpr):
    """Slot ``SLOT`` of every word as the fp32 ``1 + code / 2**BITS`` (code in the top mantissa bits)."""
    if LAYOUT == "ternary5":
        trit_byte = (words * (3**SLOT)) & 255  # trit in bits 8..9 of trit_byte * 3
        bits = ((trit_byte * 24576) & 0x600000) | 0x3F800000  # * 3 << 13 puts them at 21..22
    elif LAYOUT == "uint3":
        low = _shift(words, 20 - 2 * SLOT) & 0x300000
        top = _shift(high, 22 - SLOT) & 0x400000
        bits = low | top | 0x3F800000
    else:
        mask: tl.constexpr = ((1 << BITS) - 1) << (23 - BITS)
        bits = (_shift(words, 23 - BITS - BITS * SLOT) & mask) | 0x3F800000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _code(words, high, SLOT: tl.constexpr, LAYOUT: tl.constexpr, BITS: tl.constexpr):
    """Slot ``SLOT`` of every word as an int32 code."""
    if LAYOUT == "ternary5":
        return (((words * (3**SLOT)) & 255) * 3) >> 8
    elif LAYOUT == "uint3":
        return ((words >> (2 * SLOT)) & 3) | (((high >> SLOT) & 1) << 2)
    else:
        return (words >> (BITS * SLOT)) & ((1 << BITS) - 1)


@triton.jit
def _dequant(code, scale, zero, DTYPE: tl.constexpr):
    """``(code - zero) * scale`` in DTYPE (fp16/bf16) with one rounding, like the reference.

    ``0x6400 | code`` read as fp16 is ``1024 + code`` exactly (no int->float conversion), and
    ``code - zero`` is exact in fp16 for integer and half-integer zeros. bf16 takes the same trick in
    fp32 (``0x43000000 | code << 16`` is ``128 + code``) and rounds once at the end: the Triton
    interpreter miscomputes arithmetic on bf16 values made by a bitcast. ``scale`` and ``zero``
    come in fp16 for fp16, fp32 for bf16 (``math_dtype``).
    """
    if DTYPE == tl.float16:
        value = (code | 0x6400).to(tl.int16).to(tl.float16, bitcast=True) - 1024.0
        return ((value - zero) * scale).to(DTYPE)
    else:
        value = ((code << 16) | 0x43000000).to(tl.float32, bitcast=True) - 128.0
        return ((value - zero) * scale).to(DTYPE)


@triton.jit
def _load_chunk(w_ptr, hi_ptr, offs_n, offs_r, mask_n, chunk, stride_wn, stride_hn, LAYOUT: tl.constexpr, RUN: tl.constexpr):
    """Words of one chunk for ``BLOCK_N`` rows (int32), and uint3's high plane shifted to this chunk."""
    words = tl.load(w_ptr + offs_n[:, None] * stride_wn + chunk * RUN + offs_r[None, :], mask=mask_n[:, None], other=0)
    words = words.to(tl.int32)
    high = words
    if LAYOUT == "uint3":  # one high-plane chunk (32 slots) spans two low-plane chunks (16 slots)
        high = tl.load(hi_ptr + offs_n[:, None] * stride_hn + (chunk // 2) * RUN + offs_r[None, :], mask=mask_n[:, None], other=0)
        high = high >> ((chunk % 2) * 16)
    return words, high


@triton.jit
def _load_group(scale_ptr, zero_ptr, offs_n, mask_n, group, n_groups, stride_sn, stride_sg, zero_const, HAS_ZERO: tl.constexpr):
    """Scale and zero point (fp32) of one group for ``BLOCK_N`` rows.

    Chunks of row padding lie past the last group; they take its scale (their activations are 0).
    """
    group = tl.minimum(group, n_groups - 1)
    scale = tl.load(scale_ptr + offs_n * stride_sn + group * stride_sg, mask=mask_n, other=0).to(tl.float32)
    if HAS_ZERO:
        zero = tl.load(zero_ptr + offs_n * stride_sn + group * stride_sg, mask=mask_n, other=0).to(tl.float32)
    else:
        zero = tl.zeros_like(scale) + zero_const
    return scale, zero


@triton.jit
def _split_range(n_steps, SPLIT_K: tl.constexpr):
    """Steps ``[first, last)`` of this program's K split (program axis 2)."""
    per_split = tl.cdiv(n_steps, SPLIT_K)
    first = tl.program_id(2) * per_split
    return first, tl.minimum(first + per_split, n_steps)


@triton.jit
def _store_transposed(y_ptr, acc, offs_m, offs_n, mask_m, mask_n, stride_ym, partial_ptr, count_ptr, SPLIT_K: tl.constexpr):
    """Store the ``[BLOCK_N, BLOCK_M]`` tile of ``y^T``.

    Under split-K every split writes its fp32 partial sum to ``partial_ptr`` and counts itself in on
    the tile's counter; the last split to arrive adds the partials up in split order, stores the tile
    in y's dtype (one rounding) and sets the counter back to 0. So the output needs no zeroing kernel
    and no fp16/bf16 atomics, and a run gives the same bits every time. The barrier before the count
    orders every thread's partial before it (the count is one thread's release); the partials are
    read back through L2 (``.cg``).
    """
    y = y_ptr + offs_m[None, :] * stride_ym + offs_n[:, None]
    mask = mask_n[:, None] & mask_m[None, :]
    if SPLIT_K == 1:
        tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        BLOCK_N: tl.constexpr = acc.shape[0]
        BLOCK_M: tl.constexpr = acc.shape[1]
        n_tiles = tl.num_programs(0) * tl.num_programs(1)
        tile = tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)
        cell = tl.arange(0, BLOCK_N)[:, None] * BLOCK_M + tl.arange(0, BLOCK_M)[None, :]
        tl.store(partial_ptr + (tl.program_id(2) * n_tiles + tile).to(tl.int64) * (BLOCK_N * BLOCK_M) + cell, acc)
        tl.debug_barrier()
        arrived = tl.atomic_add(count_ptr + tile, 1, sem="acq_rel", scope="gpu")
        if arrived == SPLIT_K - 1:
            total = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
            for split in tl.static_range(SPLIT_K):
                total += tl.load(partial_ptr + (split * n_tiles + tile).to(tl.int64) * (BLOCK_N * BLOCK_M) + cell, cache_modifier=".cg")
            tl.store(y, total.to(y_ptr.dtype.element_ty), mask=mask)
            tl.atomic_xchg(count_ptr + tile, 0, sem="relaxed", scope="gpu")


# ----------------------------------------------------------------------------- GEMV (small M)


@triton.jit
def _gemv_kernel(
    x_ptr, w_ptr, hi_ptr, scale_ptr, zero_ptr, y_ptr, partial_ptr, count_ptr,
    M, N, K, n_chunks, n_groups, stride_sn, stride_sg, group_size, zero_const,
    stride_xm, stride_wn, stride_hn, stride_ym,
    LAYOUT: tl.constexpr, BITS: tl.constexpr, SLOTS: tl.constexpr, RUN: tl.constexpr,
    SLOTS_PER_GROUP: tl.constexpr, HAS_ZERO: tl.constexpr,
    BLOCK_N: tl.constexpr, SPLIT_K: tl.constexpr,
):
    """Program ``(m, n, k)``: activation row ``m`` (the rows of one weight tile are launched side by
    side, so their weight reads after the first can hit L2; not timed), ``BLOCK_N`` weight rows, one K
    split, one chunk (a cache line per weight row) per step.

    Every tensor of the hot loop is a ``[BLOCK_N, RUN]`` tile in the weight's layout, or a slice of
    it: per code one shift, one mask-or and one FMA into ``part``; at a group's end ``part`` is scaled
    into ``acc`` element-wise, and the code offset and zero point come off once per group with the
    group's activation sum. The only reduction over K is the one at the end.
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    CHUNK: tl.constexpr = SLOTS * RUN
    unit: tl.constexpr = 2.0**BITS
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, RUN)
    mask_n = offs_n < N
    x_row = x_ptr + pid_m * stride_xm
    first, last = _split_range(n_chunks, SPLIT_K)
    acc = tl.zeros((BLOCK_N, RUN), dtype=tl.float32)
    offset = tl.zeros((BLOCK_N,), dtype=tl.float32)  # sum over groups of (unit + zero) * scale * sum(x)
    # register double buffering: the next chunk's words are loaded before this chunk's arithmetic (the
    # index is clamped, so the last step reloads its own chunk instead of reading past the split)
    next_words, next_high = _load_chunk(w_ptr, hi_ptr, offs_n, offs_r, mask_n, tl.minimum(first, n_chunks - 1), stride_wn, stride_hn, LAYOUT, RUN)
    for chunk in range(first, last):
        words, high = next_words, next_high
        next_words, next_high = _load_chunk(w_ptr, hi_ptr, offs_n, offs_r, mask_n, tl.minimum(chunk + 1, last - 1), stride_wn, stride_hn, LAYOUT, RUN)
        part = tl.zeros((BLOCK_N, RUN), dtype=tl.float32)
        x_sum = tl.zeros((1, RUN), dtype=tl.float32)
        for slot in tl.static_range(SLOTS):
            k = chunk * CHUNK + slot * RUN + offs_r[None, :]
            x = tl.load(x_row + k, mask=k < K, other=0.0).to(tl.float32)  # [1, RUN]
            part += _unit_float(words, high, slot, LAYOUT, BITS) * x
            x_sum += x
            if (slot + 1) % SLOTS_PER_GROUP == 0:  # a group ends here
                group = (chunk * CHUNK + slot * RUN) // group_size
                scale, zero = _load_group(scale_ptr, zero_ptr, offs_n, mask_n, group, n_groups, stride_sn, stride_sg, zero_const, HAS_ZERO)
                acc += part * (unit * scale)[:, None]
                offset += (unit + zero) * scale * tl.sum(x_sum, axis=1)
                part = tl.zeros((BLOCK_N, RUN), dtype=tl.float32)
                x_sum = tl.zeros((1, RUN), dtype=tl.float32)
    y_row = tl.sum(acc, axis=1) - offset
    offs_m = pid_m + tl.arange(0, 1)
    _store_transposed(y_ptr, y_row[:, None], offs_m, offs_n, offs_m < M, mask_n, stride_ym, partial_ptr, count_ptr, SPLIT_K)


# ----------------------------------------------------------------------------- GEMV on fp16 pairs (fp16, uint1/2/4)


@triton.jit
def _half_bits(v):
    """fp16 values as the low 16 bits of an int32."""
    return v.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF


@triton.jit
def _half(pair, HIGH: tl.constexpr):
    """One half of an fp16 pair (int32 bits) as fp16."""
    bits = pair
    if HIGH:
        bits = pair >> 16
    return (bits & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True)


@triton.jit
def _half_float(pair, HIGH: tl.constexpr):
    """One half of an fp16 pair (int32 bits) as fp32."""
    return _half(pair, HIGH).to(tl.float32)


@triton.jit
def _neg_zero_pair(zero_lo, zero_hi, P: tl.constexpr):
    """``-(2**(10 - P) + zero) / 16`` per half, as fp16 pair bits (exact for integer zero points, and for
    P = 4 for zero points on a 1/16 grid within +-64)."""
    base: tl.constexpr = -(2.0 ** (6 - P))
    return _half_bits((base - zero_lo * 0.0625).to(tl.float16)) | (_half_bits((base - zero_hi * 0.0625).to(tl.float16)) << 16)


@triton.jit
def _add_60(neg_zero, INTEGER_ZEROS: tl.constexpr, INTERPRET: tl.constexpr):
    """``-(1024 + z) / 16`` pairs to ``-(64 + z) / 16`` (one ``add.rn.f16x2`` of 60, exact for integer z),
    where the kernel needs both; else ``neg_zero`` itself (already the P = 4 pair)."""
    if not INTEGER_ZEROS:
        return neg_zero
    elif INTERPRET:
        return _half_bits(_half(neg_zero, False) + 60.0) | (_half_bits(_half(neg_zero, True) + 60.0) << 16)
    else:
        return tl.inline_asm_elementwise(
            asm="{ .reg .b32 c; mov.b32 c, 0x53805380; add.rn.f16x2 $0, $1, c; }",
            constraints="=r,r", args=[neg_zero], dtype=tl.int32, is_pure=True, pack=1,
        )


@triton.jit
def _pair_fma(words, x_pair, neg_zero, acc, SLOT: tl.constexpr, BITS: tl.constexpr, INTEGER_ZEROS: tl.constexpr, FIRST: tl.constexpr,
              INTERPRET: tl.constexpr):
    """``acc + (code - zero) / 16 * x`` on fp16 pairs (int32 bits): the low half takes slot ``SLOT`` of every
    word, the high half slot ``SLOT + SLOTS / 2`` (16 bits higher), each with its half of ``x_pair``.

    The word is shifted so that both codes sit at bit ``P`` of their halves; ``lop3`` keeps them and
    ors in ``0x6400``, which reads as ``1024 + 2**P * code``; one fma by ``2**-(P + 4)`` plus
    ``neg_zero`` (``-(2**(10 - P) + zero) / 16``) leaves ``(code - zero) / 16`` exactly (the 1/16
    keeps the quad's fp16 sums in range), and one fma by ``x`` adds the product (a multiply for the
    ``FIRST`` pair of a quad, whose ``acc`` is zero: no zeroed registers).
    ``P`` is 0 or 4, whichever needs no shift of its own (per two codes: ``lop3``, two ``fma.rn.f16x2``
    and a shift shared with another pair), where every zero point is an integer (``-(1024 + zero) / 16``
    is exact); else always 4, exact for zero points on a 1/16 grid. The interpreter cannot run PTX:
    there the same arithmetic runs on fp16 halves (unfused, so the last bit may differ).
    """
    if INTEGER_ZEROS:
        P: tl.constexpr = (BITS * SLOT) % 8 // 4 * 4
    else:
        P: tl.constexpr = 4
    SHIFT: tl.constexpr = BITS * SLOT - P
    MASK: tl.constexpr = (((1 << BITS) - 1) << P) * 0x10001
    MUL: tl.constexpr = ((11 - P) << 10) * 0x10001  # fp16 2**-(P + 4), twice
    if INTERPRET:
        out = tl.zeros_like(acc)
        for HIGH in tl.static_range(2):
            code = ((words >> (BITS * SLOT + 16 * HIGH)) & ((1 << BITS) - 1)).to(tl.float16)
            total = (code * 0.0625 + _half(neg_zero, HIGH) + (2.0 ** (6 - P))) * _half(x_pair, HIGH) + _half(acc, HIGH)
            out |= _half_bits(total) << (16 * HIGH)
        return out
    SHIFT_OP: tl.constexpr = "shr.u32" if SHIFT >= 0 else "shl.b32"
    ADD_PRODUCT: tl.constexpr = "mul.rn.f16x2 $0, d, $2;" if FIRST else "fma.rn.f16x2 $0, d, $2, $4;"
    return _pair_fma_asm(words, x_pair, neg_zero, acc, SHIFT_OP, SHIFT if SHIFT >= 0 else -SHIFT, MASK, MUL, ADD_PRODUCT)


@triton.jit
def _pair_fma_asm(words, x_pair, neg_zero, acc, SHIFT_OP: tl.constexpr, SHIFT: tl.constexpr, MASK: tl.constexpr, MUL: tl.constexpr,
                  ADD_PRODUCT: tl.constexpr):
    return tl.inline_asm_elementwise(
        asm=f"""{{
        .reg .b32 t, v, d, m;
        {SHIFT_OP} t, $1, {SHIFT};
        lop3.b32 v, t, {MASK}, 0x64006400, 0xea;
        mov.b32 m, {MUL};
        fma.rn.f16x2 d, v, m, $3;
        {ADD_PRODUCT}
        }}""",
        constraints="=r,r,r,r,r", args=[words, x_pair, neg_zero, acc], dtype=tl.int32, is_pure=True, pack=1,
    )


def pair_constants(slot: int, bits: int, integer_zeros: bool) -> dict[str, int]:
    """The integer constants of ``_pair_fma``'s asm (the same expressions), for tests that emulate it."""
    p = (bits * slot) % 8 // 4 * 4 if integer_zeros else 4
    return dict(p=p, shift=bits * slot - p, mask=(((1 << bits) - 1) << p) * 0x10001, mul=((11 - p) << 10) * 0x10001)


def pair3_constants(slot: int) -> dict[str, int]:
    """The integer constants of ``_pair_fma3``'s asm (the same expressions), for tests that emulate it."""
    return dict(shift_lo=2 * slot - 4, mask_lo=(3 << 4) * 0x10001, shift_hi=slot - 6, mask_hi=(1 << 6) * 0x10001, mul=(7 << 10) * 0x10001)


@triton.jit
def _spread_high(high):
    """uint3's high plane (already shifted to the chunk: slot ``s`` at bit ``s``) with slots 8-15 moved up 8
    bits, so that slot ``s`` and slot ``s + 8`` sit 16 bits apart like the low plane's pairs."""
    return (high & 0xFF) | ((high & 0xFF00) << 8)


@triton.jit
def _pair_fma3(words, high, x_pair, neg_zero, acc, SLOT: tl.constexpr, FIRST: tl.constexpr, INTERPRET: tl.constexpr):
    """``_pair_fma`` for uint3 (``P`` = 4): the low plane's two bits of slots ``SLOT`` and ``SLOT + 8`` to bits
    4-5 of their halves, the spread high plane's bit (:func:`_spread_high`) to bit 6, one ``lop3`` each, so the
    pair reads ``1024 + 16 * code``; then the same two fmas (``neg_zero`` is the P = 4 pair)."""
    if INTERPRET:
        out = tl.zeros_like(acc)
        for HIGH in tl.static_range(2):
            code = ((words >> (2 * SLOT + 16 * HIGH)) & 3) | (((high >> (SLOT + 16 * HIGH)) & 1) << 2)
            total = (code.to(tl.float16) * 0.0625 + _half(neg_zero, HIGH) + 4.0) * _half(x_pair, HIGH) + _half(acc, HIGH)
            out |= _half_bits(total) << (16 * HIGH)
        return out
    SHIFT_LO: tl.constexpr = 2 * SLOT - 4
    SHIFT_HI: tl.constexpr = SLOT - 6
    LO_OP: tl.constexpr = "shr.u32" if SHIFT_LO >= 0 else "shl.b32"
    HI_OP: tl.constexpr = "shr.u32" if SHIFT_HI >= 0 else "shl.b32"
    ADD_PRODUCT: tl.constexpr = "mul.rn.f16x2 $0, d, $3;" if FIRST else "fma.rn.f16x2 $0, d, $3, $5;"
    return tl.inline_asm_elementwise(
        asm=f"""{{
        .reg .b32 t, u, v, d, m;
        {LO_OP} t, $1, {SHIFT_LO if SHIFT_LO >= 0 else -SHIFT_LO};
        lop3.b32 v, t, {(3 << 4) * 0x10001}, 0x64006400, 0xea;
        {HI_OP} u, $2, {SHIFT_HI if SHIFT_HI >= 0 else -SHIFT_HI};
        lop3.b32 v, u, {(1 << 6) * 0x10001}, v, 0xea;
        mov.b32 m, {(7 << 10) * 0x10001};
        fma.rn.f16x2 d, v, m, $4;
        {ADD_PRODUCT}
        }}""",
        constraints="=r,r,r,r,r,r", args=[words, high, x_pair, neg_zero, acc], dtype=tl.int32, is_pure=True, pack=1,
    )


@triton.jit
def _x_pair(x_row, k, HALF_RUNS: tl.constexpr, K, EVEN_K: tl.constexpr):
    """Activations ``k`` and ``k + HALF_RUNS`` as fp16 pair bits ``[1, RUN]``."""
    if EVEN_K:
        x_lo = tl.load(x_row + k)
        x_hi = tl.load(x_row + k + HALF_RUNS)
    else:
        x_lo = tl.load(x_row + k, mask=k < K, other=0.0)
        x_hi = tl.load(x_row + k + HALF_RUNS, mask=k + HALF_RUNS < K, other=0.0)
    return _half_bits(x_lo) | (_half_bits(x_hi) << 16)


@triton.jit
def _chunk_x_pairs(x_row, chunk, offs_r, K, CHUNK: tl.constexpr, RUN: tl.constexpr, HALF: tl.constexpr, EVEN_K: tl.constexpr):
    """A chunk's activation pairs, one ``[1, RUN]`` tensor per slot pair (a tuple of ``HALF``), so that
    the loop can load the next chunk's while it computes this one's."""
    pairs = ()
    for slot in tl.static_range(HALF):
        pairs = pairs + (_x_pair(x_row, chunk * CHUNK + slot * RUN + offs_r[None, :], HALF * RUN, K, EVEN_K),)
    return pairs


@triton.jit
def _pair_words(w_ptr, offs_n, offs_r, mask_n, chunk, stride_wn, RUN: tl.constexpr, EVEN_N: tl.constexpr):
    """One chunk's words of ``BLOCK_N`` rows; unmasked where the rows fill every tile (``EVEN_N``),
    which spares zeroing the registers of a predicated load."""
    words = w_ptr + offs_n[:, None] * stride_wn + chunk * RUN + offs_r[None, :]
    if EVEN_N:
        return tl.load(words).to(tl.int32)
    else:
        return tl.load(words, mask=mask_n[:, None], other=0).to(tl.int32)


@triton.jit
def _pair_high(hi_ptr, offs_n, offs_r, mask_n, chunk, stride_hn, RUN: tl.constexpr, EVEN_N: tl.constexpr):
    """uint3's high plane for one low-plane chunk (one high-plane chunk spans two), spread (:func:`_spread_high`)."""
    high = _pair_words(hi_ptr, offs_n, offs_r, mask_n, chunk // 2, stride_hn, RUN, EVEN_N)
    return _spread_high(high >> ((chunk % 2) * 16))


@triton.jit
def _quad_groups(scale_ptr, zero_ptr, offs_n, mask_n, chunk, QUAD_INDEX: tl.constexpr, n_groups, stride_sn, stride_sg, group_size, zero_const,
                 HAS_ZERO: tl.constexpr, CHUNK: tl.constexpr, RUN: tl.constexpr, QUAD: tl.constexpr, HALF: tl.constexpr,
                 SLOTS_PER_GROUP: tl.constexpr, GROUPS_IN_CHUNK: tl.constexpr):
    """Scales and zero points of the two groups that a quad of pairs reads: its low slots'
    ``QUAD_INDEX * QUAD ...`` and its high slots' (``HALF`` slots on). Where whole groups tile a chunk
    (``GROUPS_IN_CHUNK``) the group index takes no division."""
    first_slot: tl.constexpr = QUAD_INDEX * QUAD
    if GROUPS_IN_CHUNK:
        group_lo = chunk * (2 * HALF // SLOTS_PER_GROUP) + first_slot // SLOTS_PER_GROUP
        group_hi = chunk * (2 * HALF // SLOTS_PER_GROUP) + (first_slot + HALF) // SLOTS_PER_GROUP
    else:
        group_lo = (chunk * CHUNK + first_slot * RUN) // group_size
        group_hi = (chunk * CHUNK + (first_slot + HALF) * RUN) // group_size
    s_lo, z_lo = _load_group(scale_ptr, zero_ptr, offs_n, mask_n, group_lo, n_groups, stride_sn, stride_sg, zero_const, HAS_ZERO)
    s_hi, z_hi = _load_group(scale_ptr, zero_ptr, offs_n, mask_n, group_hi, n_groups, stride_sn, stride_sg, zero_const, HAS_ZERO)
    return s_lo, s_hi, z_lo, z_hi


@triton.jit
def _gemv_pairs_kernel(
    x_ptr, w_ptr, hi_ptr, scale_ptr, zero_ptr, y_ptr, partial_ptr, count_ptr,
    M, N, K, n_chunks, n_groups, stride_sn, stride_sg, group_size, zero_const,
    stride_xm, stride_wn, stride_hn, stride_ym,
    BITS: tl.constexpr, SLOTS: tl.constexpr, RUN: tl.constexpr, SLOTS_PER_GROUP: tl.constexpr, GROUPS_IN_CHUNK: tl.constexpr,
    HAS_ZERO: tl.constexpr, INTEGER_ZEROS: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_K: tl.constexpr, EVEN_K: tl.constexpr,
    EVEN_N: tl.constexpr, INTERPRET: tl.constexpr,
):
    """Program ``(m, n, k)`` as in ``_gemv_kernel``, with fp16 arithmetic on pairs of codes.

    A word's slot ``s`` and slot ``s + SLOTS / 2`` are one fp16 pair (``_pair_fma``), so per code a
    half ``lop3``, one fma to take off the offset and the zero point (and divide by 16), one fma with the
    activation. The pairs of a chunk go in quads of ``QUAD`` that stay inside one scale group per half;
    a quad sums its products in fp16 (at most 16 per element; the 1/16 keeps the sums far from fp16's
    range, for W4 for activations below about 17000), then adds them to the fp32 accumulator
    with its two groups' scales (the 1/16 is undone once, on the row sums at the end). Every load of
    the next step (the chunk's words and activation pairs, the quad's scales and zero points) is
    issued a step ahead: waiting on the activations' loads was the largest stall in an Nsight Compute
    profile (H100, W4 8192^2, session 7). uint3 (``BITS`` 3) also loads its high plane and builds each pair
    from both planes (:func:`_pair_fma3`, always ``P`` = 4).
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    CHUNK: tl.constexpr = SLOTS * RUN
    HALF: tl.constexpr = SLOTS // 2
    QUAD: tl.constexpr = SLOTS_PER_GROUP if SLOTS_PER_GROUP < HALF else HALF
    QUADS: tl.constexpr = HALF // QUAD
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, RUN)
    mask_n = offs_n < N
    x_row = x_ptr + pid_m * stride_xm
    first, last = _split_range(n_chunks, SPLIT_K)
    acc = tl.zeros((BLOCK_N, RUN), dtype=tl.float32)
    start = tl.minimum(first, n_chunks - 1)
    next_words = _pair_words(w_ptr, offs_n, offs_r, mask_n, start, stride_wn, RUN, EVEN_N)
    next_high = next_words
    if BITS == 3:
        next_high = _pair_high(hi_ptr, offs_n, offs_r, mask_n, start, stride_hn, RUN, EVEN_N)
    next_x = _chunk_x_pairs(x_row, start, offs_r, K, CHUNK, RUN, HALF, EVEN_K)
    next_s_lo, next_s_hi, next_z_lo, next_z_hi = _quad_groups(
        scale_ptr, zero_ptr, offs_n, mask_n, start, 0, n_groups, stride_sn, stride_sg, group_size, zero_const, HAS_ZERO, CHUNK, RUN, QUAD, HALF, SLOTS_PER_GROUP, GROUPS_IN_CHUNK)
    for chunk in range(first, last):
        words = next_words
        following = tl.minimum(chunk + 1, last - 1)
        next_words = _pair_words(w_ptr, offs_n, offs_r, mask_n, following, stride_wn, RUN, EVEN_N)
        high = next_high
        if BITS == 3:
            next_high = _pair_high(hi_ptr, offs_n, offs_r, mask_n, following, stride_hn, RUN, EVEN_N)
        x_pairs = next_x
        next_x = _chunk_x_pairs(x_row, following, offs_r, K, CHUNK, RUN, HALF, EVEN_K)
        for quad in tl.static_range(QUADS):
            s_lo, s_hi, z_lo, z_hi = next_s_lo, next_s_hi, next_z_lo, next_z_hi
            if quad + 1 < QUADS:
                next_s_lo, next_s_hi, next_z_lo, next_z_hi = _quad_groups(
                    scale_ptr, zero_ptr, offs_n, mask_n, chunk, quad + 1, n_groups, stride_sn, stride_sg, group_size, zero_const, HAS_ZERO, CHUNK, RUN, QUAD, HALF, SLOTS_PER_GROUP, GROUPS_IN_CHUNK)
            else:
                next_s_lo, next_s_hi, next_z_lo, next_z_hi = _quad_groups(
                    scale_ptr, zero_ptr, offs_n, mask_n, following, 0, n_groups, stride_sn, stride_sg, group_size, zero_const, HAS_ZERO, CHUNK, RUN, QUAD, HALF, SLOTS_PER_GROUP, GROUPS_IN_CHUNK)
            # the group values are loaded one row per thread; they cross to the tile's layout (through
            # shared memory) as one int64 per row: the neg-zero pair and the scale pair
            neg_zero = _neg_zero_pair(z_lo, z_hi, 0 if INTEGER_ZEROS else 4)
            meta = ((neg_zero.to(tl.int64) & 0xFFFFFFFF) | (_half_bits(s_lo.to(tl.float16)).to(tl.int64) << 32)
                    | (_half_bits(s_hi.to(tl.float16)).to(tl.int64) << 48))[:, None]
            neg_zero = (meta & 0xFFFFFFFF).to(tl.int32)
            neg_zero_0 = tl.broadcast_to(neg_zero, (BLOCK_N, RUN))  # P = 0 (INTEGER_ZEROS) or 4
            neg_zero_4 = tl.broadcast_to(_add_60(neg_zero, INTEGER_ZEROS, INTERPRET), (BLOCK_N, RUN))
            scale_lo = _half_float((meta >> 32).to(tl.int32), False)
            scale_hi = _half_float((meta >> 48).to(tl.int32), False)
            sums = tl.zeros((BLOCK_N, RUN), dtype=tl.int32)  # fp16 pairs: zero bits are +0.0
            for slot in tl.static_range(quad * QUAD, (quad + 1) * QUAD):
                x_pair = tl.broadcast_to(x_pairs[slot], (BLOCK_N, RUN))
                if BITS == 3:
                    sums = _pair_fma3(words, high, x_pair, neg_zero_4, sums, slot, slot == quad * QUAD, INTERPRET)
                elif INTEGER_ZEROS and (BITS * slot) % 8 < 4:  # _pair_fma's P is 0
                    sums = _pair_fma(words, x_pair, neg_zero_0, sums, slot, BITS, INTEGER_ZEROS, slot == quad * QUAD, INTERPRET)
                else:
                    sums = _pair_fma(words, x_pair, neg_zero_4, sums, slot, BITS, INTEGER_ZEROS, slot == quad * QUAD, INTERPRET)
            acc += _half_float(sums, False) * scale_lo
            acc += _half_float(sums, True) * scale_hi
    offs_m = pid_m + tl.arange(0, 1)
    _store_transposed(y_ptr, 16.0 * tl.sum(acc, axis=1)[:, None], offs_m, offs_n, offs_m < M, mask_n, stride_ym, partial_ptr, count_ptr, SPLIT_K)


# ----------------------------------------------------------------------------- GEMM (tensor cores)


@triton.jit
def _codes_of_slots(words, high, slots, LAYOUT: tl.constexpr, BITS: tl.constexpr):
    """Codes ``[BLOCK_N, SUB, RUN]`` of the slots ``slots [SUB]`` (run-time shifts) of ``words [BLOCK_N, RUN]``."""
    w = words[:, None, :]
    s = slots[None, :, None]
    if LAYOUT == "ternary5":
        power = tl.where(s == 0, 1, tl.where(s == 1, 3, tl.where(s == 2, 9, tl.where(s == 3, 27, 81))))
        return (((w * power) & 255) * 3) >> 8
    elif LAYOUT == "uint3":
        return ((w >> (2 * s)) & 3) | (((high[:, None, :] >> s) & 1) << 2)
    else:
        return (w >> (BITS * s)) & ((1 << BITS) - 1)


@triton.jit
def _offset_float(codes, DTYPE: tl.constexpr, INTERPRET: tl.constexpr):
    """``OFFSET + code`` in DTYPE without an int->float conversion: ``0x6400 | code`` is ``1024 + code``
    in fp16 and ``0x4300 | code`` is ``128 + code`` in bf16 (exact for codes below 128). The Triton
    interpreter mishandles bf16 bitcasts, so there bf16 goes through fp32."""
    if DTYPE == tl.float16:
        return (codes | 0x6400).to(tl.int16).to(tl.float16, bitcast=True)
    elif INTERPRET:
        return ((codes << 16) | 0x43000000).to(tl.float32, bitcast=True).to(tl.bfloat16)
    else:
        return (codes | 0x4300).to(tl.int16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _gemm_kernel(
    x_ptr, w_ptr, hi_ptr, scale_ptr, zero_ptr, y_ptr, partial_ptr, count_ptr,
    M, N, K, n_chunks, n_groups, stride_sn, stride_sg, group_size, zero_const,
    stride_xm, stride_wn, stride_hn, stride_ym,
    LAYOUT: tl.constexpr, BITS: tl.constexpr, SLOTS: tl.constexpr, RUN: tl.constexpr,
    SLOTS_PER_GROUP: tl.constexpr, HAS_ZERO: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SUB: tl.constexpr, SPLIT_K: tl.constexpr, INTERPRET: tl.constexpr,
):
    """``y^T = W x^T`` tile by tile. A step takes SUB slots of one chunk (a contiguous K range of
    ``SUB * RUN`` codes inside one group), turns the codes into ``OFFSET + code`` floats (no scale, no
    zero point: two integer ops per code) and feeds one tensor-core dot. The group's scale, zero point
    and offset are applied to the ``[BLOCK_N, BLOCK_M]`` dot result:
    ``sum_k (q_k - z) s x_k = s * (sum_k (OFFSET + q_k) x_k - (OFFSET + z) * sum_k x_k)``."""
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    CHUNK: tl.constexpr = SLOTS * RUN
    BLOCK_K: tl.constexpr = SUB * RUN
    STEPS_PER_CHUNK: tl.constexpr = SLOTS // SUB
    dtype: tl.constexpr = x_ptr.dtype.element_ty
    OFFSET: tl.constexpr = 1024.0 if dtype == tl.float16 else 128.0
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, RUN)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    steps = n_chunks * STEPS_PER_CHUNK
    first, last = _split_range(steps, SPLIT_K)
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)  # y^T tile: the weight is the wide operand
    for step in range(first, last):
        chunk = step // STEPS_PER_CHUNK
        slot0 = (step % STEPS_PER_CHUNK) * SUB
        words, high = _load_chunk(w_ptr, hi_ptr, offs_n, offs_r, mask_n, chunk, stride_wn, stride_hn, LAYOUT, RUN)
        codes = _codes_of_slots(words, high, slot0 + tl.arange(0, SUB), LAYOUT, BITS)
        w = tl.reshape(_offset_float(codes, dtype, INTERPRET), (BLOCK_N, BLOCK_K))
        k = chunk * CHUNK + slot0 * RUN + offs_k
        x_t = tl.load(x_ptr + offs_m[None, :] * stride_xm + k[:, None], mask=mask_m[None, :] & (k[:, None] < K), other=0.0)
        if INTERPRET and dtype == tl.bfloat16:  # the interpreter's bf16 dot reads the raw bits as integers
            part = tl.dot(w.to(tl.float32), x_t.to(tl.float32))
        else:
            part = tl.dot(w, x_t)
        x_sum = tl.sum(x_t.to(tl.float32), axis=0)
        scale, zero = _load_group(scale_ptr, zero_ptr, offs_n, mask_n, (chunk * CHUNK + slot0 * RUN) // group_size, n_groups, stride_sn, stride_sg, zero_const, HAS_ZERO)
        acc += scale[:, None] * part - ((OFFSET + zero) * scale)[:, None] * x_sum[None, :]
    _store_transposed(y_ptr, acc, offs_m, offs_n, mask_m, mask_n, stride_ym, partial_ptr, count_ptr, SPLIT_K)


# ----------------------------------------------------------------------------- MMA (small M, fp16)


@triton.jit
def _slot_fp16(words, SLOT: tl.constexpr, BITS: tl.constexpr, INTERPRET: tl.constexpr):
    """Slot ``SLOT`` of every word as fp16 codes (exact small integers).

    Two neighbouring words ``a, b`` go through one asm call (``pack=2``): ``prmt`` puts the slot's
    byte of ``a`` in byte 0 and that of ``b`` in byte 2, ``lop3`` keeps the code bits (bit offset
    ``P`` in the byte) and ors in ``0x6400`` per half, which reads as ``1024 + 2**P * code``, and the
    ``fma.f16x2`` by ``2**-P`` plus ``-1024 * 2**-P`` leaves the code. The constants are
    :func:`slot_decode_constants`. The interpreter cannot run PTX, so there the same codes come from
    shifts.
    """
    BYTE: tl.constexpr = (SLOT * BITS) // 8
    P: tl.constexpr = (SLOT * BITS) % 8
    SELECT: tl.constexpr = BYTE | ((4 + BYTE) << 8)
    MASK: tl.constexpr = (((1 << BITS) - 1) << P) * 0x10001
    MUL: tl.constexpr = ((15 - P) << 10) * 0x10001  # fp16 2**-P, twice
    ADD: tl.constexpr = (0x8000 | ((25 - P) << 10)) * 0x10001  # fp16 -2**(10 - P), twice
    if INTERPRET:
        return ((words >> (SLOT * BITS)) & ((1 << BITS) - 1)).to(tl.float16)
    return tl.inline_asm_elementwise(
        asm=f"""{{
        .reg .b32 t, u, m, a;
        prmt.b32 t, $1, $2, {SELECT};
        lop3.b32 u, t, {MASK}, 0x64006400, 0xea;
        mov.b32 m, {MUL};
        mov.b32 a, {ADD};
        fma.rn.f16x2 $0, u, m, a;
        }}""",
        constraints="=r,r,r", args=[words], dtype=tl.float16, is_pure=True, pack=2,
    )


def slot3_decode_constants(slot: int) -> dict[str, int]:
    """The constants of ``_slot3_fp16``'s asm for uint3 slot ``slot`` (the same expressions): the low plane's as
    for two-bit codes (:func:`slot_decode_constants`), the high plane's byte selector, its left shift (negative:
    right) from bit ``slot % 8`` of its byte to bit ``P + 2``, and its mask."""
    low = slot_decode_constants(slot, 2)
    p = (2 * slot) % 8
    byte_h, bit_h = divmod(slot, 8)
    return dict(low, select_h=byte_h | ((4 + byte_h) << 8), shift_h=p + 2 - bit_h, mask_h=(1 << (p + 2)) * 0x10001)


def slot_decode_constants(slot: int, bits: int) -> dict[str, int]:
    """The integer constants of ``_slot_fp16``'s asm (the same expressions), for tests that emulate it."""
    byte, p = divmod(slot * bits, 8)
    return dict(
        select=byte | ((4 + byte) << 8), mask=(((1 << bits) - 1) << p) * 0x10001,
        mul=((15 - p) << 10) * 0x10001, add=(0x8000 | ((25 - p) << 10)) * 0x10001,
    )


@triton.jit
def _slot3_fp16(words, high, SLOT: tl.constexpr, INTERPRET: tl.constexpr):
    """uint3's slot ``SLOT`` as fp16 codes: ``_slot_fp16``'s decode of the low plane (two bits at ``P``) with the
    high plane's bit (``high`` already shifted to the chunk: slot ``s`` at bit ``s``) put at ``P + 2`` by a
    second ``prmt``, a shift and a ``lop3`` (:func:`slot3_decode_constants`), before the same fma."""
    BYTE: tl.constexpr = (SLOT * 2) // 8
    P: tl.constexpr = (SLOT * 2) % 8
    SELECT: tl.constexpr = BYTE | ((4 + BYTE) << 8)
    SELECT_H: tl.constexpr = (SLOT // 8) | ((4 + SLOT // 8) << 8)
    SHIFT_H: tl.constexpr = P + 2 - SLOT % 8
    SHIFT_OP: tl.constexpr = "shl.b32" if SHIFT_H >= 0 else "shr.u32"
    MUL: tl.constexpr = ((15 - P) << 10) * 0x10001
    ADD: tl.constexpr = (0x8000 | ((25 - P) << 10)) * 0x10001
    if INTERPRET:
        return (((words >> (SLOT * 2)) & 3) | (((high >> SLOT) & 1) << 2)).to(tl.float16)
    return tl.inline_asm_elementwise(
        asm=f"""{{
        .reg .b32 t, u, h, m, a;
        prmt.b32 t, $1, $2, {SELECT};
        lop3.b32 u, t, {(3 << P) * 0x10001}, 0x64006400, 0xea;
        prmt.b32 h, $3, $4, {SELECT_H};
        {SHIFT_OP} h, h, {SHIFT_H if SHIFT_H >= 0 else -SHIFT_H};
        lop3.b32 u, h, {(1 << (P + 2)) * 0x10001}, u, 0xea;
        mov.b32 m, {MUL};
        mov.b32 a, {ADD};
        fma.rn.f16x2 $0, u, m, a;
        }}""",
        constraints="=r,r,r,r,r", args=[words, high], dtype=tl.float16, is_pure=True, pack=2,
    )


@triton.jit
def _mma_kernel(
    x_ptr, w_ptr, hi_ptr, scale_ptr, zero_ptr, y_ptr, partial_ptr, count_ptr,
    M, N, K, n_chunks, n_groups, stride_sn, stride_sg, group_size, zero_const,
    stride_xm, stride_wn, stride_hn, stride_ym,
    BITS: tl.constexpr, SLOTS: tl.constexpr, RUN: tl.constexpr, SLOTS_PER_GROUP: tl.constexpr,
    HAS_ZERO: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, SPLIT_K: tl.constexpr,
    FOLD: tl.constexpr, INTERPRET: tl.constexpr,
):
    """``y^T = W x^T``: a program takes ``BLOCK_N`` weight rows, ``BLOCK_M`` activation rows (a
    batch of one is padded to 16) and one K split, and per slot of a chunk runs one dot of depth
    ``RUN`` with that slot's activations. Two ways to apply scales and zero points:

    * ``FOLD``: the decoded codes become fp16 weights, ``(code - zero) * scale`` (two fp16x2 ops in
      the dot's register layout), and go straight into ``acc``: one dot per slot, the weights rounded
      to fp16 as dequantization would.
    * else: the raw codes go into ``part``, a second dot of ones with the activations into ``x_sum``
      (the activation sum, broadcast over the rows), and at a group's end
      ``acc += scale * (part - zero * x_sum)`` in fp32. Twice the tensor-core work, no rounding of
      the weights.
    """
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    CHUNK: tl.constexpr = SLOTS * RUN
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, RUN)
    mask_n = offs_n < N
    mask_m = offs_m < M
    first, last = _split_range(n_chunks, SPLIT_K)
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for chunk in range(first, last):
        words = tl.load(w_ptr + offs_n[:, None] * stride_wn + chunk * RUN + offs_r[None, :], mask=mask_n[:, None], other=0)
        high = words
        if BITS == 3:  # a high-plane word covers two chunks: this chunk's slots to bits 0-15
            high = tl.load(hi_ptr + offs_n[:, None] * stride_hn + chunk // 2 * RUN + offs_r[None, :], mask=mask_n[:, None], other=0)
            high = high >> ((chunk % 2) * 16)
        part = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        x_sum = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        scale = tl.zeros((BLOCK_N,), dtype=tl.float16)
        zero = tl.zeros((BLOCK_N,), dtype=tl.float16)
        for slot in tl.static_range(SLOTS):
            k = chunk * CHUNK + slot * RUN + offs_r
            x_t = tl.load(x_ptr + offs_m[None, :] * stride_xm + k[:, None], mask=mask_m[None, :] & (k[:, None] < K), other=0.0)
            if BITS == 3:
                codes = _slot3_fp16(words, high, slot, INTERPRET)
            else:
                codes = _slot_fp16(words, slot, BITS, INTERPRET)
            if FOLD:
                if slot % SLOTS_PER_GROUP == 0:  # a group starts here
                    scale32, zero32 = _load_group(scale_ptr, zero_ptr, offs_n, mask_n, (chunk * CHUNK + slot * RUN) // group_size, n_groups, stride_sn, stride_sg, zero_const, HAS_ZERO)
                    scale = scale32.to(tl.float16)
                    zero = zero32.to(tl.float16)
                acc = tl.dot((codes - zero[:, None]) * scale[:, None], x_t, acc)
            else:
                part = tl.dot(codes, x_t, part)
                x_sum = tl.dot(tl.full((BLOCK_N, RUN), 1.0, tl.float16), x_t, x_sum)
                if (slot + 1) % SLOTS_PER_GROUP == 0:  # a group ends here
                    group = (chunk * CHUNK + slot * RUN) // group_size
                    scale32, zero32 = _load_group(scale_ptr, zero_ptr, offs_n, mask_n, group, n_groups, stride_sn, stride_sg, zero_const, HAS_ZERO)
                    acc += scale32[:, None] * (part - zero32[:, None] * x_sum)
                    part = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
                    x_sum = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    _store_transposed(y_ptr, acc, offs_m, offs_n, mask_m, mask_n, stride_ym, partial_ptr, count_ptr, SPLIT_K)


# ----------------------------------------------------------------------------- dequantization


@triton.jit
def _dequant_kernel(
    w_ptr, hi_ptr, scale_ptr, zero_ptr, out_ptr,
    N, K, n_groups, stride_sn, stride_sg, group_size, zero_const, stride_wn, stride_hn,
    LAYOUT: tl.constexpr, BITS: tl.constexpr, SLOTS: tl.constexpr, RUN: tl.constexpr,
    SLOTS_PER_GROUP: tl.constexpr, HAS_ZERO: tl.constexpr, MATH_DTYPE: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_n = tl.program_id(0)
    chunk = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, RUN)
    mask_n = offs_n < N
    dtype = out_ptr.dtype.element_ty
    words, high = _load_chunk(w_ptr, hi_ptr, offs_n, offs_r, mask_n, chunk, stride_wn, stride_hn, LAYOUT, RUN)
    scale = tl.zeros((BLOCK_N,), dtype=MATH_DTYPE)
    zero = tl.zeros((BLOCK_N,), dtype=MATH_DTYPE)
    for slot in tl.static_range(SLOTS):
        k = chunk * (SLOTS * RUN) + slot * RUN + offs_r
        if slot % SLOTS_PER_GROUP == 0:
            group = (chunk * (SLOTS * RUN) + slot * RUN) // group_size
            scale32, zero32 = _load_group(scale_ptr, zero_ptr, offs_n, mask_n, group, n_groups, stride_sn, stride_sg, zero_const, HAS_ZERO)
            scale = scale32.to(MATH_DTYPE)
            zero = zero32.to(MATH_DTYPE)
        w = _dequant(_code(words, high, slot, LAYOUT, BITS), scale[:, None], zero[:, None], dtype)
        tl.store(out_ptr + offs_n[:, None] * K + k[None, :], w, mask=mask_n[:, None] & (k[None, :] < K))


# ----------------------------------------------------------------------------- launchers


def kernel_tensors(pw: PackedWeight) -> list[torch.Tensor]:
    """Words, high plane, scale and zero as kernel arguments: stand-ins for absent ones, and the zero
    points in the scale's strides (the kernels address both with one pair of strides)."""
    high = pw.high if pw.high is not None else pw.words
    zero = pw.zero if pw.zero is not None else pw.scale
    if zero.stride() != pw.scale.stride():
        zero = torch.empty_strided(zero.shape, pw.scale.stride(), dtype=zero.dtype, device=zero.device).copy_(zero)
    return [pw.words, high, pw.scale, zero]


def _kernel_args(pw: PackedWeight) -> tuple[list, dict]:
    """Arguments shared by every kernel: weight pointers and sizes, then the layout's constexprs."""
    tensors = kernel_tensors(pw)
    consts = dict(
        LAYOUT=pw.layout, BITS=CODE_BITS[pw.layout], SLOTS=pw.slots, RUN=pw.run,
        SLOTS_PER_GROUP=min(pw.slots, pw.group_size // pw.run), HAS_ZERO=pw.zero is not None,
    )
    return tensors, consts


def math_dtype(dtype: torch.dtype) -> tl.dtype:
    """Dtype of the in-kernel dequantization arithmetic: fp16 itself, fp32 for bf16 (see ``_dequant``)."""
    return tl.float16 if dtype == torch.float16 else tl.float32


def output(out: torch.Tensor | None, shape: tuple[int, int], x: torch.Tensor) -> torch.Tensor:
    if out is None:
        return torch.empty(shape, device=x.device, dtype=x.dtype)
    if tuple(out.shape) != shape or out.dtype != x.dtype or out.stride(1) != 1:
        raise ValueError(f"out must be {x.dtype} {shape} and contiguous along N, got {out.dtype} {tuple(out.shape)}")
    return out


def check_inputs(x: torch.Tensor, pw: PackedWeight) -> None:
    if x.dim() != 2 or x.shape[1] != pw.k:
        raise ValueError(f"x must be [M, {pw.k}], got {tuple(x.shape)}")
    if x.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"the kernels take fp16 or bf16 activations, got {x.dtype}")
    if x.stride(1) != 1:
        raise ValueError("x must be contiguous along K")


_SPLIT_BUFFERS: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
_RETIRED_SPLIT_BUFFERS: list[torch.Tensor] = []  # outgrown, but CUDA graphs captured with them still write there


def split_buffers(y: torch.Tensor, grid: tuple[int, int, int], tile_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 partial sums (``splits x tiles x tile_size``) and per-tile counters for a split-K launch
    (see ``_store_transposed``); without splits, ``y`` stands in for both (unused).

    Kept per device and stream, grown on demand; the kernels leave every counter at 0, so the buffers
    serve every later launch on that stream. Streams get their own, so concurrent launches never share
    counters. ``torch.cuda.graph`` captures on a stream of its own: the first capture there allocates the
    buffers inside the graph (one zero-fill node for the counters). Outgrown buffers are never freed: a
    graph captured before the growth still replays into them (freeing them gave an illegal-address fault
    when an H200 replayed such a graph, session 14); each growth at least doubles, so they add up to less
    than the buffers in use.
    """
    n_tiles, splits = grid[0] * grid[1], grid[2]
    if splits == 1:
        return y, y
    stream = torch.cuda.current_stream(y.device).cuda_stream if y.is_cuda else 0
    key = (y.device, stream)
    partial, count = _SPLIT_BUFFERS.get(key, (None, None))
    if partial is None or partial.numel() < splits * n_tiles * tile_size or count.numel() < n_tiles:
        if partial is not None:
            _RETIRED_SPLIT_BUFFERS.extend((partial, count))
        partial = torch.empty(max(splits * n_tiles * tile_size, 0 if partial is None else 2 * partial.numel()), device=y.device)
        count = torch.zeros(max(n_tiles, 0 if count is None else 2 * count.numel()), device=y.device, dtype=torch.int32)
        _SPLIT_BUFFERS[key] = partial, count
    return partial, count


def pairs_fit(pw: PackedWeight, dtype: torch.dtype) -> bool:
    """The fp16-pair GEMV takes fp16 activations, the uint1/2/4 layouts (slot pairs 16 bits apart) and uint3
    (each plane as its own pairs), fp16 scales (it moves them as fp16 pairs) and zero points that fp16
    subtracts exactly (``pw.zero_grid``: integers or sixteenths)."""
    return dtype == torch.float16 and pw.layout in UINT_LAYOUTS and pw.scale.dtype == torch.float16 and pw.zero_grid > 0


def _has_gluon() -> bool:
    try:
        return importlib.util.find_spec("triton.experimental.gluon") is not None
    except ModuleNotFoundError:
        return False


HAS_GLUON = _has_gluon()  # the tensor-core GEMV is written in Gluon (Triton >= 3.4)


def gemv_mma_fits(pw: PackedWeight, dtype: torch.dtype) -> bool:
    """The tensor-core GEMV takes fp16 activations and the uint1/2/3/4 layouts with a run of 32 (any scales
    and zero points: it applies them in fp32); it needs Gluon."""
    return HAS_GLUON and dtype == torch.float16 and pw.layout in UINT_LAYOUTS and pw.run == GEMV_MMA_RUN


def gemv_mma(x: torch.Tensor, pw: PackedWeight, config=None, out: torch.Tensor | None = None) -> torch.Tensor:
    """The tensor-core GEMV of :mod:`qkernels.gemv_mma` (Gluon, imported on first use)."""
    from qkernels.gemv_mma import gemv_mma as run

    return run(x, pw, config, out)


@functools.lru_cache(maxsize=None)
def is_hopper(device: torch.device) -> bool:
    """A Hopper GPU (compute capability 9.x): the only one with ``wgmma``."""
    return device.type == "cuda" and torch.cuda.is_available() and torch.cuda.get_device_capability(device)[0] == 9


@functools.lru_cache(maxsize=None)
def before_ampere(device: torch.device) -> bool:
    """A CUDA GPU older than Ampere (compute capability below 8.0: V100, T4), which has no ``mma.sync`` of
    shape m16n8k16, the tensor-core GEMV's instruction."""
    return device.type == "cuda" and torch.cuda.is_available() and torch.cuda.get_device_capability(device)[0] < 8


def has_pdl(device: torch.device) -> bool:
    """Programmatic dependent launch (``griddepcontrol``): compute capability 9.0 and above."""
    return device.type == "cuda" and torch.cuda.is_available() and torch.cuda.get_device_capability(device)[0] >= 9


def wgmma_fits(pw: PackedWeight, dtype: torch.dtype) -> bool:
    """The wgmma GEMM takes fp16 activations with K a multiple of 8 (TMA's 16-byte rows) and the uint1/2/3/4
    layouts with a run of 32; it needs Gluon (and a Hopper GPU: :func:`is_hopper`)."""
    return HAS_GLUON and dtype == torch.float16 and pw.layout in UINT_LAYOUTS and pw.run == GEMV_MMA_RUN and pw.k % 8 == 0


# The wgmma GEMM on an H200 (session 10, steady state, bench/results/kernel_latency_h200.md; 8192^2, 4096x14336,
# 14336x4096 as in x out): against dequant + cuBLAS it won every cell at 256 and 1024 rows (8192^2 W4 1024 rows:
# 200 us against 228) but grouped W4 with K = 4096 at 1024 rows (241 against 205) and with K = 14336 at 256 rows
# (97 against 92, kept: the one loss of this rule). Session 11 (64-row weight tiles, faster split-K): it beat the
# MMA kernel at every cell probed from 16 rows on: W4 8192^2 at 16, 32, 64, 128 rows 20.1 / 22.6 / 28.8 / 41.3 us
# against 23.1 / 29.7 / 35.3 / 69.8, at 64 rows 25.6 against 37.8 (4096x14336) and 27.4 against 44.6 (14336x4096);
# W2 28.5 against 41.4, ternary 23.6 against 50.1 (8192^2, 64 rows); the session-11 table has it faster at 16 rows
# in all twelve cells (4 kinds x 3 shapes; 8192^2 W4 20.1 against 23.1). Both pad the batch to 16-row tiles; at
# 2, 4 and 8 rows (session 22, 5 kinds x 3 shapes, bench/results/kernel_latency_h200_session22_small_batches.md) it
# won all 45 cells, against the MMA kernel (8192^2 at 4 rows W4 18.2 us against 22.6, W2 17.3 against 25.2, W1 16.7
# against 22.9; 14336x4096 W1 16.7 against 35.9) and W3's GEMV (25.4 against 67.3). So on Hopper the wgmma GEMM
# takes every fitting key from 2 rows.
WGMMA_MIN_M = 2
WGMMA_MIN_K_ABOVE_256 = {("uint4", True): 8192}  # above 256 rows, these keys need this K for the wgmma GEMM
WGMMA_MAX_M = {"uint3": 256}  # and these layouts stop here (W3 at 1024 rows: dequant + cuBLAS won at three shapes)


def wgmma_preferred(m: int, pw: PackedWeight) -> bool:
    """The shape rules under which the wgmma GEMM won (above): a short K at more than 256 rows keeps
    dequant + cuBLAS for grouped W4, and more than 256 rows for W3."""
    if m > WGMMA_MAX_M.get(pw.layout, m):
        return False
    return m <= 256 or pw.k >= WGMMA_MIN_K_ABOVE_256.get(gemv_key(pw), 0)


def wgmma(x: torch.Tensor, pw: PackedWeight, config=None, out: torch.Tensor | None = None) -> torch.Tensor:
    """The wgmma GEMM of :mod:`qkernels.gemm_wgmma` (Gluon, Hopper; imported on first use)."""
    from qkernels.gemm_wgmma import gemm_wgmma as run

    return run(x, pw, config, out)


def wgmma_ws(x: torch.Tensor, pw: PackedWeight, config=None, out: torch.Tensor | None = None) -> torch.Tensor:
    """The warp-specialized GEMM of :mod:`qkernels.gemm_ws` (Gluon, Hopper, up to 64 rows; imported on first use)."""
    from qkernels.gemm_ws import gemm_ws as run

    return run(x, pw, config, out)


def wgmma_ws_fits(pw: PackedWeight, dtype: torch.dtype, m: int) -> bool:
    """What :mod:`qkernels.gemm_ws` takes (its ``ws_fits``), without importing Gluon where there is none."""
    if not HAS_GLUON:
        return False
    from qkernels.gemm_ws import ws_fits

    return ws_fits(pw, dtype, m)


WS_MIN_WEIGHTS = 4096 * 4096  # codes: the warp-specialized GEMM is dispatched above this (at 4096^2 the wgmma GEMM won or tied)
WS_MIN_M = {True: 33, False: 17}  # its rows from here, by one scale a row (ternary-like) or groups


def wgmma_ws_preferred(m: int, pw: PackedWeight) -> bool:
    """Where the warp-specialized GEMM, with its group values by TMA (``values_tma``, which needs 16-byte aligned
    group-major rows of scales and zero points), beat the wgmma GEMM. H200, session 27, side by side in one process
    (``bench.kernel_latency``; bench/results/kernel_latency_h200.md): at 24-64 rows every grouped W4, W2 and W1 cell of
    six shapes from 4096x14336 to 16384^2, 54 cells (64 rows, 8192^2: W4 23.2 us against 25.3, W2 21.9 against 24.7,
    W1 21.2 against 25.7; 8192x28672 W4 67.5 against 82.9); at 16 rows none (W4 8192^2 20.5 against 18.0); at 4096^2
    none (W4 level at 24-32 rows; the wgmma GEMM's tuned configs 12.5 against 13.6 at 64 rows); ternary (one scale a
    row) level or behind at 24-32 rows (8192x28672 48.5 against 45.3), ahead or level at 48-64."""
    if pw.n * pw.k <= WS_MIN_WEIGHTS or m < WS_MIN_M[pw.n_groups == 1]:
        return False
    from qkernels.gemm_ws import values_tma_fits

    return values_tma_fits(pw)


def gemv(x: torch.Tensor, pw: PackedWeight, config: GemvConfig | None = None, out: torch.Tensor | None = None,
         pairs: bool | None = None) -> torch.Tensor:
    """``x [M, K] @ W^T`` for small M (at most :data:`GEMV_MAX_M` rows), into ``out`` if given: the
    fp16-pair kernel where it fits (:func:`pairs_fit`), else (or with ``pairs=False``) the fp32 one."""
    check_inputs(x, pw)
    m = x.shape[0]
    if m > GEMV_MAX_M:
        raise ValueError(f"gemv takes at most {GEMV_MAX_M} rows, got {m}; use gemm")
    fits = pairs_fit(pw, x.dtype)
    if pairs and not fits:
        raise ValueError(f"pairs=True: the fp16-pair GEMV does not fit {pw.layout} weights here (see pairs_fit)")
    pairs = fits if pairs is None else pairs
    config = config or gemv_config(pw, pairs)
    y = output(out, (m, pw.n), x)
    tensors, consts = _kernel_args(pw)
    n_chunks = pw.words.shape[1] // pw.run
    grid = (m, triton.cdiv(pw.n, config.block_n), config.split_k)
    buffers = split_buffers(y, grid, config.block_n)
    shared = dict(BLOCK_N=config.block_n, SPLIT_K=config.split_k, num_warps=config.num_warps, num_stages=config.num_stages)
    if pairs:
        words, high, scale, zero = tensors
        _gemv_pairs_kernel[grid](
            x, words, high, scale, zero, y, *buffers, m, pw.n, pw.k, n_chunks, pw.n_groups, *scale.stride(), pw.group_size, pw.zero_const,
            x.stride(0), words.stride(0), high.stride(0), y.stride(0), BITS=consts["BITS"], SLOTS=pw.slots, RUN=pw.run,
            SLOTS_PER_GROUP=consts["SLOTS_PER_GROUP"], GROUPS_IN_CHUNK=pw.chunk % pw.group_size == 0, HAS_ZERO=consts["HAS_ZERO"], INTEGER_ZEROS=pw.zero_grid == 1.0, EVEN_K=pw.k == pw.k_pad,
            EVEN_N=pw.n % config.block_n == 0,
            INTERPRET=os.environ.get("TRITON_INTERPRET") == "1", **shared,
        )
    else:
        _gemv_kernel[grid](
            x, *tensors, y, *buffers, m, pw.n, pw.k, n_chunks, pw.n_groups, *tensors[2].stride(), pw.group_size, pw.zero_const,
            x.stride(0), pw.words.stride(0), tensors[1].stride(0), y.stride(0), **shared, **consts,
        )
    return y


def gemv_key(pw: PackedWeight) -> tuple[str, bool]:
    return pw.layout, pw.n_groups > 1


def gemv_config(pw: PackedWeight, pairs: bool) -> GemvConfig:
    """The GEMV's config for this weight (fp16-pair kernel or, ``pairs`` False, the fp32 one): tuned by kind, for
    the pair kernel at a long K by kind too (:func:`long_k`), else the defaults."""
    if pairs and long_k(pw) and gemv_key(pw) in GEMV_PAIR_LONG_K_CONFIGS:
        return GEMV_PAIR_LONG_K_CONFIGS[gemv_key(pw)]
    return (GEMV_PAIR_CONFIGS if pairs else GEMV_CONFIGS).get(gemv_key(pw), GemvConfig())


def mma_config(m: int, pw: PackedWeight) -> MmaConfig:
    """The MMA kernel's config at ``m`` rows: tuned by kind (raw-code dots up to :data:`MMA_FOLD_MIN_M` rows, folded
    weights above), its stages cut to what fits the shared memory (:func:`mma_stages`)."""
    config = (MMA_FOLD_CONFIGS if m > MMA_FOLD_MIN_M else MMA_CONFIGS).get(gemv_key(pw), MmaConfig())
    return replace(config, num_stages=mma_stages(pw, mma_block_m(m), config))


def mma_block_m(m: int) -> int:
    return max(16, min(MMA_MAX_BLOCK_M, triton.next_power_of_2(m)))


def gemm_config(m: int) -> GemmConfig:
    """The tuned config of the smallest batch bucket holding ``m``; else tiles sized by the batch
    (the batch is the narrow MMA operand)."""
    bucket = min(1024, max(16, triton.next_power_of_2(m)))
    fitting = [b for b in sorted(GEMM_CONFIGS) if b >= bucket]
    if fitting:
        return GEMM_CONFIGS[fitting[0]]
    block_m = min(128, bucket)
    return GemmConfig(block_n=128 if m <= 64 else 64 if m <= 256 else 128, block_m=block_m, num_warps=4 if m <= 128 else 8)


def gemm_sub_slots(pw: PackedWeight, block_k: int) -> int:
    """Slots per GEMM step: the most (a power of two dividing the slot count) within ``block_k`` codes
    and one group (a step applies one scale per row)."""
    per_group = min(pw.slots, pw.group_size // pw.run)
    sub = 1
    while pw.slots % (2 * sub) == 0 and 2 * sub * pw.run <= block_k and per_group % (2 * sub) == 0:
        sub *= 2
    return sub


def gemm(x: torch.Tensor, pw: PackedWeight, config: GemmConfig | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """``x [M, K] @ W^T`` on tensor cores, the weight dequantized tile by tile (needs ``run >= 16``)."""
    check_inputs(x, pw)
    if pw.run < GEMM_MIN_RUN:
        raise ValueError(f"gemm needs a run of at least {GEMM_MIN_RUN}, this weight has {pw.run}; use dequant")
    m = x.shape[0]
    config = config or gemm_config(m)
    y = output(out, (m, pw.n), x)
    tensors, consts = _kernel_args(pw)
    n_chunks = pw.words.shape[1] // pw.run
    grid = (triton.cdiv(pw.n, config.block_n), triton.cdiv(m, config.block_m), config.split_k)
    _gemm_kernel[grid](
        x, *tensors, y, *split_buffers(y, grid, config.block_n * config.block_m), m, pw.n, pw.k, n_chunks, pw.n_groups, *tensors[2].stride(), pw.group_size, pw.zero_const,
        x.stride(0), pw.words.stride(0), tensors[1].stride(0), y.stride(0),
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, SUB=gemm_sub_slots(pw, config.block_k),
        SPLIT_K=config.split_k, INTERPRET=os.environ.get("TRITON_INTERPRET") == "1",
        num_warps=config.num_warps, num_stages=config.num_stages, **consts,
    )
    return y


def mma_fits(pw: PackedWeight, dtype: torch.dtype) -> bool:
    """The MMA kernel takes fp16 activations and the uint1/2/3/4 layouts with a run of at least 16."""
    return dtype == torch.float16 and pw.layout in UINT_LAYOUTS and pw.run >= GEMM_MIN_RUN


def mma_stages(pw: PackedWeight, block_m: int, config: MmaConfig) -> int:
    """Pipeline stages that fit :data:`MMA_SHARED_BUDGET`: a stage holds one chunk's words and the
    activation tile of every slot (W1 at 64 rows: 128 KiB a stage, so one stage)."""
    stage_bytes = pw.slots * pw.run * block_m * 2 + config.block_n * pw.run * 4 * (1 if pw.high is None else 2)
    return max(1, min(config.num_stages, MMA_SHARED_BUDGET // stage_bytes))


def mma(x: torch.Tensor, pw: PackedWeight, config: MmaConfig | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """``x [M, K] @ W^T`` for small M on tensor cores with the prmt/lop3 decode (see the module doc)."""
    check_inputs(x, pw)
    if not mma_fits(pw, x.dtype):
        raise ValueError(
            f"mma takes fp16 activations and layouts {UINT_LAYOUTS} with a run >= {GEMM_MIN_RUN}; "
            f"got {x.dtype}, {pw.layout}, run {pw.run}: use gemm"
        )
    m = x.shape[0]
    if m > MMA_MAX_M:
        raise ValueError(f"mma takes at most {MMA_MAX_M} rows, got {m}; use gemm")
    fold = m > MMA_FOLD_MIN_M
    block_m = mma_block_m(m)
    config = replace(config, num_stages=mma_stages(pw, block_m, config)) if config else mma_config(m, pw)
    y = output(out, (m, pw.n), x)
    words, high, scale, zero = kernel_tensors(pw)
    grid = (triton.cdiv(pw.n, config.block_n), triton.cdiv(m, block_m), config.split_k)
    _mma_kernel[grid](
        x, words, high, scale, zero, y, *split_buffers(y, grid, config.block_n * block_m), m, pw.n, pw.k, words.shape[1] // pw.run, pw.n_groups,
        *scale.stride(), pw.group_size, pw.zero_const, x.stride(0), words.stride(0), high.stride(0), y.stride(0),
        BITS=CODE_BITS[pw.layout], SLOTS=pw.slots, RUN=pw.run, SLOTS_PER_GROUP=min(pw.slots, pw.group_size // pw.run),
        HAS_ZERO=pw.zero is not None, BLOCK_N=config.block_n, BLOCK_M=block_m, SPLIT_K=config.split_k, FOLD=fold,
        INTERPRET=os.environ.get("TRITON_INTERPRET") == "1", num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return y


def dequantize(pw: PackedWeight, dtype: torch.dtype = torch.float16, block_n: int = 32, out: torch.Tensor | None = None) -> torch.Tensor:
    """The weight ``[N, K]`` in ``dtype`` (fp16/bf16), dequantized by a Triton kernel (into ``out`` if given)."""
    if out is None:
        out = torch.empty((pw.n, pw.k), device=pw.words.device, dtype=dtype)
    elif out.shape != (pw.n, pw.k) or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous [{pw.n}, {pw.k}] tensor")
    dtype = out.dtype
    tensors, consts = _kernel_args(pw)
    grid = (triton.cdiv(pw.n, block_n), pw.words.shape[1] // pw.run)
    _dequant_kernel[grid](
        *tensors, out, pw.n, pw.k, pw.n_groups, *tensors[2].stride(), pw.group_size, pw.zero_const,
        pw.words.stride(0), tensors[1].stride(0), BLOCK_N=block_n, MATH_DTYPE=math_dtype(dtype), num_warps=4, **consts,
    )
    return out


def dequant_matmul(x: torch.Tensor, pw: PackedWeight) -> torch.Tensor:
    """The fallback for large batches: dequantize, then the vendor matmul (cuBLAS on CUDA)."""
    return x @ dequantize(pw, x.dtype).t()


def reference_matmul(x: torch.Tensor, pw: PackedWeight) -> torch.Tensor:
    """Plain-torch definition: fp32 ``x @ dequant(W)^T``, in x's dtype."""
    return (x.float() @ dequantize_packed(pw, torch.float32).t()).to(x.dtype)


def pick_path(m: int, pw: PackedWeight, device: torch.device, dtype: torch.dtype = torch.float16) -> str:
    """``torch`` off CUDA; else by batch: ``gemv_mma`` at batch 1 where :func:`gemv_mma_preferred` and it
    fits (not :func:`before_ampere`); on a Hopper GPU ``wgmma_ws`` where it fits and :func:`wgmma_ws_preferred` (17-64
    rows of large weights), else ``wgmma`` from :data:`WGMMA_MIN_M` rows where it fits and :func:`wgmma_preferred`;
    ``mma`` where it fits and was faster on the H100 (batch 1 only for :data:`MMA_AT_BATCH_1` where the fp16-pair GEMV
    does not fit, above 16 rows only for :data:`MMA_AUTO_ROWS`), ``gemv`` for a few rows; ``gemm`` for mid batches,
    ``dequant`` beyond."""
    if device.type != "cuda":
        return "torch"
    if m == 1 and gemv_mma_preferred(pw, is_hopper(device)) and gemv_mma_fits(pw, dtype) and not before_ampere(device):
        return "gemv_mma"
    if is_hopper(device) and wgmma_ws_fits(pw, dtype, m) and wgmma_ws_preferred(m, pw):
        return "wgmma_ws"
    if m >= WGMMA_MIN_M and is_hopper(device) and wgmma_fits(pw, dtype) and wgmma_preferred(m, pw):
        return "wgmma"
    mma_at_1 = gemv_key(pw) in MMA_AT_BATCH_1 and not pairs_fit(pw, dtype)
    rows = MMA_AUTO_ROWS.get(gemv_key(pw), MMA_AUTO_MAX_M)
    if mma_fits(pw, dtype) and pw.layout in MMA_AUTO_LAYOUTS and m <= rows and (m > 1 or mma_at_1):
        return "mma"
    if m <= GEMV_MAX_M:
        return "gemv"
    if m < DEQUANT_MIN_M and pw.run >= GEMM_MIN_RUN:
        return "gemm"
    return "dequant"


PATHS = {"gemv": gemv, "gemv_fp32": functools.partial(gemv, pairs=False), "gemv_mma": gemv_mma, "mma": mma, "gemm": gemm, "wgmma": wgmma,
         "wgmma_ws": wgmma_ws,
         "dequant": dequant_matmul, "torch": reference_matmul}


def lowbit_matmul(x: torch.Tensor, pw: PackedWeight, path: str = "auto") -> torch.Tensor:
    """``x [..., K] @ W^T -> [..., N]`` through the path ``pick_path`` chooses (or the one named)."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    if path == "auto":
        m = x2.shape[0]
        path = pw.memo(("path", m, x.device, x.dtype), lambda: pick_path(m, pw, x.device, x.dtype), shared=True)
    if path not in PATHS:
        raise ValueError(f"path={path!r} is not valid; choose 'auto' or one of {sorted(PATHS)}")
    return PATHS[path](x2, pw).reshape(*lead, pw.n)

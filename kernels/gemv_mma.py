"""Batch-1 GEMV on ``mma.sync`` tensor cores (Gluon): the dispatcher's path for grouped W1 and ternary.

For fp16 activations and the ``uint1``/``uint2``/``uint4`` layouts with a run of 32 and integer zero
points (:func:`kernels.lowbit_matmul.gemv_mma_fits`); one program per activation row, like the
fp16-pair GEMV. H100, steady state, batch 1, at the seven layer shapes (session 8,
bench/results/kernel_latency_h100.md): faster than the fp16-pair GEMV at all seven for grouped W1
(4-20%) and at six for ternary; mixed for W4 and W2, which keep the pair GEMV. Its sums are fp32: for
W1 and ternary 1e-7 to 3e-5 relative error against the fp32 reference, against 3.5e-4 to 4.9e-4 for
the pair GEMV's fp16 quad sums (W4 and W2 about 3e-4, the weights rounded to fp16 with their scales).

* The words tile ``[BLOCK_N, 32]`` has an explicit layout: lane ``4g + t`` holds words ``8t .. 8t+7``
  of one row per pass of ``8 * num_warps`` rows (two 16-byte loads). Two passes make the 16 rows of
  one ``m16n8k16`` A operand; the MMA's k order is free, so the thread's word ``2j`` and ``2j + 1``
  are its k pairs ``t`` and ``t + 4`` of block ``j``, and the activations (operand B) follow the same order.
* A word's slot ``s`` and slot ``s + SLOTS/2`` sit 16 bits apart, so one ``lop3`` gives an fp16 pair:
  the code at mantissa bit ``P`` of the exponent of ``2**(10 - P)`` reads ``2**(10 - P) + code``
  exactly, for any ``P <= 10 - bits`` (one shift per word at most, none for most slots). One
  ``add.f16x2`` takes off ``2**(10 - P) + zero`` (exact for integer zero points), one ``mul.f16x2``
  applies the two groups' scales: the weight rounded once to fp16, as dequantization would. With one
  scale per row (``SCALE_AFTER``) the pairs stay exact and the row sums are scaled at the end.
* One inline-asm call per slot pair runs four ``mma.sync`` on the thread's 16 words (``pack=16``),
  each into its own four fp32 accumulators; all eight B columns hold the same activations, so the
  row sum of the accumulator tile is 8 times ``y``.
* The split's activation pairs are built once into shared memory; the next chunk's words and the
  next step's scales and zero points are loaded a step ahead. Split-K as in ``lowbit_matmul``.

Gluon has no interpreter: off the GPU the tests check the decode constants and the MMA operand map,
on the GPU the kernel against the fp32 reference.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl

from kernels import lowbit_matmul as lm
from kernels.pack import PackedWeight

RUN = gl.constexpr(lm.GEMV_MMA_RUN)  # words per row and chunk: 4 lanes x 8 words


def mma_asm() -> str:
    """Four ``m16n8k16`` MMAs on one thread's pack of 16: operands 0-15 are the accumulators out,
    16-31 the A pairs, 32-47 the activation pairs, 48-63 the accumulators in; element ``8 * p + w``
    is pass ``p``, word ``w``."""
    e = lambda p, w: 8 * p + w  # noqa: E731
    regs = lambda xs: "{" + ", ".join(f"${i}" for i in xs) + "}"  # noqa: E731
    lines = []
    for j in range(4):
        d = [e(0, 2 * j), e(0, 2 * j + 1), e(1, 2 * j), e(1, 2 * j + 1)]  # rows g, g+8 x columns 2t, 2t+1
        a = [16 + e(0, 2 * j), 16 + e(1, 2 * j), 16 + e(0, 2 * j + 1), 16 + e(1, 2 * j + 1)]
        b = [32 + e(0, 2 * j), 32 + e(0, 2 * j + 1)]
        lines.append(f"mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {regs(d)}, {regs(a)}, {regs(b)}, {regs([48 + i for i in d])};")
    return "\n".join(lines)


MMA_ASM = gl.constexpr(mma_asm())
MMA_CONSTRAINTS = gl.constexpr(",".join(["=f"] * 16 + ["r"] * 32 + ["f"] * 16))


def slot_constants(slot: int, bits: int) -> dict[str, int]:
    """Shift, bit position ``P`` and the lop3 mask and exponent of slot ``slot`` (the same expressions
    as ``_decode_slot``), for the tests that emulate the decode."""
    bit = bits * slot
    shift = 0 if bit + bits <= 10 else (8 if bits == 4 else 10)
    p = bit - shift
    return dict(shift=shift, p=p, mask=(((1 << bits) - 1) << p) * 0x10001, exp=((25 - p) << 10) * 0x10001)


@gluon.jit
def _decode_slot(words, nz0, scale, S: gl.constexpr, BITS: gl.constexpr, SCALE_AFTER: gl.constexpr):
    """Slot pair ``S`` of every word as fp16 pairs ``(code - zero) * scale``; ``nz0`` holds
    ``-(1024 + zero)`` per half, ``scale`` the two groups' scales. With ``SCALE_AFTER`` (one scale
    per row) the pairs stay ``code - zero`` (exact) and the kernel scales the row sums."""
    BIT: gl.constexpr = BITS * S
    SHIFT: gl.constexpr = 0 if BIT + BITS <= 10 else (8 if BITS == 4 else 10)
    P: gl.constexpr = BIT - SHIFT
    MASK: gl.constexpr = (((1 << BITS) - 1) << P) * 0x10001
    EXP: gl.constexpr = ((25 - P) << 10) * 0x10001
    nz = nz0
    if P > 0:  # -(1024 + zero) + (1024 - 2**(10 - P)), exact
        DELTA: gl.constexpr = ((24 << 10) | (1024 - (1 << (11 - P)))) * 0x10001  # fp16 1024 - 2**(10 - P), twice
        nz = gl.inline_asm_elementwise(asm=f"{{ .reg .b32 c; mov.b32 c, {DELTA}; add.rn.f16x2 $0, $1, c; }}",
                                       constraints="=r,r", args=[nz0], dtype=gl.int32, is_pure=True, pack=1)
    MUL: gl.constexpr = "mov.b32 $0, d;" if SCALE_AFTER else "mul.rn.f16x2 $0, d, $3;"
    return gl.inline_asm_elementwise(
        asm=f"{{ .reg .b32 t, v, d; shr.u32 t, $1, {SHIFT}; lop3.b32 v, t, {MASK}, {EXP}, 0xea; add.rn.f16x2 d, v, $2; {MUL} }}",
        constraints="=r,r,r,r", args=[words, nz[:, None], scale[:, None]], dtype=gl.int32, is_pure=True, pack=1)


@gluon.jit
def _bits16(v):
    return v.to(gl.float16).to(gl.int16, bitcast=True).to(gl.int32) & 0xFFFF


@gluon.jit
def _group_values(scale_ptr, zero_ptr, rows, mask, chunk, STEP_I: gl.constexpr, n_groups, stride_sn, stride_sg, group_size, zero_const,
                  HAS_ZERO: gl.constexpr, SLOTS: gl.constexpr, SPG: gl.constexpr, STEP: gl.constexpr):
    """Scale pair and ``-(1024 + zero)`` pair of the two groups that step ``STEP_I`` of ``chunk`` reads
    (low slots and high slots); padding chunks past the last group take its values."""
    HALF: gl.constexpr = SLOTS // 2
    if SPG <= HALF:  # whole groups tile a chunk half: no division
        g_lo = chunk * (SLOTS // SPG) + STEP_I
        g_hi = g_lo + HALF // SPG
    else:
        g_lo = (chunk * (SLOTS * RUN) + STEP_I * STEP * RUN) // group_size
        g_hi = (chunk * (SLOTS * RUN) + (STEP_I * STEP + HALF) * RUN) // group_size
    g_lo = gl.minimum(g_lo, n_groups - 1)
    g_hi = gl.minimum(g_hi, n_groups - 1)
    s_lo = gl.load(scale_ptr + rows * stride_sn + g_lo * stride_sg, mask=mask, other=0.0).to(gl.float32)
    s_hi = gl.load(scale_ptr + rows * stride_sn + g_hi * stride_sg, mask=mask, other=0.0).to(gl.float32)
    if HAS_ZERO:
        z_lo = gl.load(zero_ptr + rows * stride_sn + g_lo * stride_sg, mask=mask, other=0.0).to(gl.float32)
        z_hi = gl.load(zero_ptr + rows * stride_sn + g_hi * stride_sg, mask=mask, other=0.0).to(gl.float32)
    else:
        z_lo = gl.zeros_like(s_lo) + zero_const
        z_hi = z_lo
    return _bits16(s_lo) | (_bits16(s_hi) << 16), _bits16(-1024.0 - z_lo) | (_bits16(-1024.0 - z_hi) << 16)


@gluon.jit
def _gemv_mma_kernel(
    x_ptr, w_ptr, scale_ptr, zero_ptr, y_ptr, partial_ptr, count_ptr,
    N, K, n_chunks, n_groups, stride_sn, stride_sg, group_size, zero_const, stride_xm, stride_wn, stride_ym,
    BITS: gl.constexpr, SLOTS: gl.constexpr, SPG: gl.constexpr, HAS_ZERO: gl.constexpr, BLOCK_N: gl.constexpr,
    SPLIT_K: gl.constexpr, NUM_WARPS: gl.constexpr, XS_CHUNKS: gl.constexpr, EVEN_K: gl.constexpr, SCALE_AFTER: gl.constexpr,
):
    # lane 4g + t: words 8t..8t+7 of row 8 * warp + g in every pass of 8 * NUM_WARPS rows; a thread's registers
    # run over its 8 words, then over the passes, so a pack of 16 is two passes (mma rows g and g + 8)
    layout: gl.constexpr = gl.BlockedLayout([1, 8], [8, 4], [NUM_WARPS, 1], [1, 0])
    rows_layout: gl.constexpr = gl.SliceLayout(1, layout)
    HALF: gl.constexpr = SLOTS // 2
    CHUNK: gl.constexpr = SLOTS * RUN
    STEP: gl.constexpr = SPG if SPG < HALF else HALF  # slot pairs that read the same two groups
    pid_m = gl.program_id(0)
    pid_n = gl.program_id(1)
    rows = pid_n * BLOCK_N + gl.arange(0, BLOCK_N, layout=rows_layout)
    row_ok = rows < N
    cols = gl.arange(0, RUN, layout=gl.SliceLayout(0, layout))
    per_split = gl.cdiv(n_chunks, SPLIT_K)
    first = gl.program_id(2) * per_split
    last = gl.minimum(first + per_split, n_chunks)
    w_rows = w_ptr + rows[:, None] * stride_wn + cols[None, :]
    start = gl.minimum(first, n_chunks - 1)
    next_words = gl.load(w_rows + start * RUN, mask=row_ok[:, None], other=0)
    next_scale, next_nz0 = _group_values(scale_ptr, zero_ptr, rows, row_ok, start, 0, n_groups, stride_sn, stride_sg, group_size, zero_const,
                                         HAS_ZERO, SLOTS, SPG, STEP)
    # the split's activation pairs (slot s and s + HALF of each chunk), built once in shared memory
    xs = gl.allocate_shared_memory(gl.int32, [XS_CHUNKS, HALF * RUN], gl.SwizzledSharedLayout(1, 1, 1, [0]))
    offs = gl.arange(0, HALF * RUN, layout=gl.BlockedLayout([1], [32], [NUM_WARPS], [0]))  # s * RUN + w
    x_row = x_ptr + pid_m * stride_xm
    for c in range(0, last - first):
        k = (first + c) * CHUNK + offs
        if EVEN_K:
            lo = gl.load(x_row + k)
            hi = gl.load(x_row + k + HALF * RUN)
        else:
            lo = gl.load(x_row + k, mask=k < K, other=0.0)
            hi = gl.load(x_row + k + HALF * RUN, mask=k + HALF * RUN < K, other=0.0)
        xs.index(c).store(_bits16(lo) | (_bits16(hi) << 16))
    gl.thread_barrier()
    acc = gl.zeros((BLOCK_N, RUN), gl.float32, layout)
    for chunk in range(first, last):
        words = next_words
        following = gl.minimum(chunk + 1, last - 1)
        next_words = gl.load(w_rows + following * RUN, mask=row_ok[:, None], other=0)
        for step in gl.static_range(HALF // STEP):
            scale, nz0 = next_scale, next_nz0
            if not SCALE_AFTER:  # with one group per row, its values (loaded before the loop) serve every step
                if step + 1 < HALF // STEP:
                    next_scale, next_nz0 = _group_values(scale_ptr, zero_ptr, rows, row_ok, chunk, step + 1, n_groups, stride_sn, stride_sg,
                                                         group_size, zero_const, HAS_ZERO, SLOTS, SPG, STEP)
                else:
                    next_scale, next_nz0 = _group_values(scale_ptr, zero_ptr, rows, row_ok, following, 0, n_groups, stride_sn, stride_sg,
                                                         group_size, zero_const, HAS_ZERO, SLOTS, SPG, STEP)
            for s in gl.static_range(step * STEP, (step + 1) * STEP):
                x_pair = xs.index(chunk - first).slice(s * RUN, RUN).load(gl.SliceLayout(0, layout))[None, :]
                a = _decode_slot(words, nz0, scale, s, BITS, SCALE_AFTER)
                acc = gl.inline_asm_elementwise(asm=MMA_ASM, constraints=MMA_CONSTRAINTS, args=[a, x_pair, acc],
                                                dtype=gl.float32, is_pure=True, pack=16)
    y = gl.sum(acc, axis=1) * 0.125  # 4 lanes x 2 columns hold every row's sum
    if SCALE_AFTER:
        y = y * gl.load(scale_ptr + rows * stride_sn, mask=row_ok, other=0.0).to(gl.float32)
    y_row = y_ptr + pid_m * stride_ym + rows
    if SPLIT_K == 1:
        gl.store(y_row, y.to(gl.float16), mask=row_ok)
    else:  # the last split to finish adds the partial sums in split order (see lowbit_matmul._store_transposed)
        n_tiles = gl.num_programs(0) * gl.num_programs(1)
        tile = pid_m * gl.num_programs(1) + pid_n
        cell = gl.arange(0, BLOCK_N, layout=rows_layout)
        gl.store(partial_ptr + (gl.program_id(2) * n_tiles + tile) * BLOCK_N + cell, y)
        gl.thread_barrier()
        arrived = gl.atomic_add(count_ptr + tile, 1, sem="acq_rel", scope="gpu")
        if arrived == SPLIT_K - 1:
            total = gl.zeros((BLOCK_N,), gl.float32, rows_layout)
            for split in gl.static_range(SPLIT_K):
                total += gl.load(partial_ptr + (split * n_tiles + tile) * BLOCK_N + cell, cache_modifier=".cg")
            gl.store(y_row, total.to(gl.float16), mask=row_ok)
            gl.atomic_xchg(count_ptr + tile, 0, sem="relaxed", scope="gpu")


@dataclass(frozen=True)
class GemvMmaConfig:
    block_n: int = 64  # a multiple of 16 * num_warps
    num_warps: int = 4
    split_k: int = 4


def default_config(pw: PackedWeight) -> GemvMmaConfig:
    """By shape, from the H100 probes at the seven layer shapes (session 8; W1 and ternary as uint2):
    8 K splits of 64-row tiles for a long K and at most 4096 rows (14336x4096 W1: 13.5 us against 16.3
    at 4 splits), 128-row tiles on 8 warps where the rows are at most K (ternary 8192^2: 11.5 against
    12.2, 28672x8192: 30.0 against 34.2 at 8 splits), else 64-row tiles on 4 warps (ternary
    8192x28672: 29.1 against 33.7)."""
    if pw.k >= 2 * pw.n and pw.n <= 4096:
        return GemvMmaConfig(block_n=64, num_warps=4, split_k=8)
    if pw.n <= pw.k:
        return GemvMmaConfig(block_n=128, num_warps=8, split_k=4)
    return GemvMmaConfig(block_n=64, num_warps=4, split_k=4)


def gemv_mma(x: torch.Tensor, pw: PackedWeight, config: GemvMmaConfig | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """``x [M, K] @ W^T`` for a few rows (at most ``GEMV_MAX_M``), into ``out`` if given."""
    if not lm.gemv_mma_fits(pw, x.dtype):
        raise ValueError(f"gemv_mma takes fp16 activations, layouts {lm.PAIR_LAYOUTS} with run {lm.GEMV_MMA_RUN}, fp16 scales and integer zero points; "
                         f"got {x.dtype}, {pw.layout}, run {pw.run}, scales {pw.scale.dtype}, zero grid {pw.zero_grid}")
    config = config or default_config(pw)
    if config.block_n % (16 * config.num_warps):
        raise ValueError(f"block_n must be a multiple of 16 * num_warps = {16 * config.num_warps}, got {config.block_n}")
    lm.check_inputs(x, pw)
    m = x.shape[0]
    if m > lm.GEMV_MAX_M:
        raise ValueError(f"gemv_mma takes at most {lm.GEMV_MAX_M} rows, got {m}; use mma or gemm")
    y = lm.output(out, (m, pw.n), x)
    words, _, scale, zero = lm.kernel_tensors(pw)
    n_chunks = words.shape[1] // pw.run
    grid = (m, triton.cdiv(pw.n, config.block_n), config.split_k)
    partial, count = lm.split_buffers(y, grid, config.block_n)
    _gemv_mma_kernel[grid](
        x, words, scale, zero, y, partial, count, pw.n, pw.k, n_chunks, pw.n_groups, *scale.stride(), pw.group_size, pw.zero_const,
        x.stride(0), words.stride(0), y.stride(0), BITS=lm.CODE_BITS[pw.layout], SLOTS=pw.slots, SPG=pw.group_size // pw.run,
        HAS_ZERO=pw.zero is not None, BLOCK_N=config.block_n, SPLIT_K=config.split_k, NUM_WARPS=config.num_warps,
        XS_CHUNKS=triton.cdiv(n_chunks, config.split_k), EVEN_K=pw.k % pw.chunk == 0, SCALE_AFTER=pw.n_groups == 1,
        num_warps=config.num_warps,
    )
    return y

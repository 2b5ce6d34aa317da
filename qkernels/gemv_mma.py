"""Batch-1 GEMV on ``mma.sync`` tensor cores (Gluon): the dispatcher's path for grouped W1, W2 and W3 and ternary.

For fp16 activations and the ``uint1``/``uint2``/``uint3``/``uint4`` layouts with a run of 32, any scales and zero
points (:func:`qkernels.lowbit_matmul.gemv_mma_fits`); one program per activation row, like the
fp16-pair GEMV. H100, steady state, batch 1 (session 9, bench/results/kernel_latency_h100.md): faster
than the fp16-pair GEMV for grouped W1 and W2 and for ternary; for grouped W4 only with a long K and
at most 4096 rows (:func:`qkernels.lowbit_matmul.gemv_mma_preferred`). Its sums and its scaling are
fp32: 6e-6 to 4e-5 relative error against the fp32 reference in those tables.

* The words tile ``[BLOCK_N // 2, 2, 32]`` (row ``2r + parity``) has an explicit layout: lane ``4g + t``
  holds words ``8t .. 8t+7`` of one row per pass of ``8 * num_warps`` rows (two 16-byte loads). Two
  passes make the 16 rows of one ``m16n8k16`` A operand; the MMA's k order is free, so the thread's
  words ``2j`` and ``2j + 1`` are its k pairs ``t`` and ``t + 4`` of block ``j``, and the activations
  (operand B) follow the same order.
* A word's slot ``s`` and slot ``s + SLOTS/2`` sit 16 bits apart, so one ``lop3`` gives an fp16 pair:
  the code at mantissa bit ``P`` of the exponent of ``2**(10 - P)`` reads ``2**(10 - P) + code``
  exactly. One shift per window of ``WINDOW`` bits brings a window's slots to ``P >= 10 - WINDOW``
  (offsets at most 16 for W1 and W2, 256 for W4, so the fp32 sums keep their precision): per two codes
  one ``lop3`` and a shared shift, no fp16 arithmetic.
* Operand B splits the groups: the even columns hold ``(x_lo, 0)``, the odd ones ``(0, x_hi)``, so in
  the accumulators the even columns sum the low slots' group and the odd ones the high slots'. A step
  (the slot pairs that read the same two groups) starts its accumulators from
  ``-(sum 2**(10 - P) x) - zero * sum x`` per half, sums staged once per K split, which takes off the
  decode offsets and the zero points; at the step's end each column's sum is multiplied by its group's
  scale (with one scale per row, ``SCALE_AFTER``, once at the end).
* One inline-asm call per slot pair runs four ``mma.sync`` on the thread's 16 words (``pack=16``),
  each into its own four fp32 accumulators. The split's activations (both B variants) and the offset
  sums are staged in shared memory with one round of loads; the next chunk's words and the next step's
  scales and zero points are loaded a step ahead. ptxas is capped at 128 registers (W1 takes 130-180
  on its own: one program fewer per SM), at 168 for W1 and W2 on 128-row TMA tiles (routed W1 spilled under 128;
  :data:`WIDE_TILE_REGISTERS`). Split-K as in ``lowbit_matmul``.
* On Hopper (``stages > 0``, :func:`tma_config`) TMA feeds the weights instead: the split's chunks of
  words come in boxes ``[BLOCK_N, 32]`` (128-byte swizzle) into a ring of ``stages`` buffers, the
  split's group-major scales and zero points in one box each, all issued before the activations are
  staged; a step reads its group values from shared memory (no exposed global-load latency). H200,
  batch 1: 3-8% faster for grouped W1, W2 and W4 (W4 8192^2 13.2-13.4 us against 14.4); not for
  ternary. Nsight Compute (W1 8192^2): a third of the time goes before the first chunk (the
  activations staged, the words streamed in), a seventh to the split-K epilogue, the rest to a loop
  whose warps issue one instruction per 10 cycles (shared-memory and MMA dependencies).
* Routes (``route``, TMA only, four groups a chunk half: W1 g128, W2 g64): the activations are staged
  once per group column, slot ``s``'s pairs under columns ``2q, 2q + 1`` of its group ``q`` and zeros
  under the others, so one chunk's MMAs leave each group's sums in its own columns (lane ``t``: group
  ``t`` of each half) and the group values, offsets and zero points are applied once a chunk instead of
  once per step (:func:`_route_chunks`; 93 registers for W1 instead of 127). H200: W1 8192^2 10.6 us
  against 11.5.

* uint3 (a two-bit plane and a one-bit plane whose chunks cover two of the low plane's): every slot pair at
  ``P = 4`` (offset 64), the low plane's two bits and the high plane's bit (slots 8-15 moved up 8 bits
  once a chunk, :func:`_spread_high`) each placed by one shift and one ``lop3`` (:func:`_decode_slot3`).
  H200, batch 1 (session 16), plain loads: 8192^2 17.7 us against 20.1 on the fp16-pair GEMV and 28.8 on
  the fp32 one; W4 on its TMA feed takes 13.2. The TMA feed also takes uint3 (each chunk's high-plane words
  in a second ring beside its words: ``stages > 0``): right on the H200 (session 17, the ragged tests) and
  faster there (8192^2 16.1 us, 14336x4096 15.1 against 17.7 and 17.1 plain), so :func:`tma_config` gives it
  to W3.

* Warp groups along K (``k_warps``, plain loads, not uint3; :func:`_gemv_kw_kernel`): a program's warps in
  ``k_warps`` groups, each summing its own run of the program's chunks for the same rows (every tensor of the
  loop has a leading group axis over the warps), the groups' sums added in shared memory at the end; so a tile
  can take all of K (or fewer global K splits) without the split-K reduction through global memory (session 20's
  ablation: 1.3 us of W1's 10.1 at 8192^2) and with more warps a multiprocessor. H200, batch 1 (session 23):
  4096^2 ternary 4.5 us against 5.4, W2 g128 5.4 against 6.2, W4 g128 5.9-6.1 against 6.9 (the rule for small
  weights, :func:`k_warps_config`); ternary 8192^2 10.0 against 10.3, 4096x14336 ternary 9.7 against 10.3, W2 10.7
  against 12.1, W4 12.4 against 13.2 (tuned entries for the H200). Slower at larger weights, with the words by TMA
  (a CTA barrier a chunk over 16 warps: 8192^2 W2 13.3 against 11.2), and for routed W1 (its group-column activations
  four times the shared memory: 8192^2 10.9 against the TMA routes' 10.3; not kept).

* The split's group values in one TMA box (``values_box``, with warp groups along K on Hopper, not yet run on a GPU;
  :func:`values_box_fits`): the box ``[run's groups, warp group, BLOCK_N]`` of the group-major scales and zero points
  comes while the activations are staged, and each step reads one row of it for every warp group (``LDSM``) instead of
  loading its values from global memory a step ahead: W2 g128's loop at 8192^2 (64/16/1/4) has 357 instructions a
  chunk in the sm_90 build against 417 (no ``LDG``/``IMAD.WIDE`` for the values; ternary, which loads none, 289), 115
  registers against 126. Session 23 had W2 at 11.15 us on that config against ternary's 10.0.

* Two other ways of reading the words (not yet timed on a GPU). Tile by tile (``tiled_words``, with warp groups along
  K or on the TMA feed of one plane; :func:`tile_words`, a copy beside the packed rows, so an A/B of the layout, not yet
  a layout the weights keep): a program's chunk of ``BLOCK_N`` rows one run of memory instead of ``BLOCK_N`` runs of
  128 bytes a row apart (a warp's two loads of a pass cover 1 KiB in a row; a TMA box is one run of ``BLOCK_N * 128``
  bytes). In 64-byte runs (``lane_words``, the plain loads with or without warp groups along K; no copy): each 16-byte
  load of a row's four lanes reads one run of 64 bytes, not four pieces of 16 bytes 32 apart (each load half of four
  32-byte sectors, the other half left to the next load): the tile's column ``w`` reads word :func:`_lane_place`
  ``(w)`` of its run and the activations are staged in the same order. Same registers, same instructions (the W4
  warp-group kernel's sm_90 build: 1016 instructions, 8 128-bit word loads, either way). The question they ask:
  whether the GEMVs' time above their read floor at batch 1 (H100, session 29, 8192^2: W4 17.0 us against 13.3, W2
  12.1 against 8.0) is in how the words are read, since three ways of putting more of them in flight earlier lost: all
  of them by TMA at the start (``words_tma``, session 27), a bulk L2 prefetch of each program's words
  (``l2_prefetch``, session 28: 4-18% slower in all 12 cells on the H200) and two chunks of words in registers ahead
  (``words_ahead``, session 29 on the H100: 0.87-0.98x as fast as one in 12 of 13 cells, 64/16/1/4 at three shapes;
  bench/results/kernel_latency_h100.md). In the packed order a warp's load asks for twice the sectors it reads
  (each of them again by the next load): if what limits the words in flight is the sector requests a multiprocessor
  can have outstanding, not the bytes, that would also explain why more chunks ahead lost, and ``lane_words`` with
  two chunks ahead would be the next thing to time (a guess: nothing here measured it).

* Programmatic dependent launch (``pdl``, compute capability 9.0 and above; off by default): each
  program issues its first weight loads, waits for the previous kernel (``griddepcontrol.wait``), then
  lets the next kernel's programs in. In the kernel benchmark's CUDA graph, a chain of the same GEMV,
  that overlap made batch 1 look up to 21% faster (H200 8192^2: W2 9.2 us against 11.6, ternary 9.8
  against 10.6; 4096x14336 W4 10.7 against 13.1; routed W1 no faster), but a Llama-2-7B decode step got
  slower with it (tokens/s, graph: W4 217.7 against 222.8, ternary 227.6 against 233.9, W1 205.3 against
  209.8, W2 221.7 against 226.1; the same configs with and without, alternating; session 13).

Gluon has no interpreter: off the GPU the tests check the decode constants, the offset algebra and the
MMA operand map, on the GPU the kernel against the fp32 reference.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from qkernels import lowbit_matmul as lm
from qkernels import tuned
from qkernels.gluon_compat import async_load, barrier, reinterpret
from qkernels.pack import PackedWeight

RUN = gl.constexpr(lm.GEMV_MMA_RUN)  # words per row and chunk: 4 lanes x 8 words
WINDOW = {1: 4, 2: 4, 4: 8}  # bits per shift window: a slot lands at mantissa bit P >= 10 - window


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
    """Shift (right if positive, left if negative), mantissa bit ``P`` and the offset ``2**(10 - P)``,
    lop3 mask and exponent of slot pair ``slot`` (the same expressions as ``_decode_slot``)."""
    window = WINDOW[bits]
    bit = bits * slot
    shift = bit // window * window - (10 - window)
    p = bit - shift
    return dict(shift=shift, p=p, offset=1 << (10 - p), mask=(((1 << bits) - 1) << p) * 0x10001, exp=((25 - p) << 10) * 0x10001)


@gluon.jit
def _decode_slot(words, S: gl.constexpr, BITS: gl.constexpr):
    """Slot pair ``S`` of every word as an fp16 pair ``2**(10 - P) + code``: the code at mantissa bit
    ``P`` of the exponent of ``2**(10 - P)``, one shift per window of slots and one lop3 per pair."""
    WIN: gl.constexpr = 8 if BITS == 4 else 4  # WINDOW[BITS]
    BIT: gl.constexpr = BITS * S
    SHIFT: gl.constexpr = BIT // WIN * WIN - (10 - WIN)
    P: gl.constexpr = BIT - SHIFT
    MASK: gl.constexpr = (((1 << BITS) - 1) << P) * 0x10001
    EXP: gl.constexpr = ((25 - P) << 10) * 0x10001
    if SHIFT > 0:  # arithmetic: the bits it smears in lie above every mask
        words = words >> SHIFT
    elif SHIFT < 0:
        words = words << -SHIFT
    return gl.inline_asm_elementwise(asm=f"lop3.b32 $0, $1, {MASK}, {EXP}, 0xea;", constraints="=r,r", args=[words], dtype=gl.int32,
                                     is_pure=True, pack=1)


def slot3_constants(slot: int) -> dict[str, int]:
    """uint3's slot pair ``slot`` (slots ``slot`` and ``slot + 8``), every pair at ``P`` = 4 (offset 64; the
    code's three bits at mantissa bits 4-6): the low plane's shift and mask, the spread high plane's
    (:func:`_spread_high`: slot ``s`` at bit ``s``, slot ``s + 8`` at bit ``s + 16``) shift and mask, and the
    exponent (the same expressions as ``_decode_slot3``)."""
    return dict(shift_lo=2 * slot - 4, mask_lo=(3 << 4) * 0x10001, shift_hi=slot - 6, mask_hi=(1 << 6) * 0x10001,
                exp=((25 - 4) << 10) * 0x10001, offset=64)


@gluon.jit
def _spread_high(high, chunk):
    """uint3's high plane for low chunk ``chunk`` (a high chunk covers two: its low or high 16 bits), with
    slots 8-15 moved up 8 bits, so slot ``s`` and ``s + 8`` sit 16 bits apart like the low plane's pair."""
    high = high >> ((chunk % 2) * 16)  # arithmetic: the bits it smears in are masked off
    return (high & 0xFF) | ((high & 0xFF00) << 8)


@gluon.jit
def _decode_slot3(words, high, S: gl.constexpr):
    """uint3's slot pair ``S`` as an fp16 pair ``64 + code``: the low plane's two bits to mantissa bits 4-5,
    the spread high plane's bit to bit 6, one shift and one ``lop3`` a plane (:func:`slot3_constants`)."""
    SHIFT_LO: gl.constexpr = 2 * S - 4
    SHIFT_HI: gl.constexpr = S - 6
    LO_OP: gl.constexpr = "shr.u32" if SHIFT_LO >= 0 else "shl.b32"
    HI_OP: gl.constexpr = "shr.u32" if SHIFT_HI >= 0 else "shl.b32"
    return gl.inline_asm_elementwise(
        asm=f"""{{
        .reg .b32 t, u;
        {LO_OP} t, $1, {SHIFT_LO if SHIFT_LO >= 0 else -SHIFT_LO};
        lop3.b32 t, t, {(3 << 4) * 0x10001}, {((25 - 4) << 10) * 0x10001}, 0xea;
        {HI_OP} u, $2, {SHIFT_HI if SHIFT_HI >= 0 else -SHIFT_HI};
        lop3.b32 $0, u, {(1 << 6) * 0x10001}, t, 0xea;
        }}""",
        constraints="=r,r,r", args=[words, high], dtype=gl.int32, is_pure=True, pack=1)


@gluon.jit
def _group_index(chunk, STEP_I: gl.constexpr, group_size, SLOTS: gl.constexpr, SPG: gl.constexpr, STEP: gl.constexpr):
    """The groups that step ``STEP_I`` of ``chunk`` reads: its low slots' and its high slots'."""
    HALF: gl.constexpr = SLOTS // 2
    if SPG <= HALF:  # whole groups tile a chunk half: no division
        g_lo = chunk * (SLOTS // SPG) + STEP_I
        g_hi = g_lo + HALF // SPG
    else:
        g_lo = (chunk * (SLOTS * RUN) + STEP_I * STEP * RUN) // group_size
        g_hi = (chunk * (SLOTS * RUN) + (STEP_I * STEP + HALF) * RUN) // group_size
    return g_lo, g_hi


@gluon.jit
def _group_values(scale_ptr, zero_ptr, rows, mask, chunk, STEP_I: gl.constexpr, n_groups, stride_sn, stride_sg, group_size, zero_const,
                  HAS_ZERO: gl.constexpr, SLOTS: gl.constexpr, SPG: gl.constexpr, STEP: gl.constexpr):
    """Scales and zero points (fp32) of the two groups that step ``STEP_I`` of ``chunk`` reads (low
    slots, high slots); padding chunks past the last group take its values."""
    g_lo, g_hi = _group_index(chunk, STEP_I, group_size, SLOTS, SPG, STEP)
    at_lo = rows * stride_sn + gl.minimum(g_lo, n_groups - 1) * stride_sg
    at_hi = rows * stride_sn + gl.minimum(g_hi, n_groups - 1) * stride_sg
    s_lo = gl.load(scale_ptr + at_lo, mask=mask, other=0.0).to(gl.float32)
    s_hi = gl.load(scale_ptr + at_hi, mask=mask, other=0.0).to(gl.float32)
    if HAS_ZERO:
        z_lo = gl.load(zero_ptr + at_lo, mask=mask, other=0.0).to(gl.float32)
        z_hi = gl.load(zero_ptr + at_hi, mask=mask, other=0.0).to(gl.float32)
    else:
        z_lo = gl.zeros_like(s_lo) + zero_const
        z_hi = z_lo
    return s_lo, s_hi, z_lo, z_hi


@gluon.jit
def _upcoming_values(scale_ptr, zero_ptr, rows, mask, chunk, following, STEP_I: gl.constexpr, n_groups, stride_sn, stride_sg, group_size,
                     zero_const, HAS_ZERO: gl.constexpr, SLOTS: gl.constexpr, SPG: gl.constexpr, STEP: gl.constexpr):
    """The group values the step after step ``STEP_I`` of ``chunk`` reads: its next step's, or after the chunk's last
    step the ``following`` chunk's first (loaded a step ahead of their use)."""
    if STEP_I + 1 < (SLOTS // 2) // STEP:
        at, step = chunk, STEP_I + 1
    else:
        at, step = following, 0
    return _group_values(scale_ptr, zero_ptr, rows, mask, at, step, n_groups, stride_sn, stride_sg, group_size, zero_const, HAS_ZERO,
                         SLOTS, SPG, STEP)


@gluon.jit
def _bits16(v):
    return v.to(gl.float16).to(gl.int16, bitcast=True).to(gl.int32) & 0xFFFF


@gluon.jit
def _lane_sums(acc, BLOCK_N: gl.constexpr, lanes: gl.constexpr):
    """Each thread's sums over its four MMAs of the low (even) and the high (odd) columns,
    ``[BLOCK_N // 2, 2, 4]`` in ``lanes`` (its last axis the 4 lanes ``t``, which hold the same sums)."""
    sums = gl.sum(gl.reshape(acc, [BLOCK_N // 2, 2, 4, 4, 2]), axis=3)  # word 8t + 2j + column parity
    lo, hi = gl.split(sums)
    return gl.convert_layout(lo, lanes), gl.convert_layout(hi, lanes)


@gluon.jit
def _stage(x_row, k0, n_here, K, xs, offset_sums, x_sums, NUM_WARPS: gl.constexpr, BITS: gl.constexpr, SLOTS: gl.constexpr,
           STEP: gl.constexpr, XS_CHUNKS: gl.constexpr, EVEN_K: gl.constexpr, ROUTE: gl.constexpr = False, LANES: gl.constexpr = False):
    """The split's ``n_here`` chunks of activations from ``k0`` into shared memory, every load issued
    at once. ``xs [XS_CHUNKS, HALF, 2, RUN]``: for slot ``s`` the B pair ``(x_lo, 0)`` (variant 0, the
    even columns) and ``(0, x_hi)`` (variant 1, the odd ones), ``x_lo`` at ``s * RUN + w`` of the
    chunk and ``x_hi`` ``HALF * RUN`` further. ``offset_sums`` and ``x_sums [XS_CHUNKS, N_STEPS, 2]``:
    per step and half the row-independent sums that the decode offsets and zero points need,
    ``sum 2**(10 - P) x`` and ``sum x``. ``ROUTE``: ``xs [XS_CHUNKS, HALF, 4, 2, RUN]``, the pairs of slot
    ``s`` under index ``s // STEP`` of the third axis (its group in the chunk half), zeros under the others. ``LANES``:
    column ``w`` holds the activations of word :func:`_lane_place` ``(w)``, as the words tile does (``lane_words``)."""
    HALF: gl.constexpr = SLOTS // 2
    CHUNK: gl.constexpr = SLOTS * RUN
    WIN: gl.constexpr = 8 if BITS == 4 else 4  # WINDOW[BITS]
    N_STEPS: gl.constexpr = HALF // STEP
    pairs: gl.constexpr = gl.BlockedLayout([1, 1, 1, 4], [1, 1, 4, 8], [1, NUM_WARPS, 1, 1], [3, 2, 1, 0])
    p3: gl.constexpr = gl.SliceLayout(3, pairs)
    c = gl.arange(0, XS_CHUNKS, layout=gl.SliceLayout(1, gl.SliceLayout(2, p3)))[:, None, None, None]
    slot = gl.arange(0, HALF, layout=gl.SliceLayout(0, gl.SliceLayout(2, p3)))[None, :, None, None]
    half = gl.arange(0, 2, layout=gl.SliceLayout(0, gl.SliceLayout(1, p3)))[None, None, :, None]
    w = gl.arange(0, RUN, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(2, pairs))))
    if LANES:
        w = _lane_cols(w)
    k = k0 + c * CHUNK + (slot + half * HALF) * RUN + w[None, None, None, :]
    ok = c < n_here if EVEN_K else (c < n_here) & (k < K)
    pair = _bits16(gl.load(x_row + k, mask=ok, other=0.0)) << (16 * half)
    if ROUTE:  # [XS_CHUNKS, HALF, 4, 2, RUN]: slot s's pairs in the columns of its group s // STEP, zeros in the others
        routed: gl.constexpr = gl.BlockedLayout([1, 1, 1, 1, 4], [1, 1, 1, 4, 8], [1, NUM_WARPS, 1, 1, 1], [4, 3, 2, 1, 0])
        group = gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(3, gl.SliceLayout(4, routed)))))
        group = group[None, None, :, None, None]
        at = gl.convert_layout(pair, gl.SliceLayout(2, routed))[:, :, None, :, :]
        at_slot = gl.convert_layout(slot, gl.SliceLayout(2, routed))[:, :, None, :, :]
        xs.store(gl.where(group == at_slot // STEP, at, 0))
    else:
        xs.store(pair)
    # the same activations again, a step's slots and words on one axis, for the sums
    steps: gl.constexpr = gl.BlockedLayout([1, 1, 1, 4], [1, 1, 2, 16], [1, NUM_WARPS, 1, 1], [3, 2, 1, 0])
    s3: gl.constexpr = gl.SliceLayout(3, steps)
    c = gl.arange(0, XS_CHUNKS, layout=gl.SliceLayout(1, gl.SliceLayout(2, s3)))[:, None, None, None]
    step = gl.arange(0, N_STEPS, layout=gl.SliceLayout(0, gl.SliceLayout(2, s3)))[None, :, None, None]
    half = gl.arange(0, 2, layout=gl.SliceLayout(0, gl.SliceLayout(1, s3)))[None, None, :, None]
    i = gl.arange(0, STEP * RUN, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(2, steps))))[None, None, None, :]
    k = k0 + c * CHUNK + (step * STEP + half * HALF) * RUN + i
    ok = c < n_here if EVEN_K else (c < n_here) & (k < K)
    x = gl.load(x_row + k, mask=ok, other=0.0).to(gl.float32)
    if BITS == 3:  # every slot at P = 4
        offset_sums.store(gl.sum(x * 64.0, axis=3))
    else:
        offset = (1 << (WIN - (BITS * (step * STEP + i // RUN)) % WIN)).to(gl.float32)  # 2**(10 - P) of the slot
        offset_sums.store(gl.sum(x * offset, axis=3))
    x_sums.store(gl.sum(x, axis=3))


@gluon.constexpr_function
def _words_layout(num_warps):
    """The words tile ``[BLOCK_N // 2, 2, RUN]`` (row ``2r + parity``): lane ``4g + t`` holds words
    ``8t .. 8t+7`` of row ``8 * warp + g`` in every pass of ``8 * num_warps`` rows (``g = 2 * (r % 4) +
    parity``); a thread's registers run over its 8 words, then over the passes, so a pack of 16 is two
    passes (MMA rows ``g`` and ``g + 8``)."""
    return gl.BlockedLayout([1, 1, 8], [4, 2, 4], [num_warps, 1, 1], [2, 1, 0])


@gluon.constexpr_function
def _words_layout4(num_warps):
    """The words tile as ``[BLOCK_N // 8, 4, 2, RUN]`` (row ``8p + 2q + parity``): the map of
    :func:`_words_layout`, with the lanes' row bits ``q = g // 2`` an axis of their own."""
    return gl.BlockedLayout([1, 1, 1, 8], [1, 4, 2, 4], [num_warps, 1, 1, 1], [3, 2, 1, 0])


@gluon.constexpr_function
def _sums_layout(num_warps):
    """The accumulators ``[BLOCK_N // 8, 4, 2, 4, 4, 2]``: rows ``(p, q, parity)``, then a thread's words
    ``8t + 2j + h`` as lane ``t`` (the C columns ``2t, 2t + 1``), MMA ``j`` and column ``h``."""
    return gl.BlockedLayout([1, 1, 1, 1, 4, 2], [1, 4, 2, 4, 1, 1], [num_warps, 1, 1, 1, 1, 1], [5, 4, 3, 2, 1, 0])


@gluon.constexpr_function
def _lanes(num_warps):
    """``[BLOCK_N // 2, 2, 4]``: a thread's row sums, the last axis its lane ``t`` (the 4 lanes hold the same rows)."""
    return gl.BlockedLayout([1, 1, 1], [4, 2, 4], [num_warps, 1, 1], [2, 1, 0])


@gluon.jit
def _step(words, high, xs, offset_sums, x_sums, acc, y_acc, correction, s_lo, s_hi, z_lo, z_hi, STEP_I: gl.constexpr,
          NUM_WARPS: gl.constexpr, BLOCK_N: gl.constexpr, BITS: gl.constexpr, STEP: gl.constexpr, SCALE_AFTER: gl.constexpr):
    """Step ``STEP_I`` of one chunk (``STEP`` slot pairs that read the same two groups, scales ``s_lo``,
    ``s_hi`` and zero points ``z_lo``, ``z_hi`` in fp32): its MMAs on the chunk's ``words`` (uint3: and its
    spread ``high`` plane; other layouts ignore it), activation
    pairs ``xs`` and offset and activation sums; the group-scaled row sums added to ``y_acc``, or with
    one scale per row (``SCALE_AFTER``) the sums left in ``acc`` and the offsets in ``correction``."""
    layout: gl.constexpr = _words_layout(NUM_WARPS)
    rows_layout: gl.constexpr = gl.SliceLayout(2, layout)
    lanes: gl.constexpr = _lanes(NUM_WARPS)
    cols = gl.arange(0, RUN, layout=gl.SliceLayout(0, gl.SliceLayout(1, layout)))[None, None, :]
    offsets = offset_sums.slice(STEP_I, 1)
    x_step = x_sums.slice(STEP_I, 1)
    offset_lo = offsets.slice(0, 1, dim=1).load(rows_layout)[:, :, None]
    offset_hi = offsets.slice(1, 1, dim=1).load(rows_layout)[:, :, None]
    x_lo = x_step.slice(0, 1, dim=1).load(rows_layout)[:, :, None]
    x_hi = x_step.slice(1, 1, dim=1).load(rows_layout)[:, :, None]
    # sum (2**(10 - P) + code - zero) x over the step, per half: the decode offsets and zero points off
    fix_lo = -offset_lo - z_lo * x_lo
    fix_hi = -offset_hi - z_hi * x_hi
    if SCALE_AFTER:
        correction += fix_lo + fix_hi
    else:  # the step's first MMA starts from the corrections, not from zero; columns 2t sum the low slots, 2t + 1 the high
        acc = gl.where(cols % 8 < 2, gl.where(cols % 2 == 0, fix_lo, fix_hi), 0.0)
    for j in gl.static_range(STEP):
        b = xs.slice(STEP_I * STEP + j, 1).load(layout)
        if BITS == 3:
            a = _decode_slot3(words, high, STEP_I * STEP + j)
        else:
            a = _decode_slot(words, STEP_I * STEP + j, BITS)
        acc = gl.inline_asm_elementwise(asm=MMA_ASM, constraints=MMA_CONSTRAINTS, args=[a, b, acc],
                                        dtype=gl.float32, is_pure=True, pack=16)
    if not SCALE_AFTER:
        lo, hi = _lane_sums(acc, BLOCK_N, lanes)
        y_acc += gl.convert_layout(s_lo, lanes) * lo + gl.convert_layout(s_hi, lanes) * hi
    return acc, y_acc, correction


@gluon.jit
def _grid_dependency(WAIT: gl.constexpr):
    """Programmatic dependent launch (``PDL``): ``WAIT`` True waits until the previous kernel has finished
    and its writes are visible (before the activations are read or anything is written); False then lets
    the next kernel's programs be scheduled (their weight loads overlap this kernel's work). Triggering at
    the program's start instead was up to 6 us slower on an H200 (more kernels' programs resident at once, presumably)."""
    if WAIT:
        gl.inline_asm_elementwise("griddepcontrol.wait; // $0", "=r", [], dtype=gl.int32, is_pure=False, pack=1)
    else:
        gl.inline_asm_elementwise("griddepcontrol.launch_dependents; // $0", "=r", [], dtype=gl.int32, is_pure=False, pack=1)


@gluon.jit
def _gemv_mma_kernel(
    x_ptr, w_ptr, hi_ptr, scale_ptr, zero_ptr, y_ptr, partial_ptr, count_ptr,
    N, K, n_chunks, n_groups, stride_sn, stride_sg, group_size, zero_const, stride_wn, stride_hn, stride_xm, stride_ym,
    BITS: gl.constexpr, SLOTS: gl.constexpr, SPG: gl.constexpr, HAS_ZERO: gl.constexpr, BLOCK_N: gl.constexpr,
    SPLIT_K: gl.constexpr, NUM_WARPS: gl.constexpr, XS_CHUNKS: gl.constexpr, EVEN_K: gl.constexpr, SCALE_AFTER: gl.constexpr,
    PDL: gl.constexpr, LANES: gl.constexpr,
):
    layout: gl.constexpr = _words_layout(NUM_WARPS)
    rows_layout: gl.constexpr = gl.SliceLayout(2, layout)
    HALF: gl.constexpr = SLOTS // 2
    CHUNK: gl.constexpr = SLOTS * RUN
    STEP: gl.constexpr = SPG if SPG < HALF else HALF  # slot pairs that read the same two groups
    N_STEPS: gl.constexpr = HALF // STEP
    pid_m = gl.program_id(0)
    pid_n = gl.program_id(1)
    cell = gl.arange(0, BLOCK_N // 2, layout=gl.SliceLayout(1, rows_layout))[:, None] * 2 + gl.arange(0, 2, layout=gl.SliceLayout(0, rows_layout))[None, :]
    rows = pid_n * BLOCK_N + cell
    row_ok = rows < N
    cols = gl.arange(0, RUN, layout=gl.SliceLayout(0, gl.SliceLayout(1, layout)))
    if LANES:  # a 16-byte load of a row's four lanes: one run of 64 bytes (lane_words)
        cols = _lane_cols(cols)
    cols = cols[None, None, :]
    per_split = gl.cdiv(n_chunks, SPLIT_K)
    first = gl.program_id(2) * per_split
    last = gl.minimum(first + per_split, n_chunks)
    rows3, row_ok3 = rows[:, :, None], row_ok[:, :, None]
    w_rows = w_ptr + rows3 * stride_wn + cols
    h_rows = hi_ptr + rows3 * stride_hn + cols  # uint3's high plane: a word covers two chunks
    start = gl.minimum(first, n_chunks - 1)
    next_words = gl.load(w_rows + start * RUN, mask=row_ok3, other=0)
    next_high = next_words
    if BITS == 3:
        next_high = gl.load(h_rows + start // 2 * RUN, mask=row_ok3, other=0)
    next_values = _group_values(scale_ptr, zero_ptr, rows3, row_ok3, start, 0, n_groups, stride_sn, stride_sg, group_size,
                                zero_const, HAS_ZERO, SLOTS, SPG, STEP)
    if PDL:  # the weights' loads are out: wait for the previous kernel, then let the next one's programs in
        _grid_dependency(True)
        _grid_dependency(False)
    # the split's activations as masked B pairs, and the sums of the decode offsets, built once in shared memory
    # (row-major, no swizzle; stored whole, then read one chunk at a time through a view whose layout drops the chunk axis)
    xs = gl.allocate_shared_memory(gl.int32, [XS_CHUNKS, HALF, 2, RUN], gl.SwizzledSharedLayout(1, 1, 1, [3, 2, 1, 0]))
    offset_sums = gl.allocate_shared_memory(gl.float32, [XS_CHUNKS, N_STEPS, 2], gl.SwizzledSharedLayout(1, 1, 1, [2, 1, 0]))
    x_sums = gl.allocate_shared_memory(gl.float32, [XS_CHUNKS, N_STEPS, 2], gl.SwizzledSharedLayout(1, 1, 1, [2, 1, 0]))
    _stage(x_ptr + pid_m * stride_xm, first * CHUNK, last - first, K, xs, offset_sums, x_sums, NUM_WARPS, BITS, SLOTS, STEP, XS_CHUNKS, EVEN_K,
           False, LANES)
    xs = reinterpret(xs, gl.int32, [XS_CHUNKS, HALF, 2, RUN], gl.SwizzledSharedLayout(1, 1, 1, [2, 1, 0]))
    offset_sums = reinterpret(offset_sums, gl.float32, [XS_CHUNKS, N_STEPS, 2], gl.SwizzledSharedLayout(1, 1, 1, [1, 0]))
    x_sums = reinterpret(x_sums, gl.float32, [XS_CHUNKS, N_STEPS, 2], gl.SwizzledSharedLayout(1, 1, 1, [1, 0]))
    barrier()
    acc = gl.zeros((BLOCK_N // 2, 2, RUN), gl.float32, layout)
    y_acc = gl.zeros((BLOCK_N // 2, 2, 4), gl.float32, _lanes(NUM_WARPS))
    s_lo, s_hi, z_lo, z_hi = next_values
    correction = gl.zeros((BLOCK_N // 2, 2, 1), gl.float32, layout)
    for chunk in range(first, last):
        words = next_words
        following = gl.minimum(chunk + 1, last - 1)
        next_words = gl.load(w_rows + following * RUN, mask=row_ok3, other=0)
        high = next_high
        if BITS == 3:
            high = _spread_high(high, chunk)
            next_high = gl.load(h_rows + following // 2 * RUN, mask=row_ok3, other=0)
        for step in gl.static_range(N_STEPS):
            if not SCALE_AFTER:  # with one group per row, its values (loaded before the loop) serve every step
                s_lo, s_hi, z_lo, z_hi = next_values
                next_values = _upcoming_values(scale_ptr, zero_ptr, rows3, row_ok3, chunk, following, step, n_groups, stride_sn, stride_sg,
                                               group_size, zero_const, HAS_ZERO, SLOTS, SPG, STEP)
            acc, y_acc, correction = _step(words, high, xs.index(chunk - first), offset_sums.index(chunk - first), x_sums.index(chunk - first),
                                           acc, y_acc, correction, s_lo, s_hi, z_lo, z_hi, step, NUM_WARPS, BLOCK_N, BITS, STEP, SCALE_AFTER)
    # every lane t holds the same columns: a row's sum over the thread's words and the 4 lanes is 4 y
    if SCALE_AFTER:
        y = (gl.sum(acc, axis=2) * 0.25 + gl.sum(correction, axis=2)) * gl.sum(s_lo, axis=2)  # (sums over axes of 1: squeezes)
    else:
        y = gl.convert_layout(gl.sum(y_acc, axis=2), rows_layout) * 0.25
    _store_rows(y, y_ptr + pid_m * stride_ym + rows, row_ok, partial_ptr, count_ptr, cell, pid_m, pid_n, BLOCK_N, SPLIT_K, rows_layout)


# --- K split across a program's warps (``k_warps``): the program's K-groups of warps sum their own chunks of the
# same rows, added in shared memory at the end, so fewer (or no) K splits go through global memory.


@gluon.constexpr_function
def _kw_layout(k_warps, row_warps):
    """The words tile ``[KW, BLOCK_N // 2, 2, RUN]``: :func:`_words_layout` on each of the ``KW`` groups of
    ``row_warps`` warps (a thread's registers in the same order: its 8 words, then the passes)."""
    return gl.BlockedLayout([1, 1, 1, 8], [1, 4, 2, 4], [k_warps, row_warps, 1, 1], [3, 2, 1, 0])


@gluon.constexpr_function
def _kw_lanes(k_warps, row_warps):
    """``[KW, BLOCK_N // 2, 2, 4]``: :func:`_lanes` on each group of warps."""
    return gl.BlockedLayout([1, 1, 1, 1], [1, 4, 2, 4], [k_warps, row_warps, 1, 1], [3, 2, 1, 0])


@gluon.constexpr_function
def _axis_layout(layout, axis, rank):
    """The layout of an ``arange`` along ``axis`` that :func:`_axis` expands into ``layout`` (rank ``rank``): ``layout``
    sliced on every other axis, the last one outermost."""
    for dim in reversed(range(rank)):
        if dim != axis:
            layout = gl.SliceLayout(dim, layout)
    return layout


@gluon.jit
def _axis(n: gl.constexpr, AXIS: gl.constexpr, layout: gl.constexpr):
    """``arange(n)`` along axis ``AXIS`` of the rank-5 ``layout``, of size 1 on the other axes."""
    x = gl.arange(0, n, layout=_axis_layout(layout, AXIS, 5))
    for dim in gl.static_range(5):
        if dim != AXIS:
            x = gl.expand_dims(x, dim)
    return x


@gluon.jit
def _lane_place(w):
    """Where in a run of 32 words (or activations) column ``w`` of the words tile is read from with ``lane_words``: column
    ``8t + 4h + j`` (lane ``t``'s 16-byte load ``h``) at ``16h + 4t + j``, so that a row's four lanes read 64 bytes in a row
    a load (any order of a run's words serves the MMAs, the activations staged in the same one); :func:`_lane_cols`
    for the kernels."""
    return w // 8 * 4 + w // 4 % 2 * 16 + w % 4


@gluon.jit
def _lane_cols(cols):
    """:func:`_lane_place` of a run's columns (``arange(RUN)``), the compiler told that they come in runs of 4 from
    multiples of 4 (so the loads stay 16 bytes wide)."""
    return gl.max_contiguous(gl.multiple_of(_lane_place(cols), [4]), [4])


@gluon.jit
def _kw_k(first, per_group, n_chunks, K, c, g, slot, half, w, HALF: gl.constexpr, CHUNK: gl.constexpr, EVEN_K: gl.constexpr):
    """K of activation ``w`` of slot ``slot`` (``half``: the chunk's high half) of chunk ``c`` of group ``g``'s run
    (from ``first + g * per_group``), and whether it is there: in the run, in the weight's chunks and below ``K``."""
    chunk = first + g * per_group + c
    k = chunk * CHUNK + (slot + half * HALF) * RUN + w
    ok = (c < per_group) & (chunk < n_chunks)
    if not EVEN_K:
        ok = ok & (k < K)
    return k, ok


@gluon.jit
def _kw_stage(x_row, first, per_group, n_chunks, K, xs, offset_sums, x_sums, KW: gl.constexpr, ROW_WARPS: gl.constexpr,
              BITS: gl.constexpr, SLOTS: gl.constexpr, STEP: gl.constexpr, XS_CHUNKS: gl.constexpr, EVEN_K: gl.constexpr,
              LANES: gl.constexpr):
    """:func:`_stage` for every group of warps at once: group ``g``'s ``per_group`` chunks from ``first + g *
    per_group``; ``xs [XS_CHUNKS, KW, HALF, 2, RUN]``, ``offset_sums`` and ``x_sums [XS_CHUNKS, KW, N_STEPS, 2]``
    (zeros past a group's chunks and past the weight's). ``LANES``: column ``w`` of ``xs`` holds the activation of word
    :func:`_lane_place` ``(w)``, as the words tile does."""
    HALF: gl.constexpr = SLOTS // 2
    CHUNK: gl.constexpr = SLOTS * RUN
    WIN: gl.constexpr = 8 if BITS == 4 else 4  # WINDOW[BITS]
    N_STEPS: gl.constexpr = HALF // STEP
    pairs: gl.constexpr = gl.BlockedLayout([1, 1, 1, 1, 4], [1, 1, 1, 4, 8], [1, KW, ROW_WARPS, 1, 1], [4, 3, 2, 1, 0])
    half = _axis(2, 3, pairs)
    w = gl.arange(0, RUN, layout=_axis_layout(pairs, 4, 5))
    if LANES:
        w = _lane_cols(w)
    w = w[None, None, None, None, :]
    k, ok = _kw_k(first, per_group, n_chunks, K, _axis(XS_CHUNKS, 0, pairs), _axis(KW, 1, pairs), _axis(HALF, 2, pairs), half, w, HALF,
                  CHUNK, EVEN_K)
    xs.store(_bits16(gl.load(x_row + k, mask=ok, other=0.0)) << (16 * half))
    # the same activations again, a step's slots and words on one axis, for the sums
    steps: gl.constexpr = gl.BlockedLayout([1, 1, 1, 1, 4], [1, 1, 1, 2, 16], [1, KW, ROW_WARPS, 1, 1], [4, 3, 2, 1, 0])
    step, i = _axis(N_STEPS, 2, steps), _axis(STEP * RUN, 4, steps)
    k, ok = _kw_k(first, per_group, n_chunks, K, _axis(XS_CHUNKS, 0, steps), _axis(KW, 1, steps), step * STEP, _axis(2, 3, steps), i,
                  HALF, CHUNK, EVEN_K)
    x = gl.load(x_row + k, mask=ok, other=0.0).to(gl.float32)
    offset = (1 << (WIN - (BITS * (step * STEP + i // RUN)) % WIN)).to(gl.float32)  # 2**(10 - P) of the slot
    offset_sums.store(gl.sum(x * offset, axis=4))
    x_sums.store(gl.sum(x, axis=4))


@gluon.jit
def _kw_step(words, xs, offset_sums, x_sums, acc, y_acc, correction, s_lo, s_hi, z_lo, z_hi, STEP_I: gl.constexpr, KW: gl.constexpr,
             ROW_WARPS: gl.constexpr, BLOCK_N: gl.constexpr, BITS: gl.constexpr, STEP: gl.constexpr, SCALE_AFTER: gl.constexpr):
    """:func:`_step` on every group of warps: ``xs [KW, HALF, 2, RUN]`` and the sums ``[KW, N_STEPS, 2]`` of each
    group's current chunk."""
    layout: gl.constexpr = _kw_layout(KW, ROW_WARPS)
    rows_layout: gl.constexpr = gl.SliceLayout(3, layout)
    lanes: gl.constexpr = _kw_lanes(KW, ROW_WARPS)
    cols = gl.arange(0, RUN, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(2, layout))))[None, None, None, :]
    offsets = offset_sums.slice(STEP_I, 1, dim=1)
    x_step = x_sums.slice(STEP_I, 1, dim=1)
    offset_lo = offsets.slice(0, 1, dim=2).load(rows_layout)[:, :, :, None]
    offset_hi = offsets.slice(1, 1, dim=2).load(rows_layout)[:, :, :, None]
    x_lo = x_step.slice(0, 1, dim=2).load(rows_layout)[:, :, :, None]
    x_hi = x_step.slice(1, 1, dim=2).load(rows_layout)[:, :, :, None]
    fix_lo = -offset_lo - z_lo * x_lo
    fix_hi = -offset_hi - z_hi * x_hi
    if SCALE_AFTER:
        correction += fix_lo + fix_hi
    else:
        acc = gl.where(cols % 8 < 2, gl.where(cols % 2 == 0, fix_lo, fix_hi), 0.0)
    for j in gl.static_range(STEP):
        b = xs.slice(STEP_I * STEP + j, 1, dim=1).load(layout)
        a = _decode_slot(words, STEP_I * STEP + j, BITS)
        acc = gl.inline_asm_elementwise(asm=MMA_ASM, constraints=MMA_CONSTRAINTS, args=[a, b, acc],
                                        dtype=gl.float32, is_pure=True, pack=16)
    if not SCALE_AFTER:
        sums = gl.sum(gl.reshape(acc, [KW, BLOCK_N // 2, 2, 4, 4, 2]), axis=4)
        lo, hi = gl.split(sums)
        y_acc += gl.convert_layout(s_lo, lanes) * gl.convert_layout(lo, lanes) + gl.convert_layout(s_hi, lanes) * gl.convert_layout(hi, lanes)
    return acc, y_acc, correction


@gluon.jit
def _box_values(s_rows, z_rows, i, STEP_I: gl.constexpr, zero_const, SLOTS: gl.constexpr, SPG: gl.constexpr, HAS_ZERO: gl.constexpr,
                rows_layout: gl.constexpr):
    """:func:`_group_values` from the split's box of group values (``VBOX``): step ``STEP_I`` of every warp group's
    ``i``-th chunk (``s_rows``: ``[XS_CHUNKS * groups a chunk, KW, BLOCK_N // 2, 2]``: a run's groups, then the warp
    group); fp32 ``[KW, BLOCK_N // 2, 2, 1]``."""
    GPC: gl.constexpr = SLOTS // SPG
    lo = i * GPC + STEP_I
    hi = lo + (SLOTS // 2) // SPG
    s_lo = s_rows.index(lo).load(rows_layout).to(gl.float32)[:, :, :, None]
    s_hi = s_rows.index(hi).load(rows_layout).to(gl.float32)[:, :, :, None]
    if HAS_ZERO:
        z_lo = z_rows.index(lo).load(rows_layout).to(gl.float32)[:, :, :, None]
        z_hi = z_rows.index(hi).load(rows_layout).to(gl.float32)[:, :, :, None]
    else:
        z_lo = gl.zeros_like(s_lo) + zero_const
        z_hi = z_lo
    return s_lo, s_hi, z_lo, z_hi


@gluon.jit
def _gemv_kw_kernel(
    x_ptr, w_ptr, hi_ptr, scale_ptr, zero_ptr, s_desc, z_desc, y_ptr, partial_ptr, count_ptr,
    N, K, n_chunks, n_groups, stride_sn, stride_sg, group_size, zero_const, stride_wb, stride_wn, stride_wc, stride_hn, stride_xm,
    stride_ym, BITS: gl.constexpr, SLOTS: gl.constexpr, SPG: gl.constexpr, HAS_ZERO: gl.constexpr, BLOCK_N: gl.constexpr,
    SPLIT_K: gl.constexpr, NUM_WARPS: gl.constexpr, XS_CHUNKS: gl.constexpr, EVEN_K: gl.constexpr, SCALE_AFTER: gl.constexpr,
    PDL: gl.constexpr, KW: gl.constexpr, VBOX: gl.constexpr, LANES: gl.constexpr,
):
    """:func:`_gemv_mma_kernel` with the program's warps in ``KW`` groups along K (plain loads, not uint3): the
    program's chunks (its K split's) are cut in ``KW`` runs, one a group; each group sums its run for the program's
    rows, and the groups' sums are added (in shared memory) before the split-K store. With ``VBOX`` (Hopper; every run
    ``XS_CHUNKS`` chunks long) the split's group values come in one TMA box (``s_desc``, ``z_desc``: ``[KW * XS_CHUNKS *
    groups a chunk, BLOCK_N]`` of the group-major scales and zero points) while the activations are staged, and each
    step reads them from shared memory; else ``s_desc`` and ``z_desc`` are stand-ins and each step loads them from
    global memory a step ahead. Word ``w`` of row ``r`` of tile ``b`` (rows ``b * BLOCK_N ..``) and chunk ``c`` is at
    ``b * stride_wb + r * stride_wn + c * stride_wc + w``: the packed rows, or the words tile by tile (``tiled_words``);
    with ``LANES`` column ``w`` of the words tile reads word :func:`_lane_place` ``(w)`` of its run (``lane_words``)."""
    ROW_WARPS: gl.constexpr = NUM_WARPS // KW
    layout: gl.constexpr = _kw_layout(KW, ROW_WARPS)
    rows_layout: gl.constexpr = gl.SliceLayout(3, layout)
    out_layout: gl.constexpr = gl.SliceLayout(0, rows_layout)
    HALF: gl.constexpr = SLOTS // 2
    STEP: gl.constexpr = SPG if SPG < HALF else HALF
    N_STEPS: gl.constexpr = HALF // STEP
    pid_m = gl.program_id(0)
    pid_n = gl.program_id(1)
    cell = (gl.arange(0, BLOCK_N // 2, layout=gl.SliceLayout(0, gl.SliceLayout(2, rows_layout)))[None, :, None] * 2
            + gl.arange(0, 2, layout=gl.SliceLayout(0, gl.SliceLayout(1, rows_layout)))[None, None, :])
    rows = pid_n * BLOCK_N + cell  # [1, BLOCK_N // 2, 2]
    row_ok = rows < N
    cols = gl.arange(0, RUN, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(2, layout))))
    if LANES:  # a 16-byte load of a row's four lanes: one run of 64 bytes, not four pieces of 16 a sector apart
        cols = _lane_cols(cols)
    cols = cols[None, None, None, :]
    group = gl.arange(0, KW, layout=gl.SliceLayout(1, gl.SliceLayout(2, rows_layout)))[:, None, None, None]
    per_group = gl.cdiv(n_chunks, SPLIT_K * KW)
    first = gl.program_id(2) * KW * per_group
    g_first = first + group * per_group  # [KW, 1, 1, 1]: each group's first chunk
    g_last = gl.minimum(g_first + per_group, n_chunks)
    rows4, row_ok4 = rows[:, :, :, None], row_ok[:, :, :, None]
    w_rows = w_ptr + pid_n * stride_wb + cell[:, :, :, None] * stride_wn + cols
    start = gl.minimum(g_first, n_chunks - 1)
    next_words = gl.load(w_rows + start * stride_wc, mask=row_ok4, other=0)
    if VBOX:  # the split's group values: one box of each, [1, run's groups, warp group, rows] (the descriptors' order)
        RUN_GROUPS: gl.constexpr = XS_CHUNKS * (SLOTS // SPG)
        box_ready = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        mbarrier.init(box_ready, count=1)
        s_box = gl.allocate_shared_memory(s_desc.dtype, [1, RUN_GROUPS, KW, BLOCK_N], s_desc.layout)
        z_box = gl.allocate_shared_memory(z_desc.dtype, [1, RUN_GROUPS, KW, BLOCK_N], z_desc.layout)
        mbarrier.expect(box_ready, s_desc.block_type.nbytes * (2 if HAS_ZERO else 1))
        async_load(s_desc, [gl.program_id(2), 0, 0, pid_n * BLOCK_N], box_ready, s_box)
        if HAS_ZERO:
            async_load(z_desc, [gl.program_id(2), 0, 0, pid_n * BLOCK_N], box_ready, z_box)
        box_view: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [2, 1, 0])
        s_rows = reinterpret(s_box, s_desc.dtype, [RUN_GROUPS, KW, BLOCK_N // 2, 2], box_view)
        z_rows = reinterpret(z_box, z_desc.dtype, [RUN_GROUPS, KW, BLOCK_N // 2, 2], box_view)
    else:
        next_values = _group_values(scale_ptr, zero_ptr, rows4, row_ok4, start, 0, n_groups, stride_sn, stride_sg, group_size,
                                    zero_const, HAS_ZERO, SLOTS, SPG, STEP)
    if PDL:
        _grid_dependency(True)
        _grid_dependency(False)
    xs = gl.allocate_shared_memory(gl.int32, [XS_CHUNKS, KW, HALF, 2, RUN], gl.SwizzledSharedLayout(1, 1, 1, [4, 3, 2, 1, 0]))
    offset_sums = gl.allocate_shared_memory(gl.float32, [XS_CHUNKS, KW, N_STEPS, 2], gl.SwizzledSharedLayout(1, 1, 1, [3, 2, 1, 0]))
    x_sums = gl.allocate_shared_memory(gl.float32, [XS_CHUNKS, KW, N_STEPS, 2], gl.SwizzledSharedLayout(1, 1, 1, [3, 2, 1, 0]))
    _kw_stage(x_ptr + pid_m * stride_xm, first, per_group, n_chunks, K, xs, offset_sums, x_sums, KW, ROW_WARPS, BITS, SLOTS, STEP,
              XS_CHUNKS, EVEN_K, LANES)
    xs = reinterpret(xs, gl.int32, [XS_CHUNKS, KW, HALF, 2, RUN], gl.SwizzledSharedLayout(1, 1, 1, [3, 2, 1, 0]))
    offset_sums = reinterpret(offset_sums, gl.float32, [XS_CHUNKS, KW, N_STEPS, 2], gl.SwizzledSharedLayout(1, 1, 1, [2, 1, 0]))
    x_sums = reinterpret(x_sums, gl.float32, [XS_CHUNKS, KW, N_STEPS, 2], gl.SwizzledSharedLayout(1, 1, 1, [2, 1, 0]))
    barrier()
    acc = gl.zeros((KW, BLOCK_N // 2, 2, RUN), gl.float32, layout)
    y_acc = gl.zeros((KW, BLOCK_N // 2, 2, 4), gl.float32, _kw_lanes(KW, ROW_WARPS))
    if VBOX:
        mbarrier.wait(box_ready, 0)  # (each step reads its values from the box)
    else:
        s_lo, s_hi, z_lo, z_hi = next_values
    correction = gl.zeros((KW, BLOCK_N // 2, 2, 1), gl.float32, layout)
    for i in range(per_group):
        chunk = g_first + i
        following = gl.maximum(gl.minimum(chunk + 1, g_last - 1), 0)  # (the last chunk again at a group's end)
        words = next_words
        next_words = gl.load(w_rows + following * stride_wc, mask=row_ok4, other=0)
        for step in gl.static_range(N_STEPS):
            if VBOX:
                s_lo, s_hi, z_lo, z_hi = _box_values(s_rows, z_rows, i, step, zero_const, SLOTS, SPG, HAS_ZERO, rows_layout)
            elif not SCALE_AFTER:
                s_lo, s_hi, z_lo, z_hi = next_values
                next_values = _upcoming_values(scale_ptr, zero_ptr, rows4, row_ok4, chunk, following, step, n_groups, stride_sn, stride_sg,
                                               group_size, zero_const, HAS_ZERO, SLOTS, SPG, STEP)
            acc, y_acc, correction = _kw_step(words, xs.index(i), offset_sums.index(i), x_sums.index(i), acc, y_acc, correction,
                                              s_lo, s_hi, z_lo, z_hi, step, KW, ROW_WARPS, BLOCK_N, BITS, STEP, SCALE_AFTER)
    if SCALE_AFTER:
        y = (gl.sum(acc, axis=3) * 0.25 + gl.sum(correction, axis=3)) * gl.sum(s_lo, axis=3)
    else:
        y = gl.convert_layout(gl.sum(y_acc, axis=3), rows_layout) * 0.25
    y = gl.sum(y, axis=0)  # the groups' sums: across warps, through shared memory
    out_cell = (gl.arange(0, BLOCK_N // 2, layout=gl.SliceLayout(1, out_layout))[:, None] * 2
                + gl.arange(0, 2, layout=gl.SliceLayout(0, out_layout))[None, :])
    out_rows = pid_n * BLOCK_N + out_cell
    _store_rows(y, y_ptr + pid_m * stride_ym + out_rows, out_rows < N, partial_ptr, count_ptr, out_cell, pid_m, pid_n, BLOCK_N, SPLIT_K,
                out_layout)


@gluon.jit
def _shared_values(s_groups, z_groups, lo, hi, zero_const, HAS_ZERO: gl.constexpr, rows_layout: gl.constexpr):
    """Scales and zero points (fp32, ``[BLOCK_N // 2, 2, 1]``) of groups ``lo`` and ``hi`` of the split's box."""
    s_lo = s_groups.index(lo).load(rows_layout).to(gl.float32)[:, :, None]
    s_hi = s_groups.index(hi).load(rows_layout).to(gl.float32)[:, :, None]
    if HAS_ZERO:
        z_lo = z_groups.index(lo).load(rows_layout).to(gl.float32)[:, :, None]
        z_hi = z_groups.index(hi).load(rows_layout).to(gl.float32)[:, :, None]
    else:
        z_lo = gl.zeros_like(s_lo) + zero_const
        z_hi = z_lo
    return s_lo, s_hi, z_lo, z_hi


@gluon.jit
def _fetch(w_desc, h_desc, w_smem, h_smem, ready, buf, chunk, row0, n_chunks, pred, BITS: gl.constexpr, TILED: gl.constexpr):
    """Chunk ``chunk``'s words into buffer ``buf`` by TMA, and for uint3 (``BITS`` 3) its high plane's words
    (a high chunk covers two chunks: ``chunk // 2``), both arriving on ``ready[buf]``. ``TILED``: the words tile by tile
    (``tiled_words``) seen as rows of 32, chunk ``c`` of the tile at row ``row0`` at row ``row0 * n_chunks + c * BLOCK_N``."""
    nbytes: gl.constexpr = w_desc.block_type.nbytes + (h_desc.block_type.nbytes if BITS == 3 else 0)
    mbarrier.expect(ready.index(buf), nbytes, pred=pred)
    if TILED:
        async_load(w_desc, [row0 * n_chunks + chunk * w_desc.block_type.shape[0], 0], ready.index(buf), w_smem.index(buf), pred=pred)
    else:
        async_load(w_desc, [row0, chunk * RUN], ready.index(buf), w_smem.index(buf), pred=pred)
    if BITS == 3:
        async_load(h_desc, [row0, chunk // 2 * RUN], ready.index(buf), h_smem.index(buf), pred=pred)


@gluon.jit
def _refill(w_desc, h_desc, w_smem, h_smem, ready, i, first, n_here, row0, n_chunks, STAGES: gl.constexpr, XS_CHUNKS: gl.constexpr,
            BITS: gl.constexpr, TILED: gl.constexpr):
    """Once chunk ``i``'s words are in registers: where the split has more chunks than buffers, every warp
    is past its read, then chunk ``i + STAGES`` goes into the freed buffer."""
    if STAGES < XS_CHUNKS:
        barrier()
        refill = i + STAGES
        _fetch(w_desc, h_desc, w_smem, h_smem, ready, i % STAGES, first + refill, row0, n_chunks, refill < n_here, BITS, TILED)


@gluon.jit
def _route_chunks(w_desc, w_smem, ready, s_smem, z_smem, xs, offset_sums, x_sums, first, n_here, row0, n_chunks, zero_const,
                  BITS: gl.constexpr, HALF: gl.constexpr, HAS_ZERO: gl.constexpr, BLOCK_N: gl.constexpr, NUM_WARPS: gl.constexpr,
                  XS_CHUNKS: gl.constexpr, STAGES: gl.constexpr, TILED: gl.constexpr):
    """The split's chunks with four groups a chunk half, each group in its own MMA columns: the B operand
    of slot ``s`` holds its pairs only in the columns ``2q, 2q + 1`` of its group ``q = s // (HALF / 4)``
    (staged so, zeros elsewhere), so after a chunk's MMAs lane ``t`` holds the sums of group ``t`` of the
    low half (column ``2t``) and of the high half (``2t + 1``). The group values and the offset and
    activation sums are then applied once a chunk, each lane its own group's. Returns the rows' sums
    ``[BLOCK_N // 8, 4, 2]``."""
    P: gl.constexpr = BLOCK_N // 8
    words4: gl.constexpr = _words_layout4(NUM_WARPS)
    sums: gl.constexpr = _sums_layout(NUM_WARPS)
    cols: gl.constexpr = gl.SliceLayout(4, sums)  # [P, 4, 2, 4 lanes t, 2 halves h]
    GBOX: gl.constexpr = s_smem.shape[0]
    # the box's groups by chunk [GBOX // 8, half, t, P, q, parity] (the box starts at the split's first chunk)
    by_chunk: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [4, 3, 2, 1, 0])
    s_chunks = reinterpret(s_smem, s_smem.dtype, [GBOX // 8, 2, 4, P, 4, 2], by_chunk)
    z_chunks = reinterpret(z_smem, z_smem.dtype, [GBOX // 8, 2, 4, P, 4, 2], by_chunk)
    y_acc = gl.zeros([P, 4, 2, 4, 2], gl.float32, cols)
    for i in range(n_here):
        buf = i % STAGES
        mbarrier.wait(ready.index(buf), (i // STAGES) & 1)
        words = w_smem.index(buf).reshape([P, 4, 2, RUN]).load(words4)
        _refill(w_desc, w_desc, w_smem, w_smem, ready, i, first, n_here, row0, n_chunks, STAGES, XS_CHUNKS, BITS, TILED)
        acc = gl.zeros([P, 4, 2, RUN], gl.float32, words4)
        for s in gl.static_range(HALF):
            b = xs.index(i).slice(s, 1).load(words4)
            a = _decode_slot(words, s, BITS)
            acc = gl.inline_asm_elementwise(asm=MMA_ASM, constraints=MMA_CONSTRAINTS, args=[a, b, acc],
                                            dtype=gl.float32, is_pure=True, pack=16)
        total = gl.sum(gl.convert_layout(gl.reshape(acc, [P, 4, 2, 4, 4, 2]), sums), axis=4)  # over the thread's 4 MMAs
        scale = s_chunks.index(i).permute((2, 3, 4, 1, 0)).load(cols).to(gl.float32)
        if HAS_ZERO:
            zero = z_chunks.index(i).permute((2, 3, 4, 1, 0)).load(cols).to(gl.float32)
        else:
            zero = gl.zeros_like(scale) + zero_const
        offsets = offset_sums.index(i).reshape([1, 1, 1, 4, 2]).load(cols)
        x_groups = x_sums.index(i).reshape([1, 1, 1, 4, 2]).load(cols)
        # sum (2**(10 - P) + code - zero) x per group: the decode offsets and zero points off, then the scale
        y_acc += scale * (total - offsets - zero * x_groups)
    return gl.sum(gl.sum(y_acc, axis=4), axis=3)


@gluon.jit
def _gemv_tma_kernel(
    x_ptr, w_desc, h_desc, s_desc, z_desc, y_ptr, partial_ptr, count_ptr, N, K, n_chunks, group_size, zero_const, stride_xm, stride_ym,
    BITS: gl.constexpr, SLOTS: gl.constexpr, SPG: gl.constexpr, HAS_ZERO: gl.constexpr, BLOCK_N: gl.constexpr,
    SPLIT_K: gl.constexpr, NUM_WARPS: gl.constexpr, XS_CHUNKS: gl.constexpr, EVEN_K: gl.constexpr, SCALE_AFTER: gl.constexpr,
    STAGES: gl.constexpr, ROUTE: gl.constexpr, PDL: gl.constexpr, TILED: gl.constexpr,
):
    """The GEMV with its weights fed by TMA (Hopper): the split's words come a chunk per box into a ring
    of ``STAGES`` buffers (all of them at once where the split has at most ``STAGES`` chunks), its
    scales and zero points (stored group-major) in one box each, all issued before the activations are
    staged; a step reads its group values from shared memory. ``ROUTE`` (four groups a chunk half): every
    group of a chunk sums into its own MMA columns (lane ``t`` holds group ``t`` of each half), so the
    group values are applied once a chunk, not once a step (:func:`_route_chunks`). ``TILED``: the words tile by tile
    (``tiled_words``, :func:`_fetch`)."""
    layout: gl.constexpr = _words_layout(NUM_WARPS)
    rows_layout: gl.constexpr = gl.SliceLayout(2, layout)
    HALF: gl.constexpr = SLOTS // 2
    CHUNK: gl.constexpr = SLOTS * RUN
    STEP: gl.constexpr = SPG if SPG < HALF else HALF
    N_STEPS: gl.constexpr = HALF // STEP
    GBOX: gl.constexpr = s_desc.block_type.shape[0]  # groups in the split's box of scales
    pid_m = gl.program_id(0)
    pid_n = gl.program_id(1)
    cell = gl.arange(0, BLOCK_N // 2, layout=gl.SliceLayout(1, rows_layout))[:, None] * 2 + gl.arange(0, 2, layout=gl.SliceLayout(0, rows_layout))[None, :]
    rows = pid_n * BLOCK_N + cell
    row_ok = rows < N
    per_split = gl.cdiv(n_chunks, SPLIT_K)
    first = gl.program_id(2) * per_split
    last = gl.minimum(first + per_split, n_chunks)
    n_here = last - first

    # the words: chunk i of the split in buffer i % STAGES, STAGES chunks ahead
    w_smem = gl.allocate_shared_memory(gl.int32, [STAGES, BLOCK_N, RUN], w_desc.layout)
    if BITS == 3:  # and the high plane's words of each chunk beside them
        h_smem = gl.allocate_shared_memory(gl.int32, [STAGES, BLOCK_N, RUN], h_desc.layout)
    else:
        h_smem = w_smem
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(ready.index(i), count=1)
    for i in gl.static_range(STAGES):
        _fetch(w_desc, h_desc, w_smem, h_smem, ready, i, first + i, pid_n * BLOCK_N, n_chunks, i < n_here, BITS, TILED)
    # the split's scales and zero points [GBOX, BLOCK_N], groups g0 .. g0 + GBOX - 1
    g0 = first * CHUNK // group_size
    values = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    mbarrier.init(values, count=1)
    s_smem = gl.allocate_shared_memory(s_desc.dtype, [GBOX, BLOCK_N], s_desc.layout)
    z_smem = gl.allocate_shared_memory(s_desc.dtype, [GBOX, BLOCK_N], s_desc.layout)
    mbarrier.expect(values, s_desc.block_type.nbytes * (2 if HAS_ZERO else 1))
    async_load(s_desc, [g0, pid_n * BLOCK_N], values, s_smem)
    if HAS_ZERO:
        async_load(z_desc, [g0, pid_n * BLOCK_N], values, z_smem)
    # one group's rows as the cells [BLOCK_N // 2, 2] (a rank-2 layout: the indexed views drop the group axis)
    by_group: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [1, 0])
    s_groups = reinterpret(s_smem, s_desc.dtype, [GBOX, BLOCK_N // 2, 2], by_group)
    z_groups = reinterpret(z_smem, s_desc.dtype, [GBOX, BLOCK_N // 2, 2], by_group)
    if PDL:  # the weights' loads are out: wait for the previous kernel, then let the next one's programs in
        _grid_dependency(True)
        _grid_dependency(False)

    if ROUTE:
        xs = gl.allocate_shared_memory(gl.int32, [XS_CHUNKS, HALF, 4, 2, RUN], gl.SwizzledSharedLayout(1, 1, 1, [4, 3, 2, 1, 0]))
    else:
        xs = gl.allocate_shared_memory(gl.int32, [XS_CHUNKS, HALF, 2, RUN], gl.SwizzledSharedLayout(1, 1, 1, [3, 2, 1, 0]))
    offset_sums = gl.allocate_shared_memory(gl.float32, [XS_CHUNKS, N_STEPS, 2], gl.SwizzledSharedLayout(1, 1, 1, [2, 1, 0]))
    x_sums = gl.allocate_shared_memory(gl.float32, [XS_CHUNKS, N_STEPS, 2], gl.SwizzledSharedLayout(1, 1, 1, [2, 1, 0]))
    _stage(x_ptr + pid_m * stride_xm, first * CHUNK, n_here, K, xs, offset_sums, x_sums, NUM_WARPS, BITS, SLOTS, STEP, XS_CHUNKS, EVEN_K,
           ROUTE)
    if ROUTE:
        xs = reinterpret(xs, gl.int32, [XS_CHUNKS, HALF, 4, 2, RUN], gl.SwizzledSharedLayout(1, 1, 1, [3, 2, 1, 0]))
    else:
        xs = reinterpret(xs, gl.int32, [XS_CHUNKS, HALF, 2, RUN], gl.SwizzledSharedLayout(1, 1, 1, [2, 1, 0]))
    offset_sums = reinterpret(offset_sums, gl.float32, [XS_CHUNKS, N_STEPS, 2], gl.SwizzledSharedLayout(1, 1, 1, [1, 0]))
    x_sums = reinterpret(x_sums, gl.float32, [XS_CHUNKS, N_STEPS, 2], gl.SwizzledSharedLayout(1, 1, 1, [1, 0]))
    barrier()

    mbarrier.wait(values, 0)
    if ROUTE:
        y = _route_chunks(w_desc, w_smem, ready, s_smem, z_smem, xs, offset_sums, x_sums, first, n_here, pid_n * BLOCK_N, n_chunks,
                          zero_const, BITS, HALF, HAS_ZERO, BLOCK_N, NUM_WARPS, XS_CHUNKS, STAGES, TILED)
        y = gl.convert_layout(gl.reshape(y, [BLOCK_N // 2, 2]), rows_layout)
    else:
        acc = gl.zeros((BLOCK_N // 2, 2, RUN), gl.float32, layout)
        y_acc = gl.zeros((BLOCK_N // 2, 2, 4), gl.float32, _lanes(NUM_WARPS))
        correction = gl.zeros((BLOCK_N // 2, 2, 1), gl.float32, layout)
        if SCALE_AFTER:  # one group a row: its values serve every step
            s_lo, s_hi, z_lo, z_hi = _shared_values(s_groups, z_groups, 0, 0, zero_const, HAS_ZERO, rows_layout)
        for i in range(n_here):
            buf = i % STAGES
            mbarrier.wait(ready.index(buf), (i // STAGES) & 1)
            words = w_smem.index(buf).reshape([BLOCK_N // 2, 2, RUN]).load(layout)
            high = words
            if BITS == 3:
                high = _spread_high(h_smem.index(buf).reshape([BLOCK_N // 2, 2, RUN]).load(layout), first + i)
            _refill(w_desc, h_desc, w_smem, h_smem, ready, i, first, n_here, pid_n * BLOCK_N, n_chunks, STAGES, XS_CHUNKS, BITS, TILED)
            for step in gl.static_range(N_STEPS):
                if not SCALE_AFTER:
                    g_lo, g_hi = _group_index(first + i, step, group_size, SLOTS, SPG, STEP)
                    s_lo, s_hi, z_lo, z_hi = _shared_values(s_groups, z_groups, g_lo - g0, g_hi - g0, zero_const, HAS_ZERO, rows_layout)
                acc, y_acc, correction = _step(words, high, xs.index(i), offset_sums.index(i), x_sums.index(i), acc, y_acc, correction,
                                               s_lo, s_hi, z_lo, z_hi, step, NUM_WARPS, BLOCK_N, BITS, STEP, SCALE_AFTER)
        if SCALE_AFTER:
            y = (gl.sum(acc, axis=2) * 0.25 + gl.sum(correction, axis=2)) * gl.sum(s_lo, axis=2)
        else:
            y = gl.convert_layout(gl.sum(y_acc, axis=2), rows_layout) * 0.25
    for i in gl.static_range(STAGES):
        mbarrier.invalidate(ready.index(i))
    mbarrier.invalidate(values)
    _store_rows(y, y_ptr + pid_m * stride_ym + rows, row_ok, partial_ptr, count_ptr, cell, pid_m, pid_n, BLOCK_N, SPLIT_K, rows_layout)


@gluon.jit
def _store_rows(y, y_row, row_ok, partial_ptr, count_ptr, cell, pid_m, pid_n, BLOCK_N: gl.constexpr, SPLIT_K: gl.constexpr,
                rows_layout: gl.constexpr):
    """The rows' sums ``y [BLOCK_N // 2, 2]`` (fp32) into ``y_row`` as fp16, through the split-K partial sums."""
    if SPLIT_K == 1:
        gl.store(y_row, y.to(gl.float16), mask=row_ok)
    else:  # the last split to finish adds the partial sums in split order (see lowbit_matmul._store_transposed)
        n_tiles = gl.num_programs(0) * gl.num_programs(1)
        tile = pid_m * gl.num_programs(1) + pid_n
        gl.store(partial_ptr + (gl.program_id(2) * n_tiles + tile) * BLOCK_N + cell, y)
        barrier()
        arrived = gl.atomic_add(count_ptr + tile, 1, sem="acq_rel", scope="gpu")
        if arrived == SPLIT_K - 1:
            total = gl.zeros((BLOCK_N // 2, 2), gl.float32, rows_layout)
            for split in gl.static_range(SPLIT_K):
                total += gl.load(partial_ptr + (split * n_tiles + tile) * BLOCK_N + cell, cache_modifier=".cg")
            gl.store(y_row, total.to(gl.float16), mask=row_ok)
            gl.atomic_xchg(count_ptr + tile, 0, sem="relaxed", scope="gpu")


@dataclass(frozen=True)
class GemvMmaConfig:
    block_n: int = 64  # a multiple of 16 * num_warps
    num_warps: int = 4
    split_k: int = 4
    maxnreg: int | None = 128  # ptxas's register cap (None: its own choice, 130-180 for W1: fewer programs per SM)
    stages: int = 0  # 0: words and group values by plain loads (any GPU); n: by TMA, n chunks ahead (Hopper: tma_fits)
    route: bool = False  # with TMA and four groups a chunk half (W1 g128, W2 g64): the groups in MMA columns (routes)
    pdl: bool = False  # from Hopper on: programmatic dependent launch (off: it slowed the decode, see the module notes)
    k_warps: int = 1  # plain loads, not uint3: the warps in this many groups along K, summed in shared memory (_gemv_kw_kernel)
    values_box: bool = False  # with k_warps on Hopper: the split's group values in one TMA box (values_box_fits; not yet run on a GPU)
    tiled_words: bool = False  # with k_warps, or TMA but for uint3: the words tile by tile, a chunk of block_n rows one run (tile_words)
    lane_words: bool = False  # plain loads: a row's words read in 64-byte runs, the activations staged to match (_lane_place)


def default_config(pw: PackedWeight) -> GemvMmaConfig:
    """By shape, from H100 probes (sessions 8 and 9, steady state, batch 1, the 128-register cap):
    8 K splits of 64-row tiles for a long K and at most 4096 rows (14336x4096 W1: 13.5 us against 16.3
    at 4 splits, session 8), 128-row tiles on 8 warps where the rows are at most K (within 0.5 us of
    the best of three configs for W1, W2 and ternary at 8192^2 and 28672x8192). More rows than K
    (4096x14336 and 8192x28672): 2 K splits of 64-row tiles (W1 11.7 and 35.0 against 13.3 and 36.0
    at 4 splits), for ternary-like weights (one scale per row, fewer registers) 128-row tiles on 4
    warps (10.6 and 31.3 against 12.6 and 34.4). W3 (H200, session 16): 4 K splits of 64-row tiles
    but for a long K (8192^2 17.6 us against 17.9 for 128-row tiles; 4096x14336 17.0 against 17.6 at
    2 splits; 28672x8192 51.2 against 52.4; 8192x28672 51.0 against 50.8)."""
    if lm.long_k(pw):
        return GemvMmaConfig(block_n=64, num_warps=4, split_k=8)
    if lm.CODE_BITS[pw.layout] == 3:
        return GemvMmaConfig(block_n=64, num_warps=4, split_k=4)
    if pw.n <= pw.k:
        return GemvMmaConfig(block_n=128, num_warps=8, split_k=4)
    if pw.n_groups == 1:
        return GemvMmaConfig(block_n=128, num_warps=4, split_k=4)
    return GemvMmaConfig(block_n=64, num_warps=4, split_k=2)


def tma_config(pw: PackedWeight) -> GemvMmaConfig | None:
    """The TMA feed's config on Hopper, or None where the plain loads were as fast. H200, steady state,
    batch 1 (session 12, bench/results/kernel_latency_h200.md), two chunks in flight on 4 warps:
    * four groups a chunk half (W1 g128, W2 g64): routes on 128-row tiles (W1 8192^2 10.6 us against
      11.5-11.6 unrouted, 4096x14336 10.2 against 11.0; W2 g64 12.3 against 13.1, 11.9 against 12.7),
      but not with a long K (14336x4096: W1 11.4-12.1 routed against 10.9);
    * otherwise W1 on 64-row tiles (14336x4096 10.9 against 11.5 plain; 8192^2 11.5 against 11.8),
      W2 on 128-row tiles (8192^2 11.5 against 12.2), 64 where K is long or the rows outnumber K (11.3
      against 12.2, 12.1 each), W4 on 128-row tiles (8192^2 13.4 against 14.4, 4096x14336 13.1 against
      13.6; three chunks in flight gained 0.3 us at 8192^2 but lost 3.9 at 4096x14336, where three
      programs a multiprocessor no longer hold the grid in one wave); 2 K splits where the rows
      outnumber K (W1, W2), else 4;
    * kept plain: one scale per row (ternary: TMA 0.1 to 1.1 us slower; but see session 20 below) and W4 with a
      long K (13.1 against 13.3).
    The register cap did not matter there (session 12: W1 on 64-row tiles at 80, 104 and 128 registers within 0.1 us
    at 8192^2); it does on 128-row tiles (session 20, below).
    * W3 (session 17, ``--tune-gemv-mma`` over plain and TMA configs, two shapes): TMA on 64-row tiles, 2 K splits
      (8192^2 16.1 us against 17.7 on the plain loads' rule), 4 with a long K (14336x4096 15.1 against 17.1).
    * W1 and W2 on 128-row tiles (session 20): ptxas capped at 168 registers, not 128 (routed W1 took 151 and spilled
      48 bytes under 128): W1 g128 8192^2 10.1 us against 10.7, 4096x14336 9.8 against 10.3, 16384^2 28.3 against
      30.8; W2 g64 12.2 against 12.4, 44.3 against 46.4; W2 g128 8192^2 11.2 against 11.5, 16384^2 30.1 against 32.4.
      Not on 64-row tiles (14336x4096: W1 and W2 the same under 168, slower uncapped).
    * Ternary (one scale a row, session 20, side by side with the plain loads' rule): TMA on 128-row tiles, 4 K splits,
      168 registers, where K is at least the rows and the weight holds at least :data:`TERNARY_TMA_MIN_WEIGHTS`:
      8192^2 10.2 us against 10.7, 14336x4096 10.1 against 10.7, 16384^2 27.9 against 33.4 (28672x8192 25.9 against
      29.7 across two runs); plain where smaller (4096^2 5.5 against 5.8, 11008x4096 9.2 against 9.3) or where the
      rows outnumber K (4096x11008 8.4 against 9.2; 4096x14336 10.2 against 10.0 with 2 splits, 11.7 with 4;
      8192x28672 25.7 against 25.6)."""
    bits = lm.CODE_BITS[pw.layout]
    long_k = lm.long_k(pw)
    if pw.n_groups == 1:  # one scale a row: large 2-bit (ternary) weights with at least as many K as rows, the others plain
        large = bits == 2 and pw.n <= pw.k and pw.n * pw.k >= TERNARY_TMA_MIN_WEIGHTS
        return GemvMmaConfig(block_n=128, num_warps=4, split_k=4, stages=2, maxnreg=WIDE_TILE_REGISTERS) if large else None
    if bits == 4 and long_k:
        return None
    if bits == 3:
        return GemvMmaConfig(block_n=64, num_warps=4, split_k=4 if long_k else 2, stages=2)
    if bits == 4:
        return GemvMmaConfig(block_n=128, num_warps=4, split_k=4, stages=2)
    split_k = 2 if pw.n > pw.k else 4
    if routes(pw) and not long_k:
        return GemvMmaConfig(block_n=128, num_warps=4, split_k=split_k, stages=2, route=True, maxnreg=WIDE_TILE_REGISTERS)
    if bits == 1 or long_k or pw.n > pw.k:
        return GemvMmaConfig(block_n=64, num_warps=4, split_k=split_k, stages=2)
    return GemvMmaConfig(block_n=128, num_warps=4, split_k=split_k, stages=2, maxnreg=WIDE_TILE_REGISTERS)


WIDE_TILE_REGISTERS = 168  # ptxas's cap for W1, W2 and ternary on 128-row TMA tiles (4 warps): no spills, three programs a multiprocessor
TERNARY_TMA_MIN_WEIGHTS = 50 * 2**20  # ternary on TMA from here (between 11008x4096, plain 2% faster, and 14336x4096, TMA 6% faster)


# Configs that ``python -m bench.kernel_latency --tune-gemv-mma`` timed best, by :func:`tuned_key`; they win over
# the rules above for the rest of that process (and, saved with ``--save-tuned``, in later ones: qkernels.tuned).
TUNED: dict[tuple, GemvMmaConfig] = {}


def tuned_key(pw: PackedWeight) -> tuple:
    """The weight's kind and shape."""
    return pw.layout, pw.zero is not None, pw.group_size, pw.n, pw.k


def k_warps_config(pw: PackedWeight) -> GemvMmaConfig | None:
    """Small weights (at most 4096^2 codes on at least 4096 rows) other than W1 and W3: 32-row tiles, 8 warps in 4 groups
    along K, no K split through global memory (:func:`_gemv_kw_kernel`); else None. H200, batch 1, side by side
    with the rules (session 23, bench/results/kernel_latency_h200.md): 4096^2 ternary 4.51 us against 5.44, W2 g128
    5.45 against 6.21, W4 g128 6.14 against 6.87 (W1 5.47 against the routed TMA rule's 5.35: not W1). Not at the
    larger shapes timed (4096x11008, 11008x4096, 8192^2 but for ternary, and larger): there the rules won or tied."""
    bits = lm.CODE_BITS[pw.layout]
    if bits in (1, 3) or pw.n * pw.k > 4096 * 4096 or pw.n < 4096:
        return None
    return GemvMmaConfig(block_n=32, num_warps=8, split_k=1, k_warps=4)


def rule_config(pw: PackedWeight) -> GemvMmaConfig:
    """:func:`k_warps_config` where it applies, else :func:`tma_config` where it applies and fits (Hopper), else
    :func:`default_config`."""
    config = k_warps_config(pw)
    if config is not None:
        return config
    config = tma_config(pw)
    return config if config is not None and tma_fits(pw, config) else default_config(pw)


def config_for(pw: PackedWeight) -> GemvMmaConfig:
    """A config tuned in this process for this kind and shape, else one saved for this GPU model (where it
    fits these weights), else :func:`rule_config` (those two looked up once per weight)."""
    key = tuned_key(pw)
    if key in TUNED:
        return TUNED[key]
    return pw.memo(("gemv_mma_config", tuned.stamp(pw.words.device)), lambda: _saved_or_rule(pw, key), shared=True)


def _saved_or_rule(pw: PackedWeight, key: tuple) -> GemvMmaConfig:
    config = tuned.saved("gemv_mma", GemvMmaConfig, pw.words.device).get(key)
    if config is not None and (not config.stages or tma_fits(pw, config)):
        return config
    return rule_config(pw)


def gemv_mma(x: torch.Tensor, pw: PackedWeight, config: GemvMmaConfig | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """``x [M, K] @ W^T`` for a few rows (at most ``GEMV_MAX_M``), into ``out`` if given."""
    if not lm.gemv_mma_fits(pw, x.dtype):
        raise ValueError(f"gemv_mma takes fp16 activations and layouts {lm.UINT_LAYOUTS} with run {lm.GEMV_MMA_RUN}; "
                         f"got {x.dtype}, {pw.layout}, run {pw.run}")
    config = config or config_for(pw)
    kernel, sizes, consts = pw.memo(("gemv_mma", config), lambda: _launch_spec(pw, config), shared=True)
    weights = pw.memo(("gemv_mma_weights", config), lambda: _weight_args(pw, config))
    lm.check_inputs(x, pw)
    m = x.shape[0]
    if m > lm.GEMV_MAX_M:
        raise ValueError(f"gemv_mma takes at most {lm.GEMV_MAX_M} rows, got {m}; use mma or gemm")
    y = lm.output(out, (m, pw.n), x)
    grid = (m, triton.cdiv(pw.n, config.block_n), config.split_k)
    partial, count = lm.split_buffers(y, grid, config.block_n)
    kernel[grid](x, *weights, y, partial, count, *sizes, x.stride(0), y.stride(0), **consts)
    return y


def _weight_args(pw: PackedWeight, config: GemvMmaConfig) -> tuple:
    """The kernel's weight arguments: TMA descriptors, or the tensors (kept per weight: they hold its tensors); with
    warp groups along K also the boxes of group values (stand-ins without ``values_box``)."""
    words, high, scale, zero = lm.kernel_tensors(pw)
    if config.stages:
        return _descriptors(pw, words, scale, zero, config)
    if config.k_warps > 1:
        if config.tiled_words:
            words = tile_words(words, config.block_n)
        return (words, high, scale, zero, *(_value_boxes(pw, scale, zero, config) if config.values_box else (scale, zero)))
    return words, high, scale, zero


def tile_words(words: torch.Tensor, block_n: int) -> torch.Tensor:
    """The packed words ``[N, chunks * 32]`` tile by tile, ``[row tiles, chunks, block_n, 32]`` (the rows padded with zeros
    to whole tiles): a program's chunk is one run of ``block_n * 128`` bytes instead of ``block_n`` runs of 128 bytes a
    row apart. A copy beside the packed rows (``tiled_words``: the A/B of the layout, not a layout the weights keep)."""
    n, width = words.shape
    row_tiles = triton.cdiv(n, block_n)
    padded = torch.zeros(row_tiles * block_n, width, dtype=words.dtype, device=words.device)
    padded[:n] = words
    return padded.view(row_tiles, block_n, width // RUN.value, RUN.value).transpose(1, 2).contiguous()


def value_box_groups(pw: PackedWeight, config: GemvMmaConfig) -> int:
    """Groups in the warp-group GEMV's box of group values (``values_box``): every group of a K split's runs."""
    n_chunks = pw.words.shape[1] // pw.run
    return config.k_warps * triton.next_power_of_2(triton.cdiv(n_chunks, config.split_k * config.k_warps)) * (pw.chunk // pw.group_size)


def values_box_fits(pw: PackedWeight, config: GemvMmaConfig) -> str | None:
    """Why ``values_box`` cannot run on ``pw`` with ``config``, or None: it needs warp groups along K on a Hopper GPU,
    groups inside a chunk half (not one a row), runs of a power of two chunks (the box's rows are laid out by run), at
    most 256 groups a split and 16-byte aligned group-major rows of scales and zero points; one plane of words, as warp
    groups along K need (not uint3)."""
    n_chunks = pw.words.shape[1] // pw.run
    per_run = triton.cdiv(n_chunks, config.split_k * config.k_warps)
    _, _, scale, zero = lm.kernel_tensors(pw)
    aligned = lambda t: t.data_ptr() % 16 == 0 and _by_group(t)[1][1] == 1 and _by_group(t)[1][0] * t.element_size() % 16 == 0  # noqa: E731
    checks = {
        f"k_warps={config.k_warps} (warp groups along K)": config.k_warps > 1,
        f"one plane of words (not {pw.layout})": pw.high is None,
        "a Hopper GPU": lm.is_hopper(pw.words.device),
        f"groups inside a chunk half (group_size {pw.group_size}, half a chunk {pw.chunk // 2})": pw.n_groups > 1 and pw.chunk // 2 % pw.group_size == 0,
        f"every run the same power of two chunks ({n_chunks} chunks in {config.split_k * config.k_warps} runs)":
            per_run & (per_run - 1) == 0 and per_run * config.split_k * config.k_warps == n_chunks and pw.n_groups * pw.group_size == pw.k_pad,
        f"at most 256 groups a run ({value_box_groups(pw, config) // config.k_warps})": value_box_groups(pw, config) <= 256 * config.k_warps,
        f"16-byte aligned group-major scales and zero points (N={pw.n})": aligned(scale) and aligned(zero),
    }
    missing = [need for need, ok in checks.items() if not ok]
    return "values_box needs " + ", ".join(missing) if missing else None


def _value_boxes(pw: PackedWeight, scale: torch.Tensor, zero: torch.Tensor, config: GemvMmaConfig) -> tuple:
    """TMA descriptors of the group-major scales and zero points ``[n_groups, N]`` seen as ``[split, run's group, warp
    group, N]`` (group ``(split * KW + warp group) * run's groups + j``), in boxes of one split by ``block_n`` rows: in
    shared memory a run's groups come first, so each step reads one row for every warp group."""
    run_groups = value_box_groups(pw, config) // config.k_warps
    splits = pw.n_groups // (run_groups * config.k_warps)
    layout = gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=8 * scale.element_size(), rank=4)
    kw = config.k_warps
    return tuple(TensorDescriptor(t, [splits, run_groups, kw, pw.n], [kw * run_groups * (g := _by_group(t)[1][0]), g, run_groups * g, 1],
                                  [1, run_groups, kw, config.block_n], layout) for t in (scale, zero))


def _launch_spec(pw: PackedWeight, config: GemvMmaConfig) -> tuple:
    """What a launch with ``config`` takes besides the tensors, checked once per weight shape and address
    (:meth:`PackedWeight.memo`, shared: it holds no tensor): the kernel, sizes and compile-time constants."""
    if config.k_warps < 1 or config.k_warps & (config.k_warps - 1) or config.num_warps % config.k_warps:
        raise ValueError(f"k_warps must be a power of two that divides num_warps = {config.num_warps}, got {config.k_warps}")
    row_warps = config.num_warps // config.k_warps
    if config.block_n % (16 * row_warps):
        raise ValueError(f"block_n must be a multiple of 16 * num_warps / k_warps = {16 * row_warps}, got {config.block_n}")
    if config.k_warps > 1 and (config.stages or pw.high is not None):
        raise ValueError(f"k_warps={config.k_warps} runs on the plain loads (stages=0) and one plane of words (not uint3); "
                         f"got stages={config.stages}, {pw.layout}")
    if config.lane_words and config.stages:
        raise ValueError(f"lane_words=True runs on the plain loads (stages=0; TMA reads whole rows of a chunk); got stages={config.stages}")
    if config.tiled_words and not (config.k_warps > 1 or (config.stages and pw.high is None)):
        raise ValueError(f"tiled_words=True runs on the warp-group kernel (k_warps > 1) or the TMA feed of one plane of words (stages > 0, "
                         f"not uint3); got k_warps={config.k_warps}, stages={config.stages}, {pw.layout}")
    if config.values_box and (why := values_box_fits(pw, config)):
        raise ValueError(why)
    if config.stages and not tma_fits(pw, config):
        raise ValueError(f"stages={config.stages} (TMA) needs a Hopper GPU, 16-byte aligned words, scales and zero points "
                         f"and at most {MAX_GROUP_BOX} groups a split; use stages=0 here")
    if config.route and not config.stages:
        raise ValueError("route=True runs on the TMA feed only (stages > 0)")
    if config.route and not routes(pw):
        raise ValueError(f"route=True needs one plane of words (not uint3) and four groups in a chunk half (group_size = "
                         f"{pw.chunk // 8}); got {pw.layout} with group_size {pw.group_size}")
    return launch_constants(pw, config, pdl=config.pdl and lm.has_pdl(pw.words.device))


def launch_constants(pw: PackedWeight, config: GemvMmaConfig, pdl: bool = False) -> tuple:
    """The kernel (plain loads or TMA), its sizes and compile-time constants for ``config`` (no device checks: also
    what :mod:`qkernels.compile_check` compiles without a GPU)."""
    words, high, scale, zero = lm.kernel_tensors(pw)
    n_chunks = words.shape[1] // pw.run
    consts = dict(
        BITS=lm.CODE_BITS[pw.layout], SLOTS=pw.slots, SPG=pw.group_size // pw.run, HAS_ZERO=pw.zero is not None, BLOCK_N=config.block_n,
        SPLIT_K=config.split_k, NUM_WARPS=config.num_warps,
        XS_CHUNKS=triton.next_power_of_2(triton.cdiv(n_chunks, config.split_k * config.k_warps)),
        EVEN_K=pw.k == pw.k_pad, SCALE_AFTER=pw.n_groups == 1, PDL=pdl, num_warps=config.num_warps, launch_pdl=pdl,
        **({} if config.maxnreg is None else {'maxnreg': config.maxnreg}),
    )
    if config.stages:
        sizes = (pw.n, pw.k, n_chunks, pw.group_size, pw.zero_const)
        consts.update(STAGES=config.stages, ROUTE=config.route, TILED=config.tiled_words)
        return _gemv_tma_kernel, sizes, consts
    head = (pw.n, pw.k, n_chunks, pw.n_groups, *scale.stride(), pw.group_size, pw.zero_const)
    if config.k_warps > 1:  # words by (row tile, row, chunk): the packed rows, or the words tile by tile (tile_words)
        rows, tile = words.stride(0), config.block_n * RUN.value
        strides = (n_chunks * tile, RUN.value, tile) if config.tiled_words else (config.block_n * rows, rows, RUN.value)
        sizes = (*head, *strides, high.stride(0))
        return _gemv_kw_kernel, sizes, consts | dict(KW=config.k_warps, VBOX=config.values_box, LANES=config.lane_words)
    return _gemv_mma_kernel, (*head, words.stride(0), high.stride(0)), consts | dict(LANES=config.lane_words)


MAX_GROUP_BOX = 64  # groups a split of the TMA GEMV reads (its box of scales: 64 x BLOCK_N fp16 = 16 KiB at 128 rows)


def routes(pw: PackedWeight) -> bool:
    """Four groups in each half of a chunk, one plane of words: the TMA GEMV can give each group its own MMA
    columns (``route``)."""
    return pw.n_groups > 1 and pw.group_size * 8 == pw.chunk and pw.high is None


def group_box(pw: PackedWeight, config: GemvMmaConfig) -> int:
    """Groups in the TMA GEMV's box of scales: the most that one K split's chunks touch, as a power of two."""
    n_chunks = pw.words.shape[1] // pw.run
    per_split = triton.cdiv(n_chunks, config.split_k)
    span = max((min(first + per_split, n_chunks) * pw.chunk - 1) // pw.group_size - first * pw.chunk // pw.group_size + 1
               for first in range(0, n_chunks, per_split))
    return triton.next_power_of_2(span)


def tma_fits(pw: PackedWeight, config: GemvMmaConfig) -> bool:
    """The TMA GEMV runs on Hopper with 16-byte aligned rows of words (both planes for uint3) and of the
    group-major scales and zero points, at most :data:`MAX_GROUP_BOX` groups a split."""
    if not lm.is_hopper(pw.words.device):
        return False
    words, high, scale, zero = lm.kernel_tensors(pw)
    aligned = lambda t, strides: t.data_ptr() % 16 == 0 and strides[1] == 1 and strides[0] * t.element_size() % 16 == 0  # noqa: E731
    return (aligned(words, words.stride()) and aligned(high, high.stride()) and aligned(scale, _by_group(scale)[1])
            and aligned(zero, _by_group(zero)[1]) and group_box(pw, config) <= MAX_GROUP_BOX)


def _by_group(t: torch.Tensor) -> tuple[list[int], list[int]]:
    """Shape and strides of group-major scales ``[n, n_groups]`` seen as ``[n_groups, n]`` (one group: rows of ``n``)."""
    n, n_groups = t.shape
    return [n_groups, n], [t.stride(1) if n_groups > 1 else n, t.stride(0)]


def _descriptors(pw: PackedWeight, words: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, config: GemvMmaConfig) -> tuple:
    """TMA descriptors: the words (or with ``tiled_words`` their copy tile by tile) in boxes of ``[block_n, 32]``
    (128-byte swizzle), the group-major scales and zero points ``[n_groups, N]`` in boxes of ``[group_box, block_n]``."""
    w_box = [config.block_n, RUN.value]
    w_layout = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=32, rank=2)
    if config.tiled_words:  # tile by tile, seen as rows of 32 words (_fetch)
        words = tile_words(words, config.block_n).view(-1, RUN.value)
    w_desc = TensorDescriptor(words, list(words.shape), list(words.stride()), w_box, w_layout)
    h_desc = w_desc if pw.high is None else TensorDescriptor(pw.high, list(pw.high.shape), list(pw.high.stride()), w_box, w_layout)
    s_box = [group_box(pw, config), config.block_n]
    s_layout = gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=8 * scale.element_size(), rank=2)
    s_desc = TensorDescriptor(scale, *_by_group(scale), s_box, s_layout)
    z_desc = TensorDescriptor(zero, *_by_group(zero), s_box, s_layout)
    return w_desc, h_desc, s_desc, z_desc

"""Low-bit GEMM for larger batches on Hopper ``wgmma`` tensor cores (Gluon), the weights decoded in registers.

``y^T = W x^T`` for fp16 activations and the ``uint1``/``uint2``/``uint4`` layouts with a run of 32: a
program (one or two warpgroups, 16 weight rows per warp and pass) takes ``BLOCK_N`` weight rows,
``BLOCK_M`` activation rows and one K split. A step is ``slots_per_step`` slots of a chunk (32
consecutive K each):

* The activations ``[BLOCK_M, 32 * slots_per_step]`` of a step come by TMA (one box) into a ring of
  ``STAGES`` shared-memory buffers (one mbarrier each), ``STAGES - 1`` steps ahead; rows past ``M``
  and columns past ``K`` read as zeros. Each slot's 32 columns are a ``wgmma`` B operand (K-major:
  the permuted view). With ``steps_per_box`` > 1 (K a multiple of the step's span) one box brings that
  many steps' tiles (the activations seen as ``[K / span, M, span]``) and the ring counts boxes: Gluon's
  barrier pass puts three CTA barriers around each mbarrier wait and refill, so fewer, larger boxes
  mean fewer barriers (12 a W4 chunk at one step a box, 4 at four, in the sm_90a PTX).
* The weights are the A operand, straight from registers: the chunk's words are loaded (a chunk
  ahead, or with ``words_ahead=2`` two: three register sets over a loop unrolled three times, so that no
  set is copied while its load is in flight) in the A operand's register layout, so a thread holds the
  two neighbouring words of each of its K pairs. One asm block per pair gives ``(code - zero) * scale`` in fp16 (``prmt``, ``lop3``,
  ``fma.f16x2``, ``mul.f16x2``: with integer zero points the ``fma`` takes off the zero point too;
  other zero points take a ``sub.f16x2`` more), so the weights are rounded to fp16 as dequantization
  rounds them. The group values are loaded ``group_ahead`` groups ahead (1 to 4).
* ``wgmma`` runs asynchronously with one step in flight: the next step's decode overlaps it. Its A
  registers stay live until the wait that retires it, and a buffer is refilled only after the
  ``wgmma`` that read it has retired (Gluon's barrier pass puts a CTA barrier before the refill, after
  every warpgroup's wait).

No fp16 copy of the weight is ever made (the dequant + cuBLAS fallback writes one of ``N x K``).
Split-K as in ``lowbit_matmul`` (the last split to finish adds the partial sums in order); the partial
sums are written and read in the accumulator's own register layout, so only the last split shuffles
its tile (through shared memory) for the stores along N. A split tail (``tail_split``, :func:`tail_tiles`)
splits only the tiles past the last full wave: the grid is one axis, the first tiles whole, the tail's
splits last.

H200, steady state (sessions 10 and 11, bench/results/kernel_latency_h200.md): W4 8192^2 at 64 rows
28.8 us against cuBLAS fp16's 37.3 (session 10: 46.4), at 1024 rows 188.9 against 183.2. Nsight
Compute had a quarter of the 64-row time in the split-K epilogue (partial sums stored 4 bytes at a
time along the strided axis) and the rest bound by latency with one warp per scheduler; 64-row weight
tiles now run two programs per multiprocessor. Tried and dropped: the words by TMA through a
shared-memory ring (slower at every batch: session 10, 64 rows W4 64 us against 47, 1024 rows 240
against 200; again in session 14 on the current kernel, the ring 2 to 6 chunks deep with 128-byte
swizzle and the refill after the first step's barrier: W4 8192^2 at 64 rows 35.8-37.0 us against 28.7,
at 1024 rows 238-245 against 189, at 256 rows 55.6 against 57.7; so more weight bytes in flight is not
what the 64-row kernel lacks). Split tails (session 14, H200, A/B interleaved): 4096x14336 at 1024 rows
(448 tiles on 132 multiprocessors: three waves and 52 tiles) W4 216.4 us against 229.0, W2 199.7
against 210.1, ternary 190.6 against 197.3, W1 190.0 against 197.6.

Gluon has no interpreter: off the GPU the tests check the config rules, the argument checks and the
dispatch, on a Hopper GPU the kernel against the fp32 reference.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, warpgroup_mma, warpgroup_mma_wait
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from qkernels import lowbit_matmul as lm
from qkernels import tuned
from qkernels.gluon_compat import async_load, barrier, reinterpret
from qkernels.pack import PackedWeight

RUN = gl.constexpr(lm.GEMV_MMA_RUN)  # K per slot of a chunk: 32 words per row


@gluon.constexpr_function
def _zero_off(p, int_zero, operand):
    """The asm that takes ``2**(10 - P)`` and the zero point off the decoded pair ``u`` (times ``m = 2**-P``):
    one fma with integer zero points (operand ``$operand`` holds ``-(zero + 2**(10 - P))``, exact in fp16), else
    an fma by the constant ``-2**(10 - P)`` and a ``sub`` of the zero points (operand ``$operand``)."""
    if int_zero:
        return f"fma.rn.f16x2 u, u, m, ${operand};"
    return f"mov.b32 a, {(0x8000 | ((25 - p) << 10)) * 0x10001};\n fma.rn.f16x2 u, u, m, a;\n sub.rn.f16x2 u, u, ${operand};"


@gluon.jit
def _zero_addend(zero, P: gl.constexpr, INT_ZERO: gl.constexpr):
    """The operand :func:`_zero_off` takes: ``-(zero + 2**(10 - P))`` ``[BLOCK_N, 1]`` fp16 (per slot: P varies), or
    the zero points themselves."""
    if INT_ZERO:
        return -(zero + (1 << (10 - P)))
    return zero


@gluon.jit
def _slot_weights(words, scale, zero, SLOT: gl.constexpr, BITS: gl.constexpr, INT_ZERO: gl.constexpr):
    """Slot ``SLOT`` of the words tile as fp16 weights ``(code - zero) * scale``, in one asm block per
    pair: ``prmt`` puts the slot's byte of two neighbouring words into the two halves, ``lop3`` keeps the
    code bits and ors in the exponent of 1024 (``2**10 + code * 2**P``), ``fma.f16x2`` by ``2**-P`` takes
    off ``2**(10 - P)`` and, with integer zero points (``INT_ZERO``), the zero point too (``2**(10 - P) +
    zero`` is exact in fp16 then; otherwise a ``sub.f16x2`` does), ``mul.f16x2`` scales (constants:
    ``lowbit_matmul.slot_decode_constants``). The block is not pure, so the compiler keeps it in program
    order, before the step's barrier wait; ptxas still moves a step's first block past that wait (in the
    SASS of session 11), so the wait is not yet hidden by decode work."""
    BYTE: gl.constexpr = (SLOT * BITS) // 8
    P: gl.constexpr = (SLOT * BITS) % 8
    SELECT: gl.constexpr = BYTE | ((4 + BYTE) << 8)
    MASK: gl.constexpr = (((1 << BITS) - 1) << P) * 0x10001
    MUL: gl.constexpr = ((15 - P) << 10) * 0x10001  # fp16 2**-P, twice
    addend = _zero_addend(zero, P, INT_ZERO)
    body: gl.constexpr = _zero_off(P, INT_ZERO, 3)
    return gl.inline_asm_elementwise(
        asm=f"""{{
        .reg .b32 u, m, a;
        prmt.b32 u, $1, $2, {SELECT};
        lop3.b32 u, u, {MASK}, 0x64006400, 0xea;
        mov.b32 m, {MUL};
        {body}
        mul.rn.f16x2 $0, u, $4;
        }}""",
        constraints="=r,r,r,r,r", args=[words, addend, scale], dtype=gl.float16, is_pure=False, pack=2,
    )


def slot3_decode_constants(slot: int) -> dict[str, int]:
    """The integer constants of ``_slot_weights3``'s asm (the same expressions), for tests that emulate it: the
    low plane's byte and mask (bit ``P`` of it), the high plane's byte, its bit's mask and the shift that takes it
    to bit ``P + 2`` (left if positive), and the fp16 ``2**-P`` pair."""
    byte_lo, p = divmod(2 * slot, 8)
    byte_hi, p_hi = divmod(slot, 8)
    return dict(p=p, select_lo=byte_lo | ((4 + byte_lo) << 8), mask_lo=(3 << p) * 0x10001, select_hi=byte_hi | ((4 + byte_hi) << 8),
                mask_hi=(1 << p_hi) * 0x10001, shift=p + 2 - p_hi, mul=((15 - p) << 10) * 0x10001)


@gluon.jit
def _slot_weights3(words, high, scale, zero, SLOT: gl.constexpr, INT_ZERO: gl.constexpr):
    """:func:`_slot_weights` for uint3: the low plane (``words``, two bits a code) as there, the high plane
    (``high``, the uint1 words shifted to this chunk's half: slot ``s`` at bit ``s``) by a second ``prmt``, an
    ``and`` that keeps the slot's bit, a shift to bit ``P + 2`` and an ``or``, so the pair reads ``2**10 + code *
    2**P`` for the 3-bit code; then the same fma and scaling (constants: :func:`slot3_decode_constants`)."""
    BYTE_LO: gl.constexpr = (2 * SLOT) // 8
    P: gl.constexpr = (2 * SLOT) % 8
    BYTE_HI: gl.constexpr = SLOT // 8
    P_HI: gl.constexpr = SLOT % 8
    SHIFT: gl.constexpr = P + 2 - P_HI
    MUL: gl.constexpr = ((15 - P) << 10) * 0x10001  # fp16 2**-P, twice
    if SHIFT > 0:
        move: gl.constexpr = f"shl.b32 h, h, {SHIFT};"
    elif SHIFT < 0:
        move: gl.constexpr = f"shr.u32 h, h, {-SHIFT};"
    else:
        move: gl.constexpr = ""
    addend = _zero_addend(zero, P, INT_ZERO)
    body: gl.constexpr = _zero_off(P, INT_ZERO, 5)
    return gl.inline_asm_elementwise(
        asm=f"""{{
        .reg .b32 u, h, m, a;
        prmt.b32 u, $1, $2, {BYTE_LO | ((4 + BYTE_LO) << 8)};
        lop3.b32 u, u, {(3 << P) * 0x10001}, 0x64006400, 0xea;
        prmt.b32 h, $3, $4, {BYTE_HI | ((4 + BYTE_HI) << 8)};
        and.b32 h, h, {(1 << P_HI) * 0x10001};
        {move}
        or.b32 u, u, h;
        mov.b32 m, {MUL};
        {body}
        mul.rn.f16x2 $0, u, $6;
        }}""",
        constraints="=r,r,r,r,r,r,r", args=[words, high, addend, scale], dtype=gl.float16, is_pure=False, pack=2,
    )


@gluon.jit
def _group_values(scale_ptr, zero_ptr, rows, row_ok, pos, n_groups, stride_sn, stride_sg, zero_const, GROUP_SIZE: gl.constexpr,
                  HAS_ZERO: gl.constexpr):
    """fp16 scale and zero point ``[BLOCK_N, 1]`` of the group holding K position ``pos`` (past the
    last group: the last group's, which only padding reads). ``GROUP_SIZE`` is a compile-time constant: a runtime
    divisor cost a signed division a chunk on every warp's path (session 21, H200: 8% of the 64-row W4 kernel's
    warp samples; without it 8192^2 W4 at 16 rows 18.2 us against 19.8, W2 at 64 rows 25.3 against 27.1)."""
    at = rows * stride_sn + gl.minimum(pos // GROUP_SIZE, n_groups - 1) * stride_sg
    scale = gl.load(scale_ptr + at, mask=row_ok, other=0.0).to(gl.float16)
    if HAS_ZERO:
        zero = gl.load(zero_ptr + at, mask=row_ok, other=0.0).to(gl.float16)
    else:
        zero = (gl.zeros_like(scale) + zero_const).to(gl.float16)
    return scale[:, None], zero[:, None]


@gluon.jit
def _gemm_wgmma_kernel(
    x_desc, w_ptr, hi_ptr, scale_ptr, zero_ptr, y_ptr, partial_ptr, count_ptr,
    M, N, n_chunks, n_groups, stride_sn, stride_sg, zero_const, stride_wn, stride_hn, stride_ym, n_tiles_n, n_tiles, n_full,
    tail_split,
    BITS: gl.constexpr, SLOTS: gl.constexpr, SPG: gl.constexpr, HAS_ZERO: gl.constexpr, INT_ZERO: gl.constexpr, BLOCK_N: gl.constexpr,
    BLOCK_M: gl.constexpr, STAGES: gl.constexpr, SPS: gl.constexpr, GAHEAD: gl.constexpr,
    SPLIT_K: gl.constexpr, SPLITS: gl.constexpr, NUM_WARPS: gl.constexpr, GROUP: gl.constexpr, WAHEAD: gl.constexpr,
    ONCE: gl.constexpr,
):
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NUM_WARPS, 1], instr_shape=[16, BLOCK_M, 16])
    a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)
    CHUNK: gl.constexpr = SLOTS * RUN
    GSTEP: gl.constexpr = SPG if SPG < SLOTS else SLOTS  # slots from one group-value load to the next
    GROUP_SIZE: gl.constexpr = SPG * RUN  # (a run never crosses a group: a constant divisor, no integer division a chunk)
    TILE_BYTES: gl.constexpr = x_desc.block_type.nbytes  # one box a unit: [BLOCK_M, SPS * RUN], or [GROUP, BLOCK_M, SPS * RUN]
    # program -> (tile, K split): the first n_full tiles in SPLIT_K splits, the rest (the tail) in tail_split,
    # tiles fastest (as a grid (tiles along N, tiles along M, splits) would run them)
    pid = gl.program_id(0)
    if pid < n_full * SPLIT_K:
        tile = pid % n_full
        split = pid // n_full
        splits = SPLIT_K
    else:
        tile = n_full + (pid - n_full * SPLIT_K) % (n_tiles - n_full)
        split = (pid - n_full * SPLIT_K) // (n_tiles - n_full)
        splits = tail_split
    pid_n = tile % n_tiles_n
    pid_m = tile // n_tiles_n
    rows = pid_n * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, a_layout))
    row_ok = rows < N
    cols = gl.arange(0, RUN, layout=gl.SliceLayout(0, a_layout))
    w_tile = w_ptr + rows[:, None] * stride_wn + cols[None, :]
    h_tile = hi_ptr + rows[:, None] * stride_hn + cols[None, :]  # uint3's high plane (BITS 3): a chunk of it spans two
    w_ok = row_ok[:, None]
    per_split = gl.cdiv(n_chunks, splits)
    first = split * per_split
    last = gl.minimum(first + per_split, n_chunks)
    n_steps = (last - first) * (SLOTS // SPS)
    off_m = pid_m * BLOCK_M
    k0 = first * CHUNK

    # a ring of STAGES units of GROUP steps, one activation box and one mbarrier each
    if GROUP == 1:
        xs = gl.allocate_shared_memory(gl.float16, [STAGES, BLOCK_M, SPS * RUN], x_desc.layout)
        x_tiles = xs
    else:  # the boxes [GROUP, BLOCK_M, SPS * RUN] seen as STAGES * GROUP step tiles (each box's tiles swizzled as 2-D ones)
        xs = gl.allocate_shared_memory(gl.float16, [STAGES, GROUP, BLOCK_M, SPS * RUN], x_desc.layout)
        x_tiles = reinterpret(xs, gl.float16, [STAGES * GROUP, BLOCK_M, SPS * RUN],
                                  gl.NVMMASharedLayout(swizzle_byte_width=2 * SPS * RUN, element_bitwidth=16, rank=2))
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for s in gl.static_range(STAGES):
        mbarrier.init(ready.index(s), count=1)
    for s in gl.static_range(STAGES - 1):
        _load_unit(x_desc, xs, ready, s, k0, off_m, n_steps, TILE_BYTES, STAGES, GROUP, SPS)

    next_words, next_high = _chunk_words(w_tile, h_tile, w_ok, gl.minimum(first, n_chunks - 1), BITS, ONCE)
    # the group values ahead, a shift register: (s1, z1) the next group's, (s2, z2) the one after, ...
    # GAHEAD of them are live (the rest are copies, dropped by the compiler)
    s1, z1 = _group_values(scale_ptr, zero_ptr, rows, row_ok, k0, n_groups, stride_sn, stride_sg, zero_const, GROUP_SIZE, HAS_ZERO)
    scale, zero = s1, z1
    s2, z2 = s1, z1
    s3, z3 = s1, z1
    s4, z4 = s1, z1
    if GAHEAD >= 2:
        s2, z2 = _group_values(scale_ptr, zero_ptr, rows, row_ok, k0 + GSTEP * RUN, n_groups, stride_sn, stride_sg, zero_const,
                               GROUP_SIZE, HAS_ZERO)
    if GAHEAD >= 3:
        s3, z3 = _group_values(scale_ptr, zero_ptr, rows, row_ok, k0 + 2 * GSTEP * RUN, n_groups, stride_sn, stride_sg, zero_const,
                               GROUP_SIZE, HAS_ZERO)
    if GAHEAD >= 4:
        s4, z4 = _group_values(scale_ptr, zero_ptr, rows, row_ok, k0 + 3 * GSTEP * RUN, n_groups, stride_sn, stride_sg, zero_const,
                               GROUP_SIZE, HAS_ZERO)
    acc = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, mma)
    # the A operands of the step in flight (at most two slots a step): live until the wait that retires it
    held0 = gl.zeros([BLOCK_N, RUN], gl.float16, a_layout)
    held1 = gl.zeros([BLOCK_N, RUN], gl.float16, a_layout)
    groups = (scale, zero, s1, z1, s2, z2, s3, z3, s4, z4)
    feed = (x_desc, xs, x_tiles, ready, k0, off_m, n_steps)
    values = (scale_ptr, zero_ptr, rows, row_ok, n_groups, stride_sn, stride_sg, zero_const)
    if WAHEAD == 1:  # the next chunk's words load while this one computes (one register set in flight)
        for chunk in range(first, last):
            words, high = next_words, next_high
            next_words, next_high = _chunk_words(w_tile, h_tile, w_ok, gl.minimum(chunk + 1, last - 1), BITS, ONCE)
            acc, held0, held1, groups = _chunk(chunk, first, words, high, acc, held0, held1, groups, feed, values, BITS, SLOTS, SPS,
                                               GSTEP, GAHEAD, GROUP, STAGES, GROUP_SIZE, HAS_ZERO, INT_ZERO)
    else:  # two chunks ahead: three register sets, the loop unrolled three times so that no set is ever copied
        w0, h0 = next_words, next_high
        w1, h1 = _chunk_words(w_tile, h_tile, w_ok, gl.minimum(first + 1, last - 1), BITS, ONCE)
        for base in range(first, last, 3):
            w2, h2 = _chunk_words(w_tile, h_tile, w_ok, gl.minimum(base + 2, last - 1), BITS, ONCE)
            acc, held0, held1, groups = _chunk(base, first, w0, h0, acc, held0, held1, groups, feed, values, BITS, SLOTS, SPS,
                                               GSTEP, GAHEAD, GROUP, STAGES, GROUP_SIZE, HAS_ZERO, INT_ZERO)
            if base + 1 < last:
                w0, h0 = _chunk_words(w_tile, h_tile, w_ok, gl.minimum(base + 3, last - 1), BITS, ONCE)
                acc, held0, held1, groups = _chunk(base + 1, first, w1, h1, acc, held0, held1, groups, feed, values, BITS, SLOTS,
                                                   SPS, GSTEP, GAHEAD, GROUP, STAGES, GROUP_SIZE, HAS_ZERO, INT_ZERO)
            if base + 2 < last:
                w1, h1 = _chunk_words(w_tile, h_tile, w_ok, gl.minimum(base + 4, last - 1), BITS, ONCE)
                acc, held0, held1, groups = _chunk(base + 2, first, w2, h2, acc, held0, held1, groups, feed, values, BITS, SLOTS,
                                                   SPS, GSTEP, GAHEAD, GROUP, STAGES, GROUP_SIZE, HAS_ZERO, INT_ZERO)
    acc, held0, held1 = warpgroup_mma_wait(num_outstanding=0, deps=(acc, held0, held1))
    for s in gl.static_range(STAGES):
        mbarrier.invalidate(ready.index(s))

    if SPLITS == 1:  # (compiled without the split-K epilogue)
        _store_tile(y_ptr, acc, M, N, off_m, pid_n * BLOCK_N, stride_ym, BLOCK_N, BLOCK_M, NUM_WARPS)
    elif splits == 1:  # a tile of its own (the full waves with a split tail)
        _store_tile(y_ptr, acc, M, N, off_m, pid_n * BLOCK_N, stride_ym, BLOCK_N, BLOCK_M, NUM_WARPS)
    else:
        _store_split(acc, y_ptr, partial_ptr, count_ptr, M, N, off_m, pid_n * BLOCK_N, stride_ym, split, splits, tile, n_tiles, mma,
                     BLOCK_N, BLOCK_M, NUM_WARPS)


@gluon.jit
def _store_split(acc, y_ptr, partial_ptr, count_ptr, M, N, off_m, off_n, stride_ym, split, splits, tile, n_tiles, MMA: gl.constexpr,
                 BLOCK_N: gl.constexpr, BLOCK_M: gl.constexpr, NUM_WARPS: gl.constexpr):
    """Split ``split`` of ``splits`` of output tile ``tile`` (of ``n_tiles``): its partial sums stored, and the last split
    to finish adds them all in split order (see lowbit_matmul._store_transposed), stores the tile and resets the tile's
    counter. The partial sums stay in the accumulator's register layout ``MMA`` (each thread's own cells): no shuffle."""
    n_cell = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, MMA))[:, None]
    cell = n_cell * BLOCK_M + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, MMA))[None, :]
    gl.store(partial_ptr + (split * n_tiles + tile).to(gl.int64) * (BLOCK_N * BLOCK_M) + cell, acc)
    barrier()
    arrived = gl.atomic_add(count_ptr + tile, 1, sem="acq_rel", scope="gpu")
    if arrived == splits - 1:
        total = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, MMA)
        for part in range(splits):
            total += gl.load(partial_ptr + (part * n_tiles + tile).to(gl.int64) * (BLOCK_N * BLOCK_M) + cell, cache_modifier=".cg")
        _store_tile(y_ptr, total, M, N, off_m, off_n, stride_ym, BLOCK_N, BLOCK_M, NUM_WARPS)
        gl.atomic_xchg(count_ptr + tile, 0, sem="relaxed", scope="gpu")


@gluon.jit
def _chunk(chunk, first, words, high, acc, held0, held1, groups, feed, values, BITS: gl.constexpr, SLOTS: gl.constexpr,
           SPS: gl.constexpr, GSTEP: gl.constexpr, GAHEAD: gl.constexpr, GROUP: gl.constexpr, STAGES: gl.constexpr,
           GROUP_SIZE: gl.constexpr, HAS_ZERO: gl.constexpr, INT_ZERO: gl.constexpr):
    """One chunk's steps: decode each slot of ``words`` (and uint3's ``high``) into A operands, one ``wgmma`` a slot on
    the step's activation tile, the group values shifted in every ``GSTEP`` slots; returns the accumulator, the A
    operands of the step left in flight and the group values (``groups``: the current scale and zero point, then
    the ``GAHEAD`` ahead)."""
    x_desc, xs, x_tiles, ready, k0, off_m, n_steps = feed
    scale_ptr, zero_ptr, rows, row_ok, n_groups, stride_sn, stride_sg, zero_const = values
    scale, zero, s1, z1, s2, z2, s3, z3, s4, z4 = groups
    CHUNK: gl.constexpr = SLOTS * RUN
    TILE_BYTES: gl.constexpr = x_desc.block_type.nbytes
    for part in gl.static_range(SLOTS // SPS):
        step = (chunk - first) * (SLOTS // SPS) + part
        unit = step // GROUP  # a unit's steps are one chunk's (GROUP divides a chunk's steps)
        buf = unit % STAGES
        for j in gl.static_range(SPS):
            if (part * SPS + j) % GSTEP == 0:  # (static_range's variables: used inline, never assigned)
                scale, zero = s1, z1
                # the values GAHEAD groups on (every GSTEP slots: the same group again where groups span chunks)
                after = chunk * CHUNK + (part * SPS + j + GAHEAD * GSTEP) * RUN
                new_scale, new_zero = _group_values(scale_ptr, zero_ptr, rows, row_ok, after, n_groups, stride_sn, stride_sg,
                                                    zero_const, GROUP_SIZE, HAS_ZERO)
                if GAHEAD == 1:
                    s1, z1 = new_scale, new_zero
                elif GAHEAD == 2:
                    s1, z1, s2, z2 = s2, z2, new_scale, new_zero
                elif GAHEAD == 3:
                    s1, z1, s2, z2, s3, z3 = s2, z2, s3, z3, new_scale, new_zero
                else:
                    s1, z1, s2, z2, s3, z3, s4, z4 = s2, z2, s3, z3, s4, z4, new_scale, new_zero
            if BITS == 3:
                a = _slot_weights3(words, high, scale, zero, part * SPS + j, INT_ZERO)
            else:
                a = _slot_weights(words, scale, zero, part * SPS + j, BITS, INT_ZERO)
            if j == 0:
                if part % GROUP == 0:
                    mbarrier.wait(ready.index(buf), (unit // STAGES) & 1)
                a0 = a
            else:
                a1 = a
            x_step = x_tiles.index(buf * GROUP + part % GROUP)
            acc = warpgroup_mma(a, x_step.slice(j * RUN, RUN, dim=1).permute((1, 0)), acc, is_async=True)
        # the previous step's wgmmas retire (each warpgroup_mma is one group); then its buffer is refilled
        acc, held0, held1 = warpgroup_mma_wait(num_outstanding=SPS, deps=(acc, held0, held1))
        held0 = a0
        if SPS == 2:
            held1 = a1
        if part % GROUP == 0:  # a unit's first step: the previous unit has retired, its buffer takes a unit ahead
            _load_unit(x_desc, xs, ready, unit + STAGES - 1, k0, off_m, n_steps, TILE_BYTES, STAGES, GROUP, SPS)
    return acc, held0, held1, (scale, zero, s1, z1, s2, z2, s3, z3, s4, z4)


@gluon.jit
def _chunk_words(w_tile, h_tile, w_ok, chunk, BITS: gl.constexpr, ONCE: gl.constexpr):
    """Chunk ``chunk``'s words, and for uint3 its high-plane words (else the words again, unused). Where one activation
    tile spans the batch (``ONCE``) the words are read once, so they go first out of L2 (``evict_first``), which keeps
    there the activation boxes that every weight tile re-reads (session 24, H200, side by side: W4 8192^2 at 64 rows
    26.1 us against 28.2, 14336x4096 24.2 against 26.0, W2 8192^2 24.4 against 25.2, W4 at 16 rows 17.7 against
    18.2); with several activation tiles each tile's words are read again by the others (not timed with the hint)."""
    if ONCE:
        words = gl.load(w_tile + chunk * RUN, mask=w_ok, other=0, eviction_policy="evict_first")
    else:
        words = gl.load(w_tile + chunk * RUN, mask=w_ok, other=0)
    high = words
    if BITS == 3:
        high = _high_words(h_tile, w_ok, chunk)
    return words, high


@gluon.jit
def _high_words(h_tile, w_ok, chunk):
    """uint3's high-plane words for low-plane chunk ``chunk``: high-plane chunk ``chunk // 2``, shifted so that this
    chunk's 16 slots are bits 0-15."""
    return gl.load(h_tile + (chunk // 2) * RUN, mask=w_ok, other=0) >> ((chunk % 2) * 16)


@gluon.jit
def _load_unit(x_desc, xs, ready, unit, k0, off_m, n_steps, TILE_BYTES: gl.constexpr, STAGES: gl.constexpr, GROUP: gl.constexpr,
               SPS: gl.constexpr):
    """Issue unit ``unit``'s activation box into its buffer (none past the split's last step): ``[BLOCK_M, SPS *
    RUN]`` at K ``k0 + unit * SPS * RUN``, or (``GROUP`` > 1, the activations seen as ``[K / (SPS * RUN), M, SPS *
    RUN]``) ``GROUP`` such tiles at once."""
    again = unit * GROUP < n_steps
    mbarrier.expect(ready.index(unit % STAGES), TILE_BYTES, pred=again)
    if GROUP == 1:
        async_load(x_desc, [off_m, k0 + unit * SPS * RUN], ready.index(unit % STAGES), xs.index(unit % STAGES),
                                        pred=again)
    else:
        async_load(x_desc, [k0 // (SPS * RUN) + unit * GROUP, off_m, 0], ready.index(unit % STAGES),
                                        xs.index(unit % STAGES), pred=again)


@gluon.jit
def _store_tile(y_ptr, acc, M, N, off_m, off_n, stride_ym, BLOCK_N: gl.constexpr, BLOCK_M: gl.constexpr, NUM_WARPS: gl.constexpr):
    """``acc [BLOCK_N, BLOCK_M]`` (fp32) into ``y [M, N]`` as fp16: N is contiguous in y, so the tile is
    first laid out with 8 consecutive N per thread, after the rounding to fp16 (the same values; half the registers
    and shared memory for the change of layout)."""
    out: gl.constexpr = gl.BlockedLayout([8, 1], [16, 2], [1, NUM_WARPS], [0, 1])
    tile = gl.convert_layout(acc.to(gl.float16), out)
    n_local = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, out))[:, None]
    m_local = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, out))[None, :]
    y_tile = y_ptr + (off_m + m_local).to(gl.int64) * stride_ym + off_n + n_local
    gl.store(y_tile, tile, mask=(off_m + m_local < M) & (off_n + n_local < N))


@dataclass(frozen=True)
class GemmWgmmaConfig:
    block_n: int = 128  # weight rows per program: a multiple of 16 * num_warps (16 rows per warp and pass)
    block_m: int = 256  # activation rows per program (the wgmma N): a power of two, 16 to 256
    num_warps: int = 8  # one or two warpgroups
    slots_per_step: int = 2  # activation tiles (32 K each) per pipeline step: 1 or 2
    stages: int = 4  # activation boxes in the ring (a box: one step, or steps_per_box steps)
    group_ahead: int = 2  # groups ahead that the scales and zero points are loaded (1 to 4)
    split_k: int = 1
    tail_split: int = 1  # with split_k 1: K splits (at most this many) for the tiles past the last full wave
    steps_per_box: int = 1  # activation steps one TMA box brings (one mbarrier wait and refill a box; stages count boxes)
    words_ahead: int = 1  # chunks ahead that the weight words are loaded (1 or 2)


def default_config(m: int, pw: PackedWeight) -> GemmWgmmaConfig:
    """Up to 256 activation rows one warpgroup on 64 weight rows (140 registers at 64 rows: two or
    three programs per multiprocessor), activation tiles of the rows rounded up to 16, 32, 64, 128 or 256; above 256
    rows two warpgroups on 128 weight rows and 256-row activation tiles. K splits: the most (at most 8, any
    count: :func:`split_fits`) whose programs fill no more than one wave of :func:`programs_per_sm` programs on each
    multiprocessor. H200, steady state, W4 (session 11, probes beside the tables in
    bench/results/kernel_latency_h200.md): 8192^2 at 64 rows 28.8-29.0 us against 33.9 for 128 weight
    rows and 37.0 for 4 splits; at 256 rows 57.6 against 71.7 for 2 splits and 61.7 for 128 weight rows on two
    warpgroups; at 1024 rows 186.3 against 230.6 for 64 weight rows. 4096x14336 at 64 rows: 25.6 without a split,
    31.6 with 2; 14336x4096: 27.4 with 4, 36.2 with 2. Up to 32 rows (session 21, every split count from 1 to 8
    side by side, 14 kinds and shapes): the wave's split won or came within 4% in 26 of 28 cells, where the
    powers of two had lost up to 30% (8192^2 W4 at 32 rows 22.8 us with 3 splits against 29.9 with 4; 14336x4096
    at 32 rows 22.8 with 6 against 28.4 with 8; W1 and W2 at 16 rows 18.1 with 3 against 23.0 and 22.7 with 4).
    The two-warpgroup tiles (one program a multiprocessor)
    split a short last wave's tiles (``tail_split``; 4096x14336 at 1024 rows 4-6% faster, session 14).
    Activation tiles of at most 64 rows come four steps a box, two boxes in flight, where K allows
    (session 14, A/B interleaved, 8192^2 at 64 rows: W4 28.9 us against 29.6, W2 26.9 against 28.9,
    ternary 22.1 against 24.4, W1 25.2 against 27.6; W4 at 16 rows 19.8 against 20.6; 4096x14336 and
    14336x4096 W4 at 64 rows 25.4 against 26.0 and 27.3 against 27.5; at 256 rows two-step boxes lost,
    82.2 against 59.8, and at 128 rows four-step boxes would hold 128 KiB a program: not used there).
    W4 on 64-row activation tiles loads its words two chunks ahead (session 22, side by side: 8192^2 27.7 us
    against 28.5, 14336x4096 25.8 against 28.0, 4096x14336 23.8 against 23.9); everywhere else one chunk ahead won
    (W1, W2, ternary and W3 at 16 to 256 rows up to 70% slower two ahead: the three-chunk loop is three times the
    code; W4 at 16 rows 25.0 against 18.3, at 128 rows 4096x14336 33.2 against 30.5)."""
    if m <= 256:
        block_n, num_warps = 64, 4
        block_m = min(max(16, triton.next_power_of_2(m)), 256)
    else:
        block_n, block_m, num_warps = 128, 256, 8
    tiles = triton.cdiv(pw.n, block_n) * triton.cdiv(m, block_m)
    wave = programs_per_sm(m, pw) * rule_sms(pw.words.device)
    chunks = triton.cdiv(pw.k, pw.chunk)
    split_k = max(s for s in range(1, 9) if s == 1 or (tiles * s <= wave and split_fits(chunks, s)))
    # the two-warpgroup tiles hold a multiprocessor each: a short last wave gets its tiles' K split (tail_tiles)
    tail_split = 4 if num_warps == 8 and split_k == 1 else 1
    ahead = 2 if block_m == 64 and lm.CODE_BITS[pw.layout] == 4 else 1
    config = GemmWgmmaConfig(block_n=block_n, block_m=block_m, num_warps=num_warps, split_k=split_k, tail_split=tail_split,
                             words_ahead=ahead)
    boxed = replace(config, stages=2, steps_per_box=4)
    return boxed if block_m <= 64 and boxes_fit(pw, boxed) else config


def programs_per_sm(m: int, pw: PackedWeight) -> int:
    """The default configs' programs a multiprocessor for the split rule, read off the timings rather than
    computed (session 21, H200, splits 1 to 8 side by side; sessions 11 and 14 for 64 rows and up): W4 on 16-row
    activation tiles 4 (8192^2 19.9 us with 4 splits against 20.4 with 3; 14336x4096 18.6 with 8 against 19.9
    with 6), W3 (two planes, more registers) 2 (8192^2 at 32 rows 26.0 with 2 splits against 32.9 with 3;
    14336x4096 24.5 with 4 against 32.1 with 6), the other kinds up to 32 rows 3 (8192^2 W2 at 16 rows 18.1 with
    3 against 22.7 with 4), every kind at 64 and 128 rows 2, the 256-row tiles 1."""
    bits = lm.CODE_BITS[pw.layout]
    if m <= 16 and bits == 4:
        return 4
    return 3 if m <= 32 and bits != 3 else 2 if m <= 128 else 1


def split_fits(chunks: int, splits: int) -> bool:
    """``splits`` K splits of ``chunks`` chunks (``ceil(chunks / splits)`` each, the last one what is left) give
    every split at least two chunks but the last, and the last at least one."""
    per_split = -(-chunks // splits)
    return per_split >= 2 and (splits - 1) * per_split < chunks


def rule_sms(device: torch.device) -> int:
    """Multiprocessors the split rule fills: the GPU's, or an H100's / H200's 132 off the GPU (CPU tests)."""
    return sm_count(device) if device.type == "cuda" else 132


def boxes_fit(pw: PackedWeight, config: GemmWgmmaConfig) -> bool:
    """K a multiple of a step's span, and ``steps_per_box`` dividing a chunk's steps (a box never spans chunks)."""
    return pw.k % (config.slots_per_step * RUN.value) == 0 and (pw.slots // config.slots_per_step) % config.steps_per_box == 0


# Configs that ``python -m bench.kernel_latency --tune-wgmma`` timed best, by :func:`tuned_key`; they win over
# :func:`default_config` for the rest of that process (and, saved with ``--save-tuned``, in later ones: qkernels.tuned).
TUNED: dict[tuple, GemmWgmmaConfig] = {}


def tuned_key(m: int, pw: PackedWeight) -> tuple:
    """The weight's kind and shape and the batch's bucket (a power of two, at least 16)."""
    return pw.layout, pw.zero is not None, pw.group_size, pw.n, pw.k, max(16, triton.next_power_of_2(m))


def config_for(m: int, pw: PackedWeight) -> GemmWgmmaConfig:
    """A config tuned in this process for this kind, shape and batch bucket, else one saved for this GPU model,
    else :func:`default_config` (those two looked up once per weight and batch)."""
    key = tuned_key(m, pw)
    if key in TUNED:
        return TUNED[key]
    device = pw.words.device
    return pw.memo(("wgmma_config", m, tuned.stamp(device)),
                   lambda: tuned.saved("wgmma", GemmWgmmaConfig, device).get(key) or default_config(m, pw), shared=True)


def check_config(config: GemmWgmmaConfig) -> None:
    problems = []
    if config.num_warps not in (4, 8):
        problems.append(f"num_warps={config.num_warps} (4 or 8)")
    if config.block_n % (16 * config.num_warps):
        problems.append(f"block_n={config.block_n} (a multiple of 16 * num_warps = {16 * config.num_warps})")
    if config.block_m not in (16, 32, 64, 128, 256):
        problems.append(f"block_m={config.block_m} (16, 32, 64, 128 or 256)")
    if config.slots_per_step not in (1, 2):
        problems.append(f"slots_per_step={config.slots_per_step} (1 or 2)")
    if config.group_ahead not in (1, 2, 3, 4):
        problems.append(f"group_ahead={config.group_ahead} (1 to 4)")
    if config.tail_split < 1 or (config.tail_split > 1 and config.split_k > 1):
        problems.append(f"tail_split={config.tail_split} (at least 1; above 1 only with split_k=1, got {config.split_k})")
    if config.steps_per_box not in (1, 2, 4, 8):
        problems.append(f"steps_per_box={config.steps_per_box} (1, 2, 4 or 8)")
    if config.words_ahead not in (1, 2):
        problems.append(f"words_ahead={config.words_ahead} (1 or 2)")
    if config.stages < 2 or config.split_k < 1:
        problems.append(f"stages={config.stages}, split_k={config.split_k} (stages >= 2, split_k >= 1)")
    if problems:
        raise ValueError("bad GemmWgmmaConfig: " + "; ".join(problems))


def tail_tiles(tiles: int, tail_split: int, wave: int) -> tuple[int, int]:
    """Wave quantization: with one program a multiprocessor (``wave`` of them at once), the ``tiles % wave``
    tiles past the last full wave leave the rest of the GPU idle for a whole tile's time. Split their K
    ``tail_split`` ways, or fewer so that the split tail still fits in one wave; returns the tiles that keep
    their whole K (the first ones) and the tail's split (1: no tail)."""
    rest = tiles % wave
    split = min(tail_split, wave // rest) if tiles > wave and rest else 1
    return (tiles - rest, split) if split > 1 else (tiles, 1)


@functools.cache
def sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def gemm_wgmma(x: torch.Tensor, pw: PackedWeight, config: GemmWgmmaConfig | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """``x [M, K] @ W^T`` on wgmma tensor cores, into ``out`` if given."""
    lm.check_inputs(x, pw)
    if not lm.wgmma_fits(pw, x.dtype):
        raise ValueError(f"gemm_wgmma takes fp16 activations, K a multiple of 8 and layouts {lm.UINT_LAYOUTS} with run "
                         f"{RUN.value}; got {x.dtype}, K={pw.k}, {pw.layout}, run {pw.run}")
    if x.data_ptr() % 16 or x.stride(0) % 8:  # TMA reads 16-byte aligned rows
        x = x.clone(memory_format=torch.contiguous_format)
    m = x.shape[0]
    config = config or config_for(m, pw)
    check_config(config)
    y = lm.output(out, (m, pw.n), x)
    words, high, scale, zero = lm.kernel_tensors(pw)
    if config.steps_per_box > 1 and not boxes_fit(pw, config):
        raise ValueError(f"steps_per_box={config.steps_per_box} needs K a multiple of {config.slots_per_step * RUN.value} (got {pw.k}) "
                         f"and to divide the {pw.slots // config.slots_per_step} steps of a chunk; use steps_per_box=1 here")
    if not lm.is_hopper(x.device) or pw.words.device != x.device:
        raise ValueError(f"gemm_wgmma runs on a Hopper GPU (compute capability 9.x) with the weight on the activations' device; got x "
                         f"on {x.device}, the weight on {pw.words.device}")
    tiles_n = triton.cdiv(pw.n, config.block_n)
    tiles = tiles_n * triton.cdiv(m, config.block_m)
    n_full, tail_split = tail_tiles(tiles, config.tail_split, sm_count(x.device))
    splits = max(config.split_k, tail_split)
    partial, count = lm.split_buffers(y, (tiles, 1, splits), config.block_n * config.block_m)
    grid = (n_full * config.split_k + (tiles - n_full) * tail_split,)
    _gemm_wgmma_kernel[grid](
        x_descriptor(x, pw, config), words, high, scale, zero, y, partial, count, m, pw.n, words.shape[1] // pw.run, pw.n_groups,
        *scale.stride(), pw.zero_const, words.stride(0), high.stride(0), y.stride(0), tiles_n, tiles, n_full, tail_split,
        **launch_constants(pw, config, splits, triton.cdiv(m, config.block_m)),
    )
    return y


def x_descriptor(x: torch.Tensor, pw: PackedWeight, config: GemmWgmmaConfig) -> TensorDescriptor:
    """The activations' TMA descriptor: boxes ``[BLOCK_M, span]`` of a step's K span, or with ``steps_per_box`` > 1 x
    seen as ``[K / span, M, span]`` and boxes of that many step tiles, each laid out as the 2-D box would be."""
    span = config.slots_per_step * RUN.value  # K of a step
    if config.steps_per_box == 1:
        box = [config.block_m, span]
        return TensorDescriptor(x, list(x.shape), list(x.stride()), box, gl.NVMMASharedLayout.get_default_for(box, gl.float16))
    box = [config.steps_per_box, config.block_m, span]
    layout = gl.NVMMASharedLayout(swizzle_byte_width=2 * span, element_bitwidth=16, rank=3)  # as get_default_for's 2-D one
    return TensorDescriptor(x, [pw.k // span, x.shape[0], span], [span, x.stride(0), 1], box, layout)


def launch_constants(pw: PackedWeight, config: GemmWgmmaConfig, splits: int, m_tiles: int = 1) -> dict:
    """The kernel's compile-time constants (and warps) for ``config`` with ``splits`` K splits of the tail tiles and
    ``m_tiles`` activation tiles along the batch (also what :mod:`qkernels.compile_check` compiles without a GPU)."""
    return dict(
        BITS=lm.CODE_BITS[pw.layout], SLOTS=pw.slots, SPG=pw.group_size // pw.run, HAS_ZERO=pw.zero is not None, INT_ZERO=pw.zero_grid == 1.0,
        BLOCK_N=config.block_n, BLOCK_M=config.block_m, STAGES=config.stages, SPS=config.slots_per_step, GAHEAD=config.group_ahead,
        SPLIT_K=config.split_k, SPLITS=splits, NUM_WARPS=config.num_warps, GROUP=config.steps_per_box, WAHEAD=config.words_ahead, ONCE=m_tiles == 1,
        num_warps=config.num_warps,
    )

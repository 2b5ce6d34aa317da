"""Warp-specialized low-bit GEMM for batches of up to 64 rows on Hopper (Gluon): ``y^T = W x^T`` for fp16
activations and the ``uint1``/``uint2``/``uint4`` layouts with a run of 32.

The batch fits one ``wgmma`` N (``BLOCK_M``: the rows rounded up to 16, 32 or 64), so every program of a K
split reads the same activations and the weights are the A operand: a program takes ``BLOCK_N`` weight rows
(64, 128 or 256: one consumer warpgroup per 64) and one K split, in *units* of 256 K (eight slots of 32):

* A producer warp brings each unit's activation box (four ``[BLOCK_M, 64]`` step tiles, the activations seen as
  ``[K / 64, M, 64]``) and, at a chunk's first unit, the chunk's words (``[BLOCK_N, 32]`` int32) by TMA into a
  ring of ``STAGES`` buffers, each with a ``full`` and an ``empty`` mbarrier. Rows past ``M`` or ``N`` and
  columns past ``K`` read as zeros.
* The consumer warpgroups share each box: they load a chunk's words from shared memory into the A operand's
  register layout, decode two slots a step with the wgmma GEMM's asm (:func:`qkernels.gemm_wgmma._slot_weights`:
  ``(code - zero) * scale`` in fp16) and issue the step's two wgmmas, one step in flight (its A registers held
  until the wait that retires it). A unit's buffer goes back to the producer at the next unit's first step, once
  its last step has retired. The group values (scales, zero points) are loaded ``values_ahead`` units ahead, or
  (``values_tma``, the default where the values' rows are 16-byte aligned) come with the unit's buffer: the producer
  adds a box of the unit's groups of the group-major scales and zero points (``[groups, BLOCK_N]``) to each buffer,
  and the consumers read their rows from shared memory (no global loads or address arithmetic in the loop: 349
  instructions a unit in the sm_90 build of W4 at 128 rows and 4 stages, against 389; the prototype without values
  had 333), at 1 KiB more a buffer. The consumers are one partition (the default), or with ``apart`` one partition
  of four warps per 64 weight rows, each with its own sub-tile of the output and its own barriers: Gluon puts
  partition-wide barriers around every mbarrier wait and arrive, which in one partition hold the warpgroups in step
  (both decoding, then both issuing wgmmas) where apart they could drift into each other's gaps.
* ptxas keeps the wgmmas asynchronous only in some builds (:func:`qkernels.compile_check.wgmma_serialized` reads its
  note; the compile-check test fails on a serialized build): with one K split (and with ``values_tma`` at two) the
  accumulators' zeros were set on a branch around an empty loop, so no launched split is empty (:func:`launch_splits`)
  and the loop tells the compiler it runs at least once; with ``apart`` a consumer warpgroup
  in the default partition had "insufficient register resources", so there the producer is the default partition
  (four warps, one working) and both consumer warpgroups are workers.
* Split-K as in :mod:`qkernels.gemm_wgmma`: the partial sums in the accumulator's layout, the last split to
  finish adds them in split order (no atomics on ``y``, the same bits every run) and resets its counter.

Session 25, H200, steady state, 64 rows (bench/results/kernel_latency_h200.md): session 24's prototype of this loop
(no scales, no reduction) took W4 8192^2 in 18.8 us with 128 weight rows, 4 stages and 2 splits, against the wgmma
GEMM's 25.4 and cuBLAS fp16's 37.0; with the group values and the reduction, one consumer partition, this kernel
takes 25.2 (1.44x cuBLAS), no faster than the wgmma GEMM: the values' loads and their packing cost 3.0 us
(``novalues``) and the reduction's reads 2.2 (``noreduce``). Session 26 (no GPU lent) found that every
build with one K split had its wgmmas serialized, so session 25's one-split cells (4096x14336 at 64 rows: 25.2 us
against the wgmma GEMM's 21.5) timed that serialized build; the two-split ones (8192^2, 14336x4096) did not.

Session 27, H200, side by side: the values by TMA took the kernel 6.5-20% faster at 64 rows (``bench.config_ab --path
wgmma_ws``, W4 and W2 at 8192^2, 14336x4096 and 4096x14336: W4 8192^2 23.6 us against 25.5, W2 4096x14336 17.8
against 21.5), ``apart`` 4-7% (with the values by TMA no faster than without it: off); so ``values_tma`` is the default
(:func:`default_config`), and with it the kernel beat the wgmma GEMM at 24-64 rows in every grouped W4, W2 and W1
cell of six shapes from 4096x14336 to 16384^2, 54 cells (at 64 rows, 8192^2: W4 23.2 us against 25.3, 1.57x cuBLAS
fp16; W2 21.9 against 24.7; W1 21.2 against 25.7) and lost at 16 rows and at 4096^2; the dispatcher picks it where it won
(:func:`qkernels.lowbit_matmul.wgmma_ws_preferred`).

Gluon has no interpreter: off the GPU the tests check the rules and the argument checks (:mod:`qkernels.compile_check`
compiles the kernel for sm_90), on a Hopper GPU the kernel against the fp32 reference.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, warpgroup_mma, warpgroup_mma_wait
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from qkernels import lowbit_matmul as lm
from qkernels.gemm_wgmma import RUN, _group_values, _slot_weights, _store_split, _store_tile, sm_count, split_fits
from qkernels.gemv_mma import _by_group
from qkernels.gluon_compat import async_load, reinterpret
from qkernels.pack import PackedWeight

UNIT = gl.constexpr(256)  # K of a unit: eight slots, four 64-K step tiles in one activation box
STEP = gl.constexpr(64)
STEPS = gl.constexpr(UNIT.value // STEP.value)
LAYOUTS = ("uint1", "uint2", "uint4")
MAX_M = 64
SMEM = 227 * 1024  # an H100's / H200's shared memory a block


@gluon.constexpr_function
def _value_box_bytes(box_bytes, has_zero, vtma):
    """A unit's group-value bytes by TMA: the scales' box and the zero points' (none without ``VTMA``)."""
    return box_bytes * (2 if has_zero else 1) if vtma else 0


@gluon.jit
def _producer(x_desc, w_desc, s_desc, z_desc, xs, ws, ss, zs, full, empty, first, n_chunks, off_n, UNITS: gl.constexpr,
              STAGES: gl.constexpr, GROUP_SIZE: gl.constexpr, VTMA: gl.constexpr, HAS_ZERO: gl.constexpr):
    """One warp: unit ``u``'s activation box (and at a chunk's first unit the chunk's words; with ``VTMA`` its group
    values, ``[groups, BLOCK_N]`` boxes of the group-major scales and zero points) into buffer ``u % STAGES`` once the
    consumers have freed it."""
    X_BYTES: gl.constexpr = x_desc.block_type.nbytes
    W_BYTES: gl.constexpr = w_desc.block_type.nbytes
    V_BYTES: gl.constexpr = _value_box_bytes(s_desc.block_type.nbytes, HAS_ZERO, VTMA)
    for u in range(n_chunks * UNITS):
        s = u % STAGES
        mbarrier.wait(empty.index(s), ((u // STAGES) & 1) ^ 1)  # (a fresh barrier passes the first round)
        words_too = u % UNITS == 0
        if UNITS == 1:
            mbarrier.expect(full.index(s), X_BYTES + W_BYTES + V_BYTES)
        else:
            mbarrier.expect(full.index(s), X_BYTES + W_BYTES + V_BYTES, pred=words_too)
            mbarrier.expect(full.index(s), X_BYTES + V_BYTES, pred=u % UNITS != 0)
        async_load(x_desc, [(first * UNITS + u) * STEPS, 0, 0], full.index(s), xs.index(s))
        async_load(w_desc, [off_n, (first + u // UNITS) * RUN], full.index(s), ws.index(s), pred=words_too)
        if VTMA:  # the unit's first group (past the last one: zeros, read only against zero activations)
            group = (first * UNITS + u) * UNIT // GROUP_SIZE
            async_load(s_desc, [group, off_n], full.index(s), ss.index(s))
            if HAS_ZERO:
                async_load(z_desc, [group, off_n], full.index(s), zs.index(s))


@gluon.jit
def _unit_values(values, k, GROUP_SIZE: gl.constexpr, HAS_ZERO: gl.constexpr, GPU: gl.constexpr):
    """The scale and zero point of each of a unit's four steps (the unit at K ``k``): ``GPU`` groups a unit
    (1, 2 or 4), each loaded once."""
    scale_ptr, zero_ptr, rows, row_ok, n_groups, stride_sn, stride_sg, zero_const = values
    s0, z0 = _group_values(scale_ptr, zero_ptr, rows, row_ok, k, n_groups, stride_sn, stride_sg, zero_const, GROUP_SIZE, HAS_ZERO)
    s1, z1 = s0, z0
    s2, z2 = s0, z0
    s3, z3 = s0, z0
    if GPU >= 2:
        s2, z2 = _group_values(scale_ptr, zero_ptr, rows, row_ok, k + 2 * STEP, n_groups, stride_sn, stride_sg, zero_const, GROUP_SIZE,
                               HAS_ZERO)
        s3, z3 = s2, z2
    if GPU == 4:
        s1, z1 = _group_values(scale_ptr, zero_ptr, rows, row_ok, k + STEP, n_groups, stride_sn, stride_sg, zero_const, GROUP_SIZE,
                               HAS_ZERO)
        s3, z3 = _group_values(scale_ptr, zero_ptr, rows, row_ok, k + 3 * STEP, n_groups, stride_sn, stride_sg, zero_const, GROUP_SIZE,
                               HAS_ZERO)
    return s0, z0, s1, z1, s2, z2, s3, z3


@gluon.jit
def _ring_group(ss, zs, s, g: gl.constexpr, GPU: gl.constexpr, LOCAL: gl.constexpr, ROWS: gl.constexpr, zero_const,
                HAS_ZERO: gl.constexpr, rows_layout: gl.constexpr):
    """Group ``g`` of buffer ``s``'s values (``VTMA``; the ring's groups as rows ``s * GPU + g``), this partition's rows:
    fp16 scale and zero point ``[ROWS, 1]``."""
    scale = ss.index(s * GPU + g).slice(LOCAL, ROWS).load(rows_layout).to(gl.float16)
    if HAS_ZERO:
        zero = zs.index(s * GPU + g).slice(LOCAL, ROWS).load(rows_layout).to(gl.float16)
    else:
        zero = (gl.zeros_like(scale) + zero_const).to(gl.float16)
    return scale[:, None], zero[:, None]


@gluon.jit
def _ring_values(ss, zs, s, LOCAL: gl.constexpr, ROWS: gl.constexpr, zero_const, GPU: gl.constexpr, HAS_ZERO: gl.constexpr,
                 rows_layout: gl.constexpr):
    """:func:`_unit_values` from the ring (``VTMA``): the scale and zero point of each of the unit's four steps, from
    buffer ``s``'s ``GPU`` groups."""
    s0, z0 = _ring_group(ss, zs, s, 0, GPU, LOCAL, ROWS, zero_const, HAS_ZERO, rows_layout)
    s1, z1 = s0, z0
    s2, z2 = s0, z0
    s3, z3 = s0, z0
    if GPU >= 2:
        s2, z2 = _ring_group(ss, zs, s, GPU // 2, GPU, LOCAL, ROWS, zero_const, HAS_ZERO, rows_layout)
        s3, z3 = s2, z2
    if GPU == 4:
        s1, z1 = _ring_group(ss, zs, s, 1, GPU, LOCAL, ROWS, zero_const, HAS_ZERO, rows_layout)
        s3, z3 = _ring_group(ss, zs, s, 3, GPU, LOCAL, ROWS, zero_const, HAS_ZERO, rows_layout)
    return s0, z0, s1, z1, s2, z2, s3, z3


@gluon.jit
def _consumers(ring, group_args, out_args, first, n_chunks, pid_n, split, BITS: gl.constexpr, UNITS: gl.constexpr,
               GROUP_SIZE: gl.constexpr, GPU: gl.constexpr, HAS_ZERO: gl.constexpr, INT_ZERO: gl.constexpr, BLOCK_N: gl.constexpr,
               ROWS: gl.constexpr, LOCAL: gl.constexpr, BLOCK_M: gl.constexpr, STAGES: gl.constexpr, SPLIT_K: gl.constexpr,
               VAHEAD: gl.constexpr, VTMA: gl.constexpr, NUM_WARPS: gl.constexpr):
    """A consumer partition on rows ``LOCAL`` to ``LOCAL + ROWS`` of the program's ``BLOCK_N`` (its own sub-tile of the
    output): every unit's four steps (two slots, two wgmmas each), then the sub-tile's store or its split's partial
    sums (the last split to arrive adds them all in split order and stores). The group values come ``VAHEAD`` units
    ahead from global memory, or (``VTMA``) with the unit's buffer."""
    xs, ws, ss, zs, full, empty = ring
    scale_ptr, zero_ptr, n_groups, stride_sn, stride_sg, zero_const = group_args
    y_ptr, partial_ptr, count_ptr, M, N, stride_ym = out_args
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NUM_WARPS, 1], instr_shape=[16, BLOCK_M, 16])
    a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)
    CHUNK: gl.constexpr = UNITS * UNIT
    off_n = pid_n * BLOCK_N + LOCAL
    rows = off_n + gl.arange(0, ROWS, layout=gl.SliceLayout(1, a_layout))
    values = (scale_ptr, zero_ptr, rows, rows < N, n_groups, stride_sn, stride_sg, zero_const)
    tiles = reinterpret(xs, gl.float16, [STAGES * STEPS, BLOCK_M, STEP],
                        gl.NVMMASharedLayout(swizzle_byte_width=2 * STEP, element_bitwidth=16, rank=2))
    k0 = first * CHUNK
    gl.assume(n_chunks > 0)  # (no split is empty: launch_splits; else ptxas may set the zeros on a branch around the loop and serialize the wgmmas)
    if not VTMA:
        nxt = _unit_values(values, k0, GROUP_SIZE, HAS_ZERO, GPU)
        after = nxt
        if VAHEAD == 2:
            after = _unit_values(values, k0 + UNIT, GROUP_SIZE, HAS_ZERO, GPU)
    acc = gl.zeros([ROWS, BLOCK_M], gl.float32, mma)
    held0 = gl.zeros([ROWS, RUN], gl.float16, a_layout)
    held1 = gl.zeros([ROWS, RUN], gl.float16, a_layout)
    words = gl.zeros([ROWS, RUN], gl.int32, a_layout)
    for c in range(n_chunks):
        for sub in gl.static_range(UNITS):
            u = c * UNITS + sub
            s = u % STAGES
            if VTMA:
                mbarrier.wait(full.index(s), (u // STAGES) & 1)
                cur = _ring_values(ss, zs, s, LOCAL, ROWS, zero_const, GPU, HAS_ZERO, gl.SliceLayout(1, a_layout))
            else:
                cur = nxt
                if VAHEAD == 2:  # (past the split: unused)
                    nxt = after
                    after = _unit_values(values, k0 + (u + 2) * UNIT, GROUP_SIZE, HAS_ZERO, GPU)
                else:
                    nxt = _unit_values(values, k0 + (u + 1) * UNIT, GROUP_SIZE, HAS_ZERO, GPU)
                mbarrier.wait(full.index(s), (u // STAGES) & 1)
            if sub == 0:
                words = ws.index(s).slice(LOCAL, ROWS, dim=0).load(a_layout)
            for step in gl.static_range(STEPS):
                tile = tiles.index(s * STEPS + step)
                scale = cur[2 * step]
                zero = cur[2 * step + 1]
                a0 = _slot_weights(words, scale, zero, sub * 8 + 2 * step, BITS, INT_ZERO)
                acc = warpgroup_mma(a0, tile.slice(0, RUN, dim=1).permute((1, 0)), acc, is_async=True)
                a1 = _slot_weights(words, scale, zero, sub * 8 + 2 * step + 1, BITS, INT_ZERO)
                acc = warpgroup_mma(a1, tile.slice(RUN, RUN, dim=1).permute((1, 0)), acc, is_async=True)
                acc, held0, held1 = warpgroup_mma_wait(num_outstanding=2, deps=(acc, held0, held1))  # the previous step retires
                held0 = a0
                held1 = a1
                if step == 0:  # the previous unit's last step has retired: this partition is done with its buffer
                    mbarrier.arrive(empty.index((u + STAGES - 1) % STAGES), count=1, pred=u > 0)
    acc, held0, held1 = warpgroup_mma_wait(num_outstanding=0, deps=(acc, held0, held1))
    if SPLIT_K == 1:
        _store_tile(y_ptr, acc, M, N, 0, off_n, stride_ym, ROWS, BLOCK_M, NUM_WARPS)
    else:  # a sub-tile of its own for each consumer partition: its partial sums, and the last split adds them up
        PARTS: gl.constexpr = BLOCK_N // ROWS
        _store_split(acc, y_ptr, partial_ptr, count_ptr, M, N, 0, off_n, stride_ym, split, SPLIT_K, pid_n * PARTS + LOCAL // ROWS,
                     gl.num_programs(0) * PARTS, mma, ROWS, BLOCK_M, NUM_WARPS)


@gluon.jit
def _gemm_ws_kernel(
    x_desc, w_desc, s_desc, z_desc, scale_ptr, zero_ptr, y_ptr, partial_ptr, count_ptr, M, N, n_chunks_total, n_groups, stride_sn,
    stride_sg, zero_const, stride_ym,
    BITS: gl.constexpr, GROUP_SIZE: gl.constexpr, HAS_ZERO: gl.constexpr, INT_ZERO: gl.constexpr, BLOCK_N: gl.constexpr,
    BLOCK_M: gl.constexpr, STAGES: gl.constexpr, SPLIT_K: gl.constexpr, VAHEAD: gl.constexpr, VTMA: gl.constexpr, APART: gl.constexpr,
    NUM_WARPS: gl.constexpr,
):
    """Program (tile along N, K split): the ring, its barriers and the partitions: the consumers as the default partition
    of ``BLOCK_N / 16`` warps and the producer warp a worker on 40 registers; or (``APART``, 128 rows) the producer as
    the default partition (four warps, 40 registers) and two consumer workers of four warps (232 registers each), each
    on its own 64-row sub-tile with its own barriers (no warpgroup waits on the other's). With ``VTMA`` the ring also
    holds each unit's group values (``s_desc``, ``z_desc``: boxes of the group-major scales and zero points); else those
    descriptors are stand-ins and the consumers load the values themselves."""
    UNITS: gl.constexpr = 32 // BITS // 8  # units a chunk (32 // BITS slots of 32 K)
    GPU: gl.constexpr = UNIT // GROUP_SIZE if GROUP_SIZE < UNIT else 1
    ROWS: gl.constexpr = 64 if APART else BLOCK_N
    pid_n = gl.program_id(0)
    split = gl.program_id(1)
    per_split = gl.cdiv(n_chunks_total, SPLIT_K)
    first = split * per_split
    n_chunks = gl.maximum(gl.minimum(first + per_split, n_chunks_total) - first, 0)
    xs = gl.allocate_shared_memory(gl.float16, [STAGES, STEPS, BLOCK_M, STEP], x_desc.layout)
    ws = gl.allocate_shared_memory(gl.int32, [STAGES, BLOCK_N, RUN], w_desc.layout)
    ss, zs, ss_rows, zs_rows = xs, xs, xs, xs  # (stand-ins without VTMA)
    if VTMA:  # the ring's group values, and the same bytes as plain rows for the consumers' loads
        rows_view: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [0])  # (group g of buffer s: row s * GPU + g)
        ss = gl.allocate_shared_memory(s_desc.dtype, [STAGES, GPU, BLOCK_N], s_desc.layout)
        ss_rows = reinterpret(ss, s_desc.dtype, [STAGES * GPU, BLOCK_N], rows_view)
        zs, zs_rows = ss, ss_rows
        if HAS_ZERO:
            zs = gl.allocate_shared_memory(z_desc.dtype, [STAGES, GPU, BLOCK_N], z_desc.layout)
            zs_rows = reinterpret(zs, z_desc.dtype, [STAGES * GPU, BLOCK_N], rows_view)
    full = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for s in gl.static_range(STAGES):
        mbarrier.init(full.index(s), count=1)
        mbarrier.init(empty.index(s), count=BLOCK_N // ROWS)  # one arrival per consumer partition
    ring = (xs, ws, ss_rows, zs_rows, full, empty)
    group_args = (scale_ptr, zero_ptr, n_groups, stride_sn, stride_sg, zero_const)
    out_args = (y_ptr, partial_ptr, count_ptr, M, N, stride_ym)
    # (the partitions' arguments stay literal tuples: on triton 3.9 constexprs in a tuple kept in a variable reach a
    # worker as runtime values, so its constexpr branches were no longer pruned)
    if BLOCK_N == ROWS:
        gl.warp_specialize([
            (_consumers, (ring, group_args, out_args, first, n_chunks, pid_n, split, BITS, UNITS, GROUP_SIZE, GPU, HAS_ZERO, INT_ZERO,
                          BLOCK_N, ROWS, 0, BLOCK_M, STAGES, SPLIT_K, VAHEAD, VTMA, NUM_WARPS)),
            (_producer, (x_desc, w_desc, s_desc, z_desc, xs, ws, ss, zs, full, empty, first, n_chunks, pid_n * BLOCK_N, UNITS, STAGES,
                         GROUP_SIZE, VTMA, HAS_ZERO))], [1], [40])
    else:  # apart, 128 rows: the producer as the default partition (four warps, one of them working), each consumer warpgroup a worker
        gl.warp_specialize([
            (_producer, (x_desc, w_desc, s_desc, z_desc, xs, ws, ss, zs, full, empty, first, n_chunks, pid_n * BLOCK_N, UNITS, STAGES,
                         GROUP_SIZE, VTMA, HAS_ZERO)),
            (_consumers, (ring, group_args, out_args, first, n_chunks, pid_n, split, BITS, UNITS, GROUP_SIZE, GPU, HAS_ZERO, INT_ZERO,
                          BLOCK_N, ROWS, 0, BLOCK_M, STAGES, SPLIT_K, VAHEAD, VTMA, NUM_WARPS)),
            (_consumers, (ring, group_args, out_args, first, n_chunks, pid_n, split, BITS, UNITS, GROUP_SIZE, GPU, HAS_ZERO, INT_ZERO,
                          BLOCK_N, ROWS, 64, BLOCK_M, STAGES, SPLIT_K, VAHEAD, VTMA, NUM_WARPS))], [4, 4], [232, 232])


@dataclass(frozen=True)
class GemmWsConfig:
    block_n: int = 128  # weight rows a program: 64, 128 or 256 (a consumer warpgroup per 64)
    stages: int = 4  # units in the ring
    split_k: int = 1
    values_ahead: int = 2  # units ahead that the group values are loaded (1 or 2)
    apart: bool = False  # a consumer partition per 64 weight rows, block_n 64 or 128 (else one; session 27: no gain with values_tma)
    values_tma: bool = False  # the group values by TMA with each unit's buffer (values_ahead unused; default_config's where it fits)


def ws_fits(pw: PackedWeight, dtype: torch.dtype, m: int) -> bool:
    """What the kernel takes: fp16 activations, at most 64 rows, the ``uint1``/``uint2``/``uint4`` layouts with a
    run of 32, K a multiple of 64 (the activations' step tiles), and groups that divide a unit's four step tiles
    (64, 128, 256 K) or cover whole units."""
    gs = pw.group_size
    groups_ok = (gs < UNIT.value and UNIT.value % gs == 0 and gs >= STEP.value) or gs % UNIT.value == 0 or pw.n_groups == 1
    return (lm.HAS_GLUON and dtype == torch.float16 and 1 <= m <= MAX_M and pw.layout in LAYOUTS and pw.run == RUN.value
            and pw.k % STEP.value == 0 and groups_ok)


def block_m_for(m: int) -> int:
    return max(16, triton.next_power_of_2(m))


def stage_bytes(block_n: int, block_m: int, values: int = 0) -> int:
    """Shared memory a ring buffer: the activation box, a chunk's words and ``values`` bytes of group values."""
    return STEPS.value * block_m * STEP.value * 2 + block_n * RUN.value * 4 + values


def groups_per_unit(pw: PackedWeight) -> int:
    return UNIT.value // pw.group_size if pw.group_size < UNIT.value else 1


def values_bytes(pw: PackedWeight, config: GemmWsConfig) -> int:
    """A ring buffer's group values with ``values_tma``: a unit's groups of scales (and zero points) for ``block_n`` rows."""
    if not config.values_tma:
        return 0
    return groups_per_unit(pw) * config.block_n * pw.scale.element_size() * (2 if pw.zero is not None else 1)


def values_tma_fits(pw: PackedWeight) -> bool:
    """TMA reads the group-major scales and zero points (``[n_groups, N]``) where their rows are 16-byte aligned."""
    _, _, scale, zero = lm.kernel_tensors(pw)
    aligned = lambda t: t.data_ptr() % 16 == 0 and _by_group(t)[1][1] == 1 and _by_group(t)[1][0] * t.element_size() % 16 == 0  # noqa: E731
    return aligned(scale) and aligned(zero)


def value_descriptors(pw: PackedWeight, block_n: int) -> tuple[TensorDescriptor, TensorDescriptor]:
    """The group-major scales and zero points ``[n_groups, N]`` in boxes of a unit's groups by ``block_n`` rows (plain rows,
    no swizzle; past the last group or row: zeros)."""
    _, _, scale, zero = lm.kernel_tensors(pw)
    box = [groups_per_unit(pw), block_n]
    layout = gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=8 * scale.element_size(), rank=2)
    return tuple(TensorDescriptor(t, *_by_group(t), box, layout) for t in (scale, zero))


def epilogue_bytes(block_n: int, block_m: int) -> int:
    """Shared memory beside the ring, at most: the store's change of layout (the tile in fp16; session 26, sm_90 build
    of 128 rows at 64 batch rows, 4 stages: 200772 bytes a program in all, against 229444 when the tile moved in fp32)."""
    return block_n * block_m * 2


def default_config(m: int, pw: PackedWeight) -> GemmWsConfig:
    """128 weight rows (two consumer warpgroups), four units in the ring, and the most K splits (at most 8, each
    at least two chunks but the last: :func:`split_fits`) whose programs fill one wave at the programs a
    multiprocessor that the shared memory leaves. Session 25 (H200, 64 rows): session 24's prototype of the loop
    (no scales, no reduction) had this rule's configs best of 36 a shape at 8192^2 (2 splits, 18.8 us), 14336x4096
    (4 splits, 17.0) and 4096x14336 (1 split, 18.1), 2 stages instead of 4 taking 1.14x-2.01x the time; this kernel,
    W4 and W2 at the same shapes against six variants: the rule best or within 1% in four of six cells (values one
    unit ahead 25.2 us against 25.7 at W4 4096x14336, 3 stages 24.3 against 25.2 at W2 14336x4096); other split
    counts, 64-row tiles and 256-row tiles on 2 stages ran at 0.31x-0.88x the rule's speed; the values one unit
    ahead 2.0-4.4% slower in the other five cells. The group values by TMA where their rows allow it
    (:func:`values_tma_fits`; session 27: 6.5-20% faster in those six cells), the ring's room counted with them. Session
    28, with them, W4, W2 and W1 at 32 and 64 rows, three shapes: this rule fastest or within 1% in all 18 cells against
    3 stages, one split, 64-row tiles and the values by loads."""
    block_n, stages = 128, 4
    block_m = block_m_for(m)
    config = GemmWsConfig(block_n=block_n, stages=stages, values_tma=values_tma_fits(pw))
    stage = stage_bytes(block_n, block_m, values_bytes(pw, config))
    per_sm = max(1, SMEM // (stages * stage + epilogue_bytes(block_n, block_m)))
    tiles = triton.cdiv(pw.n, block_n)
    wave = per_sm * (sm_count(pw.words.device) if pw.words.is_cuda else 132)
    chunks = triton.cdiv(pw.k, pw.chunk)
    split_k = max(s for s in range(1, 9) if s == 1 or (tiles * s <= wave and split_fits(chunks, s)))
    return replace(config, split_k=split_k)


def check_config(config: GemmWsConfig, block_m: int, values: int = 0) -> None:
    """A clear error for a config the kernel cannot run (``values``: a ring buffer's group-value bytes, with
    ``values_tma``)."""
    problems = []
    if config.block_n not in (64, 128, 256):
        problems.append(f"block_n={config.block_n} (64, 128 or 256)")
    room = SMEM - epilogue_bytes(config.block_n, block_m)
    stage = stage_bytes(config.block_n, block_m, values)
    if config.stages < 2 or config.stages * stage > room:
        problems.append(f"stages={config.stages} (at least 2, and the ring within {room} bytes of shared memory: "
                        f"{stage} a stage at block_n={config.block_n}, {block_m} activation rows)")
    if config.split_k < 1:
        problems.append(f"split_k={config.split_k} (at least 1)")
    if config.values_ahead not in (1, 2):
        problems.append(f"values_ahead={config.values_ahead} (1 or 2)")
    if config.apart and config.block_n == 256:
        problems.append("apart=True with block_n=256 (apart takes 64 or 128 rows: two consumer partitions at most)")
    if problems:
        raise ValueError("bad GemmWsConfig: " + "; ".join(problems))


def descriptors(x: torch.Tensor, words: torch.Tensor, block_n: int, block_m: int) -> tuple[TensorDescriptor, TensorDescriptor]:
    """The activations as ``[K / 64, M, 64]`` step tiles (a unit's four in one box) and the words ``[N, K_words]`` in
    ``[block_n, 32]`` boxes."""
    m, k = x.shape
    step = STEP.value
    x_layout = gl.NVMMASharedLayout(swizzle_byte_width=2 * step, element_bitwidth=16, rank=3)
    x_desc = TensorDescriptor(x, [k // step, m, step], [step, x.stride(0), 1], [STEPS.value, block_m, step], x_layout)
    w_layout = gl.NVMMASharedLayout.get_default_for([block_n, RUN.value], gl.int32)
    w_desc = TensorDescriptor(words, list(words.shape), list(words.stride()), [block_n, RUN.value], w_layout)
    return x_desc, w_desc


def launch_splits(pw: PackedWeight, config: GemmWsConfig) -> int:
    """The K splits a launch runs: ``split_k`` of them, but none empty (``ceil(chunks / split_k)`` chunks each, so with
    few chunks the last splits would get none; an empty split only added zeros to the sum, so dropping it changes no
    bit of the result). The kernel then tells the compiler its loop runs at least once: with an empty-loop path ptxas
    had serialized the wgmmas of every one-split build (session 26)."""
    chunks = pw.words.shape[1] // RUN.value
    return triton.cdiv(chunks, triton.cdiv(chunks, config.split_k))


def launch_constants(pw: PackedWeight, config: GemmWsConfig, block_m: int) -> dict:
    """The kernel's compile-time constants and warps (also what :mod:`qkernels.compile_check` compiles)."""
    warps = 4 if config.apart else config.block_n // 16
    return dict(BITS=lm.CODE_BITS[pw.layout], GROUP_SIZE=pw.group_size, HAS_ZERO=pw.zero is not None,
                INT_ZERO=pw.zero_grid == 1.0, BLOCK_N=config.block_n, BLOCK_M=block_m, STAGES=config.stages, SPLIT_K=launch_splits(pw, config),
                VAHEAD=config.values_ahead, VTMA=config.values_tma, APART=config.apart, NUM_WARPS=warps, num_warps=warps)


def gemm_ws(x: torch.Tensor, pw: PackedWeight, config: GemmWsConfig | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """``x [M, K] @ W^T`` (M at most 64) by the warp-specialized kernel, into ``out`` if given."""
    lm.check_inputs(x, pw)
    m = x.shape[0]
    if not ws_fits(pw, x.dtype, m):
        raise ValueError(f"gemm_ws takes fp16 activations, 1 to {MAX_M} rows, K a multiple of {STEP.value}, layouts {LAYOUTS} with run "
                         f"{RUN.value} and groups of 64, 128 or a multiple of {UNIT.value} K; got {x.dtype}, M={m}, K={pw.k}, {pw.layout}, "
                         f"run {pw.run}, group {pw.group_size}")
    if x.data_ptr() % 16 or x.stride(0) % 8:  # TMA reads 16-byte aligned rows
        x = x.clone(memory_format=torch.contiguous_format)
    block_m = block_m_for(m)
    config = config or default_config(m, pw)
    check_config(config, block_m, values_bytes(pw, config))
    if config.values_tma and not values_tma_fits(pw):
        raise ValueError("gemm_ws with values_tma=True reads the scales and zero points by TMA: they must be group-major with 16-byte "
                         f"aligned rows (N a multiple of {16 // pw.scale.element_size()}); got N={pw.n}, scale strides {pw.scale.stride()}")
    if not lm.is_hopper(x.device) or pw.words.device != x.device:
        raise ValueError(f"gemm_ws runs on a Hopper GPU (compute capability 9.x) with the weight on the activations' device; got x on "
                         f"{x.device}, the weight on {pw.words.device}")
    y = lm.output(out, (m, pw.n), x)
    words, _, scale, zero = lm.kernel_tensors(pw)
    tiles = triton.cdiv(pw.n, config.block_n)
    parts = config.block_n // 64 if config.apart else 1  # the output sub-tiles a program (a counter each)
    splits = launch_splits(pw, config)
    partial, count = lm.split_buffers(y, (tiles * parts, 1, splits), config.block_n // parts * block_m)
    x_desc, w_desc = descriptors(x, words, config.block_n, block_m)
    s_desc, z_desc = value_descriptors(pw, config.block_n) if config.values_tma else (x_desc, x_desc)  # (stand-ins: unused)
    _gemm_ws_kernel[(tiles, splits)](
        x_desc, w_desc, s_desc, z_desc, scale, zero, y, partial, count, m, pw.n, words.shape[1] // RUN.value, pw.n_groups, *scale.stride(), pw.zero_const,
        y.stride(0), **launch_constants(pw, config, block_m),
    )
    return y

"""Packing and the low-bit matmul kernels against their torch references.

Without a GPU the kernels run through the Triton interpreter (set below, before the kernels are
decorated), at tiny ragged shapes. Every check draws fresh random codes, scales, zero points and
activations, and poisons the output with NaN first, so an element the kernel never writes fails.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import weakref
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

from qkernels import lowbit_matmul as lm  # noqa: E402
from qkernels.pack import (  # noqa: E402
    LAYOUTS,
    PackError,
    choose_run,
    dequantize_packed,
    pack_ternary5,
    pack_weight,
    unpack_codes,
    unpack_ternary5,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
requires_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
TOP_CODE = {"uint1": 1, "uint2": 3, "uint3": 7, "uint4": 15, "ternary5": 2}


def random_weight(layout: str, n: int, k: int, group: int | None, asym: bool, run: int | None = None, device: str = DEVICE):
    """Random codes with fp16 scales in [0.5, 1.5) and, if ``asym``, random integer zero points."""
    top = TOP_CODE[layout]
    codes = torch.randint(0, top + 1, (n, k))
    n_groups = 1 if group is None else k // group
    scale = (torch.rand(n, n_groups) + 0.5).half()
    zero = torch.randint(0, top + 1, (n, n_groups)).half() if asym else None
    return pack_weight(codes, scale, zero, layout, group, zero_const=top / 2, run=run).to(device), codes


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert not out.isnan().any(), "some outputs were never written (NaN poison left)"
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def poisoned(shape: tuple[int, ...], dtype: torch.dtype, device: str = DEVICE) -> torch.Tensor:
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


# ----------------------------------------------------------------------------- packing


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("run", [None, 16])
def test_pack_round_trip_with_ragged_k(layout: str, run: int | None) -> None:
    pw, codes = random_weight(layout, n=5, k=80 if layout == "ternary5" else 96, group=16 if layout != "ternary5" else None,
                              asym=True, run=run, device="cpu")
    assert pw.k_pad % pw.chunk == 0 and pw.k_pad >= pw.k
    assert torch.equal(unpack_codes(pw), codes)


def test_ternary5_decodes_all_243_bytes() -> None:
    trits = torch.cartesian_prod(*[torch.arange(3)] * 5)  # [243, 5], slot i = column i
    packed = pack_ternary5(trits.reshape(243, 5, 1).reshape(243, 5), run=1)
    assert packed.shape == (243, 1)
    assert torch.equal(unpack_ternary5(packed, run=1), trits)


def test_uint3_stores_exactly_three_bits_per_code() -> None:
    pw, _ = random_weight("uint3", n=4, k=1024, group=128, asym=False, device="cpu")
    assert (pw.words.numel() + pw.high.numel()) * 32 == 4 * 1024 * 3


def test_the_run_is_the_fast_kernels_32_where_it_pads_k_little() -> None:
    """A run of 32 (the tensor-core GEMV's and the wgmma GEMM's) where it pads K at most 1/16 more than the
    least-padding run: W3 and grouped W2 at Llama-2's K = 11008 (2.3%), not at K = 1536 (33%); ternary5 keeps
    the least padding."""
    assert choose_run("uint3", 11008, 128) == 32 and choose_run("uint2", 11008, 64) == 32 and choose_run("uint4", 11008, 128) == 32
    assert choose_run("uint1", 11008, 128) == 32 and choose_run("uint2", 11008, None) == 32  # were 8 and 16
    assert choose_run("uint3", 1536, 128) == 16 and choose_run("uint3", 256, 128) == 8
    assert choose_run("ternary5", 1024, None) == 16  # 16 codes of padding, where a run of 256 would pad 256


def test_pack_rejects_codes_out_of_range_and_bad_groups() -> None:
    with pytest.raises(PackError, match="0..15"):
        pack_weight(torch.full((2, 32), 16), torch.ones(2, 1), None, "uint4", None)
    with pytest.raises(PackError, match="does not divide"):
        pack_weight(torch.zeros(2, 48, dtype=torch.int64), torch.ones(2, 1), None, "uint4", 32)
    with pytest.raises(PackError, match="fits no run"):
        pack_weight(torch.zeros(2, 96, dtype=torch.int64), torch.ones(2, 2), None, "ternary5", 48)


# ----------------------------------------------------------------------------- GEMV


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("group,asym", [(32, True), (None, False)])
@pytest.mark.parametrize("m", [1, 3])
def test_gemv_matches_reference(layout: str, group: int | None, asym: bool, m: int) -> None:
    if layout == "ternary5" and group is not None:
        group = 64
    pw, _ = random_weight(layout, n=37, k=192, group=group, asym=asym, run=16 if layout != "ternary5" else None)
    x = torch.randn(m, pw.k, dtype=torch.float16, device=DEVICE)
    out = lm.gemv(x, pw, out=poisoned((m, pw.n), x.dtype))
    assert rel_err(out, lm.reference_matmul(x, pw)) < 2e-3


@pytest.mark.parametrize("layout", ["uint4", "uint2"])
def test_gemv_bf16_and_split_k(layout: str) -> None:
    pw, _ = random_weight(layout, n=19, k=1024, group=64, asym=True, run=16)
    for dtype, tol in [(torch.bfloat16, 1e-2), (torch.float16, 2e-3)]:
        x = torch.randn(2, pw.k, dtype=dtype, device=DEVICE)
        ref = lm.reference_matmul(x, pw)
        assert rel_err(lm.gemv(x, pw, out=poisoned((2, pw.n), x.dtype)), ref) < tol
        assert rel_err(lm.gemv(x, pw, lm.GemvConfig(block_n=8, split_k=3), out=poisoned((2, pw.n), x.dtype)), ref) < tol
    assert rel_err(lm.gemv(x, pw, lm.GemvConfig(block_n=16, num_stages=1), out=poisoned((2, pw.n), x.dtype)), ref) < tol


@pytest.mark.parametrize("path", ["gemv", "gemm", "mma"])
def test_split_k_sums_in_the_last_split_and_resets_its_counters(path: str) -> None:
    """The splits write fp32 partials and the last to arrive stores the tile: the output needs no zeroing,
    back-to-back calls on fresh inputs are each right and bit-for-bit repeatable, and every counter is
    back at 0 afterwards (a counter left behind would make the next call store too early)."""
    pw, _ = random_weight("uint4", n=40, k=1024, group=64, asym=True, run=16)
    config = {"gemv": lm.GemvConfig(block_n=16, split_k=4), "gemm": lm.GemmConfig(block_n=16, block_m=16, split_k=4),
              "mma": lm.MmaConfig(block_n=16, split_k=4)}[path]
    for m in (3, 1):
        x = torch.randn(m, pw.k, dtype=torch.float16, device=DEVICE)
        first = lm.PATHS[path](x, pw, config, out=poisoned((m, pw.n), x.dtype))
        assert rel_err(first, lm.reference_matmul(x, pw)) < 2e-3, m
        assert torch.equal(lm.PATHS[path](x, pw, config, out=poisoned((m, pw.n), x.dtype)), first)
    for _, count in lm._SPLIT_BUFFERS.values():
        assert count.abs().sum().item() == 0


def test_outgrown_split_buffers_stay_allocated() -> None:
    """A CUDA graph captured with the split-K buffers keeps their addresses: when a bigger launch needs bigger
    buffers, the old ones must stay allocated (a graph replaying into freed ones faults) and the new ones at
    least double, so that few are ever left behind."""
    y = torch.empty(1, 8)
    lm._SPLIT_BUFFERS.pop((y.device, 0), None)
    partial, count = lm.split_buffers(y, (2, 3, 4), 16)
    assert partial.numel() == 4 * 6 * 16 and count.numel() == 6 and count.abs().sum().item() == 0
    assert lm.split_buffers(y, (1, 2, 2), 16) == (partial, count)  # smaller launches reuse them
    old = weakref.ref(partial), weakref.ref(count)
    bigger, bigger_count = lm.split_buffers(y, (7, 1, 4), 16)
    del partial, count
    gc.collect()
    assert old[0]() is not None and old[1]() is not None
    assert bigger.numel() == 2 * 4 * 6 * 16 and bigger_count.numel() == 12
    lm._SPLIT_BUFFERS.pop((y.device, 0), None)


def test_scales_in_any_layout() -> None:
    """pack_weight stores scales group-major; row-major ones, and zero points in another layout than
    the scales, give the same products."""
    pw, _ = random_weight("uint4", n=24, k=256, group=32, asym=True, run=16)
    assert pw.scale.stride() == (1, pw.n) and pw.zero.stride() == (1, pw.n)
    x = torch.randn(3, pw.k, dtype=torch.float16, device=DEVICE)
    ref = lm.reference_matmul(x, pw)
    row_major = replace(pw, scale=pw.scale.contiguous())  # zero stays group-major
    assert row_major.scale.stride() == (pw.n_groups, 1)
    assert rel_err(lm.gemv(x, row_major, out=poisoned((3, pw.n), x.dtype)), ref) < 2e-3
    x16 = torch.randn(17, pw.k, dtype=torch.float16, device=DEVICE)
    assert rel_err(lm.gemm(x16, row_major, lm.GemmConfig(block_n=32, block_m=16)), lm.reference_matmul(x16, pw)) < 2e-3


def emulate_pair_decode(words: np.ndarray, zero: np.ndarray, slot: int, bits: int, integer_zeros: bool) -> list[np.ndarray]:
    """``_pair_fma``'s first fma in numpy: shift, lop3 0xEA (``(x & y) | z``), then ``v * 2**-(P + 4)``
    plus ``-(2**(10 - P) + zero) / 16`` (``_neg_zero_pair``, rounded to fp16 like the kernel), in float64
    (exact at these sizes, like the fused multiply-add) and rounded once to fp16; the low and the high half."""
    c = lm.pair_constants(slot, bits, integer_zeros)
    t = words >> np.uint64(c["shift"]) if c["shift"] >= 0 else (words << np.uint64(-c["shift"])) & np.uint64(0xFFFFFFFF)
    v = (t & np.uint64(c["mask"])) | np.uint64(0x64006400)
    neg_zero = (-(2.0 ** (6 - c["p"])) - zero / 16).astype(np.float16).astype(np.float64)
    mul = np.array(c["mul"] & 0xFFFF, dtype=np.uint16).view(np.float16).astype(np.float64)
    half = lambda w, shift: np.array((w >> np.uint64(shift)) & np.uint64(0xFFFF), dtype=np.uint16).view(np.float16).astype(np.float64)  # noqa: E731
    return [(half(v, shift) * mul + neg_zero).astype(np.float16) for shift in (0, 16)]


@pytest.mark.parametrize("bits", [1, 2, 4])
@pytest.mark.parametrize("integer_zeros", [True, False])
def test_pair_decode_constants_give_code_minus_zero(bits: int, integer_zeros: bool) -> None:
    """Every slot pair, emulated on random words: the low half is ``(code(slot) - zero) / 16`` and the
    high half ``(code(slot + slots / 2) - zero) / 16``, exactly, for integer zero points or (the other
    scheme) zero points on the 1/16 grid."""
    rng = np.random.default_rng(bits)
    words = rng.integers(0, 2**32, size=4096, dtype=np.uint64)
    top = 2**bits - 1
    zero = rng.integers(0, top + 1, size=4096) + (0 if integer_zeros else rng.integers(0, 16, size=4096) / 16)
    half_slots = 16 // bits
    for slot in range(half_slots):
        low, high = emulate_pair_decode(words, zero, slot, bits, integer_zeros)
        code = lambda s: ((words >> np.uint64(s * bits)) & np.uint64(top)).astype(np.float64)  # noqa: E731
        assert np.array_equal(low.astype(np.float64), (code(slot) - zero) / 16), slot
        assert np.array_equal(high.astype(np.float64), (code(slot + half_slots) - zero) / 16), slot


@pytest.mark.parametrize("integer_zeros", [True, False])
def test_uint3_pair_decode_constants_give_code_minus_zero(integer_zeros: bool) -> None:
    """``_pair_fma3``'s PTX emulated on random words: the low plane shifted and masked (lop3 0xEA), the spread high
    plane shifted and or-ed in by a second lop3, then the fma by ``2**-8`` plus the P = 4 neg-zero pair: every slot
    pair gives ``(code - zero) / 16`` for slots ``s`` and ``s + 8``, exactly."""
    rng = np.random.default_rng(3)
    words = rng.integers(0, 2**32, size=4096, dtype=np.uint64)
    raw_high = rng.integers(0, 2**32, size=4096, dtype=np.uint64)
    for odd in (0, 1):  # which half of the high-plane word this chunk reads
        chunk_high = raw_high >> np.uint64(16 * odd)  # (the kernel's arithmetic shift smears sign bits above bit 15: masked)
        spread = (chunk_high & np.uint64(0xFF)) | ((chunk_high & np.uint64(0xFF00)) << np.uint64(8))
        zero = rng.integers(0, 8, size=4096) + (0 if integer_zeros else rng.integers(0, 16, size=4096) / 16)
        neg_zero = (-4.0 - zero / 16).astype(np.float16).astype(np.float64)
        for slot in range(8):
            c = lm.pair3_constants(slot)
            shifted = lambda w, by: w >> np.uint64(by) if by >= 0 else (w << np.uint64(-by)) & np.uint64(0xFFFFFFFF)  # noqa: E731
            v = (shifted(words, c["shift_lo"]) & np.uint64(c["mask_lo"])) | np.uint64(0x64006400)
            v = (shifted(spread, c["shift_hi"]) & np.uint64(c["mask_hi"])) | v
            mul = np.array(c["mul"] & 0xFFFF, dtype=np.uint16).view(np.float16).astype(np.float64)
            for half, s in ((0, slot), (1, slot + 8)):
                value = np.array((v >> np.uint64(16 * half)) & np.uint64(0xFFFF), dtype=np.uint16).view(np.float16).astype(np.float64)
                code = ((words >> np.uint64(2 * s)) & np.uint64(3)) | (((chunk_high >> np.uint64(s)) & np.uint64(1)) << np.uint64(2))
                assert np.array_equal((value * mul + neg_zero).astype(np.float16).astype(np.float64), (code - zero) / 16), (odd, slot, half)


@pytest.mark.parametrize("asym,run", [(True, 32), (False, 32), (True, 8)])
def test_gemv_pairs_takes_uint3_on_both_planes(asym: bool, run: int) -> None:
    """The fp16-pair GEMV runs uint3 (low and high plane, the high plane's even and odd chunks, a ragged K and N,
    split-K), with integer zero points or the symmetric 3.5 on the 1/16 grid, at the run of real shapes (32) and
    a short one."""
    n, k, group = 70, 1024 + 128, 128  # at run 32 2.25 chunks of 512 codes: the high plane's second half is read, the last chunk is partial
    codes = torch.randint(0, 8, (n, k))
    scale = (torch.rand(n, k // group) * 0.004 + 0.001).half()
    zero = torch.randint(0, 8, scale.shape).half() if asym else None
    pw = pack_weight(codes, scale, zero, "uint3", group, zero_const=3.5, run=run).to(DEVICE)
    assert lm.pairs_fit(pw, torch.float16) and pw.run == run
    x = torch.randn(3, k, dtype=torch.float16, device=DEVICE) * 100
    ref = lm.reference_matmul(x, pw)
    for config in [lm.GemvConfig(block_n=32, split_k=1), lm.GemvConfig(block_n=16, split_k=3)]:
        assert rel_err(lm.gemv(x, pw, config, out=poisoned((3, n), x.dtype)), ref) < 2e-3, config
    assert rel_err(lm.gemv(x, pw, lm.GemvConfig(block_n=32), pairs=False), ref) < 2e-3  # the fp32 GEMV agrees


def test_zero_grid_says_which_zero_points_fp16_subtracts_exactly() -> None:
    codes, scale = torch.randint(0, 16, (4, 128)), torch.rand(4, 1).half() + 0.5
    assert pack_weight(codes, scale, torch.tensor([[3.0], [0.0], [15.0], [7.0]]), "uint4", None).zero_grid == 1.0
    assert pack_weight(codes, scale, None, "uint4", None, zero_const=7.5).zero_grid == 1 / 16
    assert pack_weight(codes, scale, torch.tensor([[3.3], [0.0], [15.0], [7.0]]), "uint4", None).zero_grid == 0.0
    assert pack_weight(codes, scale, None, "uint4", None, zero_const=100.0).zero_grid == 0.0


@pytest.mark.parametrize("layout", ["uint4", "uint2", "uint1"])
def test_gemv_pairs_quads_split_k_and_the_fp32_fallback(layout: str) -> None:
    """The fp16-pair GEMV at 128-code groups (W2 and W1 flush their pairs in 2 and 4 quads per chunk),
    with split-K and activations up to about +-2000 (the fp16 sums must not overflow); zero points off
    the 1/16 grid and fp32 scales take the fp32 GEMV and are still right; rows that fill every tile (no
    masks on the word loads) too."""
    top = TOP_CODE[layout]
    n, k = 70, 1024
    codes = torch.randint(0, top + 1, (n, k))
    scale = (torch.rand(n, k // 128) * 0.004 + 0.001).half()  # small, so that the outputs fit fp16
    zero = torch.randint(0, top + 1, (n, k // 128)).half()
    pw = pack_weight(codes, scale, zero, layout, 128).to(DEVICE)
    assert lm.pairs_fit(pw, torch.float16) and pw.run == 32
    x = torch.randn(2, k, dtype=torch.float16, device=DEVICE) * 500
    ref = lm.reference_matmul(x, pw)
    assert ref.isfinite().all() and x.abs().max() > 1000
    for config in [lm.GemvConfig(block_n=32, split_k=1), lm.GemvConfig(block_n=16, split_k=3)]:
        assert rel_err(lm.gemv(x, pw, config, out=poisoned((2, n), x.dtype)), ref) < 2e-3, config
    even = pack_weight(codes[:64], scale[:64], zero[:64], layout, 128).to(DEVICE)  # rows fill every tile: unmasked loads
    out = lm.gemv(x, even, lm.GemvConfig(block_n=32, split_k=2), out=poisoned((2, 64), x.dtype))
    assert rel_err(out, lm.reference_matmul(x, even)) < 2e-3
    odd = pack_weight(codes, scale, zero + 0.3, layout, 128).to(DEVICE)
    fp32_scales = pack_weight(codes, scale.float() * (1 + 1e-4), zero, layout, 128).to(DEVICE)  # off the fp16 grid
    for other in (odd, fp32_scales):
        assert not lm.pairs_fit(other, torch.float16)
        assert rel_err(lm.gemv(x, other, out=poisoned((2, n), x.dtype)), lm.reference_matmul(x, other)) < 2e-3


# ----------------------------------------------------------------------------- MMA (tensor cores, small batches)


def emulate_slot_decode(a: np.ndarray, b: np.ndarray, slot: int, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """The PTX of ``_slot_fp16`` in numpy: prmt (default mode), lop3 0xEA (``(x & y) | z``) and
    fma.rn.f16x2, with the constants of ``slot_decode_constants``; the two fp16 results."""
    c = lm.slot_decode_constants(slot, bits)
    pool = np.stack([(a >> (8 * i)) & 0xFF for i in range(4)] + [(b >> (8 * i)) & 0xFF for i in range(4)])
    t = sum(pool[(c["select"] >> (4 * i)) & 0x7].astype(np.uint64) << (8 * i) for i in range(4))
    u = (t & c["mask"]) | 0x64006400
    halves = []
    for shift in (0, 16):
        half = lambda v: np.array((v >> shift) & 0xFFFF, dtype=np.uint16).view(np.float16).astype(np.float64)  # noqa: E731
        halves.append((half(u) * half(np.uint64(c["mul"])) + half(np.uint64(c["add"]))).astype(np.float16))
    return halves[0], halves[1]


@pytest.mark.parametrize("bits", [1, 2, 4])
def test_slot_decode_constants_give_the_codes(bits: int) -> None:
    """Every slot, emulated on random words: the low half is word a's code, the high half word b's."""
    rng = np.random.default_rng(bits)
    a, b = (rng.integers(0, 2**32, size=4096, dtype=np.uint64) for _ in range(2))
    for slot in range(32 // bits):
        low, high = emulate_slot_decode(a, b, slot, bits)
        code = lambda w: ((w >> np.uint64(slot * bits)) & np.uint64(2**bits - 1)).astype(np.float16)  # noqa: E731
        assert np.array_equal(low, code(a)) and np.array_equal(high, code(b)), slot


def test_uint3_slot_decode_constants_give_the_codes() -> None:
    """``_slot3_fp16``'s PTX emulated (two prmt, a shift, two lop3 0xEA, fma.rn.f16x2) on random words of both
    planes, the high plane already shifted to its chunk: every slot's halves are words a's and b's 3-bit codes."""
    rng = np.random.default_rng(3)
    a, b, ha, hb = (rng.integers(0, 2**32, size=4096, dtype=np.uint64) for _ in range(4))
    prmt = lambda x, y, select: sum(  # noqa: E731
        np.stack([(x >> np.uint64(8 * i)) & np.uint64(0xFF) for i in range(4)] + [(y >> np.uint64(8 * i)) & np.uint64(0xFF) for i in range(4)])
        [(select >> (4 * i)) & 0x7].astype(np.uint64) << np.uint64(8 * i) for i in range(4))
    for slot in range(16):
        c = lm.slot3_decode_constants(slot)
        u = (prmt(a, b, c["select"]) & np.uint64(c["mask"])) | np.uint64(0x64006400)
        h = prmt(ha, hb, c["select_h"])
        h = (h << np.uint64(c["shift_h"])) & np.uint64(0xFFFFFFFF) if c["shift_h"] >= 0 else h >> np.uint64(-c["shift_h"])
        u = u | (h & np.uint64(c["mask_h"]))
        for shift, (w, hw) in ((0, (a, ha)), (16, (b, hb))):
            half = lambda v: np.array((v >> np.uint64(shift)) & np.uint64(0xFFFF), dtype=np.uint16).view(np.float16).astype(np.float64)  # noqa: E731
            got = (half(u) * half(np.uint64(c["mul"])) + half(np.uint64(c["add"]))).astype(np.float16)
            code = ((w >> np.uint64(2 * slot)) & np.uint64(3)) | (((hw >> np.uint64(slot)) & np.uint64(1)) << np.uint64(2))
            assert np.array_equal(got, code.astype(np.float16)), (slot, shift)


@pytest.mark.parametrize("layout", lm.UINT_LAYOUTS)
@pytest.mark.parametrize("group,asym", [(32, True), (None, False)])
def test_mma_matches_reference(layout: str, group: int | None, asym: bool) -> None:
    pw, _ = random_weight(layout, n=37, k=224, group=group, asym=asym, run=16)
    for m, split_k in [(1, 1), (5, 3), (16, 2), (17, 2), (33, 1), (80, 2)]:  # tiles of 16, 16, 16, 32, 64, 2x64 rows; folded above 16
        x = torch.randn(m, pw.k, dtype=torch.float16, device=DEVICE)
        config = lm.MmaConfig(block_n=64, split_k=split_k)
        out = lm.mma(x, pw, config, out=poisoned((m, pw.n), x.dtype))
        assert rel_err(out, lm.reference_matmul(x, pw)) < 2e-3, (m, split_k)


SM90_SHARED_SCRIPT = """
import json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from qkernels import lowbit_matmul as lm
from qkernels.pack import pack_weight
import torch
names = ["x_ptr", "w_ptr", "hi_ptr", "scale_ptr", "zero_ptr", "y_ptr", "partial_ptr", "count_ptr", "M", "N", "K", "n_chunks", "n_groups",
         "stride_sn", "stride_sg", "group_size", "zero_const", "stride_xm", "stride_wn", "stride_hn", "stride_ym"]
types = ["*fp16", "*i32", "*i32", "*fp16", "*fp16", "*fp16", "*fp32", "*i32"] + ["i32"] * 8 + ["fp32", "i32", "i32", "i32", "i32"]
shared = {}
for layout in lm.UINT_LAYOUTS:
    bits = lm.CODE_BITS[layout]
    pw = pack_weight(torch.zeros(8, 4096, dtype=torch.int64), torch.ones(8, 32), torch.zeros(8, 32), layout, 128, run=32)
    config = lm.MMA_FOLD_CONFIGS.get(lm.gemv_key(pw), lm.MmaConfig())  # above 16 rows the kernel folds
    consts = dict(BITS=bits, SLOTS=pw.slots, RUN=pw.run, SLOTS_PER_GROUP=4, HAS_ZERO=True, BLOCK_N=config.block_n,
                  BLOCK_M=64, SPLIT_K=config.split_k, FOLD=True, INTERPRET=False)
    consts["stride_sn"] = 1  # scales are group-major; the launch specializes a stride of 1
    signature = {**dict(zip(names, types)), **{name: "constexpr" for name in consts}}
    aligned = [i for i, name in enumerate(names) if name not in ("M", "stride_sn", "zero_const")]  # as at a real launch
    attrs = {(i,): [["tt.divisibility", 16]] for i in aligned}
    options = dict(num_warps=config.num_warps, num_stages=lm.mma_stages(pw, 64, config))
    kernel = triton.compile(ASTSource(fn=lm._mma_kernel, signature=signature, constexprs=consts, attrs=attrs),
                            target=GPUTarget("cuda", 90, 32), options=options)
    shared[layout] = kernel.metadata.shared
print(json.dumps(shared))
"""


def test_mma_fits_shared_memory_at_64_rows() -> None:
    """Compiled for sm_90 on this machine (ptxas ships with triton; a fresh process, without the
    interpreter): with the stages ``mma_stages`` picks, the pipelined tiles at 64 rows fit the H100's
    227 KiB. Before that cap, W1 asked for 264 KiB on the H100."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", SM90_SHARED_SCRIPT], capture_output=True, text=True, env=env, timeout=600,
                          cwd=Path(__file__).resolve().parents[1])
    if done.returncode != 0:
        if "ptxas" in done.stderr and ("not found" in done.stderr or "No such file" in done.stderr):
            pytest.skip("no ptxas for this platform")
        raise AssertionError(done.stderr[-2000:])
    shared = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(shared) == set(lm.UINT_LAYOUTS)
    assert all(nbytes <= 227 * 1024 for nbytes in shared.values()), shared


def test_mma_refuses_what_it_cannot_run() -> None:
    pw, _ = random_weight("uint3", n=8, k=256, group=128, asym=True, run=8)
    with pytest.raises(ValueError, match="run >= 16"):
        lm.mma(torch.randn(2, pw.k, dtype=torch.float16, device=DEVICE), pw)
    pw, _ = random_weight("uint4", n=8, k=256, group=128, asym=True, run=16)
    with pytest.raises(ValueError, match="bfloat16"):
        lm.mma(torch.randn(2, pw.k, dtype=torch.bfloat16, device=DEVICE), pw)
    with pytest.raises(ValueError, match="at most"):
        lm.mma(torch.randn(lm.MMA_MAX_M + 1, pw.k, dtype=torch.float16, device=DEVICE), pw)


# ----------------------------------------------------------------------------- GEMM and dequantization


@pytest.mark.parametrize("layout", LAYOUTS)
def test_gemm_matches_reference(layout: str) -> None:
    group = 80 if layout == "ternary5" else 32
    pw, _ = random_weight(layout, n=40, k=400 if layout == "ternary5" else 224, group=group, asym=True, run=16)
    x = torch.randn(20, pw.k, dtype=torch.float16, device=DEVICE)
    out = lm.gemm(x, pw, lm.GemmConfig(block_n=32, block_m=16), out=poisoned((20, pw.n), x.dtype))
    assert rel_err(out, lm.reference_matmul(x, pw)) < 2e-3


@pytest.mark.parametrize("layout", ["uint4", "uint1"])
def test_gemm_bf16_split_k_and_one_group_per_row(layout: str) -> None:
    for group in (64, None):
        pw, _ = random_weight(layout, n=33, k=512, group=group, asym=True, run=16)
        x = torch.randn(17, pw.k, dtype=torch.bfloat16, device=DEVICE)
        out = lm.gemm(x, pw, lm.GemmConfig(block_n=32, block_m=16), out=poisoned((17, pw.n), x.dtype))
        assert rel_err(out, lm.reference_matmul(x, pw)) < 1e-2
        x = x.half()  # split-K adds partial sums into a zeroed output (fp16 atomics)
        out = lm.gemm(x, pw, lm.GemmConfig(block_n=32, block_m=16, split_k=3), out=poisoned((17, pw.n), x.dtype))
        assert rel_err(out, lm.reference_matmul(x, pw)) < 2e-3


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dequantize_matches_reference(layout: str, dtype: torch.dtype) -> None:
    pw, _ = random_weight(layout, n=9, k=160, group=None if layout == "ternary5" else 32, asym=True, run=16)
    out = lm.dequantize(pw, dtype, out=poisoned((pw.n, pw.k), dtype))
    ref = dequantize_packed(pw, torch.float32)
    assert not out.isnan().any()
    ulp = 2.0**-7 if dtype == torch.bfloat16 else 2.0**-10  # the interpreter may round bf16 differently
    assert torch.allclose(out.float(), ref, rtol=ulp, atol=0)


def test_lowbit_matmul_keeps_leading_dims_and_uses_torch_off_gpu() -> None:
    pw, _ = random_weight("uint4", n=24, k=64, group=32, asym=True, device="cpu")
    x = torch.randn(2, 3, 64, dtype=torch.float16)
    out = lm.lowbit_matmul(x, pw)
    assert out.shape == (2, 3, 24)
    assert torch.equal(out, lm.reference_matmul(x.reshape(6, 64), pw).reshape(2, 3, 24))
    with pytest.raises(ValueError, match="path="):
        lm.lowbit_matmul(x, pw, path="fast")


def test_pick_path_by_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    """The rules off Hopper (no wgmma GEMM; test_gemm_wgmma checks Hopper's), on any machine."""
    monkeypatch.setattr(lm, "is_hopper", lambda device: False)
    pw, _ = random_weight("uint4", n=256, k=256, group=128, asym=False, device="cpu")  # square: W4 keeps the pair GEMV at batch 1
    cuda = torch.device("cuda")
    assert lm.pick_path(4, pw, torch.device("cpu")) == "torch"
    batches = (1, 8, lm.MMA_AUTO_MAX_M + 1, 64, lm.MMA_MAX_M, lm.MMA_MAX_M + 1)
    assert [lm.pick_path(m, pw, cuda) for m in batches] == ["gemv", "mma", "mma", "mma", "mma", "dequant"]  # W4: MMA to 128
    odd_zeros = replace(pw, zero_grid=0.0)  # no fp16-pair GEMV: at batch 1 the MMA kernel beat the fp32 one
    assert [lm.pick_path(m, odd_zeros, cuda) for m in (1, 8)] == ["mma", "mma"]
    assert [lm.pick_path(m, pw, cuda, torch.bfloat16) for m in (1, 8, 9)] == ["gemv", "gemv", "gemm"]
    w2, _ = random_weight("uint2", n=8, k=512, group=128, asym=True, device="cpu")  # grouped W2 (run 32): the tensor-core GEMV at batch 1
    w3, _ = random_weight("uint3", n=8, k=256, group=128, asym=True, device="cpu")
    expected = "gemv_mma" if lm.HAS_GLUON else "gemv"
    assert [lm.pick_path(1, w2, cuda), lm.pick_path(2, w2, cuda), lm.pick_path(2, w3, cuda)] == [expected, "mma", "gemv"]
    assert [lm.pick_path(m, w2, cuda) for m in (lm.MMA_AUTO_MAX_M + 1, lm.MMA_MAX_M)] == ["mma", "mma"]  # folded
    w1, _ = random_weight("uint1", n=8, k=1024, group=128, asym=True, device="cpu")  # grouped W1: the GEMM above 16
    assert [lm.pick_path(m, w1, cuda) for m in (lm.MMA_AUTO_MAX_M, lm.MMA_AUTO_MAX_M + 1)] == ["mma", "gemm"]


# ----------------------------------------------------------------------------- on a GPU, at real sizes


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("layout,dtype", [(layout, torch.float16) for layout in LAYOUTS] + [("uint4", torch.bfloat16)])
def test_kernels_on_gpu_at_layer_size(layout: str, dtype: torch.dtype) -> None:
    group = 128
    pw, _ = random_weight(layout, n=1000, k=4096 if layout != "ternary5" else 2560, group=group, asym=True)
    tol = 1e-2 if dtype == torch.bfloat16 else 2e-3
    for m in (1, 5, 16, 300):
        x = torch.randn(m, pw.k, dtype=dtype, device="cuda")
        ref = lm.reference_matmul(x, pw)
        paths = ["gemv" if m <= lm.GEMV_MAX_M else "gemm"] + (["mma"] if lm.mma_fits(pw, dtype) and m <= lm.MMA_MAX_M else [])
        for path in paths:
            out = lm.PATHS[path](x, pw, out=poisoned((m, pw.n), dtype))
            assert rel_err(out, ref) < tol, (path, m)
    assert rel_err(lm.dequant_matmul(x, pw), ref) < tol


def test_gemv_fp32_path_runs_the_fp32_gemv_where_the_pair_one_fits(monkeypatch: pytest.MonkeyPatch) -> None:
    """``gemv_fp32`` (the kernel table's comparison path) forces the fp32 GEMV: the pair kernel is never called."""
    pw, _ = random_weight("uint2", 40, 256, 64, asym=True)
    assert lm.pairs_fit(pw, torch.float16)
    x = torch.randn(2, 256, dtype=torch.float16, device=DEVICE)

    def no_pairs(*args, **kwargs):
        raise AssertionError("the pair GEMV ran")

    monkeypatch.setattr(lm._gemv_pairs_kernel, "run", no_pairs)
    assert rel_err(lm.lowbit_matmul(x, pw, "gemv_fp32"), lm.reference_matmul(x, pw)) < 2e-3
    with pytest.raises(AssertionError, match="the pair GEMV ran"):
        lm.lowbit_matmul(x, pw, "gemv")
    with pytest.raises(ValueError, match="pairs=True"):
        lm.gemv(x, replace(pw, zero_grid=0.0), pairs=True)  # zero points fp16 cannot subtract exactly

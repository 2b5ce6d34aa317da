"""The wgmma GEMM (qkernels/gemm_wgmma.py, Gluon, Hopper): its input and config checks, default configs and
dispatch on CPU (Gluon has no interpreter), the kernel against the fp32 reference on a Hopper GPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qkernels import lowbit_matmul as lm
from qkernels.gemm_wgmma import (GemmWgmmaConfig, check_config, default_config, gemm_wgmma, launch_constants, slot3_decode_constants, split_fits,
                                 tail_tiles)
from qkernels.pack import CODE_BITS, pack_weight

requires_hopper = pytest.mark.skipif(not (torch.cuda.is_available() and lm.is_hopper(torch.device("cuda"))), reason="needs a Hopper GPU")


def w4(n: int, k: int, run: int = 32):
    codes = torch.randint(0, 16, (n, k))
    return pack_weight(codes, torch.rand(n, k // 128).half(), torch.randint(0, 16, (n, k // 128)).half(), "uint4", 128, run=run)


def grouped(layout: str, n: int, k: int):
    """Random codes of ``layout`` with scales and zero points in groups of 128."""
    top = 2 ** CODE_BITS[layout] - 1
    codes = torch.randint(0, top + 1, (n, k), dtype=torch.uint8)
    return pack_weight(codes, torch.rand(n, k // 128).half(), torch.randint(0, top + 1, (n, k // 128)).half(), layout, 128, run=32)


def test_rejects_what_it_cannot_take() -> None:
    codes = torch.randint(0, 8, (8, 256))
    uint3 = pack_weight(codes, torch.rand(8, 2).half(), None, "uint3", 128, zero_const=3.5)  # a run of 8 (K = 256)
    assert uint3.run == 8 and not lm.wgmma_fits(uint3, torch.float16)
    with pytest.raises(ValueError, match="run 8"):
        gemm_wgmma(torch.randn(64, 256, dtype=torch.float16), uint3)
    assert lm.wgmma_fits(w4(8, 256), torch.float16)
    assert not lm.wgmma_fits(w4(8, 256), torch.bfloat16) and not lm.wgmma_fits(w4(8, 256, run=16), torch.float16)
    with pytest.raises(ValueError, match="bfloat16"):
        gemm_wgmma(torch.randn(64, 256, dtype=torch.bfloat16), w4(8, 256))
    with pytest.raises(ValueError, match="runs on a Hopper GPU .* got x on cpu, the weight on cpu"):
        gemm_wgmma(torch.randn(64, 256, dtype=torch.float16), w4(8, 256))


@pytest.mark.parametrize("integer_zeros", [True, False])
def test_uint3_slot_decode_constants_give_code_minus_zero(integer_zeros: bool) -> None:
    """``_slot_weights3``'s PTX emulated on random words (prmt in its default mode, lop3 0xEA, and, shift, or, then
    the fma and sub in float64 with fp16 rounding): for every slot and both neighbouring words, ``code - zero``
    exactly, the code's low two bits from the low plane and its top bit from the (chunk-shifted) high plane."""
    rng = np.random.default_rng(7)
    lo_a, lo_b, hi_a, hi_b = (rng.integers(0, 2**32, size=4096, dtype=np.uint64) for _ in range(4))
    zero = rng.integers(0, 8, size=4096) + (0 if integer_zeros else rng.integers(0, 16, size=4096) / 16)

    def prmt(a, b, select):
        pool = [(a >> np.uint64(8 * i)) & np.uint64(0xFF) for i in range(4)] + [(b >> np.uint64(8 * i)) & np.uint64(0xFF) for i in range(4)]
        return sum(pool[(select >> (4 * i)) & 0x7] << np.uint64(8 * i) for i in range(4))

    half = lambda v, at: np.array((v >> np.uint64(at)) & np.uint64(0xFFFF), dtype=np.uint16).view(np.float16).astype(np.float64)  # noqa: E731
    for odd in (0, 1):  # the high-plane word's half this chunk reads (the kernel shifts it down first; arithmetic: upper bytes unused)
        ha, hb = hi_a >> np.uint64(16 * odd), hi_b >> np.uint64(16 * odd)
        for slot in range(16):
            c = slot3_decode_constants(slot)
            u = (prmt(lo_a, lo_b, c["select_lo"]) & np.uint64(c["mask_lo"])) | np.uint64(0x64006400)
            h = prmt(ha, hb, c["select_hi"]) & np.uint64(c["mask_hi"])
            h = (h << np.uint64(c["shift"])) if c["shift"] >= 0 else (h >> np.uint64(-c["shift"]))
            u = (u | h) & np.uint64(0xFFFFFFFF)
            mul = half(np.uint64(c["mul"]), 0)
            base = 2.0 ** (10 - c["p"])
            for word, (lo, hi) in enumerate(((lo_a, ha), (lo_b, hb))):
                code = ((lo >> np.uint64(2 * slot)) & np.uint64(3)) | (((hi >> np.uint64(slot)) & np.uint64(1)) << np.uint64(2))
                if integer_zeros:  # fma by 2**-P with -(zero + 2**(10 - P)), both exact in fp16
                    value = (half(u, 16 * word) * mul - (zero + base)).astype(np.float16)
                else:  # fma with -2**(10 - P), then sub the zero point
                    value = ((half(u, 16 * word) * mul - base).astype(np.float16).astype(np.float64) - zero).astype(np.float16)
                expected = (code.astype(np.float64) - zero).astype(np.float16)
                assert np.array_equal(value, expected), (odd, slot, word)


def test_config_errors_name_the_bad_values() -> None:
    check_config(GemmWgmmaConfig())
    with pytest.raises(ValueError, match=r"block_n=96 \(a multiple of 16 \* num_warps = 128\)"):
        check_config(GemmWgmmaConfig(block_n=96, num_warps=8))
    with pytest.raises(ValueError, match=r"block_m=48.*slots_per_step=3"):
        check_config(GemmWgmmaConfig(block_m=48, slots_per_step=3))
    with pytest.raises(ValueError, match=r"num_warps=2"):
        check_config(GemmWgmmaConfig(block_n=64, num_warps=2))
    with pytest.raises(ValueError, match=r"group_ahead=5 \(1 to 4\)"):
        check_config(GemmWgmmaConfig(group_ahead=5))
    with pytest.raises(ValueError, match=r"tail_split=2 \(at least 1; above 1 only with split_k=1, got 2\)"):
        check_config(GemmWgmmaConfig(split_k=2, tail_split=2))
    with pytest.raises(ValueError, match=r"steps_per_box=3 \(1, 2, 4 or 8\)"):
        check_config(GemmWgmmaConfig(steps_per_box=3))
    with pytest.raises(ValueError, match=r"words_ahead=3 \(1 or 2\)"):
        check_config(GemmWgmmaConfig(words_ahead=3))
    one_scale = pack_weight(torch.randint(0, 16, (8, 1064)), torch.rand(8, 1).half(), None, "uint4", None, run=32)
    with pytest.raises(ValueError, match=r"steps_per_box=2 needs K a multiple of 64 \(got 1064\)"):
        gemm_wgmma(torch.randn(16, 1064, dtype=torch.float16), one_scale, GemmWgmmaConfig(steps_per_box=2))
    with pytest.raises(ValueError, match=r"steps_per_box=8 needs .* to divide the 4 steps of a chunk"):
        gemm_wgmma(torch.randn(16, 1024, dtype=torch.float16), w4(8, 1024), GemmWgmmaConfig(steps_per_box=8))


def test_a_short_last_wave_gets_its_tiles_split() -> None:
    """4096x14336 at 1024 rows on 132 multiprocessors: 448 tiles, three full waves and 52 tiles that would
    leave 80 multiprocessors idle; split two ways they fill 104 (three ways would need a second wave)."""
    assert tail_tiles(448, 4, 132) == (396, 2)
    assert tail_tiles(140, 4, 132) == (132, 4)  # 8 tiles: split as far as allowed
    assert tail_tiles(256, 4, 132) == (256, 1)  # 124 tiles: the last wave is nearly full already
    assert tail_tiles(264, 4, 132) == (264, 1) and tail_tiles(100, 4, 132) == (100, 1)  # whole waves; less than one
    assert tail_tiles(448, 1, 132) == (448, 1)


def test_words_leave_l2_first_only_where_one_activation_tile_reads_them() -> None:
    """``evict_first`` on the words (session 24) where the batch is one activation tile; with more tiles each weight
    tile's words are read again by the others, and keep the default policy."""
    pw = w4(256, 1024)
    for m, once in ((1, True), (16, True), (64, True), (256, True), (257, False), (1024, False)):
        config = default_config(m, pw)
        assert launch_constants(pw, config, config.split_k, -(-m // config.block_m))["ONCE"] is once, m


def test_integer_zero_points_fold_into_the_decode() -> None:
    """The decode's fma ``u * 2**-P - (2**(10 - P) + zero)`` on ``u = 2**10 + code * 2**P`` (fp16) gives
    ``code - zero`` exactly for every code, slot position ``P`` and integer zero point within +-63 (what
    ``zero_grid == 1.0`` promises); a fractional zero point is rounded away next to ``2**10``, which is
    why the kernel folds only integer ones."""
    codes = torch.arange(256, dtype=torch.float32)
    for bits in (1, 2, 4):
        for p in range(0, 8, bits):
            code = codes[: 2**bits]
            u = (1024 + code * 2**p).half()  # lop3's fp16: exponent of 2**10, the code at mantissa bit P
            for zero in range(-63, 64):
                addend = torch.tensor(-(zero + 2 ** (10 - p)), dtype=torch.float16)
                got = (u * torch.tensor(2.0**-p, dtype=torch.float16) + addend).float()  # the product is exact: one rounding
                assert torch.equal(got, code - zero), (bits, p, zero)
    assert (torch.tensor(1024.0, dtype=torch.float16) + torch.tensor(-(0.25 + 1024), dtype=torch.float16)).item() != -0.25


def test_default_configs_fill_the_gpu() -> None:
    """Up to 256 rows one warpgroup on 64 weight rows, above two on 128; K splits (any count, at most 8) while
    the programs fill one wave of ``programs_per_sm`` a multiprocessor (132 off the GPU), never a split with
    fewer than two chunks but the last one, nor an empty last one."""
    big = w4(8192, 8192)
    assert default_config(1024, big) == GemmWgmmaConfig(block_n=128, block_m=256, num_warps=8, split_k=1, tail_split=4)
    assert default_config(256, big) == GemmWgmmaConfig(block_n=64, block_m=256, num_warps=4, split_k=1)
    assert default_config(128, big).steps_per_box == 1  # four-step boxes of 128 rows: 128 KiB a program
    assert default_config(64, big) == GemmWgmmaConfig(block_n=64, block_m=64, num_warps=4, split_k=2, stages=2, steps_per_box=4,
                                                      words_ahead=2)
    # the words two chunks ahead: W4 on 64-row activation tiles only (session 22)
    assert default_config(48, w4(4096, 14336)).words_ahead == 2 and default_config(128, big).words_ahead == 1
    assert default_config(32, big).words_ahead == 1 and default_config(64, grouped("uint2", 8192, 8192)).words_ahead == 1
    assert default_config(16, big) == GemmWgmmaConfig(block_n=64, block_m=16, num_warps=4, split_k=4, stages=2, steps_per_box=4)
    one_scale = pack_weight(torch.randint(0, 16, (8, 1064)), torch.rand(8, 1).half(), None, "uint4", None, run=32)
    assert default_config(16, one_scale).steps_per_box == 1  # K not a multiple of the boxes' 64
    assert default_config(64, w4(4096, 14336)).split_k == 4 and default_config(64, w4(14336, 4096)).split_k == 1
    assert default_config(20, w4(256, 1024)).split_k == 2  # 4 chunks: 3 splits would leave the last one empty
    # session 21's timings: 3 programs a multiprocessor up to 32 rows (4 for W4 on 16-row tiles, 2 for W3), splits of any count
    assert default_config(32, big).split_k == 3 and default_config(32, w4(4096, 14336)).split_k == 6
    assert default_config(16, w4(4096, 14336)).split_k == 8 and default_config(32, w4(14336, 4096)).split_k == 1
    assert default_config(16, grouped("uint1", 4096, 14336)).split_k == 5  # 14 chunks of 1024: 6 splits would leave the last one empty
    assert default_config(16, grouped("uint2", 8192, 8192)).split_k == 3
    assert default_config(32, grouped("uint3", 8192, 8192)).split_k == 2  # two planes: 2 programs a multiprocessor
    for m in (16, 32, 64, 128, 256, 1024):
        config = default_config(m, big)
        check_config(config)
        assert 128 <= (8192 // config.block_n) * -(-m // config.block_m) * config.split_k <= 528


def test_split_fits() -> None:
    assert split_fits(16, 8) and split_fits(16, 6) and split_fits(14, 5) and split_fits(8, 3)
    assert not split_fits(14, 6)  # 3 chunks a split: the sixth would start past the end
    assert not split_fits(16, 9) and not split_fits(4, 3) and not split_fits(1, 1)


def test_tuned_configs_win_over_the_default_for_their_kind_shape_and_bucket(monkeypatch: pytest.MonkeyPatch) -> None:
    """What ``bench.kernel_latency --tune-wgmma`` installs is used for the same kind, shape and batch
    bucket only; its search space holds only valid configs within 128 accumulators a thread."""
    from bench.kernel_latency import wgmma_search
    from qkernels import gemm_wgmma as gw

    big, other = w4(8192, 8192), w4(4096, 8192)
    tuned = GemmWgmmaConfig(block_n=128, block_m=64, num_warps=4, split_k=4)
    monkeypatch.setattr(gw, "TUNED", {gw.tuned_key(64, big): tuned})
    assert gw.config_for(64, big) == tuned and gw.config_for(33, big) == tuned  # the same bucket
    assert gw.config_for(128, big) == default_config(128, big) and gw.config_for(64, other) == default_config(64, other)
    for m in (9, 64, 256, 1024):
        search = wgmma_search(m)
        assert search and len(set(search)) == len(search)
        for config in search:
            check_config(config)
            assert config.block_n * config.block_m // (32 * config.num_warps) <= 128
    assert {c.block_m for c in wgmma_search(1024)} == {128, 256} and {c.block_m for c in wgmma_search(64)} == {64}
    assert {c.tail_split for c in wgmma_search(1024) if c.num_warps == 8 and c.split_k == 1} == {1, 4}
    assert {c.steps_per_box for c in wgmma_search(64)} == {1, 4} and {c.steps_per_box for c in wgmma_search(1024)} == {1}
    assert {c.block_m for c in wgmma_search(9)} == {16} and {c.split_k for c in wgmma_search(9)} == {1, 2, 3, 4, 6}
    assert {(c.block_n, c.words_ahead) for c in wgmma_search(64)} == {(64, 1), (64, 2), (128, 1)}


def test_dispatch_above_the_gemv_and_mma_rows_on_hopper(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a Hopper GPU the wgmma GEMM takes every batch from 2 rows (``WGMMA_MIN_M``) where it fits, but grouped W4
    with K < 8192 and W3 above 256 rows; bf16 and other GPUs keep the GEMV, the GEMM, the MMA kernel to 128 rows and
    dequant + cuBLAS."""
    cuda = torch.device("cuda")
    pw, long_k = w4(256, 1024), w4(64, 8192)
    w1 = pack_weight(torch.randint(0, 2, (64, 1024)), torch.rand(64, 8).half(), torch.randint(0, 2, (64, 8)).half(), "uint1", 128, run=32)
    ternary = pack_weight(torch.randint(0, 3, (64, 1024)), torch.rand(64, 1).half(), None, "uint2", None, zero_const=1.0, run=32)
    uint3 = pack_weight(torch.randint(0, 8, (64, 1024)), torch.rand(64, 8).half(), None, "uint3", 128, zero_const=3.5)
    monkeypatch.setattr(lm, "is_hopper", lambda device: False)
    others = [lm.pick_path(m, pw, cuda) for m in (128, 129, 1024)] + [lm.pick_path(17, w1, cuda), lm.pick_path(64, ternary, cuda)]
    assert others == ["mma", "dequant", "dequant", "gemm", "mma"]  # no Hopper GPU
    monkeypatch.setattr(lm, "is_hopper", lambda device: device.type == "cuda")
    assert [lm.pick_path(m, pw, cuda) for m in (1, 8, 9, 128, 256, 257)] == ["gemv_mma", "wgmma", "wgmma", "wgmma", "wgmma", "dequant"]
    assert [lm.pick_path(m, long_k, cuda) for m in (129, 1024)] == ["wgmma", "wgmma"]
    assert [lm.pick_path(m, w1, cuda) for m in (1, 2, 8, 1024)] == ["gemv_mma", "wgmma", "wgmma", "wgmma"]
    assert [lm.pick_path(m, ternary, cuda) for m in (2, 8, 9, 1024)] == ["wgmma", "wgmma", "wgmma", "wgmma"]
    assert [lm.pick_path(m, pw, cuda, torch.bfloat16) for m in (2, 9, 1024)] == ["gemv", "gemm", "dequant"]
    assert [lm.pick_path(m, uint3, cuda) for m in (2, 8, 9, 256, 257, 1024)] == ["wgmma", "wgmma", "wgmma", "wgmma", "dequant", "dequant"]
    assert lm.pick_path(1024, pw, torch.device("cpu")) == "torch"


@requires_hopper
@pytest.mark.parametrize(
    "layout,top,group,zeros",
    [("uint4", 15, 128, "integer"), ("uint2", 3, 128, "float"), ("uint2", 2, None, 1.0), ("uint1", 1, 128, "integer"), ("uint4", 15, 64, 7.5),
     ("uint3", 7, 128, "integer"), ("uint3", 7, 128, 3.5)],
)
def test_matches_the_reference_on_ragged_shapes(layout: str, top: int, group: int | None, zeros: str | float,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Random codes, scales and zero points, outputs poisoned with NaN, batches and rows that leave ragged
    tiles, K padded to whole chunks, several configs and K splits (and, on a pretended 9-multiprocessor GPU,
    split tails: 20 tiles at 70 rows, 76 at 300), the words one or two chunks ahead (splits of one to five chunks:
    every exit of the three-chunk loop): within fp16 rounding of the weights (they are folded to
    fp16, as dequantization rounds them) of the fp32 reference."""
    from qkernels import gemm_wgmma as gw

    monkeypatch.setattr(gw, "sm_count", lambda device: 9)
    n, k = 200, 1152
    codes = torch.randint(0, top + 1, (n, k))
    n_groups = 1 if group is None else k // group
    scale = (torch.rand(n, n_groups) * 0.02 + 0.01).half()
    zero = {"integer": torch.randint(0, top + 1, (n, n_groups)).half(), "float": (torch.rand(n, n_groups) * top).half()}.get(zeros)
    pw = pack_weight(codes, scale, zero, layout, group, zero_const=zeros if zero is None else 0.0, run=32).to("cuda")
    configs = [None, GemmWgmmaConfig(block_n=64, num_warps=4, block_m=16, slots_per_step=1, stages=2, group_ahead=4, split_k=3),
               GemmWgmmaConfig(block_n=256, block_m=64, split_k=2, group_ahead=1),
               GemmWgmmaConfig(block_n=128, num_warps=4, block_m=128, stages=2, group_ahead=3),
               GemmWgmmaConfig(block_n=64, num_warps=4, block_m=16, tail_split=3),
               GemmWgmmaConfig(block_n=64, num_warps=4, block_m=64, stages=2, steps_per_box=4, split_k=2),
               GemmWgmmaConfig(block_n=128, num_warps=8, block_m=32, slots_per_step=1, stages=3, steps_per_box=2),
               GemmWgmmaConfig(block_n=64, num_warps=4, block_m=16, words_ahead=2),
               GemmWgmmaConfig(block_n=64, num_warps=4, block_m=64, stages=2, steps_per_box=4, split_k=2, words_ahead=2),
               GemmWgmmaConfig(block_n=128, num_warps=8, block_m=128, tail_split=2, words_ahead=2)]
    for m in (1, 70, 300):
        x = torch.randn(m, k, device="cuda", dtype=torch.float16)
        ref = lm.reference_matmul(x, pw).float()
        for config in configs:
            y = gemm_wgmma(x, pw, config, out=torch.full((m, n), float("nan"), device="cuda", dtype=torch.float16)).float()
            assert not y.isnan().any(), (m, config)
            assert ((y - ref).norm() / ref.norm()).item() < 1e-3, (m, config)
    offset = torch.randn(64 * k + 4, device="cuda", dtype=torch.float16)[4:].view(64, k)  # rows TMA cannot address in place
    assert torch.allclose(gemm_wgmma(offset, pw).float(), lm.reference_matmul(offset, pw).float(), rtol=2e-2, atol=2e-2)


def test_result_rows_name_the_config_of_the_kernels() -> None:
    """The benchmark's rows carry the tile config the wgmma GEMM, the tensor-core GEMV and the Triton kernels ran (the
    rules change between sessions); dequant + cuBLAS and torch carry none."""
    from dataclasses import asdict, replace

    from bench.kernel_latency import kernel_config, row
    from qkernels import gemv_mma as gm

    pw = grouped("uint4", 256, 1024)
    assert kernel_config(32, pw, "wgmma") == asdict(default_config(32, pw)) and kernel_config(32, pw, "wgmma")["split_k"] == 2
    assert kernel_config(1, pw, "gemv_mma") == asdict(gm.rule_config(pw))
    assert kernel_config(4, pw, "mma") == asdict(lm.mma_config(4, pw)) and kernel_config(64, pw, "mma") == asdict(lm.mma_config(64, pw))
    assert lm.mma_config(4, pw) == replace(lm.MMA_CONFIGS[("uint4", True)], num_stages=lm.mma_stages(pw, 16, lm.MMA_CONFIGS[("uint4", True)]))
    assert lm.mma_config(64, pw) == replace(lm.MMA_FOLD_CONFIGS[("uint4", True)], num_stages=lm.mma_stages(pw, 64, lm.MMA_FOLD_CONFIGS[("uint4", True)]))
    assert kernel_config(1, pw, "gemv") == asdict(lm.GEMV_PAIR_CONFIGS[("uint4", True)])  # (K >= 2N, but no long-K entry for W4)
    assert kernel_config(1, pw, "gemv_fp32") == asdict(lm.GEMV_CONFIGS[("uint4", True)])
    w3 = grouped("uint3", 256, 1024)
    assert kernel_config(1, w3, "gemv") == asdict(lm.GEMV_PAIR_LONG_K_CONFIGS[("uint3", True)]) != kernel_config(1, grouped("uint3", 1024, 1024), "gemv")
    assert kernel_config(200, pw, "gemm") == asdict(lm.gemm_config(200)) and kernel_config(1024, pw, "dequant") is None
    times = {"steady": 10.0}
    assert row(1024, 256, 32, "w4g128", "wgmma", 1000, times, times, 0.0, kernel_config(32, pw, "wgmma"))["config"]["block_m"] == 32
    assert "config" not in row(1024, 256, 1024, "w4g128", "dequant", 1000, times, times)

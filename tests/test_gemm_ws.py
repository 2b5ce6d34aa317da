"""The warp-specialized GEMM (qkernels/gemm_ws.py, Gluon, Hopper): what it takes, its config rules and checks on
CPU (Gluon has no interpreter), the kernel against the fp32 reference on a Hopper GPU."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from qkernels import lowbit_matmul as lm
from qkernels.gemm_ws import (GemmWsConfig, check_config, default_config, gemm_ws as run, launch_splits, stage_bytes, values_bytes, values_tma_fits,
                              ws_fits)
from qkernels.pack import CODE_BITS, pack_weight

requires_hopper = pytest.mark.skipif(not (torch.cuda.is_available() and lm.is_hopper(torch.device("cuda"))), reason="needs a Hopper GPU")


def packed(layout: str, n: int, k: int, group: int | None = 128, zeros: str | float = "integer"):
    """Random codes of ``layout`` with scales (and zero points: ``"integer"``, ``"float"``, or a constant) in groups."""
    top = 2 ** CODE_BITS[layout] - 1 if zeros != 1.0 else 2
    codes = torch.randint(0, top + 1, (n, k))
    n_groups = 1 if group is None else k // group
    scale = (torch.rand(n, n_groups) * 0.02 + 0.01).half()
    zero = {"integer": torch.randint(0, top + 1, (n, n_groups)).half(), "float": (torch.rand(n, n_groups) * top).half()}.get(zeros)
    return pack_weight(codes, scale, zero, layout, group, zero_const=zeros if zero is None else 0.0, run=32)


def test_takes_up_to_64_fp16_rows_of_uint124_with_groups_that_fit_a_unit() -> None:
    pw = packed("uint4", 64, 1024)
    assert ws_fits(pw, torch.float16, 1) and ws_fits(pw, torch.float16, 64)
    assert not ws_fits(pw, torch.float16, 65) and not ws_fits(pw, torch.bfloat16, 16)
    assert not ws_fits(packed("uint3", 64, 1024), torch.float16, 16)
    assert ws_fits(packed("uint2", 64, 1024, group=None, zeros=1.0), torch.float16, 16)  # one scale a row
    assert ws_fits(packed("uint4", 64, 1024, group=64), torch.float16, 16)
    assert not ws_fits(packed("uint4", 64, 1024, group=32), torch.float16, 16)  # eight groups a unit
    assert not ws_fits(packed("uint4", 64, 1000, group=None), torch.float16, 16)  # K not a multiple of 64
    with pytest.raises(ValueError, match="got torch.float16, M=65, K=1024, uint4, run 32, group 128"):
        run(torch.randn(65, 1024, dtype=torch.float16), pw)
    with pytest.raises(ValueError, match="runs on a Hopper GPU .* got x on cpu, the weight on cpu"):
        run(torch.randn(16, 1024, dtype=torch.float16), pw)


def test_config_errors_name_the_bad_values() -> None:
    with pytest.raises(ValueError, match=r"block_n=96 \(64, 128 or 256\)"):
        check_config(GemmWsConfig(block_n=96), 64)
    with pytest.raises(ValueError, match="stages=5 .* 49152 a stage at block_n=128, 64 activation rows"):
        check_config(GemmWsConfig(stages=5), 64)
    with pytest.raises(ValueError, match=r"split_k=0 \(at least 1\)"):
        check_config(GemmWsConfig(split_k=0), 64)
    with pytest.raises(ValueError, match=r"values_ahead=3 \(1 or 2\)"):
        check_config(GemmWsConfig(values_ahead=3), 64)
    with pytest.raises(ValueError, match="apart=True with block_n=256"):
        check_config(GemmWsConfig(block_n=256, stages=2, apart=True), 64)
    check_config(GemmWsConfig(stages=8), 16)  # 24 KiB a stage at 16 rows
    assert stage_bytes(128, 64) == 4 * 64 * 64 * 2 + 128 * 32 * 4


def test_values_by_tma_take_ring_room_and_aligned_rows() -> None:
    """``values_tma``: a unit's groups of scales and zero points for block_n rows in every ring buffer (four stages of
    128 rows still fit beside the 64-row epilogue, five do not); the group-major rows must be 16-byte aligned."""
    w4 = packed("uint4", 256, 1024)
    assert values_bytes(w4, GemmWsConfig()) == 0
    assert values_bytes(w4, GemmWsConfig(values_tma=True)) == 2 * 128 * 2 * 2  # two groups a unit, scales and zero points
    assert values_bytes(packed("uint2", 256, 1024, group=None, zeros=1.0), GemmWsConfig(values_tma=True)) == 128 * 2  # one scale a row
    assert values_bytes(packed("uint4", 256, 1024, group=64), GemmWsConfig(block_n=64, values_tma=True)) == 4 * 64 * 2 * 2
    config = GemmWsConfig(values_tma=True)
    check_config(config, 64, values_bytes(w4, config))
    with pytest.raises(ValueError, match="stages=5 .* 50176 a stage at block_n=128, 64 activation rows"):
        check_config(GemmWsConfig(stages=5, values_tma=True), 64, values_bytes(w4, config))
    assert values_tma_fits(w4) and values_tma_fits(packed("uint4", 200, 1152))
    odd = packed("uint4", 100, 1024)  # group-major rows of 100 fp16 scales: 200 bytes
    assert not values_tma_fits(odd)
    with pytest.raises(ValueError, match=r"values_tma=True .*\(N a multiple of 8\); got N=100"):
        run(torch.randn(16, 1024, dtype=torch.float16), odd, GemmWsConfig(stages=3, values_tma=True))


def test_the_benchmark_times_it_beside_the_dispatchers_path_on_hopper(monkeypatch: pytest.MonkeyPatch) -> None:
    """Picked by the dispatcher on Hopper for 17-64 rows of weights above 4096^2 codes with aligned group-major values
    (33-64 with one scale a row), else listed beside the wgmma GEMM by ``bench.kernel_latency`` wherever it fits, and
    reachable by name."""
    from bench import kernel_latency

    pw = packed("uint4", 256, 1024)
    monkeypatch.setattr(lm, "is_hopper", lambda device: device.type == "cuda")
    assert lm.pick_path(64, pw, torch.device("cuda")) == "wgmma"  # a small weight: the wgmma GEMM
    assert "wgmma_ws" in kernel_latency.paths_for(64, pw) and "wgmma_ws" not in kernel_latency.paths_for(65, pw)
    large = replace(pw, n=8192, k=8192)  # (the rule reads the shape; nothing runs)
    assert [lm.pick_path(m, large, torch.device("cuda")) for m in (16, 17, 64, 65)] == ["wgmma", "wgmma_ws", "wgmma_ws", "wgmma"]
    assert not lm.wgmma_ws_preferred(24, replace(large, scale=large.scale[:, :1], zero=None))  # one scale a row: from 33
    assert lm.wgmma_ws_preferred(40, replace(large, scale=large.scale[:, :1], zero=None))
    assert not lm.wgmma_ws_preferred(64, replace(packed("uint4", 100, 1024), n=8200, k=8192))  # 200-byte rows of scales: no TMA
    assert lm.wgmma_ws_fits(pw, torch.float16, 64) == ws_fits(pw, torch.float16, 64)
    assert kernel_latency.path_config(64, pw, "wgmma_ws") == default_config(64, pw)
    assert "wgmma_ws" in lm.PATHS


def test_default_splits_fill_one_wave() -> None:
    """The session-25 sweep's best configs at 64 rows (132 multiprocessors off the GPU): 2 splits at 8192^2, 4 at
    14336x4096 (in x out), 1 at 4096x14336; two programs a multiprocessor at 16 rows (a quarter of the ring) double
    the splits. The group values come by TMA wherever their rows are aligned (session 27: 6.5-20% faster at 64 rows)."""
    big = packed("uint4", 8192, 8192)
    assert default_config(64, big) == GemmWsConfig(128, 4, 2, values_tma=True)
    assert default_config(64, packed("uint4", 4096, 14336)) == GemmWsConfig(128, 4, 4, values_tma=True)
    assert default_config(64, packed("uint4", 14336, 4096)) == GemmWsConfig(128, 4, 1, values_tma=True)
    assert default_config(16, big) == GemmWsConfig(128, 4, 4, values_tma=True)
    assert not default_config(64, packed("uint4", 100, 1024)).values_tma  # 200-byte rows of scales
    assert default_config(64, packed("uint4", 256, 1024)).split_k == 2  # 4 chunks: 3 splits would leave the last one empty


def test_a_launch_runs_no_empty_split() -> None:
    """``ceil(chunks / split_k)`` chunks a split: the splits past the last chunk are dropped (they only added zeros), so
    the kernel's loop always runs (ptxas serialized the wgmmas of builds with an empty-loop path)."""
    assert launch_splits(packed("uint2", 64, 1152), GemmWsConfig(split_k=5)) == 3  # 3 chunks of 512 K
    assert launch_splits(packed("uint4", 64, 1280), GemmWsConfig(split_k=4)) == 3  # 5 chunks: 2, 2, 1
    assert launch_splits(packed("uint4", 64, 8192), GemmWsConfig(split_k=2)) == 2
    assert launch_splits(packed("uint1", 64, 1152), GemmWsConfig(split_k=1)) == 1


@requires_hopper
@pytest.mark.parametrize(
    "layout,group,zeros",
    [("uint4", 128, "integer"), ("uint4", 64, 7.5), ("uint4", None, "float"), ("uint2", 128, "float"), ("uint2", None, 1.0),
     ("uint1", 128, "integer")],
)
def test_matches_the_reference_on_ragged_shapes(layout: str, group: int | None, zeros: str | float) -> None:
    """Random codes, scales and zero points, outputs poisoned with NaN, batches and weight rows that leave ragged
    tiles, K a multiple of 64 but not of a chunk (W4: 5 chunks, W2 3, W1 2, the last partly past K), every block_n,
    2 to 4 stages, 1 to 5 K splits (those past the last chunk dropped at launch), the group values one or two units ahead or by TMA with the
    unit's buffer, the consumers a partition per 64 rows or one for all: within fp16 rounding of the weights of the fp32
    reference."""
    n, k = 200, 1152
    pw = packed(layout, n, k, group, zeros).to("cuda")
    configs = [None, GemmWsConfig(64, 2, 1), GemmWsConfig(128, 3, 2), GemmWsConfig(256, 2, 3), GemmWsConfig(128, 4, 5, values_ahead=1),
               GemmWsConfig(128, 3, 3, apart=True), GemmWsConfig(128, 4, 1, apart=True), GemmWsConfig(128, 3, 2, values_tma=True),
               GemmWsConfig(64, 2, 1, values_tma=True), GemmWsConfig(128, 3, 3, apart=True, values_tma=True)]
    for m in (1, 16, 40, 64):
        x = torch.randn(m, k, device="cuda", dtype=torch.float16)
        ref = lm.reference_matmul(x, pw).float()
        for config in configs:
            y = run(x, pw, config, out=torch.full((m, n), float("nan"), device="cuda", dtype=torch.float16)).float()
            assert not y.isnan().any(), (m, config)
            assert ((y - ref).norm() / ref.norm()).item() < 1e-3, (m, config)
    offset = torch.randn(64 * k + 4, device="cuda", dtype=torch.float16)[4:].view(64, k)  # rows TMA cannot address in place
    assert torch.allclose(run(offset, pw).float(), lm.reference_matmul(offset, pw).float(), rtol=2e-2, atol=2e-2)


@requires_hopper
@pytest.mark.parametrize("apart", [False, True])
def test_the_split_counters_are_left_at_zero(apart: bool) -> None:
    """A split launch leaves its counters at 0 (the next launch of any split kernel on the stream reads them): two
    programs, and apart a sub-tile (and a counter) per consumer partition; the splits add up in order, so a second
    launch gives the same bits."""
    pw = packed("uint4", 256, 4096).to("cuda")
    x = torch.randn(64, 4096, device="cuda", dtype=torch.float16)
    config = GemmWsConfig(128, 4, 4, apart=apart)
    y = run(x, pw, config)
    _, count = lm.split_buffers(y, (4, 1, 4), 64 * 64)
    assert int(count[:4].abs().sum()) == 0
    assert torch.allclose(y.float(), lm.reference_matmul(x, pw).float(), rtol=2e-2, atol=2e-2)
    assert torch.equal(run(x, pw, config), y)

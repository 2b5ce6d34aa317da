"""bench.config_ab: variants parsed against the config's fields, bad input named, a cell's rows (CPU, stubbed timer)."""

from __future__ import annotations

import re
from dataclasses import asdict, replace

import pytest
import torch

from bench import config_ab, kernel_latency
from qkernels.gemm_wgmma import GemmWgmmaConfig, check_config, default_config
from qkernels.gemv_mma import GemvMmaConfig
from qkernels.pack import pack_weight


def test_variants_are_fields_of_the_paths_config() -> None:
    assert config_ab.parse_variant("words_ahead=2, split_k=3", GemmWgmmaConfig) == {"words_ahead": 2, "split_k": 3}
    assert config_ab.parse_variant("route=true,maxnreg=none", GemvMmaConfig) == {"route": True, "maxnreg": None}
    with pytest.raises(ValueError, match=r"'group_ahead' is not a field of GemvMmaConfig; choose from \['block_n', 'num_warps'"):
        config_ab.parse_variant("group_ahead=2", GemvMmaConfig)
    with pytest.raises(ValueError, match=r"split_k='three' is not an integer, true, false or none"):
        config_ab.parse_variant("split_k=three", GemmWgmmaConfig)
    with pytest.raises(ValueError, match=r"'split_k' is not field=value"):
        config_ab.parse_variant("split_k", GemmWgmmaConfig)


@pytest.mark.parametrize(
    "argv,message",
    [(["--path", "dequant"], r"--path 'dequant' is not valid; choose from \['wgmma', 'wgmma_ws', 'gemv_mma', 'mma', 'gemm', 'gemv', 'gemv_fp32'\]"),
     (["--path", "mma", "--batches", "129"], r"--batches \[129\]: mma takes 1 to 128 rows"),
     (["--path", "mma", "--variant", "words_ahead=2"], r"'words_ahead' is not a field of MmaConfig"),
     (["--path", "gemv_mma", "--batches", "1,16"], r"--batches \[16\]: gemv_mma takes 1 to 8 rows"),
     (["--path", "wgmma", "--variant", "stages=2,bogus=1"], r"'bogus' is not a field of GemmWgmmaConfig"),
     (["--path", "wgmma", "--kernels", "w4g128,w5"], r"unknown kernels \['w5'\]; choose from \['w4g128'"),
     (["--path", "mma", "--save-best"], r"--save-best keeps configs of \['gemv_mma', 'wgmma'\] .*; --path is 'mma'"),
     (["--path", "gemv_mma", "--batches", "1", "--save-best", "--min-gain", "1.5"], r"--min-gain 1.5 is not a fraction in \[0, 1\)")],
)
def test_bad_arguments_are_named(argv: list[str], message: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        config_ab.main(argv)
    assert re.search(message, capsys.readouterr().err)


def test_a_cell_times_the_rule_and_its_variants_beside_cublas(monkeypatch: pytest.MonkeyPatch) -> None:
    """cuBLAS, the dispatcher's config (``rule``) and each variant in one timing; a variant that fails its config
    check, or is wrong, is reported with the reason and left out of the timing."""
    pw = pack_weight(torch.randint(0, 16, (256, 2048)), torch.rand(256, 16).half(), torch.randint(0, 16, (256, 16)).half(), "uint4", 128,
                     run=32)
    monkeypatch.setattr(config_ab, "fp16_calls", lambda x, n: (0, lambda: ["cublas call"]))
    monkeypatch.setattr(config_ab, "lowbit_calls", lambda x, pw, path, config: lambda: [config])
    timed: list[dict] = []

    def time_calls(calls: dict) -> dict:
        timed.append(calls)
        return {label: 10.0 * (i + 1) for i, label in enumerate(calls)}  # cuBLAS 10, the rule 20, the next 30

    def error_of(x, pw, path, config: GemmWgmmaConfig) -> float:  # (as relative_error, without running a kernel)
        check_config(config)
        return 0.5 if config.split_k == 5 else 1e-4

    monkeypatch.setattr(kernel_latency, "relative_error", error_of)
    variants = [{"words_ahead": 2}, {"words_ahead": 3}, {"split_k": 5}]
    rows = config_ab.compare_cell("wgmma", 64, pw, variants, torch.zeros(64, 2048), time_calls)
    assert [row["variant"] for row in rows] == ["fp16", "rule", "words_ahead=2", "words_ahead=3", "split_k=5"]
    assert list(timed[0]) == ["cublas", "rule", "words_ahead=2"]
    assert rows[1]["config"] == asdict(default_config(64, pw)) and rows[1]["x_rule"] == 1.0 and rows[1]["x_cublas"] == 0.5
    assert rows[2]["config"]["words_ahead"] == 2 and rows[2]["us"] == 30.0 and rows[2]["x_rule"] == pytest.approx(2 / 3)
    assert "words_ahead=3 (1 or 2)" in rows[3]["failed"] and "us" not in rows[3]
    assert rows[4]["failed"] == "relative error 5.0e-01 > 0.002" and "us" not in rows[4]
    table = config_ab.markdown([dict(K=2048, N=256, M=64, kernel="w4g128") | row for row in rows])
    assert "| 2048x256 | 64 | w4g128 | words_ahead=2 | 30.00 | 0.33 | 0.667 | 1.0e-04 |" in table
    assert "| split_k=5 | failed: relative error" in table


def test_the_triton_kernels_vary_from_the_config_they_run(monkeypatch: pytest.MonkeyPatch) -> None:
    from qkernels import lowbit_matmul as lm

    pw = pack_weight(torch.randint(0, 4, (256, 2048)), torch.rand(256, 16).half(), torch.randint(0, 4, (256, 16)).half(), "uint2", 128,
                     run=32)
    monkeypatch.setattr(config_ab, "fp16_calls", lambda x, n: (0, lambda: ["cublas call"]))
    monkeypatch.setattr(config_ab, "lowbit_calls", lambda x, pw, path, config: lambda: [config])
    rows = config_ab.compare_cell("mma", 16, pw, [{"split_k": 2}], torch.zeros(16, 2048), lambda calls: dict.fromkeys(calls, 5.0),
                                  lambda config: (0.0, None))
    assert rows[1]["config"] == asdict(lm.mma_config(16, pw)) and rows[2]["config"] == asdict(replace(lm.mma_config(16, pw), split_k=2))


def test_json_is_replaced_whole(tmp_path) -> None:
    target = tmp_path / "out" / "ab.json"
    config_ab.write_json(target, {"rows": [1]})
    config_ab.write_json(target, {"rows": [1, 2]})
    assert target.read_text().count("\n") > 1 and '"rows"' in target.read_text()
    assert [p.name for p in target.parent.iterdir()] == ["ab.json"]  # no temporary file left


def test_the_best_variant_is_kept_only_where_it_beats_the_rule() -> None:
    """--save-best's choice: the fastest timed variant, if it saves at least ``min_gain`` of the rule's time; failed
    variants, cuBLAS and the tiled copy of the words never; the key is the one the kernel's tuned table uses."""
    from qkernels import gemm_wgmma, gemv_mma

    rows = [dict(path="cublas", variant="fp16", us=30.0), dict(path="gemv_mma", variant="rule", us=10.0),
            dict(path="gemv_mma", variant="k_warps=4", us=9.5), dict(path="gemv_mma", variant="split_k=3", us=9.9),
            dict(path="gemv_mma", variant="split_k=9", failed="relative error")]
    assert config_ab.best_variant(rows, 0.02)["variant"] == "k_warps=4"
    assert config_ab.best_variant(rows, 0.06) is None  # 5% faster: not enough
    assert config_ab.best_variant(rows[:2] + rows[4:], 0.0) is None  # nothing but the rule timed
    assert config_ab.best_variant([rows[0], rows[2]], 0.0) is None  # the rule did not run: nothing to beat
    tiled = dict(path="gemv_mma", variant="tiled_words=True", us=9.0, config={"tiled_words": True})
    assert config_ab.best_variant(rows + [tiled], 0.02)["variant"] == "k_warps=4"  # (a copy of the words: never saved)
    pw = pack_weight(torch.randint(0, 4, (256, 2048)), torch.rand(256, 16).half(), None, "uint2", 128, zero_const=1.0, run=32)
    assert config_ab.tuned_key("gemv_mma", 1, pw) == gemv_mma.tuned_key(pw)
    assert config_ab.tuned_key("wgmma", 64, pw) == gemm_wgmma.tuned_key(64, pw)


@pytest.mark.parametrize("kernels, shapes, batches, named", [("w9", "8192x8192", "1", "unknown kernels ['w9']"),
                                                             ("w4g128", "8192x", "1", "--shapes '8192x' is not a comma list of INxOUT"),
                                                             ("w4g128", "8192x8192x2", "1", "--shapes [(8192, 8192, 2)] are not INxOUT"),
                                                             ("w4g128", "8192x8192", "one", "--batches 'one' is not")])
def test_the_grid_names_what_it_cannot_read(kernels: str, shapes: str, batches: str, named: str) -> None:
    """bench.config_ab.parse_grid (shared with bench.source_ab)."""
    with pytest.raises(ValueError, match=re.escape(named)):
        config_ab.parse_grid(kernels, shapes, batches)
    assert config_ab.parse_grid("w4g128,ternary2", "4096x14336,8192x8192", "1,64") == (["w4g128", "ternary2"], [(4096, 14336), (8192, 8192)], [1, 64])

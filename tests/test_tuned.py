"""Tuned kernel configs on disk (qkernels/tuned.py): per GPU model, merged under a lock, read before the rules."""

from __future__ import annotations

import json
import multiprocessing
from pathlib import Path

import pytest
import torch

from qkernels import gemm_wgmma as gw
from qkernels import gemv_mma as gm
from qkernels import tuned
from qkernels.pack import PackedWeight, pack_weight

GPU = "NVIDIA Test GPU 80GB"


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh directory, and every device (the CPU too) taken for one GPU of model ``GPU``."""
    monkeypatch.setenv("QKERNELS_TUNED_DIR", str(tmp_path))
    monkeypatch.setattr(tuned, "gpu_of", lambda device: GPU)
    return tmp_path


def w2(n: int = 64, k: int = 1024):
    return pack_weight(torch.randint(0, 4, (n, k)), torch.rand(n, k // 128).half(), torch.randint(0, 4, (n, k // 128)).half(),
                       "uint2", 128, run=32)


def test_saved_configs_come_before_the_rules_and_after_this_process_tuning(store: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pw = w2()
    plain = gm.GemvMmaConfig(block_n=128, num_warps=8, split_k=8)
    boxed = gw.GemmWgmmaConfig(block_n=128, num_warps=4, block_m=64, split_k=4)
    assert gm.config_for(pw) == gm.rule_config(pw) and gw.config_for(64, pw) == gw.default_config(64, pw)  # nothing saved yet
    path = tuned.save(GPU, "gemv_mma", {gm.tuned_key(pw): (plain, 9.87654)})
    tuned.save(GPU, "wgmma", {gw.tuned_key(64, pw): (boxed, 20.0)})
    assert path == store / "nvidia_test_gpu_80gb.json"
    data = json.loads(path.read_text())
    assert data["gpu"] == GPU and data["gemv_mma"][0]["us"] == 9.877 and data["gemv_mma"][0]["key"] == list(gm.tuned_key(pw))
    assert gm.config_for(pw) == plain and gw.config_for(64, pw) == boxed and gw.config_for(33, pw) == boxed  # the same bucket
    assert gw.config_for(128, pw) == gw.default_config(128, pw)
    mine = gm.GemvMmaConfig(block_n=64, num_warps=4, split_k=2)
    monkeypatch.setitem(gm.TUNED, gm.tuned_key(pw), mine)
    assert gm.config_for(pw) == mine  # this process's tuning wins
    monkeypatch.delitem(gm.TUNED, gm.tuned_key(pw))
    monkeypatch.setattr(tuned, "gpu_of", lambda device: "NVIDIA Other GPU")
    assert gm.config_for(pw) == gm.rule_config(pw)  # another model: its own (absent) file


def test_a_saved_tma_config_that_these_weights_cannot_take_falls_back_to_the_rules(store: Path) -> None:
    pw = w2()
    tuned.save(GPU, "gemv_mma", {gm.tuned_key(pw): (gm.GemvMmaConfig(stages=2), 5.0)})
    assert not gm.tma_fits(pw, gm.GemvMmaConfig(stages=2))  # no Hopper here
    assert gm.config_for(pw) == gm.rule_config(pw)


def test_merges_keep_other_keys_and_kernels_and_drop_what_the_rules_won(store: Path) -> None:
    a, b, c = ("uint2", True, 128, 64, 1024), ("uint4", True, 128, 64, 1024), ("uint1", True, 128, 64, 1024)
    tuned.save(GPU, "gemv_mma", {a: (gm.GemvMmaConfig(split_k=2), 1.0), b: (gm.GemvMmaConfig(split_k=8), 2.0)})
    tuned.save(GPU, "wgmma", {a + (64,): (gw.GemmWgmmaConfig(split_k=2), 3.0)})
    tuned.save(GPU, "gemv_mma", {c: (gm.GemvMmaConfig(num_warps=8, block_n=128), 4.0)}, drop=(b,))
    table = tuned.saved("gemv_mma", gm.GemvMmaConfig, torch.device("cpu"))
    assert table == {a: gm.GemvMmaConfig(split_k=2), c: gm.GemvMmaConfig(num_warps=8, block_n=128)}
    assert tuned.saved("wgmma", gw.GemmWgmmaConfig, torch.device("cpu")) == {a + (64,): gw.GemmWgmmaConfig(split_k=2)}
    with pytest.raises(ValueError, match=r"kernel='mma'; the tables kept on disk are \('gemv_mma', 'wgmma'\)"):
        tuned.save(GPU, "mma", {})


def test_a_bad_file_is_an_error_that_names_it(store: Path) -> None:
    path = tuned.path_for(GPU)
    path.write_text("{not json")
    with pytest.raises(ValueError, match=f"tuned-config file {path} cannot be read"):
        tuned.saved("gemv_mma", gm.GemvMmaConfig, torch.device("cpu"))
    with pytest.raises(ValueError, match="cannot be read"):  # and saving never overwrites it
        tuned.save(GPU, "gemv_mma", {("uint2",): (gm.GemvMmaConfig(), 1.0)})
    assert path.read_text() == "{not json"
    path.write_text(json.dumps({"gemv_mma": [{"key": ["uint2"], "config": {"block_n": 64, "tiles": 3}}]}))
    with pytest.raises(ValueError, match=r"has fields \['tiles'\] that GemvMmaConfig lacks"):
        tuned.saved("gemv_mma", gm.GemvMmaConfig, torch.device("cpu"))


def _save_keys(directory: str, first: int) -> None:
    import os

    os.environ["QKERNELS_TUNED_DIR"] = directory
    for i in range(first, first + 5):
        tuned.save(GPU, "gemv_mma", {("uint2", True, 128, i, 1024): (gm.GemvMmaConfig(split_k=2), float(i))})


def test_parallel_savers_lose_nothing(store: Path) -> None:
    """Four processes merging five keys each into the same file at once: all twenty are there."""
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_save_keys, args=(str(store), 5 * i)) for i in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
        assert worker.exitcode == 0
    keys = {tuple(e["key"]) for e in json.loads(tuned.path_for(GPU).read_text())["gemv_mma"]}
    assert keys == {("uint2", True, 128, i, 1024) for i in range(20)}
    assert not list(store.glob("*.part"))


H200_GEMV_KEYS = {("uint4", True, 128, 8192, 8192), ("uint4", True, 128, 16384, 16384), ("uint4", True, 128, 4096, 4096),
                  ("uint2", False, 8192, 8192, 8192), ("uint2", False, 4096, 14336, 4096), ("uint2", True, 128, 14336, 4096),
                  ("uint4", True, 128, 14336, 4096)}
H100_GEMV_KEYS = {("uint4", True, 128, 8192, 8192), ("uint2", True, 128, 8192, 8192), ("uint2", False, 8192, 8192, 8192)}


@pytest.mark.parametrize("gpu,keys", [("NVIDIA H200", H200_GEMV_KEYS), ("NVIDIA H100 80GB HBM3", H100_GEMV_KEYS)], ids=["h200", "h100"])
def test_the_shipped_gemv_tables_load_and_fit_their_shapes(monkeypatch: pytest.MonkeyPatch, gpu: str, keys: set) -> None:
    """qkernels/tuned/nvidia_h200.json (measured winners: bench/results/kernel_latency_h200_session14_probes.json, and
    kernel_latency_h200_session23_k_warps.json) and nvidia_h100_80gb_hbm3.json (session 29's tuner and A/B at 8192^2:
    bench/results/kernel_latency_h100.md): every entry reads as a config that its shape takes, a W4 TMA config whose
    scale box fits, or warp groups along K on plain loads (session 23)."""
    monkeypatch.delenv("QKERNELS_TUNED_DIR", raising=False)
    monkeypatch.setattr(tuned, "gpu_of", lambda device: gpu)
    table = tuned.saved("gemv_mma", gm.GemvMmaConfig, torch.device("cpu"))
    assert set(table) == keys
    for (layout, zeros, group, n, k), config in table.items():
        slots = 8 if layout == "uint4" else 16
        groups = torch.ones(1, k // group, dtype=torch.float16).expand(n, -1)  # the shapes only (no n x k tensors)
        words = torch.zeros(1, k // slots, dtype=torch.int32).expand(n, -1)  # 32 words a chunk row
        pw = PackedWeight(layout, words, None, groups, groups if zeros else None, 0.0 if zeros else 1.0, n, k, 32, group)
        assert gm.tuned_key(pw) == (layout, zeros, group, n, k)
        if config.k_warps > 1:  # the launcher's checks pass: a plain-loads config whose tile the warp groups divide
            assert config.stages == 0 and gm._launch_spec(pw, config)[0] is gm._gemv_kw_kernel
        else:
            assert config.stages == 3 and gm.group_box(pw, config) <= gm.MAX_GROUP_BOX

def test_the_shipped_h200_wgmma_entries_fit_their_shapes(monkeypatch: pytest.MonkeyPatch) -> None:
    """The wgmma GEMM's shipped entries (session 24, `bench.config_ab --save-best` at 4096^2, 32 and 64 rows:
    bench/results/kernel_latency_h200_session24_4096.json): each reads back, under the key that its kind, shape and
    batch bucket give, as a config the launcher accepts (four steps a box fit its shape) whose K split differs from the
    rule's (the only field the winners changed)."""
    monkeypatch.delenv("QKERNELS_TUNED_DIR", raising=False)
    monkeypatch.setattr(tuned, "gpu_of", lambda device: "NVIDIA H200")
    table = tuned.saved("wgmma", gw.GemmWgmmaConfig, torch.device("cpu"))
    assert set(table) == {("uint1", True, 128, 4096, 4096, 32), ("uint4", True, 128, 4096, 4096, 32), ("uint4", True, 128, 4096, 4096, 64),
                          ("uint2", True, 128, 4096, 4096, 64), ("uint2", False, 4096, 4096, 4096, 64)}
    for (layout, zeros, group, n, k, bucket), config in table.items():
        slots = {"uint1": 32, "uint2": 16, "uint4": 8}[layout]
        groups = torch.ones(1, k // group, dtype=torch.float16).expand(n, -1)
        words = torch.zeros(1, k // slots, dtype=torch.int32).expand(n, -1)
        pw = PackedWeight(layout, words, None, groups, groups if zeros else None, 0.0 if zeros else 1.0, n, k, 32, group)
        assert gw.tuned_key(bucket, pw) == (layout, zeros, group, n, k, bucket)
        gw.check_config(config)
        assert config.block_m == bucket and config.split_k != gw.default_config(bucket, pw).split_k and gw.boxes_fit(pw, config)

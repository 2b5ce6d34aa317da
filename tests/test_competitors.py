"""The published kernels timed beside the project's (bench/competitors.py): each holds the weight it is given (or, for
NF4, says which weight it holds), on the CPU where its library runs there, on a GPU in the benchmark itself."""

import pytest
import torch

from bench import competitors as comp
from bench.kernel_latency import LOWBIT_KINDS, main, random_packed
from qkernels.pack import dequantize_packed, pack_weight


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_tinygemm_holds_the_project_weight_with_its_zero_points_moved_after_the_scale():
    torch.manual_seed(0)
    pw = random_packed(LOWBIT_KINDS["w4g128"], 96, 512, device="cpu")
    tinygemm = comp.COMPETITORS["tinygemm"]
    assert relative(tinygemm.reference(pw, tinygemm.hold(pw)), dequantize_packed(pw)) < 5e-3  # bf16 scales and zero points
    x = torch.randn(3, 512, dtype=torch.float16)
    assert comp.competitor_error(x, pw, "tinygemm") < 1e-2


def test_tinygemm_takes_symmetric_weights_by_their_code_offset():
    torch.manual_seed(1)
    codes = torch.randint(0, 16, (64, 256))
    scale = (torch.rand(64, 4) * 0.02 + 0.01).half()
    pw = pack_weight(codes, scale, None, "uint4", 64, zero_const=7.5)
    tinygemm = comp.COMPETITORS["tinygemm"]
    assert relative(tinygemm.reference(pw, tinygemm.hold(pw)), dequantize_packed(pw)) < 5e-3
    assert comp.competitor_error(torch.randn(2, 256, dtype=torch.float16), pw, "tinygemm") < 1e-2
    assert not comp.COMPETITORS["gemlite"].takes(pw)  # GemLite shifts codes by integers only


@pytest.mark.parametrize("kind, tinygemm, gemlite, nf4", [
    ("w4g128", True, True, True), ("w4g128s", True, True, True), ("w2g128", False, True, False), ("w1g128", False, True, False),
    ("ternary2", False, True, False), ("w3g128", False, False, False),
])
def test_what_each_competitor_takes(kind, tinygemm, gemlite, nf4):
    pw = random_packed(LOWBIT_KINDS[kind], 64, 512, device="cpu")
    assert comp.COMPETITORS["tinygemm"].takes(pw) is tinygemm
    assert comp.COMPETITORS["gemlite"].takes(pw) is gemlite
    assert comp.COMPETITORS["bnb_nf4"].takes(pw) is nf4


def test_tinygemm_tiles_k_as_widely_as_k_allows():
    assert [comp.tinygemm_inner_k_tiles(k) for k in (1024, 192, 96, 80)] == [8, 4, 2, None]


def test_names_are_checked_and_all_means_every_one():
    assert comp.parse("all") == list(comp.COMPETITORS)
    assert comp.parse("tinygemm,bnb_nf4") == ["tinygemm", "bnb_nf4"]
    with pytest.raises(ValueError, match=r"unknown competitors \['marlin'\]; choose from \['tinygemm', 'gemlite', 'bnb_nf4'\]"):
        comp.parse("tinygemm,marlin")


def test_the_benchmark_refuses_an_unknown_competitor(capsys):
    with pytest.raises(SystemExit):
        main(["--competitors", "marlin"])
    assert "unknown competitors ['marlin']" in capsys.readouterr().err


def test_one_that_cannot_run_here_is_left_out_and_says_why(capsys):
    kept = comp.runnable(["tinygemm", "gemlite"], torch.device("cpu"))
    assert kept == ["tinygemm"]
    assert "competitor gemlite left out: gemlite runs on a CUDA GPU only" in capsys.readouterr().out


def test_a_missing_package_is_a_reason_not_a_crash(monkeypatch):
    monkeypatch.setattr(comp.BnbNf4, "module", "no_such_package_here")
    assert "no_such_package_here does not import here (ModuleNotFoundError" in comp.COMPETITORS["bnb_nf4"].why_not(torch.device("cpu"))


def test_a_call_that_fails_leaves_its_cell_out_with_the_reason(monkeypatch):
    monkeypatch.setattr(comp, "capture", lambda fn: fn())  # (the CUDA graph capture itself needs a GPU)
    pw = random_packed(LOWBIT_KINDS["w4g128"], 64, 256, device="cpu")
    x = torch.randn(1, 256, dtype=torch.float16)
    assert isinstance(comp.trial(x, pw, "tinygemm"), comp.Held)

    def boom(x, held):
        raise RuntimeError("operation not permitted when stream is capturing\nmore")

    monkeypatch.setattr(comp.Tinygemm, "matmul", lambda self, x, held: boom(x, held))
    assert comp.trial(x, pw, "tinygemm") == "RuntimeError: operation not permitted when stream is capturing"


def test_bnb_nf4_is_measured_against_its_own_dequantized_weight():
    pytest.importorskip("bitsandbytes")
    torch.manual_seed(2)
    pw = random_packed(LOWBIT_KINDS["w4g128"], 64, 512, device="cpu")
    held = comp.COMPETITORS["bnb_nf4"].hold(pw)
    nf4 = comp.COMPETITORS["bnb_nf4"].reference(pw, held)
    assert 1e-3 < relative(nf4, dequantize_packed(pw)) < 0.2  # requantized: near the weight, not equal to it
    assert comp.competitor_error(torch.randn(1, 512, dtype=torch.float16), pw, "bnb_nf4") < 1e-2
    assert held.nbytes == 64 * 512 // 2 + 64 * 512 // 64 * 4  # two codes a byte, an fp32 absmax a block of 64


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_benchmark_times_each_runnable_competitor_on_the_gpu():
    from bench.kernel_latency import measure

    names = tuple(comp.runnable(list(comp.COMPETITORS), torch.device("cuda")))
    assert "tinygemm" in names  # part of torch
    rows = next(measure([(1024, 512)], [1, 16], ["w4g128", "w2g128"], ("steady",), names))
    for name in names:
        mine = [r for r in rows if r["path"] == name]
        assert mine, f"no rows for {name}"
        for r in mine:
            assert r["steady_us"] > 0 and r["rel_error"] < 1e-2, r


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_decode_runs_on_each_runnable_competitor():
    from bench.decode_latency import ARCHS, measure

    for name in comp.runnable(list(comp.COMPETITORS), torch.device("cuda")):
        row = measure(ARCHS["tiny"], f"w4g128@{name}", tokens=8, fuse=True)
        assert row["tokens_per_s_graph"] > 0 and row["weight_gb"] > 0, row

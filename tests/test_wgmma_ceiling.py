"""bench.wgmma_ceiling: the arguments it refuses, the GEMM floor's arithmetic, and (Hopper only) that its loop runs
every wgmma it times. Its kernel compiles for sm_90 in tests/test_compile_check.py."""

from __future__ import annotations

import pytest
import torch

from bench.wgmma_ceiling import gemm_floor_us, launch, main

HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9


@pytest.mark.parametrize("argv, named", [(["--n", "48"], "48"), (["--operands", "rr"], "rr"), (["--programs", "0"], "0"),
                                          (["--gemm", "64x8192"], "64x8192"), (["--in-flight", "one"], "one")])
def test_bad_arguments_are_named(argv: list[str], named: str, capsys) -> None:
    with pytest.raises(SystemExit):
        main(argv)
    assert named in capsys.readouterr().err


def test_the_gemm_floor_takes_the_fastest_rate_at_its_rows() -> None:
    rows = [dict(n=64, tflops=500.0), dict(n=64, tflops=1000.0), dict(n=128, tflops=2000.0)]
    assert gemm_floor_us(64, 8192, 8192, rows) == pytest.approx(2 * 64 * 8192 * 8192 / 1e15 * 1e6)
    assert gemm_floor_us(32, 8192, 8192, rows) is None


@pytest.mark.skipif(not HOPPER, reason="wgmma needs a Hopper GPU")
@pytest.mark.parametrize("n, operands, in_flight", [(64, "rs", 0), (64, "rs", 3), (256, "ss", 1), (16, "ss", 0)])
def test_every_program_runs_all_its_wgmmas(n: int, operands: str, in_flight: int) -> None:
    iters = 37
    y = launch(torch.full((5,), float("nan"), device="cuda"), n, operands, in_flight, iters)
    a, b = torch.tensor(0.001).half().float(), torch.tensor(0.002).half().float()
    expected = (iters * 32 * a * b * 64 * n).item()
    assert torch.allclose(y.cpu(), torch.full((5,), expected), rtol=1e-3)

"""The activation-quantized kinds of the kernel table (bench/int_kinds.py): each matmul within rounding of its
float64 reference on random codes, copies that are copies, and unknown kinds named with the choices."""

import os

import pytest
import torch

from bench import int_kinds
from bench.int_kinds import INT_KINDS, int_calls, int_error, int_matmul, int_paths, int_weight, quantize_activations

DEVICE = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"


@pytest.mark.parametrize("name", list(INT_KINDS))
def test_each_kind_matches_its_reference_and_its_copies(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    w = int_weight(INT_KINDS[name], 40, 256, device=DEVICE)
    x = torch.randn(5, 256, device=DEVICE, dtype=torch.float16)
    assert int_error(x, w) < 2e-3
    copy = w.clone()
    acts = quantize_activations(w.kind, x)
    assert torch.equal(int_matmul(copy, acts), int_matmul(w, acts)) and copy.nbytes() == w.nbytes() > 0
    monkeypatch.setattr(int_kinds, "copies_for", lambda nbytes: 3)  # (a rotation of 300 MB of these would be 30000 copies)
    calls = int_calls(x, w)()
    assert len(calls) == 3 and torch.equal(calls[2](), calls[0]())


@pytest.mark.parametrize("name", ["w8a8", "w4a8", "w2a8bp"])
def test_each_kind_is_timed_on_its_paths_and_matches_on_each(name: str) -> None:
    """W8A8: its Triton kernel, and cuBLAS int8 from 17 rows; W4A8: the W4 kernels on dequantized tokens, its int
    kernel and dequant + matmul; bit-plane: its kernel and dequant + matmul; at every batch, the dispatcher's path first."""
    torch.manual_seed(1)
    w = int_weight(INT_KINDS[name], 40, 256, device=DEVICE)
    x = torch.randn(20, 256, device=DEVICE, dtype=torch.float16)
    if name == "w8a8":
        assert int_paths(w.kind, 20, 256, 40) == ["int cublas", "int triton"] and int_paths(w.kind, 4, 256, 40) == ["int triton"]
    elif name == "w4a8":
        assert int_paths(w.kind, 20, 256, 40) == int_paths(w.kind, 100, 256, 40) == ["int lowbit", "int triton", "int dequant"]
    else:
        assert int_paths(w.kind, 20, 256, 40) == ["int triton", "int dequant"] and int_paths(w.kind, 100, 256, 40) == ["int dequant", "int triton"]
    assert all(int_error(x, w, path) < 2e-3 for path in int_paths(w.kind, 20, 256, 40))


def test_unknown_kernels_are_named_with_the_choices(capsys: pytest.CaptureFixture) -> None:
    from bench.kernel_latency import main

    with pytest.raises(SystemExit):
        main(["--kernels", "w4g128,w3a3"])
    err = capsys.readouterr().err
    assert "['w3a3']" in err and "'w8a8'" in err and "'w4g128'" in err

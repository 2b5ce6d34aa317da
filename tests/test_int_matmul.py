"""W8A8, W4A8 and bit-plane WpAq kernels against float64 references (interpreter on CPU, tiny ragged shapes)."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

from qkernels import int_matmul as im  # noqa: E402
from qkernels.pack import dequantize_packed, pack_weight  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert not out.isnan().any(), "unwritten (NaN) outputs"
    return ((out.double() - ref).norm() / ref.norm()).item()


def test_quantize_rows_int8_round_trip() -> None:
    x = torch.randn(7, 50)
    q, scale = im.quantize_rows_int8(x)
    assert q.dtype == torch.int8 and q.abs().max() <= 127
    assert (q.float() * scale[:, None] - x).abs().max() <= scale.max() / 2 + 1e-6


@pytest.mark.parametrize("m,k,path", [(19, 100, "triton"), (5, 1000, "triton"), (24, 1000, "cublas"), (3, 1000, "auto")])
def test_int8_matmul_matches_reference_on_ragged_shapes(m: int, k: int, path: str) -> None:
    """The Triton kernel on 64-row tiles and on 16-row tiles with K splits (two at K = 1000), cuBLAS's int8 GEMM
    (torch._int_mm; on the CPU its CPU kernel) with the scaling kernel."""
    a, sa = im.quantize_rows_int8(torch.randn(m, k))
    b, sb = im.quantize_rows_int8(torch.randn(72, k))
    a, sa, b, sb = (t.to(DEVICE) for t in (a, sa, b, sb))
    if path == "triton" and m <= 16:
        assert im.int8_config(m, 72, k, a.device)["SPLIT_K"] == 2
    out = im.int8_matmul(a, sa, b, sb, torch.float32, out=torch.full((m, 72), float("nan"), device=DEVICE), path=path)
    assert rel_err(out, im.int8_matmul_reference(a, sa, b, sb)) < 1e-6


@pytest.mark.parametrize("m,path", [(5, "triton"), (40, "triton"), (24, "cublas")])
def test_int8_matmul_takes_asymmetric_activations_with_zero_points(m: int, path: str) -> None:
    """Unsigned 8-bit codes with zero points (K = 1000: a ragged last step): read as ``code - 128`` and ``(128 - zero)``
    times the weight rows' code sums added, the product of the centred codes (split-K: the term counted once)."""
    codes, a_scale, a_zero = im.quantize_rows_asym(torch.randn(m, 1000) + 0.7, 8)
    b, b_scale = im.quantize_rows_int8(torch.randn(72, 1000))
    ref = ((codes.double() - a_zero.double()[:, None]) * a_scale.double()[:, None]) @ (b.double() * b_scale.double()[:, None]).t()
    dev = lambda t: t.to(DEVICE)  # noqa: E731
    out = im.int8_matmul(dev(codes), dev(a_scale), dev(b), dev(b_scale), torch.float32, path=path, a_zero=dev(a_zero),
                         b_sum=dev(b.float().sum(dim=1)))
    assert rel_err(out, ref.to(DEVICE)) < 1e-6
    with pytest.raises(ValueError, match="a_zero and b_sum go together"):
        im.int8_matmul(dev(codes), dev(a_scale), dev(b), dev(b_scale), a_zero=dev(a_zero))
    with pytest.raises(ValueError, match="need torch.int8 a .* got torch.uint8"):
        im.int8_matmul(dev(codes), dev(a_scale), dev(b), dev(b_scale))


def test_int8_paths_by_batch_and_a_bad_path(monkeypatch: pytest.MonkeyPatch) -> None:
    cuda = torch.device("cuda")
    monkeypatch.setattr(im, "before_ampere", lambda device: False)
    assert [im.int8_path(m, 4096, 4096, cuda) for m in (1, 16, 17, 256)] == ["triton", "triton", "cublas", "cublas"]
    assert im.int8_path(256, 4100, 4096, cuda) == "triton" and im.int8_path(256, 4096, 4096, torch.device("cpu")) == "triton"
    monkeypatch.setattr(im, "before_ampere", lambda device: True)  # a V100 or T4: the Triton kernel
    assert im.int8_path(256, 4096, 4096, cuda) == "triton"
    monkeypatch.undo()
    a = torch.zeros(2, 64, dtype=torch.int8, device=DEVICE)
    with pytest.raises(ValueError, match="path='cutlass' is not valid; choose 'auto' or one of \\['triton', 'cublas'\\]"):
        im.int8_matmul(a, torch.ones(2, device=DEVICE), a, torch.ones(2, device=DEVICE), path="cutlass")


@pytest.mark.parametrize("asym", [True, False])
@pytest.mark.parametrize("m,path", [(5, "triton"), (21, "triton"), (21, "dequant"), (5, "lowbit")])
def test_w4a8_matches_reference(asym: bool, m: int, path: str) -> None:
    """The Triton kernel on a 16-row tile with K splits (4 at K = 1024 here), on 16-row tiles without, dequant +
    matmul, and the tokens dequantized onto the weight-only kernels (fp16 out); uint8 codes with zero points
    (``asym``) or int8 values."""
    n, k, group = 40, 1024, 64
    codes = torch.randint(0, 16, (n, k))
    scale = (torch.rand(n, k // group) + 0.5).half()
    zero = torch.randint(0, 16, (n, k // group)).half() if asym else None
    pw = pack_weight(codes, scale, zero, "uint4", group, zero_const=8, run=16).to(DEVICE)
    if asym:
        a, sa, za = im.quantize_rows_asym(torch.randn(m, k) + 0.3, 8)
        ref = im.w4a8_reference(a.float() - za[:, None], sa, pw.to("cpu"))
        za, w_sum = za.to(DEVICE), dequantize_packed(pw).sum(dim=1)
    else:
        a, sa = im.quantize_rows_int8(torch.randn(m, k))
        ref, za, w_sum = im.w4a8_reference(a, sa, pw.to("cpu")), None, None
    config = im.w4a8_config(m, pw, im.w4a8_sub_slots(pw), torch.device(DEVICE))
    assert config["SPLIT_K"] == (4 if m <= 16 and DEVICE == "cpu" else config["SPLIT_K"])
    out_dtype = torch.float16 if path == "lowbit" else torch.float32
    out = im.w4a8_matmul(a.to(DEVICE), sa.to(DEVICE), pw, out_dtype, a_zero=za, w_sum=w_sum, path=path).cpu()
    assert rel_err(out, ref) < (2e-3 if path == "lowbit" else 1e-6)


def test_act_paths_by_batch_and_a_bad_path() -> None:
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert [im.int_act_path(m, cuda) for m in (1, im.ACT_DEQUANT_MIN_M - 1, im.ACT_DEQUANT_MIN_M)] == ["triton", "triton", "dequant"]
    assert im.int_act_path(1024, cpu) == "triton"
    half, single = torch.float16, torch.float32
    assert [im.w4a8_path(1, cuda, half), im.w4a8_path(1024, cuda, torch.bfloat16), im.w4a8_path(1, cuda, single)] == ["lowbit", "lowbit", "triton"]
    assert im.w4a8_path(im.ACT_DEQUANT_MIN_M, cuda, single) == "dequant" and im.w4a8_path(1, cpu, half) == "triton"
    pw = pack_weight(torch.randint(0, 16, (8, 128)), torch.ones(8, 1).half(), None, "uint4", 128, zero_const=8, run=16).to(DEVICE)
    a = torch.ones(2, 128, dtype=torch.int8, device=DEVICE)
    with pytest.raises(ValueError, match="path='cublas' is not valid; choose 'auto' or one of \\['triton', 'lowbit', 'dequant'\\]"):
        im.w4a8_matmul(a, torch.ones(2, device=DEVICE), pw, path="cublas")
    with pytest.raises(ValueError, match="path='lowbit' .* gives fp16 or bf16, not torch.float32"):
        im.w4a8_matmul(a, torch.ones(2, device=DEVICE), pw, torch.float32, path="lowbit")
    with pytest.raises(ValueError, match="path='lowbit' is not valid; choose 'auto' or one of \\['triton', 'dequant'\\]"):
        im.bitplane_matmul(a.view(torch.uint8), 2, torch.ones(2), torch.zeros(2), im.pack_bitplanes(torch.ones(8, 128, dtype=torch.long), 1,
                           torch.ones(8), torch.zeros(8)), path="lowbit")


@pytest.mark.parametrize("w_bits,a_bits,w_digit,a_digit", [(2, 2, 7, 7), (3, 4, 1, 1), (1, 8, 7, 7), (4, 8, 1, 3), (2, 5, 7, 2),
                                                       (8, 3, 7, 7), (5, 6, 2, 4)])
@pytest.mark.parametrize("m", [5, 21])
def test_bitplane_matmul_is_exact_for_any_precision_pair(w_bits: int, a_bits: int, w_digit: int, a_digit: int, m: int) -> None:
    """Weight digits of 1 (binary planes), 2 or 7 bits (8-bit codes: two digits) times activation digits of 1 (ABQ's
    binary planes), 2, 3, 4 or 7 bits, on 16- and 64-row tiles: the integer sums exact; the scaled output within
    float64 rounding."""
    n, k = 33, 200
    w_codes = torch.randint(0, 2**w_bits, (n, k))
    bw = im.pack_bitplanes(w_codes, w_bits, torch.rand(n) + 0.5, torch.randint(0, 2**w_bits, (n,)).float())
    a_codes, a_scale, a_zero = im.quantize_rows_asym(torch.randn(m, k), a_bits)
    bw_dev = im.BitplaneWeight(bw.planes.to(DEVICE), *(t.to(DEVICE) for t in (bw.scale, bw.zero)), bw.bits, bw.n, bw.k, bw.run)
    a_dev = a_codes.to(DEVICE)
    core = im.bitplane_int_matmul(a_dev, a_bits, bw_dev, a_digit, w_digit).cpu()
    assert torch.equal(core.long(), a_codes.long() @ w_codes.t())  # the binary-plane sum is exact
    out = im.bitplane_matmul(a_dev, a_bits, a_scale.to(DEVICE), a_zero.to(DEVICE), bw_dev, torch.float64, a_digit, w_digit).cpu()
    assert rel_err(out, im.bitplane_reference(a_codes, a_scale, a_zero, w_codes, bw)) < 1e-9


@pytest.mark.parametrize("m,path", [(5, "triton"), (5, "dequant"), (21, "dequant")])
def test_bitplane_matmul_splits_k_and_dequantizes(m: int, path: str) -> None:
    """A few rows with K splits (K = 1100: 3 splits of 128-wide steps, a ragged last one; each split's partial centred on its own), and the
    dequant path (the planes summed back into codes by a kernel, then a matmul)."""
    n, k, w_bits, a_bits = 70, 1100, 3, 5
    w_codes = torch.randint(0, 2**w_bits, (n, k))
    bw = im.pack_bitplanes(w_codes, w_bits, torch.rand(n) + 0.5, torch.randint(0, 2**w_bits, (n,)).float())
    a_codes, a_scale, a_zero = im.quantize_rows_asym(torch.randn(m, k), a_bits)
    bw_dev = im.BitplaneWeight(bw.planes.to(DEVICE), *(t.to(DEVICE) for t in (bw.scale, bw.zero)), bw.bits, bw.n, bw.k, bw.run)
    if path == "triton" and DEVICE == "cpu":
        assert im.bitplane_config(m, bw_dev, torch.device(DEVICE), split=True)["SPLIT_K"] == 3
    out = im.bitplane_matmul(a_codes.to(DEVICE), a_bits, a_scale.to(DEVICE), a_zero.to(DEVICE), bw_dev, torch.float32, path=path).cpu()
    assert rel_err(out, im.bitplane_reference(a_codes, a_scale, a_zero, w_codes, bw)) < 1e-6
    ref_w = (w_codes.double() - bw.zero.double()[:, None]) * bw.scale.double()[:, None]
    assert torch.allclose(im.bitplane_dequantize(bw_dev, torch.float32).cpu().double(), ref_w, rtol=1e-6, atol=0)


def test_bitplane_refuses_bad_digits_and_codes() -> None:
    bw = im.pack_bitplanes(torch.randint(0, 4, (8, 64)), 2, torch.rand(8) + 0.5, torch.zeros(8))
    bw = im.BitplaneWeight(bw.planes.to(DEVICE), *(t.to(DEVICE) for t in (bw.scale, bw.zero)), bw.bits, bw.n, bw.k, bw.run)
    codes = torch.randint(0, 4, (2, 64), device=DEVICE, dtype=torch.uint8)
    with pytest.raises(ValueError, match="a_digit .* must be 1..7 .* got 8"):
        im.bitplane_int_matmul(codes, 2, bw, a_digit=8)
    with pytest.raises(ValueError, match="w_digit .* must be 1..7 .* got 0"):
        im.bitplane_int_matmul(codes, 2, bw, w_digit=0)
    with pytest.raises(ValueError, match="activation codes must lie in 0..1"):
        im.bitplane_int_matmul(codes, 1, bw)

"""The MX/NV block-format weight matmul against x @ dequantize(quantize(W))^T (Triton interpreter on CPU)."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

from qkernels.block_matmul import BlockGemvConfig, block_gemv, block_matmul, pack_block_weight  # noqa: E402
from methods.common.formats import IntFormat  # noqa: E402
from methods.common.microscaling import MxFormat, NvFormat  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FORMATS = [MxFormat(element) for element in ("e2m1", "int8", "e4m3", "e5m2", "e2m3", "e3m2")] + [NvFormat("e2m1"), NvFormat("int4")]


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_block_matmul_matches_the_dequantized_weight(fmt, dtype: torch.dtype) -> None:
    """Ragged K (200 = whole blocks + 8), several decades of weight magnitude, batches 1, 5 and 33."""
    generator = torch.Generator().manual_seed(fmt.element_bits)
    weight = torch.randn(37, 200, generator=generator) * torch.logspace(-2, 0, 200)
    bw = pack_block_weight(weight.to(DEVICE), fmt)
    dequantized = fmt.dequantize(fmt.quantize(weight)).float().to(DEVICE)
    assert dequantized.abs().sum() > 0
    for m, split_k in ((1, 3), (5, 1), (33, None)):  # 200 = 7 steps of 32: splits of 3, 3 and 1 steps
        x = torch.randn(m, 200, generator=generator).to(DEVICE, dtype)
        out = block_matmul(x, bw, block_n=32, out=torch.full((m, 37), float("nan"), dtype=dtype, device=DEVICE), split_k=split_k)
        assert not out.isnan().any(), "some outputs were never written"
        ref = x.float() @ dequantized.t()
        error = ((out.float() - ref).norm() / ref.norm()).item()
        assert error < (2e-3 if dtype == torch.float16 else 1e-2), (m, error)


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
def test_block_gemv_matches_the_dequantized_weight(fmt) -> None:
    """The GEMV for a few rows: ragged K (200 = 6 MX blocks + 8, 12 NV blocks + 8) and N (37), several decades of
    weight magnitude, 1, 3 and 8 rows, steps of one and two MX blocks, K splits that leave a split empty."""
    generator = torch.Generator().manual_seed(fmt.element_bits + 1)
    weight = torch.randn(37, 200, generator=generator) * torch.logspace(-2, 0, 200)
    bw = pack_block_weight(weight.to(DEVICE), fmt)
    dequantized = fmt.dequantize(fmt.quantize(weight)).float().to(DEVICE)
    for m, config in ((1, BlockGemvConfig(block_n=16, step=32, split_k=3)), (3, BlockGemvConfig(step=64, split_k=5)), (8, BlockGemvConfig())):
        x = torch.randn(m, 200, generator=generator).to(DEVICE, torch.float16)
        out = block_gemv(x, bw, config, out=torch.full((m, 37), float("nan"), dtype=torch.float16, device=DEVICE))
        assert not out.isnan().any(), "some outputs were never written"
        ref = x.float() @ dequantized.t()
        assert ((out.float() - ref).norm() / ref.norm()).item() < 2e-3, (m, config)


def test_block_gemv_refuses_what_it_cannot_run() -> None:
    bw = pack_block_weight(torch.randn(8, 64, device=DEVICE), NvFormat("e2m1"))
    with pytest.raises(ValueError, match="at most 8"):
        block_gemv(torch.randn(9, 64, dtype=torch.float16, device=DEVICE), bw)
    with pytest.raises(ValueError, match="step must be"):
        block_gemv(torch.randn(1, 64, dtype=torch.float16, device=DEVICE), bw, BlockGemvConfig(step=48))
    with pytest.raises(ValueError, match="float32"):
        block_gemv(torch.randn(1, 64, device=DEVICE), bw)


def test_block_matmul_refuses_bad_inputs() -> None:
    bw = pack_block_weight(torch.randn(8, 64, device=DEVICE), MxFormat("e2m1"))
    with pytest.raises(ValueError, match=r"\[M, 64\]"):
        block_matmul(torch.randn(2, 32, dtype=torch.float16, device=DEVICE), bw)
    with pytest.raises(ValueError, match="float32"):
        block_matmul(torch.randn(2, 64, device=DEVICE), bw)
    with pytest.raises(TypeError, match="IntFormat"):
        pack_block_weight(torch.randn(8, 64), IntFormat(bits=4))

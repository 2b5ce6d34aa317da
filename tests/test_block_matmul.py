"""The MX/NV block-format weight matmul against x @ dequantize(quantize(W))^T (Triton interpreter on CPU)."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

from qkernels.block_matmul import (BLOCK_DOT_MAX_M, BLOCK_GEMV_MAX_M, BlockGemvConfig, block_dequant_matmul, block_dequantize, block_gemv,  # noqa: E402
                                   block_matmul, block_mma, dequantize_block, element_decode, pack_block_weight, pick_block_path,
                                   scaled_exact, slot_constants, unchunk_codes)
from methods.common.formats import IntFormat  # noqa: E402
from qkernels.quant import mx_quantize_reference, nv_quantize_reference  # noqa: E402
from methods.common.microscaling import MxFormat, NvFormat  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
WIDE_FORMATS = [MxFormat(element) for element in ("int8", "e4m3", "e5m2", "e2m3", "e3m2")]  # codes in K order, a byte each
NIBBLE_FORMATS = [MxFormat("e2m1"), NvFormat("e2m1"), NvFormat("int4")]  # chunked words (the tensor-core kernel's)
FORMATS = WIDE_FORMATS + NIBBLE_FORMATS


@pytest.mark.parametrize("fmt", WIDE_FORMATS, ids=lambda f: f.name)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_block_matmul_matches_the_dequantized_weight(fmt, dtype: torch.dtype) -> None:
    """Ragged K (200 = whole blocks + 8), several decades of weight magnitude, batches 1, 5 and 33; MX weights so
    small that their scaled grid falls below fp16's (not :func:`scaled_exact`: the dot takes one block a step and
    scales its result), against large activations."""
    generator = torch.Generator().manual_seed(fmt.element_bits)
    weight = torch.randn(37, 200, generator=generator) * torch.logspace(-2, 0, 200)
    for scale in (1.0, 1e-7) if isinstance(fmt, MxFormat) else (1.0,):
        bw = pack_block_weight((weight * scale).to(DEVICE), fmt)
        assert scale == 1.0 or not bw.prescaled  # (MXFP8 E5M2's grid reaches 2^-16 of a block's scale: below fp16's at 1.0 too)
        dequantized = fmt.dequantize(fmt.quantize(weight * scale)).float().to(DEVICE)
        assert dequantized.abs().sum() > 0
        for m, split_k, step in ((1, 3, 32), (5, 1, 64), (33, None, 128)):  # 200: 7 steps of 32 (splits of 3, 3, 1 steps), 4 of 64
            x = (torch.randn(m, 200, generator=generator) / scale**0.5).to(DEVICE, dtype)
            out = block_matmul(x, bw, block_n=32, out=torch.full((m, 37), float("nan"), dtype=dtype, device=DEVICE), split_k=split_k, step=step)
            assert not out.isnan().any(), "some outputs were never written"
            ref = x.float() @ dequantized.t()
            error = ((out.float() - ref).norm() / ref.norm()).item()
            assert error < (2e-3 if dtype == torch.float16 else 1e-2), (m, scale, error)


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
def test_block_dequantize_gives_the_weight_and_the_fallback_its_product(fmt) -> None:
    """The dequant kernel writes the fp32 dequantized weight rounded once to fp16/bf16 (ragged N and K, tiles that
    leave rows and columns out); the fallback (it, then cuBLAS) multiplies by it."""
    generator = torch.Generator().manual_seed(fmt.element_bits + 2)
    weight = torch.randn(37, 200, generator=generator) * torch.logspace(-2, 0, 200)
    bw = pack_block_weight(weight.to(DEVICE), fmt)
    exact = dequantize_block(bw)
    assert torch.equal(exact, fmt.dequantize(fmt.quantize(weight)).float().to(DEVICE) * 1.0) or not isinstance(fmt, MxFormat)
    for dtype in (torch.float16, torch.bfloat16):
        for block_n, words in ((16, 4), (32, 32)):
            out = block_dequantize(bw, dtype, block_n, words)
            if dtype == torch.bfloat16 and DEVICE == "cpu":  # the interpreter truncates fp32 to bf16: within one bf16 step
                assert torch.allclose(out.float(), exact, rtol=2**-7, atol=0), (block_n, words)
            else:
                assert torch.equal(out, exact.to(dtype)), (dtype, block_n, words)
    x = torch.randn(130, 200, generator=generator).to(DEVICE, torch.float16)
    out = block_dequant_matmul(x, bw, out=torch.full((130, 37), float("nan"), dtype=torch.float16, device=DEVICE))
    assert torch.allclose(out.float(), (x.float() @ exact.half().float().t()), rtol=1e-2, atol=1e-2)


def test_scaled_exact_and_the_paths_by_batch() -> None:
    small = pack_block_weight(torch.randn(8, 64, device=DEVICE), MxFormat("e2m1"))
    assert small.prescaled and scaled_exact(small)
    assert not pack_block_weight(torch.randn(8, 64, device=DEVICE) * 1e6, MxFormat("e2m1")).prescaled  # 6 * 2^17 > 65504
    assert not pack_block_weight(torch.randn(8, 64, device=DEVICE) * 1e-7, MxFormat("e2m1")).prescaled  # 2^-26 steps < fp16's 2^-24
    assert not pack_block_weight(torch.randn(8, 64, device=DEVICE) * 1e-7, MxFormat("int8")).prescaled  # 2^-30 steps < fp16's 2^-24
    assert pack_block_weight(torch.randn(8, 64, device=DEVICE) * 1e6, NvFormat("e2m1")).prescaled  # the tensor scale takes the range
    wide = pack_block_weight(torch.randn(8, 64, device=DEVICE), MxFormat("int8"))
    batches = (1, 2, BLOCK_GEMV_MAX_M + 1, BLOCK_DOT_MAX_M, BLOCK_DOT_MAX_M + 1)
    assert [pick_block_path(m, wide) for m in batches] == ["block gemv", "block", "block", "block", "block dequant"]
    assert [pick_block_path(m, small) for m in batches] == ["block mma"] * 4 + ["block dequant"]


@pytest.mark.parametrize("fmt", WIDE_FORMATS, ids=lambda f: f.name)
def test_block_gemv_matches_the_dequantized_weight(fmt) -> None:
    """The GEMV for a few rows: ragged K (200 = 6 MX blocks + 8) and N (37), several decades of weight magnitude, 1, 3
    and 8 rows, steps of 4, 8 and 32 words (half an MX block to four), K splits that leave a split empty."""
    generator = torch.Generator().manual_seed(fmt.element_bits + 1)
    weight = torch.randn(37, 200, generator=generator) * torch.logspace(-2, 0, 200)
    bw = pack_block_weight(weight.to(DEVICE), fmt)
    dequantized = fmt.dequantize(fmt.quantize(weight)).float().to(DEVICE)
    for m, config in ((1, BlockGemvConfig(block_n=16, words=4, split_k=3)), (3, BlockGemvConfig(words=8, split_k=5)), (8, BlockGemvConfig(words=32))):
        x = torch.randn(m, 200, generator=generator).to(DEVICE, torch.float16)
        out = block_gemv(x, bw, config, out=torch.full((m, 37), float("nan"), dtype=torch.float16, device=DEVICE))
        assert not out.isnan().any(), "some outputs were never written"
        ref = x.float() @ dequantized.t()
        assert ((out.float() - ref).norm() / ref.norm()).item() < 2e-3, (m, config)


def test_block_gemv_refuses_what_it_cannot_run() -> None:
    bw = pack_block_weight(torch.randn(8, 64, device=DEVICE), MxFormat("int8"))
    with pytest.raises(ValueError, match="at most 8"):
        block_gemv(torch.randn(9, 64, dtype=torch.float16, device=DEVICE), bw)
    with pytest.raises(ValueError, match="words .* must be a power of two, got 12"):
        block_gemv(torch.randn(1, 64, dtype=torch.float16, device=DEVICE), bw, BlockGemvConfig(words=12))
    with pytest.raises(ValueError, match="float32"):
        block_gemv(torch.randn(1, 64, device=DEVICE), bw)
    chunked = pack_block_weight(torch.randn(8, 64, device=DEVICE), NvFormat("e2m1"))
    for kernel in (block_gemv, block_matmul):
        with pytest.raises(ValueError, match="nvfp4's codes are chunked words"):
            kernel(torch.randn(1, 64, dtype=torch.float16, device=DEVICE), chunked)
    with pytest.raises(ValueError, match="block_mma takes 4-bit elements"):
        block_mma(torch.randn(1, 64, dtype=torch.float16, device=DEVICE), bw)
    tiny = pack_block_weight(torch.randn(8, 64, device=DEVICE) * 1e-7, MxFormat("e2m1"))
    with pytest.raises(ValueError, match="prescale needs elements times block scales exact .* this mxfp4 weight's are not"):
        block_mma(torch.randn(1, 64, dtype=torch.float16, device=DEVICE), tiny, prescale=True)


def test_block_matmul_refuses_bad_inputs() -> None:
    bw = pack_block_weight(torch.randn(8, 64, device=DEVICE), MxFormat("int8"))
    with pytest.raises(ValueError, match=r"\[M, 64\]"):
        block_matmul(torch.randn(2, 32, dtype=torch.float16, device=DEVICE), bw)
    with pytest.raises(ValueError, match="float32"):
        block_matmul(torch.randn(2, 64, device=DEVICE), bw)
    with pytest.raises(ValueError, match="step must be .* got 48"):
        block_matmul(torch.randn(2, 64, dtype=torch.float16, device=DEVICE), bw, step=48)
    with pytest.raises(TypeError, match="IntFormat"):
        pack_block_weight(torch.randn(8, 64), IntFormat(bits=4))



@pytest.mark.parametrize("fmt", NIBBLE_FORMATS, ids=lambda f: f.name)
def test_chunked_codes_hold_every_element(fmt) -> None:
    """chunk_codes puts element ``c * 8 * run + s * run + r`` at slot ``s`` of word ``r`` of chunk ``c``; unchunk_codes
    reads back the codes in K order (ragged K padded with zero codes to whole chunks)."""
    weight = torch.randn(5, 200, generator=torch.Generator().manual_seed(3))
    bw = pack_block_weight(weight, fmt)
    quantized = (mx_quantize_reference if isinstance(fmt, MxFormat) else nv_quantize_reference)(weight, fmt).codes  # K order
    codes = torch.stack([quantized & 15, quantized >> 4], dim=-1).reshape(5, -1).long()[:, :200]
    run = fmt.BLOCK
    assert bw.chunked.dtype == torch.int32 and bw.chunked.shape == (5, -(-200 // (8 * run)) * run)
    assert torch.equal(unchunk_codes(bw.chunked, run, 200), codes)
    c, s, r = 0, 3, 5
    assert (int(bw.chunked[2, c * run + r]) >> (4 * s)) & 15 == codes[2, c * 8 * run + s * run + r]


@pytest.mark.parametrize("fmt", NIBBLE_FORMATS, ids=lambda f: f.name)
def test_slot_decode_constants_give_every_code(fmt) -> None:
    """The tensor-core kernel's PTX decode (:func:`slot_constants`), emulated with integer and fp16 ops: every code in
    every slot of two neighbouring words gives its element value exactly."""
    bw = pack_block_weight(torch.randn(1, 32), fmt)
    decode, _ = element_decode(fmt)
    for slot in range(8):
        c = slot_constants(slot)
        for code in range(16):
            a, b = code << (4 * slot), ((code + 7) % 16) << (4 * slot) | 0x5A5A5A5A & ~(15 << (4 * slot))  # other slots not zero
            t = ((a >> (8 * (c["select"] & 15))) & 0xFF) | (((b >> (8 * ((c["select"] >> 8) - 4))) & 0xFF) << 16) | ((a & 0xFF) << 8) | ((a & 0xFF) << 24)
            if decode["DECODE"] == "fp":
                bits = ((t << c["mag_shift"]) & 0x0E000E00) | ((t << c["sign_shift"]) & 0x80008000)
                mul, add = c["mul"], 0
            else:
                bits = ((t >> c["p"]) & 0x000F000F) ^ 0x64086408
                mul, add = 0x3C003C00, c["add"]  # 1.0 and -1032
            halves = torch.tensor([bits & 0xFFFF, (bits >> 16) & 0xFFFF]).to(torch.int16).view(torch.float16).float()
            m, d = torch.tensor([mul & 0xFFFF, add & 0xFFFF]).to(torch.int16).view(torch.float16).float()
            got = halves * m + d
            want = bw.code_values[torch.tensor([code, (code + 7) % 16])].float()
            assert torch.equal(got, want), (slot, code, got, want)


@pytest.mark.parametrize("fmt", NIBBLE_FORMATS, ids=lambda f: f.name)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_block_mma_matches_the_dequantized_weight(fmt, dtype: torch.dtype) -> None:
    """The tensor-core kernel on chunked words: ragged K (200: a chunk and a part) and N (37), several decades of
    weight magnitude, batches 1, 5 and 33, K splits that leave one empty; and the chunked dequantization."""
    generator = torch.Generator().manual_seed(11)
    weight = torch.randn(37, 200, generator=generator) * torch.logspace(-2, 0, 200)
    for scale, m, split_k in ((1.0, 1, 3), (1.0, 5, 1), (1.0, 33, None), (1e-7, 2, None)):  # 1e-7: MX scales below fp16's range
        bw = pack_block_weight((weight * scale).to(DEVICE), fmt)
        dequantized = fmt.dequantize(fmt.quantize(weight * scale)).float().to(DEVICE)
        assert torch.equal(block_dequantize(bw, torch.float32), dequantize_block(bw))
        x = (torch.randn(m, 200, generator=generator) / scale**0.5).to(DEVICE, dtype)
        ref = x.float() @ dequantized.t()
        for prescale in (False, True) if bw.prescaled else (False,):
            out = block_mma(x, bw, block_n=32, out=torch.full((m, 37), float("nan"), dtype=dtype, device=DEVICE), split_k=split_k,
                            prescale=prescale)
            assert not out.isnan().any(), "some outputs were never written"
            assert ((out.float() - ref).norm() / ref.norm()).item() < (2e-3 if dtype == torch.float16 else 1e-2), (scale, m, split_k, prescale)

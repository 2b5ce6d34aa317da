"""The MX/NV block-format weight matmul against x @ dequantize(quantize(W))^T (Triton interpreter on CPU)."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

from qkernels.block_matmul import (BLOCK_DOT_MAX_M, BLOCK_GEMV_MAX_M, BLOCK_PATHS, PAIR_DOWN, BlockGemvConfig, block_dequant_matmul, block_dequantize, block_gemv,  # noqa: E402
                                   block_matmul, block_mma, dequantize_block, element_decode, pack_block_weight, pair_constants,
                                   pick_block_path, scaled_exact, slot_constants, unchunk_codes)
from methods.common.formats import IntFormat  # noqa: E402
from methods.common.microscaling import MxFormat, NvFormat  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FORMATS = [MxFormat(element) for element in ("e2m1", "int8", "e4m3", "e5m2", "e2m3", "e3m2")] + [NvFormat("e2m1"), NvFormat("int4")]


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
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
    assert [pick_block_path(m) for m in (1, 2, BLOCK_GEMV_MAX_M + 1, BLOCK_DOT_MAX_M, BLOCK_DOT_MAX_M + 1)] == [
        "block gemv", "block", "block", "block", "block dequant"]


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
@pytest.mark.parametrize("path", ["block gemv", "block gemv fp32"])
def test_block_gemv_matches_the_dequantized_weight(fmt, path: str) -> None:
    """The GEMVs for a few rows (the pair one where it fits: 4-bit elements): ragged K (200 = 6 MX blocks + 8, 12 NV
    blocks + 8) and N (37), several decades of weight magnitude, 1, 3 and 8 rows, steps of 4, 8 and 32 words (half
    an MX block of 8-bit elements to 8 of 4-bit ones), K splits that leave a split empty; and activations near fp16's
    largest (with small weights, so the outputs are finite): the pair GEMV's fp16 sums must not overflow."""
    generator = torch.Generator().manual_seed(fmt.element_bits + 1)
    weight = torch.randn(37, 200, generator=generator) * torch.logspace(-2, 0, 200)
    for m, config, size in ((1, BlockGemvConfig(block_n=16, words=4, split_k=3), 1.0), (3, BlockGemvConfig(words=8, split_k=5), 1.0),
                            (8, BlockGemvConfig(), 1.0), (2, BlockGemvConfig(block_n=32, words=32), 6e4)):
        bw = pack_block_weight(weight.to(DEVICE) / size, fmt)
        dequantized = fmt.dequantize(fmt.quantize(weight / size)).float().to(DEVICE)
        x = torch.randn(m, 200, generator=generator).clamp(-1, 1) * size
        x = x.to(DEVICE, torch.float16)
        out = BLOCK_PATHS[path](x, bw, config, out=torch.full((m, 37), float("nan"), dtype=torch.float16, device=DEVICE))
        assert not out.isnan().any(), "some outputs were never written"
        ref = x.float() @ dequantized.t()
        assert ((out.float() - ref).norm() / ref.norm()).item() < 2e-3, (m, config, size)


@pytest.mark.parametrize("fmt", [MxFormat("e2m1"), NvFormat("int4")], ids=lambda f: f.name)
def test_pair_gemv_decode_constants_give_every_code(fmt) -> None:
    """The pair GEMV's PTX decode (its constants, :func:`pair_constants`), emulated with integer and fp16 ops: every
    code at every element position of a word gives its value / PAIR_DOWN exactly."""
    bw = pack_block_weight(torch.randn(1, 32), fmt)
    decode, _ = element_decode(fmt)
    for p in range(4):
        for code in range(16):
            word = torch.tensor([(code << (4 * p)) | (((code + 5) % 16) << (4 * p + 16))], dtype=torch.int64)
            c = pair_constants(decode, p)
            if decode["DECODE"] == "fp":
                shifted = lambda w, n: (w << n if n >= 0 else w >> -n) & 0xFFFFFFFF  # noqa: E731
                bits = (shifted(word, c["mag_shift"]) & c["mag_mask"]) | (shifted(word, c["sign_shift"]) & c["sign_mask"])
            else:
                bits = ((word >> c["shift"]) & 0x000F000F) ^ 0x64086408
            halves = torch.stack([bits & 0xFFFF, bits >> 16]).to(torch.int16).view(torch.float16).float()
            mul, add = torch.tensor([c["mul"] & 0xFFFF, c["add"] & 0xFFFF]).to(torch.int16).view(torch.float16).float()
            got = (halves * mul + add).flatten()  # exact in fp32 (the fma's one rounding leaves it too)
            want = bw.code_values[torch.tensor([code, (code + 5) % 16])].float().cpu() / PAIR_DOWN
            assert torch.equal(got, want), (p, code, got, want)


def test_block_gemv_refuses_what_it_cannot_run() -> None:
    bw = pack_block_weight(torch.randn(8, 64, device=DEVICE), NvFormat("e2m1"))
    with pytest.raises(ValueError, match="at most 8"):
        block_gemv(torch.randn(9, 64, dtype=torch.float16, device=DEVICE), bw)
    with pytest.raises(ValueError, match="words .* must be a power of two, got 12"):
        block_gemv(torch.randn(1, 64, dtype=torch.float16, device=DEVICE), bw, BlockGemvConfig(words=12))
    with pytest.raises(ValueError, match="float32"):
        block_gemv(torch.randn(1, 64, device=DEVICE), bw)


def test_block_matmul_refuses_bad_inputs() -> None:
    bw = pack_block_weight(torch.randn(8, 64, device=DEVICE), MxFormat("e2m1"))
    with pytest.raises(ValueError, match=r"\[M, 64\]"):
        block_matmul(torch.randn(2, 32, dtype=torch.float16, device=DEVICE), bw)
    with pytest.raises(ValueError, match="float32"):
        block_matmul(torch.randn(2, 64, device=DEVICE), bw)
    with pytest.raises(ValueError, match="step must be .* got 48"):
        block_matmul(torch.randn(2, 64, dtype=torch.float16, device=DEVICE), bw, step=48)
    with pytest.raises(TypeError, match="IntFormat"):
        pack_block_weight(torch.randn(8, 64), IntFormat(bits=4))


NIBBLE_FORMATS = [MxFormat("e2m1"), NvFormat("e2m1"), NvFormat("int4")]


@pytest.mark.parametrize("fmt", NIBBLE_FORMATS, ids=lambda f: f.name)
def test_chunked_codes_hold_every_element(fmt) -> None:
    """chunk_codes puts element ``c * 8 * run + s * run + r`` at slot ``s`` of word ``r`` of chunk ``c``; unchunk_codes
    reads back the codes in K order (ragged K padded with zero codes to whole chunks)."""
    weight = torch.randn(5, 200, generator=torch.Generator().manual_seed(3))
    bw = pack_block_weight(weight, fmt)
    codes = torch.stack([bw.packed.codes & 15, bw.packed.codes >> 4], dim=-1).reshape(5, -1).long()[:, :200]
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
    bw = pack_block_weight(weight.to(DEVICE), fmt)
    dequantized = fmt.dequantize(fmt.quantize(weight)).float().to(DEVICE)
    assert torch.equal(block_dequantize(bw, torch.float32), dequantize_block(bw))
    for m, split_k in ((1, 3), (5, 1), (33, None)):
        x = torch.randn(m, 200, generator=generator).to(DEVICE, dtype)
        out = block_mma(x, bw, block_n=32, out=torch.full((m, 37), float("nan"), dtype=dtype, device=DEVICE), split_k=split_k)
        assert not out.isnan().any(), "some outputs were never written"
        ref = x.float() @ dequantized.t()
        assert ((out.float() - ref).norm() / ref.norm()).item() < (2e-3 if dtype == torch.float16 else 1e-2), (m, split_k)

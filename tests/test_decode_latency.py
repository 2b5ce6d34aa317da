"""bench.decode_latency off the GPU: the decoder compiles in one graph with its QuantLinear layers, and the table."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bench.competitors import CompetitorLinear
from bench.decode_latency import Arch, Block, Decoder, compare_steps, markdown, weight_bytes
from qkernels.act_linear import ActQuantLinear
from qkernels.qlinear import BlockLinear, QuantLinear

ARCH = Arch(hidden=256, intermediate=512, layers=2, heads=4, kv_heads=2, vocab=100)


def decode(model: Decoder, step, tokens: int) -> list[int]:
    torch.manual_seed(0)
    model.reset()
    out = []
    for _ in range(tokens):
        step()
        out.append(int(model.token))
    return out


@pytest.mark.parametrize("kind,layer_type", [("w2g128", QuantLinear), ("mxfp4", BlockLinear), ("w8a8", ActQuantLinear), ("w4a4", ActQuantLinear)])
@pytest.mark.parametrize("fuse", [False, True])
def test_compiled_decode_step_is_one_graph_and_decodes_the_same_tokens(kind: str, layer_type: type, fuse: bool) -> None:
    """Packed low-bit and MX layers (the qkernels::lowbit_matmul and qkernels::block_matmul operators): one graph,
    the eager tokens, fused or not."""
    torch.manual_seed(0)
    model = Decoder(ARCH, kind, max_len=16, device="cpu", fuse=fuse).eval()
    assert sum(isinstance(m, layer_type) for m in model.modules()) == (4 if fuse else 7) * ARCH.layers
    eager = decode(model, model.step, 6)
    torch._dynamo.reset()
    compiled = decode(model, torch.compile(model.step, fullgraph=True, backend="aot_eager"), 6)
    assert compiled == eager
    assert len(set(eager)) > 1 or eager[0] != 0  # the decode moved: not a stuck all-zero run
    assert compare_steps(model, model.step, model.step, 4) == (0.0, 4)


def test_nv_layers_fuse_only_with_one_tensor_scale() -> None:
    torch.manual_seed(0)
    with pytest.raises(ValueError, match="tensor scale"):
        Decoder(ARCH, "nvfp4", max_len=8, device="cpu", fuse=True)


def test_compare_steps_sees_a_wrong_step() -> None:
    torch.manual_seed(0)
    model = Decoder(ARCH, "fp16", max_len=16, device="cpu").eval()

    def wrong() -> None:  # the right token, but logits off by 10% of their range
        model.step()
        model.logits.add_(0.1 * model.logits.abs().max())

    worst, agree = compare_steps(model, wrong, model.step, 3)
    assert 0.05 < worst < 0.2 and agree == 3


def test_markdown_puts_the_compiled_columns_beside_the_graph_ones() -> None:
    rows = [
        dict(kind="fp16", tokens_per_s_graph=100.0, ms_per_token_graph=10.0, tokens_per_s_eager=50.0, weight_gb=1.0, peak_gb=1.5,
             tokens_per_s_compiled=200.0, ms_per_token_compiled=5.0, compile_s=30.0, compiled_logits_rel_diff=0.0,
             compiled_argmax_agree="32/32"),
        dict(kind="w4g128", tokens_per_s_graph=150.0, ms_per_token_graph=6.67, tokens_per_s_eager=40.0, weight_gb=0.3, peak_gb=0.6,
             tokens_per_s_compiled=500.0, ms_per_token_compiled=2.0, compile_s=20.0, compiled_logits_rel_diff=1.5e-3,
             compiled_argmax_agree="31/32"),
    ]
    lines = markdown(rows).splitlines()
    assert lines[0].count("|") == lines[1].count("|") == lines[2].count("|")
    assert "| w4g128 | 150.0 | 6.67 | 1.50 | 40.0 | 500.0 | 2.00 | 2.50 | 20 | 1.5e-03 | 31/32 | 0.30 | 0.60 |" == lines[3]
    plain = markdown([{k: v for k, v in r.items() if "compile" not in k} for r in rows]).splitlines()
    assert plain[3] == "| w4g128 | 150.0 | 6.67 | 1.50 | 40.0 | 0.30 | 0.60 |"
    fused = [dict(r, fused=True, tokens_per_s_graph=2 * r["tokens_per_s_graph"]) for r in rows]  # --fuse both: against fused fp16
    both = markdown([rows[0], fused[0], rows[1], fused[1]]).splitlines()
    assert both[3].startswith("| fp16 fused | 200.0 | 10.00 | 1.00 |") and both[4].startswith("| w4g128 | 150.0 | 6.67 | 1.50 |")
    assert both[5].startswith("| w4g128 fused | 300.0 | 6.67 | 1.50 |")
    assert "code steps" not in markdown(rows)  # the note on activation-quantized kinds' logits: only under such rows
    act = dict(rows[1], kind="w8a8", compiled_logits_rel_diff=0.19, compiled_argmax_agree="22/32")
    assert "per-token quantizers turn those bits into whole code steps" in markdown([rows[0], act]).splitlines()[-1]


@pytest.mark.parametrize("kind", ["fp16", "w4g128", "ternary2", "w8a8", "w4a8g128", "w4a4", "w4g128@tinygemm", "w4g128@bnb_nf4"])
def test_fused_projections_give_the_separate_layers_outputs(kind: str) -> None:
    if kind.endswith("bnb_nf4"):
        pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    block = Block(ARCH, kind, max_len=8, device="cpu")
    x = torch.randn(1, 1, ARCH.hidden, dtype=torch.float16)
    pos = torch.tensor([0])
    cos, sin = torch.ones(1, 1, 1, ARCH.head_dim, dtype=torch.float16), torch.zeros(1, 1, 1, ARCH.head_dim, dtype=torch.float16)
    visible = (torch.arange(8) <= 0).view(1, 1, 1, -1)
    with torch.no_grad():
        separate = block(x, pos, cos, sin, visible)
        cache = block.k_cache.clone()
        block.fuse_projections()
        fused = block(x, pos, cos, sin, visible)
    layers = (nn.Linear, QuantLinear, ActQuantLinear, CompetitorLinear)
    assert not hasattr(block, "q_proj") and sum(1 for m in block.children() if isinstance(m, layers)) == 4
    assert torch.allclose(fused.float(), separate.float(), atol=1e-3) and torch.allclose(block.k_cache, cache, atol=1e-3)


def test_bad_kinds_and_token_counts_are_named_with_the_choices(capsys: pytest.CaptureFixture) -> None:
    from bench.decode_latency import main

    with pytest.raises(SystemExit):
        main(["--kinds", "fp16,w5g128"])
    err = capsys.readouterr().err
    assert "['w5g128']" in err and "'w4g128'" in err and "'fp16'" in err
    with pytest.raises(SystemExit):
        main(["--tokens", "0"])
    assert "--tokens 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--fuse", "sometimes"])
    assert "'sometimes'" in (err := capsys.readouterr().err) and "'both'" in err


def test_a_published_kernel_decodes_the_same_codes_as_the_project_kernels() -> None:
    """``w4g128@tinygemm`` holds the codes and scales that ``w4g128`` draws (same seed): the same logits within bf16's
    rounding, and its weight bytes counted though they are not in the state dict."""
    models = {}
    for kind in ("w4g128", "w4g128@tinygemm"):
        torch.manual_seed(0)
        models[kind] = Decoder(ARCH, kind, max_len=8, device="cpu").eval()
        models[kind].reset()
        models[kind].step()
    ours, theirs = models["w4g128"], models["w4g128@tinygemm"]
    assert sum(isinstance(m, CompetitorLinear) for m in theirs.modules()) == 7 * ARCH.layers
    diff = (theirs.logits.float() - ours.logits.float()).norm() / ours.logits.float().norm()
    assert 0 < diff < 3e-2
    held = sum(m.nbytes for m in theirs.modules() if isinstance(m, CompetitorLinear))
    packed = sum(m.packed.nbytes() for m in ours.modules() if isinstance(m, QuantLinear))
    assert held > 0 and weight_bytes(theirs) - held == weight_bytes(ours) - packed


def test_a_competitor_kind_is_checked_by_its_parts(capsys: pytest.CaptureFixture) -> None:
    from bench.decode_latency import main

    with pytest.raises(SystemExit):
        main(["--kinds", "fp16,w4g128@marlin"])
    err = capsys.readouterr().err
    assert "['w4g128@marlin']" in err and "KIND@COMPETITOR" in err and "'tinygemm'" in err
    with pytest.raises(ValueError, match="tinygemm does not take w2g128 weights of 256x256"):
        Block(ARCH, "w2g128@tinygemm", max_len=8, device="cpu")

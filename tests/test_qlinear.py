"""QuantLinear: packing a layer from the int format, and a swapped tiny model against the fake-quant one."""

from __future__ import annotations

import copy
import os

import pytest
import torch
from torch import nn

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

from bench.models import ModelBundle, find_blocks  # noqa: E402
from qkernels.qlinear import BlockLinear, QuantLinear, block_matmul_op, lowbit_matmul_op, pack_int_weight, quantize_linear_layers, restore_linear_layers  # noqa: E402
from qkernels import qlinear as qlinear_module  # noqa: E402
from qkernels.block_matmul import dequantize_block  # noqa: E402
from qkernels.pack import PackError, PackedWeight, dequantize_packed, slice_rows  # noqa: E402
from methods.common.formats import FormatError, IntFormat  # noqa: E402
from methods.common.binary_formats import BinaryFormat  # noqa: E402
from methods.common.microscaling import MxFormat, NvFormat  # noqa: E402


@pytest.fixture
def tiny_bundle() -> ModelBundle:
    """A 2-block random Llama (the tiny model's shape) as a bundle, without tokenizer or checkpoint."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    model = LlamaForCausalLM(config).eval()
    blocks, prefix = find_blocks(model)
    layers = {f"{prefix}.{i}.{name}": m for i, b in enumerate(blocks) for name, m in b.named_modules() if isinstance(m, nn.Linear)}
    return ModelBundle("tiny", "llm", model, None, list(blocks), prefix, layers)


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("group_size", [32, "channel", "tensor"])
def test_packed_weight_dequantizes_to_the_fake_quant_weight(bits: int, symmetric: bool, group_size) -> None:
    if symmetric and bits == 1:
        pytest.skip("no symmetric 1-bit int grid")
    fmt = IntFormat(bits=bits, group_size=group_size, symmetric=symmetric)
    weight = torch.randn(24, 96)
    assert torch.allclose(dequantize_packed(pack_int_weight(weight, fmt)), fmt.fake_quant(weight), atol=1e-6)


def test_pack_int_weight_refuses_more_than_four_bits() -> None:
    with pytest.raises(Exception, match="bits in"):
        pack_int_weight(torch.randn(4, 64), IntFormat(bits=8, group_size=32))


def test_quant_linear_keeps_bias_and_moves_buffers() -> None:
    linear = nn.Linear(64, 16)
    q = QuantLinear.from_linear(linear, IntFormat(bits=4, group_size=32))
    x = torch.randn(3, 64)
    expected = x @ IntFormat(bits=4, group_size=32).fake_quant(linear.weight.detach()).t() + linear.bias.detach()
    assert torch.allclose(q(x), expected, atol=1e-4)
    assert {name for name, _ in q.named_buffers()} == {"words", "scale", "zero", "bias"}


def test_swapped_tiny_model_matches_fake_quant_model(tiny_bundle) -> None:
    """Swap the pristine layers for QuantLinear, then compare with the fake-quantized (RTN) model."""
    bundle = tiny_bundle
    fmt = IntFormat(bits=4, group_size=32)
    ids = torch.randint(0, 512, (2, 12))
    with torch.no_grad():
        originals = quantize_linear_layers(bundle, fmt)
        assert sum(isinstance(m, QuantLinear) for m in bundle.model.modules()) == len(bundle.layers)
        swapped = bundle.model(ids).logits
        restore_linear_layers(bundle, originals)
        assert not any(isinstance(m, QuantLinear) for m in bundle.model.modules())
        for layer in bundle.layers.values():
            layer.weight.copy_(fmt.fake_quant(layer.weight))
        fake = bundle.model(ids).logits
    assert torch.allclose(swapped, fake, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("fmt", [MxFormat("e2m1"), NvFormat("e2m1"), MxFormat("int8")], ids=lambda f: f.name)
def test_block_format_layers_match_the_fake_quant_model(tiny_bundle, fmt) -> None:
    """MX and NV formats swap in BlockLinear (packed codes and block scales); the model's logits are the
    fake-quantized model's, and the originals come back."""
    bundle = tiny_bundle
    ids = torch.randint(0, 512, (2, 12))
    with torch.no_grad():
        originals = quantize_linear_layers(bundle, fmt)
        swapped_layers = [m for m in bundle.model.modules() if isinstance(m, BlockLinear)]
        assert len(swapped_layers) == len(bundle.layers) and swapped_layers[0].codes.dtype == torch.uint8
        swapped = bundle.model(ids).logits
        restore_linear_layers(bundle, originals)
        assert not any(isinstance(m, BlockLinear) for m in bundle.model.modules())
        for layer in bundle.layers.values():
            layer.weight.copy_(fmt.dequantize(fmt.quantize(layer.weight.float())).to(layer.weight.dtype))
        fake = bundle.model(ids).logits
    assert torch.allclose(swapped, fake, atol=1e-4, rtol=1e-4)


def test_block_linear_keeps_bias_and_refuses_other_formats(tiny_bundle) -> None:
    linear = nn.Linear(64, 16)
    layer = BlockLinear.from_linear(linear, NvFormat("e2m1"))
    x = torch.randn(2, 3, 64)
    expected = x @ NvFormat("e2m1").dequantize(NvFormat("e2m1").quantize(linear.weight.detach())).t() + linear.bias.detach()
    assert layer(x).shape == (2, 3, 16) and torch.allclose(layer(x), expected, atol=1e-4)
    x.requires_grad_(True)
    layer(x).sum().backward()  # the dequantized weight's gradient: the column sums of W
    assert torch.allclose(x.grad, dequantize_block(layer.packed).sum(0).expand_as(x), atol=1e-4)
    with pytest.raises(FormatError, match="int, MX and NV"):
        quantize_linear_layers(tiny_bundle, BinaryFormat())


def test_block_linear_compiles_in_one_graph_and_its_gradient_comes_a_block_of_rows_at_a_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under torch.compile (fullgraph) BlockLinear is the operator ``qkernels::block_matmul``: the eager outputs; its
    backward, in blocks of 5 rows, the dequantized weight's gradient; opcheck's checks of the operator pass."""
    torch.manual_seed(2)
    layer = BlockLinear.from_linear(nn.Linear(64, 24), MxFormat("e2m1"))
    x = torch.randn(2, 3, 64)
    torch._dynamo.reset()
    assert torch.allclose(torch.compile(layer, fullgraph=True, backend="aot_eager")(x), layer(x), atol=1e-5)
    monkeypatch.setattr(qlinear_module, "GRAD_BLOCK_ELEMENTS", 5 * 64)
    x.requires_grad_(True)
    upstream = torch.randn(2, 3, 24)
    (layer(x) * upstream).sum().backward()
    assert torch.allclose(x.grad, upstream @ dequantize_block(layer.packed), atol=1e-4)
    torch.library.opcheck(block_matmul_op, (x, layer.codes, layer.block_scale, layer.code_values, layer.scale_values, "mx", "e2m1", 24,
                                            64, 1.0, layer.prescaled))


def test_concatenated_block_layers_give_each_layers_outputs_side_by_side() -> None:
    torch.manual_seed(3)
    layers = [BlockLinear.from_linear(nn.Linear(64, n, bias=bias), MxFormat("e2m1")) for n, bias in ((24, True), (8, False))]
    x = torch.randn(5, 64)
    fused = BlockLinear.concat(layers)
    assert fused.out_features == 32 and torch.allclose(fused(x), torch.cat([layer(x) for layer in layers], dim=-1), atol=1e-5)
    nv = [BlockLinear.from_linear(nn.Linear(64, 8), NvFormat("e2m1")) for _ in range(2)]
    with pytest.raises(ValueError, match="tensor scale"):
        BlockLinear.concat(nv)


def test_swapped_layer_runs_the_triton_gemv_through_the_interpreter() -> None:
    """The kernel path (forced; on CPU through the interpreter) agrees with the fake-quant layer."""
    linear = nn.Linear(256, 40, bias=False).half()
    fmt = IntFormat(bits=2, group_size=64)
    q = QuantLinear.from_linear(linear, fmt, path="gemv").to("cuda" if torch.cuda.is_available() else "cpu")
    x = torch.randn(2, 256, dtype=torch.float16, device=q.words.device)
    ref = x.float() @ fmt.fake_quant(linear.weight.detach().float()).t().to(x.device)
    assert torch.allclose(q(x).float(), ref, atol=2e-2, rtol=1e-2)


@pytest.mark.parametrize("fmt", [IntFormat(bits=3, group_size=32, symmetric=False), IntFormat(bits=4, group_size="channel", symmetric=True),
                                 IntFormat(bits=1, group_size=32)], ids=["w3-asym-g32 (high plane)", "w4-sym-channel (no zeros)", "w1-g32"])
def test_lowbit_matmul_operator_passes_opcheck(fmt: IntFormat) -> None:
    """The custom operator's schema, fake (meta) implementation and dispatch agree with its eager results."""
    q = QuantLinear.from_linear(nn.Linear(96, 24, bias=False), fmt)
    pw = q.packed
    for x in (torch.randn(3, 96), torch.randn(2, 5, 96)):
        torch.library.opcheck(lowbit_matmul_op, (x, pw.words, pw.high, pw.scale, pw.zero, pw.layout, float(pw.zero_const), pw.n, pw.k,
                                                 pw.run, pw.group_size, float(pw.zero_grid), "auto"))


def test_swapped_model_compiles_in_one_graph_with_the_operator(tiny_bundle: ModelBundle) -> None:
    """torch.compile(fullgraph=True) of a model holding QuantLinear layers: no graph break, every layer one
    call of the operator (not traced into the kernels' Python), the same logits as eagerly."""
    quantize_linear_layers(tiny_bundle, IntFormat(bits=4, group_size=32))
    ids = torch.randint(0, 512, (1, 12))
    calls = []

    def backend(gm, example_inputs):
        calls.extend(n for n in gm.graph.nodes if n.op == "call_function" and n.target is torch.ops.qkernels.lowbit_matmul.default)
        return gm.forward

    with torch.no_grad():
        eager = tiny_bundle.model(ids).logits
        torch._dynamo.reset()
        compiled = torch.compile(tiny_bundle.model, fullgraph=True, backend=backend)(ids).logits
    assert len(calls) == len(tiny_bundle.layers) == 14
    assert torch.equal(compiled, eager)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (Inductor's GPU code and the kernels)")
@pytest.mark.parametrize("rows", [1, 16, 300])
def test_compiled_layers_run_the_kernels_as_eagerly_on_the_gpu(rows: int) -> None:
    """Inductor around QuantLinear layers (norm, activation, residual fused) gives the eager outputs."""
    torch.manual_seed(0)
    fmt = IntFormat(bits=4, group_size=128)
    up = QuantLinear.from_linear(nn.Linear(1024, 2048, bias=False), fmt).cuda()
    down = QuantLinear.from_linear(nn.Linear(2048, 1024, bias=True), fmt).cuda()

    def block(x: torch.Tensor) -> torch.Tensor:
        h = x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-5).half()
        return x + down(torch.nn.functional.silu(up(h)))

    x = torch.randn(rows, 1024, device="cuda", dtype=torch.float16)
    with torch.no_grad():
        eager = block(x)
        torch._dynamo.reset()
        compiled = torch.compile(block, fullgraph=True)(x)
    assert torch.allclose(compiled.float(), eager.float(), atol=2e-2, rtol=1e-2)


def test_launch_plans_are_built_once_per_weight_and_dropped_when_the_buffers_move() -> None:
    q = QuantLinear.from_linear(nn.Linear(64, 16, bias=False), IntFormat(bits=2, group_size=32))
    builds = []
    build = lambda: builds.append(1) or len(builds)  # noqa: E731
    assert q.packed.memo("plan", build) == 1 and q.packed.memo("plan", build) == 1  # a new PackedWeight each forward, one plan
    assert q.packed.memo("other", build) == 2
    pw = q.packed
    moved = PackedWeight(**{**pw.__dict__, "words": pw.words.clone()})  # other tensors, the same plans dict
    assert moved.memo("plan", build) == 3 and pw.memo("plan", build) == 1
    q.to(torch.float64)  # buffers replaced: plans dropped
    assert q.plans == {} and q.packed.memo("plan", build) == 4
    x = torch.randn(3, 64)
    q.float()(x)
    assert any(key[0][0] == "path" for key in q.plans)  # lowbit_matmul kept the path it picked
    copied = copy.deepcopy(q)
    assert copied.plans == {} and q.plans and torch.equal(copied(x), q(x))


def test_launch_plans_stay_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    import qkernels.pack

    monkeypatch.setattr(qkernels.pack, "MAX_PLANS", 4)
    pw = QuantLinear.from_linear(nn.Linear(64, 16, bias=False), IntFormat(bits=2, group_size=32)).packed
    for m in range(10):
        assert pw.memo(("path", m), lambda m=m: m) == m
    assert 1 <= len(pw.plans) <= 4 and pw.memo(("path", 9), lambda: -1) == 9


def test_gradients_flow_through_quant_linear_to_the_activations() -> None:
    """dL/dx through the operator's backward (the kernels have none): the fake-quant layer's gradient, eagerly,
    under torch.compile, and in opcheck's autograd checks; no gradient without requires_grad."""
    torch.manual_seed(0)
    linear = nn.Linear(96, 24, bias=True)
    fmt = IntFormat(bits=3, group_size=32, symmetric=False)
    q = QuantLinear.from_linear(linear, fmt)
    fake = nn.Linear(96, 24, bias=True)
    with torch.no_grad():
        fake.weight.copy_(fmt.fake_quant(linear.weight)), fake.bias.copy_(linear.bias)
    x = torch.randn(2, 5, 96, requires_grad=True)
    upstream = torch.randn(2, 5, 24)
    (fake(x) * upstream).sum().backward()
    expected, x.grad = x.grad.clone(), None
    (q(x) * upstream).sum().backward()
    assert torch.allclose(x.grad, expected, atol=1e-5)
    x.grad = None
    torch._dynamo.reset()
    (torch.compile(q, fullgraph=True, backend="aot_eager")(x) * upstream).sum().backward()
    assert torch.allclose(x.grad, expected, atol=1e-5)
    pw = q.packed
    torch.library.opcheck(lowbit_matmul_op, (x, pw.words, pw.high, pw.scale, pw.zero, pw.layout, float(pw.zero_const), pw.n, pw.k,
                                             pw.run, pw.group_size, float(pw.zero_grid), "auto"))
    assert not q(x.detach()).requires_grad and not any(t.requires_grad for t in q.buffers())


def test_the_backward_dequantizes_a_block_of_rows_at_a_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """With blocks of 5 rows (24 = 5 + 5 + 5 + 5 + 4) the gradient is the one-block gradient, and no block
    dequantizes more than its rows."""
    torch.manual_seed(1)
    q = QuantLinear.from_linear(nn.Linear(96, 24), IntFormat(bits=3, group_size=32, symmetric=False))
    x = torch.randn(3, 96, requires_grad=True)
    upstream = torch.randn(3, 24)
    (q(x) * upstream).sum().backward()
    whole, x.grad = x.grad.clone(), None
    sizes = []
    dequantize = qlinear_module.dequantize_packed
    monkeypatch.setattr(qlinear_module, "dequantize_packed", lambda pw, dtype: sizes.append(pw.n) or dequantize(pw, dtype))
    monkeypatch.setattr(qlinear_module, "GRAD_BLOCK_ELEMENTS", 5 * 96)
    (q(x) * upstream).sum().backward()
    assert sizes == [5, 5, 5, 5, 4] and torch.allclose(x.grad, whole, atol=1e-5)
    with pytest.raises(ValueError, match="rows 20:30"):
        slice_rows(q.packed, 20, 30)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the kernels' forward)")
def test_gradients_flow_through_the_kernels_on_the_gpu() -> None:
    torch.manual_seed(0)
    fmt = IntFormat(bits=4, group_size=128)
    linear = nn.Linear(1024, 512, bias=False).cuda()
    q = QuantLinear.from_linear(linear, fmt).cuda()
    weight = fmt.fake_quant(linear.weight.detach().float())
    for rows in (1, 16):
        x = torch.randn(rows, 1024, device="cuda", dtype=torch.float16, requires_grad=True)
        upstream = torch.randn(rows, 512, device="cuda", dtype=torch.float16)
        (q(x).float() * upstream.float()).sum().backward()
        assert torch.allclose(x.grad.float(), upstream.float() @ weight, atol=2e-2, rtol=1e-2)


def test_concatenated_layers_give_each_layers_outputs_side_by_side() -> None:
    torch.manual_seed(0)
    fmt = IntFormat(bits=3, group_size=32, symmetric=False)
    layers = [QuantLinear.from_linear(nn.Linear(96, n, bias=bias), fmt) for n, bias in ((24, True), (8, False), (16, True))]
    fused = QuantLinear.concat(layers)
    x = torch.randn(5, 96)
    assert fused.out_features == 48 and fused.packed.scale.stride() == (1, 48)  # scales group-major again
    assert torch.allclose(fused(x), torch.cat([layer(x) for layer in layers], dim=-1), atol=1e-5)
    other = QuantLinear.from_linear(nn.Linear(96, 8), IntFormat(bits=2, group_size=32))
    with pytest.raises(PackError, match="weight 1 has .'uint2'"):
        QuantLinear.concat([layers[0], other])


def test_shared_plans_serve_the_operators_fresh_packed_weights() -> None:
    """The custom operator builds a new PackedWeight every call: plans that hold no tensor come from the shared
    table (built once per weight), the per-weight ones are built again."""
    q = QuantLinear.from_linear(nn.Linear(64, 16, bias=False), IntFormat(bits=2, group_size=32))
    builds = []
    for _ in range(3):
        pw = PackedWeight(**{**q.packed.__dict__, "plans": {}})  # as lowbit_matmul_op makes it
        pw.memo("spec", lambda: builds.append("spec"), shared=True)
        pw.memo("descriptors", lambda: builds.append("descriptors"))
    assert builds == ["spec", "descriptors", "descriptors", "descriptors"]
    other = QuantLinear.from_linear(nn.Linear(64, 16, bias=False), IntFormat(bits=2, group_size=32)).packed
    other.memo("spec", lambda: builds.append("other spec"), shared=True)  # other tensors: built for them
    assert builds[-1] == "other spec"

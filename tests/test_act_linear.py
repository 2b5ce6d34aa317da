"""ActQuantLinear: integer weights and activations on the W8A8, W4A8 and bit-plane kernels (Triton interpreter on CPU),
against the fake-quant product; a swapped tiny model against the fake-quant model."""

from __future__ import annotations

import copy
import os

import pytest
import torch
from torch import nn

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

from qkernels.act_linear import ActQuantLinear, act_kernel, act_kernels, quantize_tokens  # noqa: E402
from methods.common.formats import FormatError, IntFormat  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def weights(bits: int, symmetric: bool) -> IntFormat:
    return IntFormat(bits=bits, group_size="channel", symmetric=symmetric)


def tokens(bits: int, symmetric: bool) -> IntFormat:
    return IntFormat(bits=bits, group_size="token", symmetric=symmetric)


def test_the_kernel_for_each_pair_and_why_none_fits() -> None:
    """The kernels that take each pair, the preferred first; a layer takes another of them when asked, none other."""
    assert act_kernels(weights(8, True), tokens(8, False)) == ["w8a8", "bitplane"] and act_kernel(weights(8, True), tokens(8, True)) == "w8a8"
    assert act_kernels(weights(8, False), tokens(8, False)) == ["bitplane"] and act_kernels(weights(4, False), tokens(4, False)) == ["lowbit", "bitplane"]
    assert act_kernels(IntFormat(bits=4, group_size=128), tokens(8, True)) == ["w4a8", "lowbit"]
    assert act_kernels(IntFormat(bits=4, group_size=128), tokens(4, False)) == act_kernels(IntFormat(bits=2, group_size=64), tokens(8, False)) == ["lowbit"]
    with pytest.raises(FormatError, match="1..8 bits with one scale per output channel, or 1..4 bits per group; got int6-asym-g64"):
        act_kernel(IntFormat(bits=6, group_size=64), tokens(8, False))
    with pytest.raises(FormatError, match="1..8-bit activations with one min-max scale per token; got int16-asym-gtoken"):
        act_kernel(weights(4, False), tokens(16, False))
    with pytest.raises(FormatError, match="int weights and int activations"):
        act_kernel(weights(4, False), None)
    layer = ActQuantLinear(torch.randn(8, 64), weights(4, False), tokens(4, False), kernel="bitplane")
    assert layer.kernel == "bitplane" and hasattr(layer, "planes")
    with pytest.raises(FormatError, match="kernel='w8a8' does not take int4-asym-gchannel with int4-asym-gtoken; choose one of \\['lowbit', 'bitplane'\\]"):
        ActQuantLinear(torch.randn(8, 64), weights(4, False), tokens(4, False), kernel="w8a8")


@pytest.mark.parametrize("a_bits", [2, 4, 8, 6])
@pytest.mark.parametrize("symmetric", [False, True])
def test_token_codes_from_the_kernel_are_the_formats(a_bits: int, symmetric: bool) -> None:
    """The Triton quantizer's codes (a byte each: uint8 codes, or int8 values for symmetric formats), scales and zero
    points are the format's own, at any width (6 bits) and any K (35)."""
    fmt = tokens(a_bits, symmetric)
    for k in (96, 35):
        x = (torch.randn(5, k) * torch.logspace(-1, 1, k)).to(DEVICE)
        fast, plain = quantize_tokens(x, fmt, kernel=True), quantize_tokens(x, fmt, kernel=False)
        assert fast.codes.dtype == plain.codes.dtype == (torch.int8 if symmetric else torch.uint8)
        assert torch.equal(fast.codes, plain.codes) and torch.equal(fast.scale, plain.scale)
        assert (fast.zero is None) == symmetric and (symmetric or torch.equal(fast.zero, plain.zero))


@pytest.mark.parametrize("w_bits,w_sym,a_bits,a_sym,group,kernel", [
    (8, True, 8, False, None, "w8a8"), (8, True, 8, True, None, "w8a8"), (4, False, 4, False, None, "lowbit"), (2, True, 8, True, None, "lowbit"),
    (3, False, 6, False, None, "lowbit"), (2, False, 4, False, 64, "lowbit"), (8, False, 4, True, None, "bitplane"), (6, True, 8, False, None, "bitplane"),
    (4, False, 4, False, None, "bitplane"), (2, True, 8, True, None, "bitplane"), (4, False, 8, False, 32, "w4a8"), (4, True, 8, True, 64, "w4a8")])
@pytest.mark.parametrize("m", [3, 20])
def test_kernels_give_the_fake_quant_product(w_bits: int, w_sym: bool, a_bits: int, a_sym: bool, group: int | None, kernel: str, m: int) -> None:
    """Every kernel (W8A8 on its Triton and, from 17 rows, cuBLAS paths; W4A8 for grouped 4-bit weights; lowbit for
    other 1..4-bit weights, bit-plane for wider ones and where asked) against the fake-quant product: the input
    quantized per token, the weight per channel or group, multiplied in fp32."""
    torch.manual_seed(w_bits * 10 + a_bits)
    linear = nn.Linear(192, 40).to(DEVICE)
    wf = weights(w_bits, w_sym) if group is None else IntFormat(bits=w_bits, group_size=group, symmetric=w_sym)
    af = tokens(a_bits, a_sym)
    layer = ActQuantLinear.from_linear(linear, wf, af, kernel=None if kernel == act_kernel(wf, af) else kernel)
    assert layer.kernel == kernel
    x = torch.randn(2, m, 192, device=DEVICE)
    expected = af.fake_quant(x) @ wf.fake_quant(linear.weight.detach()).t() + linear.bias.detach()
    assert torch.allclose(layer.dequantized_weight(), wf.fake_quant(linear.weight.detach()), atol=1e-6)
    plain = layer.matmul(x.reshape(-1, 192), kernels=False) + linear.bias.detach()
    fast = layer.matmul(x.reshape(-1, 192), kernels=True) + linear.bias.detach()
    assert torch.allclose(plain.reshape(expected.shape), expected, atol=1e-5)
    assert ((fast.reshape(expected.shape) - expected).norm() / expected.norm()).item() < 1e-5, layer.kernel
    assert torch.allclose(layer(x), expected, atol=1e-4) and "kernel=" in repr(layer)


def test_a_swapped_tiny_model_gives_the_fake_quant_models_logits() -> None:
    """RTN-style W8A8 (8-bit symmetric per-channel weights, 8-bit asymmetric per-token activations) on a tiny Llama:
    every linear layer swapped for an ActQuantLinear gives the logits of the model with fake-quantized weights and
    fake-quantized layer inputs."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(config).eval().to(DEVICE)
    wf, af = weights(8, True), tokens(8, False)
    fake = copy.deepcopy(model)
    for block in fake.model.layers:
        for linear in (m for m in block.modules() if isinstance(m, nn.Linear)):
            linear.weight.data = wf.fake_quant(linear.weight.data)
            linear.register_forward_pre_hook(lambda _m, args: (af.fake_quant(args[0]), *args[1:]))
    for block in model.model.layers:
        for name, linear in [(n, m) for n, m in block.named_modules() if isinstance(m, nn.Linear)]:
            parent, _, child = name.rpartition(".")
            setattr(block.get_submodule(parent) if parent else block, child, ActQuantLinear.from_linear(linear, wf, af))
    ids = torch.randint(0, 256, (1, 12), device=DEVICE)
    with torch.no_grad():
        expected = fake(ids).logits
        assert torch.allclose(model(ids).logits, expected, atol=1e-4)
        for layer in (m for m in model.modules() if isinstance(m, ActQuantLinear)):
            layer.use_kernels = True  # the W8A8 kernel (the interpreter on a CPU)
        assert torch.allclose(model(ids).logits, expected, atol=1e-3)


@pytest.mark.parametrize("w_bits,group,a_bits", [(8, None, 8), (4, 64, 8), (3, None, 4), (6, None, 4)], ids=["w8a8", "w4a8", "lowbit", "bitplane"])
def test_concat_gives_the_layers_outputs_side_by_side(w_bits: int, group: int | None, a_bits: int) -> None:
    """Fused projections (q/k/v): the kernels' outputs of the concatenated layer are the layers' outputs, biases too;
    layers of other formats are refused."""
    torch.manual_seed(3)
    wf = IntFormat(bits=w_bits, group_size=group or "channel", symmetric=w_bits == 8)
    af = tokens(a_bits, False)
    layers = [ActQuantLinear.from_linear(nn.Linear(128, n, bias=n != 24).to(DEVICE), wf, af) for n in (40, 24, 24)]
    fused = ActQuantLinear.concat(layers)
    x = torch.randn(5, 128, device=DEVICE)
    fused.use_kernels = True
    for layer in layers:
        layer.use_kernels = True
    assert fused.out_features == 88 and torch.allclose(fused(x), torch.cat([layer(x) for layer in layers], dim=-1), atol=1e-5)
    other = ActQuantLinear.from_linear(nn.Linear(128, 8).to(DEVICE), wf, tokens(a_bits, True))
    with pytest.raises(ValueError, match="one \\(kernel, formats, K\\); layer 0 has"):
        ActQuantLinear.concat([layers[0], other])


@pytest.mark.parametrize("w_bits,group,a_bits", [(8, None, 8), (4, 64, 8), (3, None, 4), (6, None, 4)], ids=["w8a8", "w4a8", "lowbit", "bitplane"])
def test_the_operator_compiles_in_one_graph_and_passes_opcheck(w_bits: int, group: int | None, a_bits: int) -> None:
    """Under torch.compile (fullgraph) the layer is the operator ``qkernels::act_quant_matmul``: the eager outputs;
    opcheck's checks of its schema, fake implementation and dispatch pass."""
    from qkernels.act_linear import act_quant_matmul_op, op_fields, op_tensors

    torch.manual_seed(4)
    wf = IntFormat(bits=w_bits, group_size=group or "channel", symmetric=w_bits == 8)
    layer = ActQuantLinear.from_linear(nn.Linear(128, 24), wf, tokens(a_bits, False))
    x = torch.randn(2, 3, 128)
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    assert torch.allclose(compiled(x), layer(x), atol=1e-6)
    torch.library.opcheck(act_quant_matmul_op, (x, *op_tensors(layer.state), *op_fields(layer.state)),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))


@pytest.mark.parametrize("w_bits,a_bits", [(4, 8), (2, 4)], ids=["w4a8", "lowbit"])
def test_packed_weights_in_half_precision_match_the_fake_quant_product(w_bits: int, a_bits: int) -> None:
    """fp16 inputs: on a GPU the tokens fake-quantized onto the weight-only kernels (``w4a8 lowbit``, ``lowbit``), on
    the CPU W4A8's int kernel and lowbit's torch path; either within fp16 rounding of the fp32 fake-quant product."""
    from qkernels.act_linear import act_route

    torch.manual_seed(5)
    linear = nn.Linear(256, 48).to(DEVICE)
    wf, af = IntFormat(bits=w_bits, group_size=128), tokens(a_bits, False)
    layer = ActQuantLinear.from_linear(linear, wf, af)
    x = torch.randn(3, 256, device=DEVICE).half()
    expected = af.fake_quant(x.float()) @ wf.fake_quant(linear.weight.detach()).t()
    fast = layer.matmul(x, kernels=True)
    assert fast.dtype == torch.float16 and ((fast.float() - expected).norm() / expected.norm()).item() < 2e-3
    if w_bits == 4:
        assert act_route("w4a8", 3, 256, 48, torch.device(DEVICE)) == ("w4a8 lowbit" if DEVICE == "cuda" else "w4a8 triton")
    else:
        assert layer.kernel == "lowbit" and act_route("lowbit", 3, 256, 48, torch.device(DEVICE)) == "lowbit"


@pytest.mark.parametrize("symmetric", [False, True])
def test_w4a8_lowbit_layer_path_is_the_codes_times_their_scales(symmetric: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """The layer's ``lowbit`` route takes the fake-quant kernel's output: bit for bit the token codes times their
    scales (what ``w4a8_matmul(path="lowbit")`` dequantizes), so both give the same product."""
    from qkernels import int_matmul as im
    from qkernels.quant import int_fake_quant

    torch.manual_seed(6)
    af = tokens(8, symmetric)
    x = (torch.randn(5, 256, device=DEVICE) * torch.logspace(-1, 1, 256, device=DEVICE)).half()
    codes = quantize_tokens(x, af, kernel=True)
    assert torch.equal(int_fake_quant(x, af), im.dequantize_tokens(codes.codes, codes.scale, codes.zero, torch.float16))
    layer = ActQuantLinear.from_linear(nn.Linear(256, 48).to(DEVICE), IntFormat(bits=4, group_size=128), af)
    monkeypatch.setattr(im, "w4a8_path", lambda m, device, out_dtype: "lowbit")  # (a GPU's route, here on any device)
    sums = None if codes.zero is None else layer.state.code_sum
    expected = im.w4a8_matmul(codes.codes, codes.scale, layer.state.packed, torch.float16, a_zero=codes.zero, w_sum=sums, path="lowbit")
    assert torch.equal(layer.matmul(x, kernels=True), expected)

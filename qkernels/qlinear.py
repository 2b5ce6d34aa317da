"""``QuantLinear``: an ``nn.Linear`` stored packed and multiplied by the low-bit kernels.

Built once from a layer's weight and an :class:`~methods.common.formats.IntFormat` (the codes,
scales and zero points of ``IntFormat.quantize``), or from codes a method already chose. On CUDA the
forward runs the kernel that :func:`qkernels.lowbit_matmul.pick_path` picks for the batch; elsewhere
it runs the plain-torch reference, so a swapped model gives the fake-quant model's outputs on any
machine. :func:`quantize_linear_layers` swaps a model bundle's quantizable layers, and
:func:`restore_linear_layers` puts the originals back.

Under ``torch.compile`` the matmul is the custom operator ``torch.ops.qkernels.lowbit_matmul`` (the
packed weight as its tensors and fields), opaque to Dynamo: a model holding QuantLinear layers compiles
in one graph, Inductor fuses the code around the layers and the kernels run as they do eagerly. The
operator's backward gives the gradient of the activations (the weights stay frozen), so gradients flow
through QuantLinear layers on every device, e.g. to adapters or earlier layers. Eager calls that need no
gradient skip the operator's dispatch and call :func:`qkernels.lowbit_matmul.lowbit_matmul` directly.

``BlockLinear`` does the same for the MX and NV block formats (:mod:`qkernels.block_matmul`: the block GEMV
at batch 1, the tensor-core dot kernel to 64 rows, dequantize + cuBLAS above), through the operator
``torch.ops.qkernels.block_matmul``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from qkernels.block_matmul import BLOCK_PATHS, BlockWeight, dequantize_block, pack_block_weight, pick_block_path
from qkernels.lowbit_matmul import lowbit_matmul
from qkernels.pack import PackedWeight, concat_packed, dequantize_packed, layout_for_bits, pack_weight, slice_rows
from qkernels.quant import PackedTensor
from methods.common.formats import FormatError, IntFormat
from methods.common.microscaling import MxFormat, NvFormat

if TYPE_CHECKING:
    from bench.models import ModelBundle

KERNEL_DTYPES = (torch.float16, torch.bfloat16)


@torch.library.custom_op(
    "qkernels::lowbit_matmul", mutates_args=(),
    schema="(Tensor x, Tensor words, Tensor? high, Tensor scale, Tensor? zero, str layout, float zero_const, int n, int k, "
           "int run, int group_size, float zero_grid, str path) -> Tensor",
)
def lowbit_matmul_op(x, words, high, scale, zero, layout, zero_const, n, k, run, group_size, zero_grid, path):
    """:func:`~qkernels.lowbit_matmul.lowbit_matmul` with the packed weight spelled out, for ``torch.compile``."""
    pw = PackedWeight(layout, words, high, scale, zero, zero_const, n, k, run, group_size, zero_grid)
    return lowbit_matmul(x, pw, path)


@lowbit_matmul_op.register_fake
def _(x, words, high, scale, zero, layout, zero_const, n, k, run, group_size, zero_grid, path):
    return x.new_empty((*x.shape[:-1], n))


def _keep_weight(ctx, inputs, output) -> None:
    x, words, high, scale, zero, *fields, _path = inputs
    ctx.save_for_backward(words, high, scale, zero)
    ctx.fields, ctx.x_dtype = fields, x.dtype


GRAD_BLOCK_ELEMENTS = 1 << 22  # weights dequantized at a time in the backward (fp32, with int64 code temporaries)


def grad_through_rows(grad: torch.Tensor, n: int, k: int, weight_rows) -> torch.Tensor:
    """``dL/dx = dL/dy @ W`` (fp32) with ``weight_rows(start, stop)`` giving rows of W dequantized in fp32, a block
    of rows at a time, so a large layer's backward holds :data:`GRAD_BLOCK_ELEMENTS` weights, not all of them."""
    grad = grad.float()
    step = max(1, GRAD_BLOCK_ELEMENTS // k)
    grad_x = None
    for start in range(0, n, step):
        stop = min(start + step, n)
        part = grad[..., start:stop] @ weight_rows(start, stop)
        grad_x = part if grad_x is None else grad_x.add_(part)
    return grad_x


def _grad_x(ctx, grad):
    """dL/dx through the packed weight (the weights are frozen codes: no gradient of their own)."""
    words, high, scale, zero = ctx.saved_tensors
    layout, *rest = ctx.fields
    pw = PackedWeight(layout, words, high, scale, zero, *rest)
    grad_x = grad_through_rows(grad, pw.n, pw.k, lambda start, stop: dequantize_packed(slice_rows(pw, start, stop), torch.float32))
    return grad_x.to(ctx.x_dtype), *[None] * 12


lowbit_matmul_op.register_autograd(_grad_x, setup_context=_keep_weight)


def packed_matmul(x: torch.Tensor, pw: PackedWeight, path: str = "auto") -> torch.Tensor:
    """``x @ W^T``: through the custom operator while ``torch.compile`` traces or when ``x`` needs a gradient (the
    kernels have no backward of their own; the operator's gives ``dL/dx``), else directly."""
    if torch.compiler.is_compiling() or (x.requires_grad and torch.is_grad_enabled()):
        return lowbit_matmul_op(x, pw.words, pw.high, pw.scale, pw.zero, pw.layout, float(pw.zero_const), pw.n, pw.k, pw.run,
                                pw.group_size, float(pw.zero_grid), path)
    return lowbit_matmul(x, pw, path)


class QuantLinear(nn.Module):
    """``y = x @ dequant(W)^T + b`` with W packed; buffers move with ``.to(device)``."""

    def __init__(self, pw: PackedWeight, bias: torch.Tensor | None = None, path: str = "auto") -> None:
        super().__init__()
        self.layout, self.zero_const, self.zero_grid, self.path = pw.layout, pw.zero_const, pw.zero_grid, path
        self.in_features, self.out_features, self.run, self.group_size = pw.k, pw.n, pw.run, pw.group_size
        self.register_buffer("words", pw.words)
        self.register_buffer("high", pw.high)
        self.register_buffer("scale", pw.scale)
        self.register_buffer("zero", pw.zero)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.plans: dict = {}  # the kernels' launch plans for these buffers (PackedWeight.memo), dropped when they move

    def _apply(self, fn, recurse=True):
        self.plans = {}
        return super()._apply(fn, recurse)

    def __getstate__(self) -> dict:
        return {**super().__getstate__(), "plans": {}}  # copies and pickles hold no plans (nor the tensors in them)

    @property
    def packed(self) -> PackedWeight:
        return PackedWeight(
            self.layout, self.words, self.high, self.scale, self.zero, self.zero_const,
            self.out_features, self.in_features, self.run, self.group_size, self.zero_grid, self.plans,
        )

    @classmethod
    def concat(cls, layers: list[QuantLinear]) -> QuantLinear:
        """One layer for several that read the same input (outputs side by side, in order): one kernel launch
        instead of several (``qkernels.pack.concat_packed``); biases concatenated (zeros where a layer has none)."""
        return cls(concat_packed([layer.packed for layer in layers]), concat_biases(layers), layers[0].path)

    @classmethod
    def from_linear(cls, linear: nn.Linear, fmt: IntFormat, path: str = "auto") -> QuantLinear:
        """Quantize ``linear.weight`` with ``fmt`` (round to nearest on the format's grid) and pack it."""
        return cls(pack_int_weight(linear.weight.detach(), fmt), linear.bias, path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        if x.is_cuda and dtype not in KERNEL_DTYPES:  # the kernels take fp16/bf16 activations
            x = x.to(torch.float16)
        y = packed_matmul(x, self.packed, self.path).to(dtype)
        return y if self.bias is None else y + self.bias.to(dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, layout={self.layout}, group_size={self.group_size}"


def concat_biases(layers: list[nn.Module]) -> torch.Tensor | None:
    """The layers' biases side by side (zeros where a layer has none), or None where none has one."""
    if all(layer.bias is None for layer in layers):
        return None
    return torch.cat([layer.bias if layer.bias is not None else torch.zeros(layer.out_features, device=next(layer.buffers()).device)
                      for layer in layers])


def pack_int_weight(weight: torch.Tensor, fmt: IntFormat) -> PackedWeight:
    """Codes, scales and zeros of ``fmt.quantize(weight)``, packed (symmetric codes offset to unsigned)."""
    if not isinstance(fmt, IntFormat):
        raise FormatError(f"QuantLinear packs the int format; got {fmt.describe()}")
    n, k = weight.shape
    q = fmt.quantize(weight)
    group = fmt.group_size if isinstance(fmt.group_size, int) else None
    n_groups = 1 if group is None else k // group
    codes = (q.codes.reshape(n, k) - fmt.qmin).to(torch.int64)
    per_row = lambda t: t.reshape(-1, n_groups).expand(n, n_groups).contiguous()  # noqa: E731 ("tensor": one row)
    scale = per_row(q.scale).to(torch.float16 if fmt.scale_bits == 16 else torch.float32)  # fp16 holds them exactly
    zero = None if q.zero is None else per_row(q.zero)
    return pack_weight(codes, scale, zero, layout_for_bits(fmt.bits), group, zero_const=-fmt.qmin)


@torch.library.custom_op(
    "qkernels::block_matmul", mutates_args=(),
    schema="(Tensor x, Tensor codes, Tensor block_scale, Tensor code_values, Tensor scale_values, str family, str element, int n, "
           "int k, float tensor_scale, bool prescaled) -> Tensor",
)
def block_matmul_op(x, codes, block_scale, code_values, scale_values, family, element, n, k, tensor_scale, prescaled):
    """:func:`block_forward` with the block weight spelled out (``family`` "mx" or "nv"), for ``torch.compile``."""
    bw = _block_weight(_block_format(family, element), codes, block_scale, code_values, scale_values, n, k, tensor_scale, prescaled)
    return block_forward(x.reshape(-1, k), bw).reshape(*x.shape[:-1], n)


@block_matmul_op.register_fake
def _(x, codes, block_scale, code_values, scale_values, family, element, n, k, tensor_scale, prescaled):
    return x.new_empty((*x.shape[:-1], n))


def _keep_block_weight(ctx, inputs, output) -> None:
    x, codes, block_scale, code_values, scale_values, *fields = inputs
    ctx.save_for_backward(codes, block_scale, code_values, scale_values)
    ctx.fields, ctx.x_dtype = fields, x.dtype


def _block_grad_x(ctx, grad):
    """dL/dx through the block weight, dequantized a block of rows at a time."""
    codes, block_scale, code_values, scale_values = ctx.saved_tensors
    family, element, n, k, tensor_scale, prescaled = ctx.fields
    fmt = _block_format(family, element)

    def weight_rows(start: int, stop: int) -> torch.Tensor:
        return dequantize_block(_block_weight(fmt, codes[start:stop], block_scale[start:stop], code_values, scale_values, stop - start, k,
                                              tensor_scale, prescaled))

    return grad_through_rows(grad, n, k, weight_rows).to(ctx.x_dtype), *[None] * 10


block_matmul_op.register_autograd(_block_grad_x, setup_context=_keep_block_weight)


def _block_format(family: str, element: str) -> MxFormat | NvFormat:
    return MxFormat(element) if family == "mx" else NvFormat(element)


def _block_weight(fmt: MxFormat | NvFormat, codes: torch.Tensor, block_scale: torch.Tensor, code_values: torch.Tensor,
                  scale_values: torch.Tensor, n: int, k: int, tensor_scale: float, prescaled: bool) -> BlockWeight:
    """The block weight of a layer's tensors (the kernels and ``dequantize_block`` read the tensor scale as the float)."""
    return BlockWeight(fmt, PackedTensor(codes, block_scale), n, k, code_values, scale_values, tensor_scale, prescaled)


def block_forward(x2: torch.Tensor, bw: BlockWeight) -> torch.Tensor:
    """``x2 [M, K] @ W^T`` in x2's dtype: on a GPU the path :func:`~qkernels.block_matmul.pick_block_path` picks
    (fp16 or bf16 activations; others in fp16), elsewhere the dequantized weight."""
    if not x2.is_cuda:
        return (x2.float() @ dequantize_block(bw).t()).to(x2.dtype)
    xk = x2 if x2.dtype in KERNEL_DTYPES else x2.to(torch.float16)
    return BLOCK_PATHS[pick_block_path(xk.shape[0], bw)](xk, bw).to(x2.dtype)


class BlockLinear(nn.Module):
    """``y = x @ W^T + b`` with W stored in an MX or NV block format (:mod:`qkernels.block_matmul`): on a GPU the
    tensor-core kernels to ``BLOCK_DOT_MAX_M`` rows (4-bit elements on chunked words; wider ones the GEMV at batch 1),
    dequantize + cuBLAS above (:func:`~qkernels.block_matmul.pick_block_path`); elsewhere the dequantized
    weight (:func:`~qkernels.block_matmul.dequantize_block`), the fake-quant layer's outputs. Through the custom
    operator ``torch.ops.qkernels.block_matmul`` while ``torch.compile`` traces or the activations need a
    gradient (its backward: the dequantized weight, a block of rows at a time)."""

    def __init__(self, bw: BlockWeight, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.fmt, self.in_features, self.out_features, self.tensor_scale = bw.fmt, bw.k, bw.n, bw.tensor_scale
        self.prescaled = bw.prescaled  # the dot kernel may scale the weights before its dots (set at packing)
        self.register_buffer("codes", bw.packed.codes)
        self.register_buffer("block_scale", bw.packed.scale)
        self.register_buffer("code_values", bw.code_values)
        self.register_buffer("scale_values", bw.scale_values)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    @property
    def packed(self) -> BlockWeight:
        return _block_weight(self.fmt, self.codes, self.block_scale, self.code_values, self.scale_values, self.out_features,
                             self.in_features, self.tensor_scale, self.prescaled)

    @classmethod
    def concat(cls, layers: list[BlockLinear]) -> BlockLinear:
        """One layer for several that read the same input (outputs side by side): rows are quantized
        independently, so their codes and block scales stack; NV layers must share their tensor scale."""
        first = layers[0]
        fields = lambda layer: (layer.fmt.name, layer.in_features, layer.tensor_scale)  # noqa: E731
        if different := [i for i, layer in enumerate(layers) if fields(layer) != fields(first)]:
            raise ValueError(f"BlockLinear.concat needs one (format, K, tensor scale); layer 0 has {fields(first)}, layer {different[0]} has "
                             f"{fields(layers[different[0]])} (NV layers: fuse the weights before quantizing)")
        bw = _block_weight(first.fmt, torch.cat([layer.codes for layer in layers]), torch.cat([layer.block_scale for layer in layers]),
                           first.code_values, first.scale_values, sum(layer.out_features for layer in layers), first.in_features,
                           first.tensor_scale, all(layer.prescaled for layer in layers))
        return cls(bw, concat_biases(layers))

    @classmethod
    def from_linear(cls, linear: nn.Linear, fmt: MxFormat | NvFormat) -> BlockLinear:
        """Quantize ``linear.weight`` with ``fmt`` (blocks along the input features) and keep its packed storage."""
        return cls(pack_block_weight(linear.weight.detach().float(), fmt), linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling() or (x.requires_grad and torch.is_grad_enabled()):
            family = "mx" if isinstance(self.fmt, MxFormat) else "nv"
            y = block_matmul_op(x, self.codes, self.block_scale, self.code_values, self.scale_values, family, self.fmt.element,
                                self.out_features, self.in_features, float(self.tensor_scale), self.prescaled)
        else:
            y = block_forward(x.reshape(-1, self.in_features), self.packed).reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, format={self.fmt.name}"


def replace_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


@torch.no_grad()
def quantize_linear_layers(bundle: ModelBundle, fmt: IntFormat | MxFormat | NvFormat, path: str = "auto",
                           act_fmt: IntFormat | None = None) -> dict[str, nn.Linear]:
    """Swap every quantizable layer of ``bundle`` for a QuantLinear of its current weight (a BlockLinear for the
    MX and NV formats; with ``act_fmt``, activations quantized too, an :class:`~qkernels.act_linear.ActQuantLinear`);
    return the originals.

    On pristine weights this gives RTN's codes exactly. On weights a method already fake-quantized,
    min-max re-quantization finds the same grid except where rounding at a group's edge shifts it by
    a step: right for timing, not for exact accuracy (build from the method's own codes for that).
    """
    if not isinstance(fmt, (IntFormat, MxFormat, NvFormat)):
        raise FormatError(f"quantized layers run the int, MX and NV formats; got {fmt.describe()}")
    from qkernels.act_linear import ActQuantLinear  # (it builds on QuantLinear)

    originals = {}
    for name, layer in bundle.layers.items():
        if act_fmt is not None:
            swapped = ActQuantLinear.from_linear(layer, fmt, act_fmt)
        elif isinstance(fmt, (MxFormat, NvFormat)):
            swapped = BlockLinear.from_linear(layer, fmt)
        else:
            swapped = QuantLinear.from_linear(layer, fmt, path)
        replace_module(bundle.model, name, swapped)
        originals[name] = layer
    return originals


def restore_linear_layers(bundle: ModelBundle, originals: dict[str, nn.Linear]) -> None:
    for name, layer in originals.items():
        replace_module(bundle.model, name, layer)

"""``ActQuantLinear``: a linear layer with integer weights *and* integer activations, on the activation-quantized
kernels of :mod:`qkernels.int_matmul` (W8A8, W4A8 and ABQ-LLM's bit-plane WpAq) or, for 1..4-bit weights, the
weight-only kernels on per-token fake-quantized activations.

Built from a layer's weight, the cell's weight format (an :class:`~methods.common.formats.IntFormat` with one
scale per output channel, or per group up to 4 bits) and its activation format (an ``IntFormat`` with one scale per
token, dynamic: scales from each call, min-max), so a swapped model computes what the fake-quant model computes. The
kernels (:func:`act_kernels`; a layer takes the first that fits unless told another):

* ``w8a8``: 8-bit symmetric weights and 8-bit activations: :func:`~qkernels.int_matmul.int8_matmul` (a Triton
  kernel for a few rows, cuBLASLt's int8 GEMM above). Asymmetric activation codes are read as ``code - 128``
  (int8) and ``128 - zero`` comes back in the epilogue with the weight rows' code sums.
* ``w4a8``: 4-bit grouped weights (packed ``uint4``, integer zero points) and 8-bit activations:
  :func:`~qkernels.int_matmul.w4a8_matmul`, asymmetric activations the same way (the dequantized weight rows' sums).
  On a GPU with fp16/bf16 inputs its tokens go dequantized onto the weight-only W4 kernels (``lowbit``, faster on
  an H200 than its int kernel at every batch; :func:`~qkernels.int_matmul.w4a8_path`): the fake-quant kernel writes
  the codes times their scales in one pass (session 18 timed the earlier form: the codes, then torch ops).
* ``lowbit``: any other 1..4-bit weights (one scale per output channel or per group) with 1..8-bit activations: the
  activations fake-quantized per token by one kernel (the codes times their scales, in x's dtype), then the
  weight-only W1-W4 kernels of :func:`~qkernels.lowbit_matmul.lowbit_matmul` on the packed weight. Hopper has no int4
  or binary tensor cores; by the kernels' own H200 times this is the faster route there (8192^2, batch 1: the W4
  tensor-core GEMV 13.3 us, the bit-plane W4A4 kernel 126), the two together not timed yet (session 18).
* ``bitplane``: 1..8-bit weights with one scale per output channel and 1..8-bit activations: the weight's binary
  planes times the activations' digits (:func:`~qkernels.int_matmul.bitplane_matmul`, ABQ-LLM's WpAq), zero points
  and scales in its epilogue; the preferred kernel for 5..8-bit weights, a choice (``kernel="bitplane"``) for the
  others. Symmetric codes are shifted to unsigned ones with the zero point ``2^(bits - 1)`` (exact).

On CUDA the activations are quantized by :func:`qkernels.quant.int_quantize_codes` (a code a byte, fp32 scales and
zero points: what the integer matmuls read; ``lowbit``: :func:`qkernels.quant.int_fake_quant`), then the kernel runs;
elsewhere the layer computes the fake-quant product in fp32 (the format's quantize and dequantize), the same numbers.
Grouped weights wider than 4 bits, clipped weight ranges, and static or clipped activation ranges have no kernel here
(:func:`act_kernels` names why). Under
``torch.compile`` the layer is the custom operator ``torch.ops.qkernels.act_quant_matmul`` (the weight's tensors
and fields spelled out), so a model of these layers compiles in one graph; the operator has no backward (the
kernels are for inference; on a CPU the eager layer's fake-quant product has gradients).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from qkernels import int_matmul as im
from qkernels.pack import PackedWeight, dequantize_packed, layout_for_bits, unpack_uint
from qkernels.qlinear import QuantLinear, concat_biases, pack_int_weight
from qkernels.lowbit_matmul import lowbit_matmul
from qkernels.quant import int_fake_quant, int_quantize_codes
from methods.common.formats import FormatError, IntFormat

ACT_KERNELS = ("w8a8", "w4a8", "lowbit", "bitplane")
PACKED_KERNELS = ("w4a8", "lowbit")  # the layer keeps a QuantLinear's packed weight


def act_kernels(weight_fmt: object, act_fmt: object) -> list[str]:
    """The kernels that take this pair of formats, the preferred first (:data:`ACT_KERNELS` order), or a
    :class:`FormatError` that says why none does."""
    if not isinstance(weight_fmt, IntFormat) or not isinstance(act_fmt, IntFormat):
        raise FormatError(f"activation-quantized kernels take int weights and int activations; got {_name(weight_fmt)} and {_name(act_fmt)}")
    if act_fmt.group_size != "token" or act_fmt.bits > 8 or act_fmt.clip != "minmax":
        raise FormatError(f"activation-quantized kernels take 1..8-bit activations with one min-max scale per token; got {act_fmt.describe()}")
    minmax, channel, grouped = weight_fmt.clip == "minmax", weight_fmt.group_size == "channel", isinstance(weight_fmt.group_size, int)
    fits = {
        "w8a8": minmax and channel and weight_fmt.bits == 8 and weight_fmt.symmetric and act_fmt.bits == 8,
        "w4a8": minmax and grouped and weight_fmt.bits == 4 and act_fmt.bits == 8,
        "lowbit": minmax and (channel or grouped) and weight_fmt.bits <= 4,
        "bitplane": minmax and channel and weight_fmt.bits <= 8,
    }
    if not any(fits.values()):
        raise FormatError(f"activation-quantized kernels take min-max int weights: 1..8 bits with one scale per output channel, or "
                          f"1..4 bits per group; got {weight_fmt.describe()} with {act_fmt.describe()}")
    return [kernel for kernel in ACT_KERNELS if fits[kernel]]


def act_kernel(weight_fmt: object, act_fmt: object) -> str:
    """The preferred kernel for this pair of formats (:func:`act_kernels`)."""
    return act_kernels(weight_fmt, act_fmt)[0]


def act_route(kernel: str, m: int, k: int, n: int, device: torch.device, dtype: torch.dtype = torch.float16) -> str:
    """The kernel and the path it takes for ``m`` rows of a ``[n, k]`` weight, e.g. ``w8a8 cublas``, ``w4a8 lowbit``."""
    if kernel == "w8a8":
        return f"w8a8 {im.int8_path(m, k, n, device)}"
    if kernel == "w4a8":
        return f"w4a8 {im.w4a8_path(m, device, dtype)}"
    if kernel == "lowbit":
        return "lowbit"
    return f"bitplane {im.int_act_path(m, device)}"


def _name(fmt: object) -> str:
    return fmt.describe() if hasattr(fmt, "describe") else type(fmt).__name__


@dataclass
class TokenCodes:
    """Activation codes of a ``[M, K]`` input a byte each (asymmetric: uint8 codes; symmetric: int8 values), one fp32
    scale and zero point per row (``zero`` None: symmetric)."""

    codes: torch.Tensor
    scale: torch.Tensor  # fp32 [M]
    zero: torch.Tensor | None  # fp32 [M]


def quantize_tokens(x2: torch.Tensor, fmt: IntFormat, kernel: bool | None = None) -> TokenCodes:
    """``x2 [M, K]`` quantized per row with ``fmt`` (dynamic min-max): the Triton kernel (``kernel``; default: on CUDA)
    writing a code a byte and fp32 scales (:func:`~qkernels.quant.int_quantize_codes`: what the matmuls read, no
    conversions), else the format's own quantize; the same codes either way."""
    if x2.is_cuda if kernel is None else kernel:
        q = int_quantize_codes(x2, fmt)
        return TokenCodes(q.codes, q.scale.reshape(-1), None if q.zero is None else q.zero.reshape(-1))
    q = fmt.quantize(x2)
    codes = q.codes.reshape(x2.shape).to(torch.int8 if fmt.symmetric else torch.uint8)
    return TokenCodes(codes, q.scale.float().reshape(-1), None if q.zero is None else q.zero.float().reshape(-1))


class ActQuantLinear(nn.Module):
    """``y = x @ W^T + b`` with W and x integer-quantized (see the module notes); the weight kept as codes."""

    use_kernels: bool | None = None  # None: the kernels on CUDA, the fake-quant product elsewhere; True: the kernels anywhere

    def __init__(self, weight: torch.Tensor, weight_fmt: IntFormat, act_fmt: IntFormat, bias: torch.Tensor | None = None,
                 kernel: str | None = None) -> None:
        """``kernel``: one of :func:`act_kernels` for these formats (default: the preferred one)."""
        super().__init__()
        choices = act_kernels(weight_fmt, act_fmt)
        if kernel is not None and kernel not in choices:
            raise FormatError(f"kernel={kernel!r} does not take {weight_fmt.describe()} with {act_fmt.describe()}; choose one of {choices}")
        self.kernel = kernel or choices[0]
        self.weight_fmt, self.act_fmt = weight_fmt, act_fmt
        self.out_features, self.in_features = weight.shape
        if self.kernel in PACKED_KERNELS:
            self._keep_packed(weight.detach().float())
        else:
            self._keep_per_channel(weight.detach().float())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    def _keep_packed(self, weight: torch.Tensor) -> None:
        """W4A8 and lowbit: the packed weight of a QuantLinear (its buffers move with the layer); W4A8: the dequantized
        rows' sums too (its offset term for asymmetric activations)."""
        self.weight_layer = QuantLinear(pack_int_weight(weight, self.weight_fmt))
        code_sum = None
        if self.kernel == "w4a8":
            im.w4a8_sub_slots(self.weight_layer.packed)  # the weight fits the kernel (else a ValueError naming why)
            code_sum = dequantize_packed(self.weight_layer.packed).sum(dim=1)
        self.register_buffer("code_sum", code_sum)

    def _keep_per_channel(self, weight: torch.Tensor) -> None:
        """W8A8: the int8 codes; bit-plane: the binary planes of unsigned codes (symmetric ones shifted by
        ``2^(bits - 1)``, their zero point with them). Both: fp32 scales and zero points per row; W8A8: the code sums
        too (its zero-point term; the bit-plane kernel counts its own, split by split)."""
        q = self.weight_fmt.quantize(weight)
        scale = q.scale.float().reshape(-1)
        half = 2 ** (self.weight_fmt.bits - 1) if self.kernel == "bitplane" and self.weight_fmt.symmetric else 0
        codes = q.codes.reshape(weight.shape) + half
        zero = (q.zero.float().reshape(-1) if q.zero is not None else torch.zeros_like(scale)) + half
        if self.kernel == "w8a8":  # symmetric weights: int8 as they are
            self.register_buffer("codes", codes.to(torch.int8))
        else:
            bw = im.pack_bitplanes(codes.to(torch.int64), self.weight_fmt.bits, scale, zero)
            self.register_buffer("planes", bw.planes)
            self.run = bw.run
        self.register_buffer("scale", scale)
        self.register_buffer("zero", zero)
        self.register_buffer("code_sum", codes.float().sum(dim=1) if self.kernel == "w8a8" else None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, weight_fmt: IntFormat, act_fmt: IntFormat, kernel: str | None = None) -> ActQuantLinear:
        return cls(linear.weight, weight_fmt, act_fmt, linear.bias, kernel)

    @classmethod
    def concat(cls, layers: list[ActQuantLinear]) -> ActQuantLinear:
        """One layer for several that read the same input (outputs side by side): their weights' rows (and groups)
        are quantized independently, so codes, planes, scales and sums stack as they are."""
        first = layers[0]
        fields = lambda layer: (layer.kernel, layer.weight_fmt, layer.act_fmt, layer.in_features)  # noqa: E731
        if different := [i for i, layer in enumerate(layers) if fields(layer) != fields(first)]:
            raise ValueError(f"ActQuantLinear.concat needs one (kernel, formats, K); layer 0 has {fields(first)}, layer {different[0]} has "
                             f"{fields(layers[different[0]])}")
        merged = copy.deepcopy(first)
        merged.out_features = sum(layer.out_features for layer in layers)
        for name, buffer in first.named_buffers(recurse=False):
            if name != "bias":
                setattr(merged, name, torch.cat([getattr(layer, name) for layer in layers], dim=1 if name == "planes" else 0))
        if first.kernel in PACKED_KERNELS:
            merged.weight_layer = QuantLinear.concat([layer.weight_layer for layer in layers])
        merged.bias = concat_biases(layers)
        return merged

    @property
    def state(self) -> ActWeight:
        """What the kernels read of this layer (:class:`ActWeight`), over its buffers."""
        packed = self.weight_layer.packed if self.kernel in PACKED_KERNELS else None
        tensors = {name: getattr(self, name, None) for name in ("codes", "planes", "scale", "zero")}
        return ActWeight(self.kernel, self.act_fmt, self.out_features, self.in_features, self.weight_fmt.bits, self.code_sum,
                         run=getattr(self, "run", 0), packed=packed, **tensors)

    def dequantized_weight(self) -> torch.Tensor:
        """fp32 ``[out, in]``: the codes' values, what the fake-quant layer multiplies by."""
        return self.state.dequantized()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            y = act_quant_matmul_op(x, *op_tensors(self.state), *op_fields(self.state))
        else:
            x2 = x.reshape(-1, self.in_features)
            y = self.matmul(x2, kernels=x2.is_cuda if self.use_kernels is None else self.use_kernels)
            y = y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def matmul(self, x2: torch.Tensor, kernels: bool) -> torch.Tensor:
        """``x2 [M, K]`` times the weight, both quantized: on the kernels (``kernels``; any device under the Triton
        interpreter) or as the fake-quant product in fp32."""
        return act_matmul(x2, self.state, kernels)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, kernel={self.kernel}, weights="
                f"{self.weight_fmt.describe()}, activations={self.act_fmt.describe()}")


@dataclass
class ActWeight:
    """What the kernels read of an :class:`ActQuantLinear`: its kernel, the activations' format, the weight's sizes
    and tensors (W8A8: int8 ``codes``; bit-plane: ``planes`` of ``run``; both: per-row ``scale``, ``zero``; W4A8 and
    lowbit: the ``packed`` weight) and, for W8A8 and W4A8, the rows' ``code_sum`` (the offset terms)."""

    kernel: str
    act_fmt: IntFormat
    n: int
    k: int
    w_bits: int
    code_sum: torch.Tensor | None
    codes: torch.Tensor | None = None
    planes: torch.Tensor | None = None
    scale: torch.Tensor | None = None
    zero: torch.Tensor | None = None
    run: int = 0
    packed: PackedWeight | None = None

    def dequantized(self) -> torch.Tensor:
        """fp32 ``[n, k]``: the codes' values."""
        if self.kernel == "w8a8":
            return self.codes.float() * self.scale[:, None]
        if self.kernel in PACKED_KERNELS:
            return dequantize_packed(self.packed)
        planes = (unpack_uint(self.planes[i], 1, self.run)[:, : self.k].float() * 2.0**i for i in range(self.w_bits))
        return (sum(planes) - self.zero[:, None]) * self.scale[:, None]

    def bitplanes(self) -> im.BitplaneWeight:
        return im.BitplaneWeight(self.planes, self.scale, self.zero, self.w_bits, self.n, self.k, self.run)


def act_matmul(x2: torch.Tensor, aw: ActWeight, kernels: bool) -> torch.Tensor:
    """``x2 [M, K]`` times the weight, both quantized: the activations quantized per token, then the layer's kernel
    (``kernels``; any device under the Triton interpreter), or the fake-quant product in fp32."""
    if not kernels:
        return aw.act_fmt.fake_quant(x2.float()) @ aw.dequantized().t()
    out_dtype = x2.dtype if x2.dtype in (torch.float16, torch.bfloat16, torch.float32) else torch.float32
    if aw.kernel == "lowbit" or (aw.kernel == "w4a8" and im.w4a8_path(x2.shape[0], x2.device, out_dtype) == "lowbit"):
        # the codes times their scales in x's dtype in one kernel (the fake-quant kernel's output is exactly that), onto
        # the weight-only kernels (for W4A8: w4a8_matmul's "lowbit" path without the codes' round trip)
        fake = int_fake_quant(x2, aw.act_fmt)
        if out_dtype == torch.float32:  # (the packed kernels take fp16/bf16)
            return fake @ aw.dequantized().t()
        return lowbit_matmul(fake, aw.packed)
    tokens = quantize_tokens(x2, aw.act_fmt, kernel=True)
    if aw.kernel in ("w8a8", "w4a8"):  # 8-bit activations: int8 values, or uint8 codes with zero points
        sums = None if tokens.zero is None else aw.code_sum
        if aw.kernel == "w4a8":
            return im.w4a8_matmul(tokens.codes, tokens.scale, aw.packed, out_dtype, a_zero=tokens.zero, w_sum=sums)
        return im.int8_matmul(tokens.codes, tokens.scale, aw.codes, aw.scale, out_dtype, a_zero=tokens.zero, b_sum=sums)
    if tokens.zero is not None:
        codes, zero = tokens.codes, tokens.zero
    else:  # signed values -> unsigned codes v + 2^(bits - 1): the value's low bits with the top one flipped
        half = 2 ** (aw.act_fmt.bits - 1)
        codes, zero = (tokens.codes.view(torch.uint8) & (2 * half - 1)) ^ half, torch.full_like(tokens.scale, half)
    return im.bitplane_matmul(codes, aw.act_fmt.bits, tokens.scale, zero, aw.bitplanes(), out_dtype)


# ----------------------------------------------------------------------------- the operator torch.compile sees


def op_tensors(aw: ActWeight) -> tuple:
    """The weight's tensors as the operator takes them (absent ones None)."""
    pw = aw.packed
    return (aw.code_sum, aw.codes, aw.planes, aw.scale, aw.zero, *((pw.words, pw.high, pw.scale, pw.zero) if pw is not None else (None,) * 4))


def op_fields(aw: ActWeight) -> tuple:
    """The weight's and the activations' fields as the operator takes them."""
    pw, fmt = aw.packed, aw.act_fmt
    grouped = (pw.run, pw.group_size, float(pw.zero_const), float(pw.zero_grid)) if pw is not None else (0, 0, 0.0, 0.0)
    return (aw.kernel, aw.w_bits, fmt.bits, fmt.symmetric, fmt.scale_bits, aw.n, aw.k, aw.run, *grouped)


@torch.library.custom_op(
    "qkernels::act_quant_matmul", mutates_args=(),
    schema="(Tensor x, Tensor? code_sum, Tensor? codes, Tensor? planes, Tensor? scale, Tensor? zero, Tensor? words, Tensor? high, "
           "Tensor? group_scale, Tensor? group_zero, str kernel, int w_bits, int a_bits, bool a_symmetric, int a_scale_bits, int n, "
           "int k, int run, int group_run, int group_size, float zero_const, float zero_grid) -> Tensor",
)
def act_quant_matmul_op(x, code_sum, codes, planes, scale, zero, words, high, group_scale, group_zero, kernel, w_bits, a_bits,
                        a_symmetric, a_scale_bits, n, k, run, group_run, group_size, zero_const, zero_grid):
    """:func:`act_matmul` with the weight spelled out (the kernels on CUDA, the fake-quant product elsewhere), for
    ``torch.compile``: Dynamo sees one operator, not the kernels' Python."""
    act_fmt = IntFormat(bits=a_bits, group_size="token", symmetric=a_symmetric, scale_bits=a_scale_bits)
    packed = None
    if words is not None:
        packed = PackedWeight(layout_for_bits(w_bits), words, high, group_scale, group_zero, zero_const, n, k, group_run, group_size, zero_grid)
    aw = ActWeight(kernel, act_fmt, n, k, w_bits, code_sum, codes, planes, scale, zero, run, packed)
    x2 = x.reshape(-1, k)
    return act_matmul(x2, aw, kernels=x.is_cuda).to(x.dtype).reshape(*x.shape[:-1], n)


@act_quant_matmul_op.register_fake
def _(x, code_sum, codes, planes, scale, zero, words, high, group_scale, group_zero, kernel, w_bits, a_bits, a_symmetric, a_scale_bits,
      n, k, run, group_run, group_size, zero_const, zero_grid):
    return x.new_empty((*x.shape[:-1], n))

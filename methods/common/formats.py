"""Number formats: how a tensor becomes low-bit numbers, and back.

A format quantizes the last dimension of a tensor in groups (a row of a weight ``[out, in]`` is one
output channel; a row of an activation ``[..., hidden]`` is one token). Each format gives

* ``quantize(x) -> QTensor`` (integer codes + scales, and zeros for asymmetric formats),
* ``dequantize(q) -> Tensor``,
* ``fake_quant(x)``: the round trip in the input's dtype, what methods use to simulate a format,
* ``bits_per_element(shape)``: the exact storage cost including scales and zeros,
* ``element_bits`` and ``granularity``: the bits of one code and the group size the format really uses
  (the pipeline records these, so a format whose bits are fixed records its own, whatever ``bits`` says).

``group_size`` is an int (elements per group along the last dim), ``"channel"``/``"token"`` (one group
per row) or ``"tensor"`` (one scale for the whole tensor).

Non-finite input, in every format: a group (or block) holding a NaN or an infinity dequantizes to NaN
throughout: its scale is stored as NaN (the scale type's NaN encoding) and its codes as 0. One bad value
cannot silently become a large finite number, and a NaN never turns into a number.

This module holds the interface, the helpers shared by all formats, clipping and the INT format; the
others live beside it (``fp_formats``, ``microscaling``, ``binary_formats``, ``rotation``).
"""

from __future__ import annotations

import importlib.util
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable, Union

import torch

from bench.errors import ConfigError

GroupSize = Union[int, str]
ROW_GRANULARITIES = ("channel", "token")
GRANULARITIES = ROW_GRANULARITIES + ("tensor",)
CLIP_METHODS = ("minmax", "percentile", "mse")
FP16_TINY = torch.finfo(torch.float16).tiny


class FormatError(ConfigError):
    """A format was asked for something it cannot do; the message names the value and the choices."""


@dataclass
class QTensor:
    """Quantized tensor: codes laid out as ``[rows, n_groups, group]``; one scale (and zero) per group.

    ``codes`` is an integer tensor whose meaning is the format's (grid indices for INT, bit patterns for
    FP elements); ``scale`` holds the decoded scale values shaped ``[rows, n_groups, 1]``;
    ``tensor_scale`` is the second-level FP32 scale of two-level formats (NVFP4), else None.
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    shape: torch.Size
    dtype: torch.dtype
    tensor_scale: torch.Tensor | None = None


def check_group_size(group_size: GroupSize) -> GroupSize:
    if isinstance(group_size, str):
        if group_size not in GRANULARITIES:
            raise FormatError(f"group_size={group_size!r} is not valid; use a positive int or one of {GRANULARITIES}")
        return group_size
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise FormatError(f"group_size={group_size!r} is not valid; use a positive int or one of {GRANULARITIES}")
    return group_size


def check_int(name: str, value: object, low: int, high: int, hint: str = "") -> int:
    """Validate an int knob; the error names the knob, the value and the valid range."""
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise FormatError(f"{name}={value!r} is not valid; choose an integer in {low}..{high}{hint}")
    return value


def check_choice(name: str, value: object, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise FormatError(f"{name}={value!r} is not valid; choose one of {list(choices)}")
    return value  # type: ignore[return-value]


def group_view(x: torch.Tensor, group_size: GroupSize) -> torch.Tensor:
    """Reshape ``x`` to ``[rows, n_groups, group]`` along its last dim (ragged last groups are an error)."""
    width = x.shape[-1]
    if group_size == "tensor":
        return x.reshape(1, 1, -1)
    if group_size in ROW_GRANULARITIES:
        return x.reshape(-1, 1, width)
    if width % group_size:
        raise FormatError(f"group_size={group_size} does not divide the last dim {width}")
    return x.reshape(-1, width // group_size, group_size)


def block_view(x: torch.Tensor, block: int) -> torch.Tensor:
    """``[rows, n_blocks, block]`` along the last dim; a ragged last block is padded with zeros.

    Zero padding leaves an amax-based block scale unchanged, so a short last block is quantized as if
    it were stored padded (which is how the packed codes store it).
    """
    rows = x.reshape(-1, x.shape[-1])
    pad = -x.shape[-1] % block
    if pad:
        rows = torch.nn.functional.pad(rows, (0, pad))
    return rows.reshape(rows.shape[0], -1, block)


def unblock(values: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Inverse of :func:`block_view`: drop the padding of the last block and restore ``shape``."""
    return values.reshape(values.shape[0], -1)[:, : shape[-1]].reshape(shape)


def n_blocks(width: int, block: int) -> int:
    return -(-width // block)


def groups_per_tensor(shape: torch.Size | tuple[int, ...], group_size: GroupSize) -> int:
    numel = math.prod(shape)
    if group_size == "tensor":
        return 1
    if group_size in ROW_GRANULARITIES:
        return numel // shape[-1]
    return numel // group_size


def valid_group_sizes(width: int, candidates: tuple[int, ...] = (16, 32, 64, 128, 256, 512, 1024)) -> list[int]:
    return [g for g in candidates if width % g == 0]


def check_group_divides(group_size: GroupSize, width: int, where: str) -> None:
    if isinstance(group_size, int) and width % group_size:
        raise FormatError(
            f"group_size={group_size} does not divide the input width {width} of layer {where}; "
            f"valid group sizes: {valid_group_sizes(width)} or 'channel'"
        )


def split_nonfinite(groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(groups with NaN/inf replaced by 0, [..., 1] mask of the groups that held any)``."""
    finite = torch.isfinite(groups)
    return torch.where(finite, groups, torch.zeros_like(groups)), ~finite.all(dim=-1, keepdim=True)


def poison(scale: torch.Tensor, bad: torch.Tensor) -> torch.Tensor:
    """The scale with the groups in ``bad`` set to NaN (see the module docstring)."""
    return torch.where(bad, torch.full_like(scale, math.nan), scale)


def stored_scale(scale: torch.Tensor, scale_bits: int) -> torch.Tensor:
    """A positive scale as stored in ``scale_bits`` (16: fp16, rounded to nearest; 32: fp32), at least
    fp16's smallest normal, so that the simulated numbers are the stored ones."""
    if scale_bits == 16:
        scale = scale.to(torch.float16).float()
    return scale.clamp_min(FP16_TINY)


def exact_div(numerator: torch.Tensor | float, denominator: torch.Tensor | float) -> torch.Tensor:
    """IEEE division, on every device. torch computes ``number / tensor`` as a reciprocal times the number,
    and on CUDA ``tensor / number`` as the tensor times the number's reciprocal: both round twice."""
    device = (numerator if isinstance(numerator, torch.Tensor) else denominator).device

    def as_tensor(value: torch.Tensor | float) -> torch.Tensor:
        # torch.full fills on the device (no host-to-device copy: CUDA-graph safe)
        return value if isinstance(value, torch.Tensor) else torch.full((), value, dtype=torch.float32, device=device)

    return torch.div(as_tensor(numerator), as_tensor(denominator))


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal shape, dtype and bits, except that any NaN matches any NaN: how kernels meet their references."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if not a.is_floating_point():
        return torch.equal(a, b)
    nan = torch.isnan(a)
    as_int = {2: torch.int16, 4: torch.int32}[a.element_size()]
    return torch.equal(nan, torch.isnan(b)) and torch.equal(a[~nan].view(as_int), b[~nan].view(as_int))


def triton_kernels_for(x: torch.Tensor) -> bool:
    """Whether ``fake_quant`` should run the Triton kernel: CUDA tensors, with Triton installed."""
    return x.is_cuda and importlib.util.find_spec("triton") is not None


class Format(ABC):
    """A number format; subclasses are dataclasses holding their knobs."""

    name: str = "format"

    @abstractmethod
    def quantize(self, x: torch.Tensor) -> QTensor: ...

    @abstractmethod
    def dequantize(self, q: QTensor) -> torch.Tensor: ...

    @abstractmethod
    def bits_per_element(self, shape: torch.Size | tuple[int, ...]) -> float: ...

    def fake_quant(self, x: torch.Tensor) -> torch.Tensor:
        return self.dequantize(self.quantize(x))

    @property
    def element_bits(self) -> float | None:
        """Bits of one code, scales excluded (None: the format does not say)."""
        return None

    @property
    def granularity(self) -> GroupSize | None:
        """Elements per scale along the last dim, or a granularity name (None: the format does not say)."""
        return None

    def check_width(self, width: int, where: str) -> None:
        """Raise a clear error if this format cannot group a last dim of ``width`` (``where`` names the layer)."""

    def describe(self) -> str:
        return self.name


# (groups, lo, hi) -> the groups' round trip through the format with the range [lo, hi] per group.
RoundTrip = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Clipping:
    """Which range ``[lo, hi]`` of each group a scaled format maps onto its grid.

    ``minmax`` keeps the whole range; ``percentile`` clips to the given percentile of each group (of
    ``|x|`` for symmetric formats, of ``x`` at both ends otherwise); ``mse`` shrinks the min-max range by
    a ratio searched per group on ``steps`` points from 1 down to ``min_ratio``, keeping the ratio whose
    round trip has the smallest ``sum |x - q(x)|^norm`` (the search of GPTQ's quantizer, norm 2.4).
    """

    method: str = "minmax"
    percentile: float = 99.9
    steps: int = 100
    min_ratio: float = 0.2
    norm: float = 2.4

    def __post_init__(self) -> None:
        check_choice("clip", self.method, CLIP_METHODS)
        if not 50.0 < self.percentile <= 100.0:
            raise FormatError(f"clip_percentile={self.percentile!r} is not valid; choose a value in (50, 100]")
        check_int("clip_steps", self.steps, 1, 10_000)
        if not 0.0 < self.min_ratio <= 1.0:
            raise FormatError(f"clip_min_ratio={self.min_ratio!r} is not valid; choose a value in (0, 1]")
        if not self.norm > 0:
            raise FormatError(f"clip_norm={self.norm!r} is not valid; choose a positive number")

    def range(self, groups: torch.Tensor, symmetric: bool, roundtrip: RoundTrip) -> tuple[torch.Tensor, torch.Tensor]:
        """``(lo, hi)`` per group of a finite ``[rows, n_groups, group]`` tensor, each ``[..., 1]``.

        For symmetric formats ``lo = -hi`` and ``hi`` bounds ``|x|``.
        """
        if self.method == "percentile":
            return percentile_range(groups, self.percentile, symmetric)
        lo, hi = minmax_range(groups, symmetric)
        if self.method == "mse":
            return self._search(groups, lo, hi, roundtrip)
        return lo, hi

    def _search(self, groups: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, roundtrip: RoundTrip) -> tuple[torch.Tensor, torch.Tensor]:
        best_err = torch.full_like(hi, math.inf)
        best_ratio = torch.ones_like(hi)
        for ratio in torch.linspace(1.0, self.min_ratio, self.steps).tolist():
            err = (roundtrip(groups, lo * ratio, hi * ratio) - groups).abs().pow(self.norm).sum(-1, keepdim=True)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_ratio = torch.where(better, torch.full_like(best_ratio, ratio), best_ratio)
        return lo * best_ratio, hi * best_ratio


def minmax_range(groups: torch.Tensor, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    if symmetric:
        hi = groups.abs().amax(dim=-1, keepdim=True)
        return -hi, hi
    return groups.amin(dim=-1, keepdim=True), groups.amax(dim=-1, keepdim=True)


def percentile_range(groups: torch.Tensor, percentile: float, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group percentiles by ``kthvalue`` (``torch.quantile`` refuses large inputs)."""
    n = groups.shape[-1]
    k = min(n, max(1, math.ceil(percentile / 100.0 * n)))
    if symmetric:
        hi = groups.abs().kthvalue(k, dim=-1, keepdim=True).values
        return -hi, hi
    hi = groups.kthvalue(k, dim=-1, keepdim=True).values
    lo = groups.kthvalue(n - k + 1, dim=-1, keepdim=True).values
    return lo, hi


@dataclass
class IntFormat(Format):
    """Uniform integer grid, symmetric or asymmetric, with scales stored in ``scale_bits``.

    Asymmetric: ``q = clamp(round(x / s) + z, 0, 2^b - 1)`` with an integer zero point ``z`` stored in
    ``b`` bits. Symmetric: ``q = clamp(round(x / s), -2^(b-1), 2^(b-1) - 1)`` with ``s = absmax / (2^(b-1) - 1)``.
    Scales are rounded to fp16 (``scale_bits=16``) so the simulated numbers are the stored ones. The range
    that ``s`` (and ``z``) map onto the grid is the group's min-max, or a clipped one (``clip``).
    """

    bits: int = 4
    group_size: GroupSize = 128
    symmetric: bool = False
    scale_bits: int = 16
    clip: str = "minmax"
    clip_percentile: float = 99.9
    clip_steps: int = 100
    clip_min_ratio: float = 0.2
    clip_norm: float = 2.4
    name: str = "int"

    def __post_init__(self) -> None:
        check_int("bits", self.bits, 1, 16, " for the int format")
        if self.symmetric and self.bits < 2:
            raise FormatError("bits=1 has no symmetric int grid; use symmetric=false or the binary format")
        if self.scale_bits not in (16, 32):
            raise FormatError(f"scale_bits={self.scale_bits!r} is not valid; choose 16 or 32")
        self.group_size = check_group_size(self.group_size)
        self.clipping = Clipping(self.clip, self.clip_percentile, self.clip_steps, self.clip_min_ratio, self.clip_norm)

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1)) if self.symmetric else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.symmetric else 2**self.bits - 1

    @property
    def element_bits(self) -> int:
        return self.bits

    @property
    def granularity(self) -> GroupSize:
        return self.group_size

    def _scales_from_range(self, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.symmetric:
            return stored_scale(exact_div(hi, self.qmax), self.scale_bits), None
        lo, hi = lo.clamp(max=0), hi.clamp(min=0)
        scale = stored_scale(exact_div(hi - lo, self.qmax), self.scale_bits)
        return scale, torch.round(-lo / scale).clamp(0, self.qmax)

    def _codes(self, groups: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None) -> torch.Tensor:
        offset = zero if zero is not None else 0.0
        return torch.clamp(torch.round(groups / scale) + offset, self.qmin, self.qmax)

    def _roundtrip(self, groups: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
        scale, zero = self._scales_from_range(lo, hi)
        return (self._codes(groups, scale, zero) - (zero if zero is not None else 0.0)) * scale

    def scales_for(self, groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Scale (and zero point) per group of a finite ``[rows, n_groups, group]`` float tensor."""
        return self._scales_from_range(*self.clipping.range(groups, self.symmetric, self._roundtrip))

    def quantize(self, x: torch.Tensor, scale: torch.Tensor | None = None, zero: torch.Tensor | None = None) -> QTensor:
        """Quantize ``x``; pass ``scale``/``zero`` (shaped ``[rows, n_groups, 1]``) to use searched ones."""
        groups, bad = split_nonfinite(group_view(x.float(), self.group_size))
        if scale is None:
            scale, zero = self.scales_for(groups)
        codes = torch.where(bad, 0.0, self._codes(groups, scale, zero)).to(torch.int32)
        zero = None if zero is None else torch.where(bad, 0.0, zero)
        return QTensor(codes, poison(scale, bad), zero, x.shape, x.dtype)

    def dequantize(self, q: QTensor) -> torch.Tensor:
        values = q.codes.float() - (q.zero if q.zero is not None else 0.0)
        return (values * q.scale).reshape(q.shape).to(q.dtype)

    def fake_quant(self, x: torch.Tensor) -> torch.Tensor:
        if triton_kernels_for(x) and self.clip == "minmax" and self.group_size != "tensor":
            from qkernels.quant import int_fake_quant

            return int_fake_quant(x, self)
        return self.dequantize(self.quantize(x))

    def bits_per_element(self, shape: torch.Size | tuple[int, ...]) -> float:
        per_group = self.scale_bits + (0 if self.symmetric else self.bits)
        return self.bits + per_group * groups_per_tensor(shape, self.group_size) / math.prod(shape)

    def check_width(self, width: int, where: str) -> None:
        check_group_divides(self.group_size, width, where)

    def describe(self) -> str:
        kind = "sym" if self.symmetric else "asym"
        clip = "" if self.clip == "minmax" else f"-{self.clip}"
        return f"int{self.bits}-{kind}-g{self.group_size}{clip}"

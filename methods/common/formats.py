"""Number formats: how a tensor becomes low-bit numbers, and back.

A format quantizes the last dimension of a tensor in groups (a row of a weight ``[out, in]`` is one
output channel; a row of an activation ``[..., hidden]`` is one token). Each format gives

* ``quantize(x) -> QTensor`` (integer codes + scales, and zeros for asymmetric formats),
* ``dequantize(q) -> Tensor``,
* ``fake_quant(x)``: the round trip in the input's dtype, what methods use to simulate a format,
* ``bits_per_element(shape)``: the exact storage cost including scales and zeros.

``group_size`` is an int (elements per group along the last dim), ``"channel"``/``"token"`` (one group
per row) or ``"tensor"`` (one scale for the whole tensor).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Union

import torch

from bench.errors import ConfigError

GroupSize = Union[int, str]
ROW_GRANULARITIES = ("channel", "token")
GRANULARITIES = ROW_GRANULARITIES + ("tensor",)


class FormatError(ConfigError):
    """A format was asked for something it cannot do; the message names the value and the choices."""


@dataclass
class QTensor:
    """Quantized tensor: codes laid out as ``[rows, n_groups, group]``; one scale (and zero) per group."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    shape: torch.Size
    dtype: torch.dtype


def check_group_size(group_size: GroupSize) -> GroupSize:
    if isinstance(group_size, str):
        if group_size not in GRANULARITIES:
            raise FormatError(f"group_size={group_size!r} is not valid; use a positive int or one of {GRANULARITIES}")
        return group_size
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise FormatError(f"group_size={group_size!r} is not valid; use a positive int or one of {GRANULARITIES}")
    return group_size


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


def groups_per_tensor(shape: torch.Size | tuple[int, ...], group_size: GroupSize) -> int:
    numel = math.prod(shape)
    if group_size == "tensor":
        return 1
    if group_size in ROW_GRANULARITIES:
        return numel // shape[-1]
    return numel // group_size


def valid_group_sizes(width: int, candidates: tuple[int, ...] = (16, 32, 64, 128, 256, 512, 1024)) -> list[int]:
    return [g for g in candidates if width % g == 0]


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

    def check_width(self, width: int, where: str) -> None:
        """Raise a clear error if this format cannot group a last dim of ``width`` (``where`` names the layer)."""

    def describe(self) -> str:
        return self.name


@dataclass
class IntFormat(Format):
    """Uniform integer grid, symmetric or asymmetric, with min-max scales stored in ``scale_bits``.

    Asymmetric: ``q = clamp(round(x / s) + z, 0, 2^b - 1)`` with an integer zero point ``z`` stored in
    ``b`` bits. Symmetric: ``q = clamp(round(x / s), -2^(b-1), 2^(b-1) - 1)`` with ``s = absmax / (2^(b-1) - 1)``.
    Scales are rounded to fp16 (``scale_bits=16``) so the simulated numbers are the stored ones.
    """

    bits: int = 4
    group_size: GroupSize = 128
    symmetric: bool = False
    scale_bits: int = 16
    name: str = "int"

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or not 1 <= self.bits <= 16:
            raise FormatError(f"bits={self.bits!r} is not valid for the int format; choose 1..16")
        if self.symmetric and self.bits < 2:
            raise FormatError("bits=1 has no symmetric int grid; use symmetric=false or the binary format")
        if self.scale_bits not in (16, 32):
            raise FormatError(f"scale_bits={self.scale_bits!r} is not valid; choose 16 or 32")
        self.group_size = check_group_size(self.group_size)

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1)) if self.symmetric else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.symmetric else 2**self.bits - 1

    def _store_scale(self, scale: torch.Tensor) -> torch.Tensor:
        """The scale as stored; fp16 rounding goes up so that the grid still covers the group's range."""
        scale = scale.clamp_min(torch.finfo(torch.float16).tiny)
        if self.scale_bits == 16:
            stored = scale.to(torch.float16)
            too_small = stored.float() < scale
            stored = torch.where(too_small, torch.nextafter(stored, torch.full_like(stored, torch.inf)), stored)
            scale = stored.float()
        return scale

    def scales_for(self, groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Min-max scale (and zero point) per group of a ``[rows, n_groups, group]`` float tensor."""
        if self.symmetric:
            absmax = groups.abs().amax(dim=-1, keepdim=True)
            return self._store_scale(absmax / self.qmax), None
        lo = groups.amin(dim=-1, keepdim=True).clamp(max=0)
        hi = groups.amax(dim=-1, keepdim=True).clamp(min=0)
        scale = self._store_scale((hi - lo) / self.qmax)
        zero = torch.round(-lo / scale).clamp(0, self.qmax)
        return scale, zero

    def quantize(self, x: torch.Tensor, scale: torch.Tensor | None = None, zero: torch.Tensor | None = None) -> QTensor:
        """Quantize ``x``; pass ``scale``/``zero`` (shaped ``[rows, n_groups, 1]``) to use searched ones."""
        groups = group_view(x.float(), self.group_size)
        if scale is None:
            scale, zero = self.scales_for(groups)
        offset = zero if zero is not None else 0.0
        codes = torch.clamp(torch.round(groups / scale) + offset, self.qmin, self.qmax)
        return QTensor(codes.to(torch.int32), scale, zero, x.shape, x.dtype)

    def dequantize(self, q: QTensor) -> torch.Tensor:
        values = q.codes.float() - (q.zero if q.zero is not None else 0.0)
        return (values * q.scale).reshape(q.shape).to(q.dtype)

    def bits_per_element(self, shape: torch.Size | tuple[int, ...]) -> float:
        per_group = self.scale_bits + (0 if self.symmetric else self.bits)
        return self.bits + per_group * groups_per_tensor(shape, self.group_size) / math.prod(shape)

    def check_width(self, width: int, where: str) -> None:
        if isinstance(self.group_size, int) and width % self.group_size:
            raise FormatError(
                f"group_size={self.group_size} does not divide the input width {width} of layer {where}; "
                f"valid group sizes: {valid_group_sizes(width)} or 'channel'"
            )

    def describe(self) -> str:
        kind = "sym" if self.symmetric else "asym"
        return f"int{self.bits}-{kind}-g{self.group_size}"

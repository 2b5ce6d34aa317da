"""Binary and ternary weights with one scale per group, for the binarization and BitNet methods.

* :class:`BinaryFormat`: ``code = sign(x)`` (zero counts as +1), scale ``alpha = mean |x|`` per group, the
  scale that minimizes ``||x - alpha * sign(x)||^2`` (XNOR-Net). 1 bit per element plus the scales.
* :class:`TernaryFormat`: ``code = clamp(round(x / gamma), -1, 1)`` with ``gamma`` the group's mean
  ``|x|`` (``scale: absmean``, BitNet b1.58) or its median ``|x|`` (``scale: absmedian``), which ignores
  the few large weights that inflate the mean. Codes are counted at 1.6 bits, the cost of packing five
  ternary digits per byte (3^5 = 243 <= 256), the densest byte-aligned storage of log2(3) = 1.585 bits.

Scales are stored in fp16 (``scale_bits: 16``) or fp32. The bits are fixed: the top-level ``bits`` does
not apply and the pipeline records ``element_bits`` (1, or 1.6).
"""

from __future__ import annotations

import math
from abc import abstractmethod
from dataclasses import dataclass

import torch

from methods.common.formats import (
    Format,
    FormatError,
    GroupSize,
    QTensor,
    check_choice,
    check_group_divides,
    check_group_size,
    group_view,
    groups_per_tensor,
    poison,
    split_nonfinite,
    stored_scale,
)

TERNARY_SCALES = ("absmean", "absmedian")
TERNARY_BITS = 8 / 5  # five base-3 digits per byte


@dataclass
class _SignScaled(Format):
    """Shared parts: codes in {-1, 0, +1} times one scale per group."""

    group_size: GroupSize = "channel"
    scale_bits: int = 16

    def __post_init__(self) -> None:
        self.group_size = check_group_size(self.group_size)
        if self.scale_bits not in (16, 32):
            raise FormatError(f"scale_bits={self.scale_bits!r} is not valid; choose 16 or 32")

    @property
    def granularity(self) -> GroupSize:
        return self.group_size

    @abstractmethod
    def _group_scale(self, groups: torch.Tensor) -> torch.Tensor: ...

    @abstractmethod
    def _codes(self, groups: torch.Tensor, scale: torch.Tensor) -> torch.Tensor: ...

    def quantize(self, x: torch.Tensor) -> QTensor:
        groups, bad = split_nonfinite(group_view(x.float(), self.group_size))
        scale = stored_scale(self._group_scale(groups), self.scale_bits)
        codes = torch.where(bad, 0, self._codes(groups, scale)).to(torch.int8)
        return QTensor(codes, poison(scale, bad), None, x.shape, x.dtype)

    def dequantize(self, q: QTensor) -> torch.Tensor:
        return (q.codes.float() * q.scale).reshape(q.shape).to(q.dtype)

    def bits_per_element(self, shape: torch.Size | tuple[int, ...]) -> float:
        return self.element_bits + self.scale_bits * groups_per_tensor(shape, self.group_size) / math.prod(shape)

    def check_width(self, width: int, where: str) -> None:
        check_group_divides(self.group_size, width, where)

    def describe(self) -> str:
        return f"{self.name}-g{self.group_size}"


@dataclass
class BinaryFormat(_SignScaled):
    name: str = "binary"

    @property
    def element_bits(self) -> int:
        return 1

    def _group_scale(self, groups: torch.Tensor) -> torch.Tensor:
        return groups.abs().mean(dim=-1, keepdim=True)

    def _codes(self, groups: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return torch.where(groups >= 0, 1.0, -1.0)


@dataclass
class TernaryFormat(_SignScaled):
    scale: str = "absmean"
    name: str = "ternary"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("scale", self.scale, TERNARY_SCALES)

    @property
    def element_bits(self) -> float:
        return TERNARY_BITS

    def _group_scale(self, groups: torch.Tensor) -> torch.Tensor:
        if self.scale == "absmedian":
            return groups.abs().median(dim=-1, keepdim=True).values
        return groups.abs().mean(dim=-1, keepdim=True)

    def _codes(self, groups: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return torch.round(groups / scale).clamp(-1, 1)

    def describe(self) -> str:
        median = "-median" if self.scale == "absmedian" else ""
        return f"{self.name}{median}-g{self.group_size}"

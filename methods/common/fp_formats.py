"""FP ExMy with a scale per group: the floating-point formats of LLM-FP4 and the FP-diffusion studies.

Each group is divided by its scale, rounded onto the ExMy grid (ties to even, saturating) and stored as
ExMy bit patterns plus one scale. The scale maps the group's (clipped) absolute maximum onto the grid's
largest value: ``scale: fp16`` / ``fp32`` store that exact ratio, ``e8m0`` rounds it down to a power of
two as OCP MX does (``2^(floor(log2 amax) - emax)``), and ``none`` stores no scale at all: the values are
rounded onto the raw grid, whose range is then set by the exponent ``bias`` (the knob LLM-FP4 searches).
Without a scale, there is no group to mark as NaN: ``+-inf`` saturates to ``+-max``, and NaN is encoded
as NaN where the element type has a NaN code (``special: fn`` or ``ieee``), else it is an error.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from methods.common.elements import FpElement, floor_log2, pow2
from methods.common.formats import (
    Clipping,
    Format,
    FormatError,
    GroupSize,
    QTensor,
    check_choice,
    check_group_divides,
    check_group_size,
    exact_div,
    group_view,
    groups_per_tensor,
    poison,
    split_nonfinite,
    stored_scale,
)

SCALE_BITS = {"fp16": 16, "fp32": 32, "e8m0": 8, "none": 0}


@dataclass
class FpFormat(Format):
    exp_bits: int = 2
    man_bits: int = 1
    bias: int | None = None
    subnormals: bool = True
    special: str = "finite"
    group_size: GroupSize = 128
    scale: str = "fp16"
    clip: str = "minmax"
    clip_percentile: float = 99.9
    clip_steps: int = 100
    clip_min_ratio: float = 0.2
    clip_norm: float = 2.4
    name: str = "fp"

    def __post_init__(self) -> None:
        self.element = FpElement(self.exp_bits, self.man_bits, self.bias, self.subnormals, self.special)
        check_choice("scale", self.scale, tuple(SCALE_BITS))
        self.group_size = check_group_size(self.group_size)
        self.clipping = Clipping(self.clip, self.clip_percentile, self.clip_steps, self.clip_min_ratio, self.clip_norm)
        if self.scale == "none" and self.clip != "minmax":
            raise FormatError(f"clip={self.clip!r} needs a scale to clip with; use scale=fp16, fp32 or e8m0")

    @property
    def element_bits(self) -> int:
        return self.element.bits

    @property
    def granularity(self) -> GroupSize:
        return "tensor" if self.scale == "none" else self.group_size

    def _scale_for_absmax(self, absmax: torch.Tensor) -> torch.Tensor:
        if self.scale == "e8m0":
            return pow2((floor_log2(absmax) - self.element.emax).clamp(-127, 127))
        return stored_scale(exact_div(absmax, self.element.max_value), SCALE_BITS[self.scale])

    def _roundtrip(self, groups: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
        scale = self._scale_for_absmax(hi)
        return self.element.round(groups / scale) * scale

    def quantize(self, x: torch.Tensor) -> QTensor:
        if self.scale == "none":
            return self._quantize_unscaled(x)
        groups, bad = split_nonfinite(group_view(x.float(), self.group_size))
        _, hi = self.clipping.range(groups, True, self._roundtrip)
        scale = self._scale_for_absmax(hi)
        codes = self.element.encode(self.element.round(groups / scale))
        return QTensor(torch.where(bad, 0, codes), poison(scale, bad), None, x.shape, x.dtype)

    def _quantize_unscaled(self, x: torch.Tensor) -> QTensor:
        values = x.float().reshape(1, 1, -1)
        if self.special == "finite" and torch.isnan(values).any():
            raise FormatError(f"{self.describe()} has no NaN code and no scale to mark a NaN with; use scale=fp16, fp32 or e8m0")
        codes = self.element.encode(self.element.round(values))
        return QTensor(codes, torch.ones(1, 1, 1, device=x.device), None, x.shape, x.dtype)

    def dequantize(self, q: QTensor) -> torch.Tensor:
        return (self.element.decode(q.codes) * q.scale).reshape(q.shape).to(q.dtype)

    def bits_per_element(self, shape: torch.Size | tuple[int, ...]) -> float:
        scale_bits = SCALE_BITS[self.scale] * groups_per_tensor(shape, self.group_size)
        return self.element.bits + scale_bits / math.prod(shape)

    def check_width(self, width: int, where: str) -> None:
        if self.scale != "none":
            check_group_divides(self.group_size, width, where)

    def describe(self) -> str:
        bias = "" if self.bias is None else f"-b{self.bias}"
        if self.scale == "none":
            return f"fp-{self.element.describe()}{bias}"
        clip = "" if self.clip == "minmax" else f"-{self.clip}"
        return f"fp-{self.element.describe()}{bias}-g{self.group_size}-{self.scale}{clip}"

"""Hadamard rotation as a transform that composes with any format.

``HadamardFormat(inner, block_size, seed)`` multiplies each block of ``block_size`` elements of the last
dim by one randomized orthonormal Hadamard ``R = diag(s) H`` (random signs ``s`` from ``seed``), quantizes
with ``inner``, and rotates back: ``fake_quant(x) = inner.fake_quant(x R) R^T``, computed in float32.

**Stored representation**: ``quantize(x)`` returns the inner format's ``QTensor`` *of the rotated tensor*
``x R`` (its codes and scales are what a kernel consuming rotated operands would store); ``dequantize``
decodes it and rotates back, so ``dequantize(quantize(x))`` approximates ``x``. ``R`` is rebuilt from the
seed and costs no storage: bits per element are the inner format's.

Applied to both a weight (rows = output channels, blocks along the input dim) and the activation feeding
it, the rotations cancel in the matrix product: ``Q(x R) R^T (Q(W R) R^T)^T = Q(x R) Q(W R)^T``, the
rotated low-bit GEMM of the "INT v.s. FP" study. A NaN or inf spreads over its rotation block, which the
inner format then marks NaN.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from bench.errors import ConfigError
from methods.common.formats import Format, FormatError, GroupSize, QTensor, check_int
from methods.common.hadamard import random_hadamard, rotate_blocks


@dataclass
class HadamardFormat(Format):
    inner: Format
    block_size: int = 32
    seed: int = 0
    name: str = "hadamard"
    _rotations: dict[tuple[torch.device, torch.dtype], torch.Tensor] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.inner, Format):
            raise FormatError(f"hadamard: inner={self.inner!r} is not a format; give a format config with _target_")
        check_int("block_size", self.block_size, 1, 1 << 16)
        try:
            random_hadamard(self.block_size, self.seed)
        except ConfigError as err:
            raise FormatError(f"block_size={self.block_size} has no Hadamard matrix: {err}") from err

    def rotation(self, device: torch.device) -> torch.Tensor:
        key = (device, torch.float32)
        if key not in self._rotations:
            self._rotations[key] = random_hadamard(self.block_size, self.seed, torch.float32, device)
        return self._rotations[key]

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        return rotate_blocks(x.float(), self.rotation(x.device))

    def unrotate(self, x: torch.Tensor) -> torch.Tensor:
        return rotate_blocks(x.float(), self.rotation(x.device).T)

    @property
    def element_bits(self) -> float | None:
        return self.inner.element_bits

    @property
    def granularity(self) -> GroupSize | None:
        return self.inner.granularity

    def quantize(self, x: torch.Tensor) -> QTensor:
        """The inner format's QTensor of the rotated tensor ``x R`` (see the module docstring)."""
        return dataclasses.replace(self.inner.quantize(self.rotate(x)), dtype=x.dtype)

    def dequantize(self, q: QTensor) -> torch.Tensor:
        rotated = self.inner.dequantize(dataclasses.replace(q, dtype=torch.float32))
        return self.unrotate(rotated).to(q.dtype)

    def fake_quant(self, x: torch.Tensor) -> torch.Tensor:
        return self.unrotate(self.inner.fake_quant(self.rotate(x))).to(x.dtype)

    def bits_per_element(self, shape: torch.Size | tuple[int, ...]) -> float:
        return self.inner.bits_per_element(shape)

    def check_width(self, width: int, where: str) -> None:
        if width % self.block_size:
            raise FormatError(f"Hadamard block_size={self.block_size} does not divide the input width {width} of layer {where}")
        self.inner.check_width(width, where)

    def describe(self) -> str:
        return f"{self.inner.describe()}+had{self.block_size}"

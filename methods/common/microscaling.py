"""Block-scaled formats with fixed blocks: OCP microscaling (MX) and NVIDIA's NVFP4 / NVINT4.

**MX** (OCP Microscaling Formats v1.0): blocks of 32 consecutive elements along the last dim share one
E8M0 scale ``X = 2^(floor(log2 amax) - emax_elem)`` (clamped to the E8M0 range ``2^-127..2^127``); each
element stores ``V / X`` rounded to nearest-even on its grid, saturating at the element's largest value
(so a block's largest element may be clipped: amax up to ``2^(emax+1)`` against a max of e.g. 6 for
E2M1). Elements: ``int8`` (MXINT8, two's complement with implicit scale 2^-6, symmetric +-127),
``e4m3``/``e5m2`` (MXFP8), ``e2m3``/``e3m2`` (MXFP6), ``e2m1`` (MXFP4). Bits per element: element bits +
8/32 (MXFP4 = 4.25).

**NV** (NVFP4 as on Blackwell, and NVINT4 of the "INT v.s. FP" study): blocks of 16 with an E4M3 block
scale and one FP32 tensor scale, in NVIDIA's two-level recipe. From the tensor's finite absolute maximum,
the encode scale ``enc = max_elem * 448 / amax`` (capped at 2^126); the stored FP32 tensor scale is its
inverse ``t = 1 / enc``. Per block: ``b = E4M3(amax_b * (enc / max_elem))`` (saturating at 448), elements
store ``x * (enc / b)`` rounded onto E2M1 (max 6) or symmetric INT4 (max 7), and dequantize as
``q * (b * t)``. Bits per element: 4 + 8/16 + 32/numel (NVFP4 = 4.5 plus the tensor scale).

Both accept a ragged last block (width not a multiple of the block): it is stored zero-padded, which
leaves its amax, hence its scale, unchanged; the padded codes are counted in ``bits_per_element``. A block
holding NaN or inf dequantizes to NaN throughout (E8M0 scale 0xFF, or E4M3 scale 0x7F; codes 0), as
OCP MX encodes NaN in the shared scale; NV's tensor amax is taken over the finite values.

The top-level ``bits`` and ``group_size`` do not apply: these formats fix both, and the pipeline records
theirs (``element_bits``, ``granularity``). On CUDA tensors ``fake_quant`` runs the Triton kernel of
``qkernels/quant.py``; this file's torch code is that kernel's reference.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from methods.common.elements import ELEMENTS, Element, floor_log2, pow2
from methods.common.formats import (
    Format,
    QTensor,
    block_view,
    check_choice,
    exact_div,
    n_blocks,
    poison,
    split_nonfinite,
    triton_kernels_for,
    unblock,
)

MX_NAMES = {"int8": "mxint8", "e4m3": "mxfp8_e4m3", "e5m2": "mxfp8_e5m2", "e2m3": "mxfp6_e2m3", "e3m2": "mxfp6_e3m2", "e2m1": "mxfp4"}
NV_NAMES = {"e2m1": "nvfp4", "int4": "nvint4"}
E4M3 = ELEMENTS["e4m3"]


def finite_absmax(x: torch.Tensor) -> torch.Tensor:
    """Largest ``|x|`` over the finite values of ``x`` (0 if none), as a float32 scalar tensor."""
    finite_abs = torch.where(torch.isfinite(x), x.float().abs(), 0.0)
    return finite_abs.amax() if finite_abs.numel() else finite_abs.new_zeros(())


def _rows(shape: torch.Size | tuple[int, ...]) -> int:
    return math.prod(shape) // shape[-1]


@dataclass
class _FixedBlockFormat(Format):
    """What MX and NV share: an ``element`` named in ``NAMES`` (its format's name by default), a fixed block."""

    element: str = "e2m1"
    name: str = ""

    NAMES: ClassVar[dict[str, str]] = {}  # element -> format name: each subclass its own
    BLOCK: ClassVar[int] = 0

    def __post_init__(self) -> None:
        self.elem: Element = ELEMENTS[check_choice("element", self.element, tuple(self.NAMES))]
        self.name = self.name or self.NAMES[self.element]

    @property
    def element_bits(self) -> int:
        return self.elem.bits

    @property
    def granularity(self) -> int:
        return self.BLOCK

    def describe(self) -> str:
        return self.name


@dataclass
class MxFormat(_FixedBlockFormat):
    """OCP MX format: ``element`` in ``MX_NAMES``, blocks of 32, E8M0 shared scale (see module doc)."""

    NAMES = MX_NAMES
    BLOCK = 32
    SCALE_BITS = 8

    def shared_exponent(self, blocks: torch.Tensor) -> torch.Tensor:
        """E8M0 exponent per block of finite ``[rows, n_blocks, 32]`` values (all-zero blocks: -127)."""
        amax = blocks.abs().amax(dim=-1, keepdim=True)
        return (floor_log2(amax) - self.elem.emax).clamp(-127, 127)

    def _rounded(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(element grid values ``[rows, n_blocks, 32]``, scales with NaN for non-finite blocks, those blocks)."""
        blocks, bad = split_nonfinite(block_view(x.float(), self.BLOCK))
        exponent = self.shared_exponent(blocks)
        return self.elem.round(blocks * pow2(-exponent)), poison(pow2(exponent), bad), bad

    def quantize(self, x: torch.Tensor) -> QTensor:
        values, scale, bad = self._rounded(x)
        return QTensor(self.elem.encode(values).masked_fill(bad, 0), scale, None, x.shape, x.dtype)

    def dequantize(self, q: QTensor) -> torch.Tensor:
        return unblock(self.elem.decode(q.codes) * q.scale, q.shape).to(q.dtype)

    def fake_quant(self, x: torch.Tensor) -> torch.Tensor:
        """``dequantize(quantize(x))``, bit for bit: the Triton kernel on CUDA, else without the codes."""
        if triton_kernels_for(x):
            from qkernels.quant import mx_fake_quant

            return mx_fake_quant(x, self)
        values, scale, _ = self._rounded(x)
        return unblock(values * scale, x.shape).to(x.dtype)

    def bits_per_element(self, shape: torch.Size | tuple[int, ...]) -> float:
        blocks = _rows(shape) * n_blocks(shape[-1], self.BLOCK)
        return blocks * (self.BLOCK * self.elem.bits + self.SCALE_BITS) / math.prod(shape)


@dataclass
class NvFormat(_FixedBlockFormat):
    """NVFP4 (``element: e2m1``) or NVINT4 (``element: int4``): blocks of 16, E4M3 block scales, FP32
    tensor scale (see module doc)."""

    NAMES = NV_NAMES
    BLOCK = 16
    SCALE_BITS = 8
    TENSOR_SCALE_BITS = 32

    def tensor_scales(self, amax: torch.Tensor) -> torch.Tensor:
        """float32 ``[enc, t, enc / max_elem]`` for a tensor whose finite ``|x|`` peaks at ``amax``.

        ``enc = max_elem * 448 / amax`` is capped at 2^126 so that the stored ``t = 1 / enc`` is a normal
        float32 (an all-zero tensor gets the cap).
        """
        encode = exact_div(self.elem.max_value * E4M3.max_value, amax.float()).clamp(max=2.0**126)
        return torch.stack([encode, exact_div(1.0, encode), exact_div(encode, self.elem.max_value)])

    def _rounded(self, x: torch.Tensor, amax: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(element grid values ``[rows, n_blocks, 16]``, E4M3 block scales with NaN for non-finite blocks,
        those blocks, the FP32 tensor scale)."""
        encode, decode, block_factor = self.tensor_scales(finite_absmax(x) if amax is None else amax)
        blocks, bad = split_nonfinite(block_view(x.float(), self.BLOCK))
        block_scale = E4M3.round(blocks.abs().amax(dim=-1, keepdim=True) * block_factor)
        inverse = torch.where(block_scale > 0, exact_div(encode, block_scale), 0.0)
        return self.elem.round(blocks * inverse), poison(block_scale, bad), bad, decode

    def quantize(self, x: torch.Tensor, amax: torch.Tensor | None = None) -> QTensor:
        """Quantize ``x``; pass ``amax`` (a calibrated tensor maximum) for a static tensor scale."""
        values, block_scale, bad, tensor_scale = self._rounded(x, amax)
        return QTensor(self.elem.encode(values).masked_fill(bad, 0), block_scale, None, x.shape, x.dtype, tensor_scale)

    def dequantize(self, q: QTensor) -> torch.Tensor:
        return unblock(self.elem.decode(q.codes) * (q.scale * q.tensor_scale), q.shape).to(q.dtype)

    def fake_quant(self, x: torch.Tensor) -> torch.Tensor:
        """``dequantize(quantize(x))``, bit for bit: the Triton kernel on CUDA, else without the codes."""
        if triton_kernels_for(x):
            from qkernels.quant import nv_fake_quant

            return nv_fake_quant(x, self)
        values, block_scale, _, tensor_scale = self._rounded(x, None)
        return unblock(values * (block_scale * tensor_scale), x.shape).to(x.dtype)

    def bits_per_element(self, shape: torch.Size | tuple[int, ...]) -> float:
        blocks = _rows(shape) * n_blocks(shape[-1], self.BLOCK)
        stored = blocks * (self.BLOCK * self.elem.bits + self.SCALE_BITS) + self.TENSOR_SCALE_BITS
        return stored / math.prod(shape)

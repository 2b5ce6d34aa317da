"""The activation-quantized matmuls of :mod:`qkernels.int_matmul` as kinds of the kernel table
(``python -m bench.kernel_latency --kernels w8a8,w4a8,w4a4bp,w2a8bp``): W8A8 (int8 per channel and per token),
W4A8 (the ``uint4`` packed weight, groups of 128, integer zero points; int8 tokens) and ABQ-LLM's bit-plane
WpAq (``bp``: binary planes of p-bit weight and q-bit activation codes, per-channel and per-token scales and
zero points). The activations are quantized once per cell, outside the timed call: the rows time the matmul,
as the weight-only rows do. Errors are against the float64 references of :mod:`qkernels.int_matmul`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable

import torch

from bench.timing import copies_for
from qkernels import int_matmul as im
from qkernels.pack import pack_weight


@dataclass(frozen=True)
class IntKind:
    w_bits: int
    a_bits: int
    bitplane: bool = False


INT_KINDS = {"w8a8": IntKind(8, 8), "w4a8": IntKind(4, 8), "w4a4bp": IntKind(4, 4, True), "w2a8bp": IntKind(2, 8, True)}


@dataclass
class IntWeight:
    """A kind's weight at one shape: the int8 matrix and its scales (W8A8), the packed ``uint4`` weight (W4A8), or
    the bit planes and the codes they came from (bit-plane; the codes only for the reference)."""

    kind: IntKind
    weight: Any
    scale: torch.Tensor | None = None
    codes: torch.Tensor | None = None

    def nbytes(self) -> int:
        if self.kind.bitplane:
            return self.weight.planes.numel() * 4 + 2 * self.weight.n * 4
        if self.kind.w_bits == 8:
            return self.weight.numel() + self.scale.numel() * 4
        return self.weight.nbytes()

    def clone(self) -> IntWeight:
        if self.kind.bitplane:
            return replace(self, weight=replace(self.weight, planes=self.weight.planes.clone()))
        if self.kind.w_bits == 8:
            return replace(self, weight=self.weight.clone())
        return replace(self, weight=replace(self.weight, words=self.weight.words.clone(), scale=self.weight.scale.clone(),
                                            zero=self.weight.zero.clone(), plans={}))


def int_weight(kind: IntKind, n: int, k: int, device: str = "cuda") -> IntWeight:
    """Random codes (never all zero) with random scales and zero points."""
    if kind.bitplane:
        codes = torch.randint(0, 2**kind.w_bits, (n, k), device=device)
        scale = torch.rand(n, device=device) * 0.02 + 0.01
        zero = torch.randint(0, 2**kind.w_bits, (n,), device=device).float()
        return IntWeight(kind, im.pack_bitplanes(codes, kind.w_bits, scale, zero), codes=codes)
    if kind.w_bits == 8:
        return IntWeight(kind, torch.randint(-127, 128, (n, k), device=device, dtype=torch.int8), torch.rand(n, device=device) * 1e-3 + 1e-4)
    codes = torch.randint(0, 16, (n, k), device=device)
    scale = (torch.rand(n, k // 128, device=device) * 0.02 + 0.01).half()
    zero = torch.randint(0, 16, (n, k // 128), device=device).half()
    return IntWeight(kind, pack_weight(codes, scale, zero, "uint4", 128))


def quantize_activations(kind: IntKind, x: torch.Tensor) -> tuple:
    """int8 codes and per-token scales (W8A8, W4A8), or unsigned q-bit codes, scales and zero points (bit-plane)."""
    if kind.bitplane:
        return im.quantize_rows_asym(x, kind.a_bits)
    return im.quantize_rows_int8(x)


def int_paths(kind: IntKind, m: int, k: int, n: int) -> list[str]:
    """The table's paths for a kind, the dispatcher's first: W8A8 ``int triton`` and from 17 rows (cuBLAS's int8 GEMM
    asked for more than 16 in older releases) ``int cublas``; W4A8 ``int lowbit`` (the tokens dequantized onto the
    W4 kernels), ``int triton`` and ``int dequant`` (both operands dequantized, then cuBLAS), bit-plane the last two,
    at every batch."""
    cuda = torch.device("cuda")
    if kind.bitplane or kind.w_bits != 8:
        auto, paths = (im.int_act_path(m, cuda), im.INT_ACT_PATHS) if kind.bitplane else (im.w4a8_path(m, cuda), im.W4A8_PATHS)
        return [f"int {auto}"] + [f"int {p}" for p in paths if p != auto]
    auto = im.int8_path(m, k, n, cuda)
    return [f"int {auto}"] + (["int triton"] if auto == "cublas" else [])


def int_matmul(w: IntWeight, acts: tuple, path: str = "int") -> torch.Tensor:
    route = "auto" if path == "int" else path.removeprefix("int ")
    if w.kind.bitplane:
        codes, scale, zero = acts
        return im.bitplane_matmul(codes, w.kind.a_bits, scale, zero, w.weight, path=route)
    if w.kind.w_bits == 8:
        return im.int8_matmul(acts[0], acts[1], w.weight, w.scale, path=route)
    return im.w4a8_matmul(acts[0], acts[1], w.weight, path=route)


def int_reference(w: IntWeight, acts: tuple) -> torch.Tensor:
    if w.kind.bitplane:
        codes, scale, zero = acts
        return im.bitplane_reference(codes, scale, zero, w.codes, w.weight)
    if w.kind.w_bits == 8:
        return im.int8_matmul_reference(acts[0], acts[1], w.weight, w.scale)
    return im.w4a8_reference(acts[0], acts[1], w.weight)


def int_calls(x: torch.Tensor, w: IntWeight, path: str = "int") -> Callable[[], list]:
    """A maker for :func:`bench.timing.time_side_by_side`: the matmul (on ``path``, :func:`int_paths`) over rotating
    copies of the weight, on activations quantized once."""
    acts = quantize_activations(w.kind, x)

    def make() -> list:
        weights = [w] + [w.clone() for _ in range(copies_for(w.nbytes()) - 1)]
        return [lambda c=c: int_matmul(c, acts, path) for c in weights]

    return make


def int_error(x: torch.Tensor, w: IntWeight, path: str = "int") -> float:
    """Relative error of the matmul against its float64 reference, on the same quantized activations."""
    acts = quantize_activations(w.kind, x)
    ref = int_reference(w, acts)
    return ((int_matmul(w, acts, path).double() - ref).norm() / ref.norm()).item()

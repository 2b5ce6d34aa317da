"""Element types: the scalar grids that scaled formats (FP ExMy, MX, NV) place in each group or block.

An element type rounds (already scaled) values onto its grid, round-to-nearest-even and saturating at
its largest finite value (the OCP MX v1.0 conversion for MX elements), and encodes grid values as
integer codes (FP: the sign | exponent | mantissa bit pattern; INT: two's complement).

* :class:`FpElement` is any ExMy minifloat: exponent bits, mantissa bits, exponent bias (IEEE-style
  ``2^(E-1) - 1`` by default), subnormals on or off, and which codes are reserved: ``finite`` (none:
  E2M1, E2M3, E3M2 and the LLM-FP4 formats), ``fn`` (only all-ones is NaN: OCP E4M3, max 448) or
  ``ieee`` (the top exponent holds inf/NaN: OCP E5M2, max 57344).
* :class:`IntElement` is a symmetric two's-complement integer with an implicit scale ``2^-frac_bits``
  (MXINT8: 8 bits, 6 fractional bits, max 127/64; NVINT4: 4 bits, max 7). The grids are symmetric
  (``-2^(b-1)`` is never used), as in the "INT v.s. FP" study.

All arithmetic is float32 and exact: a value's binade and the grid spacing there come from float32
exponent fields, powers of two are built from bit patterns (:func:`pow2`), and rounding is ``torch.round``
(half to even). The Triton kernels in ``qkernels/quant.py`` compute the same grid values another way (a
rounding constant, see ``_round_fp``); tests hold the two equal bit for bit.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from methods.common.formats import FormatError, check_choice, check_int

SPECIALS = ("finite", "fn", "ieee")


def pow2(k: torch.Tensor) -> torch.Tensor:
    """Exactly ``2^k`` as float32 for integer ``k`` in ``[-149, 127]`` (subnormal powers included)."""
    k = k.to(torch.int32)
    normal = ((k + 127).clamp(min=1) << 23).view(torch.float32)
    subnormal = (torch.ones_like(k) << (k + 149).clamp(0, 22)).view(torch.float32)
    return torch.where(k >= -126, normal, subnormal)


def floor_log2(a: torch.Tensor) -> torch.Tensor:
    """``floor(log2 a)`` (int32) of non-negative float32 ``a``, exact for normal numbers; 0 and
    float32 subnormals give -127, which every caller clamps from below."""
    return ((a.float().view(torch.int32) >> 23) & 0xFF) - 127


@dataclass(frozen=True)
class FpElement:
    exp_bits: int
    man_bits: int
    bias: int | None = None
    subnormals: bool = True
    special: str = "finite"

    def __post_init__(self) -> None:
        check_int("exp_bits", self.exp_bits, 1, 8)
        check_int("man_bits", self.man_bits, 0, 10)
        check_choice("special", self.special, SPECIALS)
        if self.bias is None:
            object.__setattr__(self, "bias", 2 ** (self.exp_bits - 1) - 1)
        check_int("bias", self.bias, -64, 127)
        if self.special != "finite" and self.exp_bits < 2:
            raise FormatError(f"special={self.special!r} needs exp_bits >= 2 (it reserves top exponent codes)")
        if self.emin - self.man_bits < -126 or self.emax + self.man_bits + 2 > 127:
            raise FormatError(
                f"E{self.exp_bits}M{self.man_bits} with bias {self.bias} spans 2^{self.emin - self.man_bits}.."
                f"2^{self.emax + 1}, beyond what float32 simulates exactly; choose fewer exponent bits or another bias"
            )

    @property
    def bits(self) -> int:
        return 1 + self.exp_bits + self.man_bits

    @property
    def emin(self) -> int:
        """Exponent of the smallest normal number."""
        return 1 - self.bias

    def _top(self) -> tuple[int, int]:
        """(largest exponent field, largest mantissa field there) of a finite value."""
        top_exp, top_man = 2**self.exp_bits - 1, 2**self.man_bits - 1
        if self.special == "ieee":
            top_exp -= 1
        elif self.special == "fn":
            top_man -= 1
            if top_man < 0:
                top_exp, top_man = top_exp - 1, 0
        return top_exp, top_man

    @property
    def emax(self) -> int:
        """Exponent of the largest normal number (the OCP MX ``emax_elem``)."""
        return self._top()[0] - self.bias

    @property
    def max_value(self) -> float:
        top_exp, top_man = self._top()
        return math.ldexp(1 + top_man / 2**self.man_bits, top_exp - self.bias)

    @property
    def min_normal(self) -> float:
        return math.ldexp(1.0, self.emin)

    def magnitude(self, code: int) -> float:
        """Value of a sign-less code (specials not considered)."""
        exp_field, man_field = code >> self.man_bits, code & (2**self.man_bits - 1)
        if exp_field == 0:
            return math.ldexp(man_field, self.emin - self.man_bits)
        return math.ldexp(2**self.man_bits + man_field, exp_field - self.bias - self.man_bits)

    def code_value(self, code: int) -> float:
        """Value of a full code (sign and specials included)."""
        sign = -1.0 if code >> (self.exp_bits + self.man_bits) else 1.0
        magnitude_code = code & (2 ** (self.exp_bits + self.man_bits) - 1)
        exp_all_ones = magnitude_code >> self.man_bits == 2**self.exp_bits - 1
        man_field = magnitude_code & (2**self.man_bits - 1)
        if self.special == "ieee" and exp_all_ones:
            return sign * math.inf if man_field == 0 else math.nan
        if self.special == "fn" and exp_all_ones and man_field == 2**self.man_bits - 1:
            return math.nan
        return sign * self.magnitude(magnitude_code)

    def round(self, v: torch.Tensor) -> torch.Tensor:
        """Nearest grid value (ties to even, saturating at +-max_value) of float32 ``v``; NaN stays NaN."""
        a = v.abs()
        # The spacing 2^(e - man_bits) of a's binade e, with e clamped to [emin, emax + 1], from exponent fields.
        exponent_field = (a.view(torch.int32) & 0x7F800000).clamp((self.emin + 127) << 23, (self.emax + 128) << 23)
        step = (exponent_field - (self.man_bits << 23)).view(torch.float32)
        q = torch.round(a / step) * step
        if not self.subnormals:
            q = torch.where(a < self.min_normal, (a > self.min_normal / 2).float() * self.min_normal, q)
        return torch.copysign(q.clamp(max=self.max_value), v)

    def encode(self, q: torch.Tensor) -> torch.Tensor:
        """Bit patterns (int32) of grid values ``q``; NaN gets the NaN code where the type has one."""
        a = q.abs()
        # A normal value's code is its float32 bits cut to man_bits, with the exponent re-biased.
        normal = (a.view(torch.int32) >> (23 - self.man_bits)) - ((127 - self.bias) << self.man_bits)
        subnormal = (a * 2.0 ** (self.man_bits - self.emin)).to(torch.int32)
        codes = torch.where(a < self.min_normal, subnormal, normal)
        codes = codes | (torch.signbit(q).to(torch.int32) << (self.exp_bits + self.man_bits))
        if self.special != "finite":
            codes = torch.where(torch.isnan(q), 2 ** (self.bits - 1) - 1, codes)
        return codes

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        return _decode_table(self, codes.device)[codes.long()]

    def describe(self) -> str:
        return f"e{self.exp_bits}m{self.man_bits}"


@functools.lru_cache(maxsize=64)
def _decode_table(elem: FpElement, device: torch.device) -> torch.Tensor:
    """The value (float32) of every code of ``elem``, specials included."""
    return torch.tensor([elem.code_value(code) for code in range(2**elem.bits)], dtype=torch.float32, device=device)


@dataclass(frozen=True)
class IntElement:
    bits: int
    frac_bits: int = 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1

    @property
    def max_value(self) -> float:
        return math.ldexp(self.qmax, -self.frac_bits)

    @property
    def emax(self) -> int:
        return math.floor(math.log2(self.max_value))

    def round(self, v: torch.Tensor) -> torch.Tensor:
        """Nearest grid value, ties to even, saturating; zero is always +0 (its code has no sign)."""
        steps = torch.round(v * 2.0**self.frac_bits).clamp(-self.qmax, self.qmax) + 0.0
        return steps * 2.0**-self.frac_bits

    def encode(self, q: torch.Tensor) -> torch.Tensor:
        """Two's-complement ``bits``-bit patterns (int32) of grid values ``q``."""
        return (q * 2.0**self.frac_bits).to(torch.int32) & (2**self.bits - 1)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        codes = codes.to(torch.int32)
        signed = torch.where(codes >= 2 ** (self.bits - 1), codes - 2**self.bits, codes)
        return signed.float() * 2.0**-self.frac_bits

    def describe(self) -> str:
        return f"int{self.bits}"


Element = FpElement | IntElement

ELEMENTS: dict[str, Element] = {
    "e2m1": FpElement(2, 1),
    "e3m0": FpElement(3, 0),
    "e2m3": FpElement(2, 3),
    "e3m2": FpElement(3, 2),
    "e4m3": FpElement(4, 3, special="fn"),
    "e5m2": FpElement(5, 2, special="ieee"),
    "int8": IntElement(8, frac_bits=6),
    "int4": IntElement(4),
}


def element(name: str, allowed: tuple[str, ...]) -> Element:
    return ELEMENTS[check_choice("element", name, allowed)]

"""Triton quantization kernels along the last dim: INT groups, MX blocks (OCP) and NV blocks (NVFP4/NVINT4).

Each family has a fake-quant kernel (the round trip, in the input's dtype) and a real-quant kernel
(packed codes + scales), two variants of one ``@triton.jit`` function selected by the constexpr
``FAKE``. The references are plain torch and sit beside them:

* fake quant: the formats' own ``dequantize(quantize(x))`` (``methods/common/formats.py``,
  ``methods/common/microscaling.py``);
* real quant: :func:`int_quantize_reference`, :func:`mx_quantize_reference`, :func:`nv_quantize_reference`
  below, which pack the formats' ``quantize`` codes.

Tests compare kernels and references bit for bit (NaNs match NaNs) on CPU through the Triton interpreter.

Packed layout (leading dims flattened into rows): codes ``uint8 [rows, padded_width * bits / 8]``, the
element at even index in the low bits (4-bit: low nibble first, as ``torch.float4_e2m1fn_x2``; 2-bit:
lowest pair first); ``padded_width`` rounds the width up to whole blocks. Scales: INT ``fp16``/``fp32
[rows, n_groups]`` and zero points ``uint8``; MX ``uint8`` E8M0 (bias 127, 0xFF = NaN); NV ``uint8``
E4M3 bit patterns (0x7F = NaN) and the FP32 tensor scale.

Exactness on GPU: kernels compile without FMA contraction (``enable_fp_fusion=False``: a fused
multiply-add rounds once where the reference rounds twice), divisions use ``div_rn`` (Triton's ``/`` is
approximate), powers of two are built from bits, ``floor(log2)`` is read from the exponent field, and
rounding to nearest-even is the float32 ``(y + 1.5 * 2^23) - 1.5 * 2^23`` identity (the rounding quantum
set through the constant's exponent).
The interpreter rounds float32 -> bfloat16 by truncation, so under the interpreter bf16 outputs are
rounded in integer arithmetic (``SOFT_BF16``); on GPU the hardware conversion (also nearest-even) is used.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from methods.common.elements import ELEMENTS, Element, FpElement, IntElement
from methods.common.formats import FP16_TINY, FormatError, IntFormat, n_blocks
from methods.common.microscaling import MxFormat, NvFormat

DEFAULT_ELEMS_PER_PROGRAM = 2048  # best or within 1% at every size measured on H100 (bench/results)
DEFAULT_NUM_WARPS = 8
PACKABLE_BITS = (2, 4, 8)

_FLOAT32_MAX = tl.constexpr(3.4028234663852886e38)
_E4M3 = ELEMENTS["e4m3"]
_E4M3_MAN = tl.constexpr(_E4M3.man_bits)
_E4M3_EMIN = tl.constexpr(_E4M3.emin)
_E4M3_EMAX = tl.constexpr(_E4M3.emax)
_E4M3_MAX = tl.constexpr(_E4M3.max_value)
_E4M3_BIAS = tl.constexpr(_E4M3.bias)
_E4M3_EXP_BITS = tl.constexpr(_E4M3.exp_bits)
_E4M3_SUB_UP = tl.constexpr(2.0 ** (_E4M3.man_bits - _E4M3.emin))
_E4M3_MIN_NORMAL = tl.constexpr(_E4M3.min_normal)


@dataclass
class PackedTensor:
    """Real-quantized tensor: packed codes and scales (see the module docstring for the layout)."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None = None
    tensor_scale: torch.Tensor | None = None


# ----------------------------------------------------------------------------------------------------
# Device helpers


@triton.jit
def _pow2(k):
    """Exactly 2^k (float32) for int32 k in [-149, 127]."""
    normal = (tl.maximum(k + 127, 1) << 23).to(tl.float32, bitcast=True)
    subnormal = (1 << tl.minimum(tl.maximum(k + 149, 0), 22)).to(tl.float32, bitcast=True)
    return tl.where(k >= -126, normal, subnormal)


@triton.jit
def _floor_log2(a):
    """floor(log2 a) of non-negative float32 a; 0 and subnormals give -127."""
    return ((a.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127


@triton.jit
def _rne(y):
    """Round half to even, for |y| < 2^22."""
    return (y + 12582912.0) - 12582912.0


@triton.jit
def _round_fp(y, MAN: tl.constexpr, EMIN: tl.constexpr, EMAX: tl.constexpr, MAXVAL: tl.constexpr):
    """Nearest ExMy grid value of y (ties to even, saturating at +-MAXVAL), keeping y's sign."""
    a = tl.abs(y)
    # a's exponent field, clamped to the element's binades [EMIN, EMAX + 1] (below EMIN: subnormal spacing).
    exponent_field = tl.minimum(tl.maximum(a.to(tl.int32, bitcast=True) & 0x7F800000, (EMIN + 127) << 23), (EMAX + 128) << 23)
    # 1.5 * 2^(exponent - MAN + 23): adding and subtracting it rounds a to a multiple of 2^(exponent - MAN).
    magic = (exponent_field + (((23 - MAN) << 23) | 0x400000)).to(tl.float32, bitcast=True)
    q = tl.minimum((a + magic) - magic, MAXVAL)
    sign = y.to(tl.uint32, bitcast=True) & 0x80000000
    return (q.to(tl.uint32, bitcast=True) | sign).to(tl.float32, bitcast=True)


@triton.jit
def _encode_fp(q, MAN: tl.constexpr, EXP_BITS: tl.constexpr, EMIN: tl.constexpr, BIAS: tl.constexpr,
               MIN_NORMAL: tl.constexpr, SUB_UP: tl.constexpr):
    """ExMy bit pattern (int32) of grid value q (SUB_UP = 2^(MAN - EMIN) scales a subnormal to its mantissa)."""
    a = tl.abs(q)
    bits = a.to(tl.int32, bitcast=True)
    subnormal = a < MIN_NORMAL
    exp_field = tl.where(subnormal, 0, ((bits >> 23) & 0xFF) - 127 + BIAS)
    man_field = tl.where(subnormal, (a * SUB_UP).to(tl.int32), (bits >> (23 - MAN)) & (2**MAN - 1))
    sign = (q.to(tl.int32, bitcast=True) >> 31) & 1
    return (sign << (EXP_BITS + MAN)) | (exp_field << MAN) | man_field


@triton.jit
def _round_element(y, IS_INT: tl.constexpr, MAN: tl.constexpr, EMIN: tl.constexpr, EMAX: tl.constexpr,
                   MAXVAL: tl.constexpr, FRAC_UP: tl.constexpr, QMAX: tl.constexpr):
    if IS_INT:
        steps = tl.minimum(tl.maximum(_rne(y * FRAC_UP), -QMAX), QMAX)
        return steps * (1.0 / FRAC_UP)
    else:
        return _round_fp(y, MAN, EMIN, EMAX, MAXVAL)


@triton.jit
def _encode_element(q, IS_INT: tl.constexpr, BITS: tl.constexpr, MAN: tl.constexpr, EXP_BITS: tl.constexpr,
                    EMIN: tl.constexpr, BIAS: tl.constexpr, MIN_NORMAL: tl.constexpr, SUB_UP: tl.constexpr,
                    FRAC_UP: tl.constexpr):
    if IS_INT:
        return (q * FRAC_UP).to(tl.int32) & (2**BITS - 1)
    else:
        return _encode_fp(q, MAN, EXP_BITS, EMIN, BIAS, MIN_NORMAL, SUB_UP)


@triton.jit
def _store_rounded(ptr, offs, mask, v, SOFT_BF16: tl.constexpr):
    """Store float32 v into ptr's dtype, rounding to nearest-even."""
    if SOFT_BF16:
        bits = v.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        rounded = tl.where(v != v, 0x7FC0, rounded)
        tl.store(ptr + offs, rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True), mask=mask)
    else:
        tl.store(ptr + offs, v.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _pack(codes, ROWS: tl.constexpr, COLS: tl.constexpr, BITS: tl.constexpr):
    """[ROWS, COLS] codes of BITS bits -> [ROWS, COLS * BITS / 8] bytes, earlier elements in lower bits."""
    if BITS == 2:
        lo, hi = tl.split(tl.reshape(codes, [ROWS, COLS // 2, 2]))
        codes = lo | (hi << 2)
        lo, hi = tl.split(tl.reshape(codes, [ROWS, COLS // 4, 2]))
        return (lo | (hi << 4)).to(tl.uint8)
    elif BITS == 4:
        lo, hi = tl.split(tl.reshape(codes, [ROWS, COLS // 2, 2]))
        return (lo | (hi << 4)).to(tl.uint8)
    else:
        return codes.to(tl.uint8)


# ----------------------------------------------------------------------------------------------------
# MX and NV blocks


@triton.jit
def _block_kernel(
    x_ptr, out_ptr, codes_ptr, scales_ptr, tensor_scales_ptr, width, blocks_per_row, total_blocks,
    BLOCK: tl.constexpr, TILE: tl.constexpr, RAGGED: tl.constexpr, NV: tl.constexpr, FAKE: tl.constexpr,
    SOFT_BF16: tl.constexpr, IS_INT: tl.constexpr, BITS: tl.constexpr, MAN: tl.constexpr,
    EXP_BITS: tl.constexpr, EMIN: tl.constexpr, EMAX: tl.constexpr, MAXVAL: tl.constexpr, BIAS: tl.constexpr,
    MIN_NORMAL: tl.constexpr, SUB_UP: tl.constexpr, FRAC_UP: tl.constexpr, QMAX: tl.constexpr,
):
    blk = tl.program_id(0) * TILE + tl.arange(0, TILE)
    j = tl.arange(0, BLOCK)
    if RAGGED:
        cols = (blk % blocks_per_row)[:, None] * BLOCK + j[None, :]
        offs = (blk // blocks_per_row)[:, None] * width + cols
        mask = (blk < total_blocks)[:, None] & (cols < width)
    else:
        offs = blk[:, None] * BLOCK + j[None, :]
        mask = (blk < total_blocks)[:, None]
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    ax = tl.abs(x)
    # NaN and inf count as +inf: a block whose max is inf is non-finite and becomes NaN.
    amax = tl.max(tl.where(ax <= _FLOAT32_MAX, ax, float("inf")), axis=1)
    bad = amax > _FLOAT32_MAX
    amax = tl.where(bad, 0.0, amax)
    if NV:
        encode = tl.load(tensor_scales_ptr) + tl.zeros([TILE], tl.float32)
        block_scale = _round_fp(amax * tl.load(tensor_scales_ptr + 2), _E4M3_MAN, _E4M3_EMIN, _E4M3_EMAX, _E4M3_MAX)
        scale = block_scale * tl.load(tensor_scales_ptr + 1)
        inverse = tl.where(block_scale > 0, tl.math.div_rn(encode, block_scale), 0.0)
    else:
        shared = tl.minimum(tl.maximum(_floor_log2(amax) - EMAX, -127), 127)
        scale = _pow2(shared)
        inverse = _pow2(-shared)
    q = _round_element(x * inverse[:, None], IS_INT, MAN, EMIN, EMAX, MAXVAL, FRAC_UP, QMAX)
    if FAKE:
        out = q * tl.where(bad, float("nan"), scale)[:, None]
        _store_rounded(out_ptr, offs, mask, out, SOFT_BF16)
    else:
        codes = _encode_element(q, IS_INT, BITS, MAN, EXP_BITS, EMIN, BIAS, MIN_NORMAL, SUB_UP, FRAC_UP)
        packed = _pack(tl.where(bad[:, None], 0, codes), TILE, BLOCK, BITS)
        pj = tl.arange(0, BLOCK * BITS // 8)
        tl.store(codes_ptr + blk[:, None] * (BLOCK * BITS // 8) + pj[None, :], packed, mask=(blk < total_blocks)[:, None])
        if NV:
            scale_code = _encode_fp(block_scale, _E4M3_MAN, _E4M3_EXP_BITS, _E4M3_EMIN, _E4M3_BIAS, _E4M3_MIN_NORMAL, _E4M3_SUB_UP)
            scale_code = tl.where(bad, 0x7F, scale_code)
        else:
            scale_code = tl.where(bad, 0xFF, shared + 127)
        tl.store(scales_ptr + blk, scale_code.to(tl.uint8), mask=blk < total_blocks)


def _element_constants(elem: Element) -> dict[str, object]:
    if isinstance(elem, IntElement):
        return dict(IS_INT=True, BITS=elem.bits, MAN=0, EXP_BITS=0, EMIN=0, EMAX=elem.emax, MAXVAL=elem.max_value,
                    BIAS=0, MIN_NORMAL=0.0, SUB_UP=1.0, FRAC_UP=2.0**elem.frac_bits, QMAX=elem.qmax)
    assert isinstance(elem, FpElement)
    return dict(IS_INT=False, BITS=elem.bits, MAN=elem.man_bits, EXP_BITS=elem.exp_bits, EMIN=elem.emin, EMAX=elem.emax,
                MAXVAL=elem.max_value, BIAS=elem.bias, MIN_NORMAL=elem.min_normal,
                SUB_UP=2.0 ** (elem.man_bits - elem.emin), FRAC_UP=1.0, QMAX=0)


def _rows2d(x: torch.Tensor) -> torch.Tensor:
    if x.numel() == 0:
        raise FormatError(f"cannot quantize an empty tensor of shape {tuple(x.shape)}")
    return x.reshape(-1, x.shape[-1]).contiguous()


def _tile(elems_per_program: int, block: int) -> int:
    """Blocks per program: a power of two near elems_per_program / block."""
    return 1 << max(0, (max(1, elems_per_program // block)).bit_length() - 1)


def _soft_bf16(x: torch.Tensor) -> bool:
    return x.device.type != "cuda" and x.dtype == torch.bfloat16


def _launch_block(x: torch.Tensor, fmt: MxFormat | NvFormat, fake: bool, tensor_scales: torch.Tensor | None,
                  elems_per_program: int, num_warps: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    rows = _rows2d(x)
    n_rows, width = rows.shape
    blocks_per_row = n_blocks(width, fmt.BLOCK)
    total = n_rows * blocks_per_row
    constants = _element_constants(fmt.elem)
    if not fake and constants["BITS"] not in (4, 8):
        raise FormatError(f"the packing kernel stores 4- and 8-bit elements; {fmt.name} has {constants['BITS']}-bit ones (use fake_quant or the format's quantize)")
    out = torch.empty_like(rows) if fake else rows.new_empty(0)
    codes = rows.new_empty((0,), dtype=torch.uint8) if fake else torch.empty(
        n_rows, blocks_per_row * fmt.BLOCK * constants["BITS"] // 8, dtype=torch.uint8, device=x.device)
    scales = rows.new_empty((0,), dtype=torch.uint8) if fake else torch.empty(n_rows, blocks_per_row, dtype=torch.uint8, device=x.device)
    nv = isinstance(fmt, NvFormat)
    tile = _tile(elems_per_program, fmt.BLOCK)
    _block_kernel[(triton.cdiv(total, tile),)](
        rows, out, codes, scales, tensor_scales if nv else rows, width, blocks_per_row, total,
        BLOCK=fmt.BLOCK, TILE=tile, RAGGED=width % fmt.BLOCK != 0, NV=nv, FAKE=fake, SOFT_BF16=_soft_bf16(x),
        num_warps=num_warps, enable_fp_fusion=False, **constants,
    )
    return (out.reshape(x.shape) if fake else out), codes, scales


def mx_fake_quant(x: torch.Tensor, fmt: MxFormat, elems_per_program: int = DEFAULT_ELEMS_PER_PROGRAM,
                  num_warps: int = DEFAULT_NUM_WARPS) -> torch.Tensor:
    """MX fake quantization of ``x`` along its last dim; reference: ``fmt.dequantize(fmt.quantize(x))``."""
    return _launch_block(x, fmt, True, None, elems_per_program, num_warps)[0]


def mx_quantize(x: torch.Tensor, fmt: MxFormat, elems_per_program: int = DEFAULT_ELEMS_PER_PROGRAM,
                num_warps: int = DEFAULT_NUM_WARPS) -> PackedTensor:
    """Packed MX codes and E8M0 scales; reference: :func:`mx_quantize_reference`."""
    _, codes, scales = _launch_block(x, fmt, False, None, elems_per_program, num_warps)
    return PackedTensor(codes, scales)


def nv_tensor_scales(x: torch.Tensor, fmt: NvFormat) -> torch.Tensor:
    """``fmt.tensor_scales`` of ``x``, its amax taken by :func:`finite_amax` (one read pass)."""
    return fmt.tensor_scales(finite_amax(x))


def nv_fake_quant(x: torch.Tensor, fmt: NvFormat, tensor_scales: torch.Tensor | None = None,
                  elems_per_program: int = DEFAULT_ELEMS_PER_PROGRAM, num_warps: int = DEFAULT_NUM_WARPS) -> torch.Tensor:
    """NV fake quantization; ``tensor_scales = fmt.tensor_scales(amax)`` for a static (calibrated) amax, else
    computed from ``x``. Reference: ``fmt.dequantize(fmt.quantize(x, amax))``."""
    scales = nv_tensor_scales(x, fmt) if tensor_scales is None else tensor_scales
    return _launch_block(x, fmt, True, scales, elems_per_program, num_warps)[0]


def nv_quantize(x: torch.Tensor, fmt: NvFormat, tensor_scales: torch.Tensor | None = None,
                elems_per_program: int = DEFAULT_ELEMS_PER_PROGRAM, num_warps: int = DEFAULT_NUM_WARPS) -> PackedTensor:
    """Packed NV codes, E4M3 block scales and the FP32 tensor scale (``tensor_scales`` as in
    :func:`nv_fake_quant`); reference: :func:`nv_quantize_reference`."""
    scales = nv_tensor_scales(x, fmt) if tensor_scales is None else tensor_scales
    _, codes, block_scales = _launch_block(x, fmt, False, scales, elems_per_program, num_warps)
    return PackedTensor(codes, block_scales, tensor_scale=scales[1])


# ----------------------------------------------------------------------------------------------------
# Finite absolute maximum (the NV tensor scale's amax)


@triton.jit
def _finite_amax_kernel(x_ptr, partial_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ax = tl.abs(tl.load(x_ptr + offs, mask=offs < n, other=0.0).to(tl.float32))
    tl.store(partial_ptr + tl.program_id(0), tl.max(tl.where(ax <= _FLOAT32_MAX, ax, 0.0), axis=0))


def finite_amax(x: torch.Tensor, block: int = 16384) -> torch.Tensor:
    """Largest ``|x|`` over the finite values (0 if none): one read pass, then a small torch max."""
    flat = x.reshape(-1).contiguous()
    partial = torch.empty(triton.cdiv(flat.numel(), block), dtype=torch.float32, device=x.device)
    _finite_amax_kernel[(partial.numel(),)](flat, partial, flat.numel(), BLOCK=block)
    return partial.amax()


# ----------------------------------------------------------------------------------------------------
# INT groups


@triton.jit
def _int_group_kernel(
    x_ptr, out_ptr, codes_ptr, scales_ptr, zeros_ptr, total_groups,
    GROUP: tl.constexpr, GROUP_P2: tl.constexpr, TILE: tl.constexpr, SYMMETRIC: tl.constexpr,
    QMIN: tl.constexpr, QMAX: tl.constexpr, BITS: tl.constexpr, FP16_SCALE: tl.constexpr, FP16_TINY: tl.constexpr,
    FAKE: tl.constexpr, SOFT_BF16: tl.constexpr, UNPACKED: tl.constexpr,
):
    g = tl.program_id(0) * TILE + tl.arange(0, TILE)
    j = tl.arange(0, GROUP_P2)
    offs = g[:, None] * GROUP + j[None, :]
    mask = (g < total_groups)[:, None] & (j < GROUP)[None, :]
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    finite = tl.abs(x) <= _FLOAT32_MAX
    bad = tl.min(finite.to(tl.int32), axis=1) == 0
    x = tl.where(finite, x, 0.0)
    if SYMMETRIC:
        scale = tl.math.div_rn(tl.max(tl.abs(x), axis=1), tl.full([TILE], QMAX, tl.float32))
    else:
        lo = tl.minimum(tl.min(x, axis=1), 0.0)
        scale = tl.math.div_rn(tl.maximum(tl.max(x, axis=1), 0.0) - lo, tl.full([TILE], QMAX, tl.float32))
    if FP16_SCALE:  # as methods.common.formats.stored_scale
        scale = scale.to(tl.float16).to(tl.float32)
    scale = tl.maximum(scale, FP16_TINY)
    if SYMMETRIC:
        zero = tl.zeros([TILE], tl.float32)
    else:
        zero = tl.minimum(tl.maximum(_rne(tl.math.div_rn(-lo, scale)), 0.0), QMAX)
    q = _rne(tl.math.div_rn(x, tl.broadcast_to(scale[:, None], [TILE, GROUP_P2]))) + zero[:, None]
    q = tl.minimum(tl.maximum(q, QMIN), QMAX)
    if FAKE:
        out = (q - zero[:, None]) * tl.where(bad, float("nan"), scale)[:, None]
        _store_rounded(out_ptr, offs, mask, out, SOFT_BF16)
    else:
        if UNPACKED:  # a code a byte: asymmetric codes unsigned, symmetric ones their signed values
            tl.store(codes_ptr + offs, tl.where(bad[:, None], 0.0, q).to(codes_ptr.dtype.element_ty), mask=mask)
        else:
            codes = tl.where(bad[:, None], 0, q.to(tl.int32) & (2**BITS - 1))
            packed = _pack(codes, TILE, GROUP_P2, BITS)
            pj = tl.arange(0, GROUP_P2 * BITS // 8)
            pmask = (g < total_groups)[:, None] & (pj < GROUP * BITS // 8)[None, :]
            tl.store(codes_ptr + g[:, None] * (GROUP * BITS // 8) + pj[None, :], packed, mask=pmask)
        tl.store(scales_ptr + g, tl.where(bad, float("nan"), scale).to(scales_ptr.dtype.element_ty), mask=g < total_groups)
        if not SYMMETRIC:
            tl.store(zeros_ptr + g, tl.where(bad, 0.0, zero).to(zeros_ptr.dtype.element_ty), mask=g < total_groups)


def _int_group(fmt: IntFormat, width: int) -> int:
    if fmt.group_size == "tensor":
        raise FormatError("the int kernel quantizes groups along rows; group_size='tensor' is not supported (use the format's quantize)")
    if isinstance(fmt.group_size, int):
        if width % fmt.group_size:
            raise FormatError(f"group_size={fmt.group_size} does not divide the last dim {width}")
        return fmt.group_size
    return width


def _launch_int(x: torch.Tensor, fmt: IntFormat, fake: bool, elems_per_program: int, num_warps: int, unpacked: bool = False):
    if fmt.clip != "minmax":
        raise FormatError(f"the int kernel computes min-max scales; clip={fmt.clip!r} is not supported (use the format's quantize)")
    rows = _rows2d(x)
    group = _int_group(fmt, rows.shape[-1])
    group_p2 = triton.next_power_of_2(group)
    total = rows.numel() // group
    if not fake and not unpacked and (fmt.bits not in PACKABLE_BITS or group * fmt.bits % 8):
        raise FormatError(f"the packing kernel stores {PACKABLE_BITS}-bit codes in whole bytes per group; got bits={fmt.bits}, group {group}")
    if unpacked and fmt.bits > 8:
        raise FormatError(f"codes a byte each take at most 8 bits; got bits={fmt.bits}")
    device = x.device
    out = torch.empty_like(rows) if fake else rows.new_empty(0)
    code_dtype = (torch.int8 if fmt.symmetric else torch.uint8) if unpacked else torch.uint8
    codes = torch.empty(0 if fake else rows.numel() * (8 if unpacked else fmt.bits) // 8, dtype=code_dtype, device=device)
    scale_dtype = torch.float16 if fmt.scale_bits == 16 and not unpacked else torch.float32
    scales = torch.empty(0 if fake else total, dtype=scale_dtype, device=device)
    zeros = torch.empty(0 if fake or fmt.symmetric else total, dtype=torch.float32 if unpacked else torch.uint8, device=device)
    tile = _tile(elems_per_program, group_p2)
    _int_group_kernel[(triton.cdiv(total, tile),)](
        rows, out, codes, scales, zeros, total,
        GROUP=group, GROUP_P2=group_p2, TILE=tile, SYMMETRIC=fmt.symmetric, QMIN=fmt.qmin, QMAX=fmt.qmax,
        BITS=fmt.bits, FP16_SCALE=fmt.scale_bits == 16, FP16_TINY=FP16_TINY, FAKE=fake, SOFT_BF16=_soft_bf16(x), UNPACKED=unpacked,
        num_warps=num_warps, enable_fp_fusion=False,
    )
    if fake:
        return out.reshape(x.shape), codes, scales, zeros
    n_rows = rows.shape[0]
    return out, codes.reshape(n_rows, -1), scales.reshape(n_rows, -1), zeros.reshape(n_rows, -1)


def int_fake_quant(x: torch.Tensor, fmt: IntFormat, elems_per_program: int = DEFAULT_ELEMS_PER_PROGRAM,
                   num_warps: int = DEFAULT_NUM_WARPS) -> torch.Tensor:
    """INT fake quantization with min-max scales; reference: ``fmt.dequantize(fmt.quantize(x))``."""
    return _launch_int(x, fmt, True, elems_per_program, num_warps)[0]


def int_quantize(x: torch.Tensor, fmt: IntFormat, elems_per_program: int = DEFAULT_ELEMS_PER_PROGRAM,
                 num_warps: int = DEFAULT_NUM_WARPS) -> PackedTensor:
    """Packed INT codes (2, 4 or 8 bits), scales and zero points; reference: :func:`int_quantize_reference`."""
    _, codes, scales, zeros = _launch_int(x, fmt, False, elems_per_program, num_warps)
    return PackedTensor(codes, scales, None if fmt.symmetric else zeros)


def int_quantize_codes(x: torch.Tensor, fmt: IntFormat, elems_per_program: int = DEFAULT_ELEMS_PER_PROGRAM,
                       num_warps: int = DEFAULT_NUM_WARPS) -> PackedTensor:
    """INT codes (1 to 8 bits) a byte each, ``[rows, width]``: uint8 codes for asymmetric formats, int8 values for
    symmetric ones; fp32 scales and zero points ``[rows, groups]`` (the stored fp16 scales, exactly), what the
    integer matmuls read without a conversion. The codes of :meth:`IntFormat.quantize`."""
    _, codes, scales, zeros = _launch_int(x, fmt, False, elems_per_program, num_warps, unpacked=True)
    return PackedTensor(codes, scales, None if fmt.symmetric else zeros)


# ----------------------------------------------------------------------------------------------------
# Torch references of the packed outputs


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """``[rows, n]`` integer codes of ``bits`` bits (2, 4 or 8) -> ``[rows, n * bits / 8]`` bytes, earlier
    elements in lower bits. Byte-granular storage of whole rows; where a row fills whole int32 words it is
    the bytes of ``qkernels.pack.pack_uint(codes, bits, run=1)``, the matmul kernels' layout with run 1."""
    per_byte = 8 // bits
    fields = (codes.to(torch.int32) & (2**bits - 1)).reshape(codes.shape[0], -1, per_byte)
    shifts = torch.arange(per_byte, device=codes.device, dtype=torch.int32) * bits
    return (fields << shifts).sum(-1).to(torch.uint8)


def e8m0_codes(scale: torch.Tensor) -> torch.Tensor:
    """E8M0 bytes of power-of-two scales (NaN -> 0xFF)."""
    exponent = torch.frexp(scale).exponent - 1 + 127
    return torch.where(torch.isnan(scale), 255, exponent).to(torch.uint8)


def mx_quantize_reference(x: torch.Tensor, fmt: MxFormat) -> PackedTensor:
    q = fmt.quantize(x)
    rows = q.codes.shape[0]
    return PackedTensor(pack_codes(q.codes.reshape(rows, -1), fmt.elem.bits), e8m0_codes(q.scale).reshape(rows, -1))


def nv_quantize_reference(x: torch.Tensor, fmt: NvFormat, amax: torch.Tensor | None = None) -> PackedTensor:
    q = fmt.quantize(x, amax)
    rows = q.codes.shape[0]
    scale_codes = _E4M3.encode(q.scale).to(torch.uint8).reshape(rows, -1)
    return PackedTensor(pack_codes(q.codes.reshape(rows, -1), fmt.elem.bits), scale_codes, tensor_scale=q.tensor_scale)


def int_quantize_reference(x: torch.Tensor, fmt: IntFormat) -> PackedTensor:
    q = fmt.quantize(x)
    rows = math.prod(x.shape[:-1])
    scale_dtype = torch.float16 if fmt.scale_bits == 16 else torch.float32
    zero = None if q.zero is None else q.zero.to(torch.uint8).reshape(rows, -1)
    return PackedTensor(pack_codes(q.codes.reshape(rows, -1), fmt.bits), q.scale.to(scale_dtype).reshape(rows, -1), zero)

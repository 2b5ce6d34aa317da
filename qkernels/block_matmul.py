"""Matmuls ``y = x @ W^T`` with MX or NV block-format weights and fp16/bf16 activations.

Covers every element of the formats: MXFP4/MXFP6/MXFP8 and MXINT8 (blocks of 32, E8M0 scales), NVFP4 and
NVINT4 (blocks of 16, E4M3 scales and an FP32 tensor scale). The weight is stored as the formats' real
quantization, the packed layout of :mod:`qkernels.quant` (4-bit codes two to a byte, others one byte,
one scale byte per block), so what a format run measures is what this kernel reads.

K goes in steps of 32, one tensor-core dot each: every element grid is exact in fp16 and bf16 (at most 8
significant bits, range 2^-16..57344), so the dot is exact up to fp32 accumulation. MX: a step is one
block, and its E8M0 scale multiplies the ``[BLOCK_M, BLOCK_N]`` dot result in fp32 (a scaled element could
leave fp16's range). NV: a step is two blocks of 16, and the elements are multiplied by their E4M3 block
scale before the dot (still exact); the tensor scale multiplies the output. Element codes are decoded
with bit shifts (fp elements: exponent and mantissa moved into an fp16 bit pattern, then a power-of-two
rescale) or ``0x6400 | code`` (int elements); scale bytes through a 256-entry table built from E8M0/E4M3's
own decode, once per block and row.

K is split over programs like the packed kernels' split-K (the last split adds the partials).

Status (H100, 8192^2, steady state; bench/results/kernel_latency_h100.md, session 4): correct on the GPU
(tests/test_block_matmul.py passes there; relative error 2.1e-4 at 8192^2), but slower than cuBLAS fp16:
batch 1 MXINT8 54.5 us (0.88x), MXFP4 113.9 (0.42x), NVFP4 136.8 (0.35x): its dots pad a batch of one to 16
rows. :func:`block_gemv` (session 16) is a GEMV for a few rows instead: one activation row a program, the
elements decoded to fp32 and multiplied on CUDA cores, each block's sum times its scale; right in the
interpreter, not yet timed on a GPU (``bench.kernel_latency`` times it beside the dot kernel up to 8 rows).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from qkernels.lowbit_matmul import _split_range, _store_transposed, split_buffers
from qkernels.quant import PackedTensor, mx_quantize_reference, nv_quantize_reference
from methods.common.elements import ELEMENTS, IntElement
from methods.common.microscaling import MxFormat, NvFormat

BlockFormat = MxFormat | NvFormat


@dataclass
class BlockWeight:
    """A real-quantized ``[n, k]`` weight in an MX/NV format, with the decode tables its kernel reads."""

    fmt: BlockFormat
    packed: PackedTensor
    n: int
    k: int
    code_values: torch.Tensor  # float32 [2**element_bits]: the value of every element code
    scale_values: torch.Tensor  # float32 [256]: the value of every scale byte (E8M0 or E4M3)
    tensor_scale: float = 1.0  # NV's FP32 tensor scale, read once at packing (no device sync per call)

    @property
    def block(self) -> int:
        return self.fmt.BLOCK

    @property
    def nibbles(self) -> bool:
        """4-bit elements are stored two to a byte; wider ones (6, 8 bits) one to a byte."""
        return self.fmt.element_bits == 4

    def nbytes(self) -> int:
        return self.packed.codes.numel() + self.packed.scale.numel()


def scale_values(fmt: BlockFormat, device: torch.device) -> torch.Tensor:
    """float32 value of every scale byte: E8M0 ``2**(b - 127)`` (0xFF = NaN) for MX, E4M3 for NV."""
    codes = torch.arange(256, device=device)
    if isinstance(fmt, MxFormat):
        values = torch.ldexp(torch.ones(256, device=device), codes - 127)
        return torch.where(codes == 255, torch.nan, values)
    return ELEMENTS["e4m3"].decode(codes).float()


def pack_block_weight(weight: torch.Tensor, fmt: BlockFormat) -> BlockWeight:
    """Quantize ``weight [n, k]`` (blocks along k, the input features) and keep its packed storage."""
    if weight.dim() != 2:
        raise ValueError(f"weight must be [n, k], got {tuple(weight.shape)}")
    if not isinstance(fmt, (MxFormat, NvFormat)):
        raise TypeError(f"fmt must be an MxFormat or NvFormat, got {type(fmt).__name__}")
    packed = mx_quantize_reference(weight, fmt) if isinstance(fmt, MxFormat) else nv_quantize_reference(weight, fmt)
    device = weight.device
    code_values = fmt.elem.decode(torch.arange(2**fmt.element_bits, device=device)).float()
    tensor_scale = 1.0 if packed.tensor_scale is None else float(packed.tensor_scale)
    return BlockWeight(fmt, packed, weight.shape[0], weight.shape[1], code_values, scale_values(fmt, device), tensor_scale)


def dequantize_block(bw: BlockWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Plain-torch definition of the weight ``[n, k]``: every element's value times its block's scale (NV: and the
    tensor scale), from the packed storage the kernels read."""
    codes = bw.packed.codes.long()
    if bw.nibbles:  # byte j holds elements 2j (low nibble) and 2j + 1
        codes = torch.stack([codes & 15, codes >> 4], dim=-1).reshape(bw.n, -1)
    values = bw.code_values[codes] * bw.scale_values[bw.packed.scale.long()].repeat_interleave(bw.block, dim=1)[:, : codes.shape[1]]
    return (values[:, : bw.k] * bw.tensor_scale).to(dtype)


def element_decode(fmt: BlockFormat) -> dict:
    """How the kernel turns element codes into values (constexprs): ``fp`` puts the code's exponent and
    mantissa bits into an fp16 bit pattern and rescales by ``2**(15 - bias)`` (exact: the element's exponent
    field fits fp16's), ``int`` reads two's complement through ``0x6400 | code``, ``table`` looks values up."""
    elem = fmt.elem
    if isinstance(elem, IntElement):
        return dict(DECODE="int", ELEM_BITS=elem.bits, MAN_BITS=0, VALUE_SCALE=2.0**-elem.frac_bits)
    if elem.exp_bits <= 5 and elem.man_bits <= 10:
        return dict(DECODE="fp", ELEM_BITS=elem.bits, MAN_BITS=elem.man_bits, VALUE_SCALE=2.0 ** (15 - elem.bias))
    return dict(DECODE="table", ELEM_BITS=elem.bits, MAN_BITS=elem.man_bits, VALUE_SCALE=1.0)


@triton.jit
def _element_values(codes, code_values_ptr, DECODE: tl.constexpr, ELEM_BITS: tl.constexpr, MAN_BITS: tl.constexpr,
                    VALUE_SCALE: tl.constexpr):
    """fp32 values of int32 element codes (see :func:`element_decode`)."""
    if DECODE == "fp":
        sign = (codes >> (ELEM_BITS - 1)) & 1
        magnitude = codes & ((1 << (ELEM_BITS - 1)) - 1)
        bits = (magnitude << (10 - MAN_BITS)) | (sign << 15)
        return bits.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32) * VALUE_SCALE
    elif DECODE == "int":
        HALF: tl.constexpr = 1 << (ELEM_BITS - 1)
        offset = ((codes ^ HALF) | 0x6400).to(tl.int16).to(tl.float16, bitcast=True)  # 1024 + HALF + value
        return (offset.to(tl.float32) - (1024.0 + HALF)) * VALUE_SCALE
    else:
        return tl.load(code_values_ptr + codes)


@triton.jit
def _block_matmul_kernel(
    x_ptr, codes_ptr, scales_ptr, code_values_ptr, scale_values_ptr, y_ptr, partial_ptr, count_ptr,
    M, N, K, n_blocks, tensor_scale, stride_xm, stride_cn, stride_sn, stride_ym,
    BLOCK: tl.constexpr, NIBBLES: tl.constexpr, SCALED_WEIGHTS: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, INTERPRET: tl.constexpr, DECODE: tl.constexpr, ELEM_BITS: tl.constexpr,
    MAN_BITS: tl.constexpr, VALUE_SCALE: tl.constexpr, SPLIT_K: tl.constexpr,
):
    """Program ``(n, m, k)``: ``BLOCK_N`` weight rows, ``BLOCK_M`` activation rows, one K split in steps of
    32 (the splits are added up as in :mod:`qkernels.lowbit_matmul`).

    MX (blocks of 32): a step is one block, its scale multiplies the dot result. NV (blocks of 16,
    ``SCALED_WEIGHTS``): a step is two blocks, each element is multiplied by its E4M3 block scale
    before the dot (exact in fp16 and bf16: at most 7 significant bits, magnitudes 2^-10..3584).
    """
    STEP: tl.constexpr = 32
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, STEP)
    mask_m = offs_m < M
    mask_n = offs_n < N
    dtype: tl.constexpr = x_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    first, last = _split_range(tl.cdiv(n_blocks * BLOCK, STEP), SPLIT_K)
    for step in range(first, last):
        k0 = step * STEP
        k = k0 + offs_k
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + k[None, :], mask=mask_m[:, None] & (k[None, :] < K), other=0.0)
        if NIBBLES:  # byte j holds elements 2j (low nibble) and 2j + 1
            offs_h = tl.arange(0, STEP // 2)
            in_bytes = mask_n[:, None] & (k0 + 2 * offs_h[None, :] < n_blocks * BLOCK)
            pairs = tl.load(codes_ptr + offs_n[:, None] * stride_cn + k0 // 2 + offs_h[None, :], mask=in_bytes, other=0)
            pairs = pairs.to(tl.int32)
            codes = tl.reshape(tl.join(pairs & 15, pairs >> 4), (BLOCK_N, STEP))
        else:
            in_row = mask_n[:, None] & (k[None, :] < n_blocks * BLOCK)  # never past a row's stored blocks
            codes = tl.load(codes_ptr + offs_n[:, None] * stride_cn + k[None, :], mask=in_row, other=0).to(tl.int32)
        w = _element_values(codes, code_values_ptr, DECODE, ELEM_BITS, MAN_BITS, VALUE_SCALE)  # exact in fp16/bf16
        if SCALED_WEIGHTS:  # the step's two blocks: the first scale for its first 16 elements
            blk = k0 // BLOCK
            byte_a = tl.load(scales_ptr + offs_n * stride_sn + blk, mask=mask_n, other=0).to(tl.int32)
            second = blk + 1 + 0 * offs_n < n_blocks  # a tensor: the interpreter cannot and a mask with a bool
            byte_b = tl.load(scales_ptr + offs_n * stride_sn + blk + 1, mask=mask_n & second, other=0).to(tl.int32)
            scale = tl.where(offs_k[None, :] < BLOCK, tl.load(scale_values_ptr + byte_a)[:, None], tl.load(scale_values_ptr + byte_b)[:, None])
            w = w * scale
        if INTERPRET and dtype == tl.bfloat16:  # the interpreter's bf16 dot reads raw bits as integers
            part = tl.dot(x.to(tl.float32), tl.trans(w))
        else:
            part = tl.dot(x, tl.trans(w.to(dtype)))
        if SCALED_WEIGHTS:
            acc += part
        else:
            scale_byte = tl.load(scales_ptr + offs_n * stride_sn + k0 // BLOCK, mask=mask_n, other=0).to(tl.int32)
            acc += part * tl.load(scale_values_ptr + scale_byte)[None, :]
    _store_transposed(y_ptr, tl.trans(acc * tensor_scale), offs_m, offs_n, mask_m, mask_n, stride_ym, partial_ptr, count_ptr, SPLIT_K)


@triton.jit
def _block_gemv_kernel(
    x_ptr, codes_ptr, scales_ptr, code_values_ptr, scale_values_ptr, y_ptr, partial_ptr, count_ptr,
    M, N, K, n_blocks, tensor_scale, stride_xm, stride_cn, stride_sn, stride_ym,
    BLOCK: tl.constexpr, NIBBLES: tl.constexpr, STEP: tl.constexpr, BLOCK_N: tl.constexpr, DECODE: tl.constexpr,
    ELEM_BITS: tl.constexpr, MAN_BITS: tl.constexpr, VALUE_SCALE: tl.constexpr, SPLIT_K: tl.constexpr,
):
    """Program ``(m, n, k)``: activation row ``m``, ``BLOCK_N`` weight rows, one K split in steps of ``STEP``
    elements: the step's elements decoded to fp32 (:func:`_element_values`), multiplied by the activations and
    summed per block, each block's sum times its scale (MX: E8M0; NV: E4M3, and the tensor scale at the end)."""
    BLOCKS: tl.constexpr = STEP // BLOCK
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_k = tl.arange(0, STEP)
    offs_b = tl.arange(0, BLOCKS)
    stored = n_blocks * BLOCK  # elements a row stores (K padded to whole blocks)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    first, last = _split_range(tl.cdiv(stored, STEP), SPLIT_K)
    for step in range(first, last):
        k0 = step * STEP
        k = k0 + offs_k
        if NIBBLES:  # byte j holds elements 2j (low nibble) and 2j + 1
            offs_h = tl.arange(0, STEP // 2)
            in_bytes = mask_n[:, None] & (k0 + 2 * offs_h[None, :] < stored)
            pairs = tl.load(codes_ptr + offs_n[:, None] * stride_cn + k0 // 2 + offs_h[None, :], mask=in_bytes, other=0).to(tl.int32)
            codes = tl.reshape(tl.join(pairs & 15, pairs >> 4), (BLOCK_N, STEP))
        else:
            codes = tl.load(codes_ptr + offs_n[:, None] * stride_cn + k[None, :], mask=mask_n[:, None] & (k[None, :] < stored),
                            other=0).to(tl.int32)
        x = tl.load(x_ptr + pid_m * stride_xm + k, mask=k < K, other=0.0).to(tl.float32)
        w = _element_values(codes, code_values_ptr, DECODE, ELEM_BITS, MAN_BITS, VALUE_SCALE)
        sums = tl.sum(tl.reshape(w * x[None, :], (BLOCK_N, BLOCKS, BLOCK)), axis=2)
        blk = k0 // BLOCK + offs_b
        scale_bytes = tl.load(scales_ptr + offs_n[:, None] * stride_sn + blk[None, :], mask=mask_n[:, None] & (blk[None, :] < n_blocks),
                              other=0).to(tl.int32)
        acc += tl.sum(sums * tl.load(scale_values_ptr + scale_bytes), axis=1)
    offs_m = pid_m + tl.arange(0, 1)
    _store_transposed(y_ptr, (acc * tensor_scale)[:, None], offs_m, offs_n, offs_m < M, mask_n, stride_ym, partial_ptr, count_ptr, SPLIT_K)


@dataclass(frozen=True)
class BlockGemvConfig:
    block_n: int = 32
    step: int = 128  # elements a row reads per step: 64 bytes of 4-bit codes (a multiple of 32, the MX block)
    num_warps: int = 4
    split_k: int | None = None  # None: :func:`block_split_k`


BLOCK_GEMV_MAX_M = 8


def pick_block_path(m: int) -> str:
    """``"block gemv"`` for up to :data:`BLOCK_GEMV_MAX_M` activation rows, else ``"block"`` (the dot kernel, which
    pads the batch to 16 rows): the path BlockLinear takes and ``eval=latency`` times (:data:`BLOCK_PATHS`)."""
    return "block gemv" if m <= BLOCK_GEMV_MAX_M else "block"


def block_gemv(x: torch.Tensor, bw: BlockWeight, config: BlockGemvConfig | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """``x [M, K] @ W^T`` for a few activation rows (at most :data:`BLOCK_GEMV_MAX_M`) on CUDA cores."""
    config = config or BlockGemvConfig()
    x, y = _checked(x, bw, out)
    m = x.shape[0]
    if m > BLOCK_GEMV_MAX_M:
        raise ValueError(f"block_gemv takes at most {BLOCK_GEMV_MAX_M} activation rows, got {m}; use block_matmul")
    if config.step % 32 or config.step & (config.step - 1):
        raise ValueError(f"step must be a power of two and a multiple of 32 (whole MX and NV blocks), got {config.step}")
    codes, scales = bw.packed.codes, bw.packed.scale
    tiles = triton.cdiv(bw.n, config.block_n) * m
    grid = (m, triton.cdiv(bw.n, config.block_n), config.split_k or block_split_k(bw, tiles))
    _block_gemv_kernel[grid](
        x, codes, scales, bw.code_values, bw.scale_values, y, *split_buffers(y, grid, config.block_n),
        m, bw.n, bw.k, scales.shape[1], bw.tensor_scale, x.stride(0), codes.stride(0), scales.stride(0), y.stride(0),
        BLOCK=bw.block, NIBBLES=bw.nibbles, STEP=config.step, BLOCK_N=config.block_n, SPLIT_K=grid[2], num_warps=config.num_warps,
        **element_decode(bw.fmt),
    )
    return y


def _checked(x: torch.Tensor, bw: BlockWeight, out: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` (contiguous along K) and the output, after the checks every block matmul makes."""
    if x.dim() != 2 or x.shape[1] != bw.k:
        raise ValueError(f"x must be [M, {bw.k}], got {tuple(x.shape)}")
    if x.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"block matmuls take fp16 or bf16 activations, got {x.dtype}")
    x = x if x.stride(1) == 1 else x.contiguous()
    m = x.shape[0]
    y = out if out is not None else torch.empty((m, bw.n), device=x.device, dtype=x.dtype)
    if tuple(y.shape) != (m, bw.n) or y.dtype != x.dtype or y.stride(1) != 1:
        raise ValueError(f"out must be {x.dtype} {(m, bw.n)} and contiguous along N, got {y.dtype} {tuple(y.shape)}")
    return x, y


def block_split_k(bw: BlockWeight, tiles: int) -> int:
    """K splits that give the GPU about two programs per SM (132 on the H100), at most 8 and at least
    four 32-deep steps each (untuned)."""
    steps = triton.cdiv(bw.k, 32)
    return max(1, min(8, triton.cdiv(264, tiles), steps // 4))


def block_matmul(x: torch.Tensor, bw: BlockWeight, block_n: int = 64, num_warps: int = 4, out: torch.Tensor | None = None,
                 split_k: int | None = None) -> torch.Tensor:
    """``x [M, K] @ W^T`` for a block-format weight (fp16/bf16 activations, output in x's dtype)."""
    x, y = _checked(x, bw, out)
    m = x.shape[0]
    codes, scales = bw.packed.codes, bw.packed.scale
    block_m = min(64, max(16, triton.next_power_of_2(m)))
    tiles = triton.cdiv(bw.n, block_n) * triton.cdiv(m, block_m)
    grid = (triton.cdiv(bw.n, block_n), triton.cdiv(m, block_m), split_k or block_split_k(bw, tiles))
    _block_matmul_kernel[grid](
        x, codes, scales, bw.code_values, bw.scale_values, y, *split_buffers(y, grid, block_n * block_m),
        m, bw.n, bw.k, scales.shape[1], bw.tensor_scale, x.stride(0), codes.stride(0), scales.stride(0), y.stride(0),
        BLOCK=bw.block, NIBBLES=bw.nibbles, SCALED_WEIGHTS=isinstance(bw.fmt, NvFormat), BLOCK_M=block_m, BLOCK_N=block_n,
        INTERPRET=os.environ.get("TRITON_INTERPRET") == "1", num_warps=num_warps, SPLIT_K=grid[2], **element_decode(bw.fmt),
    )
    return y


BLOCK_PATHS = {"block": block_matmul, "block gemv": block_gemv}  # the tensor-core dots; the GEMV for a few rows

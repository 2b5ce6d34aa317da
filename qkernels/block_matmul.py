"""Matmuls ``y = x @ W^T`` with MX or NV block-format weights and fp16/bf16 activations.

Covers every element of the formats: MXFP4/MXFP6/MXFP8 and MXINT8 (blocks of 32, E8M0 scales), NVFP4 and
NVINT4 (blocks of 16, E4M3 scales and an FP32 tensor scale). The weight is stored as the formats' real
quantization (the bits of :mod:`qkernels.quant`'s codes, one scale byte per block), so what a format run measures is
what these kernels read. 6- and 8-bit codes stay a byte each in K order; 4-bit codes are stored in chunks
(:func:`chunk_codes`, the same bytes reordered): eight to an int32 word, word ``r`` of a chunk holding element ``r`` of
each of the chunk's eight blocks, so that one slot of a tile of words is one block of every row, a dot operand.

Decoding takes bit operations, no table: fp elements' exponent and mantissa bits moved into fp16 bit patterns (exact:
the element's exponent field fits fp16's; a power of two rescales them), int elements through ``0x6400 | code ^
half``; scale bytes likewise (E8M0 into an fp32 exponent, E4M3 into an fp16 pattern).

* 4-bit elements, :func:`block_mma` (to :data:`BLOCK_DOT_MAX_M` rows): tensor cores, the batch padded to 16; per slot
  of a chunk one dot of the block's exact fp16 element values (decoded in the dot operand's registers,
  :func:`_slot_values`) with its activations, the rows' block scales on the fp32 result. NV's tensor scale
  multiplies the output.
* Wider elements: :func:`block_gemv` (batch 1; CUDA cores, fp32 sums per word position, each word's block scale) and
  :func:`block_matmul` (to :data:`BLOCK_DOT_MAX_M` rows; a tensor-core dot per step of 64 elements, pre-scaled
  where that is exact in the activations' dtype, :func:`scaled_exact`, else one block a step with its scale on the
  fp32 result).
* :func:`block_dequant_matmul` (above): the weight dequantized into the activations' dtype, then cuBLAS.

K is split over programs like the packed kernels' split-K (the last split adds the partials).

Status (H200, steady state, 8192^2, session 19; bench/results/kernel_latency_h200.md): MXFP4 on the tensor-core
kernel 26.9 us at batch 1 (1.42x cuBLAS fp16; the K-order CUDA-core GEMV it replaced 49-53 us), 28.6 at 16 rows
(1.19x), NVFP4 39.9 and 45.6 (0.96x, 0.74x: its blocks of 16 take twice the dots and scale work a weight element);
0.62x-0.68x at 64 rows. Short of the 4-bit read floor (13 us): per
element the decode (a ``prmt``, two shifts, two logic ops and an fp16 multiply per two elements) and the fp32
scaling of a 16-column dot result per block, for one useful column at batch 1.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, replace

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
    """A real-quantized ``[n, k]`` weight in an MX/NV format, with the decode tables of its torch reference."""

    fmt: BlockFormat
    packed: PackedTensor
    n: int
    k: int
    code_values: torch.Tensor  # float32 [2**element_bits]: the value of every element code
    scale_values: torch.Tensor  # float32 [256]: the value of every scale byte (E8M0 or E4M3)
    tensor_scale: float = 1.0  # NV's FP32 tensor scale, read once at packing (no device sync per call)
    prescaled: bool = True  # every element times its block scale is exact in fp16 and bf16 (:func:`scaled_exact`)

    @property
    def block(self) -> int:
        return self.fmt.BLOCK

    @property
    def nibbles(self) -> bool:
        """4-bit elements are stored eight to an int32 word in chunks (:func:`chunk_codes`); wider ones (6, 8 bits) one
        to a byte in K order."""
        return self.fmt.element_bits == 4

    @property
    def chunked(self) -> torch.Tensor | None:
        """4-bit elements' chunked words ``[n, chunks * block]`` (int32, the bytes of ``packed.codes``), else None."""
        return self.packed.codes.view(torch.int32) if self.nibbles else None

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
    bw = BlockWeight(fmt, packed, weight.shape[0], weight.shape[1], code_values, scale_values(fmt, device), tensor_scale)
    if bw.nibbles:  # the quantizer's bytes (two codes each, K order) to the tensor-core kernel's chunks
        bw.packed = replace(packed, codes=chunk_codes(packed.codes, fmt.BLOCK).view(torch.uint8))
    bw.prescaled = isinstance(fmt, NvFormat) or scaled_exact(bw)
    return bw


CHUNK_SLOTS = 8  # 4-bit codes a word
_SLOTS = tl.constexpr(CHUNK_SLOTS)


def chunk_codes(codes: torch.Tensor, run: int) -> torch.Tensor:
    """4-bit codes ``[n, k / 2]`` (two to a byte, in K order) as int32 words ``[n, chunks * run]`` in chunks of ``run``
    words: word ``r`` of chunk ``c`` holds at bits ``4s .. 4s + 3`` element ``c * 8 * run + s * run + r`` (slot ``s``),
    so one slot of a chunk is ``run`` consecutive elements (one MX/NV block where ``run`` is the block) and a slot of
    every word of a tile is one dot operand. K is padded with zero codes to whole chunks."""
    n = codes.shape[0]
    elements = torch.stack([codes & 15, codes >> 4], dim=-1).reshape(n, -1).to(torch.int64)
    chunk = CHUNK_SLOTS * run
    elements = torch.nn.functional.pad(elements, (0, -elements.shape[1] % chunk))
    slots = elements.reshape(n, -1, CHUNK_SLOTS, run)  # [n, chunk, slot, r]
    words = sum(slots[:, :, s, :] << (4 * s) for s in range(CHUNK_SLOTS))
    return (words - ((words >> 31) << 32)).to(torch.int32).reshape(n, -1)  # two's complement


def unchunk_codes(words: torch.Tensor, run: int, k: int) -> torch.Tensor:
    """The element codes ``[n, k]`` (int64, K order) of :func:`chunk_codes`'s words."""
    n = words.shape[0]
    w = words.to(torch.int64).reshape(n, -1, 1, run)
    elements = (w >> (4 * torch.arange(CHUNK_SLOTS, device=words.device)).reshape(1, 1, -1, 1)) & 15
    return elements.reshape(n, -1)[:, :k]


def scaled_exact(bw: BlockWeight, rows: int = 4096) -> bool:
    """Whether every element times its block scale (before NV's tensor scale) is exact in fp16 and in bf16, so the
    kernels may scale the weights before their dots (the K-order dot kernel; ``block_mma(prescale=True)``). NV's always are (E4M3 times an FP4/INT4 element: at most 4
    significant bits, magnitudes 2^-10..2688); MX's are unless a block scale leaves fp16's range (2^-24..65504
    for the scaled grid), which real weights' scales do not. Checked at packing, ``rows`` rows at a time."""
    unscaled = replace(bw, tensor_scale=1.0)
    for start in range(0, bw.n, rows):
        part = replace(unscaled, packed=PackedTensor(bw.packed.codes[start:start + rows], bw.packed.scale[start:start + rows]),
                       n=min(rows, bw.n - start))
        w = dequantize_block(part)
        finite = w.isfinite()
        for dtype in (torch.float16, torch.bfloat16):
            if not torch.equal(w.to(dtype).float()[finite], w[finite]):
                return False
    return True


def dequantize_block(bw: BlockWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Plain-torch definition of the weight ``[n, k]``: every element's value times its block's scale (NV: and the
    tensor scale), from the packed storage the kernels read."""
    codes = unchunk_codes(bw.chunked, bw.block, bw.k) if bw.nibbles else bw.packed.codes.long()
    values = bw.code_values[codes] * bw.scale_values[bw.packed.scale.long()].repeat_interleave(bw.block, dim=1)[:, : codes.shape[1]]
    return (values[:, : bw.k] * bw.tensor_scale).to(dtype)


def element_decode(fmt: BlockFormat) -> tuple[dict, float]:
    """How the kernels turn element codes into values (constexprs), two codes 16 bits apart at a time (a word's
    elements ``p`` and ``p + per_word / 2``). ``fp`` puts the code's exponent and mantissa bits into an fp16 bit
    pattern (``2**(bias - 15)`` times the value, exactly: the element's exponent field fits fp16's); ``int`` reads
    two's complement through ``0x6400 | code ^ half`` (the value plus ``1024 + half``, times ``2**frac_bits``). The
    factor turns the decoded numbers into values (the kernels fold it into the block scale or the output). Every
    MX/NV element is one or the other."""
    elem = fmt.elem
    if isinstance(elem, IntElement):
        return dict(DECODE="int", ELEM_BITS=elem.bits, MAN_BITS=0), 2.0**-elem.frac_bits
    if elem.exp_bits <= 5 and elem.man_bits <= 10:
        return dict(DECODE="fp", ELEM_BITS=elem.bits, MAN_BITS=elem.man_bits), 2.0 ** (15 - elem.bias)
    raise ValueError(f"the block kernels decode int elements and fp elements of at most 5 exponent bits; got {fmt.element}")


@triton.jit
def _fp16_halves(pair):
    """The two fp16 numbers of int32 bit patterns (low half, high half), as fp32."""
    lo = pair.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    hi = (pair >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    return lo, hi


@triton.jit
def _element_pair(t, DECODE: tl.constexpr, ELEM_BITS: tl.constexpr, MAN_BITS: tl.constexpr):
    """The decoded elements at bits ``0`` and ``16`` of int32 ``t`` (fp32, before the element's factor; see
    :func:`element_decode`): a pair of codes costs a few 32-bit operations and two conversions."""
    MAG: tl.constexpr = ((1 << (ELEM_BITS - 1)) - 1) * 0x10001
    SIGN: tl.constexpr = (1 << (ELEM_BITS - 1)) * 0x10001
    if DECODE == "fp":
        return _fp16_halves(((t & MAG) << (10 - MAN_BITS)) | ((t & SIGN) << (16 - ELEM_BITS)))
    else:  # int
        HALF: tl.constexpr = 1 << (ELEM_BITS - 1)
        lo, hi = _fp16_halves(((t & (MAG | SIGN)) ^ SIGN) | 0x64006400)
        return lo - (1024.0 + HALF), hi - (1024.0 + HALF)


@triton.jit
def _scale_values(scale_bytes, MX: tl.constexpr):
    """fp32 values of scale bytes (int32): E8M0 ``2**(b - 127)`` (255: NaN) for MX, E4M3 for NV (finite codes)."""
    if MX:
        bits = tl.where(scale_bytes == 0, 0x400000, scale_bytes << 23)
        return tl.where(scale_bytes == 255, 0x7FC00000, bits).to(tl.float32, bitcast=True)
    else:  # the E4M3 bits in an fp16 pattern read 2**-8 times the value (subnormals too)
        bits = ((scale_bytes & 0x7F) << 7) | ((scale_bytes & 0x80) << 8)
        return bits.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32) * 256.0


@triton.jit
def _word_scales(scales_ptr, offs_n, words, mask, stride_sn, BLOCK: tl.constexpr, PER_WORD: tl.constexpr, MX: tl.constexpr):
    """The block scale of every word of a ``[BLOCK_N, WORDS]`` tile (a word never straddles two blocks)."""
    block = words * PER_WORD // BLOCK
    scale_bytes = tl.load(scales_ptr + offs_n[:, None] * stride_sn + block[None, :], mask=mask, other=0).to(tl.int32)
    return _scale_values(scale_bytes, MX)


@triton.jit
def _decoded_tile(packed, scale, PER_WORD: tl.constexpr, DECODE: tl.constexpr, ELEM_BITS: tl.constexpr,
                  MAN_BITS: tl.constexpr):
    """``[BLOCK_N, WORDS]`` words of four byte-wide elements as ``[BLOCK_N, WORDS * 4]`` decoded elements (fp32) times
    ``scale`` (per word): pairs ``(p, p + 2)`` joined so that the reshape puts every element in its K order."""
    tl.static_assert(PER_WORD == 4, "4-bit elements are chunked: _block_mma_kernel decodes them")
    lo0, hi0 = _element_pair(packed, DECODE, ELEM_BITS, MAN_BITS)
    lo1, hi1 = _element_pair(packed >> 8, DECODE, ELEM_BITS, MAN_BITS)
    pair0 = tl.join(lo0 * scale, hi0 * scale)  # [..., j]: element 2j
    pair1 = tl.join(lo1 * scale, hi1 * scale)
    tile = tl.join(pair0, pair1)  # [..., j, h]: element 2j + h
    return tl.reshape(tile, (packed.shape[0], packed.shape[1] * PER_WORD))


@triton.jit
def _block_matmul_kernel(
    x_ptr, words_ptr, scales_ptr, y_ptr, partial_ptr, count_ptr,
    M, N, K, n_words, out_scale, value_scale, stride_xm, stride_wn, stride_sn, stride_ym,
    BLOCK: tl.constexpr, PER_WORD: tl.constexpr, MX: tl.constexpr, SCALED_WEIGHTS: tl.constexpr, STEP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, INTERPRET: tl.constexpr, DECODE: tl.constexpr, ELEM_BITS: tl.constexpr,
    MAN_BITS: tl.constexpr, SPLIT_K: tl.constexpr,
):
    """Program ``(n, m, k)``: ``BLOCK_N`` weight rows, ``BLOCK_M`` activation rows, one K split in steps of
    ``STEP`` elements, one tensor-core dot each (the splits are added up as in :mod:`qkernels.lowbit_matmul`).

    ``SCALED_WEIGHTS``: the elements are multiplied by their block scale (and ``value_scale``) before the dot,
    exact in the activations' dtype (NV always; MX where :attr:`BlockWeight.prescaled`). Otherwise (MX) a step is
    one block of 32 and its scale multiplies the fp32 dot result.
    """
    WORDS: tl.constexpr = STEP // PER_WORD
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_w = tl.arange(0, WORDS)
    offs_k = tl.arange(0, STEP)
    mask_m = offs_m < M
    mask_n = offs_n < N
    dtype: tl.constexpr = x_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    first, last = _split_range(tl.cdiv(n_words, WORDS), SPLIT_K)
    for step in range(first, last):
        words = step * WORDS + offs_w
        in_row = mask_n[:, None] & (words[None, :] < n_words)
        packed = tl.load(words_ptr + offs_n[:, None] * stride_wn + words[None, :], mask=in_row, other=0)
        scale = _word_scales(scales_ptr, offs_n, words, in_row, stride_sn, BLOCK, PER_WORD, MX)
        if SCALED_WEIGHTS:
            w = _decoded_tile(packed, scale * value_scale, PER_WORD, DECODE, ELEM_BITS, MAN_BITS)
        else:
            w = _decoded_tile(packed, tl.full(scale.shape, 1.0, tl.float32), PER_WORD, DECODE, ELEM_BITS, MAN_BITS)
        k = step * STEP + offs_k
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + k[None, :], mask=mask_m[:, None] & (k[None, :] < K), other=0.0)
        if INTERPRET and dtype == tl.bfloat16:  # the interpreter's bf16 dot reads raw bits as integers
            part = tl.dot(x.to(tl.float32), tl.trans(w))
        else:
            part = tl.dot(x, tl.trans(w.to(dtype)))
        if SCALED_WEIGHTS:
            acc += part
        else:  # one block a step: every word of the step has its scale
            acc += part * (tl.max(scale, axis=1) * value_scale)[None, :]
    _store_transposed(y_ptr, tl.trans(acc * out_scale), offs_m, offs_n, mask_m, mask_n, stride_ym, partial_ptr, count_ptr, SPLIT_K)


@triton.jit
def _block_gemv_kernel(
    x_ptr, words_ptr, scales_ptr, y_ptr, partial_ptr, count_ptr,
    M, N, K, n_words, out_scale, stride_xm, stride_wn, stride_sn, stride_ym,
    BLOCK: tl.constexpr, PER_WORD: tl.constexpr, MX: tl.constexpr, WORDS: tl.constexpr, BLOCK_N: tl.constexpr,
    DECODE: tl.constexpr, ELEM_BITS: tl.constexpr, MAN_BITS: tl.constexpr, SPLIT_K: tl.constexpr,
):
    """Program ``(m, n, k)``: activation row ``m``, ``BLOCK_N`` weight rows, one K split in steps of ``WORDS``
    words a row, the next step's words loaded a step ahead. Each word's elements are decoded two at a time
    (:func:`_element_pair`) and multiplied by their activations into fp32 sums per word position, which take the
    word's block scale; the sums are added up at the end. No reshapes or joins: every tensor keeps the layout of
    the words' tile."""
    HALF_WORD: tl.constexpr = PER_WORD // 2
    SHIFT: tl.constexpr = 32 // PER_WORD
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_w = tl.arange(0, WORDS)
    acc = tl.zeros((BLOCK_N, WORDS), dtype=tl.float32)
    first, last = _split_range(tl.cdiv(n_words, WORDS), SPLIT_K)
    words = first * WORDS + offs_w
    in_row = mask_n[:, None] & (words[None, :] < last * WORDS) & (words[None, :] < n_words)
    next_packed = tl.load(words_ptr + offs_n[:, None] * stride_wn + words[None, :], mask=in_row, other=0)
    for step in range(first, last):
        packed = next_packed  # the next step's words are loaded before this step's decode (a step ahead)
        words = step * WORDS + offs_w
        in_row = mask_n[:, None] & (words[None, :] < n_words)
        ahead = words + WORDS
        next_packed = tl.load(words_ptr + offs_n[:, None] * stride_wn + ahead[None, :],
                              mask=mask_n[:, None] & (ahead[None, :] < last * WORDS) & (ahead[None, :] < n_words), other=0)
        part = tl.zeros((BLOCK_N, WORDS), dtype=tl.float32)
        for p in tl.static_range(HALF_WORD):
            lo, hi = _element_pair(packed >> (p * SHIFT), DECODE, ELEM_BITS, MAN_BITS)
            k_lo = words * PER_WORD + p
            x_lo = tl.load(x_ptr + pid_m * stride_xm + k_lo, mask=k_lo < K, other=0.0).to(tl.float32)
            x_hi = tl.load(x_ptr + pid_m * stride_xm + k_lo + HALF_WORD, mask=k_lo + HALF_WORD < K, other=0.0).to(tl.float32)
            part += lo * x_lo[None, :] + hi * x_hi[None, :]
        acc += part * _word_scales(scales_ptr, offs_n, words, in_row, stride_sn, BLOCK, PER_WORD, MX)
    offs_m = pid_m + tl.arange(0, 1)
    y = tl.sum(acc, axis=1) * out_scale
    _store_transposed(y_ptr, y[:, None], offs_m, offs_n, offs_m < M, mask_n, stride_ym, partial_ptr, count_ptr, SPLIT_K)


def _f16_pair(value: float) -> int:
    """An fp16 value twice, as the bits of an int32 (an fp16x2 constant of inline PTX)."""
    (bits,) = struct.unpack("<H", struct.pack("<e", value))
    return bits * 0x10001


_F16_TWO_14 = tl.constexpr(_f16_pair(2.0**14))
_F16_MINUS_1032 = tl.constexpr(_f16_pair(-1032.0))


def slot_constants(slot: int) -> dict[str, int]:
    """The integer constants of :func:`_slot_values` for slot ``slot`` of chunked words (:func:`chunk_codes`), for the
    kernel and for tests that emulate it: ``prmt`` puts byte ``slot // 2`` of two neighbouring words in bytes 0 and 2,
    the code sits at bit ``p`` of each half. fp (E2M1): magnitude to fp16 bits 9-11, sign to 15 (the value times
    2**-14), then one ``mul.f16x2`` by 2**14; int (INT4): ``(t >> p & 0xF) ^ 0x6408`` reads ``1024 + 8 + code``, one
    ``add.f16x2`` of -1032."""
    byte, p = divmod(4 * slot, 8)
    return dict(select=byte | ((4 + byte) << 8), p=p, mag_shift=9 - p, sign_shift=12 - p, mul=_f16_pair(2.0**14), add=_f16_pair(-1032.0))


@triton.jit
def _slot_values(words, SLOT: tl.constexpr, DECODE: tl.constexpr, INTERPRET: tl.constexpr):
    """Slot ``SLOT`` of every chunked word as fp16 element values (exact), two words an asm call (``pack=2``): a
    ``prmt``, two or three bit operations and one fp16x2 op (:func:`slot_constants`). A pure one-input asm, so
    Triton can decode in the dot operand's register layout."""
    BYTE: tl.constexpr = SLOT // 2
    P: tl.constexpr = (SLOT % 2) * 4
    SELECT: tl.constexpr = BYTE | ((4 + BYTE) << 8)
    if INTERPRET:  # no PTX here: the K-order kernels' decode of the slot's code (E2M1's value times 2**-14, or INT4's)
        value, _ = _element_pair(words >> (4 * SLOT), DECODE, 4, 1 if DECODE == "fp" else 0)
        return (value * 16384.0 if DECODE == "fp" else value).to(tl.float16)
    if DECODE == "fp":
        MUL: tl.constexpr = _F16_TWO_14
        return tl.inline_asm_elementwise(
            asm=f"""{{
            .reg .b32 t, a, b, v, m;
            prmt.b32 t, $1, $2, {SELECT};
            shl.b32 a, t, {9 - P};
            shl.b32 b, t, {12 - P};
            and.b32 a, a, 0x0E000E00;
            lop3.b32 v, b, 0x80008000, a, 0xea;
            mov.b32 m, {MUL};
            mul.rn.f16x2 $0, v, m;
            }}""",
            constraints="=r,r,r", args=[words], dtype=tl.float16, is_pure=True, pack=2,
        )
    else:
        ADD: tl.constexpr = _F16_MINUS_1032
        return tl.inline_asm_elementwise(
            asm=f"""{{
            .reg .b32 t, v, c;
            prmt.b32 t, $1, $2, {SELECT};
            shr.u32 t, t, {P};
            lop3.b32 v, t, 0x000F000F, 0x64086408, 0x6a;
            mov.b32 c, {ADD};
            add.rn.f16x2 $0, v, c;
            }}""",
            constraints="=r,r,r", args=[words], dtype=tl.float16, is_pure=True, pack=2,
        )


@triton.jit
def _block_mma_kernel(
    x_ptr, words_ptr, scales_ptr, y_ptr, partial_ptr, count_ptr,
    M, N, K, n_chunks, n_blocks, out_scale, stride_xm, stride_wn, stride_sn, stride_ym,
    RUN: tl.constexpr, MX: tl.constexpr, DECODE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
    SPLIT_K: tl.constexpr, PRESCALE: tl.constexpr, INTERPRET: tl.constexpr,
):
    """``y^T = W x^T`` for 4-bit block formats on chunked words (:func:`chunk_codes`, a slot is one block): a program
    takes ``BLOCK_N`` weight rows, ``BLOCK_M`` activation rows (a batch of one padded to 16) and one K split; per slot
    of a chunk, the slot's element values (exact fp16, :func:`_slot_values`) dotted with the block's activations on
    tensor cores. ``PRESCALE`` (where an element times its block scale is exact in fp16 and bf16: NV always, E4M3 times
    an FP4/INT4 element; MX where :func:`scaled_exact`): the values times their rows' block scales go into the dot,
    which accumulates; else the fp32 dot result of each slot takes the scales. Split-K as in :mod:`qkernels.lowbit_matmul`."""
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    CHUNK: tl.constexpr = _SLOTS * RUN
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, RUN)
    mask_n = offs_n < N
    mask_m = offs_m < M
    dtype: tl.constexpr = x_ptr.dtype.element_ty
    first, last = _split_range(n_chunks, SPLIT_K)
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for chunk in range(first, last):
        words = tl.load(words_ptr + offs_n[:, None] * stride_wn + chunk * RUN + offs_r[None, :], mask=mask_n[:, None], other=0)
        for slot in tl.static_range(_SLOTS):
            k = chunk * CHUNK + slot * RUN + offs_r
            x_t = tl.load(x_ptr + offs_m[None, :] * stride_xm + k[:, None], mask=mask_m[None, :] & (k[:, None] < K), other=0.0)
            block = chunk * _SLOTS + slot
            scale_bytes = tl.load(scales_ptr + offs_n * stride_sn + block, mask=mask_n & (offs_n * 0 + block < n_blocks), other=0).to(tl.int32)
            scale = _scale_values(scale_bytes, MX)
            values = _slot_values(words, slot, DECODE, INTERPRET)
            if PRESCALE and MX:  # exact where the weight is prescaled (:func:`scaled_exact`); 2**e may leave fp16's range
                values = (values.to(tl.float32) * scale[:, None]).to(tl.float16)
            elif PRESCALE:  # E4M3 is an fp16 number
                values = values * scale.to(tl.float16)[:, None]
            if INTERPRET and dtype == tl.bfloat16:  # the interpreter's bf16 dot reads raw bits as integers
                part = tl.dot(values.to(tl.float32), x_t.to(tl.float32))
                acc += part if PRESCALE else part * scale[:, None]
            elif PRESCALE:
                acc = tl.dot(values.to(dtype), x_t, acc)
            else:
                acc += tl.dot(values.to(dtype), x_t) * scale[:, None]
    _store_transposed(y_ptr, acc * out_scale, offs_m, offs_n, mask_m, mask_n, stride_ym, partial_ptr, count_ptr, SPLIT_K)


@triton.jit
def _block_dequant_chunked_kernel(
    words_ptr, scales_ptr, w_ptr, N, K, n_blocks, out_scale, stride_wn, stride_sn, stride_on,
    RUN: tl.constexpr, MX: tl.constexpr, DECODE: tl.constexpr, BLOCK_N: tl.constexpr, INTERPRET: tl.constexpr,
):
    """Program ``(n, chunk)``: one chunk of ``BLOCK_N`` rows of the dequantized weight from chunked words, in the
    output's dtype (each element times its block scale and NV's tensor scale in fp32, rounded once)."""
    chunk = tl.program_id(1)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, RUN)
    mask_n = offs_n < N
    words = tl.load(words_ptr + offs_n[:, None] * stride_wn + chunk * RUN + offs_r[None, :], mask=mask_n[:, None], other=0)
    for slot in tl.static_range(_SLOTS):
        block = chunk * _SLOTS + slot
        scale_bytes = tl.load(scales_ptr + offs_n * stride_sn + block, mask=mask_n & (offs_n * 0 + block < n_blocks), other=0).to(tl.int32)
        w = _slot_values(words, slot, DECODE, INTERPRET).to(tl.float32) * _scale_values(scale_bytes, MX)[:, None] * out_scale  # as the reference
        k = block * RUN + offs_r
        tl.store(w_ptr + offs_n[:, None] * stride_on + k[None, :], w.to(w_ptr.dtype.element_ty), mask=mask_n[:, None] & (k[None, :] < K))


@triton.jit
def _block_dequant_kernel(
    words_ptr, scales_ptr, w_ptr, N, K, n_words, out_scale, value_scale, stride_wn, stride_sn, stride_on,
    BLOCK: tl.constexpr, PER_WORD: tl.constexpr, MX: tl.constexpr, WORDS: tl.constexpr, BLOCK_N: tl.constexpr,
    DECODE: tl.constexpr, ELEM_BITS: tl.constexpr, MAN_BITS: tl.constexpr,
):
    """Program ``(n, k)``: the ``[BLOCK_N, WORDS * PER_WORD]`` tile of the dequantized weight, in the output's dtype:
    each element times its block scale (exact in fp32), times NV's tensor scale, rounded once."""
    STEP: tl.constexpr = WORDS * PER_WORD
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    words = tl.program_id(1) * WORDS + tl.arange(0, WORDS)
    in_row = (offs_n < N)[:, None] & (words[None, :] < n_words)
    packed = tl.load(words_ptr + offs_n[:, None] * stride_wn + words[None, :], mask=in_row, other=0)
    scale = _word_scales(scales_ptr, offs_n, words, in_row, stride_sn, BLOCK, PER_WORD, MX) * value_scale
    w = _decoded_tile(packed, scale, PER_WORD, DECODE, ELEM_BITS, MAN_BITS) * out_scale
    k = tl.program_id(1) * STEP + tl.arange(0, STEP)
    mask = (offs_n < N)[:, None] & (k[None, :] < K)
    tl.store(w_ptr + offs_n[:, None] * stride_on + k[None, :], w.to(w_ptr.dtype.element_ty), mask=mask)


def packed_words(bw: BlockWeight) -> torch.Tensor:
    """The codes of 6- and 8-bit elements as int32 words (``[n, bytes / 4]``, four bytes a word in K order; every
    format's row holds whole blocks of at least 8 bytes). 4-bit elements are chunked: :func:`block_mma` reads them."""
    if bw.nibbles:
        raise ValueError(f"{bw.fmt.name}'s codes are chunked words: block_mma and block_dequantize read them, not the K-order kernels")
    codes = bw.packed.codes
    if not codes.is_contiguous() or codes.storage_offset() % 4:
        codes = codes.contiguous()
    return codes.view(torch.int32)


def _launch_args(bw: BlockWeight) -> tuple[dict, float, float]:
    """The kernels' format constexprs, and the factors of the output (NV's tensor scale) and of every decoded value."""
    decode, value_scale = element_decode(bw.fmt)
    per_word = 8 if bw.nibbles else 4
    constexprs = dict(BLOCK=bw.block, PER_WORD=per_word, MX=isinstance(bw.fmt, MxFormat), **decode)
    return constexprs, bw.tensor_scale, value_scale


@dataclass(frozen=True)
class BlockGemvConfig:
    block_n: int = 16
    words: int = 16  # int32 words a row reads per step: 64 bytes (64 elements)
    num_warps: int = 4
    split_k: int | None = None  # None: :func:`block_split_k`


BLOCK_GEMV_MAX_M = 8  # the most rows block_gemv takes (one program a row: the dispatcher gives it batch 1 only)
BLOCK_DOT_MAX_M = 64  # above: dequantize + cuBLAS


def pick_block_path(m: int, bw: BlockWeight) -> str:
    """The path BlockLinear takes and ``eval=latency`` times (:data:`BLOCK_PATHS`): for 4-bit elements the tensor-core
    kernel on chunked words (``"block mma"``) to :data:`BLOCK_DOT_MAX_M` rows, for wider ones the GEMV at batch 1 and
    the dot kernel to :data:`BLOCK_DOT_MAX_M` rows; ``"block dequant"`` above.

    H200, steady state, 8192^2 (session 19, ``bench/results/kernel_latency_h200_session19_block_mma_probe.json``): the
    tensor-core kernel MXFP4 26.7 us at batch 1 (1.45x cuBLAS fp16; the K-order GEMV 49.0), 28.5 at 16 rows (the dot
    kernel 73.9), 43.8-55.1 at 64 (dequant + cuBLAS 93.6); NVFP4 (blocks of 16: twice the scale work) 39.9 / 43.6-44.8
    / 63.9 against 48.7 / 73.5 / 96.2. Session 17, MXINT8: the GEMV 0.58x at batch 1, the dot kernel 0.36x at 16 rows,
    dequant + cuBLAS 0.27x-0.66x from 64 rows."""
    if m > BLOCK_DOT_MAX_M:
        return "block dequant"
    if bw.nibbles:
        return "block mma"
    return "block gemv" if m == 1 else "block"


def block_gemv(x: torch.Tensor, bw: BlockWeight, config: BlockGemvConfig | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """``x [M, K] @ W^T`` for a few activation rows (at most :data:`BLOCK_GEMV_MAX_M`) on CUDA cores (6- and 8-bit
    elements)."""
    config = config or BlockGemvConfig()
    x, y = _checked(x, bw, out)
    m = x.shape[0]
    if m > BLOCK_GEMV_MAX_M:
        raise ValueError(f"block_gemv takes at most {BLOCK_GEMV_MAX_M} activation rows, got {m}; use block_matmul")
    if config.words < 1 or config.words & (config.words - 1):
        raise ValueError(f"words (a row's words a step) must be a power of two, got {config.words}")
    words = packed_words(bw)
    constexprs, out_scale, value_scale = _launch_args(bw)
    tiles = triton.cdiv(bw.n, config.block_n) * m
    grid = (m, triton.cdiv(bw.n, config.block_n), config.split_k or block_split_k(bw, tiles, programs=528))
    _block_gemv_kernel[grid](
        x, words, bw.packed.scale, y, *split_buffers(y, grid, config.block_n),
        m, bw.n, bw.k, words.shape[1], out_scale * value_scale, x.stride(0), words.stride(0), bw.packed.scale.stride(0), y.stride(0),
        WORDS=config.words, BLOCK_N=config.block_n, SPLIT_K=grid[2], num_warps=config.num_warps, **constexprs,
    )
    return y


def chunked_out_scale(bw: BlockWeight) -> float:
    """What the chunked kernels' sums are multiplied by: NV's tensor scale, and for int elements their
    ``2**-frac_bits`` (:func:`_slot_values` gives fp elements' values themselves)."""
    decode, value_scale = element_decode(bw.fmt)
    return bw.tensor_scale * (value_scale if decode["DECODE"] == "int" else 1.0)


def block_mma(x: torch.Tensor, bw: BlockWeight, block_n: int = 64, num_warps: int = 4, out: torch.Tensor | None = None,
              split_k: int | None = None, prescale: bool | None = None) -> torch.Tensor:
    """``x [M, K] @ W^T`` for 4-bit block formats on tensor cores (:func:`_block_mma_kernel`, chunked words), the
    batch padded to 16 rows and tiled by at most 64; ``prescale`` scales the elements before the dot (where
    :attr:`BlockWeight.prescaled`; None: NV's weights). H200, 8192^2, side by side (session 19,
    ``kernel_latency_h200_session19_block_prescale_probe.json``): NVFP4 prescaled 39.8 / 45.2 / 63.1 us at 1 / 16 / 64
    rows against 40.1 / 45.4 / 64.5 scaled after (half the registers: no spills at 64 rows); MXFP4 prescaled (through
    fp32, its scales may leave fp16's range) 34.4 / 37.6 / 59.8 against 26.9 / 28.9 / 55.7, so MX scales after."""
    if bw.chunked is None:
        raise ValueError(f"block_mma takes 4-bit elements (chunked words); {bw.fmt.name} has {bw.fmt.element_bits}-bit ones")
    if prescale and not bw.prescaled:
        raise ValueError(f"prescale needs elements times block scales exact in fp16 and bf16; this {bw.fmt.name} weight's are not")
    prescale = isinstance(bw.fmt, NvFormat) if prescale is None else prescale
    x, y = _checked(x, bw, out)
    m = x.shape[0]
    constexprs, out_scale, value_scale = _launch_args(bw)
    block_m = min(64, max(16, triton.next_power_of_2(m)))
    tiles = triton.cdiv(bw.n, block_n) * triton.cdiv(m, block_m)
    n_chunks = bw.chunked.shape[1] // bw.block
    grid = (triton.cdiv(bw.n, block_n), triton.cdiv(m, block_m), split_k or max(1, min(8, triton.cdiv(264, tiles), n_chunks)))
    _block_mma_kernel[grid](
        x, bw.chunked, bw.packed.scale, y, *split_buffers(y, grid, block_n * block_m), m, bw.n, bw.k, n_chunks, bw.packed.scale.shape[1],
        chunked_out_scale(bw), x.stride(0), bw.chunked.stride(0), bw.packed.scale.stride(0),
        y.stride(0), RUN=bw.block, MX=constexprs["MX"], DECODE=constexprs["DECODE"], BLOCK_N=block_n, BLOCK_M=block_m, SPLIT_K=grid[2],
        PRESCALE=prescale, INTERPRET=os.environ.get("TRITON_INTERPRET") == "1", num_warps=num_warps,
    )
    return y


def block_dequantize(bw: BlockWeight, dtype: torch.dtype = torch.float16, block_n: int = 32, words: int = 32) -> torch.Tensor:
    """The weight ``[n, k]`` in ``dtype`` by a Triton dequant kernel (each value rounded once from its exact fp32): from
    the chunked words where the weight has them, else from the codes in K order (``words`` a row a program)."""
    constexprs, out_scale, value_scale = _launch_args(bw)
    if bw.chunked is not None:
        w = torch.empty((bw.n, bw.k), dtype=dtype, device=bw.chunked.device)
        _block_dequant_chunked_kernel[(triton.cdiv(bw.n, block_n), bw.chunked.shape[1] // bw.block)](
            bw.chunked, bw.packed.scale, w, bw.n, bw.k, bw.packed.scale.shape[1], chunked_out_scale(bw), bw.chunked.stride(0),
            bw.packed.scale.stride(0), w.stride(0), RUN=bw.block, MX=constexprs["MX"], DECODE=constexprs["DECODE"], BLOCK_N=block_n,
            INTERPRET=os.environ.get("TRITON_INTERPRET") == "1",
        )
        return w
    packed = packed_words(bw)
    w = torch.empty((bw.n, bw.k), dtype=dtype, device=packed.device)
    step = words * constexprs["PER_WORD"]
    _block_dequant_kernel[(triton.cdiv(bw.n, block_n), triton.cdiv(bw.k, step))](
        packed, bw.packed.scale, w, bw.n, bw.k, packed.shape[1], out_scale, value_scale, packed.stride(0),
        bw.packed.scale.stride(0), w.stride(0), WORDS=words, BLOCK_N=block_n, **constexprs,
    )
    return w


def block_dequant_matmul(x: torch.Tensor, bw: BlockWeight, out: torch.Tensor | None = None) -> torch.Tensor:
    """The fallback for large batches: the weight dequantized into x's dtype (:func:`block_dequantize`), then cuBLAS."""
    x, y = _checked(x, bw, out)
    return torch.matmul(x, block_dequantize(bw, x.dtype).t(), out=y)


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


def block_split_k(bw: BlockWeight, tiles: int, programs: int = 264) -> int:
    """K splits that give the GPU about ``programs`` programs (two per SM of an H100 for the dot kernel; the GEMV
    asks for four: H200, MXFP4/NVFP4 8192^2 at batch 1, 16-row tiles, 53 us with 2 splits against 58 with none),
    at most 8 and at least four 32-deep steps each."""
    steps = triton.cdiv(bw.k, 32)
    return max(1, min(8, triton.cdiv(programs, tiles), steps // 4))


def block_matmul(x: torch.Tensor, bw: BlockWeight, block_n: int = 64, num_warps: int = 4, out: torch.Tensor | None = None,
                 split_k: int | None = None, step: int | None = None) -> torch.Tensor:
    """``x [M, K] @ W^T`` for a block format of 6- or 8-bit elements (fp16/bf16 activations, output in x's dtype):
    steps of ``step`` elements (default 64: H200, MXINT8 8192^2 at batch 1 93 us against 196 with 128) with pre-scaled
    weights where :attr:`BlockWeight.prescaled`, else (MX) one block of 32 a step."""
    x, y = _checked(x, bw, out)
    m = x.shape[0]
    words = packed_words(bw)
    constexprs, out_scale, value_scale = _launch_args(bw)
    scaled = bw.prescaled
    step = (step or 64) if scaled else bw.block
    if step % 32 or step & (step - 1):
        raise ValueError(f"step must be a power of two and a multiple of 32 (whole MX and NV blocks), got {step}")
    block_m = min(64, max(16, triton.next_power_of_2(m)))
    tiles = triton.cdiv(bw.n, block_n) * triton.cdiv(m, block_m)
    grid = (triton.cdiv(bw.n, block_n), triton.cdiv(m, block_m), split_k or block_split_k(bw, tiles))
    _block_matmul_kernel[grid](
        x, words, bw.packed.scale, y, *split_buffers(y, grid, block_n * block_m),
        m, bw.n, bw.k, words.shape[1], out_scale, value_scale, x.stride(0), words.stride(0), bw.packed.scale.stride(0), y.stride(0),
        SCALED_WEIGHTS=scaled, STEP=step, BLOCK_M=block_m, BLOCK_N=block_n, INTERPRET=os.environ.get("TRITON_INTERPRET") == "1",
        num_warps=num_warps, SPLIT_K=grid[2], **constexprs,
    )
    return y


BLOCK_PATHS = {"block": block_matmul, "block mma": block_mma, "block gemv": block_gemv, "block dequant": block_dequant_matmul}

"""Matmuls for activation-quantized methods: W8A8 INT8, W4A8, and ABQ-style bit-plane WpAq.

* **W8A8**: int8 activations (one scale per token) times int8 weights (one scale per output
  channel), int32 accumulation on tensor cores, scales applied once in the epilogue: a Triton kernel
  (16-row tiles and K splits for a few rows), from 17 rows cuBLASLt's int8 GEMM (``torch._int_mm``) and a
  scaling kernel. H200 (session 17, the old single-config Triton kernel): 0.50x-0.67x of cuBLAS fp16 at
  8192^2; the split-K config and the cuBLAS path not yet timed.
* **W4A8**: packed 4-bit weights (:mod:`qkernels.pack` ``uint4``, per-group scales, integer zero
  points) times int8 activations. Each step takes a K range inside one weight group, so
  ``code - zero`` is an exact int8 operand and the group's scale multiplies the int32 partial sum.
* **Bit-plane WpAq** (ABQ-LLM): p-bit weight codes and q-bit activation codes are split into binary
  planes, ``W = sum_i 2^i W_i`` and ``A = sum_j 2^j A_j``; the integer product is
  ``sum_ij 2^(i+j) A_j W_i^T``, a sum of binary matmuls combined with shifts, so any (p, q) pair runs
  on one kernel. ABQ runs the binary matmuls on 1-bit tensor cores (``mma ... .b1.and.popc``), which
  Triton cannot emit (and Hopper does not speed up); here each is an int8 tensor-core dot, where a 0/1
  operand costs what a 7-bit one does, so by default the activations go in 7-bit digits (one digit up to
  7 bits: ``p`` dots a step, binary weight planes times the activation codes) and ``a_digit=1`` runs ABQ's
  ``p * q`` binary-by-binary dots. Zero points are removed in the epilogue (float64) with row and column
  code sums: ``(A - za)(W - zw)^T = AW^T - zw*rowsum(A) - za*rowsum(W) + K*za*zw``.

Each kernel has a plain-torch reference (``*_reference``) computed exactly in float64.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from qkernels.lowbit_matmul import (_codes_of_slots, _load_chunk, _split_range, _store_transposed, before_ampere, gemm_sub_slots, kernel_tensors,
                                    split_buffers)
from qkernels.pack import PackedWeight, pack_uint, padded_width

# ----------------------------------------------------------------------------- activation quantization


def quantize_rows_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per row (token or output channel): ``x ~ q * scale[:, None]``, ``q`` in [-127, 127]."""
    x2 = x.reshape(-1, x.shape[-1]).float()
    scale = x2.abs().amax(dim=1).clamp_min(1e-8) / 127.0
    return torch.round(x2 / scale[:, None]).clamp(-127, 127).to(torch.int8), scale


def quantize_rows_asym(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric unsigned codes per row (min-max): ``x ~ (code - zero) * scale``; codes as uint8."""
    x2 = x.reshape(-1, x.shape[-1]).float()
    top = 2**bits - 1
    low, high = x2.amin(dim=1).clamp(max=0), x2.amax(dim=1).clamp(min=0)
    scale = ((high - low) / top).clamp_min(1e-8)
    zero = torch.round(-low / scale).clamp(0, top)
    codes = torch.clamp(torch.round(x2 / scale[:, None]) + zero[:, None], 0, top)
    return codes.to(torch.uint8), scale, zero


# ----------------------------------------------------------------------------- W8A8


@triton.jit
def _int8_gemm_kernel(
    a_ptr, b_ptr, sa_ptr, sb_ptr, za_ptr, bsum_ptr, y_ptr, partial_ptr, count_ptr, M, N, K, stride_am, stride_bn, stride_ym,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr, A_ZERO: tl.constexpr,
):
    """Program ``(m, n, k)``: an int32 ``[BLOCK_M, BLOCK_N]`` tile over one K split, scaled in fp32 (the splits'
    scaled partials added up in split order as in :mod:`qkernels.lowbit_matmul`). ``A_ZERO``: the activations are
    uint8 codes with zero points, read as ``code - 128`` (int8; xor) and ``(128 - zero) * b_sum`` added to the
    first split's sums."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    first, last = _split_range(tl.cdiv(K, BLOCK_K), SPLIT_K)
    for step in range(first, last):
        k = step * BLOCK_K + offs_k
        a = _int8_operand(a_ptr + offs_m[:, None] * stride_am + k[None, :], mask_m[:, None] & (k[None, :] < K), A_ZERO)
        b = tl.load(b_ptr + offs_n[None, :] * stride_bn + k[:, None], mask=mask_n[None, :] & (k[:, None] < K), other=0)
        acc = tl.dot(a, b, acc, out_dtype=tl.int32)
    sa = tl.load(sa_ptr + offs_m, mask=mask_m, other=0.0)
    sb = tl.load(sb_ptr + offs_n, mask=mask_n, other=0.0)
    total = acc.to(tl.float32)
    if A_ZERO:
        off = 128.0 - tl.load(za_ptr + offs_m, mask=mask_m, other=0.0)
        b_sum = tl.load(bsum_ptr + offs_n, mask=mask_n, other=0.0)
        total += tl.where(tl.program_id(2) == 0, off[:, None] * b_sum[None, :], 0.0)
    y = total * sa[:, None] * sb[None, :]
    _store_transposed(y_ptr, tl.trans(y), offs_m, offs_n, mask_m, mask_n, stride_ym, partial_ptr, count_ptr, SPLIT_K)


@triton.jit
def _int8_operand(ptrs, mask, A_ZERO: tl.constexpr):
    """An int8 activation tile: int8 values as stored, or (``A_ZERO``) uint8 codes less 128, by an xor (masked
    elements read 128, so they come out 0)."""
    if A_ZERO:
        a = (tl.load(ptrs, mask=mask, other=128) ^ 128).to(tl.int8, bitcast=True)
    else:
        a = tl.load(ptrs, mask=mask, other=0)
    return a


@triton.jit
def _scale_int32_kernel(acc_ptr, sa_ptr, sb_ptr, za_ptr, bsum_ptr, y_ptr, M, N, stride_am, stride_ym, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr, A_ZERO: tl.constexpr):
    """``y = (acc + (128 - za)[:, None] * b_sum[None, :]) * sa[:, None] * sb[None, :]`` in y's dtype (``A_ZERO``; else
    without the zero-point term): the epilogue of the cuBLAS path."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    acc = tl.load(acc_ptr + offs_m[:, None] * stride_am + offs_n[None, :], mask=mask, other=0)
    sa = tl.load(sa_ptr + offs_m, mask=offs_m < M, other=0.0)
    sb = tl.load(sb_ptr + offs_n, mask=offs_n < N, other=0.0)
    total = acc.to(tl.float32)
    if A_ZERO:
        off = 128.0 - tl.load(za_ptr + offs_m, mask=offs_m < M, other=0.0)
        total += off[:, None] * tl.load(bsum_ptr + offs_n, mask=offs_n < N, other=0.0)[None, :]
    y = total * sa[:, None] * sb[None, :]
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


INT8_PATHS = ("triton", "cublas")
INT8_CUBLAS_MIN_M = 17  # cuBLAS int8 (torch._int_mm) from this many rows (its CUDA kernel asked for more than 16)


def int8_path(m: int, k: int, n: int, device: torch.device) -> str:
    """``cublas`` (cuBLASLt's int8 GEMM, then a scaling kernel) on an Ampere or later GPU from
    :data:`INT8_CUBLAS_MIN_M` rows where K and N are multiples of 8 (its alignment); else ``triton`` (split-K for
    few rows)."""
    aligned = k % 8 == 0 and n % 8 == 0
    gpu = device.type == "cuda" and not before_ampere(device)
    return "cublas" if gpu and m >= INT8_CUBLAS_MIN_M and aligned else "triton"


def int8_config(m: int, n: int, k: int, device: torch.device) -> dict:
    """Tiles and K splits of the Triton kernel: 16-row tiles and splits for about two programs per SM for a few
    rows (a GEMV-like grid), 64 x 64 tiles above (untuned)."""
    if m <= 16:
        block_n, block_k = 64, 128
        tiles = triton.cdiv(n, block_n)
        sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
        split = max(1, min(8, triton.cdiv(2 * sms, tiles), triton.cdiv(k, 4 * block_k)))
        return dict(BLOCK_M=16, BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split)
    return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, SPLIT_K=1)


def int8_matmul(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
                out_dtype: torch.dtype = torch.float16, out: torch.Tensor | None = None, path: str = "auto",
                a_zero: torch.Tensor | None = None, b_sum: torch.Tensor | None = None) -> torch.Tensor:
    """``((a [M, K] - a_zero[:, None]) * a_scale[:, None]) @ (b [N, K] int8 * b_scale[:, None])^T`` with int32
    accumulation, on the path :func:`int8_path` picks (or the one named: ``triton`` or ``cublas``). ``a`` is int8
    (symmetric activations), or uint8 codes with their zero points ``a_zero`` (asymmetric): the matmul reads them
    as ``code - 128`` (int8) and adds ``(128 - a_zero) * b_sum`` in the epilogue, ``b_sum`` the weight rows' code
    sums (computed once, with the weight)."""
    m, k = a.shape
    n = b.shape[0]
    a_dtype = torch.int8 if a_zero is None else torch.uint8
    if a.dtype != a_dtype or b.dtype != torch.int8 or b.shape[1] != k:
        raise ValueError(f"need {a_dtype} a [M, K] ({'with' if a_zero is not None else 'without'} a_zero) and int8 b [N, K]; got "
                         f"{a.dtype} {tuple(a.shape)} and {b.dtype} {tuple(b.shape)}")
    if path == "auto":
        path = int8_path(m, k, n, a.device)
    if path not in INT8_PATHS:
        raise ValueError(f"path={path!r} is not valid; choose 'auto' or one of {list(INT8_PATHS)}")
    if (a_zero is None) != (b_sum is None):
        raise ValueError("a_zero and b_sum go together (the zero points' term is (128 - a_zero) * b_sum)")
    y = out if out is not None else torch.empty((m, n), device=a.device, dtype=out_dtype)
    sa, sb = a_scale.float().contiguous(), b_scale.float().contiguous()
    asymmetric = a_zero is not None
    za, b_sum = (a_zero.float().contiguous(), b_sum.float().contiguous()) if asymmetric else (sa, sb)
    if path == "cublas":
        acc = torch._int_mm((a ^ 128).view(torch.int8) if asymmetric else a, b.t())
        grid = (triton.cdiv(m, 32), triton.cdiv(n, 128))
        _scale_int32_kernel[grid](acc, sa, sb, za, b_sum, y, m, n, acc.stride(0), y.stride(0), BLOCK_M=32, BLOCK_N=128, A_ZERO=asymmetric)
        return y
    config = int8_config(m, n, k, a.device)
    grid = (triton.cdiv(m, config["BLOCK_M"]), triton.cdiv(n, config["BLOCK_N"]), config["SPLIT_K"])
    _int8_gemm_kernel[grid](a, b, sa, sb, za, b_sum, y, *split_buffers(y, grid, config["BLOCK_M"] * config["BLOCK_N"]), m, n, k,
                            a.stride(0), b.stride(0), y.stride(0), A_ZERO=asymmetric, **config)
    return y


def int8_matmul_reference(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor) -> torch.Tensor:
    return (a.double() @ b.double().t()) * a_scale.double()[:, None] * b_scale.double()[None, :]


# ----------------------------------------------------------------------------- W4A8


@triton.jit
def _w4a8_kernel(
    a_ptr, sa_ptr, w_ptr, hi_ptr, scale_ptr, zero_ptr, za_ptr, wsum_ptr, y_ptr,
    M, N, K, n_chunks, n_groups, stride_sn, stride_sg, group_size, zero_const, stride_am, stride_wn, stride_ym,
    SLOTS: tl.constexpr, RUN: tl.constexpr, HAS_ZERO: tl.constexpr, SUB: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, A_ZERO: tl.constexpr,
):
    """``y^T = W a^T`` in int32 per step (one group), scaled per group into an fp32 accumulator; ``A_ZERO``: uint8
    activation codes read as ``code - 128`` and ``(128 - zero)`` times the dequantized weight row's sum added."""
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    BLOCK_K: tl.constexpr = SUB * RUN
    STEPS_PER_CHUNK: tl.constexpr = SLOTS // SUB
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, RUN)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for step in range(0, n_chunks * STEPS_PER_CHUNK):
        chunk = step // STEPS_PER_CHUNK
        first = (step % STEPS_PER_CHUNK) * SUB
        words, high = _load_chunk(w_ptr, hi_ptr, offs_n, offs_r, mask_n, chunk, stride_wn, stride_wn, "uint4", RUN)
        codes = _codes_of_slots(words, high, first + tl.arange(0, SUB), "uint4", 4)
        k = chunk * (SLOTS * RUN) + first * RUN + offs_k
        group = tl.minimum((chunk * (SLOTS * RUN) + first * RUN) // group_size, n_groups - 1)
        scale = tl.load(scale_ptr + offs_n * stride_sn + group * stride_sg, mask=mask_n, other=0.0).to(tl.float32)
        if HAS_ZERO:
            zero = tl.load(zero_ptr + offs_n * stride_sn + group * stride_sg, mask=mask_n, other=0.0).to(tl.int32)
        else:
            zero = tl.zeros_like(offs_n) + zero_const
        w = tl.reshape((codes - zero[:, None, None]).to(tl.int8), (BLOCK_N, BLOCK_K))
        a_t = _int8_operand(a_ptr + offs_m[None, :] * stride_am + k[:, None], mask_m[None, :] & (k[:, None] < K), A_ZERO)
        acc += tl.dot(w, a_t, out_dtype=tl.int32).to(tl.float32) * scale[:, None]
    sa = tl.load(sa_ptr + offs_m, mask=mask_m, other=0.0)
    if A_ZERO:
        off = 128.0 - tl.load(za_ptr + offs_m, mask=mask_m, other=0.0)
        acc += tl.load(wsum_ptr + offs_n, mask=mask_n, other=0.0)[:, None] * off[None, :]
    y = acc * sa[None, :]
    tl.store(y_ptr + offs_m[None, :] * stride_ym + offs_n[:, None], y.to(y_ptr.dtype.element_ty), mask=mask_n[:, None] & mask_m[None, :])


def w4a8_sub_slots(pw: PackedWeight) -> int:
    """Slots a W4A8 step takes (one group's K range, at least 16 codes); a ValueError naming why the weight does
    not fit the kernel."""
    if pw.layout != "uint4":
        raise ValueError(f"w4a8 takes the uint4 layout, got {pw.layout}")
    sub = gemm_sub_slots(pw, min(128, pw.group_size))
    if sub * pw.run < 16 or pw.group_size % (sub * pw.run):
        raise ValueError(f"w4a8 needs steps of >= 16 codes inside one group (run {pw.run}, group {pw.group_size})")
    if pw.zero_const != int(pw.zero_const):
        raise ValueError(f"w4a8 needs integer zero points, got {pw.zero_const}")
    return sub


def w4a8_matmul(a: torch.Tensor, a_scale: torch.Tensor, pw: PackedWeight, out_dtype: torch.dtype = torch.float16,
                block_n: int = 64, block_m: int = 32, a_zero: torch.Tensor | None = None, w_sum: torch.Tensor | None = None) -> torch.Tensor:
    """8-bit activations ``a [M, K]`` (scale per token: int8 values, or uint8 codes with zero points ``a_zero``, then
    ``w_sum``, the dequantized weight rows' sums, takes the zero points' term as in :func:`int8_matmul`) times a
    ``uint4`` packed weight with integer zeros."""
    sub = w4a8_sub_slots(pw)
    if (a_zero is None) != (w_sum is None):
        raise ValueError("a_zero and w_sum go together (the zero points' term is (128 - a_zero) * w_sum)")
    if a.dtype != (torch.int8 if a_zero is None else torch.uint8):
        raise ValueError(f"w4a8 takes int8 activations, or uint8 codes with a_zero; got {a.dtype} ({'with' if a_zero is not None else 'without'} a_zero)")
    m = a.shape[0]
    y = torch.empty((m, pw.n), device=a.device, dtype=out_dtype)
    _, _, scale, zero = kernel_tensors(pw)
    sa = a_scale.float().contiguous()
    za, w_sum = (a_zero.float().contiguous(), w_sum.float().contiguous()) if a_zero is not None else (sa, sa)
    grid = (triton.cdiv(pw.n, block_n), triton.cdiv(m, block_m))
    _w4a8_kernel[grid](
        a, sa, pw.words, pw.words, scale, zero, za, w_sum, y,
        m, pw.n, pw.k, pw.words.shape[1] // pw.run, pw.n_groups, *pw.scale.stride(), pw.group_size, int(pw.zero_const),
        a.stride(0), pw.words.stride(0), y.stride(0),
        SLOTS=pw.slots, RUN=pw.run, HAS_ZERO=pw.zero is not None, SUB=sub, BLOCK_M=block_m, BLOCK_N=block_n, A_ZERO=a_zero is not None,
    )
    return y


def w4a8_reference(a: torch.Tensor, a_scale: torch.Tensor, pw: PackedWeight) -> torch.Tensor:
    from qkernels.pack import dequantize_packed

    w = dequantize_packed(pw, torch.float64)
    return (a.double() * a_scale.double()[:, None]) @ w.t()


# ----------------------------------------------------------------------------- bit-plane WpAq


@dataclass
class BitplaneWeight:
    """p binary planes of unsigned weight codes (each in the ``uint1`` layout), per-channel scale and
    zero point, and each row's code sum (for removing the activations' zero point)."""

    planes: torch.Tensor  # int32 [bits, n, k_pad / 32]
    scale: torch.Tensor  # fp32 [n]
    zero: torch.Tensor  # fp32 [n]
    code_sum: torch.Tensor  # fp32 [n]
    bits: int
    n: int
    k: int
    run: int


def pack_bitplanes(codes: torch.Tensor, bits: int, scale: torch.Tensor, zero: torch.Tensor, run: int = 16) -> BitplaneWeight:
    """Split unsigned ``codes [n, k]`` (< 2**bits) into ``bits`` packed binary planes."""
    n, k = codes.shape
    if codes.min() < 0 or codes.max() >= 2**bits:
        raise ValueError(f"codes must lie in 0..{2**bits - 1}")
    padded = torch.nn.functional.pad(codes.to(torch.int64), (0, padded_width(k, 32 * run) - k))
    planes = torch.stack([pack_uint((padded >> i) & 1, 1, run) for i in range(bits)])
    return BitplaneWeight(planes.contiguous(), scale.float(), zero.float(), codes.sum(dim=1).float(), bits, n, k, run)


@triton.jit
def _bitplane_kernel(
    a_ptr, w_ptr, y_ptr, sa_ptr, za_ptr, sw_ptr, zw_ptr, wsum_ptr, M, N, K, n_chunks, stride_am, stride_wp, stride_wn, stride_ym,
    W_BITS: tl.constexpr, A_BITS: tl.constexpr, A_DIGIT: tl.constexpr, RUN: tl.constexpr, SUB: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SCALED: tl.constexpr,
):
    """Integer ``W A^T`` as ``sum_ij 2^(i + D j) W_i A_j^T`` over the weight's binary planes ``W_i`` and the
    activations' ``D``-bit digits ``A_j`` (``D = A_DIGIT``; 1: binary planes too), each an int8 tensor-core dot.
    ``SCALED``: the zero points and scales applied in float64 in the epilogue (the activations' code sums are
    counted on the way), the output in y's dtype; else the int32 sums."""
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    BLOCK_K: tl.constexpr = SUB * RUN
    STEPS_PER_CHUNK: tl.constexpr = 32 // SUB
    DIGITS: tl.constexpr = (A_BITS + A_DIGIT - 1) // A_DIGIT
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, RUN)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.int32)
    a_sum = tl.zeros((BLOCK_M,), dtype=tl.int32)
    for step in range(0, n_chunks * STEPS_PER_CHUNK):
        chunk = step // STEPS_PER_CHUNK
        first = (step % STEPS_PER_CHUNK) * SUB
        k = chunk * (32 * RUN) + first * RUN + offs_k
        a_codes = tl.load(a_ptr + offs_m[None, :] * stride_am + k[:, None], mask=mask_m[None, :] & (k[:, None] < K), other=0).to(tl.int32)
        a_sum += tl.sum(a_codes, axis=0)
        for i in tl.static_range(W_BITS):
            words, _ = _load_chunk(w_ptr + i * stride_wp, w_ptr, offs_n, offs_r, mask_n, chunk, stride_wn, stride_wn, "uint1", RUN)
            w_plane = tl.reshape(_codes_of_slots(words, words, first + tl.arange(0, SUB), "uint1", 1).to(tl.int8), (BLOCK_N, BLOCK_K))
            for j in tl.static_range(DIGITS):
                a_digit = ((a_codes >> (j * A_DIGIT)) & ((1 << A_DIGIT) - 1)).to(tl.int8)
                acc += tl.dot(w_plane, a_digit, out_dtype=tl.int32) << (i + j * A_DIGIT)
    y = y_ptr + offs_m[None, :] * stride_ym + offs_n[:, None]
    mask = mask_n[:, None] & mask_m[None, :]
    if SCALED:  # (A - za)(W - zw)^T = AW^T - zw * rowsum(A) - za * rowsum(W) + K * za * zw, then the scales
        za = tl.load(za_ptr + offs_m, mask=mask_m, other=0.0).to(tl.float64)
        sa = tl.load(sa_ptr + offs_m, mask=mask_m, other=0.0).to(tl.float64)
        zw = tl.load(zw_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float64)
        sw = tl.load(sw_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float64)
        w_sum = tl.load(wsum_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float64)
        centered = (acc.to(tl.float64) - zw[:, None] * a_sum.to(tl.float64)[None, :] - w_sum[:, None] * za[None, :]
                    + K * (zw[:, None] * za[None, :]))
        tl.store(y, (centered * sw[:, None] * sa[None, :]).to(y_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(y, acc, mask=mask)


def _bitplane_launch(a_codes: torch.Tensor, a_bits: int, bw: BitplaneWeight, y: torch.Tensor, scales: tuple | None, a_digit: int) -> torch.Tensor:
    if a_digit not in range(1, 8):
        raise ValueError(f"a_digit (activation bits a dot takes) must be 1..7 (int8 operands), got {a_digit}")
    capturing = a_codes.is_cuda and torch.cuda.is_current_stream_capturing()  # (the check reads a value back: not in a graph)
    if not capturing and int(a_codes.max()) >= 2**a_bits:
        raise ValueError(f"activation codes must lie in 0..{2**a_bits - 1}")
    m = a_codes.shape[0]
    block_n, block_m = 64, 16 if m <= 16 else 64
    grid = (triton.cdiv(bw.n, block_n), triton.cdiv(m, block_m))
    sa, za = scales if scales is not None else (y, y)
    _bitplane_kernel[grid](
        a_codes, bw.planes, y, sa, za, bw.scale, bw.zero, bw.code_sum, m, bw.n, bw.k, bw.planes.shape[2] // bw.run,
        a_codes.stride(0), bw.planes.stride(0), bw.planes.stride(1), y.stride(0),
        W_BITS=bw.bits, A_BITS=a_bits, A_DIGIT=a_digit, RUN=bw.run, SUB=min(128 // bw.run if bw.run <= 128 else 1, 32),
        BLOCK_M=block_m, BLOCK_N=block_n, SCALED=scales is not None,
    )
    return y


A_DIGIT = 7  # activation bits a dot takes by default: int8 tensor cores multiply 7-bit digits as fast as bits


def bitplane_int_matmul(a_codes: torch.Tensor, a_bits: int, bw: BitplaneWeight, a_digit: int = A_DIGIT) -> torch.Tensor:
    """Integer ``a_codes [M, K] @ codes^T`` (int32 ``[M, N]``) from the weight's binary planes and the activations'
    ``a_digit``-bit digits (``a_digit=1``: ABQ-LLM's binary planes of both operands)."""
    y = torch.empty((a_codes.shape[0], bw.n), device=a_codes.device, dtype=torch.int32)
    return _bitplane_launch(a_codes, a_bits, bw, y, None, a_digit)


def bitplane_matmul(a_codes: torch.Tensor, a_bits: int, a_scale: torch.Tensor, a_zero: torch.Tensor, bw: BitplaneWeight,
                    out_dtype: torch.dtype = torch.float16, a_digit: int = A_DIGIT) -> torch.Tensor:
    """``((A - za) * sa) @ ((W - zw) * sw)^T`` for per-token (A) and per-channel (W) scales and zero points, the
    zero points and scales applied in float64 in the kernel's epilogue."""
    y = torch.empty((a_codes.shape[0], bw.n), device=a_codes.device, dtype=out_dtype)
    return _bitplane_launch(a_codes, a_bits, bw, y, (a_scale.float().contiguous(), a_zero.float().contiguous()), a_digit)


def bitplane_reference(a_codes: torch.Tensor, a_scale: torch.Tensor, a_zero: torch.Tensor, w_codes: torch.Tensor, bw: BitplaneWeight) -> torch.Tensor:
    a = (a_codes.double() - a_zero.double()[:, None]) * a_scale.double()[:, None]
    w = (w_codes.double() - bw.zero.double()[:, None]) * bw.scale.double()[:, None]
    return a @ w.t()

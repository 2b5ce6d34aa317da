"""Matmuls for activation-quantized methods: W8A8 INT8, W4A8, and ABQ-style bit-plane WpAq.

* **W8A8**: int8 activations (one scale per token) times int8 weights (one scale per output
  channel), int32 accumulation on tensor cores, scales applied once in the epilogue: a Triton kernel
  (16-row tiles and K splits for a few rows), from 17 rows cuBLASLt's int8 GEMM (``torch._int_mm``) and a
  scaling kernel. H200 (session 18, 8192^2, steady state, x cuBLAS fp16): Triton split-K 1.77x at batch 1, 1.62x at
  16 rows; cuBLAS int8 1.52x at 64 rows, 1.16x at 256, 1.14x at 1024.
* **W4A8**: packed 4-bit weights (:mod:`qkernels.pack` ``uint4``, per-group scales, integer zero
  points) times int8 activations. Each step takes a K range inside one weight group, so
  ``code - zero`` is an exact int8 operand and the group's scale multiplies the int32 partial sum; 16-row
  tiles with K splits for a few rows.
* **Bit-plane WpAq** (ABQ-LLM): p-bit weight codes and q-bit activation codes are split into binary
  planes, ``W = sum_i 2^i W_i`` and ``A = sum_j 2^j A_j``; the integer product is
  ``sum_ij 2^(i+j) A_j W_i^T``, a sum of binary matmuls combined with shifts, so any (p, q) pair runs
  on one kernel. ABQ runs the binary matmuls on 1-bit tensor cores (``mma ... .b1.and.popc``), which
  Triton cannot emit (and Hopper does not speed up); here each is an int8 tensor-core dot, where a 0/1
  operand costs what a 7-bit one does, so by default both operands go in 7-bit digits (the weight's planes
  shifted and added in registers: one dot a step up to 7 bits each, the planes stay the storage) and
  ``w_digit=a_digit=1`` runs ABQ's ``p * q`` binary-by-binary dots. Zero points are removed in the epilogue
  (float64) with row and column code sums: ``(A - za)(W - zw)^T = AW^T - zw*rowsum(A) - za*rowsum(W) + K*za*zw``,
  each K split's over its own K range.

Bit-plane (and W4A8 where it does not take ``lowbit``) take ``dequant`` on a GPU from :data:`ACT_DEQUANT_MIN_M` rows
(:func:`int_act_path`): both operands dequantized into the output's dtype, then cuBLAS; the same product as the
fake-quant model's in that dtype. W4A8 with fp16/bf16 outputs on a GPU takes ``lowbit`` (:func:`w4a8_path`): its
int8 tokens dequantized onto the weight-only W4 kernels, faster than its int kernel at every batch measured.

Each kernel has a plain-torch reference (``*_reference``) computed exactly in float64.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from qkernels.lowbit_matmul import (_codes_of_slots, _load_chunk, _split_range, _store_transposed, before_ampere, gemm_sub_slots, kernel_tensors,
                                    dequantize, lowbit_matmul, split_buffers)
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


def few_rows_split(n: int, k: int, block_n: int, block_k: int, device: torch.device, per_sm: int = 2) -> int:
    """K splits for a few rows (one 16-row tile): about ``per_sm`` programs per SM (a GEMV-like grid), at most 8, and
    at least 4 steps of ``block_k`` a split."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    return max(1, min(8, triton.cdiv(per_sm * sms, triton.cdiv(n, block_n)), triton.cdiv(k, 4 * block_k)))


def int8_config(m: int, n: int, k: int, device: torch.device) -> dict:
    """Tiles and K splits of the Triton kernel: 16-row tiles and :func:`few_rows_split` splits for a few rows,
    64 x 64 tiles above (untuned)."""
    if m <= 16:
        return dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, SPLIT_K=few_rows_split(n, k, 64, 128, device))
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
    partial_ptr, count_ptr, M, N, K, n_chunks, n_groups, stride_sn, stride_sg, group_size, zero_const, stride_am, stride_wn,
    stride_ym, SLOTS: tl.constexpr, RUN: tl.constexpr, HAS_ZERO: tl.constexpr, SUB: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, A_ZERO: tl.constexpr, SPLIT_K: tl.constexpr,
):
    """``y^T = W a^T`` in int32 per step (one group), scaled per group into an fp32 accumulator, over one K split
    (program axis 2; the splits' partials added as in :mod:`qkernels.lowbit_matmul`); ``A_ZERO``: uint8 activation
    codes read as ``code - 128`` and ``(128 - zero)`` times the dequantized weight row's sum added by the first split."""
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
    first_step, last_step = _split_range(n_chunks * STEPS_PER_CHUNK, SPLIT_K)
    for step in range(first_step, last_step):
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
        w_sum = tl.load(wsum_ptr + offs_n, mask=mask_n, other=0.0)
        acc += tl.where(tl.program_id(2) == 0, w_sum[:, None] * off[None, :], 0.0)
    _store_transposed(y_ptr, acc * sa[None, :], offs_m, offs_n, mask_m, mask_n, stride_ym, partial_ptr, count_ptr, SPLIT_K)


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


INT_ACT_PATHS = ("triton", "dequant")
ACT_DEQUANT_MIN_M = 65  # W4A8 and bit-plane: dequantize + cuBLAS from this many rows on a GPU


def int_act_path(m: int, device: torch.device) -> str:
    """The W4A8 and bit-plane matmuls' path: their Triton kernel (16-row tiles with K splits for a few rows), or on a
    GPU from :data:`ACT_DEQUANT_MIN_M` rows ``dequant``: both operands dequantized into the output's dtype, then
    cuBLAS (Hopper has no int4 tensor cores, and these kernels' int8 dots are per group or per bit plane)."""
    return "dequant" if device.type == "cuda" and m >= ACT_DEQUANT_MIN_M else "triton"


W4A8_PATHS = ("triton", "lowbit", "dequant")


def w4a8_path(m: int, device: torch.device, out_dtype: torch.dtype = torch.float16) -> str:
    """``lowbit`` on a GPU for fp16/bf16 outputs: the tokens dequantized (the int8 codes times their scale, the
    fake-quant model's activations in that dtype), then the weight-only kernels of
    :func:`~qkernels.lowbit_matmul.lowbit_matmul` on the same packed weight. H200, 8192^2, steady state (session 18):
    19.8 / 27.4 / 38.3 / 73.0 us at 1 / 16 / 64 / 256 rows, the int kernel 44.0 / 43.7 / 94.5 / 360.9, dequant +
    cuBLAS 98.8 / 96.3 / 100.0 / 117.1. Else :func:`int_act_path`."""
    half = out_dtype in (torch.float16, torch.bfloat16)
    return "lowbit" if device.type == "cuda" and half else int_act_path(m, device)


def _chosen(path: str, auto: str, choices: tuple[str, ...]) -> str:
    if path == "auto":
        return auto
    if path not in choices:
        raise ValueError(f"path={path!r} is not valid; choose 'auto' or one of {list(choices)}")
    return path


def dequantize_tokens(a: torch.Tensor, a_scale: torch.Tensor, a_zero: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """``(code - zero) * scale`` per token in ``dtype`` (int8 values: no zero point)."""
    values = a.float() if a_zero is None else a.float() - a_zero.float()[:, None]
    return (values * a_scale.float()[:, None]).to(dtype)


def _math_dtype(out_dtype: torch.dtype) -> torch.dtype:
    """The dequant path's operands: the output's dtype where cuBLAS takes it half-precision, else fp32."""
    return out_dtype if out_dtype in (torch.float16, torch.bfloat16) else torch.float32


def w4a8_config(m: int, pw: PackedWeight, sub: int, device: torch.device) -> dict:
    """Tiles and K splits: 16 x 32 tiles and :func:`few_rows_split` splits for about four programs per SM for up to
    16 rows, 32 x 64 tiles above. H200, 8192^2 at 1 and 16 rows (session 18, cold): 47 us with 4 splits on 32-wide
    tiles against 52-57 on 64-wide ones, 71-94 on 8 warps."""
    if m <= 16:
        return dict(BLOCK_M=16, BLOCK_N=32, SPLIT_K=few_rows_split(pw.n, pw.k, 32, sub * pw.run, device, per_sm=4))
    return dict(BLOCK_M=32, BLOCK_N=64, SPLIT_K=1)


def w4a8_matmul(a: torch.Tensor, a_scale: torch.Tensor, pw: PackedWeight, out_dtype: torch.dtype = torch.float16,
                a_zero: torch.Tensor | None = None, w_sum: torch.Tensor | None = None, path: str = "auto",
                config: dict | None = None) -> torch.Tensor:
    """8-bit activations ``a [M, K]`` (scale per token: int8 values, or uint8 codes with zero points ``a_zero``, then
    ``w_sum``, the dequantized weight rows' sums, takes the zero points' term as in :func:`int8_matmul`) times a
    ``uint4`` packed weight with integer zeros, on the path :func:`w4a8_path` picks (or the one named).
    ``config``: the Triton kernel's ``BLOCK_M``, ``BLOCK_N``, ``SPLIT_K`` (default :func:`w4a8_config`)."""
    sub = w4a8_sub_slots(pw)
    if (a_zero is None) != (w_sum is None):
        raise ValueError("a_zero and w_sum go together (the zero points' term is (128 - a_zero) * w_sum)")
    if a.dtype != (torch.int8 if a_zero is None else torch.uint8):
        raise ValueError(f"w4a8 takes int8 activations, or uint8 codes with a_zero; got {a.dtype} ({'with' if a_zero is not None else 'without'} a_zero)")
    m = a.shape[0]
    route = _chosen(path, w4a8_path(m, a.device, out_dtype), W4A8_PATHS)
    if route == "lowbit":
        if out_dtype not in (torch.float16, torch.bfloat16):
            raise ValueError(f"path='lowbit' (the weight-only kernels) gives fp16 or bf16, not {out_dtype}")
        return lowbit_matmul(dequantize_tokens(a, a_scale, a_zero, out_dtype), pw)
    if route == "dequant":
        dtype = _math_dtype(out_dtype)
        return (dequantize_tokens(a, a_scale, a_zero, dtype) @ dequantize(pw, dtype).t()).to(out_dtype)
    config = config or w4a8_config(m, pw, sub, a.device)
    y = torch.empty((m, pw.n), device=a.device, dtype=out_dtype)
    _, _, scale, zero = kernel_tensors(pw)
    sa = a_scale.float().contiguous()
    za, w_sum = (a_zero.float().contiguous(), w_sum.float().contiguous()) if a_zero is not None else (sa, sa)
    grid = (triton.cdiv(pw.n, config["BLOCK_N"]), triton.cdiv(m, config["BLOCK_M"]), config["SPLIT_K"])
    _w4a8_kernel[grid](
        a, sa, pw.words, pw.words, scale, zero, za, w_sum, y, *split_buffers(y, grid, config["BLOCK_M"] * config["BLOCK_N"]),
        m, pw.n, pw.k, pw.words.shape[1] // pw.run, pw.n_groups, *pw.scale.stride(), pw.group_size, int(pw.zero_const),
        a.stride(0), pw.words.stride(0), y.stride(0),
        SLOTS=pw.slots, RUN=pw.run, HAS_ZERO=pw.zero is not None, SUB=sub, A_ZERO=a_zero is not None, **config,
    )
    return y


def w4a8_reference(a: torch.Tensor, a_scale: torch.Tensor, pw: PackedWeight) -> torch.Tensor:
    from qkernels.pack import dequantize_packed

    w = dequantize_packed(pw, torch.float64)
    return (a.double() * a_scale.double()[:, None]) @ w.t()


# ----------------------------------------------------------------------------- bit-plane WpAq


@dataclass
class BitplaneWeight:
    """p binary planes of unsigned weight codes (each in the ``uint1`` layout), per-channel scale and zero point."""

    planes: torch.Tensor  # int32 [bits, n, k_pad / 32]
    scale: torch.Tensor  # fp32 [n]
    zero: torch.Tensor  # fp32 [n]
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
    return BitplaneWeight(planes.contiguous(), scale.float(), zero.float(), bits, n, k, run)


@triton.jit
def _bitplane_kernel(
    a_ptr, w_ptr, y_ptr, sa_ptr, za_ptr, sw_ptr, zw_ptr, partial_ptr, count_ptr, M, N, K, n_chunks, stride_am, stride_wp,
    stride_wn, stride_ym, W_BITS: tl.constexpr, A_BITS: tl.constexpr, W_DIGIT: tl.constexpr, A_DIGIT: tl.constexpr, RUN: tl.constexpr,
    SUB: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SCALED: tl.constexpr, SPLIT_K: tl.constexpr,
):
    """Integer ``W A^T`` as ``sum_ij 2^(E i + D j) W_i A_j^T`` over the weight's ``E``-bit digits ``W_i`` (``E =
    W_DIGIT``, each the sum of its binary planes shifted into place) and the activations' ``D``-bit digits ``A_j``
    (``D = A_DIGIT``; ``E = D = 1``: ABQ's binary-by-binary matmuls), each an int8 tensor-core dot.
    ``SCALED``: the zero points and scales applied in float64 in the epilogue (both operands' code sums are
    counted on the way), the output in y's dtype; else the int32 sums. Over one K split (program axis 2; only
    ``SCALED``): the centred operands' partial product over the split's own K range (not a large uncentred sum whose
    fp32 partials would cancel), the splits' partials added as in :mod:`qkernels.lowbit_matmul`."""
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    BLOCK_K: tl.constexpr = SUB * RUN
    STEPS_PER_CHUNK: tl.constexpr = 32 // SUB
    DIGITS: tl.constexpr = (A_BITS + A_DIGIT - 1) // A_DIGIT
    W_DIGITS: tl.constexpr = (W_BITS + W_DIGIT - 1) // W_DIGIT
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, RUN)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.int32)
    a_sum = tl.zeros((BLOCK_M,), dtype=tl.int32)
    w_sum = tl.zeros((BLOCK_N,), dtype=tl.int32)
    first_step, last_step = _split_range(n_chunks * STEPS_PER_CHUNK, SPLIT_K)
    for step in range(first_step, last_step):
        chunk = step // STEPS_PER_CHUNK
        first = (step % STEPS_PER_CHUNK) * SUB
        k = chunk * (32 * RUN) + first * RUN + offs_k
        a_codes = tl.load(a_ptr + offs_m[None, :] * stride_am + k[:, None], mask=mask_m[None, :] & (k[:, None] < K), other=0).to(tl.int32)
        a_sum += tl.sum(a_codes, axis=0)
        for d in tl.static_range(W_DIGITS):
            w_codes = tl.zeros((BLOCK_N, SUB, RUN), dtype=tl.int32)
            for b in tl.static_range(W_DIGIT):
                if d * W_DIGIT + b < W_BITS:  # plane d * W_DIGIT + b, bit b of the digit
                    words, _ = _load_chunk(w_ptr + (d * W_DIGIT + b) * stride_wp, w_ptr, offs_n, offs_r, mask_n, chunk, stride_wn, stride_wn,
                                           "uint1", RUN)
                    w_codes += _codes_of_slots(words, words, first + tl.arange(0, SUB), "uint1", 1) << b
            w_digit = tl.reshape(w_codes, (BLOCK_N, BLOCK_K))
            if SCALED:  # (partial sums by word position, [BLOCK_N, RUN], reduced once after the loop: 3.4x as slow, H200)
                w_sum += tl.sum(w_digit, axis=1) << (d * W_DIGIT)
            w_digit = w_digit.to(tl.int8)
            for j in tl.static_range(DIGITS):
                a_digit = ((a_codes >> (j * A_DIGIT)) & ((1 << A_DIGIT) - 1)).to(tl.int8)
                acc += tl.dot(w_digit, a_digit, out_dtype=tl.int32) << (d * W_DIGIT + j * A_DIGIT)
    if SCALED:  # over the split's k: (A - za)(W - zw)^T = AW^T - zw * rowsum(A) - za * rowsum(W) + k_here * za * zw
        za = tl.load(za_ptr + offs_m, mask=mask_m, other=0.0).to(tl.float64)
        sa = tl.load(sa_ptr + offs_m, mask=mask_m, other=0.0).to(tl.float64)
        zw = tl.load(zw_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float64)
        sw = tl.load(sw_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float64)
        k_here = tl.maximum(tl.minimum(last_step * BLOCK_K, K) - first_step * BLOCK_K, 0).to(tl.float64)
        centered = (acc.to(tl.float64) - zw[:, None] * a_sum.to(tl.float64)[None, :] - w_sum.to(tl.float64)[:, None] * za[None, :]
                    + k_here * (zw[:, None] * za[None, :]))
        y = centered * sw[:, None] * sa[None, :]
        if SPLIT_K > 1:
            y = y.to(tl.float32)
        _store_transposed(y_ptr, y, offs_m, offs_n, mask_m, mask_n, stride_ym, partial_ptr, count_ptr, SPLIT_K)
    else:
        _store_transposed(y_ptr, acc, offs_m, offs_n, mask_m, mask_n, stride_ym, partial_ptr, count_ptr, 1)


@triton.jit
def _bitplane_dequant_kernel(w_ptr, sw_ptr, zw_ptr, out_ptr, N, K, stride_wp, stride_wn, W_BITS: tl.constexpr, RUN: tl.constexpr,
                             BLOCK_N: tl.constexpr):
    """One chunk (32 slots of ``RUN`` words) of ``BLOCK_N`` rows: the planes' bits summed into codes, then
    ``(code - zw) * sw`` in out's dtype."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    chunk = tl.program_id(1)
    offs_r = tl.arange(0, RUN)
    mask_n = offs_n < N
    zw = tl.load(zw_ptr + offs_n, mask=mask_n, other=0.0)
    sw = tl.load(sw_ptr + offs_n, mask=mask_n, other=0.0)
    for slot in tl.static_range(32):
        codes = tl.zeros((BLOCK_N, RUN), dtype=tl.int32)
        for i in tl.static_range(W_BITS):
            words, _ = _load_chunk(w_ptr + i * stride_wp, w_ptr, offs_n, offs_r, mask_n, chunk, stride_wn, stride_wn, "uint1", RUN)
            codes += ((words >> slot) & 1) << i
        k = chunk * (32 * RUN) + slot * RUN + offs_r
        w = (codes.to(tl.float32) - zw[:, None]) * sw[:, None]
        tl.store(out_ptr + offs_n[:, None] * K + k[None, :], w.to(out_ptr.dtype.element_ty), mask=mask_n[:, None] & (k[None, :] < K))


def bitplane_dequantize(bw: BitplaneWeight, dtype: torch.dtype = torch.float16, block_n: int = 16) -> torch.Tensor:
    """The weight ``(code - zw) * sw`` ``[N, K]`` in ``dtype``, from its bit planes (a Triton kernel)."""
    out = torch.empty((bw.n, bw.k), device=bw.planes.device, dtype=dtype)
    grid = (triton.cdiv(bw.n, block_n), bw.planes.shape[2] // bw.run)
    _bitplane_dequant_kernel[grid](bw.planes, bw.scale, bw.zero, out, bw.n, bw.k, bw.planes.stride(0), bw.planes.stride(1),
                                   W_BITS=bw.bits, RUN=bw.run, BLOCK_N=block_n)
    return out


def _check_codes(a_codes: torch.Tensor, a_bits: int, w_digit: int, a_digit: int) -> None:
    for name, digit in (("w_digit", w_digit), ("a_digit", a_digit)):
        if digit not in range(1, 8):
            raise ValueError(f"{name} (bits of an operand a dot takes) must be 1..7 (int8 operands), got {digit}")
    capturing = a_codes.is_cuda and torch.cuda.is_current_stream_capturing()  # (the check reads a value back: not in a graph)
    if not capturing and int(a_codes.max()) >= 2**a_bits:
        raise ValueError(f"activation codes must lie in 0..{2**a_bits - 1}")


def bitplane_config(m: int, bw: BitplaneWeight, device: torch.device, split: bool) -> dict:
    """64-wide weight tiles; 16-row tiles and (``split``: a scaled output below float64) :func:`few_rows_split`
    splits for up to 16 rows, 64-row tiles above."""
    sub = min(128 // bw.run if bw.run <= 128 else 1, 32)
    if m <= 16:
        return dict(BLOCK_M=16, BLOCK_N=64, SUB=sub, SPLIT_K=few_rows_split(bw.n, bw.k, 64, sub * bw.run, device) if split else 1)
    return dict(BLOCK_M=64, BLOCK_N=64, SUB=sub, SPLIT_K=1)


def _bitplane_launch(a_codes: torch.Tensor, a_bits: int, bw: BitplaneWeight, y: torch.Tensor, scales: tuple | None, w_digit: int,
                     a_digit: int, config: dict | None = None) -> torch.Tensor:
    m = a_codes.shape[0]
    config = config or bitplane_config(m, bw, a_codes.device, split=scales is not None and y.dtype != torch.float64)
    grid = (triton.cdiv(bw.n, config["BLOCK_N"]), triton.cdiv(m, config["BLOCK_M"]), config["SPLIT_K"])
    sa, za = scales if scales is not None else (y, y)
    _bitplane_kernel[grid](
        a_codes, bw.planes, y, sa, za, bw.scale, bw.zero, *split_buffers(y, grid, config["BLOCK_M"] * config["BLOCK_N"]),
        m, bw.n, bw.k, bw.planes.shape[2] // bw.run, a_codes.stride(0), bw.planes.stride(0), bw.planes.stride(1), y.stride(0),
        W_BITS=bw.bits, A_BITS=a_bits, W_DIGIT=w_digit, A_DIGIT=a_digit, RUN=bw.run, SCALED=scales is not None, **config,
    )
    return y


DIGIT = 7  # bits of an operand a dot takes by default: int8 tensor cores multiply 7-bit digits as fast as bits


def bitplane_int_matmul(a_codes: torch.Tensor, a_bits: int, bw: BitplaneWeight, a_digit: int = DIGIT, w_digit: int = DIGIT) -> torch.Tensor:
    """Integer ``a_codes [M, K] @ codes^T`` (int32 ``[M, N]``) from the weight's binary planes, joined into
    ``w_digit``-bit digits, and the activations' ``a_digit``-bit digits (``w_digit=a_digit=1``: ABQ-LLM's binary
    planes of both operands, ``p * q`` dots a step)."""
    _check_codes(a_codes, a_bits, w_digit, a_digit)
    y = torch.empty((a_codes.shape[0], bw.n), device=a_codes.device, dtype=torch.int32)
    return _bitplane_launch(a_codes, a_bits, bw, y, None, w_digit, a_digit)


def bitplane_matmul(a_codes: torch.Tensor, a_bits: int, a_scale: torch.Tensor, a_zero: torch.Tensor, bw: BitplaneWeight,
                    out_dtype: torch.dtype = torch.float16, a_digit: int = DIGIT, w_digit: int = DIGIT, path: str = "auto",
                    config: dict | None = None) -> torch.Tensor:
    """``((A - za) * sa) @ ((W - zw) * sw)^T`` for per-token (A) and per-channel (W) scales and zero points, on the path
    :func:`int_act_path` picks (or the one named): the bit-plane kernel, the zero points and scales applied in
    float64 in its epilogue, or both operands dequantized (:func:`bitplane_dequantize`) and cuBLAS. ``config``: the
    kernel's ``BLOCK_M``, ``BLOCK_N``, ``SUB``, ``SPLIT_K`` (default :func:`bitplane_config`)."""
    _check_codes(a_codes, a_bits, w_digit, a_digit)
    if _chosen(path, int_act_path(a_codes.shape[0], a_codes.device), INT_ACT_PATHS) == "dequant":
        dtype = _math_dtype(out_dtype)
        return (dequantize_tokens(a_codes, a_scale, a_zero, dtype) @ bitplane_dequantize(bw, dtype).t()).to(out_dtype)
    y = torch.empty((a_codes.shape[0], bw.n), device=a_codes.device, dtype=out_dtype)
    return _bitplane_launch(a_codes, a_bits, bw, y, (a_scale.float().contiguous(), a_zero.float().contiguous()), w_digit, a_digit,
                            config)


def bitplane_reference(a_codes: torch.Tensor, a_scale: torch.Tensor, a_zero: torch.Tensor, w_codes: torch.Tensor, bw: BitplaneWeight) -> torch.Tensor:
    a = (a_codes.double() - a_zero.double()[:, None]) * a_scale.double()[:, None]
    w = (w_codes.double() - bw.zero.double()[:, None]) * bw.scale.double()[:, None]
    return a @ w.t()

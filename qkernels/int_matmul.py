"""Matmuls for activation-quantized methods: W8A8 INT8, W4A8, and ABQ-style bit-plane WpAq.

* **W8A8**: int8 activations (one scale per token) times int8 weights (one scale per output
  channel), int32 accumulation on tensor cores, scales applied once in the epilogue.
* **W4A8**: packed 4-bit weights (:mod:`qkernels.pack` ``uint4``, per-group scales, integer zero
  points) times int8 activations. Each step takes a K range inside one weight group, so
  ``code - zero`` is an exact int8 operand and the group's scale multiplies the int32 partial sum.
* **Bit-plane WpAq** (ABQ-LLM): p-bit weight codes and q-bit activation codes are split into binary
  planes, ``W = sum_i 2^i W_i`` and ``A = sum_j 2^j A_j``; the integer product is
  ``sum_ij 2^(i+j) A_j W_i^T``, a sum of binary matmuls combined with shifts, so any (p, q) pair runs
  on one kernel. ABQ runs the binary matmuls on 1-bit tensor cores (``mma ... .b1.and.popc``), which
  Triton cannot emit; here each binary matmul is an int8 tensor-core dot of 0/1 tiles (exact, not
  faster than int8). Zero points are removed afterwards with row and column code sums:
  ``(A - za)(W - zw)^T = AW^T - zw*rowsum(A) - za*rowsum(W) + K*za*zw``.

Each kernel has a plain-torch reference (``*_reference``) computed exactly in float64.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from qkernels.lowbit_matmul import _codes_of_slots, _load_chunk, gemm_sub_slots, kernel_tensors
from qkernels.pack import PackedWeight, pack_uint, padded_width

INT8_BLOCK = dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=64)


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
    a_ptr, b_ptr, sa_ptr, sb_ptr, y_ptr, M, N, K, stride_am, stride_bn, stride_ym,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + offs_k
        a = tl.load(a_ptr + offs_m[:, None] * stride_am + k[None, :], mask=mask_m[:, None] & (k[None, :] < K), other=0)
        b = tl.load(b_ptr + offs_n[None, :] * stride_bn + k[:, None], mask=mask_n[None, :] & (k[:, None] < K), other=0)
        acc = tl.dot(a, b, acc, out_dtype=tl.int32)
    sa = tl.load(sa_ptr + offs_m, mask=mask_m, other=0.0)
    sb = tl.load(sb_ptr + offs_n, mask=mask_n, other=0.0)
    y = acc.to(tl.float32) * sa[:, None] * sb[None, :]
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], y.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def int8_matmul(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
                out_dtype: torch.dtype = torch.float16, out: torch.Tensor | None = None) -> torch.Tensor:
    """``(a [M, K] int8 * a_scale[:, None]) @ (b [N, K] int8 * b_scale[:, None])^T`` with int32 accumulation."""
    m, k = a.shape
    n = b.shape[0]
    if a.dtype != torch.int8 or b.dtype != torch.int8 or b.shape[1] != k:
        raise ValueError(f"need int8 a [M, K] and b [N, K]; got {a.dtype} {tuple(a.shape)} and {b.dtype} {tuple(b.shape)}")
    y = out if out is not None else torch.empty((m, n), device=a.device, dtype=out_dtype)
    grid = (triton.cdiv(m, INT8_BLOCK["BLOCK_M"]), triton.cdiv(n, INT8_BLOCK["BLOCK_N"]))
    _int8_gemm_kernel[grid](a, b, a_scale.float().contiguous(), b_scale.float().contiguous(), y, m, n, k,
                            a.stride(0), b.stride(0), y.stride(0), **INT8_BLOCK)
    return y


def int8_matmul_reference(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor) -> torch.Tensor:
    return (a.double() @ b.double().t()) * a_scale.double()[:, None] * b_scale.double()[None, :]


# ----------------------------------------------------------------------------- W4A8


@triton.jit
def _w4a8_kernel(
    a_ptr, sa_ptr, w_ptr, hi_ptr, scale_ptr, zero_ptr, y_ptr,
    M, N, K, n_chunks, n_groups, stride_sn, stride_sg, group_size, zero_const, stride_am, stride_wn, stride_ym,
    SLOTS: tl.constexpr, RUN: tl.constexpr, HAS_ZERO: tl.constexpr, SUB: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """``y^T = W a^T`` in int32 per step (one group), scaled per group into an fp32 accumulator."""
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
        a_t = tl.load(a_ptr + offs_m[None, :] * stride_am + k[:, None], mask=mask_m[None, :] & (k[:, None] < K), other=0)
        acc += tl.dot(w, a_t, out_dtype=tl.int32).to(tl.float32) * scale[:, None]
    sa = tl.load(sa_ptr + offs_m, mask=mask_m, other=0.0)
    y = acc * sa[None, :]
    tl.store(y_ptr + offs_m[None, :] * stride_ym + offs_n[:, None], y.to(y_ptr.dtype.element_ty), mask=mask_n[:, None] & mask_m[None, :])


def w4a8_matmul(a: torch.Tensor, a_scale: torch.Tensor, pw: PackedWeight, out_dtype: torch.dtype = torch.float16,
                block_n: int = 64, block_m: int = 32) -> torch.Tensor:
    """int8 activations ``a [M, K]`` (scale per token) times a ``uint4`` packed weight with integer zeros."""
    if pw.layout != "uint4":
        raise ValueError(f"w4a8 takes the uint4 layout, got {pw.layout}")
    sub = gemm_sub_slots(pw, min(128, pw.group_size))
    if sub * pw.run < 16 or pw.group_size % (sub * pw.run):
        raise ValueError(f"w4a8 needs steps of >= 16 codes inside one group (run {pw.run}, group {pw.group_size})")
    if pw.zero_const != int(pw.zero_const):
        raise ValueError(f"w4a8 needs integer zero points, got {pw.zero_const}")
    m = a.shape[0]
    y = torch.empty((m, pw.n), device=a.device, dtype=out_dtype)
    _, _, scale, zero = kernel_tensors(pw)
    grid = (triton.cdiv(pw.n, block_n), triton.cdiv(m, block_m))
    _w4a8_kernel[grid](
        a, a_scale.float().contiguous(), pw.words, pw.words, scale, zero, y,
        m, pw.n, pw.k, pw.words.shape[1] // pw.run, pw.n_groups, *pw.scale.stride(), pw.group_size, int(pw.zero_const),
        a.stride(0), pw.words.stride(0), y.stride(0),
        SLOTS=pw.slots, RUN=pw.run, HAS_ZERO=pw.zero is not None, SUB=sub, BLOCK_M=block_m, BLOCK_N=block_n,
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
    a_ptr, w_ptr, y_ptr, M, N, K, n_chunks, stride_am, stride_wp, stride_wn, stride_ym,
    W_BITS: tl.constexpr, A_BITS: tl.constexpr, RUN: tl.constexpr, SUB: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Integer ``W A^T`` as ``sum_ij 2^(i+j) W_i A_j^T`` over binary planes (0/1 int8 tensor-core dots)."""
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    BLOCK_K: tl.constexpr = SUB * RUN
    STEPS_PER_CHUNK: tl.constexpr = 32 // SUB
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, RUN)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.int32)
    for step in range(0, n_chunks * STEPS_PER_CHUNK):
        chunk = step // STEPS_PER_CHUNK
        first = (step % STEPS_PER_CHUNK) * SUB
        k = chunk * (32 * RUN) + first * RUN + offs_k
        a_codes = tl.load(a_ptr + offs_m[None, :] * stride_am + k[:, None], mask=mask_m[None, :] & (k[:, None] < K), other=0).to(tl.int32)
        for i in tl.static_range(W_BITS):
            words, _ = _load_chunk(w_ptr + i * stride_wp, w_ptr, offs_n, offs_r, mask_n, chunk, stride_wn, stride_wn, "uint1", RUN)
            w_plane = tl.reshape(_codes_of_slots(words, words, first + tl.arange(0, SUB), "uint1", 1).to(tl.int8), (BLOCK_N, BLOCK_K))
            for j in tl.static_range(A_BITS):
                a_plane = ((a_codes >> j) & 1).to(tl.int8)
                acc += tl.dot(w_plane, a_plane, out_dtype=tl.int32) << (i + j)
    tl.store(y_ptr + offs_m[None, :] * stride_ym + offs_n[:, None], acc, mask=mask_n[:, None] & mask_m[None, :])


def bitplane_int_matmul(a_codes: torch.Tensor, a_bits: int, bw: BitplaneWeight, block_n: int = 32, block_m: int = 16) -> torch.Tensor:
    """Integer ``a_codes [M, K] @ codes^T`` (int32 ``[M, N]``) from binary planes of both operands."""
    capturing = a_codes.is_cuda and torch.cuda.is_current_stream_capturing()  # (the check reads a value back: not in a graph)
    if not capturing and int(a_codes.max()) >= 2**a_bits:
        raise ValueError(f"activation codes must lie in 0..{2**a_bits - 1}")
    m = a_codes.shape[0]
    y = torch.empty((m, bw.n), device=a_codes.device, dtype=torch.int32)
    sub = 128 // bw.run if bw.run <= 128 else 1
    grid = (triton.cdiv(bw.n, block_n), triton.cdiv(m, block_m))
    _bitplane_kernel[grid](
        a_codes, bw.planes, y, m, bw.n, bw.k, bw.planes.shape[2] // bw.run,
        a_codes.stride(0), bw.planes.stride(0), bw.planes.stride(1), y.stride(0),
        W_BITS=bw.bits, A_BITS=a_bits, RUN=bw.run, SUB=min(sub, 32), BLOCK_M=block_m, BLOCK_N=block_n,
    )
    return y


def bitplane_matmul(a_codes: torch.Tensor, a_bits: int, a_scale: torch.Tensor, a_zero: torch.Tensor, bw: BitplaneWeight,
                    out_dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """``((A - za) * sa) @ ((W - zw) * sw)^T`` for per-token (A) and per-channel (W) scales and zero points."""
    core = bitplane_int_matmul(a_codes, a_bits, bw).double()
    a_sum = a_codes.double().sum(dim=1, keepdim=True)
    za, zw = a_zero.double()[:, None], bw.zero.double()[None, :]
    centered = core - zw * a_sum - za * bw.code_sum.double()[None, :] + bw.k * za * zw
    return (centered * a_scale.double()[:, None] * bw.scale.double()[None, :]).to(out_dtype)


def bitplane_reference(a_codes: torch.Tensor, a_scale: torch.Tensor, a_zero: torch.Tensor, w_codes: torch.Tensor, bw: BitplaneWeight) -> torch.Tensor:
    a = (a_codes.double() - a_zero.double()[:, None]) * a_scale.double()[:, None]
    w = (w_codes.double() - bw.zero.double()[:, None]) * bw.scale.double()[:, None]
    return a @ w.t()

"""Orthonormal Hadamard matrices and the rotations built from them.

Rotating a weight or activation by an orthonormal Hadamard ``H`` (``H @ H.T = I``) spreads outliers over
all channels before quantization, and the rotation is undone exactly in full precision. Sizes:

* powers of two by Sylvester's construction;
* ``2^k * m`` where ``m`` is a Paley order: Paley I gives ``q + 1`` for a prime ``q = 3 (mod 4)``
  (12, 20, 24, 32, 44, 48, 60, ...), Paley II gives ``2 (q + 1)`` for a prime ``q = 1 (mod 4)``
  (28, 36, 60, 76, ...). This covers the widths of the shipped models (576 = 36 x 16, 640 = 20 x 32,
  1536 = 12 x 128) and of Llama-style models.

``random_hadamard`` multiplies by random signs (the randomized Hadamard of QuaRot); ``rotate_blocks``
applies one rotation per block of the last dimension (the per-block form used with MX/NV formats).
"""

from __future__ import annotations

import functools
import math

import torch

from bench.errors import ConfigError


def _is_prime(q: int) -> bool:
    return q >= 2 and all(q % d for d in range(2, math.isqrt(q) + 1))


def _jacobsthal(q: int) -> torch.Tensor:
    """``Q[i, j] = chi(j - i)`` with ``chi`` the quadratic character of GF(q), q prime."""
    squares = {(x * x) % q for x in range(1, q)}
    chi = torch.tensor([0] + [1 if a in squares else -1 for a in range(1, q)], dtype=torch.float64)
    idx = torch.arange(q)
    return chi[(idx[None, :] - idx[:, None]) % q]


def _paley(order: int) -> torch.Tensor | None:
    """An unnormalized Hadamard matrix of ``order`` from Paley I or II, or None if neither applies."""
    q = order - 1
    if _is_prime(q) and q % 4 == 3:
        s = torch.zeros(order, order, dtype=torch.float64)
        s[0, 1:], s[1:, 0], s[1:, 1:] = 1, -1, _jacobsthal(q)
        return s + torch.eye(order, dtype=torch.float64)
    q = order // 2 - 1
    if order % 2 == 0 and _is_prime(q) and q % 4 == 1:
        c = torch.zeros(q + 1, q + 1, dtype=torch.float64)
        c[0, 1:], c[1:, 0], c[1:, 1:] = 1, 1, _jacobsthal(q)
        zero_block = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
        sign_block = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
        return torch.kron(c, sign_block) + torch.kron((c == 0).double(), zero_block)
    return None


@functools.lru_cache(maxsize=64)
def _hadamard_f64(n: int) -> torch.Tensor:
    if n == 1:
        return torch.ones(1, 1, dtype=torch.float64)
    if n % 2 == 0 and (n & (n - 1)) == 0:
        half = _hadamard_f64(n // 2)
        return torch.cat([torch.cat([half, half], 1), torch.cat([half, -half], 1)], 0)
    base = n
    while base % 2 == 0 and _paley(base) is None:
        base //= 2
    paley = _paley(base)
    if paley is None:
        raise ConfigError(f"no Hadamard matrix of size {n} is known here; sizes are 2^k times 1 or a Paley order (12, 20, 28, 36, ...)")
    return torch.kron(paley, _hadamard_f64(n // base)) if n != base else paley


def hadamard_matrix(n: int, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> torch.Tensor:
    """The orthonormal Hadamard matrix of size ``n`` (entries +-1/sqrt(n))."""
    return (_hadamard_f64(n) / math.sqrt(n)).to(dtype=dtype, device=device)


def random_signs(n: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2, (n,), generator=generator, dtype=torch.float64) * 2 - 1


def random_hadamard(n: int, seed: int = 0, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> torch.Tensor:
    """``diag(s) @ H`` with random signs ``s``: orthonormal, and different outliers for each seed."""
    rotation = random_signs(n, seed)[:, None] * (_hadamard_f64(n) / math.sqrt(n))
    return rotation.to(dtype=dtype, device=device)


def rotate_blocks(x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """Multiply each block of ``rotation.shape[0]`` elements of the last dim of ``x`` by ``rotation``."""
    block = rotation.shape[0]
    if x.shape[-1] % block:
        raise ConfigError(f"Hadamard block {block} does not divide the last dim {x.shape[-1]}")
    blocks = x.reshape(*x.shape[:-1], x.shape[-1] // block, block)
    return (blocks @ rotation.to(dtype=x.dtype, device=x.device)).reshape(x.shape)

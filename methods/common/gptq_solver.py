"""The GPTQ column solver (Frantar et al., 2023): round a weight column by column, and after each column
spread its rounding error over the columns not yet rounded, weighted by the inverse Hessian.

For a layer ``y = W x`` and calibration inputs with ``H = X^T X``, rounding column ``j`` to ``q`` changes the
output error least when the remaining columns move by ``-(w_j - q) / [H^-1]_jj * [H^-1]_j,>j``. With the
upper Cholesky factor of ``H^-1`` these updates are rows of one triangular matrix; they are applied lazily,
``block_size`` columns at a time. Knobs of the paper and its reference code:

* ``damp_percent``: ``lambda = damp_percent * mean(diag H)`` is added to the diagonal;
* ``act_order``: columns are rounded in order of decreasing ``diag H`` (largest activations first);
* ``static_groups``: with groups, every group's scales are taken from the unmodified weight up front, so
  that groups stay contiguous in storage even with ``act_order``; otherwise a group's scales are taken
  when its first column is reached, from the columns as updated so far (with ``act_order`` those groups
  are runs of permuted columns and storage needs a column-to-group index).

Scales come from the weight format (``scales_for``), so the grid is exactly the format's.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch

from methods.common.formats import Format, group_view
from methods.common.grid import per_row
from methods.common.method import MethodError

Params = tuple[torch.Tensor, torch.Tensor | None]


@dataclass
class SolverResult:
    """The rounded weight (dequantized, in the input's dtype) and its relative output error on the calibration inputs."""

    weight: torch.Tensor
    relative_error: float


def inverse_hessian_factor(hessian: torch.Tensor, damp_percent: float) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + lambda I)^-1``."""
    damped = hessian.clone()
    damped.diagonal().add_(damp_percent * hessian.diagonal().mean())
    factor, info = torch.linalg.cholesky_ex(damped)
    if info.item() != 0:
        raise MethodError(f"GPTQ: the Hessian is not positive definite with damp_percent={damp_percent}; raise damp_percent (e.g. 0.1)")
    identity = torch.eye(hessian.shape[0], dtype=hessian.dtype, device=hessian.device)
    return torch.linalg.cholesky(torch.cholesky_solve(identity, factor), upper=True)


def relative_output_error(weight: torch.Tensor, quantized: torch.Tensor, hessian: torch.Tensor) -> float:
    """``||(W - Q) X^T||^2 / ||W X^T||^2``, from ``H = X^T X / n``."""
    diff = weight.float() - quantized.float()
    num = ((diff @ hessian) * diff).sum()
    den = ((weight.float() @ hessian) * weight.float()).sum()
    return (num / den.clamp_min(1e-30)).item()


class GroupScales:
    """The scales (and zeros) of the column being rounded.

    Per-channel or per-tensor formats fix them once from the whole weight; with groups they are taken
    from the unmodified weight up front (``static``) or from a group's columns when its first column is
    reached, as updated by the errors of the columns before it.
    """

    def __init__(self, fmt: Format, weight: torch.Tensor, perm: torch.Tensor, static: bool) -> None:
        self.fmt, self.perm = fmt, perm
        self.group = fmt.group_size if isinstance(fmt.group_size, int) else None
        self.static = fmt.scales_for(group_view(weight, self.group)) if self.group and static else None
        self.current: Params | None = None if self.group else fmt.scales_for(group_view(weight, fmt.group_size))

    def for_column(self, col: int, upcoming: torch.Tensor) -> Params:
        """Params for permuted column ``col``; ``upcoming`` holds it and the columns after it, as updated."""
        if self.static is not None:
            g = int(self.perm[col]) // self.group
            scale, zero = self.static
            self.current = (scale[:, g : g + 1], None if zero is None else zero[:, g : g + 1])
        elif self.group and col % self.group == 0:
            self.current = self.fmt.scales_for(upcoming[:, : self.group].reshape(upcoming.shape[0], 1, -1))
        return self.current


@contextmanager
def single_thread() -> Iterator[None]:
    """The column loop runs many small ops, where a second thread only adds synchronization (up to 100x
    slower on a busy 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@torch.no_grad()
def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    fmt: Format,
    damp_percent: float = 0.01,
    block_size: int = 128,
    act_order: bool = False,
    static_groups: bool = False,
) -> SolverResult:
    """Round ``weight [rows, cols]`` onto ``fmt``'s grid, minimizing the output error under ``hessian [cols, cols]``."""
    W = weight.detach().float().clone()
    H = hessian.detach().float().clone()
    cols = W.shape[1]
    dead = H.diagonal() == 0  # inputs never active: their weights cannot matter
    H[dead, dead] = 1
    W[:, dead] = 0
    perm = torch.argsort(H.diagonal(), descending=True) if act_order else torch.arange(cols, device=W.device)
    scales = GroupScales(fmt, W, perm, static_groups)
    rounder = per_row(fmt)
    W, H = W[:, perm], H[perm][:, perm]
    Hinv = inverse_hessian_factor(H, damp_percent)
    Q = torch.zeros_like(W)
    if scales.group and not static_groups:  # a group must not straddle two lazy blocks
        block_size = math.ceil(block_size / scales.group) * scales.group

    with single_thread():
        for i1 in range(0, cols, block_size):
            i2 = min(i1 + block_size, cols)
            W1, Hinv1 = W[:, i1:i2].clone(), Hinv[i1:i2, i1:i2]
            errors = torch.zeros_like(W1)
            for i in range(i2 - i1):
                params = scales.for_column(i1 + i, W1[:, i:])
                q = rounder.dequantize(rounder.quantize(W1[:, i : i + 1], *params))[:, 0]
                Q[:, i1 + i] = q
                errors[:, i] = (W1[:, i] - q) / Hinv1[i, i]
                W1[:, i:] -= errors[:, i : i + 1] * Hinv1[i : i + 1, i:]
            W[:, i2:] -= errors @ Hinv[i1:i2, i2:]

    Q = Q[:, torch.argsort(perm)]
    return SolverResult(Q.to(weight.dtype), relative_output_error(weight, Q, hessian))

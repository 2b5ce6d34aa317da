"""The Hessian of a linear layer's reconstruction loss: ``H = X^T X / n`` over its calibration inputs.

For ``||W X^T - Q X^T||^2`` the Hessian with respect to a row of ``W`` is ``2 X^T X``; the constant factor
cancels in GPTQ (damping is relative to the mean diagonal), so the running mean is kept. Layers that read
the same input (q/k/v, gate/up) share one accumulator.
"""

from __future__ import annotations

import torch
from torch import nn

from methods.common.sequential import BlockRunner


class HessianAccumulator:
    """Running ``X^T X / n`` in float32 from batches of rows ``[tokens, width]``."""

    def __init__(self, width: int, device: torch.device) -> None:
        self.sum = torch.zeros(width, width, dtype=torch.float32, device=device)
        self.count = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.float()
        self.sum.addmm_(x.T, x)
        self.count += x.shape[0]

    @property
    def hessian(self) -> torch.Tensor:
        return self.sum / max(self.count, 1)


def collect_hessians(runner: BlockRunner, groups: list[dict[str, nn.Linear]]) -> dict[str, torch.Tensor]:
    """One pass of ``runner``'s block: the Hessian of every layer in ``groups`` (layers sharing an input)."""
    accumulators = {}
    representatives = {}
    for group in groups:
        name, layer = next(iter(group.items()))
        representatives[name] = layer
        accumulators[name] = HessianAccumulator(layer.in_features, layer.weight.device)
    runner.observe(representatives, lambda name, x: accumulators[name].add(x))
    return {name: accumulators[next(iter(group))].hessian for group in groups for name in group}

"""``smoothquant``: SmoothQuant (Xiao et al., ICML 2023), made for W8A8.

Activation outliers sit in a few input channels. Per input channel ``j`` of the layers reading a norm's
output (q/k/v after the attention norm, gate/up after the MLP norm), ``s_j = max|X_j|^alpha /
max|W_j|^(1 - alpha)`` moves quantization difficulty from activations to weights: the norm's gain is
divided by ``s`` and the weights' columns multiplied by it, which leaves the full-precision function
unchanged. ``max|X_j|`` is taken over the calibration tokens, block by block. The weights are then rounded
to nearest on the weight format and activations quantized as the top-level ``act_*`` knobs say (per token,
dynamic by default; ``act_quant.static=tensor`` is the paper's O3 setting).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from methods.common.act import quantize_activations
from methods.common.method import Method, MethodError, MethodReport, QuantSpec, weight_bits_report
from methods.common.sequential import BlockRunner, run_blockwise
from methods.common.transforms import ScalePair, decoder_parts, scale_pairs

PAIR_KINDS = ("attn_in", "mlp_in")


class SmoothQuant(Method):
    needs_calibration = True

    @dataclass
    class Config:
        alpha: float = 0.5

        def __post_init__(self) -> None:
            if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not 0 <= self.alpha <= 1:
                raise MethodError(f"smoothquant alpha={self.alpha!r} is not valid; choose a number in [0, 1] (0.5 in the paper)")

    def quantize(self, bundle, spec: QuantSpec, calib) -> MethodReport:
        names = {layer: name for name, layer in bundle.layers.items()}
        spreads: list[float] = []

        def visit(runner: BlockRunner) -> None:
            pairs = scale_pairs(decoder_parts(runner.block), names, PAIR_KINDS)
            absmax: dict[str, torch.Tensor] = {}

            def update(name: str, x: torch.Tensor) -> None:
                batch_max = x.abs().amax(dim=0).float()
                absmax[name] = batch_max if name not in absmax else torch.maximum(absmax[name], batch_max)

            first = {name: layer for name, layer in (next(iter(p.layers.items())) for p in pairs)}
            runner.observe(first, update)
            for pair in pairs:
                scales = self.smoothing_scales(pair, absmax[next(iter(pair.layers))])
                pair.apply(scales)
                spreads.append((scales.max() / scales.min()).item())
            for layer in runner.layers.values():
                layer.weight.data.copy_(spec.weight.fake_quant(layer.weight))

        run_blockwise(bundle, calib, visit, desc="smoothquant")
        quantize_activations(bundle, spec, calib)
        report = weight_bits_report(bundle, spec.weight)
        report.extras["max_scale_spread"] = max(spreads)
        return report

    def smoothing_scales(self, pair: ScalePair, act_absmax: torch.Tensor) -> torch.Tensor:
        """``max|X_j|^alpha / max|W_j|^(1 - alpha)``, with ``max|W_j|`` over all layers reading channel ``j``."""
        weight_absmax = torch.stack([layer.weight.abs().amax(dim=0).float() for layer in pair.layers.values()]).amax(dim=0)
        scales = act_absmax.clamp_min(1e-5).pow(self.cfg.alpha) / weight_absmax.clamp_min(1e-5).pow(1 - self.cfg.alpha)
        return scales.clamp_min(1e-5)

"""``awq``: activation-aware weight quantization (Lin et al., MLSys 2024), block by block.

For each pair (operation -> layers reading its output: attention norm -> q/k/v, v_proj -> o_proj, MLP norm
-> gate/up, up_proj -> down_proj) the per-input-channel scales ``s = mean|x|^a`` (normalized by
``sqrt(max s * min s)``) are searched over ``a`` in ``{0, 1/n_grid, ...}``, minimizing the layers' output
error ``||Q(W diag(s)) (x / s) - W x||^2`` on sampled calibration tokens; the best ``s`` is folded into the
operation before (function-preserving in full precision). Then, unless ``clip_search`` is off, each group's
range is shrunk by the ratio in ``[max_shrink, 1]`` that minimizes that group's output error (q/k are
skipped as in the reference code: their errors are reshaped by the attention product). ``a = 0`` and ratio
1 are round-to-nearest, so on the sampled tokens AWQ is never worse than RTN.

Differences from the reference code, for speed on small machines: the search loss is measured on the
layers' outputs (the paper's objective) rather than on the whole attention/MLP module's output, on
``search_tokens`` tokens sampled evenly from the calibration data; and the next block is fed the outputs
of this block with its weights quantized (as in GPTQ) rather than scaled and clipped in full precision.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from methods.common.act import quantize_activations
from methods.common.grid import check_has_grid, fake_quant_clipped
from methods.common.method import Method, MethodError, MethodReport, QuantSpec, weight_bits_report
from methods.common.sequential import BlockRunner, run_blockwise
from methods.common.transforms import ScalePair, decoder_parts, scale_pairs

PAIR_KINDS = ("attn_in", "v_o", "mlp_in", "up_down")
NO_CLIP_SEARCH = ("q_proj", "k_proj")


class InputSample:
    """Mean |x| per channel over all tokens, and every ``stride``-th token kept for the searches."""

    def __init__(self, stride: int) -> None:
        self.stride = stride
        self.abs_sum: torch.Tensor | None = None
        self.count = 0
        self.kept: list[torch.Tensor] = []

    def add(self, x: torch.Tensor) -> None:
        x = x.float()
        total = x.abs().sum(dim=0)
        self.abs_sum = total if self.abs_sum is None else self.abs_sum + total
        self.count += x.shape[0]
        self.kept.append(x[:: self.stride].clone())

    @property
    def mean_abs(self) -> torch.Tensor:
        return self.abs_sum / self.count

    @property
    def tokens(self) -> torch.Tensor:
        return torch.cat(self.kept)


class AWQ(Method):
    needs_calibration = True

    @dataclass
    class Config:
        n_grid: int = 20
        clip_search: bool = True
        max_shrink: float = 0.5
        search_tokens: int = 8192
        clip_tokens: int = 512

        def __post_init__(self) -> None:
            for knob in ("n_grid", "search_tokens", "clip_tokens"):
                value = getattr(self, knob)
                if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                    raise MethodError(f"awq {knob}={value!r} is not valid; choose a positive int")
            if not 0 < self.max_shrink < 1:
                raise MethodError(f"awq max_shrink={self.max_shrink!r} is not valid; choose a number in (0, 1) (0.5 in the paper)")

    def check(self, bundle, spec: QuantSpec) -> None:
        super().check(bundle, spec)
        check_has_grid(spec.weight, "awq")

    def quantize(self, bundle, spec: QuantSpec, calib) -> MethodReport:
        fmt = spec.weight
        names = {layer: name for name, layer in bundle.layers.items()}
        stride = max(1, calib.input_ids.numel() // self.cfg.search_tokens)
        best_ratios: dict[str, list[float]] = {kind: [] for kind in PAIR_KINDS}
        scale_spread: list[float] = []
        clip_means: list[float] = []

        def visit(runner: BlockRunner) -> None:
            pairs = scale_pairs(decoder_parts(runner.block), names, PAIR_KINDS)
            samples = {name: InputSample(stride) for name in (next(iter(p.layers)) for p in pairs)}
            runner.observe({name: bundle.layers[name] for name in samples}, lambda name, x: samples[name].add(x))
            scaled_inputs = []
            for pair in pairs:
                sample = samples[next(iter(pair.layers))]
                ratio, scales = self._search_scales(pair, sample, fmt)
                pair.apply(scales)
                best_ratios[pair.kind].append(ratio)
                scale_spread.append((scales.max() / scales.min()).item())
                scaled_inputs.append(sample.tokens / pair.expand(scales).float())
            for pair, tokens in zip(pairs, scaled_inputs):
                for name, layer in pair.layers.items():
                    clip_means.append(self._quantize_layer(name, layer, tokens, fmt))

        run_blockwise(bundle, calib, visit, desc="awq")
        quantize_activations(bundle, spec, calib)
        report = weight_bits_report(bundle, fmt)
        report.extras.update(
            mean_scale_exponent={kind: sum(v) / len(v) for kind, v in best_ratios.items() if v},
            max_scale_spread=max(scale_spread),
            mean_clip_ratio=sum(clip_means) / len(clip_means),
        )
        return report

    @torch.no_grad()
    def _search_scales(self, pair: ScalePair, sample: InputSample, fmt) -> tuple[float, torch.Tensor]:
        """The exponent ``a`` and scales (on ``pair.prev``'s channels) with the least output error."""
        x = sample.tokens
        stat = pair.reduce(sample.mean_abs)
        weights = [layer.weight.float() for layer in pair.layers.values()]
        reference = [x @ w.T for w in weights]
        best = (float("inf"), 0.0, torch.ones_like(stat))
        for step in range(self.cfg.n_grid):
            ratio = step / self.cfg.n_grid
            scales = stat.pow(ratio).clamp_min(1e-4)
            scales = scales / (scales.max() * scales.min()).sqrt()
            s = pair.expand(scales)
            loss = sum(((x / s) @ fmt.fake_quant(w * s).T - ref).pow(2).mean().item() for w, ref in zip(weights, reference))
            if loss < best[0]:
                best = (loss, ratio, scales)
        return best[1], best[2]

    @torch.no_grad()
    def _quantize_layer(self, name: str, layer: nn.Linear, tokens: torch.Tensor, fmt) -> float:
        """Round the layer's weight, with each group's range shrunk by its best clip ratio; return the mean ratio."""
        ratio = 1.0
        if self.cfg.clip_search and not name.endswith(NO_CLIP_SEARCH):
            stride = max(1, tokens.shape[0] // self.cfg.clip_tokens)
            ratio = self._search_clip(layer.weight.float(), tokens[::stride], fmt)
        layer.weight.copy_(fake_quant_clipped(fmt, layer.weight, ratio).to(layer.weight.dtype))
        return float(torch.as_tensor(ratio).float().mean())

    def _search_clip(self, weight: torch.Tensor, x: torch.Tensor, fmt) -> torch.Tensor:
        """Per scale group, the shrink ratio of its range with the least error on its share of the output."""
        width = fmt.group_size if isinstance(fmt.group_size, int) else weight.shape[1]
        x_groups = x.reshape(x.shape[0], -1, width)  # [tokens, column groups, width]
        reference = torch.einsum("tng,rng->rnt", x_groups, weight.reshape(weight.shape[0], -1, width))

        def group_errors(w: torch.Tensor) -> torch.Tensor:
            """Output error per (row, column group), summed into one per scale group for per-tensor scales."""
            out = torch.einsum("tng,rng->rnt", x_groups, w.reshape(w.shape[0], -1, width))
            err = (out - reference).pow(2).mean(dim=-1)
            return err.sum().reshape(1, 1) if fmt.group_size == "tensor" else err

        best_err, best_ratio = None, None
        for step in range(int(self.cfg.n_grid * (1 - self.cfg.max_shrink)) + 1):
            ratio = 1 - step / self.cfg.n_grid
            err = group_errors(fake_quant_clipped(fmt, weight, ratio))
            if best_err is None:
                best_err, best_ratio = err, torch.ones_like(err)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_ratio[better] = ratio
        return best_ratio.unsqueeze(-1)

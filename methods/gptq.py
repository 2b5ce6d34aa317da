"""``gptq``: GPTQ (Frantar et al., ICLR 2023), block by block on calibration data.

Each block sees the outputs of the blocks already quantized. Inside a block, with ``true_sequential`` the
layers are quantized in the order they run, in groups sharing an input (q/k/v, then o, then gate/up, then
down), and each group's Hessian is collected with the layers before it already quantized; otherwise all
Hessians come from one pass of the unquantized block. The column solver lives in
``methods/common/gptq_solver.py``; activations, when asked for, are quantized afterwards.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from methods.common.act import quantize_activations
from methods.common.grid import check_has_grid
from methods.common.gptq_solver import gptq_quantize
from methods.common.hessian import collect_hessians
from methods.common.method import Method, MethodError, MethodReport, QuantSpec, weight_bits_report
from methods.common.sequential import BlockRunner, run_blockwise


class GPTQ(Method):
    needs_calibration = True

    @dataclass
    class Config:
        damp_percent: float = 0.01
        block_size: int = 128
        act_order: bool = False
        static_groups: bool = False
        true_sequential: bool = True

        def __post_init__(self) -> None:
            if not 0 < self.damp_percent < 1:
                raise MethodError(f"gptq damp_percent={self.damp_percent!r} is not valid; choose a number in (0, 1)")
            if isinstance(self.block_size, bool) or not isinstance(self.block_size, int) or self.block_size < 1:
                raise MethodError(f"gptq block_size={self.block_size!r} is not valid; choose a positive int (128 in the paper)")

    def check(self, bundle, spec: QuantSpec) -> None:
        super().check(bundle, spec)
        check_has_grid(spec.weight, "gptq")

    def quantize(self, bundle, spec: QuantSpec, calib) -> MethodReport:
        extras = self.quantize_weights(bundle, spec.weight, calib)
        quantize_activations(bundle, spec, calib)
        report = weight_bits_report(bundle, spec.weight)
        report.extras.update(extras)
        return report

    def quantize_weights(self, bundle, fmt, calib) -> dict:
        """Quantize every layer of ``bundle`` with GPTQ; return the per-layer relative output errors."""
        errors: dict[str, float] = {}

        def visit(runner: BlockRunner) -> None:
            groups = runner.layer_groups()
            steps = [[group] for group in groups] if self.cfg.true_sequential else [groups]
            for step in steps:
                hessians = collect_hessians(runner, step)
                for group in step:
                    for name, layer in group.items():
                        errors[name] = self._solve(layer, hessians[name], fmt)

        activation_bytes = run_blockwise(bundle, calib, visit, desc="gptq")
        return {
            "avg_layer_error": sum(errors.values()) / len(errors),
            "layer_error": errors,
            "activation_bytes": activation_bytes,
        }

    def _solve(self, layer: nn.Linear, hessian, fmt) -> float:
        result = gptq_quantize(
            layer.weight,
            hessian,
            fmt,
            damp_percent=self.cfg.damp_percent,
            block_size=self.cfg.block_size,
            act_order=self.cfg.act_order,
            static_groups=self.cfg.static_groups,
        )
        layer.weight.data.copy_(result.weight)
        return result.relative_error

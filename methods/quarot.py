"""``quarot``: QuaRot (Ashkboos et al., NeurIPS 2024): rotate, then quantize weights and activations.

The residual stream is rotated by a random Hadamard matrix (fused into the weights), the values by a
per-head Hadamard (fused into ``v_proj``/``o_proj``), and the inputs of the layers in ``online_hadamard``
(``down_proj`` in the paper) by a Hadamard at run time. The model computes the same function in full
precision, with activations and weights free of outlier channels. The weights are then quantized with
round-to-nearest or GPTQ (``weight_method``; ``gptq`` holds that method's knobs), and activations and the
KV cache as the top-level ``act_*`` knobs say (QuaRot: per-token activations, clip ratio 0.9).
Rotations are described in ``methods/common/rotation.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from methods.common.act import quantize_activations
from methods.common.method import Method, MethodError, MethodReport, QuantSpec, fake_quantize_weights, weight_bits_report
from methods.common.rotation import attach_online_hadamard, rotate_residual_stream, rotate_values
from methods.common.transforms import decoder_parts
from methods.gptq import GPTQ

WEIGHT_METHODS = ("rtn", "gptq")
ONLINE_LAYERS = ("down_proj", "o_proj")


class QuaRot(Method):
    @dataclass
    class Config:
        rotate: bool = True
        rotate_values: bool = True
        online_hadamard: list[str] = field(default_factory=lambda: ["down_proj"])
        weight_method: str = "rtn"
        gptq: dict[str, Any] = field(default_factory=dict)
        seed: int = 0

        def __post_init__(self) -> None:
            if self.weight_method not in WEIGHT_METHODS:
                raise MethodError(f"quarot weight_method={self.weight_method!r} is not valid; choose one of {WEIGHT_METHODS}")
            unknown = sorted(set(self.online_hadamard) - set(ONLINE_LAYERS))
            if unknown:
                raise MethodError(f"quarot online_hadamard has {unknown[0]!r}; choose layers among {ONLINE_LAYERS}")
            self.online_hadamard = list(self.online_hadamard)
            self.gptq = dict(self.gptq)

    def __init__(self, name: str | None = None, **knobs: Any) -> None:
        super().__init__(name, **knobs)
        self.weight_quantizer = GPTQ(**self.cfg.gptq) if self.cfg.weight_method == "gptq" else None

    @property
    def needs_calibration(self) -> bool:
        return self.weight_quantizer is not None

    def check(self, bundle, spec: QuantSpec) -> None:
        if self.weight_quantizer is not None:
            self.weight_quantizer.check(bundle, spec)
        else:
            super().check(bundle, spec)

    def quantize(self, bundle, spec: QuantSpec, calib) -> MethodReport:
        online = rotate_residual_stream(bundle, self.cfg.seed) if self.cfg.rotate else 0
        for block in bundle.blocks:
            parts = decoder_parts(block)
            if self.cfg.rotate_values:
                rotate_values(parts)
            for layer in self.cfg.online_hadamard:
                attach_online_hadamard({"down_proj": parts.down, "o_proj": parts.o}[layer])
                online += 1
        extras: dict[str, Any] = {"online_rotations_per_forward": online}
        if self.weight_quantizer is not None:
            extras.update(self.weight_quantizer.quantize_weights(bundle, spec.weight, calib))
        else:
            fake_quantize_weights(bundle, spec.weight)
        quantize_activations(bundle, spec, calib)
        report = weight_bits_report(bundle, spec.weight)
        report.extras.update(extras)
        return report

"""``fp``: the unquantized baseline in the model's own precision. Bit knobs do not change its cell."""

from __future__ import annotations

from methods.common.method import Method, MethodReport, QuantSpec


class FullPrecision(Method):
    uses = ()

    def quantize(self, bundle, spec: QuantSpec, calib) -> MethodReport:
        bits = float(next(iter(bundle.layers.values())).weight.element_size() * 8)
        return MethodReport(bits_per_weight=bits, layer_bits={name: bits for name in bundle.layers})

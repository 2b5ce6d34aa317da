"""``rtn``: round to nearest, the baseline every paper starts from.

Each quantizable weight is rounded group by group onto the grid of the weight format (min-max scales,
or the format's own clipping where it has one); activations, when ``act_bits`` is set, are fake-quantized
at the input of every quantizable layer (per token by default, see ``methods/common/act.py``). No
calibration data, unless static activation ranges ask for it.
"""

from __future__ import annotations

from methods.common.act import quantize_activations
from methods.common.method import Method, MethodReport, QuantSpec, fake_quantize_weights, weight_bits_report


class RTN(Method):
    uses = ("bits", "group_size", "format", "act_bits", "act_format", "act_quant")

    def quantize(self, bundle, spec: QuantSpec, calib) -> MethodReport:
        fake_quantize_weights(bundle, spec.weight)
        quantize_activations(bundle, spec, calib)
        return weight_bits_report(bundle, spec.weight)

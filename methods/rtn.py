"""``rtn``: round to nearest, the baseline every paper starts from.

Each quantizable weight is rounded group by group onto the grid of the weight format (min-max scales,
or the format's own clipping where it has one); activations, when ``act_bits`` is set, are fake-quantized
per token at the input of every quantizable layer. No calibration data.
"""

from __future__ import annotations

from methods.common.act import attach_act_quant
from methods.common.method import Method, MethodReport, QuantSpec, fake_quantize_weights, weight_bits_report


class RTN(Method):
    uses = ("bits", "group_size", "format", "act_bits", "act_format")

    def quantize(self, bundle, spec: QuantSpec, calib) -> MethodReport:
        fake_quantize_weights(bundle, spec.weight)
        if spec.act is not None:
            attach_act_quant(bundle, spec.act)
        return weight_bits_report(bundle, spec.weight)

"""Activation fake-quantization at the inputs of quantizable layers, and of the KV cache.

* dynamic (the default): scales from each call, grouped by ``act_format.group_size`` (one per token);
* static (``act_quant.static``): one scale per layer input (``tensor``) or per input channel (``channel``),
  from the min/max observed on the calibration data, block by block, and fixed at run time;
* ``act_quant.clip_ratio``: ranges shrink by this factor before the scales are taken; the values beyond
  saturate at the ends of the grid;
* ``act_quant.kv_bits``: the outputs of ``k_proj``/``v_proj`` are fake-quantized per token and head
  (asymmetric int, one group per head). This simulates a quantized KV cache; the keys are quantized
  before RoPE (and before Gemma's ``k_norm``), not after as a real cache stores them.

Methods call :func:`quantize_activations` last, after the weights are final. Hooks run after any online
rotation hooks registered before them, so activations are quantized in the rotated basis.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from methods.common.formats import Format, IntFormat
from methods.common.grid import check_has_grid, fake_quant_clipped, fake_quant_with_ranges
from methods.common.method import MethodError
from methods.common.sequential import BlockRunner, run_blockwise
from methods.common.transforms import decoder_parts

if TYPE_CHECKING:
    from bench.data import CalibrationData
    from bench.models import ModelBundle
    from methods.common.method import QuantSpec

Handles = list[torch.utils.hooks.RemovableHandle]
Ranges = dict[str, tuple[torch.Tensor, torch.Tensor]]


def attach_act_quant(bundle: ModelBundle, fmt: Format, clip_ratio: float = 1.0) -> Handles:
    """Fake-quantize the input of every quantizable layer with ``fmt`` (dynamic: scales from each call)."""
    if clip_ratio != 1.0:
        check_has_grid(fmt, "activation clipping")

    def hook(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        x = args[0]
        quantized = fmt.fake_quant(x) if clip_ratio == 1.0 else fake_quant_clipped(fmt, x, clip_ratio)
        return (quantized, *args[1:])

    return [layer.register_forward_pre_hook(hook) for layer in bundle.layers.values()]


def observe_input_ranges(bundle: ModelBundle, calib: CalibrationData) -> Ranges:
    """Per-channel min and max of every quantizable layer's input over the calibration data."""
    ranges: Ranges = {}

    def update(name: str, x: torch.Tensor) -> None:
        lo, hi = x.amin(dim=0).float(), x.amax(dim=0).float()
        if name in ranges:
            lo, hi = torch.minimum(ranges[name][0], lo), torch.maximum(ranges[name][1], hi)
        ranges[name] = (lo, hi)

    def visit(runner: BlockRunner) -> None:
        runner.observe(runner.layers, update)

    run_blockwise(bundle, calib, visit, desc="activation ranges")
    return ranges


def attach_static_act_quant(bundle: ModelBundle, fmt: Format, ranges: Ranges, granularity: str, clip_ratio: float) -> Handles:
    """Fake-quantize layer inputs with scales fixed from ``ranges``, per tensor or per channel."""
    check_has_grid(fmt, "static activation quantization")
    handles = []
    for name, layer in bundle.layers.items():
        lo, hi = ranges[name]
        if granularity == "tensor":
            lo, hi = lo.min(), hi.max()
        lo, hi = lo * clip_ratio, hi * clip_ratio

        def hook(_module: nn.Module, args: tuple[torch.Tensor, ...], lo=lo, hi=hi) -> tuple[torch.Tensor, ...]:
            return (fake_quant_with_ranges(fmt, args[0], lo, hi), *args[1:])

        handles.append(layer.register_forward_pre_hook(hook))
    return handles


def attach_kv_quant(bundle: ModelBundle, bits: int) -> Handles:
    """Fake-quantize the outputs of every block's ``k_proj``/``v_proj``, one asymmetric group per token and head."""
    handles = []
    for block in bundle.blocks:
        parts = decoder_parts(block)
        fmt = IntFormat(bits=bits, group_size=parts.head_dim, symmetric=False)

        def hook(_module: nn.Module, _args: tuple[torch.Tensor, ...], output: torch.Tensor, fmt=fmt) -> torch.Tensor:
            return fmt.fake_quant(output)

        handles += [parts.k.register_forward_hook(hook), parts.v.register_forward_hook(hook)]
    return handles


def quantize_activations(bundle: ModelBundle, spec: QuantSpec, calib: CalibrationData | None) -> Handles:
    """Attach what ``spec`` asks for: layer-input quantization (dynamic or static) and KV-cache quantization."""
    settings = spec.act_quant
    handles: Handles = []
    if spec.act is not None and settings.static is None:
        handles += attach_act_quant(bundle, spec.act, settings.clip_ratio)
    elif spec.act is not None:
        if calib is None:
            raise MethodError(f"act_quant.static={settings.static!r} needs calibration data; none was given")
        ranges = observe_input_ranges(bundle, calib)
        handles += attach_static_act_quant(bundle, spec.act, ranges, settings.static, settings.clip_ratio)
    if settings.kv_bits is not None:
        handles += attach_kv_quant(bundle, settings.kv_bits)
    return handles

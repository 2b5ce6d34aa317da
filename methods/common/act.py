"""Activation fake-quantization at the inputs of quantizable layers."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from methods.common.formats import Format

if TYPE_CHECKING:
    from bench.models import ModelBundle


def attach_act_quant(bundle: ModelBundle, fmt: Format) -> list[torch.utils.hooks.RemovableHandle]:
    """Fake-quantize the input of every quantizable layer with ``fmt`` (dynamic: scales from each call)."""

    def hook(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        return (fmt.fake_quant(args[0]), *args[1:])

    return [layer.register_forward_pre_hook(hook) for layer in bundle.layers.values()]

"""The interface every quantization method implements.

A method is a class with a typed config (a dataclass named ``Config``) built from the knobs of its
``conf/method/<name>.yaml``. The pipeline instantiates it with Hydra and calls ``quantize(bundle, spec,
calib)``; the method changes ``bundle.model`` in place and returns a :class:`MethodReport`.

Shared knobs (bits, group size, formats, activation bits) never live in a method's YAML: they reach the
method through :class:`QuantSpec`, built from the top-level config.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from bench.errors import ConfigError
from methods.common.formats import Format

if TYPE_CHECKING:
    from bench.data import CalibrationData
    from bench.models import ModelBundle

# The top-level keys a method may depend on; a method that ignores some (e.g. ``fp``) lists fewer in
# ``uses`` so that its cells do not multiply over knobs that cannot change its result.
SHARED_KNOBS = ("bits", "group_size", "format", "act_bits", "act_format", "act_quant", "calib")
STATIC_GRANULARITIES = ("tensor", "channel")


class MethodError(ConfigError):
    """A method was configured with something it cannot do; the message names the value and the choices."""


@dataclass
class ActQuant:
    """How activations (and the KV cache) are quantized, beside their number format (``act_format``).

    ``static=None`` computes scales from each call (per ``act_format.group_size``, per token by default);
    ``"tensor"``/``"channel"`` fix one scale per layer input (or per input channel) from ranges observed on
    the calibration data. ``clip_ratio`` shrinks the range before scales are taken. ``kv_bits`` fake-quantizes
    the outputs of ``k_proj``/``v_proj`` (asymmetric, one scale per token and head); null leaves them alone.
    """

    static: str | None = None
    clip_ratio: float = 1.0
    kv_bits: int | None = None

    def __post_init__(self) -> None:
        if self.static is not None and self.static not in STATIC_GRANULARITIES:
            raise ConfigError(f"act_quant.static={self.static!r} is not valid; choose null (dynamic) or one of {STATIC_GRANULARITIES}")
        if isinstance(self.clip_ratio, bool) or not isinstance(self.clip_ratio, (int, float)) or not 0 < self.clip_ratio <= 1:
            raise ConfigError(f"act_quant.clip_ratio={self.clip_ratio!r} is not valid; choose a number in (0, 1]")
        if self.kv_bits is not None and (isinstance(self.kv_bits, bool) or not isinstance(self.kv_bits, int) or not 2 <= self.kv_bits <= 16):
            raise ConfigError(f"act_quant.kv_bits={self.kv_bits!r} is not valid; choose an integer in 2..16 or null (off)")


@dataclass
class QuantSpec:
    """What the top-level config asks for: the weight format, the activation format (or none) and how
    activations are quantized."""

    weight: Format | None
    act: Format | None = None
    act_quant: ActQuant = field(default_factory=ActQuant)

    @property
    def needs_calibration(self) -> bool:
        """Static activation ranges come from calibration data, whatever the method."""
        return self.act is not None and self.act_quant.static is not None


@dataclass
class MethodReport:
    """What a method says about the model it produced.

    ``bits_per_weight`` averages the storage cost (codes, scales, zeros) over the quantized layers'
    weights; ``layer_bits`` gives it per layer; ``extras`` holds method-specific results (a bit
    allocation, searched scales' statistics, ...). Timing and peak memory are filled in by the pipeline.
    """

    bits_per_weight: float
    layer_bits: dict[str, float] = field(default_factory=dict)
    extras: dict[str, Any] = field(default_factory=dict)


@dataclass
class NoKnobs:
    """Config of a method without knobs of its own."""


class Method(ABC):
    """Base class: holds the typed config and validates the knobs named in the YAML."""

    Config: ClassVar[type] = NoKnobs
    uses: ClassVar[tuple[str, ...]] = SHARED_KNOBS
    needs_calibration: ClassVar[bool] = False
    formats: ClassVar[tuple[str, ...] | None] = None  # names of supported weight formats; None = any

    def __init__(self, name: str | None = None, **knobs: Any) -> None:
        self.name = name or type(self).__name__.lower()
        known = [f.name for f in dataclasses.fields(self.Config)]
        unknown = sorted(set(knobs) - set(known))
        if unknown:
            raise MethodError(f"{type(self).__name__} has no knob {unknown[0]!r}; its knobs are {known}")
        self.cfg = self.Config(**knobs)

    def check(self, bundle: ModelBundle, spec: QuantSpec) -> None:
        """Fail fast, before any work, on a spec this method cannot run on this model."""
        if spec.weight is None:
            return
        if self.formats is not None and spec.weight.name not in self.formats:
            raise MethodError(
                f"method {type(self).__name__} does not support format {spec.weight.name!r}; it supports {list(self.formats)}"
            )
        for name, layer in bundle.layers.items():
            spec.weight.check_width(layer.in_features, name)

    @abstractmethod
    def quantize(self, bundle: ModelBundle, spec: QuantSpec, calib: CalibrationData | None) -> MethodReport: ...


def weight_bits_report(bundle: ModelBundle, fmt: Format) -> MethodReport:
    """Report for methods that store every quantizable layer in ``fmt``."""
    layer_bits = {name: fmt.bits_per_element(layer.weight.shape) for name, layer in bundle.layers.items()}
    return MethodReport(bits_per_weight=average_bits(bundle, layer_bits), layer_bits=layer_bits)


def average_bits(bundle: ModelBundle, layer_bits: dict[str, float]) -> float:
    """Bits per weight averaged over the quantized layers, weighted by their number of weights."""
    total = sum(bundle.layers[name].weight.numel() for name in layer_bits)
    return sum(bits * bundle.layers[name].weight.numel() for name, bits in layer_bits.items()) / total


@torch.no_grad()
def fake_quantize_weights(bundle: ModelBundle, fmt: Format) -> None:
    """Replace every quantizable layer's weight by its round trip through ``fmt`` (round to nearest)."""
    for layer in bundle.layers.values():
        layer.weight.copy_(fmt.fake_quant(layer.weight))

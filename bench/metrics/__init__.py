"""Metrics: each evaluator is a callable ``(bundle, ctx) -> EvalResult`` configured by ``conf/eval/*.yaml``."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from bench.models import ModelBundle
    from methods.common.method import QuantSpec


@dataclass
class EvalContext:
    """What an evaluator may need beyond the model: where caches live, which cell it measures, and what the cell
    quantized (its formats; None where a caller has none)."""

    cache_dir: Path
    cell_key: str
    spec: QuantSpec | None = None


@dataclass
class EvalResult:
    """Metrics by name, the full measurement protocol, and seconds spent in model forward passes."""

    metrics: dict[str, float]
    protocol: dict[str, Any] = field(default_factory=dict)
    forward_s: float = 0.0


class Evaluator(Protocol):
    def __call__(self, bundle: ModelBundle, ctx: EvalContext) -> EvalResult: ...

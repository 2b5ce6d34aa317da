"""Rounding onto a format's grid with scales chosen by the caller.

``Format.fake_quant`` takes min-max scales from the tensor it rounds. Several algorithms need more control:
GPTQ fixes a group's scales once and then rounds its columns one at a time; AWQ's clip search and clipped
activations shrink the range before the scales are taken; static activation quantization reuses ranges
observed on calibration data. All of them go through the format's own ``scales_for`` and ``quantize``, so
the grid (bits, symmetric or not, scale precision) is exactly the format's.
"""

from __future__ import annotations

import dataclasses

import torch

from methods.common.formats import Format, FormatError, group_view


def check_has_grid(fmt: Format, who: str) -> None:
    """Raise unless ``fmt`` exposes per-group scales (``scales_for``) and a ``group_size`` knob."""
    if not (dataclasses.is_dataclass(fmt) and hasattr(fmt, "scales_for") and hasattr(fmt, "group_size")):
        raise FormatError(f"{who} needs a format with per-group scales (scales_for); format {fmt.name!r} has none")


def fake_quant_clipped(fmt: Format, x: torch.Tensor, ratio: float | torch.Tensor) -> torch.Tensor:
    """Round ``x`` with scales taken from ``ratio`` times each group's range.

    ``ratio`` is a number or a tensor broadcastable to the ``[rows, n_groups, 1]`` group layout.
    """
    scale, zero = fmt.scales_for(group_view(x.float(), fmt.group_size) * ratio)
    return fmt.dequantize(fmt.quantize(x, scale, zero))


def per_row(fmt: Format) -> Format:
    """``fmt`` with one group per row, to round any columns with scales fixed per row (``[rows or 1, 1, 1]``)."""
    return dataclasses.replace(fmt, group_size="channel")


def fake_quant_with_ranges(fmt: Format, x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Round ``x [..., width]`` with fixed ranges ``lo``/``hi``: scalars (per tensor) or ``[width]`` (per channel).

    The range is laid out as a two-element group per channel so that the format's own ``scales_for``
    turns it into scales; values outside the range saturate at the ends of the grid.
    """
    bounds = torch.stack([lo.reshape(-1), hi.reshape(-1)], dim=-1).float()  # [channels, 2]
    scale, zero = fmt.scales_for(bounds.unsqueeze(0))  # [1, channels, 1]
    rows = per_row(fmt)
    reshape = (1, 1, -1)
    zero = None if zero is None else zero.reshape(reshape)
    return rows.dequantize(rows.quantize(x, scale.reshape(reshape), zero))

"""Function-preserving transforms of Llama-style decoder blocks: per-channel scaling folded into the
operation before a layer (SmoothQuant, AWQ), and norms' gains folded into the layers after them (QuaRot).

A channel of a linear layer's input may be multiplied by ``s`` if the operation producing that channel
divides it by ``s``: an RMSNorm/LayerNorm (its gain), or a linear layer whose output feeds only this input
(``v_proj -> o_proj`` through attention, which is linear in the values; ``up_proj -> down_proj`` through the
gated product). In full precision the block computes the same function.

Norms come in two kinds: Llama's ``x_hat * w`` and Gemma's ``x_hat * (1 + w)``. The kind is found by
probing the norm, not by its class name, and gains are read and written through that offset.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from methods.common.method import MethodError


@dataclass
class DecoderParts:
    """The named parts of a Llama-style decoder block.

    ``mlp_norm`` is the norm in front of the MLP (``post_attention_layernorm`` in Llama,
    ``pre_feedforward_layernorm`` in Gemma); ``attn_out_norm``/``mlp_out_norm`` are Gemma's extra norms on the
    outputs of attention and MLP before they join the residual stream (None in Llama).
    """

    attn_norm: nn.Module
    q: nn.Linear
    k: nn.Linear
    v: nn.Linear
    o: nn.Linear
    mlp_norm: nn.Module
    gate: nn.Linear
    up: nn.Linear
    down: nn.Linear
    n_heads: int
    n_kv_heads: int
    head_dim: int
    attn_out_norm: nn.Module | None = None
    mlp_out_norm: nn.Module | None = None


def decoder_parts(block: nn.Module) -> DecoderParts:
    """The parts of a Llama/Mistral/Qwen/Gemma-style block; a clear error for other block types."""
    attn, mlp = getattr(block, "self_attn", None), getattr(block, "mlp", None)
    names = ("q_proj", "k_proj", "v_proj", "o_proj")
    if attn is None or mlp is None or not all(hasattr(attn, n) for n in names) or not hasattr(mlp, "up_proj"):
        raise MethodError(
            f"block type {type(block).__name__} is not a Llama-style decoder block "
            "(self_attn.{q,k,v,o}_proj, mlp.{gate,up,down}_proj, input_layernorm); supported: Llama, Mistral, Qwen, Gemma"
        )
    head_dim = attn.head_dim
    sandwich = hasattr(block, "pre_feedforward_layernorm")
    return DecoderParts(
        attn_norm=block.input_layernorm,
        q=attn.q_proj,
        k=attn.k_proj,
        v=attn.v_proj,
        o=attn.o_proj,
        mlp_norm=block.pre_feedforward_layernorm if sandwich else block.post_attention_layernorm,
        gate=mlp.gate_proj,
        up=mlp.up_proj,
        down=mlp.down_proj,
        n_heads=attn.q_proj.out_features // head_dim,
        n_kv_heads=attn.k_proj.out_features // head_dim,
        head_dim=head_dim,
        attn_out_norm=block.post_attention_layernorm if sandwich else None,
        mlp_out_norm=getattr(block, "post_feedforward_layernorm", None) if sandwich else None,
    )


@torch.no_grad()
def norm_offset(norm: nn.Module) -> float:
    """0 for norms computing ``x_hat * w`` (Llama), 1 for ``x_hat * (1 + w)`` (Gemma), found by probing.

    The probe alternates +1 and -1 (with a 0 last for odd widths): its mean is 0, so RMSNorm and LayerNorm
    both normalize it to ``probe / rms(probe)``, and the output divided by that is the effective gain.
    """
    width = norm.weight.shape[0]
    probe = torch.ones(width, dtype=torch.float32, device=norm.weight.device)
    probe[1::2] = -1
    if width % 2:
        probe[-1] = 0
    x_hat = probe / probe.pow(2).mean().sqrt()
    out = norm(probe[None].to(norm.weight.dtype))[0].float()
    if getattr(norm, "bias", None) is not None:
        out = out - norm.bias.float()
    valid = probe != 0
    gain = out[valid] / x_hat[valid]
    weight = norm.weight.float()[valid]
    for offset in (0.0, 1.0):
        if torch.allclose(gain, weight + offset, rtol=1e-2, atol=1e-3):
            return offset
    raise MethodError(f"norm {type(norm).__name__} computes neither x_hat * w nor x_hat * (1 + w); cannot fold into it")


def norm_gain(norm: nn.Module) -> torch.Tensor:
    """The per-channel gain the norm applies (``w`` or ``1 + w``), in float64."""
    return norm.weight.double() + norm_offset(norm)


@torch.no_grad()
def set_norm_gain(norm: nn.Module, gain: torch.Tensor) -> None:
    offset = norm_offset(norm)
    norm.weight.copy_((gain - offset).to(norm.weight.dtype))


@torch.no_grad()
def scale_linear_inputs(linear: nn.Linear, scales: torch.Tensor) -> None:
    """``W <- W diag(s)``: multiply input channel ``j`` of the layer's weight by ``s_j``."""
    linear.weight.copy_((linear.weight.double() * scales.double()).to(linear.weight.dtype))


@torch.no_grad()
def scale_linear_outputs(linear: nn.Linear, scales: torch.Tensor) -> None:
    """``W <- diag(s) W``, ``b <- s b``: multiply output channel ``i`` by ``s_i``."""
    linear.weight.copy_((linear.weight.double() * scales.double()[:, None]).to(linear.weight.dtype))
    if linear.bias is not None:
        linear.bias.copy_((linear.bias.double() * scales.double()).to(linear.bias.dtype))


@torch.no_grad()
def scale_norm_outputs(norm: nn.Module, scales: torch.Tensor) -> None:
    """Multiply a norm's output channels by ``s`` (its gain, and its bias if it has one)."""
    set_norm_gain(norm, norm_gain(norm) * scales.double())
    if getattr(norm, "bias", None) is not None:
        norm.bias.copy_((norm.bias.double() * scales.double()).to(norm.bias.dtype))


def fold_norm_into_linears(norm: nn.Module, linears: list[nn.Linear]) -> None:
    """Move a norm's gain into the layers reading it; the norm is left with unit gain (a plain RMSNorm)."""
    if getattr(norm, "bias", None) is not None:
        raise MethodError(f"cannot fold {type(norm).__name__} with a bias into the following layers; only bias-free norms")
    gain = norm_gain(norm)
    for linear in linears:
        scale_linear_inputs(linear, gain)
    set_norm_gain(norm, torch.ones_like(gain))


@dataclass
class ScalePair:
    """An operation whose output channels feed ``layers``: scaling the layers' inputs by ``s`` is undone in it.

    ``prev_width`` channels of ``prev``'s output map onto the layers' input channels through ``expand``
    (the identity, except ``v_proj -> o_proj`` with grouped-query attention, where each value head feeds
    several query heads' slots of ``o_proj``'s input); ``reduce`` maps a statistic of the layers' inputs back
    onto ``prev``'s channels (mean over the slots sharing a channel).
    """

    kind: str
    prev: nn.Module
    layers: dict[str, nn.Linear]
    expand: Callable[[torch.Tensor], torch.Tensor] = field(default=lambda s: s)
    reduce: Callable[[torch.Tensor], torch.Tensor] = field(default=lambda s: s)

    @torch.no_grad()
    def apply(self, scales: torch.Tensor) -> None:
        """Divide ``prev``'s outputs by ``scales`` (its channels) and multiply the layers' inputs by them."""
        inverse = 1.0 / scales.double()
        if isinstance(self.prev, nn.Linear):
            scale_linear_outputs(self.prev, inverse)
        else:
            scale_norm_outputs(self.prev, inverse)
        for layer in self.layers.values():
            scale_linear_inputs(layer, self.expand(scales.double()))


def _kv_to_heads(parts: DecoderParts) -> tuple[Callable, Callable]:
    """``expand``/``reduce`` between value channels ``[kv_heads * head_dim]`` and ``o_proj`` inputs ``[heads * head_dim]``."""
    groups = parts.n_heads // parts.n_kv_heads
    shape = (parts.n_kv_heads, groups, parts.head_dim)

    def expand(s: torch.Tensor) -> torch.Tensor:
        return s.reshape(parts.n_kv_heads, 1, parts.head_dim).expand(shape).reshape(-1)

    def reduce(stat: torch.Tensor) -> torch.Tensor:
        return stat.reshape(shape).mean(dim=1).reshape(-1)

    return expand, reduce


def scale_pairs(parts: DecoderParts, names: dict[nn.Module, str], kinds: tuple[str, ...]) -> list[ScalePair]:
    """The scalable pairs of a block, of the ``kinds`` asked for, in block order.

    Kinds: ``attn_in`` (attention norm -> q/k/v), ``v_o`` (v_proj -> o_proj), ``mlp_in`` (MLP norm -> gate/up),
    ``up_down`` (up_proj -> down_proj). ``names`` maps layers to their full names.
    """
    expand, reduce = _kv_to_heads(parts)
    pairs = {
        "attn_in": ScalePair("attn_in", parts.attn_norm, {names[m]: m for m in (parts.q, parts.k, parts.v)}),
        "v_o": ScalePair("v_o", parts.v, {names[parts.o]: parts.o}, expand, reduce),
        "mlp_in": ScalePair("mlp_in", parts.mlp_norm, {names[m]: m for m in (parts.gate, parts.up)}),
        "up_down": ScalePair("up_down", parts.up, {names[parts.down]: parts.down}),
    }
    unknown = sorted(set(kinds) - set(pairs))
    if unknown:
        raise MethodError(f"scaling pair {unknown[0]!r} is not known; choose from {list(pairs)}")
    return [pairs[kind] for kind in pairs if kind in kinds]

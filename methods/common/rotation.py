"""Hadamard rotations of QuaRot (Ashkboos et al., 2024), fused into the weights or applied online.

* Residual stream: with every norm's gain folded into the layers that read it, RMSNorm commutes with an
  orthogonal ``Q`` (``rms(x Q) = rms(x)``), so the embeddings, the layers writing to the residual stream
  (``o_proj``, ``down_proj``: ``W <- Q^T W``) and the layers reading it (q/k/v, gate/up, ``lm_head``:
  ``W <- W Q``) can all be rotated, and the model computes the same function with outlier-free hidden states.
  Tied embeddings are untied first (the embedding is rotated on its output side, ``lm_head`` on its input
  side). Gemma's extra norms on the attention/MLP outputs sit between ``o_proj``/``down_proj`` and the
  residual stream and do not commute with ``Q``; there ``Q`` is applied online after the norm.
* Values: a per-head Hadamard on ``v_proj``'s outputs is undone in ``o_proj``'s inputs (attention mixes
  tokens, not channels), fully fused.
* Online: a Hadamard on a layer's input at run time, with its inverse fused into the weight (``W <- W H``);
  QuaRot applies it to ``down_proj``'s input so that the MLP's intermediate activations quantize well.

Rotations are computed in float64 and written back in the model's dtype.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from methods.common.hadamard import hadamard_matrix, random_hadamard, rotate_blocks
from methods.common.method import MethodError
from methods.common.transforms import DecoderParts, decoder_parts, fold_norm_into_linears

if TYPE_CHECKING:
    from bench.models import ModelBundle


class RotatedOutput(nn.Module):
    """A module followed by an online rotation of its output: ``module(x) @ Q``."""

    def __init__(self, module: nn.Module, rotation: torch.Tensor) -> None:
        super().__init__()
        self.module = module
        self.register_buffer("rotation", rotation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rotate_blocks(self.module(x), self.rotation)


@torch.no_grad()
def rotate_inputs(module: nn.Linear | nn.Embedding, rotation: torch.Tensor) -> None:
    """``W <- W Q`` (blockwise for a smaller ``Q``): a linear layer now expects inputs ``x Q``; for an
    embedding, whose rows are its output vectors, the same product rotates its outputs: ``e <- e Q``."""
    module.weight.copy_(rotate_blocks(module.weight.double(), rotation.double()).to(module.weight.dtype))


@torch.no_grad()
def rotate_outputs(linear: nn.Linear, rotation: torch.Tensor) -> None:
    """``W <- Q^T W``, ``b <- b Q`` (blockwise for a smaller ``Q``): the layer now outputs ``y Q``."""
    weight = rotate_blocks(linear.weight.double().T, rotation.double()).T
    linear.weight.copy_(weight.to(linear.weight.dtype))
    if linear.bias is not None:
        linear.bias.copy_(rotate_blocks(linear.bias.double(), rotation.double()).to(linear.bias.dtype))


def untie_embeddings(model: nn.Module) -> None:
    """Give ``lm_head`` its own copy of a weight it shares with the input embedding."""
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    if head.weight is embed.weight or head.weight.data_ptr() == embed.weight.data_ptr():
        head.weight = nn.Parameter(embed.weight.detach().clone(), requires_grad=False)
        model.config.tie_word_embeddings = False


def final_norm(bundle: ModelBundle) -> nn.Module:
    """The norm after the last block (``<parent of the blocks>.norm``)."""
    parent = bundle.model.get_submodule(bundle.block_prefix.rsplit(".", 1)[0])
    norm = getattr(parent, "norm", None)
    if norm is None:
        raise MethodError(f"cannot find the final norm of {type(bundle.model).__name__} (expected {type(parent).__name__}.norm)")
    return norm


def _replace_child(parent: nn.Module, old: nn.Module, new: nn.Module) -> None:
    for name, child in parent.named_children():
        if child is old:
            setattr(parent, name, new)
            return
    raise MethodError(f"{type(old).__name__} is not a direct child of {type(parent).__name__}")


def fold_all_norms(bundle: ModelBundle, parts: list[DecoderParts]) -> None:
    """Fold every norm that feeds linear layers into them, the final norm into ``lm_head``."""
    for p in parts:
        fold_norm_into_linears(p.attn_norm, [p.q, p.k, p.v])
        fold_norm_into_linears(p.mlp_norm, [p.gate, p.up])
    fold_norm_into_linears(final_norm(bundle), [bundle.model.get_output_embeddings()])


@torch.no_grad()
def rotate_residual_stream(bundle: ModelBundle, seed: int) -> int:
    """Rotate the residual stream by a random Hadamard ``Q``; return the number of online rotations it needed."""
    model = bundle.model
    parts = [decoder_parts(block) for block in bundle.blocks]
    untie_embeddings(model)
    fold_all_norms(bundle, parts)
    rotation = random_hadamard(model.get_input_embeddings().weight.shape[1], seed=seed, dtype=torch.float64)
    rotate_inputs(model.get_input_embeddings(), rotation)
    online = 0
    for block, p in zip(bundle.blocks, parts):
        for layer in (p.q, p.k, p.v, p.gate, p.up):
            rotate_inputs(layer, rotation)
        for writer, out_norm in ((p.o, p.attn_out_norm), (p.down, p.mlp_out_norm)):
            if out_norm is None:
                rotate_outputs(writer, rotation)
            else:
                _replace_child(block, out_norm, RotatedOutput(out_norm, rotation.to(writer.weight.dtype)))
                online += 1
    rotate_inputs(model.get_output_embeddings(), rotation)
    return online


def rotate_values(parts: DecoderParts) -> None:
    """Per-head Hadamard on ``v_proj``'s outputs, undone in ``o_proj``'s inputs (fully fused)."""
    rotation = hadamard_matrix(parts.head_dim, dtype=torch.float64)
    rotate_outputs(parts.v, rotation)
    rotate_inputs(parts.o, rotation)


def attach_online_hadamard(linear: nn.Linear) -> torch.utils.hooks.RemovableHandle:
    """Rotate the layer's input by a Hadamard ``H`` at run time, with ``H``'s inverse fused into the weight."""
    rotation = hadamard_matrix(linear.in_features, dtype=torch.float64)
    rotate_inputs(linear, rotation)
    online = rotation.to(linear.weight.dtype)

    def hook(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        return (rotate_blocks(args[0], online), *args[1:])

    return linear.register_forward_pre_hook(hook)

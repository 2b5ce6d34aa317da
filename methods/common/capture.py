"""The inputs of a model's transformer blocks, captured with stand-ins.

Block-wise algorithms (GPTQ, AWQ, ...) run one block at a time on the calibration data, so they need what
enters the first block (the embeddings) and the keyword arguments the model passes to every block
(attention mask, rotary position embeddings, ...). Both are captured by swapping the blocks for stand-ins
that record their inputs and stop the forward pass, so capturing costs the embeddings only.

Keyword arguments differ between blocks in some models (Gemma-3 alternates sliding-window and global
attention, each with its own mask and rotary table), so they are recorded for every block, once, from a
batch of one sample; they broadcast over larger batches of the same length.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from bench.models import ModelBundle


class StopForward(Exception):
    """Raised by a hook or stand-in once it has what it needs; the caller catches it."""


@dataclass
class BlockCall:
    """The arguments a model passes to one block, besides the hidden states."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]


@dataclass
class BlockInputs:
    """Hidden states entering the first block ``[n_samples, seqlen, hidden]`` and each block's call arguments."""

    hidden: torch.Tensor
    calls: list[BlockCall]


class _StandIn(nn.Module):
    """Takes a block's place: records what the block would receive, then passes or stops."""

    def __init__(self, record: list, stop: bool) -> None:
        super().__init__()
        self.record = record
        self.stop = stop

    def forward(self, hidden: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        self.record.append((hidden, BlockCall(args, kwargs)))
        if self.stop:
            raise StopForward
        return hidden


def _run_with_stand_ins(bundle: ModelBundle, input_ids: torch.Tensor, n_blocks: int) -> list[tuple[torch.Tensor, BlockCall]]:
    """Replace the first ``n_blocks`` blocks by stand-ins (the last one stops), run the model, restore them."""
    blocks = bundle.model.get_submodule(bundle.block_prefix)
    originals = [blocks[i] for i in range(n_blocks)]
    record: list[tuple[torch.Tensor, BlockCall]] = []
    for i in range(n_blocks):
        blocks[i] = _StandIn(record, stop=i == n_blocks - 1)
    try:
        bundle.model(input_ids.to(bundle.device), use_cache=False)
    except StopForward:
        pass
    finally:
        for i, block in enumerate(originals):
            blocks[i] = block
    return record


@torch.no_grad()
def capture_block_inputs(bundle: ModelBundle, input_ids: torch.Tensor, batch_size: int) -> BlockInputs:
    """The first block's inputs for all of ``input_ids [n, seqlen]`` and every block's call arguments."""
    calls = [call for _, call in _run_with_stand_ins(bundle, input_ids[:1], len(bundle.blocks))]
    hidden = None
    for start in range(0, input_ids.shape[0], batch_size):
        ((batch_hidden, _),) = _run_with_stand_ins(bundle, input_ids[start : start + batch_size], 1)
        if hidden is None:
            hidden = batch_hidden.new_empty((input_ids.shape[0], *batch_hidden.shape[1:]))
        hidden[start : start + batch_hidden.shape[0]] = batch_hidden
    return BlockInputs(hidden, calls)

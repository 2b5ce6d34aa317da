"""Text data: the shipped Wikipedia and news texts, hub datasets, local files; calibration sampling.

The default corpus is real Wikipedia prose from the gensim 4.4.0 wheel's test data (about 100 articles).
``prepare_wiki`` parses the XML dump, strips the markup with mwparserfromhell, drops redirects, and splits
the articles deterministically (by a hash of the title) into a calibration part and a test part. The
result is cached as JSON and checked against a pinned SHA-256, so every machine measures on the same
text. ``python -m bench.data`` runs the step and prints the checksums.

Sources (``conf/data/*.yaml``, key ``source``):

* ``wiki``: the shipped Wikipedia articles (splits ``calib`` / ``test``);
* ``lee``: the Lee news corpus beside it (``lee_background.cor``, one article a line; evaluation only);
* ``hub``: a Hugging Face dataset (WikiText-2, C4 ...) for users with a hub, via ``datasets``;
* ``file``: any local UTF-8 text file (documents separated by blank lines).
"""

from __future__ import annotations

import bz2
import hashlib
import importlib.util
import json
import os
import random
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from bench.errors import AssetError, ConfigError

GENSIM_DATA = "test/test_data"
WIKI_DUMP = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
LEE_FILE = "lee_background.cor"
WIKI_TEST_SHARE = 0.2  # articles whose title hash falls below this share go to the test split
# SHA-256 of the prepared JSON (calib + test), pinned so that a different parse is caught, not measured.
WIKI_SHA256 = "2b7b61ea416fb6d7b260ec313ce64eaf05b649fc57a8717dbd751fccdc427c72"
SOURCES = ("wiki", "lee", "hub", "file")
SPLITS = ("calib", "test")


def gensim_file(name: str) -> Path:
    """A file of the gensim wheel's test data, found without importing gensim."""
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        raise AssetError("package 'gensim' is not installed; run `pip install --no-deps gensim==4.4.0`")
    path = Path(list(spec.submodule_search_locations)[0]) / GENSIM_DATA / name
    if not path.is_file():
        raise AssetError(f"gensim test data file {name!r} is missing at {path}")
    return path


def clean_wikitext(text: str) -> str:
    """Plain prose from wiki markup: no files, categories, references or tables; paragraphs kept."""
    import mwparserfromhell

    code = mwparserfromhell.parse(text)
    for link in code.filter_wikilinks(recursive=False):
        if str(link.title).strip().lower().startswith(("file:", "image:", "category:")):
            code.remove(link)
    for tag in code.filter_tags(recursive=False):
        if str(tag.tag).lower() in ("ref", "table", "gallery", "math"):
            code.remove(tag)
    plain = code.strip_code(normalize=True, collapse=True)
    lines = [line.strip() for line in plain.splitlines()]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def _wiki_articles(dump: Path) -> list[dict[str, str]]:
    articles = []
    for _, element in ET.iterparse(bz2.open(dump)):
        if not element.tag.endswith("}page"):
            continue
        is_article = element.findtext("{*}ns") == "0" and element.find("{*}redirect") is None
        if is_article:
            text = clean_wikitext(element.findtext("{*}revision/{*}text") or "")
            if text:
                articles.append({"title": element.findtext("{*}title"), "text": text})
        element.clear()
    return articles


def _split_of(title: str) -> str:
    bucket = int(hashlib.sha256(title.encode()).hexdigest()[:8], 16) / 16**8
    return "test" if bucket < WIKI_TEST_SHARE else "calib"


def prepare_wiki(cache_dir: Path) -> Path:
    """Parse, clean and split the shipped Wikipedia articles into ``cache_dir/data/wiki.json`` (once)."""
    out = Path(cache_dir) / "data" / "wiki.json"
    if out.is_file():
        return out
    articles = _wiki_articles(gensim_file(WIKI_DUMP))
    splits = {split: [a for a in articles if _split_of(a["title"]) == split] for split in SPLITS}
    payload = json.dumps(splits, ensure_ascii=False, sort_keys=True).encode()
    digest = hashlib.sha256(payload).hexdigest()
    if digest != WIKI_SHA256:
        raise AssetError(f"prepared Wikipedia text has sha256 {digest}, expected {WIKI_SHA256}: check gensim==4.4.0")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.tmp{os.getpid()}")
    tmp.write_bytes(payload)
    tmp.replace(out)
    return out


def load_text(source: str, split: str, cache_dir: Path, **options: Any) -> list[str]:
    """The documents of ``source``/``split`` as a list of strings."""
    if source == "wiki":
        if split not in SPLITS:
            raise ConfigError(f"split={split!r} is not valid for wiki; choose one of {SPLITS}")
        splits = json.loads(prepare_wiki(cache_dir).read_text())
        return [a["text"] for a in splits[split]]
    if source == "lee":
        return [line.strip() for line in gensim_file(LEE_FILE).read_text().splitlines() if line.strip()]
    if source == "file":
        path = Path(options["path"]).expanduser()
        if not path.is_file():
            raise AssetError(f"text file {str(path)!r} does not exist")
        return [doc.strip() for doc in re.split(r"\n\s*\n", path.read_text()) if doc.strip()]
    if source == "hub":
        from datasets import load_dataset

        rows = load_dataset(options["path"], options.get("name"), split=split)
        return [row[options.get("text_key", "text")] for row in rows]
    raise ConfigError(f"data.source={source!r} is not valid; choose one of {SOURCES}")


def file_sha256(texts: list[str], join: str) -> str:
    return hashlib.sha256(join.join(texts).encode()).hexdigest()


def tokenize_corpus(tokenizer: Any, texts: list[str], join: str) -> torch.Tensor:
    """The whole corpus as one 1-D tensor of token ids (documents joined by ``join``, no special tokens)."""
    ids = tokenizer(join.join(texts), add_special_tokens=False, return_tensors="pt").input_ids
    return ids[0]


@dataclass
class CalibrationData:
    """Calibration windows ``[n_samples, seqlen]`` of token ids, with how they were drawn."""

    input_ids: torch.Tensor
    protocol: dict[str, Any] = field(default_factory=dict)

    def batches(self, batch_size: int = 1) -> list[torch.Tensor]:
        return list(self.input_ids.split(batch_size))


def build_calibration(cfg: DictConfig, tokenizer: Any, cache_dir: Path, max_context: int) -> CalibrationData:
    """``n_samples`` random windows of ``seqlen`` tokens from the calibration text, seeded."""
    seqlen = min(cfg.seqlen, max_context)
    texts = load_text(cfg.source, cfg.split, cache_dir, **cfg.get("options", {}))
    ids = tokenize_corpus(tokenizer, texts, cfg.join)
    if ids.numel() <= seqlen:
        raise ConfigError(f"calib.seqlen={seqlen} is longer than the calibration text ({ids.numel()} tokens)")
    rng = random.Random(cfg.seed)
    starts = [rng.randrange(0, ids.numel() - seqlen) for _ in range(cfg.n_samples)]
    windows = torch.stack([ids[s : s + seqlen] for s in starts])
    protocol = {
        "source": cfg.source,
        "split": cfg.split,
        "n_samples": cfg.n_samples,
        "seqlen": seqlen,
        "seed": cfg.seed,
        "join": cfg.join,
        "text_sha256": file_sha256(texts, cfg.join),
        "corpus_tokens": ids.numel(),
    }
    return CalibrationData(windows, protocol)


if __name__ == "__main__":
    import sys

    cache = Path(sys.argv[1] if len(sys.argv) > 1 else os.environ.get("LOWBIT_CACHE", "~/.cache/lowbit-bench")).expanduser()
    path = prepare_wiki(cache)
    data = json.loads(path.read_text())
    print(f"{path}: sha256 {hashlib.sha256(path.read_bytes()).hexdigest()}")
    for split in SPLITS:
        print(f"  {split}: {len(data[split])} articles, {sum(len(a['text']) for a in data[split])} characters")

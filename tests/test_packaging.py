"""The project's top-level packages leave the names of its dependencies' packages alone."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_no_project_package_shadows_hugging_face_kernels() -> None:
    """transformers imports Hugging Face's ``kernels`` package when it is installed (a dependency from
    transformers 5.25 on); a ``kernels`` folder of this project would be found first and break every
    model import."""
    assert not (ROOT / "kernels").exists()
    spec = importlib.util.find_spec("kernels")
    assert spec is None or Path(spec.origin or "").resolve().parent != ROOT / "kernels"
    import transformers.activations  # noqa: F401  (the module that imports Hugging Face's kernels)

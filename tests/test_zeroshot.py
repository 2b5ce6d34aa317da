"""Zero-shot accuracy through lm-eval: local tasks end to end on the tiny random model, via the real configs."""

from __future__ import annotations

from importlib import metadata
from pathlib import Path
from typing import Any

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from bench.errors import AssetError, ConfigError
from bench.metrics.zeroshot import ZeroShot, build_task_manager
from bench.pipeline import run_cell
from bench.tasks import checked_file, load_arrow_split

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
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


def compose_cell(*overrides: str, model: str = "tiny") -> DictConfig:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=[f"model={model}", "eval=[zeroshot]", "tracker=none", *overrides])


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty cache (no response caches from earlier runs) sharing the configured cache's data and models.

    Building the tiny model from scratch takes minutes on a small CPU, so its folder is linked, not rebuilt.
    """
    shared = Path(compose_cell().paths.cache_dir).expanduser()
    fresh = tmp_path_factory.mktemp("cache")
    for folder in ("data", "models"):
        (shared / folder).mkdir(parents=True, exist_ok=True)
        (fresh / folder).symlink_to(shared / folder)
    return fresh


def run_piqa(tmp_path: Path, cache_dir: Path, *overrides: str) -> dict[str, Any]:
    """One cell on the first LIMIT PIQA questions."""
    return run_cell(
        compose_cell(
            f"store.path={tmp_path / 'results.sqlite'}",
            f"paths.cache_dir={cache_dir}",
            "eval.zeroshot.tasks=[piqa]",
            f"eval.zeroshot.limit={LIMIT}",
            *overrides,
        )
    )


def test_piqa_end_to_end_on_tiny_model(tmp_path: Path, cache_dir: Path) -> None:
    record = run_piqa(tmp_path, cache_dir, "method=fp")
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


def test_response_cache_is_keyed_by_cell(tmp_path: Path, cache_dir: Path) -> None:
    cached = "eval.zeroshot.response_cache=true"
    first = run_piqa(tmp_path, cache_dir, "method=fp", cached)
    cache_file = cache_dir / "lm_eval_responses" / f"{first['key']}_rank0.db"
    assert cache_file.is_file()
    assert first["protocol"]["zeroshot"]["response_cache"] == str(cache_file)
    assert first["timings"]["eval_forward"] > 0

    again = run_piqa(tmp_path, cache_dir, "method=fp", cached, "force=true")
    assert again["key"] == first["key"]
    assert again["metrics"] == first["metrics"]
    assert again["timings"]["eval_forward"] == 0, "every answer should come from this cell's cache"

    other = run_piqa(tmp_path, cache_dir, "method=rtn", "bits=2", cached)
    assert other["key"] != first["key"]
    assert (cache_dir / "lm_eval_responses" / f"{other['key']}_rank0.db").is_file()
    assert other["timings"]["eval_forward"] > 0, "another cell must not reuse the fp cell's answers"


def test_fp_baseline_is_evaluated_once(tmp_path: Path, cache_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    first = run_piqa(tmp_path, cache_dir, "method=fp", "bits=2")
    second = run_piqa(tmp_path, cache_dir, "method=fp", "bits=4")
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
        compose_cell(
            "method=fp",
            f"store.path={tmp_path / 'results.sqlite'}",
            "eval.zeroshot.tasks=[piqa,arc_easy,hellaswag]",
            "eval.zeroshot.limit=300",
            model="smollm2",
        )
    )
    metrics = record["metrics"]
    assert metrics["zeroshot/piqa/acc"] == pytest.approx(0.65, abs=0.04)
    assert metrics["zeroshot/arc_easy/acc"] == pytest.approx(0.49, abs=0.04)
    assert metrics["zeroshot/hellaswag/acc_norm"] == pytest.approx(0.46, abs=0.04)

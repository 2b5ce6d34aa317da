"""Trackers: W&B (offline by default, online when asked) or none. The results store is the source of truth."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from bench.errors import ConfigError

MODES = ("offline", "online", "disabled")


class NullTracker:
    """``tracker=none``: logs nothing."""

    def start(self, key: str, group: str, tags: list[str], config: dict[str, Any]) -> None: ...

    def log_summary(self, values: dict[str, Any]) -> None: ...

    def finish(self, exit_code: int = 0) -> None: ...


class WandbTracker:
    """One W&B run per cell: id = cell key, group = sweep, tags, the resolved config, summary metrics."""

    def __init__(self, project: str = "lowbit-bench", mode: str = "offline", dir: str = "results", entity: str | None = None) -> None:
        if mode not in MODES:
            raise ConfigError(f"tracker.mode={mode!r} is not valid; choose one of {MODES}")
        self.project, self.mode, self.dir, self.entity = project, mode, Path(dir), entity
        self.run = None

    def start(self, key: str, group: str, tags: list[str], config: dict[str, Any]) -> None:
        import wandb

        self.dir.mkdir(parents=True, exist_ok=True)
        os.environ.setdefault("WANDB_SILENT", "true")
        self.run = wandb.init(
            project=self.project,
            entity=self.entity,
            id=key,
            group=group,
            tags=tags,
            config=config,
            mode=self.mode,
            dir=str(self.dir),
            resume="allow",
            reinit="finish_previous",
        )

    def log_summary(self, values: dict[str, Any]) -> None:
        if self.run is not None:
            self.run.summary.update(values)

    def finish(self, exit_code: int = 0) -> None:
        if self.run is not None:
            self.run.finish(exit_code=exit_code)
            self.run = None

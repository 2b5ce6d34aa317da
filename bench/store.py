"""The results store: one SQLite file (WAL mode, safe for parallel jobs), one row per cell.

It is the source of truth; W&B is only a destination. A finished row is never overwritten by a failure,
and rows are written in one transaction each, so an interrupt or a crash leaves the file consistent.
"""

from __future__ import annotations

import json
import sqlite3
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import pandas as pd

SCHEMA = """
CREATE TABLE IF NOT EXISTS cells (
    key TEXT PRIMARY KEY,
    status TEXT NOT NULL,
    sweep TEXT,
    model TEXT,
    method TEXT,
    format TEXT,
    bits INTEGER,
    act_bits INTEGER,
    group_size TEXT,
    bits_per_weight REAL,
    metrics TEXT,
    config TEXT,
    report TEXT,
    protocol TEXT,
    timings TEXT,
    env TEXT,
    error TEXT,
    created_at REAL,
    updated_at REAL
)
"""
COLUMNS = (
    "key", "status", "sweep", "model", "method", "format", "bits", "act_bits", "group_size",
    "bits_per_weight", "metrics", "config", "report", "protocol", "timings", "env", "error",
)  # fmt: skip
JSON_COLUMNS = ("metrics", "config", "report", "protocol", "timings", "env")


class ResultStore:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path).expanduser()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(SCHEMA)

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.path, timeout=60)
        try:
            with db:  # one transaction: committed on success, rolled back on any error
                yield db
        finally:
            db.close()

    def get(self, key: str) -> dict[str, Any] | None:
        with self._connect() as db:
            db.row_factory = sqlite3.Row
            row = db.execute("SELECT * FROM cells WHERE key = ?", (key,)).fetchone()
        return _decode(dict(row)) if row else None

    def is_done(self, key: str) -> bool:
        record = self.get(key)
        return record is not None and record["status"] == "done"

    def put(self, record: dict[str, Any]) -> None:
        """Insert or replace a finished cell."""
        self._upsert({**record, "status": "done", "error": None}, only_if_not_done=False)

    def put_failed(self, record: dict[str, Any], error: str) -> None:
        """Record a failure, unless the cell already has a finished row (which stays untouched)."""
        self._upsert({**record, "status": "failed", "error": error}, only_if_not_done=True)

    def _upsert(self, record: dict[str, Any], only_if_not_done: bool) -> None:
        values = [_encode(name, record.get(name)) for name in COLUMNS]
        now = time.time()
        assignments = ", ".join(f"{name} = excluded.{name}" for name in COLUMNS[1:])
        guard = "WHERE cells.status != 'done'" if only_if_not_done else ""
        with self._connect() as db:
            db.execute(
                f"INSERT INTO cells ({', '.join(COLUMNS)}, created_at, updated_at) "
                f"VALUES ({', '.join('?' * len(COLUMNS))}, ?, ?) "
                f"ON CONFLICT(key) DO UPDATE SET {assignments}, updated_at = excluded.updated_at {guard}",
                (*values, now, now),
            )

    def frame(self, status: str | None = "done", **filters: Any) -> pd.DataFrame:
        """All rows as a DataFrame, metrics flattened into columns; ``filters`` match columns exactly."""
        with self._connect() as db:
            frame = pd.read_sql_query("SELECT * FROM cells", db)
        if status is not None:
            frame = frame[frame["status"] == status]
        for column, value in filters.items():
            if column not in frame.columns:
                raise KeyError(f"no column {column!r}; columns are {list(frame.columns)}")
            allowed = value if isinstance(value, (list, tuple, set)) else [value]
            frame = frame[frame[column].isin(allowed)]
        for column in JSON_COLUMNS:
            frame[column] = frame[column].map(lambda text: json.loads(text) if text else {})
        metrics = pd.json_normalize(frame["metrics"].tolist()).set_index(frame.index)
        return pd.concat([frame, metrics], axis=1)


def _encode(name: str, value: Any) -> Any:
    if name in JSON_COLUMNS:
        return json.dumps(value, sort_keys=True, default=str)
    if name == "group_size" and value is not None:
        return str(value)
    return value


def _decode(row: dict[str, Any]) -> dict[str, Any]:
    for column in JSON_COLUMNS:
        row[column] = json.loads(row[column]) if row[column] else {}
    return row

"""The leaderboard's task table (several metrics) on a hand-made store frame."""

from __future__ import annotations

import pandas as pd
import pytest

from bench.errors import ConfigError
from reports.leaderboard import metric_table, select_metrics


def store_frame() -> pd.DataFrame:
    rows = [
        ("fp", None, None, {"piqa/acc": 0.65, "piqa/acc_norm": 0.64, "boolq/acc": 0.60, "avg/acc": 0.625}),
        ("rtn", 2, "int2-asym-g64", {"piqa/acc": 0.52, "piqa/acc_norm": 0.51, "boolq/acc": 0.45, "avg/acc": 0.485}),
        ("rtn", 4, "int4-asym-g64", {"piqa/acc": 0.64, "piqa/acc_norm": 0.63, "boolq/acc": 0.59, "avg/acc": 0.615}),
    ]
    return pd.DataFrame(
        [
            {"model": "m", "method": method, "bits": bits, "act_bits": None, "format": fmt, "ppl/wiki": 20.0}
            | {f"zeroshot/{name}": value for name, value in metrics.items()}
            for method, bits, fmt, metrics in rows
        ]
    )


def test_task_table_has_a_row_per_setting_and_averages_last() -> None:
    frame = store_frame()
    metrics = select_metrics(frame, ["zeroshot/*/acc", "zeroshot/*/acc_norm"])
    assert metrics == ["zeroshot/boolq/acc", "zeroshot/piqa/acc", "zeroshot/piqa/acc_norm", "zeroshot/avg/acc"]
    table = metric_table(frame, metrics)
    assert list(table.columns) == ["boolq/acc", "piqa/acc", "piqa/acc_norm", "avg/acc"]
    assert list(table.index) == [("m", "fp", "full precision"), ("m", "rtn", "W4 int4-asym-g64"), ("m", "rtn", "W2 int2-asym-g64")]
    assert table.loc[("m", "rtn", "W2 int2-asym-g64"), "piqa/acc"] == 0.52


def test_unknown_metric_pattern_lists_the_metrics_there() -> None:
    with pytest.raises(ConfigError, match=r"matches nothing in the store; metrics there: \['ppl/wiki', 'zeroshot/avg/acc'"):
        select_metrics(store_frame(), ["zeroshot/pika/*"])

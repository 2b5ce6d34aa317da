"""reports/plots.py: quantity against quantity from the results store, with its Pareto front."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from bench.store import ResultStore
from reports.plots import better, main, pareto_front, points


def cell(key: str, method: str, bits: int | None, bpw: float, ppl: float, tokens_per_s: float | None = None) -> dict:
    metrics = {"ppl/wiki": ppl} | ({"latency/decode_tokens_per_s": tokens_per_s} if tokens_per_s else {})
    return {"key": key, "sweep": "s", "model": "tiny", "method": method, "format": None if bits is None else f"int{bits}-g64",
            "bits": bits, "bits_per_weight": bpw, "metrics": metrics, "protocol": {}}


@pytest.fixture
def store(tmp_path: Path) -> Path:
    path = tmp_path / "s.sqlite"
    results = ResultStore(path)
    for record in [cell("a", "fp", None, 16.0, 10.0, 100.0), cell("b", "rtn", 4, 4.25, 12.0, 180.0), cell("c", "rtn", 2, 2.25, 40.0, 200.0),
                   cell("d", "gptq", 4, 4.25, 11.0, 175.0), cell("e", "gptq", 2, 2.25, 25.0)]:
        results.put(record)
    return path


def test_which_way_is_better_is_read_from_the_name() -> None:
    assert [better(n) for n in ("ppl/wiki", "bits_per_weight", "latency/layers_steady_us/b1", "latency/decode_peak_memory_gb")] == ["lower"] * 4
    assert [better(n) for n in ("zeroshot/arc_easy/acc", "latency/decode_tokens_per_s")] == ["higher"] * 2


def test_the_pareto_front_keeps_what_nothing_beats_on_both() -> None:
    pts = pd.DataFrame({"x": [1.0, 2.0, 2.0, 3.0, 4.0], "y": [5.0, 3.0, 4.0, 3.0, 1.0]})
    assert pareto_front(pts, "lower", "lower").index.tolist() == [0, 1, 4]  # (2, 4) and (3, 3) are beaten by (2, 3)
    assert pareto_front(pts, "higher", "lower").index.tolist() == [4]  # (4, 1): the most x and the least y


def test_plots_are_written_with_the_front_printed(store: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    main(["--store", str(store), "--out", str(tmp_path / "plots")])
    printed = capsys.readouterr().out
    assert "5 cells" in printed and "W2 int2-g64" in printed and (tmp_path / "plots" / "ppl_wiki_vs_bits_per_weight.png").stat().st_size > 0
    front = pareto_front(points(ResultStore(store).frame(), "bits_per_weight", "ppl/wiki"), "lower", "lower")
    assert list(zip(front["method"], front["setting"])) == [("gptq", "W2 int2-g64"), ("gptq", "W4 int4-g64"), ("fp", "full precision")]
    main(["--store", str(store), "--x", "latency/decode_tokens_per_s", "--out", str(tmp_path / "plots")])
    assert "4 cells" in capsys.readouterr().out and (tmp_path / "plots" / "ppl_wiki_vs_latency_decode_tokens_per_s.pdf").is_file()


def test_unknown_quantities_and_missing_stores_are_named(store: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        main(["--store", str(store), "--y", "ppl/lee"])
    err = capsys.readouterr().err
    assert "['ppl/lee']" in err and "'ppl/wiki'" in err and "'bits_per_weight'" in err
    with pytest.raises(SystemExit):
        main(["--store", str(tmp_path / "none.sqlite")])
    assert "no results store" in capsys.readouterr().err

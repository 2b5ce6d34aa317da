import multiprocessing as mp
from pathlib import Path

from bench.store import ResultStore


def _record(key: str, ppl: float) -> dict:
    return {"key": key, "model": "m", "method": "rtn", "bits": 4, "metrics": {"ppl/wiki": ppl}, "config": {"bits": 4}}


def test_failure_never_overwrites_a_finished_row(tmp_path: Path) -> None:
    store = ResultStore(tmp_path / "s.sqlite")
    store.put(_record("a", 10.0))
    store.put_failed(_record("a", float("nan")), "RuntimeError: boom")
    row = store.get("a")
    assert row["status"] == "done" and row["metrics"] == {"ppl/wiki": 10.0} and row["error"] is None
    store.put_failed(_record("b", 0.0), "RuntimeError: boom")
    assert store.get("b")["status"] == "failed"
    store.put(_record("b", 12.0))
    assert store.get("b")["status"] == "done" and store.get("b")["error"] is None


def test_frame_flattens_metrics_and_filters(tmp_path: Path) -> None:
    store = ResultStore(tmp_path / "s.sqlite")
    store.put(_record("a", 10.0))
    store.put({**_record("b", 20.0), "method": "fp", "bits": None})
    frame = store.frame(method="rtn")
    assert list(frame["key"]) == ["a"] and frame["ppl/wiki"].tolist() == [10.0]
    assert len(store.frame()) == 2


def _writer(path: str, start: int) -> None:
    store = ResultStore(path)
    for i in range(start, start + 25):
        store.put(_record(f"k{i}", float(i)))


def test_parallel_writers_lose_nothing(tmp_path: Path) -> None:
    path = str(tmp_path / "s.sqlite")
    ResultStore(path)
    procs = [mp.get_context("spawn").Process(target=_writer, args=(path, s)) for s in (0, 25, 50)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
        assert p.exitcode == 0
    assert sorted(ResultStore(path).frame()["ppl/wiki"]) == [float(i) for i in range(75)]

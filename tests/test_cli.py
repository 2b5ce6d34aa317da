"""The entry point as a user runs it: real multirun sweeps, re-runs, W&B directories, one-line errors."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from bench.store import ResultStore
from reports.leaderboard import main as leaderboard_main
from tests.conftest import run_cli


def test_sweep_runs_fp_once_skips_on_rerun_and_leaves_wandb_runs(tmp_path: Path, capsys) -> None:
    store = tmp_path / "results.sqlite"
    args = ["-m", "model=tiny", "method=fp,rtn", "bits=2,3,4", f"store.path={store}", f"tracker.dir={tmp_path}",
            f"hydra.sweep.dir={tmp_path}/multirun"]  # fmt: skip
    first = run_cli(*args)
    assert first.returncode == 0, first.stderr[-2000:]
    frame = ResultStore(store).frame()
    assert sorted(frame["method"]) == ["fp", "rtn", "rtn", "rtn"]
    assert sorted(frame["bits"].dropna().astype(int)) == [2, 3, 4]
    assert len(re.findall(r"finished earlier, skipped", first.stdout)) == 2  # fp with bits=3 and bits=4
    wandb_runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert {run.name.rsplit("-", 1)[-1] for run in wandb_runs} == set(frame["key"])

    again = run_cli(*args)
    assert again.returncode == 0, again.stderr[-2000:]
    assert len(re.findall(r"finished earlier, skipped", again.stdout)) == 6
    assert ResultStore(store).frame()["updated_at"].tolist() == frame["updated_at"].tolist()

    leaderboard_main(["--store", str(store), "--out", str(tmp_path / "lb")])
    table = capsys.readouterr().out
    assert "full precision" in table and "W2 int2-asym-g32" in table and "tiny-llama" in table
    assert (tmp_path / "lb" / "leaderboard_ppl_wiki.tex").is_file()


@pytest.fixture(scope="module")
def finished_store(tmp_path_factory) -> Path:
    """A store holding one finished cell, made once through the CLI."""
    tmp = tmp_path_factory.mktemp("finished")
    ok = run_cli("model=tiny", "method=fp", "tracker=none", f"store.path={tmp}/results.sqlite", f"hydra.run.dir={tmp}/run")
    assert ok.returncode == 0, ok.stderr[-2000:]
    return tmp / "results.sqlite"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["model=nope"], "model='nope' is not a config in conf/model/; choose one of ['gemma3_270m', 'hf', 'smollm2', 'tiny']"),
        (["-m", "method=fp,bogus"], "method='bogus' is not a config in conf/method/; choose one of"),
        (["format=int9"], "format='int9' is not a config in conf/format/"),
        (["model=tiny", "bits=99"], "bits=99 is not valid; choose an integer in 1..16"),
        (["model=tiny", "group_size=48"], "group_size=48 does not divide the input width 64 of layer model.layers.0.self_attn.q_proj"),
        (["model=hf", "model.path=/nonexistent/ckpt"], "model.path='/nonexistent/ckpt' is not a directory"),
    ],
)
def test_bad_input_is_one_line_nonzero_and_leaves_the_store(tmp_path: Path, finished_store: Path, args, message) -> None:
    store = tmp_path / "results.sqlite"
    shutil.copy(finished_store, store)
    before = store.read_bytes()
    bad = run_cli(*args, "tracker=none", f"store.path={store}", f"hydra.run.dir={tmp_path}/run", f"hydra.sweep.dir={tmp_path}/m")
    assert bad.returncode != 0
    errors = [line for line in bad.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], bad.stderr[-2000:]
    assert store.read_bytes() == before

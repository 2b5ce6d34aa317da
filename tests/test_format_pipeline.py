"""Formats through the real configs and the pipeline (Hydra compose API, tiny model)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from bench.pipeline import run_cell
from bench.store import ResultStore
from methods.common.formats import FormatError

CONF = str(Path(__file__).resolve().parent.parent / "conf")
FAST_EVAL = ["eval.ppl.max_windows=1", "eval.ppl.seqlen=128"]


def cell(tmp_path: Path, *overrides: str):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose("config", overrides=["model=tiny", "method=rtn", "tracker=none", f"store.path={tmp_path}/s.sqlite", *FAST_EVAL, *overrides])


def test_mxfp4_weights_record_the_formats_bits(tmp_path):
    record = run_cell(cell(tmp_path, "format=mxfp4", "bits=8"))
    assert (record["format"], record["bits"], record["group_size"], record["act_bits"]) == ("mxfp4", 4, "32", None)
    assert record["bits_per_weight"] == pytest.approx(4.25)
    assert record["config"]["bits"] == 4
    # bits=8 does not apply to MXFP4: the same cell as with the default bits, so it is found finished.
    assert run_cell(cell(tmp_path, "format=mxfp4"))["key"] == record["key"]


def test_weights_and_activations_in_nvfp4_with_hadamard(tmp_path):
    record = run_cell(cell(tmp_path, "format=nvfp4_had", "act_format=nvfp4_had", "act_bits=8"))
    assert (record["format"], record["bits"], record["act_bits"]) == ("nvfp4+had16", 4, 4)
    assert 4.5 < record["bits_per_weight"] < 4.51
    assert all(value > 1 for value in record["metrics"].values())


def test_fp_exmy_format_and_activation_format(tmp_path):
    record = run_cell(cell(tmp_path, "format=fp", "format.exp_bits=3", "format.man_bits=2", "act_format=fp_token", "act_bits=6"))
    assert (record["format"], record["bits"], record["act_bits"]) == ("fp-e3m2-g32-fp16", 6, 4)
    assert record["bits_per_weight"] == pytest.approx(6 + 16 / 32)
    frame = ResultStore(tmp_path / "s.sqlite").frame()
    assert list(frame["format"]) == ["fp-e3m2-g32-fp16"]


def test_bad_format_knob_fails_before_any_work(tmp_path):
    with pytest.raises(FormatError, match="element='e9m9'"):
        run_cell(cell(tmp_path, "format=mxfp4", "format.element=e9m9"))
    assert not (tmp_path / "s.sqlite").exists() or ResultStore(tmp_path / "s.sqlite").frame().empty


def test_int_vs_fp_sweep_config():
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("config", overrides=["+sweep=int_vs_fp", "format=nvint4_had", "act_bits=4"], return_hydra_config=True)
    params = cfg.hydra.sweeper.params
    assert params.format.split(",") == ["mxint8", "mxfp8_e4m3", "mxfp4", "mxfp4_had", "nvfp4", "nvfp4_had", "nvint4", "nvint4_had"]
    assert params.act_bits == "null,4"
    assert cfg.act_format == cfg.format and cfg.sweep_name == "int_vs_fp" and cfg.method.name == "rtn"


@pytest.mark.slow
def test_int_vs_fp_sweep_runs_end_to_end(tmp_path):
    """The exact invocation of the issue, on the tiny model: 16 cells, all finished, true bits recorded."""
    root = Path(CONF).parent
    command = [sys.executable, "run.py", "-m", "+sweep=int_vs_fp", "model=tiny", "tracker=none", f"store.path={tmp_path}/s.sqlite",
               f"hydra.sweep.dir={tmp_path}/multirun", *FAST_EVAL]
    subprocess.run(command, cwd=root, check=True, capture_output=True)
    frame = ResultStore(tmp_path / "s.sqlite").frame()
    assert len(frame) == 16 and set(frame["status"]) == {"done"} and set(frame["sweep"]) == {"int_vs_fp"}
    w8 = frame[frame["format"].isin(["mxint8", "mxfp8_e4m3"])]
    assert set(w8["bits"]) == {8} and set(w8["act_bits"].dropna()) == {8}

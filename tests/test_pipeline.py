"""One cell end to end on the tiny random model, through the real configs."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from bench.errors import ConfigError
from bench.pipeline import cell_key, run_cell
from bench.store import ResultStore
from methods.fp import FullPrecision
from methods.rtn import RTN
from tests.conftest import compose_config


def test_rtn_cell_writes_a_complete_record(tiny, store_path: Path) -> None:
    record = run_cell(tiny("method=rtn", "bits=4"))
    stored = ResultStore(store_path).get(record["key"])
    assert stored["status"] == "done"
    assert stored["bits"] == 4 and stored["group_size"] == "32" and stored["format"] == "int4-asym-g32"
    assert math.isclose(stored["bits_per_weight"], 4 + 20 / 32)
    assert set(stored["metrics"]) == {"ppl/wiki", "ppl/lee"}
    ppl = stored["protocol"]["ppl"]["wiki"]
    assert ppl["join"] == "\n\n" and ppl["seqlen"] == 256 and ppl["windows_used"] == 4 and ppl["bos"] is False
    assert len(ppl["text_sha256"]) == 64
    assert stored["env"]["versions"]["torch"] and stored["config"]["model"]["name"] == "tiny-llama"
    assert stored["timings"]["total"] >= stored["timings"]["eval_forward"] > 0


def test_lower_bits_cost_more_error(tiny) -> None:
    ppl = {bits: run_cell(tiny("method=rtn", f"bits={bits}"))["metrics"]["ppl/wiki"] for bits in (2, 8)}
    fp = run_cell(tiny("method=fp"))["metrics"]["ppl/wiki"]
    assert abs(ppl[8] - fp) / fp < 0.01
    assert abs(ppl[2] - fp) > abs(ppl[8] - fp)


def test_rerun_is_skipped_and_force_recomputes(tiny, capsys) -> None:
    first = run_cell(tiny("method=rtn", "bits=3"))
    again = run_cell(tiny("method=rtn", "bits=3"))
    assert "finished earlier, skipped" in capsys.readouterr().out
    assert again["updated_at"] is not None and again["metrics"] == first["metrics"]
    forced = run_cell(tiny("method=rtn", "bits=3", "force=true"))
    assert forced["key"] == first["key"]


def test_fp_key_ignores_bit_knobs_but_rtn_key_does_not() -> None:
    def key(method_cls, *overrides):
        from omegaconf import OmegaConf

        cfg = compose_config("model=tiny", *overrides)
        return cell_key(OmegaConf.to_container(cfg, resolve=True), method_cls.uses)

    assert key(FullPrecision, "method=fp", "bits=2") == key(FullPrecision, "method=fp", "bits=4", "group_size=16")
    assert key(RTN, "bits=2") != key(RTN, "bits=4")
    assert key(RTN, "bits=4", "tracker=none", "store.path=/elsewhere") == key(RTN, "bits=4")


def test_activation_quantization_changes_the_result(tiny) -> None:
    w_only = run_cell(tiny("method=rtn", "bits=8"))["metrics"]["ppl/wiki"]
    w_a = run_cell(tiny("method=rtn", "bits=8", "act_bits=3"))["metrics"]["ppl/wiki"]
    assert w_a != w_only


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["bits=0"], "bits=0 is not valid; choose an integer in 1..16"),
        (["bits=17"], "bits=17"),
        (["act_bits=0"], "act_bits=0"),
        (["group_size=48"], "group_size=48 does not divide the input width 64 of layer model.layers.0.self_attn.q_proj"),
        (["format.symmetric=true", "bits=1"], "bits=1 has no symmetric int grid"),
    ],
)
def test_bad_input_fails_before_touching_the_store(tiny, store_path: Path, overrides, message) -> None:
    done = run_cell(tiny("method=rtn", "bits=4"))
    before = store_path.read_bytes()
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        run_cell(tiny("method=rtn", *overrides))
    assert ResultStore(store_path).get(done["key"])["status"] == "done"
    assert len(ResultStore(store_path).frame(status=None)) == 1
    assert store_path.read_bytes() == before

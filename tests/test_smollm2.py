"""The shipped SmolLM2-135M through the pipeline, with a small evaluation window cap."""

from __future__ import annotations

import pytest

from bench.pipeline import run_cell
from reports.leaderboard import leaderboard
from bench.store import ResultStore

QUICK_EVAL = ("eval.ppl.seqlen=512", "eval.ppl.max_windows=2", "tracker=none")


def test_smollm2_fp_and_rtn_perplexity(store_path) -> None:
    from tests.conftest import compose_config

    def cell(*overrides: str) -> dict:
        return run_cell(compose_config("model=smollm2", f"store.path={store_path}", *QUICK_EVAL, *overrides))

    fp = cell("method=fp")
    assert fp["report"]["extras"] == {} and fp["bits_per_weight"] == 32.0
    assert 5 < fp["metrics"]["ppl/wiki"] < 60, fp["metrics"]  # a real language model, not noise
    assert "Q4_1" in fp["protocol"]["model"]["source_quantization"]
    w4 = cell("method=rtn", "bits=4")
    w2 = cell("method=rtn", "bits=2")
    assert w4["group_size"] == "64" and abs(w4["bits_per_weight"] - (4 + 20 / 64)) < 1e-9
    ppl = {name: r["metrics"]["ppl/wiki"] for name, r in (("fp", fp), ("w4", w4), ("w2", w2))}
    assert ppl["fp"] < ppl["w4"] < 2 * ppl["fp"], ppl
    assert ppl["w2"] > 10 * ppl["fp"], ppl


@pytest.mark.slow
def test_smollm2_default_sweep_orders_rtn_by_bits(store_path) -> None:
    from tests.conftest import compose_config

    for overrides in (["method=fp"], *[["method=rtn", f"bits={b}"] for b in (2, 3, 4)]):
        run_cell(compose_config("model=smollm2", f"store.path={store_path}", "tracker=none", *overrides))
    table = leaderboard(ResultStore(store_path).frame(), "ppl/wiki").loc[("smollm2-135m", "rtn")]
    fp = leaderboard(ResultStore(store_path).frame(), "ppl/wiki").loc[("smollm2-135m", "fp"), "full precision"]
    w4, w3, w2 = (table[f"W{b} int{b}-asym-g64"] for b in (4, 3, 2))
    assert fp < w4 < w3 < w2 and w2 > 10 * fp

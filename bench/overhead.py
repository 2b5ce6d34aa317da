"""Where a cell's time goes: the share spent outside model forward passes and the method itself.

    python -m bench.overhead                       # SmolLM2, RTN W4 g64, default eval caps
    python -m bench.overhead model=tiny bits=3     # any config overrides

Runs the cells in one process, as the basic launcher does (the first one also loads the model from
disk), with ``force=true`` and a throw-away store, and prints each phase. Target: overhead < 5%.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from hydra import compose, initialize_config_dir

from bench.pipeline import run_cell

CONF = Path(__file__).resolve().parent.parent / "conf"
DEFAULTS = ("method=rtn", "tracker=wandb", "force=true")


def main(overrides: list[str]) -> None:
    with tempfile.TemporaryDirectory() as tmp, initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        args = [*DEFAULTS, f"store.path={tmp}/overhead.sqlite", f"tracker.dir={tmp}", *overrides]
        for attempt in ("first cell (loads the model)", "second cell (model in memory)"):
            timings = run_cell(compose("config", overrides=args))["timings"]
            inside = timings["eval_forward"] + timings["quantize"]
            print(f"{attempt}:")
            for phase in ("load", "calibration", "quantize", "eval", "eval_forward", "total"):
                if phase in timings:
                    print(f"  {phase:<13} {timings[phase]:8.2f} s")
            print(f"  outside forward passes and the method: {timings['total'] - inside:.2f} s = {timings['overhead_share']:.1%} (target < 5%)")


if __name__ == "__main__":
    main(sys.argv[1:])

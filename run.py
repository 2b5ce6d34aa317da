"""Entry point: one grid cell per job. `python run.py -m method=fp,rtn bits=2,3,4` sweeps a grid."""

import sys

import hydra
from omegaconf import DictConfig

from bench.config_check import check_group_overrides
from bench.errors import UserError
from bench.pipeline import run_cell


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    try:
        record = run_cell(cfg)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)
    metrics = record.get("metrics") or {}
    return next(iter(metrics.values()), None)  # the primary metric, for sweepers that optimize


if __name__ == "__main__":
    try:
        check_group_overrides(sys.argv[1:])
    except UserError as err:
        sys.exit(f"error: {err}")
    main()

"""Plots rebuilt from the results store: one quantity against another, a point per finished cell, a line per
model x method, and the Pareto front over all of them.

    python -m reports.plots --y ppl/wiki --x bits_per_weight            # quality against size
    python -m reports.plots --y ppl/wiki --x latency/decode_tokens_per_s  # quality against speed (eval=latency cells)

``--x`` and ``--y`` take a metric of the store (``ppl/wiki``, ``zeroshot/...``, ``latency/...``) or one of its
columns (``bits_per_weight``, ``bits``, ``act_bits``). Which way is better is read from the name (perplexity,
bits, microseconds, milliseconds and memory: lower; accuracy and tokens/s: higher) unless ``--x-better`` /
``--y-better`` say it. Written as PNG and PDF (matplotlib, no display needed).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from bench.errors import ConfigError  # noqa: E402
from reports.leaderboard import add_selection_args, selected_frame, setting_label  # noqa: E402

COLUMNS = ("bits_per_weight", "bits", "act_bits")
LOWER_IS_BETTER = ("ppl", "bits", "_us", "_ms", "memory", "_gb", "fid")  # name fragments; anything else: higher


def better(name: str) -> str:
    """"lower" or "higher", read from the quantity's name."""
    return "lower" if any(fragment in name for fragment in LOWER_IS_BETTER) else "higher"


def points(frame: pd.DataFrame, x: str, y: str) -> pd.DataFrame:
    """One row per cell with both quantities: model, method, setting (as in the leaderboard), x, y."""
    known = sorted(c for c in frame.columns if "/" in c) + list(COLUMNS)
    missing = [name for name in (x, y) if name not in frame.columns or (name not in COLUMNS and "/" not in name)]
    if missing:
        raise ConfigError(f"{missing} not in the store; choose from {known}")
    rows = frame[frame[x].notna() & frame[y].notna()].copy()
    if rows.empty:
        raise ConfigError(f"no finished cell has both {x!r} and {y!r}")
    rows["setting"] = rows.apply(setting_label, axis=1)
    return rows[["model", "method", "setting", x, y]].rename(columns={x: "x", y: "y"}).reset_index(drop=True)


def pareto_front(pts: pd.DataFrame, x_better: str, y_better: str) -> pd.DataFrame:
    """The points no other point beats on both quantities (ties kept), sorted by x."""
    sx = 1.0 if x_better == "lower" else -1.0
    sy = 1.0 if y_better == "lower" else -1.0
    keys = list(zip(sx * pts["x"], sy * pts["y"]))
    dominated = [any(ox <= px and oy <= py and (ox, oy) != (px, py) for ox, oy in keys) for px, py in keys]
    return pts[[not d for d in dominated]].sort_values("x")


def plot(pts: pd.DataFrame, x: str, y: str, x_better: str, y_better: str, out: Path, log_y: bool = False) -> dict[str, Path]:
    """A line per model x method (sorted by x, each point labelled with its setting), the front dashed."""
    fig, ax = plt.subplots(figsize=(7.5, 5))
    for (model, method), group in pts.groupby(["model", "method"], sort=True):
        group = group.sort_values("x")
        ax.plot(group["x"], group["y"], marker="o", label=f"{model} {method}")
        for _, row in group.iterrows():
            ax.annotate(row["setting"], (row["x"], row["y"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    front = pareto_front(pts, x_better, y_better)
    ax.plot(front["x"], front["y"], linestyle="--", color="black", linewidth=1, label="Pareto front")
    ax.set_xlabel(f"{x} ({x_better} is better)")
    ax.set_ylabel(f"{y} ({y_better} is better)")
    if log_y:
        ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{y}_vs_{x}".replace("/", "_")
    paths = {kind: out / f"{stem}.{kind}" for kind in ("png", "pdf")}
    for path in paths.values():
        fig.savefig(path)
    plt.close(fig)
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_selection_args(parser)
    parser.add_argument("--x", default="bits_per_weight")
    parser.add_argument("--y", default="ppl/wiki")
    parser.add_argument("--x-better", choices=("lower", "higher"), help="default: read from the name")
    parser.add_argument("--y-better", choices=("lower", "higher"), help="default: read from the name")
    parser.add_argument("--log-y", action="store_true")
    parser.add_argument("--out", default="results/plots")
    args = parser.parse_args(argv)
    frame = selected_frame(parser, args)
    try:
        pts = points(frame, args.x, args.y)
    except ConfigError as err:
        parser.error(str(err))
    x_better, y_better = args.x_better or better(args.x), args.y_better or better(args.y)
    paths = plot(pts, args.x, args.y, x_better, y_better, Path(args.out), args.log_y)
    front = pareto_front(pts, x_better, y_better)
    print(f"{len(pts)} cells; Pareto front ({args.x} {x_better}, {args.y} {y_better}):")
    print(front.to_markdown(index=False, floatfmt=".4g"))
    print("written: " + ", ".join(str(p) for p in paths.values()))


if __name__ == "__main__":
    main()

"""Leaderboard tables rebuilt from the results store: Markdown, CSV and LaTeX pivots.

Rows are model x method, columns are bit settings (weight bits, activation bits, format), values are
one metric. ``python -m reports.leaderboard --metric ppl/wiki --model smollm2-135m --out results/leaderboard``
"""

from __future__ import annotations

import argparse
import fnmatch
from pathlib import Path

import pandas as pd

from bench.errors import ConfigError
from bench.store import ResultStore

FULL_PRECISION = "full precision"


def setting_label(row: pd.Series) -> str:
    """``W4 int4-asym-g64``, ``W4A8 ...``; methods that ignore bit knobs (fp) get ``full precision``."""
    if pd.isna(row["bits"]):
        return FULL_PRECISION
    weight = f"W{int(row['bits'])}"
    act = f"A{int(row['act_bits'])}" if pd.notna(row["act_bits"]) else ""
    return f"{weight}{act} {row['format']}"


def leaderboard(frame: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Pivot ``frame`` (from ``ResultStore.frame``) to rows model x method and columns bit settings.

    A pattern with ``*`` (``zeroshot/*``) gives the wide table instead: rows model x method x setting,
    one column per matching metric (e.g. every task's acc and acc_norm).
    """
    metrics = sorted(c for c in frame.columns if "/" in c)
    chosen = fnmatch.filter(metrics, metric)
    if not chosen:
        raise ConfigError(f"metric {metric!r} is not in the store; metrics there: {metrics}")
    frame = frame[frame[chosen].notna().any(axis=1)].copy()
    frame["setting"] = frame.apply(setting_label, axis=1)
    if "*" in metric:
        table = frame.groupby(["model", "method", "setting"])[chosen].last()
        return table.sort_index(key=lambda index: index.map(_setting_order) if index.name == "setting" else index)
    table = frame.pivot_table(index=["model", "method"], columns="setting", values=metric, aggfunc="last")
    columns = sorted(table.columns, key=_setting_order)
    return table[columns]


def _setting_order(label: str) -> tuple:
    if label == FULL_PRECISION:
        return (0, 0, label)
    return (1, -int(label[1:].split()[0].split("A")[0]), label)


def source_notes(frame: pd.DataFrame) -> list[str]:
    """One line per model whose shipped weights already sat on a quantization grid."""
    notes = {}
    for _, row in frame.iterrows():
        source = (row["protocol"] or {}).get("model", {}).get("source_quantization")
        if source:
            notes[row["model"]] = source
    return [f"{model}: {text}" for model, text in sorted(notes.items())]


def _markdown(table: pd.DataFrame) -> str:
    flat = table.reset_index().astype(object)
    return flat.where(flat.notna(), None).to_markdown(index=False, floatfmt=".3f", missingval="--")


def write_reports(table: pd.DataFrame, notes: list[str], metric: str, out: Path) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    stem = metric.replace("/", "_").replace("*", "all")
    paths = {kind: out / f"leaderboard_{stem}.{kind}" for kind in ("md", "csv", "tex")}
    footer = "".join(f"\n- {note}" for note in notes)
    paths["md"].write_text(f"# {metric}\n\n{_markdown(table)}\n" + (f"\nSource models:{footer}\n" if notes else ""))
    table.to_csv(paths["csv"])
    paths["tex"].write_text(table.to_latex(float_format="%.3f", na_rep="--"))
    return paths


def add_selection_args(parser: argparse.ArgumentParser) -> None:
    """The store and the cells to read from it (``--store``, ``--model``, ``--method``, ``--sweep``)."""
    parser.add_argument("--store", default="results/results.sqlite")
    parser.add_argument("--model", nargs="*", help="keep only these models")
    parser.add_argument("--method", nargs="*", help="keep only these methods")
    parser.add_argument("--sweep", nargs="*", help="keep only these sweeps")


def selected_frame(parser: argparse.ArgumentParser, args: argparse.Namespace) -> pd.DataFrame:
    """The finished cells that :func:`add_selection_args`' options select; a parser error where there are none."""
    if not Path(args.store).is_file():
        parser.error(f"no results store at {args.store!r}; run a sweep first or pass --store")
    filters = {k: v for k, v in {"model": args.model, "method": args.method, "sweep": args.sweep}.items() if v}
    frame = ResultStore(args.store).frame(**filters)
    if frame.empty:
        parser.error(f"no finished cells in {args.store!r} match {filters or 'the store'}")
    return frame


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_selection_args(parser)
    parser.add_argument("--metric", default="ppl/wiki", help="a metric, or a pattern such as 'zeroshot/*' for a wide table")
    parser.add_argument("--out", default="results/leaderboard")
    args = parser.parse_args(argv)
    frame = selected_frame(parser, args)
    try:
        table = leaderboard(frame, args.metric)
    except ConfigError as err:
        parser.error(str(err))
    paths = write_reports(table, source_notes(frame), args.metric, Path(args.out))
    print(paths["md"].read_text())
    print("written: " + ", ".join(str(p) for p in paths.values()))


if __name__ == "__main__":
    main()

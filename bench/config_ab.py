"""Kernel configs side by side: variants of a low-bit kernel's tile config timed next to cuBLAS fp16 and the
dispatcher's own config, in one process, each checked against the fp32 reference first.

    python -m bench.config_ab --path wgmma --kernels w4g128 --shapes 8192x8192,14336x4096 --batches 48,64 \
        --variant words_ahead=1 --variant words_ahead=2 --variant words_ahead=2,split_k=3
    python -m bench.config_ab --path gemv_mma --kernels w2g128,w1g128 --shapes 8192x8192 --batches 1 \
        --variant split_k=3 --variant split_k=6,stages=3 --json ab.json
    python -m bench.config_ab --path gemv_mma --kernels ternary2 --shapes 8192x8192 --batches 1 --save-best \
        --variant stages=0,block_n=64,num_warps=16,split_k=1,k_warps=4,maxnreg=128

A variant names fields of the path's config (``GemmWgmmaConfig`` for ``wgmma``, ``GemvMmaConfig`` for ``gemv_mma``,
``lowbit_matmul``'s ``MmaConfig``, ``GemmConfig`` and ``GemvConfig`` for the Triton kernels ``mma``, ``gemm``, ``gemv``
and ``gemv_fp32``) that replace those of the config the path runs at that cell when given none (tuned, saved or the
rules': ``bench.kernel_latency.path_config``); that config itself is always the first column, ``rule``.

The timings are the steady state of :func:`bench.timing.steady_interleaved` (every variant's CUDA graph and
cuBLAS's replayed in turn over rotating weight copies), so the ratios between variants are not biased by clock
drift over the run; this is how the rules' figures in ``bench/results/kernel_latency_h200.md`` were measured
(sessions 14-22, from scratch scripts). A variant that does not compile, does not fit or is wrong (relative error
above ``bench.kernel_latency.TUNE_TOLERANCE``: :func:`~bench.kernel_latency.checked_error`, the tuner's check) is
reported and not timed. With ``--save-best`` (the two kernels whose tuned configs :mod:`qkernels.tuned` keeps,
``gemv_mma`` and ``wgmma``) the fastest variant of a cell that beats ``rule`` by at least ``--min-gain`` (never a
``tiled_words`` one: :func:`best_variant`) is merged into this GPU's tuned-config file, as ``bench.kernel_latency
--tune-gemv-mma --save-tuned`` merges its search's winners; later processes on that GPU model run it. No hydra
imports: this runs on the bare device machine.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from dataclasses import asdict, fields, replace
from pathlib import Path
from typing import Any, Callable

import torch

from bench.kernel_latency import LOWBIT_KINDS, checked_error, fp16_calls, lowbit_calls, path_config, random_packed
from bench.timing import gpu_name, steady_interleaved
from qkernels import lowbit_matmul as lm
from qkernels import tuned
from qkernels.pack import PackedWeight


def config_class(path: str) -> type:
    from qkernels.gemm_wgmma import GemmWgmmaConfig
    from qkernels.gemm_ws import GemmWsConfig
    from qkernels.gemv_mma import GemvMmaConfig

    return {"wgmma": GemmWgmmaConfig, "wgmma_ws": GemmWsConfig, "gemv_mma": GemvMmaConfig, "mma": lm.MmaConfig, "gemm": lm.GemmConfig,
            "gemv": lm.GemvConfig, "gemv_fp32": lm.GemvConfig}[path]


PATHS = ("wgmma", "wgmma_ws", "gemv_mma", "mma", "gemm", "gemv", "gemv_fp32")
MAX_M = {"wgmma_ws": 64, "gemv_mma": lm.GEMV_MAX_M, "gemv": lm.GEMV_MAX_M, "gemv_fp32": lm.GEMV_MAX_M, "mma": lm.MMA_MAX_M}  # rows a path takes


def parse_variant(text: str, cls: type) -> dict[str, Any]:
    """``"words_ahead=2,split_k=3"`` -> ``{"words_ahead": 2, "split_k": 3}`` for the fields of ``cls``: integers,
    ``true``/``false``, ``none``."""
    names = [f.name for f in fields(cls)]
    out: dict[str, Any] = {}
    for item in (part.strip() for part in text.split(",")):
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise ValueError(f"variant {text!r}: {item!r} is not field=value")
        key, value = key.strip(), value.strip()
        if key not in names:
            raise ValueError(f"variant {text!r}: {key!r} is not a field of {cls.__name__}; choose from {names}")
        lowered = value.lower()
        if lowered in ("true", "false"):
            out[key] = lowered == "true"
        elif lowered == "none":
            out[key] = None
        else:
            try:
                out[key] = int(value)
            except ValueError:
                raise ValueError(f"variant {text!r}: {key}={value!r} is not an integer, true, false or none") from None
    return out


def variant_label(overrides: dict[str, Any]) -> str:
    return ",".join(f"{key}={value}" for key, value in overrides.items())


def compare_cell(path: str, m: int, pw: PackedWeight, variants: list[dict[str, Any]], x: torch.Tensor,
                 time_calls: Callable[[dict], dict] = steady_interleaved,
                 check: Callable[[Any], tuple[float | None, str | None]] | None = None) -> list[dict]:
    """One cell's rows: cuBLAS fp16, the dispatcher's config (``rule``) and each variant of it, timed side by side
    (``time_calls``: ``{label: calls}`` -> ``{label: us}``); variants that fail their check (``check``: config ->
    relative error and why it must not be timed, :func:`bench.kernel_latency.checked_error`) carry ``failed`` and no time."""
    rule = path_config(m, pw, path)
    configs = {"rule": rule} | {variant_label(v): replace(rule, **v) for v in variants}
    check = check or (lambda config: checked_error(x, pw, path, config))
    rows = {label: dict(path=path, variant=label, config=asdict(config)) for label, config in configs.items()}
    calls = {"cublas": fp16_calls(x, pw.n)[1]()}
    for label, config in configs.items():
        error, failed = check(config)
        if error is not None:
            rows[label]["rel_error"] = error
        if failed:
            rows[label]["failed"] = failed
        else:
            calls[label] = lowbit_calls(x, pw, path, config)()
    times = time_calls(calls)
    base = times.get("rule")
    out = [dict(path="cublas", variant="fp16", us=times["cublas"], x_cublas=1.0)]
    for label, row in rows.items():
        if label in times:
            row |= dict(us=times[label], x_cublas=times["cublas"] / times[label], x_rule=base / times[label] if base else None)
        out.append(row)
    return out


def best_variant(rows: list[dict], min_gain: float) -> dict | None:
    """The fastest timed variant of one cell's rows if it beats ``rule`` by at least ``min_gain`` (a fraction of
    rule's time), else None. Never one with ``tiled_words``: its copy of the words is an A/B of the layout, not a
    layout the weights keep (a tuned file with it would hold every weight's words twice)."""
    rule = next((r for r in rows if r.get("variant") == "rule" and "us" in r), None)
    timed = [r for r in rows if r["path"] != "cublas" and r.get("variant") != "rule" and "us" in r
             and not r.get("config", {}).get("tiled_words")]
    if rule is None or not timed:
        return None
    best = min(timed, key=lambda r: r["us"])
    return best if best["us"] <= rule["us"] * (1 - min_gain) else None


def tuned_key(path: str, m: int, pw: PackedWeight) -> tuple:
    """The key under which :mod:`qkernels.tuned` keeps ``path``'s config for this weight (and batch)."""
    from qkernels import gemm_wgmma as gw
    from qkernels import gemv_mma as gm

    return gm.tuned_key(pw) if path == "gemv_mma" else gw.tuned_key(m, pw)


def markdown(rows: list[dict]) -> str:
    lines = ["| in x out | M | kernel | variant | us | x cuBLAS | x rule | rel err |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "failed" in r:
            figures = f"failed: {r['failed']} | | | |"
        else:
            x_rule = f"{r['x_rule']:.3f}" if r.get("x_rule") else ""
            figures = f"{r['us']:.2f} | {r['x_cublas']:.2f} | {x_rule} | {r.get('rel_error', 0.0):.1e} |"
        lines.append(f"| {r['K']}x{r['N']} | {r['M']} | {r['kernel']} | {r['variant']} | {figures}")
    return "\n".join(lines)


def write_json(path: Path, data: dict) -> None:
    """Replace ``path`` in one rename: an interrupted run leaves the last complete file, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=path.name, suffix=".tmp", delete=False) as f:
        json.dump(data, f, indent=1)
    os.replace(f.name, path)


def parse_grid(kernels: str, shapes: str, batches: str) -> tuple[list[str], list[tuple[int, int]], list[int]]:
    """The comma lists of ``--kernels``, ``--shapes`` (INxOUT) and ``--batches``; an unknown kernel is named."""
    kinds = [k for k in kernels.split(",") if k]
    if bad := [k for k in kinds if k not in LOWBIT_KINDS]:
        raise ValueError(f"unknown kernels {bad}; choose from {list(LOWBIT_KINDS)}")
    try:
        grid = [tuple(int(v) for v in s.split("x")) for s in shapes.split(",") if s]
    except ValueError:
        raise ValueError(f"--shapes {shapes!r} is not a comma list of INxOUT") from None
    if bad := [s for s in grid if len(s) != 2]:
        raise ValueError(f"--shapes {bad} are not INxOUT")
    try:
        return kinds, grid, [int(b) for b in batches.split(",") if b]
    except ValueError:
        raise ValueError(f"--batches {batches!r} is not a comma list of integers") from None


def cells(kinds: list[str], shapes: list[tuple[int, int]], batches: list[int]):
    """Every cell's ``(K, N, kind, packed weight, M, activations)`` on the GPU: one random weight a shape and kind."""
    for k, n in shapes:
        for kind in kinds:
            pw = random_packed(LOWBIT_KINDS[kind], n, k)
            for m in batches:
                yield k, n, kind, pw, m, torch.randn(m, k, device="cuda", dtype=torch.float16)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--path", required=True, help=f"the kernel whose config varies, of {list(PATHS)}")
    parser.add_argument("--variant", action="append", default=[], help="field=value[,field=value]: one variant (repeatable)")
    parser.add_argument("--kernels", default="w4g128", help=f"comma list of {list(LOWBIT_KINDS)}")
    parser.add_argument("--shapes", default="8192x8192", help="comma list of INxOUT")
    parser.add_argument("--batches", default="64", help="comma list of batch sizes")
    parser.add_argument("--json", type=Path, default=None, help="write every row here (after each cell)")
    parser.add_argument("--save-best", action="store_true", help="merge each cell's fastest variant, where it beats rule "
                        "by --min-gain, into this GPU's tuned-config file (gemv_mma and wgmma)")
    parser.add_argument("--min-gain", type=float, default=0.02, help="the fraction of rule's time a saved variant saves (0.02)")
    args = parser.parse_args(argv)
    if args.path not in PATHS:
        parser.error(f"--path {args.path!r} is not valid; choose from {list(PATHS)}")
    if args.save_best and args.path not in tuned.KERNELS:
        parser.error(f"--save-best keeps configs of {list(tuned.KERNELS)} (the tables qkernels.tuned keeps); --path is {args.path!r}")
    if not 0 <= args.min_gain < 1:
        parser.error(f"--min-gain {args.min_gain} is not a fraction in [0, 1)")
    try:
        variants = [parse_variant(text, config_class(args.path)) for text in args.variant]
        kinds, shapes, batches = parse_grid(args.kernels, args.shapes, args.batches)
    except ValueError as err:
        parser.error(str(err))
    if bad := [m for m in batches if m < 1 or m > MAX_M.get(args.path, m)]:
        parser.error(f"--batches {bad}: {args.path} takes 1 to {MAX_M.get(args.path)} rows")
    if not torch.cuda.is_available():
        print("no CUDA GPU: nothing to time", file=sys.stderr)
        return 1
    torch.manual_seed(0)
    print(f"GPU: {gpu_name()} | torch {torch.__version__} | {args.path} variants: {[variant_label(v) for v in variants]}", flush=True)
    rows: list[dict] = []
    for k, n, kind, pw, m, x in cells(kinds, shapes, batches):
        cell = [dict(K=k, N=n, M=m, kernel=kind) | row for row in compare_cell(args.path, m, pw, variants, x)]
        rows += cell
        print(markdown(cell).split("\n", 2)[2], flush=True)
        if args.save_best and (best := best_variant(cell, args.min_gain)):
            config = config_class(args.path)(**best["config"])
            path = tuned.save(gpu_name(), args.path, {tuned_key(args.path, m, pw): (config, best["us"])})
            best["saved"] = str(path)
            print(f"--save-best: {best['variant']} ({best['us']:.2f} us) saved in {path}", flush=True)
        if args.json:
            write_json(args.json, {"gpu": gpu_name(), "torch": torch.__version__, "path": args.path, "rows": rows})
        torch.cuda.empty_cache()
    print("\n" + markdown(rows), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

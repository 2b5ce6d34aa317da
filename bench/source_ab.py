"""Kernel source changes side by side: copies of a kernel module with text edits applied, each timed next to cuBLAS
fp16 and the package's own module in one process, at the config the package runs.

    python -m bench.source_ab --variants bench/ablations/wgmma_session24.json --kernels w4g128,w2g128 --batches 64
    python -m bench.source_ab --variants bench/ablations/wgmma_session24.json --only nodecode,nowords --json ab.json
    python -m bench.source_ab --variants bench/ablations/wgmma_session24.json --compile-only   # on a CPU, first
    python -m bench.source_ab --variants bench/ablations/gemv_session26.json --kernels w2g128,ternary2 --batches 1 \
        --config stages=0,block_n=64,num_warps=16,split_k=1,k_warps=4     # at a config the rule does not pick

``bench.config_ab`` compares configs of one kernel; this compares kernels: ablations (a part switched off, to see
what it costs; their results are wrong on purpose) and source A/Bs (a changed load, a cache hint), without a
scratch copy of the module. A variants file (JSON) names the module and its variants, each a list of edits:

    {"module": "qkernels.gemm_wgmma", "path": "wgmma",
     "variants": {"nodecode": [{"old": "...", "new": "..."}], "nowords": [...], "both": ["nodecode", "nowords"]}}

An edit replaces ``old``, which must occur exactly once in the module's source (``count`` says otherwise), with
``new``; a string names another variant whose edits come first. Every edit is checked before anything is timed
(tests/test_source_ab.py checks the shipped files against the present sources), so a file that no longer fits its
module says which edit of which variant is stale. Each variant's module is written to a temporary file and imported
under its own name (so its compiled kernels are its own), and called with the package's config for the cell
(tuned, saved or the rules': ``bench.kernel_latency.path_config``) as that module's config class. The row of a
variant carries its relative error against the fp32 reference (large for an ablation: only its time counts). A
variant shares the process's split-K buffers with every other kernel (``lowbit_matmul.split_buffers``): one that
leaves a tile counter above zero (a reduction switched off with its counter reset) makes every later split-K launch
wrong, so an ablation must keep the counters' reset (session 24 lost two runs so).
Timing: :func:`bench.timing.steady_interleaved` over rotating weight copies, as ``bench.config_ab``. No hydra
imports: this runs on the bare device machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.util
import json
import sys
import tempfile
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from bench.config_ab import cells, markdown, parse_grid, parse_variant, write_json
from bench.kernel_latency import LOWBIT_KINDS, clone_packed, fp16_calls, path_config
from bench.timing import copies_for, gpu_name, steady_interleaved
from qkernels import lowbit_matmul as lm

# the kernels a variants file can name: path -> (module, entry function, config class)
ENTRIES = {"wgmma": ("qkernels.gemm_wgmma", "gemm_wgmma", "GemmWgmmaConfig"), "wgmma_ws": ("qkernels.gemm_ws", "gemm_ws", "GemmWsConfig"),
           "gemv_mma": ("qkernels.gemv_mma", "gemv_mma", "GemvMmaConfig")}
_KEEP: list[tempfile.TemporaryDirectory] = []  # the variants' source files live as long as the process (the JIT reads them)


def read_variants(path: Path) -> dict:
    """A variants file, checked for its shape: ``module``, ``path`` (one of :data:`ENTRIES`, matching the module)
    and ``variants`` (name -> list of edits or variant names)."""
    data = json.loads(path.read_text())
    if not isinstance(data, dict) or not isinstance(data.get("variants"), dict) or not data["variants"]:
        raise ValueError(f"{path}: a variants file is an object with a non-empty 'variants' object")
    if data.get("path") not in ENTRIES:
        raise ValueError(f"{path}: path {data.get('path')!r} is not valid; choose from {list(ENTRIES)}")
    if data.get("module") != ENTRIES[data["path"]][0]:
        raise ValueError(f"{path}: module {data.get('module')!r} is not path {data['path']!r}'s module {ENTRIES[data['path']][0]!r}")
    return data


def edits_of(variants: dict, name: str, seen: tuple[str, ...] = ()) -> list[dict]:
    """Variant ``name``'s edits in order, the named variants' first."""
    if name not in variants:
        raise ValueError(f"variant {name!r} is not in the file; choose from {list(variants)}")
    if name in seen:
        raise ValueError(f"variant {name!r} includes itself (through {' -> '.join(seen)})")
    out = []
    for item in variants[name]:
        if isinstance(item, str):
            out += edits_of(variants, item, (*seen, name))
        elif isinstance(item, dict) and isinstance(item.get("old"), str) and isinstance(item.get("new"), str):
            out.append(item)
        else:
            raise ValueError(f"variant {name!r}: {item!r} is neither a variant name nor an edit {{'old': ..., 'new': ...}}")
    return out


def apply_edits(source: str, edits: list[dict], name: str) -> str:
    """``source`` with each edit applied in order; an ``old`` text found other than ``count`` (1) times is an error
    naming the variant and the text."""
    for edit in edits:
        expected = edit.get("count", 1)
        found = source.count(edit["old"])
        if found != expected:
            raise ValueError(f"variant {name!r}: the text {edit['old'][:80]!r} occurs {found} times in the source, not {expected}")
        source = source.replace(edit["old"], edit["new"])
    return source


def load_variant(module_name: str, source: str, name: str) -> ModuleType:
    """``source`` imported as a module of its own (``<module>__<name>``), from a file that lives with the process."""
    folder = tempfile.TemporaryDirectory(prefix="source_ab_")
    _KEEP.append(folder)
    unique = f"{module_name.rsplit('.', 1)[-1]}__{name}"
    file = Path(folder.name) / f"{unique}.py"
    file.write_text(source)
    spec = importlib.util.spec_from_file_location(unique, file)
    module = importlib.util.module_from_spec(spec)
    sys.modules[unique] = module  # (dataclasses look their module up while the class is made)
    spec.loader.exec_module(module)
    return module


def variant_sources(data: dict, names: list[str]) -> dict[str, str]:
    """Every named variant's source: the module's present source with the variant's edits (all checked here)."""
    source = Path(importlib.import_module(data["module"]).__file__).read_text()
    return {name: apply_edits(source, edits_of(data["variants"], name), name) for name in names}


def compile_variants(module_name: str, sources: dict[str, str]) -> list[str]:
    """Each variant's kernels compiled for sm_90 without a GPU: every case of :mod:`qkernels.compile_check` whose kernel
    lives in ``module_name``, with the variant's kernel of that name; one line a case (its registers and spills, or
    why it failed), before any device time is spent on them."""
    from qkernels import compile_check as cc

    cases = [case for case in cc.gluon_cases() if case.kernel.fn.__module__ == module_name]
    lines = []
    for name, source in sources.items():
        module = load_variant(module_name, source, name)
        for case in cases:
            own = dataclasses.replace(case, kernel=getattr(module, case.kernel.fn.__name__))
            try:
                lines.append(f"{name} | {case.name}: {cc.compile_case(own, 90)}")
            except Exception as err:  # noqa: BLE001 - every variant is reported
                lines.append(f"{name} | {case.name}: FAILED {type(err).__name__}: {str(err).strip().splitlines()[-1] if str(err).strip() else ''}")
    return lines


def compare_cell(path: str, m: int, pw: Any, modules: dict[str, ModuleType], x: torch.Tensor, overrides: dict | None = None) -> list[dict]:
    """One cell's rows: cuBLAS, the package's module (``package``) and each variant's, side by side at the package's
    config (with ``overrides``: those fields replaced, e.g. to reach a kernel the rule does not pick at this cell), each
    with its relative error against the fp32 reference."""
    _, entry, config_class = ENTRIES[path]
    config = dataclasses.replace(path_config(m, pw, path), **(overrides or {}))
    y = torch.empty(m, pw.n, device=x.device, dtype=x.dtype)
    copies = [pw] + [clone_packed(pw) for _ in range(copies_for(pw.nbytes()) - 1)]
    reference = lm.reference_matmul(x, pw).float()
    calls = {"cublas": fp16_calls(x, pw.n)[1]()}
    errors = {}
    for label, module in ({"package": importlib.import_module(ENTRIES[path][0])} | modules).items():
        function = getattr(module, entry)
        own = getattr(module, config_class)(**dataclasses.asdict(config))
        errors[label] = ((function(x, pw, own).float() - reference).norm() / reference.norm()).item()
        calls[label] = [lambda p=p, f=function, c=own: f(x, p, c, out=y) for p in copies]
    times = steady_interleaved(calls)
    rows = [dict(path="cublas", variant="fp16", us=times["cublas"], x_cublas=1.0)]
    for label, error in errors.items():
        rows.append(dict(path=path, variant=label, config=dataclasses.asdict(config), us=times[label], x_cublas=times["cublas"] / times[label],
                         x_rule=times["package"] / times[label], rel_error=error))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", type=Path, required=True, help="the variants file (JSON; see the module's docstring)")
    parser.add_argument("--only", default="", help="comma list of the file's variants to time (all by default)")
    parser.add_argument("--kernels", default="w4g128", help=f"comma list of {list(LOWBIT_KINDS)}")
    parser.add_argument("--shapes", default="8192x8192", help="comma list of INxOUT")
    parser.add_argument("--batches", default="64", help="comma list of batch sizes")
    parser.add_argument("--json", type=Path, default=None, help="write every row here (after each cell)")
    parser.add_argument("--config", default="", help="field=value[,field=value]: fields of the path's config class replaced in every "
                                                      "cell's config (the package's and the variants' alike)")
    parser.add_argument("--compile-only", action="store_true", help="compile each variant's kernels for sm_90 (no GPU needed)")
    args = parser.parse_args(argv)
    try:
        data = read_variants(args.variants)
        names = [n for n in args.only.split(",") if n] or list(data["variants"])
        kinds, shapes, batches = parse_grid(args.kernels, args.shapes, args.batches)
        sources = variant_sources(data, names)  # every edit of every variant checked before the GPU is touched
        module_name, _, config_class = ENTRIES[data["path"]]
        overrides = parse_variant(args.config, getattr(importlib.import_module(module_name), config_class)) if args.config else {}
    except (ValueError, OSError) as err:
        parser.error(str(err))
    if args.compile_only:
        lines = compile_variants(data["module"], sources)
        print("\n".join(lines))
        return 1 if any("FAILED" in line for line in lines) else 0
    if not torch.cuda.is_available():
        print("no CUDA GPU: nothing to time", file=sys.stderr)
        return 1
    torch.manual_seed(0)
    modules = {name: load_variant(data["module"], source, name) for name, source in sources.items()}
    print(f"GPU: {gpu_name()} | torch {torch.__version__} | {data['module']} variants: {names}", flush=True)
    rows: list[dict] = []
    for k, n, kind, pw, m, x in cells(kinds, shapes, batches):
        cell = [dict(K=k, N=n, M=m, kernel=kind) | row for row in compare_cell(data["path"], m, pw, modules, x, overrides)]
        rows += cell
        print(markdown(cell), flush=True)
        if args.json:
            write_json(args.json, dict(gpu=gpu_name(), torch=torch.__version__, variants_file=str(args.variants), rows=rows))
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())

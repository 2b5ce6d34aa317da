"""Time the packed low-bit matmuls next to cuBLAS fp16, in one process, at real layer shapes.

    python -m bench.kernel_latency                 # every shape and batch, both modes
    python -m bench.kernel_latency --quick         # 8192^2 and 4096x14336 at batch 1, 16, 64, 1024
    python -m bench.kernel_latency --tune          # search GEMV/GEMM tile configs first, then the table
    python -m bench.kernel_latency --tune-wgmma --shapes 8192x8192 --batches 64 --kernels w4g128   # Hopper
    python -m bench.kernel_latency --tune-gemv-mma --shapes 8192x8192 --batches 1 --kernels w1g128  # batch 1
    python -m bench.kernel_latency --tune-gemv-mma --save-tuned --shapes 4096x4096 --batches 1   # kept for this GPU
    python -m bench.kernel_latency --competitors all --shapes 8192x8192 --kernels w4g128,w2g128   # beside published kernels

Shapes are ``in x out`` (``K x N`` of ``y[M, N] = x[M, K] @ W^T``). Each row gives the time in the
two modes of :mod:`bench.timing` (steady: a cell's kernels and cuBLAS replayed side by side), the
speedup over cuBLAS fp16 measured in the same run and mode, and the achieved bandwidth (weight +
activation + output bytes over time) against a device copy measured in the same run. At batch 1 each kind
also gets a ``read floor`` row: the fastest of a few kernels that only stream as many bytes as its packed weight
(:mod:`bench.read_floor`; the row's config names the layout), timed beside the others. Weights are random codes (never zeros) with random
scales and zero points; the MX/NV block kinds (``--kernels mxfp4,nvfp4,...``) quantize a random weight with their format.
No hydra imports: this runs on the bare device machine.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import triton

from bench.competitors import COMPETITORS, competitor_calls, competitor_error, parse, runnable, trial
from bench.int_kinds import INT_KINDS, int_calls, int_error, int_paths, int_weight
from bench.read_floor import LAYOUTS as FLOOR_LAYOUTS, fastest, read_calls
from bench.timing import MODES, copies_for, copy_bandwidth_gbs, gpu_name, steady_us, time_side_by_side
from qkernels import lowbit_matmul as lm
from qkernels.act_linear import ActQuantLinear
from qkernels.block_matmul import BLOCK_DOT_MAX_M, BLOCK_GEMV_MAX_M, BLOCK_PATHS, BlockWeight, pack_block_weight, pick_block_path
from qkernels.pack import PackedWeight, pack_weight
from qkernels.quant import PackedTensor
from methods.common.formats import IntFormat
from methods.common.microscaling import MxFormat, NvFormat

SHAPES = [(8192, 8192), (4096, 4096), (16384, 16384), (4096, 14336), (14336, 4096), (8192, 28672), (28672, 8192)]
BATCHES = [1, 4, 16, 64, 256, 1024]
QUICK_SHAPES = [(8192, 8192), (4096, 14336)]
QUICK_BATCHES = [1, 16, 64, 1024]


@dataclass(frozen=True)
class LowBitKind:
    """A packed weight kind: layout, group size (None = one per row), zero points or a fixed offset."""

    layout: str
    group: int | None
    asym: bool
    top_code: int
    zero_const: float = 0.0


LOWBIT_KINDS = {
    "w4g128": LowBitKind("uint4", 128, True, 15),
    "w4g128s": LowBitKind("uint4", 128, False, 15, zero_const=8.0),  # symmetric: scales only (Marlin's W4 format)
    "w3g128": LowBitKind("uint3", 128, True, 7),
    "w2g128": LowBitKind("uint2", 128, True, 3),
    "ternary2": LowBitKind("uint2", None, False, 2, zero_const=1.0),
    "ternary5": LowBitKind("ternary5", None, False, 2, zero_const=1.0),
    "w1g128": LowBitKind("uint1", 128, True, 1),
}


BLOCK_KINDS = {  # MX/NV block-format weights (qkernels/block_matmul.py)
    "mxfp4": MxFormat("e2m1"),
    "mxint8": MxFormat("int8"),
    "nvfp4": NvFormat("e2m1"),
    "nvint4": NvFormat("int4"),
}


def random_packed(kind: LowBitKind, n: int, k: int, scale_range: tuple[float, float] = (0.01, 0.03), device: str = "cuda") -> PackedWeight:
    """Random codes, fp16 scales uniform in ``scale_range`` and (asymmetric kinds) random zero points."""
    codes = torch.randint(0, kind.top_code + 1, (n, k), device=device)
    n_groups = 1 if kind.group is None else k // kind.group
    low, high = scale_range
    scale = (torch.rand(n, n_groups, device=device) * (high - low) + low).half()
    zero = torch.randint(0, kind.top_code + 1, (n, n_groups), device=device).half() if kind.asym else None
    return pack_weight(codes, scale, zero, kind.layout, kind.group, zero_const=kind.zero_const)


def clone_packed(pw: PackedWeight) -> PackedWeight:
    copy = lambda t: None if t is None else t.clone()  # noqa: E731
    return replace(pw, words=pw.words.clone(), high=copy(pw.high), scale=pw.scale.clone(), zero=copy(pw.zero))


def fp16_calls(x: torch.Tensor, n: int) -> tuple[int, Callable[[], list]]:
    """cuBLAS fp16: ``x @ W^T`` over rotating fp16 weight copies."""
    k = x.shape[1]
    nbytes = n * k * 2
    out = torch.empty(x.shape[0], n, device=x.device, dtype=x.dtype)

    def make() -> list:
        weights = [torch.randn(n, k, device=x.device, dtype=x.dtype) for _ in range(copies_for(nbytes))]
        return [lambda w=w: torch.mm(x, w.t(), out=out) for w in weights]

    return nbytes, make


def lowbit_calls(x: torch.Tensor, pw: PackedWeight, path: str, config: Any = None) -> Callable[[], list]:
    out = torch.empty(x.shape[0], pw.n, device=x.device, dtype=x.dtype)

    def call(p: PackedWeight) -> Callable[[], Any]:
        if path in ("gemv", "gemv_fp32", "gemv_mma", "mma", "gemm", "wgmma", "wgmma_ws"):
            return lambda: lm.PATHS[path](x, p, config, out=out)
        return lambda: lm.lowbit_matmul(x, p, path)

    def make() -> list:
        return [call(pw)] + [call(clone_packed(pw)) for _ in range(copies_for(pw.nbytes()) - 1)]

    return make


def block_paths(m: int, bw: BlockWeight) -> list[str]:
    """The path BlockLinear takes (:func:`~qkernels.block_matmul.pick_block_path`), and beside it the others that take
    the weight and the batch: for 4-bit elements the tensor-core kernel on chunked words to ``BLOCK_DOT_MAX_M`` rows,
    for wider ones the GEMV to ``BLOCK_GEMV_MAX_M`` rows and the dot kernel; dequantize + cuBLAS from 16 rows."""
    small = m <= BLOCK_DOT_MAX_M
    fits = {"block mma": bw.nibbles and small, "block gemv": not bw.nibbles and m <= BLOCK_GEMV_MAX_M, "block": not bw.nibbles and small,
            "block dequant": m >= 16}
    auto = pick_block_path(m, bw)
    return [auto] + [path for path, ok in fits.items() if ok and path != auto]


def block_calls(x: torch.Tensor, bw: BlockWeight, path: str = "block") -> Callable[[], list]:
    """A block-format matmul (:data:`BLOCK_PATHS`) over rotating copies of the packed weight."""
    out = torch.empty(x.shape[0], bw.n, device=x.device, dtype=x.dtype)
    matmul = BLOCK_PATHS[path]

    def make() -> list:
        copy = lambda: replace(bw, packed=PackedTensor(bw.packed.codes.clone(), bw.packed.scale.clone(), None, bw.packed.tensor_scale))  # noqa: E731
        weights = [bw] + [copy() for _ in range(copies_for(bw.nbytes()) - 1)]
        return [lambda b=b: matmul(x, b, out=out) for b in weights]

    return make


def act_calls(x: torch.Tensor, weight: torch.Tensor, weight_fmt: IntFormat, act_fmt: IntFormat) -> Callable[[], list]:
    """An activation-quantized layer (:class:`~qkernels.act_linear.ActQuantLinear`: the activations quantized, then
    its kernel) over rotating copies of the layer."""

    def make() -> list:
        first = ActQuantLinear(weight, weight_fmt, act_fmt)
        nbytes = sum(buffer.numel() * buffer.element_size() for buffer in first.buffers())
        layers = [first] + [copy.deepcopy(first) for _ in range(copies_for(nbytes) - 1)]
        return [lambda layer=layer: layer.matmul(x, kernels=True) for layer in layers]

    return make


def block_error(x: torch.Tensor, bw: BlockWeight, dequantized: torch.Tensor, path: str = "block") -> float:
    ref = x.float() @ dequantized.t()
    return ((BLOCK_PATHS[path](x, bw).float() - ref).norm() / ref.norm()).item()


def paths_for(m: int, pw: PackedWeight) -> list[str]:
    """The path the dispatcher picks; beside it, at batch 1, the other kernels that fit (fp16-pair or fp32
    GEMV, the fp32 one too where the pair one fits, tensor-core GEMV, MMA); above it the GEMV (to ``GEMV_MAX_M``
    rows), the MMA kernel (to ``MMA_MAX_M`` rows), the wgmma GEMM and the warp-specialized one where they fit, and
    from batch 256 on the dequant + cuBLAS fallback."""
    cuda = torch.device("cuda")
    auto = lm.pick_path(m, pw, cuda)
    if m == 1:
        fits = {"gemv": True, "gemv_fp32": lm.pairs_fit(pw, torch.float16), "gemv_mma": lm.gemv_mma_fits(pw, torch.float16),
                "mma": lm.mma_fits(pw, torch.float16)}
    else:
        fits = {"gemv": m <= lm.GEMV_MAX_M, "mma": m <= lm.MMA_MAX_M and lm.mma_fits(pw, torch.float16),
                "wgmma": lm.is_hopper(cuda) and lm.wgmma_fits(pw, torch.float16),
                "wgmma_ws": lm.is_hopper(cuda) and lm.wgmma_ws_fits(pw, torch.float16, m), "dequant": m >= 256}
    return [auto] + [path for path, ok in fits.items() if ok and path != auto]


def path_config(m: int, pw: PackedWeight, path: str) -> Any:
    """The tile config ``path`` runs at ``m`` rows when given none (tuned, saved or the rules'); None for the paths
    without one (dequant + cuBLAS, torch)."""
    from qkernels import gemm_wgmma as gw
    from qkernels import gemm_ws as gws
    from qkernels import gemv_mma as gm

    configs = {"wgmma": lambda: gw.config_for(m, pw), "wgmma_ws": lambda: gws.default_config(m, pw), "gemv_mma": lambda: gm.config_for(pw),
               "mma": lambda: lm.mma_config(m, pw), "gemm": lambda: lm.gemm_config(m),
               "gemv": lambda: lm.gemv_config(pw, lm.pairs_fit(pw, torch.float16)), "gemv_fp32": lambda: lm.gemv_config(pw, False)}
    return configs[path]() if path in configs else None


def kernel_config(m: int, pw: PackedWeight, path: str) -> dict | None:
    """:func:`path_config` as a dict, for the results' rows: the rules change from session to session, so a figure
    without its config cannot be told apart from another one."""
    config = path_config(m, pw, path)
    return asdict(config) if config is not None else None


def relative_error(x: torch.Tensor, pw: PackedWeight, path: str, config: Any = None) -> float:
    """Error of ``path`` (with a GEMV/GEMM ``config``, else the tuned one) against the fp32 reference."""
    ref = lm.reference_matmul(x, pw).float()
    out = (lm.PATHS[path](x, pw, config) if config else lm.lowbit_matmul(x, pw, path)).float()
    return ((out - ref).norm() / ref.norm()).item()


def measure(shapes: list[tuple[int, int]], batches: list[int], kinds: list[str], modes: tuple[str, ...],
            competitors: tuple[str, ...] = ()) -> Iterator[list[dict]]:
    """Rows of the table, one list per shape as soon as it is done; ``competitors`` (:mod:`bench.competitors`) beside
    the project's paths for every low-bit kind whose weight they take."""
    for k, n in shapes:
        rows = []
        packed = {name: random_packed(LOWBIT_KINDS[name], n, k) for name in kinds if name in LOWBIT_KINDS}
        blocks = {}
        for name in (name for name in kinds if name in BLOCK_KINDS):
            weight = torch.randn(n, k, device="cuda") * 0.02
            fmt = BLOCK_KINDS[name]
            blocks[name] = (pack_block_weight(weight, fmt), fmt.dequantize(fmt.quantize(weight)).float())
        ints = {name: int_weight(INT_KINDS[name], n, k) for name in kinds if name in INT_KINDS}
        for m in batches:
            x = torch.randn(m, k, device="cuda", dtype=torch.float16)
            io_bytes = (m * k + m * n) * 2
            nbytes, make = fp16_calls(x, n)
            makers = {("fp16", "cublas"): make}
            makers |= {(name, path): lowbit_calls(x, pw, path) for name, pw in packed.items() for path in paths_for(m, pw)}
            rivals = {}  # (kind, competitor) -> its first copy of the kind's weight
            for name, pw in packed.items():
                for c in (c for c in competitors if COMPETITORS[c].takes(pw)):
                    if isinstance(held := trial(x, pw, c), str):
                        print(f"competitor {c} left out at {k}x{n} M={m} {name}: {held}", flush=True)
                    else:
                        rivals[name, c] = held
                        makers[name, c] = competitor_calls(x, pw, c, held)
            makers |= {(name, path): block_calls(x, bw, path) for name, (bw, _) in blocks.items() for path in block_paths(m, bw)}
            makers |= {(name, path): int_calls(x, w, path) for name, w in ints.items() for path in int_paths(w.kind, m, k, n)}
            floors = {"fp16": nbytes} | {name: pw.nbytes() for name, pw in packed.items()} | {name: bw.nbytes() for name, (bw, _) in blocks.items()}
            floors = floors if m == 1 else {}
            makers |= {(name, "read floor", layout): read_calls(size, x.device, copies_for(size), layout)
                       for name, size in floors.items() for layout in FLOOR_LAYOUTS}
            times = time_side_by_side(makers, modes)  # steady: every kernel's graph in turn, with cuBLAS's
            base = times[("fp16", "cublas")]
            floor = {name: fastest({layout: times[(name, "read floor", layout)] for layout in FLOOR_LAYOUTS}) for name in floors}

            def floor_row(name: str) -> dict:  # the same bytes streamed by a kernel that does nothing else, its fastest layout
                us, layout = floor[name]
                return row(k, n, m, name, "read floor", floors[name], us, base, config={"layout": layout})

            rows.append(row(k, n, m, "fp16", "cublas", nbytes + io_bytes, base, base))
            if floors:
                rows.append(floor_row("fp16"))
            for name, pw in packed.items():
                for path in paths_for(m, pw):
                    rows.append(row(k, n, m, name, path, pw.nbytes() + io_bytes, times[(name, path)], base, relative_error(x, pw, path),
                                    kernel_config(m, pw, path)))
                for c in (c for (kind, c) in rivals if kind == name):
                    held = rivals[name, c]
                    rows.append(row(k, n, m, name, c, held.nbytes + io_bytes, times[(name, c)], base, competitor_error(x, pw, c, held)))
                if name in floors:
                    rows.append(floor_row(name))
            for name, (bw, dequantized) in blocks.items():
                for path in block_paths(m, bw):
                    rows.append(row(k, n, m, name, path, bw.nbytes() + io_bytes, times[(name, path)], base, block_error(x, bw, dequantized, path)))
                if name in floors:
                    rows.append(floor_row(name))
            for name, w in ints.items():
                int_io = m * k + m * n * 2  # one byte an activation code
                for path in int_paths(w.kind, m, k, n):
                    rows.append(row(k, n, m, name, path, w.nbytes() + int_io, times[(name, path)], base, int_error(x, w, path)))
            del times, makers
            print(f"{k}x{n} M={m}: " + " ".join(f"{r['kernel']}/{r['path']} {r.get('steady_us', r.get('cold_us')):.1f}" for r in rows if r["K"] == k and r["N"] == n and r["M"] == m), flush=True)
            torch.cuda.empty_cache()
        del packed, blocks, ints
        torch.cuda.empty_cache()
        yield rows


def row(k: int, n: int, m: int, kernel: str, path: str, nbytes: int, times: dict[str, float], base: dict[str, float], error: float = 0.0,
        config: dict | None = None) -> dict:
    out = {"K": k, "N": n, "M": m, "kernel": kernel, "path": path, "bytes": nbytes, "rel_error": error}
    if config is not None:
        out["config"] = config
    for mode, us in times.items():
        out[f"{mode}_us"] = us
        out[f"{mode}_speedup"] = base[mode] / us
        out[f"{mode}_gbs"] = nbytes / us / 1e3
    return out


def markdown(rows: list[dict], modes: tuple[str, ...], copy_gbs: float) -> str:
    head = ["in x out", "M", "kernel", "path"]
    for mode in modes:
        head += [f"{mode} us", f"{mode} x fp16"]
    head += ["GB/s", "% copy", "rel err"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [f"{r['K']}x{r['N']}", str(r["M"]), r["kernel"], r["path"]]
        for mode in modes:
            cells += [f"{r[f'{mode}_us']:.1f}", f"{r[f'{mode}_speedup']:.2f}"]
        gbs = r.get("steady_gbs", r.get("cold_gbs"))
        cells += [f"{gbs:.0f}", f"{100 * gbs / copy_gbs:.0f}", f"{r['rel_error']:.1e}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- tuning


GEMV_SEARCH = [  # block_n, num_warps, split_k, num_stages
    lm.GemvConfig(*c)
    for c in [
        (64, 4, 1, 2), (128, 8, 1, 2), (32, 4, 2, 2), (64, 4, 2, 2), (32, 4, 4, 2), (64, 4, 4, 2),
        (128, 8, 4, 2), (32, 4, 8, 2), (64, 4, 8, 2), (64, 8, 8, 2), (32, 4, 16, 2),
        (128, 4, 4, 1), (128, 8, 2, 1), (128, 4, 8, 1), (128, 8, 8, 1), (256, 8, 4, 1), (64, 8, 4, 1),
    ]
]
MMA_SEARCH = [  # block_n, num_warps, split_k, num_stages
    lm.MmaConfig(*c) for c in [(64, 4, 2, 2), (64, 4, 4, 2), (64, 4, 8, 2), (64, 4, 4, 3), (128, 8, 2, 2), (128, 8, 4, 2), (128, 8, 2, 3)]
]
GEMM_SEARCH = {  # block_n, block_m, num_warps, num_stages, block_k, split_k
    m: [lm.GemmConfig(*c) for c in configs]
    for m, configs in {
        16: [(64, 16, 4, 2, 128, 1), (64, 16, 4, 2, 128, 4), (128, 16, 4, 2, 128, 4), (64, 16, 4, 3, 64, 8), (32, 16, 4, 2, 128, 4)],
        64: [(64, 64, 4, 2, 128, 1), (64, 64, 4, 2, 128, 4), (128, 64, 8, 2, 128, 4), (64, 64, 4, 3, 64, 8), (64, 32, 4, 2, 128, 4)],
        256: [(128, 64, 4, 2, 128, 1), (128, 128, 8, 2, 128, 1), (128, 128, 8, 2, 128, 2), (64, 128, 4, 3, 128, 2)],
        1024: [(128, 128, 8, 2, 128, 1), (128, 256, 8, 2, 64, 1), (256, 128, 8, 2, 64, 1), (128, 128, 8, 3, 64, 1)],
    }.items()
}


TUNE_TOLERANCE = 2e-3  # relative error against the fp32 reference (fp16 output rounding is ~5e-4)


def failure(err: Exception) -> str:
    """An exception as one short line: its type and the first line of its message."""
    return f"{type(err).__name__}: {(str(err).splitlines() or [''])[0][:160]}"


def checked_error(x: torch.Tensor, pw: PackedWeight, path: str, config: Any) -> tuple[float | None, str | None]:
    """A candidate config's relative error at this shape and, where it must not be timed, why: it is wrong (above
    :data:`TUNE_TOLERANCE`) or does not compile or fit (shared memory, registers)."""
    try:
        error = relative_error(x, pw, path, config)
    except Exception as err:  # noqa: BLE001 - a failing candidate is reported, not raised
        return None, failure(err)
    return error, f"relative error {error:.1e} > {TUNE_TOLERANCE}" if error > TUNE_TOLERANCE else None


def checked_steady(x: torch.Tensor, pw: PackedWeight, path: str, config: Any) -> float | None:
    """Steady-state time of a config that is right at this shape, or None for one that is wrong or does
    not compile or fit (:func:`checked_error`): the tuner never installs a config it did not check."""
    _, failed = checked_error(x, pw, path, config)
    if not failed:
        try:
            return steady_us(lowbit_calls(x, pw, path, config)())
        except Exception as err:  # noqa: BLE001 - e.g. out of memory for its weight copies: skipped, and said so
            failed = failure(err)
    print(f"  skipped {config}: {failed}", flush=True)
    return None


def best_of(candidates: list, time_one: Callable[[Any], float | None]) -> list[tuple[float, Any]]:
    timed = [(us, c) for c in candidates if (us := time_one(c)) is not None]
    return sorted(timed, key=lambda t: t[0])


TUNE_PATHS = ("gemv", "mma")


def tune(kinds: list[str], shape: tuple[int, int], gemm_kinds: list[str], paths: tuple[str, ...] = TUNE_PATHS) -> dict:
    """Search GEMV configs (batch 1) and MMA configs (batch 16, and folded at 64) per kind, those of ``paths``, and
    GEMM configs per batch bucket at ``shape``; install the winners in :mod:`qkernels.lowbit_matmul` for the rest of
    the process, and return every timing."""
    k, n = shape
    result: dict[str, Any] = {"shape": shape, "gemv": {}, "mma": {}, "gemm": {}}
    x1 = torch.randn(1, k, device="cuda", dtype=torch.float16)
    for name in (name for name in kinds if name in LOWBIT_KINDS):
        pw = random_packed(LOWBIT_KINDS[name], n, k)
        if "gemv" in paths and (timed := best_of(GEMV_SEARCH, lambda c: checked_steady(x1, pw, "gemv", c))):
            (lm.GEMV_PAIR_CONFIGS if lm.pairs_fit(pw, torch.float16) else lm.GEMV_CONFIGS)[lm.gemv_key(pw)] = timed[0][1]
            result["gemv"][name] = [(us, asdict(c)) for us, c in timed]
            print(f"gemv {name}: best {timed[0][0]:.1f} us {timed[0][1]}, worst {timed[-1][0]:.1f} us", flush=True)
        if "mma" not in paths or not lm.mma_fits(pw, torch.float16):
            continue
        for m, table in ((16, lm.MMA_CONFIGS), (64, lm.MMA_FOLD_CONFIGS)):  # 64 rows: the folded kernel
            x = torch.randn(m, k, device="cuda", dtype=torch.float16)
            timed = best_of(MMA_SEARCH, lambda c: checked_steady(x, pw, "mma", c))
            if timed:
                table[lm.gemv_key(pw)] = timed[0][1]
                result["mma"][f"{name}/{m}"] = [(us, asdict(c)) for us, c in timed]
                print(f"mma {name} M={m}: best {timed[0][0]:.1f} us {timed[0][1]}, worst {timed[-1][0]:.1f} us", flush=True)
    for name in gemm_kinds:
        pw = random_packed(LOWBIT_KINDS[name], n, k)
        for m, search in GEMM_SEARCH.items():
            x = torch.randn(m, k, device="cuda", dtype=torch.float16)
            timed = best_of(search, lambda c: checked_steady(x, pw, "gemm", c))
            if not timed:
                continue
            lm.GEMM_CONFIGS[m] = timed[0][1]
            base = steady_us(fp16_calls(x, n)[1]())
            deq = steady_us(lowbit_calls(x, pw, "dequant")())
            if deq < timed[0][0]:  # from this batch on the fallback wins
                lm.DEQUANT_MIN_M = min(lm.DEQUANT_MIN_M, m)
            result["gemm"][f"{name}/{m}"] = {"fp16": base, "dequant": deq, "timed": [(us, asdict(c)) for us, c in timed]}
            print(f"gemm {name} M={m}: best {timed[0][0]:.1f} us {timed[0][1]} | dequant {deq:.1f} | fp16 {base:.1f}", flush=True)
    return result


def tune_cell(tuned: dict, key: tuple, default: Any, search: list, time_one: Callable[[Any], float | None], label: str,
              winners: dict | None = None) -> dict | None:
    """Time ``search`` and the rules' ``default`` config (each once), install the fastest in ``tuned[key]`` (and,
    where it is not the default, in ``winners[key]`` with its time) and return every timing; None where no
    candidate ran (``tuned`` is left without the key)."""
    tuned.pop(key, None)
    timed = best_of(search + ([default] if default not in search else []), time_one)
    if not timed:
        return None
    tuned[key] = timed[0][1]
    if winners is not None and timed[0][1] != default:
        winners[key] = timed[0][1], timed[0][0]
    base = next((us for us, c in timed if c == default), None)
    print(f"{label}: best {timed[0][0]:.1f} us {timed[0][1]} | default " + (f"{base:.1f} us" if base else "did not run"), flush=True)
    return {"default": (base, asdict(default)), "timed": [(us, asdict(c)) for us, c in timed]}


def wgmma_search(m: int) -> list:
    """wgmma GEMM candidates at ``m`` rows: 64 or 128 weight rows on one warpgroup, 128 on two; activation
    tiles of the batch's bucket (and 128 and 256 above 128 rows); 1, 2, 3, 4 or 6 K splits, or (two warpgroups)
    a split tail; activation tiles of at most 64 rows also four steps a box (two boxes in flight; for K a
    multiple of 64); 64-row weight tiles with the words one or two chunks ahead; at most 128 fp32 accumulators a thread
    (more spill)."""
    from qkernels.gemm_wgmma import GemmWgmmaConfig

    bucket = min(max(16, triton.next_power_of_2(m)), 256)
    block_ms = sorted({bucket} | ({128, 256} if m > 128 else set()))
    return [
        GemmWgmmaConfig(block_n=block_n, block_m=block_m, num_warps=warps, split_k=split, tail_split=tail, words_ahead=ahead, **boxes)
        for block_n, warps in ((64, 4), (128, 4), (128, 8))
        for block_m in block_ms
        if block_n * block_m // (32 * warps) <= 128
        for split in (1, 2, 3, 4, 6)
        for tail in ((1, 4) if split == 1 and warps == 8 else (1,))
        for boxes in ([{}, dict(stages=2, steps_per_box=4)] if block_m <= 64 else [{}])
        for ahead in ((1, 2) if block_n == 64 else (1,))
    ]


def tune_wgmma(kinds: list[str], shapes: list[tuple[int, int]], batches: list[int], save: bool = False, workers: int = 0) -> dict:
    """Time :func:`wgmma_search` and the default config (each once) for every kind the wgmma GEMM takes,
    shape and batch above the GEMV's rows; install each winner in ``qkernels.gemm_wgmma.TUNED`` for the rest of the
    process (``save``: and in this GPU's file, :mod:`qkernels.tuned`), and return every timing by ``kind/KxN/M``
    (``workers``: :func:`precompile` each cell's configs first)."""
    from qkernels import gemm_wgmma as gw

    result: dict[str, Any] = {}
    winners: dict[tuple, tuple] = {}
    tuned_keys = []
    cuda = torch.device("cuda")
    if not lm.is_hopper(cuda):
        print("--tune-wgmma: no Hopper GPU, nothing to tune", flush=True)
        return result
    for name in (name for name in kinds if name in LOWBIT_KINDS):
        for k, n in shapes:
            pw = random_packed(LOWBIT_KINDS[name], n, k)
            if not lm.wgmma_fits(pw, torch.float16):
                continue
            for m in (m for m in batches if m > lm.GEMV_MAX_M):
                x = torch.randn(m, k, device="cuda", dtype=torch.float16)
                search, rule = wgmma_search(m), gw.default_config(m, pw)
                precompile("wgmma", name, n, k, m, [*search, rule], workers)
                timings = tune_cell(gw.TUNED, gw.tuned_key(m, pw), rule, search,
                                    lambda c: checked_steady(x, pw, "wgmma", c), f"wgmma {name} {k}x{n} M={m}", winners)
                if timings:
                    result[f"{name}/{k}x{n}/{m}"] = timings
                    tuned_keys.append(gw.tuned_key(m, pw))
    if save:
        save_winners("wgmma", winners, tuned_keys)
    return result


def save_winners(kernel: str, winners: dict[tuple, tuple], tuned_keys: list[tuple]) -> None:
    """Merge the winners that beat the rules into this GPU's file; drop the saved entries of the keys tuned
    again where the rules won."""
    from qkernels import tuned

    path = tuned.save(gpu_name(), kernel, winners, drop=tuple(k for k in tuned_keys if k not in winners))
    print(f"--save-tuned: {len(winners)} {kernel} configs that beat the rules merged into {path}", flush=True)


def shares(configs: list, workers: int) -> list[list]:
    """``configs`` dealt round the ``workers`` (none empty): every config in exactly one share."""
    return [share for share in (configs[i::workers] for i in range(workers)) if share]


def precompile(path: str, name: str, n: int, k: int, m: int, configs: list, workers: int) -> None:
    """Compile ``configs`` of ``path`` for kind ``name`` at ``n x k`` and ``m`` rows in ``workers`` processes (each runs
    its share once on a random weight of that shape, so every launch is specialized as the tuner's will be), so that
    the tuner finds them in Triton's disk cache instead of compiling them one at a time. Off for ``workers`` < 2; a
    pool or worker that fails is said and the tuner compiles what is left itself."""
    if workers < 2 or len(configs) < 2:
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    try:
        with ProcessPoolExecutor(min(workers, len(configs)), mp_context=multiprocessing.get_context("spawn")) as pool:
            list(pool.map(_compile_share, [(path, name, n, k, m, share) for share in shares(configs, workers)]))
    except Exception as err:  # noqa: BLE001 - only a head start: the tuner compiles what is left and reports real failures
        print(f"  --compile-workers: the workers failed ({failure(err)}); compiling as the configs are timed", flush=True)


def _compile_share(job: tuple) -> None:
    """A :func:`precompile` worker: each config run once; one that fails is left to the tuner, which runs it again and
    says why."""
    path, name, n, k, m, configs = job
    pw = random_packed(LOWBIT_KINDS[name], n, k)
    x = torch.randn(m, k, device="cuda", dtype=torch.float16)
    for config in configs:
        try:
            lm.PATHS[path](x, pw, config)
        except Exception:  # noqa: BLE001, S112 - the tuner reports it when it gets there
            continue
    torch.cuda.synchronize()


K_WARP_TILES = ((32, 8, 1, 4), (32, 16, 1, 8), (64, 8, 1, 2), (64, 16, 1, 4), (128, 16, 1, 2), (64, 8, 2, 2), (64, 16, 2, 4))  # rows, warps, splits, groups


def gemv_mma_search(pw: PackedWeight, hopper: bool) -> list:
    """Tensor-core GEMV candidates (batch 1): 64 or 128 weight rows on 4 or 8 warps, 2, 3, 4, 6 or 8 K splits
    (session 21: ternary 4096x14336 on plain loads 9.85 us with 3 against 10.25 on the rule), plain loads, and
    (but for uint3) the :data:`K_WARP_TILES`, the warps in groups along K, each of these also with the words read in
    64-byte runs (``lane_words``, not yet timed on a GPU); on Hopper
    also the warp-group tiles with the split's group values in one TMA box (``values_box``) where it fits, and the TMA
    feed with 1, 2, 3, 4, 6 or 8 K splits and 2, 3 or 4 chunks in flight, routed where
    four groups share a chunk half (:func:`qkernels.gemv_mma.routes`), 128-row tiles on 4 warps under both
    register caps (session 20: one K split of 64-row tiles, uncapped, took W2 g128 4096x14336 in 10.9 us against
    12.0 on the rule; the search times it under 128).
    Without programmatic dependent launch: in the timing's chain of one GEMV it overlaps the calls and picked
    configs that were slower in a decode (session 13)."""
    from qkernels import gemv_mma as gm

    tiles = [(64, 4), (128, 4), (128, 8)]
    plain = [gm.GemvMmaConfig(block_n, warps, split) for block_n, warps in tiles for split in (2, 3, 4, 6, 8)]
    if pw.high is None:  # the warps in groups along K (session 23: 4096^2, 8192^2 ternary, 4096x14336)
        plain += [gm.GemvMmaConfig(block_n, warps, split, k_warps=groups) for block_n, warps, split, groups in K_WARP_TILES]
    plain += [replace(c, lane_words=True) for c in plain]  # (session 29: each lane's words read in 64-byte runs)
    if not hopper:
        return plain
    # (session 26: the split's group values in a TMA box)
    boxed = [replace(c, values_box=True) for c in plain if c.k_warps > 1 and not c.lane_words]
    plain += [c for c in boxed if gm.values_box_fits(pw, c) is None]
    fed = [
        gm.GemvMmaConfig(block_n, warps, split, stages=stages, route=route, maxnreg=cap)
        for block_n, warps in tiles for split in (1, 2, 3, 4, 6, 8) for stages in (2, 3, 4) for route in sorted({False, gm.routes(pw)})
        for cap in ((128, gm.WIDE_TILE_REGISTERS) if (block_n, warps) == (128, 4) else (128,))
    ]
    return plain + [c for c in fed if gm.tma_fits(pw, c)]


def tune_gemv_mma(kinds: list[str], shapes: list[tuple[int, int]], save: bool = False, workers: int = 0) -> dict:
    """Time :func:`gemv_mma_search` and the dispatcher's own config (each once) at batch 1 for every kind the
    tensor-core GEMV takes and shape; install each winner in ``qkernels.gemv_mma.TUNED`` for the rest of the
    process (``save``: and in this GPU's file, :mod:`qkernels.tuned`), and return every timing by ``kind/KxN``
    (``workers``: :func:`precompile` each cell's configs first)."""
    from qkernels import gemv_mma as gm

    result: dict[str, Any] = {}
    winners: dict[tuple, tuple] = {}
    tuned_keys = []
    hopper = lm.is_hopper(torch.device("cuda"))
    for name in (name for name in kinds if name in LOWBIT_KINDS):
        for k, n in shapes:
            pw = random_packed(LOWBIT_KINDS[name], n, k)
            if not lm.gemv_mma_fits(pw, torch.float16):
                continue
            x = torch.randn(1, k, device="cuda", dtype=torch.float16)
            search, rule = gemv_mma_search(pw, hopper), gm.rule_config(pw)
            precompile("gemv_mma", name, n, k, 1, [*search, rule], workers)
            timings = tune_cell(gm.TUNED, gm.tuned_key(pw), rule, search,
                                lambda c: checked_steady(x, pw, "gemv_mma", c), f"gemv_mma {name} {k}x{n}", winners)
            if timings:
                result[f"{name}/{k}x{n}"] = timings
                tuned_keys.append(gm.tuned_key(pw))
    if save:
        save_winners("gemv_mma", winners, tuned_keys)
    return result


def tuned_summary() -> str:
    gemv = "; ".join(f"{layout}{'/groups' if grouped else ''}: {c}" for (layout, grouped), c in lm.GEMV_CONFIGS.items())
    gemv += " | fp16 pairs " + "; ".join(f"{layout}{'/groups' if grouped else ''}: {c}" for (layout, grouped), c in lm.GEMV_PAIR_CONFIGS.items())
    mma = "; ".join(f"{layout}{'/groups' if grouped else ''}: {c}" for (layout, grouped), c in lm.MMA_CONFIGS.items())
    mma += " | folded " + "; ".join(f"{layout}{'/groups' if grouped else ''}: {c}" for (layout, grouped), c in lm.MMA_FOLD_CONFIGS.items())
    gemm = "; ".join(f"M<={m}: {c}" for m, c in sorted(lm.GEMM_CONFIGS.items()))
    return f"tuned GEMV {gemv} | MMA {mma} | GEMM {gemm} | dequant + cuBLAS from M={lm.DEQUANT_MIN_M}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="two shapes, four batches")
    parser.add_argument("--tune", action="store_true", help="search tile configs first and use the winners")
    parser.add_argument("--tune-only", action="store_true", help="search tile configs, print them, no table")
    parser.add_argument("--tune-gemm", action="store_true", help="also search GEMM configs per batch bucket (W4)")
    parser.add_argument("--tune-wgmma", action="store_true",
                        help="Hopper: search wgmma GEMM configs for the given kernels, shapes and batches first, use the winners")
    parser.add_argument("--tune-gemv-mma", action="store_true",
                        help="search tensor-core GEMV configs (batch 1; TMA feed and routes on Hopper) for the given kernels and shapes first")
    parser.add_argument("--save-tuned", action="store_true",
                        help="with --tune-gemv-mma/--tune-wgmma: merge the configs that beat the rules into this GPU's file "
                             "(qkernels/tuned/, or $QKERNELS_TUNED_DIR), used by every later run on this GPU model")
    parser.add_argument("--compile-workers", type=int, default=0,
                        help="with --tune-gemv-mma/--tune-wgmma: compile each cell's configs in this many processes first "
                             "(into Triton's disk cache), then time them one by one (0: compile as they are timed)")
    parser.add_argument("--tune-paths", default=",".join(TUNE_PATHS), help=f"comma list of the kernels that --tune searches, of {','.join(TUNE_PATHS)}")
    parser.add_argument("--kernels", default=",".join(LOWBIT_KINDS),
                        help=f"comma list of low-bit kinds; block formats: {','.join(BLOCK_KINDS)}; activation-quantized: {','.join(INT_KINDS)}")
    parser.add_argument("--competitors", default="",
                        help=f"comma list (or 'all') of published kernels to time beside the project's where they take the weight: "
                             f"{','.join(COMPETITORS)} (bench/competitors.py)")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--shapes", default=None, help="comma list of INxOUT, e.g. 8192x8192")
    parser.add_argument("--batches", default=None, help="comma list of batch sizes")
    parser.add_argument("--out", type=Path, default=None, help="write the Markdown table here")
    parser.add_argument("--json", type=Path, default=None, help="write all numbers here")
    args = parser.parse_args(argv)
    tune_paths = tuple(p for p in args.tune_paths.split(",") if p)
    if bad := [p for p in tune_paths if p not in TUNE_PATHS]:
        parser.error(f"unknown --tune-paths {bad}; choose from {list(TUNE_PATHS)}")
    if args.compile_workers < 0:
        parser.error(f"--compile-workers {args.compile_workers}: give 0 (off) or a number of processes")
    if args.save_tuned and not (args.tune_gemv_mma or args.tune_wgmma):
        parser.error("--save-tuned saves what --tune-gemv-mma or --tune-wgmma finds; give one of them")
    kinds = [k for k in args.kernels.split(",") if k]
    unknown = [k for k in kinds if k not in LOWBIT_KINDS and k not in BLOCK_KINDS and k not in INT_KINDS]
    if unknown:
        parser.error(f"unknown kernels {unknown}; choose from {list(LOWBIT_KINDS) + list(BLOCK_KINDS) + list(INT_KINDS)}")
    try:
        competitors = parse(args.competitors)
    except ValueError as err:
        parser.error(f"--competitors: {err}")
    if not torch.cuda.is_available():
        print("no CUDA GPU: nothing to time", file=sys.stderr)
        return 1
    competitors = tuple(runnable(competitors, torch.device("cuda")))
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")] if args.shapes else (QUICK_SHAPES if args.quick else SHAPES)
    batches = [int(b) for b in args.batches.split(",")] if args.batches else (QUICK_BATCHES if args.quick else BATCHES)
    modes = tuple(m for m in args.modes.split(",") if m)
    torch.manual_seed(0)
    copy_gbs = copy_bandwidth_gbs()
    header = f"GPU: {gpu_name()} | torch {torch.__version__} | copy {copy_gbs:.0f} GB/s (read+write)"
    print(header, flush=True)
    tuned = None
    if args.tune or args.tune_only:
        tuned = {"gpu": gpu_name(), "copy_gbs": copy_gbs, **tune(kinds, (8192, 8192), ["w4g128"] if args.tune_gemm else [], tune_paths)}
        if args.tune_only:
            if args.json:
                args.json.write_text(json.dumps(tuned, indent=1))
            return 0
        header += " | " + tuned_summary()
    if args.tune_gemv_mma:
        tuned = tuned or {"gpu": gpu_name(), "copy_gbs": copy_gbs}
        tuned["gemv_mma"] = tune_gemv_mma(kinds, shapes, args.save_tuned, args.compile_workers)
        header += f" | tensor-core GEMV configs tuned for {len(tuned['gemv_mma'])} cells (kernel/shape)"
    if args.tune_wgmma:
        tuned = tuned or {"gpu": gpu_name(), "copy_gbs": copy_gbs}
        tuned["wgmma"] = tune_wgmma(kinds, shapes, batches, args.save_tuned, args.compile_workers)
        header += f" | wgmma configs tuned for {len(tuned['wgmma'])} cells (kernel/shape/batch)"
    rows: list[dict] = []
    for shape_rows in measure(shapes, batches, kinds, modes, competitors):  # written after each shape: a cut run keeps its rows
        rows += shape_rows
        table = header + "\n\n" + markdown(rows, modes, copy_gbs)
        if args.out:
            args.out.write_text(table + "\n")
        if args.json:
            args.json.write_text(json.dumps({"gpu": gpu_name(), "copy_gbs": copy_gbs, "tuning": tuned, "rows": rows}, indent=1))
    print(table, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

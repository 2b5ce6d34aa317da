"""The flow of one grid cell: config -> key -> (skip | load, calibrate, quantize, evaluate) -> record.

See DESIGN.md, "The flow of one cell". Everything a number depends on goes into its record.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import platform
import resource
import subprocess
import time
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf

from bench.data import build_calibration
from bench.errors import ConfigError, UserError
from bench.metrics import EvalContext
from bench.models import load_bundle
from bench.store import ResultStore
from methods.common.method import SHARED_KNOBS, ActQuant, Method, QuantSpec

log = logging.getLogger(__name__)

# Top-level keys that never change a cell's numbers: they are left out of its key.
NON_SEMANTIC = ("tracker", "paths", "store", "force", "device", "sweep_name", "hydra")
PROJECT_ROOT = Path(__file__).resolve().parent.parent
VERSIONED_PACKAGES = ("torch", "transformers", "triton", "lm_eval", "hydra-core", "wandb", "gguf")


def run_cell(cfg: DictConfig) -> dict[str, Any]:
    """Run (or skip, if already finished) the cell described by ``cfg``; return its record."""
    method_cls = method_class(cfg)
    check_shared_knobs(cfg, method_cls)
    spec = build_spec(cfg, method_cls)
    resolved = with_format_knobs(OmegaConf.to_container(cfg, resolve=True), spec)
    key = cell_key(resolved, knobs_used(cfg, method_cls))
    store = ResultStore(cfg.store.path)
    label = cell_label(resolved, method_cls)
    if store.is_done(key) and not cfg.force:
        print(f"[{key}] {label}: finished earlier, skipped (force=true recomputes)", flush=True)
        return store.get(key)

    cache_dir = Path(cfg.paths.cache_dir).expanduser()
    device = pick_device(cfg.device)
    timings: dict[str, float] = {}
    start = time.perf_counter()
    with timed(timings, "load"):
        bundle = load_bundle(cfg.model, cache_dir, device)
    method: Method = instantiate_checked(cfg.method, "method")
    method.check(bundle, spec)
    evaluators = {name: instantiate_checked(conf, f"eval.{name}") for name, conf in cfg.eval.items()}
    tracker = instantiate_checked(cfg.tracker, "tracker")

    record = {
        "key": key,
        "sweep": sweep_name(cfg),
        "model": cfg.model.name,
        "method": method_name(cfg),
        "format": spec.weight.describe() if spec.weight else None,
        "bits": resolved["bits"] if "bits" in method_cls.uses else None,
        "act_bits": resolved["act_bits"] if "act_bits" in method_cls.uses else None,
        "group_size": resolved["group_size"] if "group_size" in method_cls.uses else None,
        "config": resolved,
        "env": environment(device),
    }
    tags = [f"model:{cfg.model.name}", f"method:{record['method']}", f"bits:{record['bits']}"]
    try:
        tracker.start(key, record["sweep"], tags, resolved)
        calib = None
        if method.needs_calibration or spec.needs_calibration:
            with timed(timings, "calibration"):
                calib = build_calibration(cfg.calib, bundle.tokenizer, cache_dir, bundle.max_context)
        reset_peak_memory(device)
        with timed(timings, "quantize"):
            report = method.quantize(bundle, spec, calib)
        quantize_peak = peak_memory(device)

        metrics, protocol, forward_s = {}, {}, 0.0
        ctx = EvalContext(cache_dir=cache_dir, cell_key=key, spec=spec)
        with timed(timings, "eval"):
            for evaluator in evaluators.values():
                result = evaluator(bundle, ctx)
                metrics.update(result.metrics)
                protocol.update(result.protocol)
                forward_s += result.forward_s
        timings["eval_forward"] = forward_s
        tracker.log_summary({**metrics, "bits_per_weight": report.bits_per_weight, **timings})
        tracker.finish()
        timings["total"] = time.perf_counter() - start
        timings["overhead_share"] = 1 - (forward_s + timings["quantize"]) / timings["total"]
        if calib is not None:
            protocol["calibration"] = calib.protocol
        protocol["model"] = bundle.meta
        record.update(
            metrics=metrics,
            bits_per_weight=report.bits_per_weight,
            report={
                "layer_bits": report.layer_bits,
                "extras": report.extras,
                "quantize_peak_bytes": quantize_peak,
                "memory_kind": "cuda_max_allocated" if device.type == "cuda" else "process_max_rss",
            },
            protocol=protocol,
            timings=timings,
        )
        store.put(record)
        print(summary_line(key, label, metrics, report.bits_per_weight, timings["total"]), flush=True)
        return store.get(key)
    except UserError:
        tracker.finish(exit_code=1)
        raise
    except BaseException as err:
        if isinstance(err, Exception):
            store.put_failed(record, f"{type(err).__name__}: {err}")
        tracker.finish(exit_code=1)
        raise
    finally:
        tracker.finish()
        del bundle
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def method_class(cfg: DictConfig) -> type[Method]:
    target = cfg.method.get("_target_")
    try:
        cls = get_class(target)
    except Exception as err:
        raise ConfigError(f"method._target_={target!r} cannot be imported: {err}") from err
    if not (isinstance(cls, type) and issubclass(cls, Method)):
        raise ConfigError(f"method._target_={target!r} is not a subclass of methods.common.method.Method")
    return cls


def method_name(cfg: DictConfig | dict[str, Any]) -> str:
    return cfg["method"].get("name") or cfg["method"]["_target_"].rsplit(".", 1)[-1].lower()


def check_shared_knobs(cfg: DictConfig, method_cls: type[Method]) -> None:
    """Validate the top-level knobs the method uses, before anything is loaded or written."""
    if "bits" in method_cls.uses and not _is_int_in(cfg.bits, 1, 16):
        raise ConfigError(f"bits={cfg.bits!r} is not valid; choose an integer in 1..16")
    if "act_bits" in method_cls.uses and cfg.act_bits is not None and not _is_int_in(cfg.act_bits, 1, 16):
        raise ConfigError(f"act_bits={cfg.act_bits!r} is not valid; choose an integer in 1..16 or null (no activation quantization)")


def knobs_used(cfg: DictConfig, method_cls: type[Method]) -> tuple[str, ...]:
    """The shared knobs a cell depends on: the method's, plus calibration when activation ranges are static."""
    uses = method_cls.uses
    static_act = "act_bits" in uses and cfg.act_bits is not None and cfg.act_quant.static is not None
    return uses + ("calib",) if static_act and "calib" not in uses else uses


def _is_int_in(value: Any, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def build_spec(cfg: DictConfig, method_cls: type[Method]) -> QuantSpec:
    weight = instantiate_checked(cfg.format, "format") if "format" in method_cls.uses else None
    act = None
    if "act_bits" in method_cls.uses and cfg.act_bits is not None:
        act = instantiate_checked(cfg.act_format, "act_format")
    act_quant = ActQuant(**cfg.act_quant) if "act_quant" in method_cls.uses else ActQuant()
    return QuantSpec(weight=weight, act=act, act_quant=act_quant)


def instantiate_checked(conf: DictConfig, where: str) -> Any:
    """``hydra.utils.instantiate`` that surfaces the project's own config errors in one line."""
    try:
        return instantiate(conf)
    except InstantiationException as err:
        cause = err.__cause__
        if isinstance(cause, UserError):
            raise cause
        if isinstance(cause, TypeError):
            raise ConfigError(f"{where}: {cause}") from err
        raise


def with_format_knobs(resolved: dict[str, Any], spec: QuantSpec) -> dict[str, Any]:
    """The resolved config with ``bits``, ``group_size`` and ``act_bits`` set to what the formats use.

    Formats that fix their bits or blocks (MX, NV, FP ExMy, binary, ternary) ignore the top-level values;
    the cell key and the record hold the formats' own, so ``format=mxfp4 bits=8`` is the cell
    ``format=mxfp4`` and records 4 bits. ``act_bits`` stays the switch for activation quantization.
    """
    resolved = dict(resolved)
    actual = {
        "bits": spec.weight.element_bits if spec.weight else None,
        "group_size": spec.weight.granularity if spec.weight else None,
        "act_bits": spec.act.element_bits if spec.act else None,
    }
    for knob, value in actual.items():
        if value is not None and value != resolved.get(knob):
            log.info("%s=%s does not apply to this cell's format; it uses %s", knob, resolved.get(knob), value)
            resolved[knob] = value
    return resolved


def cell_key(resolved: dict[str, Any], uses: tuple[str, ...]) -> str:
    """Hash of the resolved config without non-semantic keys and without shared knobs the method ignores."""
    ignored = set(NON_SEMANTIC) | (set(SHARED_KNOBS) - set(uses))
    semantic = {k: v for k, v in resolved.items() if k not in ignored}
    return hashlib.sha256(json.dumps(semantic, sort_keys=True, default=str).encode()).hexdigest()[:16]


def cell_label(resolved: dict[str, Any], method_cls: type[Method]) -> str:
    parts = [resolved["model"]["name"], method_name(resolved)]
    if "bits" in method_cls.uses:
        parts.append(f"W{resolved['bits']} g{resolved['group_size']} {resolved['format'].get('name', '')}".rstrip())
    if "act_bits" in method_cls.uses and resolved["act_bits"] is not None:
        parts.append(f"A{resolved['act_bits']}")
    if "act_quant" in method_cls.uses and resolved["act_quant"]["kv_bits"] is not None:
        parts.append(f"KV{resolved['act_quant']['kv_bits']}")
    return " ".join(parts)


def summary_line(key: str, label: str, metrics: dict[str, float], bpw: float, seconds: float) -> str:
    shown = " ".join(f"{name}={value:.3f}" for name, value in metrics.items())
    return f"[{key}] {label}: {shown} | {bpw:.3f} bits/weight | {seconds:.1f}s"


def sweep_name(cfg: DictConfig) -> str:
    if cfg.get("sweep_name"):
        return str(cfg.sweep_name)
    try:
        hydra = HydraConfig.get()
    except ValueError:  # called outside @hydra.main (tests, scripts)
        return "adhoc"
    return Path(hydra.sweep.dir).name if hydra.mode.name == "MULTIRUN" else "single"


def pick_device(choice: str) -> torch.device:
    """``auto``: one GPU per job (job number modulo the GPU count, for the joblib launcher), else the CPU."""
    if choice != "auto":
        return torch.device(choice)
    if not torch.cuda.is_available():
        return torch.device("cpu")
    try:
        job = HydraConfig.get().job.num or 0
    except ValueError:
        job = 0
    return torch.device(f"cuda:{job % torch.cuda.device_count()}")


@contextmanager
def timed(timings: dict[str, float], name: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[name] = timings.get(name, 0.0) + time.perf_counter() - start


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> int:
    """Peak bytes: CUDA allocator peak since the last reset, or the process's peak resident set."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def environment(device: torch.device) -> dict[str, Any]:
    versions = {}
    for package in VERSIONED_PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return {
        "versions": versions,
        "python": platform.python_version(),
        "git_sha": git_sha(),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch_threads": torch.get_num_threads(),
        "host": platform.node(),
    }


def git_sha() -> str | None:
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=PROJECT_ROOT, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=PROJECT_ROOT, capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return f"{sha}-dirty" if dirty else sha

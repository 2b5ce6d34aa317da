"""GPU timing in two modes, and the device's copy bandwidth to compare against.

* ``cold``: ``triton.testing.do_bench``, median, L2 flushed before every call: a kernel's time when
  nothing it reads is cached. The call is launched from a CUDA graph of it, so the host's launch work
  (Python, Triton's argument binding: tens to hundreds of microseconds for the project's kernels, a few
  for cuBLAS) is never timed as GPU time: the flush keeps the GPU busy while the replay is queued.
* ``steady``: a CUDA graph that calls the kernel once per weight copy, the copies rotating through
  at least :data:`STEADY_BYTES` so no weight is still in L2 when its turn comes again, replayed many
  times: the time per call of a kernel run back to back, as in a decode loop, without launch gaps.
  Kernels compared with each other (:func:`time_side_by_side`) have their graphs replayed in turn, a
  few rounds, so that clock drift over the run falls on all of them alike.

No hydra imports here: the device machine runs this without the harness's config stack.
"""

from __future__ import annotations

import math
import statistics
from typing import Any, Callable

import torch

STEADY_BYTES = 300e6
MODES = ("cold", "steady")


def copies_for(nbytes: int) -> int:
    """Weight copies that make a rotation of at least :data:`STEADY_BYTES` (at least one)."""
    return max(1, math.ceil(STEADY_BYTES / max(nbytes, 1)))


def cold_us(fn: Callable[[], Any]) -> float:
    """Median time (us) of ``fn`` after an L2 flush, ``fn`` replayed from a CUDA graph. Launched directly, a call
    whose host-side work outlasts the flush has that work timed as GPU time: cold figures up to session 14 were
    launched so, and may hold it (session 9, H100: W2 on the pair GEMV 45.7 us cold against 14.3 steady; in
    session 15 a call of the TMA GEMV took about 300 us of host work before launch plans were kept)."""
    from triton.testing import do_bench

    graph = capture(fn)
    return do_bench(graph.replay, warmup=10, rep=40, return_mode="median") * 1e3


def steady_us(calls: list[Callable[[], Any]], min_ms: float = 10.0, samples: int = 3) -> float:
    """Median time per call (us) of a CUDA graph holding ``calls`` in order, replayed back to back."""
    return steady_interleaved({"calls": calls}, rounds=samples, min_ms=min_ms)["calls"]


def capture(fn: Callable[[], Any]) -> torch.cuda.CUDAGraph:
    """``fn`` as a CUDA graph, run once on a side stream first (as capture needs: lazy allocations and compiles
    happen outside it)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


def steady_interleaved(calls: dict[Any, list[Callable[[], Any]]], rounds: int = 7, min_ms: float = 5.0) -> dict[Any, float]:
    """Median time per call (us) of each entry's CUDA graph (its calls in order, captured after one pass
    outside the capture), the graphs replayed in turn, ``rounds`` times, each long enough to take ``min_ms``:
    side-by-side ratios that clock and power drift over a run cannot bias (a compute-bound kernel timed
    right after another one can read 5-10% slow on an H200)."""
    replays = {}
    graphs = {name: capture(lambda group=group: [call() for call in group]) for name, group in calls.items()}
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for name, graph in graphs.items():
        graph.replay()
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        replays[name] = max(3, math.ceil(min_ms / max(start.elapsed_time(end), 1e-3)))
    per_call: dict[Any, list[float]] = {name: [] for name in graphs}
    for _ in range(rounds):
        for name, graph in graphs.items():
            start.record()
            for _ in range(replays[name]):
                graph.replay()
            end.record()
            end.synchronize()
            per_call[name].append(start.elapsed_time(end) * 1e3 / (replays[name] * len(calls[name])))
    return {name: statistics.median(times) for name, times in per_call.items()}


def time_side_by_side(makers: dict[Any, Callable[[], list[Callable[[], Any]]]], modes: tuple[str, ...] = MODES) -> dict[Any, dict[str, float]]:
    """``{key: {mode: us}}`` for kernels to compare (each maker returns one call per rotating copy): cold
    one after another, steady :func:`steady_interleaved`, every key's copies held at once."""
    calls = {key: make() for key, make in makers.items()}
    out: dict[Any, dict[str, float]] = {key: {} for key in calls}
    if "cold" in modes:
        for key, group in calls.items():
            out[key]["cold"] = cold_us(group[0])
    if "steady" in modes:
        for key, us in steady_interleaved(calls).items():
            out[key]["steady"] = us
    return out


def copy_bandwidth_gbs(nbytes: int = 1 << 30) -> float:
    """Device-to-device copy rate in GB/s, counting bytes read plus bytes written (steady state)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    us = steady_us([lambda: dst.copy_(src)], min_ms=50.0)
    del src, dst
    return 2 * nbytes / us / 1e3


def gpu_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "none"

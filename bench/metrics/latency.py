"""``eval=latency``: how fast the cell's quantized layers run on the packed low-bit kernels.

On a CUDA device: each distinct layer shape is packed once from the cell's (already quantized)
weights and timed on the kernels next to cuBLAS fp16 at the same shape, in the modes of
:mod:`bench.timing`; then every quantizable layer is swapped for a
:class:`~qkernels.qlinear.QuantLinear` (MX and NV formats: a :class:`~qkernels.qlinear.BlockLinear`; cells that
quantize activations dynamically per token, with per-channel int weights up to 8 bits or grouped ones up to 4
bits: an :class:`~qkernels.act_linear.ActQuantLinear`, its activations quantized and multiplied by the W8A8, W4A8,
lowbit or bit-plane kernel (:func:`~qkernels.act_linear.act_kernel`'s preferred one), the record's ``activations``
says which and each layer row its path; other activation-quantized cells time the weight-only kernels, and the
record says so) and a short greedy decode is timed (tokens/s and peak memory)
in each of ``decode_loops``: ``eager`` (Python between the kernels), ``compiled`` (a static KV cache, the
step compiled by ``torch.compile`` and replayed as a CUDA graph), and with ``prefill_tokens`` one forward
over a prompt that long (time to first token: the GEMM paths); the original layers are put back so later
evaluators see the model unchanged. Elsewhere the
result is recorded as skipped, not failed: metrics ``{}`` and ``protocol["latency"]["skipped"]``.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import torch

from bench.metrics import EvalContext, EvalResult
from bench.models import ModelBundle
from bench.timing import capture, gpu_name, time_side_by_side
from methods.common.formats import Format, FormatError, IntFormat
from methods.common.microscaling import MxFormat, NvFormat

MAX_KERNEL_BITS = 4
DECODE_LOOPS = ("eager", "compiled")  # compiled: a static KV cache, the step compiled by torch.compile, replayed as a CUDA graph


class Latency:
    def __init__(
        self,
        format: Format | None = None,
        modes: tuple[str, ...] | list[str] = ("steady",),
        batches: tuple[int, ...] | list[int] = (1, 16),
        decode_tokens: int = 32,
        prompt_tokens: int = 8,
        decode_loops: tuple[str, ...] | list[str] = ("eager",),
        prefill_tokens: int = 0,
    ) -> None:
        self.format = format
        self.modes = tuple(modes)
        self.batches = tuple(batches)
        self.decode_tokens = decode_tokens
        self.prompt_tokens = prompt_tokens
        self.decode_loops = tuple(decode_loops)
        self.prefill_tokens = prefill_tokens
        unknown = [loop for loop in self.decode_loops if loop not in DECODE_LOOPS]
        if unknown or not self.decode_loops:
            raise ValueError(f"decode_loops={list(self.decode_loops)}: {unknown or 'none given'}; choose from {list(DECODE_LOOPS)}")
        counts = {"decode_tokens": (decode_tokens, 1), "prompt_tokens": (prompt_tokens, 1), "prefill_tokens": (prefill_tokens, 0)}
        bad = {name: value for name, (value, least) in counts.items() if value < least}
        if bad:
            raise ValueError(f"{bad}: decode_tokens and prompt_tokens take at least 1, prefill_tokens at least 0 (0: no prefill)")

    def __call__(self, bundle: ModelBundle, ctx: EvalContext) -> EvalResult:
        act, activations = self.activation_kernel(ctx)
        reason = self.skip_reason(bundle, act)
        if reason:
            return EvalResult({}, {"latency": {"skipped": reason, "device": str(bundle.device)}})
        start = time.perf_counter()
        layers, per_shape = self.time_layers(bundle, act)
        decode = self.time_decode(bundle, act)
        protocol = {
            "gpu": gpu_name(), "modes": list(self.modes), "batches": list(self.batches), "format": self.format.describe(),
            "activations": activations, "layer_shapes": per_shape, "decode": decode,
            "baseline": "cuBLAS fp16 at the same shapes, same process",
        }
        metrics = {f"latency/{k if k.startswith('prefill_') else 'decode_' + k}": v
                   for k, v in decode.items() if isinstance(v, float)}
        return EvalResult({**layers, **metrics}, {"latency": protocol}, time.perf_counter() - start)

    def activation_kernel(self, ctx: EvalContext) -> tuple[IntFormat | None, str]:
        """The cell's activation format where an activation-quantized kernel runs it with the weights
        (:func:`~qkernels.act_linear.act_kernel`: dynamic per-token int activations up to 8 bits with per-channel int
        weights up to 8 bits or grouped ones up to 4), and what the record says about the activations: their format
        and kernel, or why the weight-only kernels (fp16 activations) are what is timed."""
        from qkernels.act_linear import act_kernel

        spec = ctx.spec
        if spec is None or spec.act is None:
            return None, "fp16 (the cell does not quantize activations)"
        settings = spec.act_quant
        if settings.static is not None or settings.clip_ratio != 1.0:
            return None, (f"fp16 in the timed kernels: {spec.act.describe()} with static={settings.static}, clip_ratio="
                          f"{settings.clip_ratio} has no kernel here (dynamic min-max only)")
        try:
            kernel = act_kernel(self.format, spec.act)
        except FormatError as err:
            return None, f"fp16 in the timed kernels: {err}"
        if kernel == "lowbit":
            return spec.act, (f"{spec.act.describe()} (lowbit kernel: fake-quantized per token by one kernel, then the weight-only "
                              f"kernels; no int4 or binary tensor cores on this path)")
        return spec.act, f"{spec.act.describe()} ({kernel} kernel)"

    def skip_reason(self, bundle: ModelBundle, act: IntFormat | None = None) -> str | None:
        if bundle.device.type != "cuda":
            return "no GPU"
        if act is not None or isinstance(self.format, (MxFormat, NvFormat)):
            return None
        if not isinstance(self.format, IntFormat) or self.format.bits > MAX_KERNEL_BITS:
            name = self.format.describe() if self.format is not None else "none"
            return f"format {name} has no packed kernel (int, 1..{MAX_KERNEL_BITS} bits; MX and NV formats)"
        return None

    @torch.no_grad()
    def time_layers(self, bundle: ModelBundle, act: IntFormat | None = None) -> tuple[dict[str, float], list[dict[str, Any]]]:
        """Per distinct (in, out) shape: kernel and fp16 times (with ``act``, the activation-quantized layer: its
        activations quantized and multiplied); metrics sum them over all layers."""
        from bench.kernel_latency import act_calls, block_calls, fp16_calls, kernel_config, lowbit_calls
        from qkernels.act_linear import act_kernel, act_route
        from qkernels.block_matmul import pack_block_weight, pick_block_path
        from qkernels.lowbit_matmul import pick_path
        from qkernels.qlinear import pack_int_weight

        block = isinstance(self.format, (MxFormat, NvFormat))  # BlockLinear's kernels

        count: dict[tuple[int, int], int] = {}
        first: dict[tuple[int, int], torch.nn.Linear] = {}
        for layer in bundle.layers.values():
            shape = (layer.in_features, layer.out_features)
            count[shape] = count.get(shape, 0) + 1
            first.setdefault(shape, layer)
        totals: dict[str, float] = {}
        rows = []
        for (k, n), layer in first.items():
            weight = layer.weight.detach().float()
            if act is None:
                packed = pack_block_weight(weight, self.format) if block else pack_int_weight(weight, self.format)
            for m in self.batches:
                x = torch.randn(m, k, device=bundle.device, dtype=torch.float16)
                config = None  # the kernel's tile config, where one runs (the rules change between sessions)
                if act is not None:
                    path = act_route(act_kernel(self.format, act), m, k, n, x.device, x.dtype)
                    calls = act_calls(x, weight, self.format, act)
                elif block:
                    path = pick_block_path(m, packed)
                    calls = block_calls(x, packed, path)
                else:
                    path, calls = pick_path(m, packed, x.device, x.dtype), lowbit_calls(x, packed, "auto")
                    config = kernel_config(m, packed, path)
                times = time_side_by_side({"kernel": calls, "fp16": fp16_calls(x, n)[1]}, self.modes)
                kernel, base = times["kernel"], times["fp16"]
                rows.append({"in": k, "out": n, "layers": count[(k, n)], "batch": m, "path": path, **({"config": config} if config else {}),
                             **{f"{mode}_us": kernel[mode] for mode in self.modes}, **{f"{mode}_fp16_us": base[mode] for mode in self.modes}})
                for mode in self.modes:
                    key = f"latency/layers_{mode}_us/b{m}"
                    totals[key] = totals.get(key, 0.0) + kernel[mode] * count[(k, n)]
                    totals[f"{key}_fp16"] = totals.get(f"{key}_fp16", 0.0) + base[mode] * count[(k, n)]
        for key in [k for k in totals if not k.endswith("_fp16")]:
            totals[key.replace("_us/", "_speedup/")] = totals[f"{key}_fp16"] / totals[key]
        return totals, rows

    @torch.no_grad()
    def time_decode(self, bundle: ModelBundle, act: IntFormat | None = None) -> dict[str, Any]:
        """Greedy decode (batch 1) with the model as configured and with QuantLinear layers, in each of
        ``decode_loops``: ``tokens_per_s`` and ``tokens_per_s_unquantized`` for the eager loop, the same keys
        prefixed ``compiled_`` for the compiled one; with ``prefill_tokens``, ``prefill_ms`` and
        ``prefill_ms_unquantized``: one forward over a prompt that long (the GEMM paths)."""
        from qkernels.qlinear import quantize_linear_layers, restore_linear_layers

        vocab = int(bundle.model.config.vocab_size)
        prompt = torch.randint(0, vocab, (1, self.prompt_tokens), device=bundle.device)
        result: dict[str, Any] = {"tokens": self.decode_tokens, "prompt_tokens": self.prompt_tokens, "loops": list(self.decode_loops),
                                  "model_dtype": str(next(bundle.model.parameters()).dtype)}
        loops = {"eager": ("", decode_tokens_per_s), "compiled": ("compiled_", compiled_decode_tokens_per_s)}
        failed: dict[str, str] = {}

        def run(loop: str, suffix: str) -> None:  # a loop that cannot run this model is recorded, the others still run
            if loop in failed:
                return
            prefix, measure = loops[loop]
            try:
                result[f"{prefix}tokens_per_s{suffix}"] = measure(bundle.model, prompt, self.decode_tokens)
            except Exception as err:  # noqa: BLE001 (torch.compile raises many kinds; the message is kept)
                if loop == "eager":
                    raise
                failed[loop] = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"

        long_prompt = None
        if self.prefill_tokens:
            length = min(self.prefill_tokens, int(getattr(bundle.model.config, "max_position_embeddings", self.prefill_tokens)))
            long_prompt = torch.randint(0, vocab, (1, length), device=bundle.device)
            result["prefill_tokens"] = length
            result["prefill_ms_unquantized"] = prefill_ms(bundle.model, long_prompt)
        for loop in self.decode_loops:
            run(loop, "_unquantized")
        originals = quantize_linear_layers(bundle, self.format, act_fmt=act)
        try:
            torch.cuda.reset_peak_memory_stats(bundle.device)
            if long_prompt is not None:
                result["prefill_ms"] = prefill_ms(bundle.model, long_prompt)
            for loop in self.decode_loops:
                run(loop, "")
            result["peak_memory_gb"] = torch.cuda.max_memory_allocated(bundle.device) / 1e9
        finally:
            restore_linear_layers(bundle, originals)
        if failed:
            result["failed_loops"] = failed
        return result


def decode_tokens_per_s(model: torch.nn.Module, prompt: torch.Tensor, tokens: int) -> float:
    """Tokens per second of a greedy decode with the KV cache, after one untimed warm-up token."""
    out = model(prompt, use_cache=True)
    past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
    out = model(token, past_key_values=past, use_cache=True)
    past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
    torch.cuda.synchronize(prompt.device)
    start = time.perf_counter()
    for _ in range(tokens):
        out = model(token, past_key_values=past, use_cache=True)
        past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
    torch.cuda.synchronize(prompt.device)
    return tokens / (time.perf_counter() - start)


PREFILL_REPS = 5


def prefill_ms(model: torch.nn.Module, prompt: torch.Tensor) -> float:
    """Median milliseconds (CUDA events) of one forward over ``prompt`` without a cache, after one untimed run."""
    model(prompt, use_cache=False)
    times = []
    for _ in range(PREFILL_REPS):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        model(prompt, use_cache=False)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


WARM_STEPS = 3  # compiled steps run before capture (the compile, then the allocator and autotuning settle)


def compiled_step(model: torch.nn.Module, prompt: torch.Tensor, tokens: int,
                  backend: str = "inductor") -> tuple[Callable[[], None], torch.Tensor, torch.Tensor]:
    """The prompt prefilled into a static KV cache (room for ``tokens`` more and the warm-up), and one greedy
    decode step compiled by ``torch.compile(fullgraph=True)``: it reads ``token`` at ``pos``, writes the argmax
    back to ``token`` and advances ``pos`` (QuantLinear layers are the ``qkernels::lowbit_matmul`` operator).
    Dynamo's caches are reset first: every call compiles another model, and a cell would otherwise meet
    Dynamo's recompile limit after a few cells in one process (then it runs the step uncompiled)."""
    from transformers import StaticCache

    torch.compiler.reset()
    length = prompt.shape[1]
    cache = StaticCache(config=model.config, max_cache_len=length + tokens + WARM_STEPS + 2)
    out = model(prompt, past_key_values=cache, use_cache=True, cache_position=torch.arange(length, device=prompt.device))
    token, pos = out.logits[:, -1:].argmax(-1), torch.tensor([length], device=prompt.device)

    def step() -> None:
        token.copy_(model(token, past_key_values=cache, use_cache=True, cache_position=pos).logits[:, -1:].argmax(-1))
        pos.add_(1)

    return torch.compile(step, fullgraph=True, backend=backend), token, pos


def compiled_decode_tokens_per_s(model: torch.nn.Module, prompt: torch.Tensor, tokens: int) -> float:
    """Tokens per second of :func:`compiled_step` replayed as a CUDA graph (no Python between kernels: what a
    serving stack would see), after :data:`WARM_STEPS` untimed steps."""
    step, _, _ = compiled_step(model, prompt, tokens)
    for _ in range(WARM_STEPS):
        step()
    graph = capture(step)
    torch.cuda.synchronize(prompt.device)
    start = time.perf_counter()
    for _ in range(tokens):
        graph.replay()
    torch.cuda.synchronize(prompt.device)
    return tokens / (time.perf_counter() - start)

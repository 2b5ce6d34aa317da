"""End-to-end decode speed of a Llama-architecture model at real size, random weights, per weight kind.

    python -m bench.decode_latency --arch llama2-7b --kinds fp16,w4g128,w2g128 --tokens 128
    python -m bench.decode_latency --kinds fp16,w4g128,w4g128@tinygemm,w4g128@gemlite,w2g128@gemlite   # published kernels

Real checkpoints cannot reach the GPU machine, so the model is built here with random weights: the
Llama block (RMSNorm, rotary q/k, grouped-query attention over a static KV cache, SwiGLU MLP) with
``nn.Linear`` layers for fp16, :class:`qkernels.qlinear.QuantLinear` layers holding random packed
codes, for the MX/NV kinds (``mxfp4``, ``nvfp4``, ...) :class:`qkernels.qlinear.BlockLinear` layers of
random weights quantized to the format, and for the activation-quantized kinds (``w8a8``, ``w4a8g128``,
``w4a4``, ``w4a4bp``) :class:`qkernels.act_linear.ActQuantLinear` layers (each token's activations quantized, then
the W8A8, W4A8 or lowbit kernel; ``w4a4bp``: ABQ-LLM's bit-plane kernel). Decoding one token is one CUDA graph replay (embedding, every block, norm, fp16 LM head, argmax
feeding the next step), so the numbers show the matmuls rather than Python launch overhead; the
eager loop is timed too. With ``--compile`` the step is also compiled by ``torch.compile`` (one graph:
the QuantLinear and BlockLinear layers are the ``qkernels::lowbit_matmul`` and ``qkernels::block_matmul``
operators, the code around them fused by Inductor) and replayed as a CUDA graph. Reports tokens/s, ms/token, weight bytes and peak memory.
No hydra imports: this runs on the bare device machine.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from bench.competitors import COMPETITORS, CompetitorLinear, runnable
from bench.kernel_latency import BLOCK_KINDS, LOWBIT_KINDS, random_packed
from bench.timing import capture, gpu_name
from qkernels.act_linear import ActQuantLinear
from qkernels.qlinear import BlockLinear, QuantLinear
from methods.common.formats import IntFormat


@dataclass(frozen=True)
class Arch:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    rope_theta: float = 10000.0

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


ARCHS = {
    "llama2-7b": Arch(4096, 11008, 32, 32, 32, 32000),
    "llama3-8b": Arch(4096, 14336, 32, 32, 8, 128256, rope_theta=500000.0),
    "tiny": Arch(256, 512, 2, 4, 2, 1000),
}
WEIGHT_STD = 0.02
TOKENS8 = IntFormat(bits=8, group_size="token")  # dynamic per-token asymmetric activations, the harness's act_format=int_token
TOKENS4 = IntFormat(bits=4, group_size="token")
CHANNEL4 = IntFormat(bits=4, group_size="channel")
ACT_KINDS = {  # integer weights and activations (qkernels.act_linear): formats, and the kernel (None: the preferred one)
    "w8a8": (IntFormat(bits=8, group_size="channel", symmetric=True), TOKENS8, None),
    "w4a8g128": (IntFormat(bits=4, group_size=128), TOKENS8, None),
    "w4a4": (CHANNEL4, TOKENS4, None),  # lowbit: the tokens fake-quantized onto the W4 kernels
    "w4a4bp": (CHANNEL4, TOKENS4, "bitplane"),  # ABQ-LLM's bit-plane kernel
}
KINDS = ["fp16", *LOWBIT_KINDS, *BLOCK_KINDS, *ACT_KINDS]


def make_linear(kind: str, k: int, n: int, device: str = "cuda") -> nn.Module:
    """fp16 ``nn.Linear``, a QuantLinear of random codes whose weights have about WEIGHT_STD spread (``KIND@COMPETITOR``:
    the same codes on a published kernel, :mod:`bench.competitors`), or a random fp16 weight quantized to a format: a
    BlockLinear for the MX/NV kinds of ``bench.kernel_latency``, an ActQuantLinear for :data:`ACT_KINDS`."""
    if kind in ("fp16", *BLOCK_KINDS, *ACT_KINDS):
        layer = nn.Linear(k, n, bias=False, device=device, dtype=torch.float16)
        nn.init.normal_(layer.weight, std=WEIGHT_STD)
        if kind in ACT_KINDS:
            return ActQuantLinear.from_linear(layer, *ACT_KINDS[kind])
        return layer if kind == "fp16" else BlockLinear.from_linear(layer, BLOCK_KINDS[kind])
    base, _, rival = kind.partition("@")
    spec = LOWBIT_KINDS[base]
    code_std = (spec.top_code + 1) / math.sqrt(12)
    pw = random_packed(spec, n, k, scale_range=(0.5 * WEIGHT_STD / code_std, 1.5 * WEIGHT_STD / code_std), device=device)
    if not rival:
        return QuantLinear(pw)
    if not COMPETITORS[rival].takes(pw):
        raise ValueError(f"{rival} does not take {base} weights of {k}x{n} (bench/competitors.py says which it takes)")
    return CompetitorLinear(rival, pw)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding on ``[..., head_dim]`` (halves rotated, as in Llama)."""
    first, second = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-second, first), dim=-1) * sin


class Block(nn.Module):
    """One Llama decoder block for single-token decoding over a static KV cache."""

    def __init__(self, arch: Arch, kind: str, max_len: int, device: str = "cuda") -> None:
        super().__init__()
        h, hd = arch.hidden, arch.head_dim
        self.arch = arch
        self.q_proj = make_linear(kind, h, arch.heads * hd, device)
        self.k_proj = make_linear(kind, h, arch.kv_heads * hd, device)
        self.v_proj = make_linear(kind, h, arch.kv_heads * hd, device)
        self.o_proj = make_linear(kind, arch.heads * hd, h, device)
        self.gate_proj = make_linear(kind, h, arch.intermediate, device)
        self.up_proj = make_linear(kind, h, arch.intermediate, device)
        self.down_proj = make_linear(kind, arch.intermediate, h, device)
        self.attn_norm = nn.Parameter(torch.ones(h, device=device, dtype=torch.float16))
        self.mlp_norm = nn.Parameter(torch.ones(h, device=device, dtype=torch.float16))
        cache = (1, arch.kv_heads, max_len, hd)
        self.register_buffer("k_cache", torch.zeros(cache, device=device, dtype=torch.float16))
        self.register_buffer("v_cache", torch.zeros(cache, device=device, dtype=torch.float16))

    @torch.no_grad()
    def fuse_projections(self) -> None:
        """q, k, v as one layer and gate, up as one (as serving engines run them): 4 matmuls a block instead of 7."""
        def fused(layers: list[nn.Module]) -> nn.Module:
            if isinstance(layers[0], (QuantLinear, BlockLinear, ActQuantLinear, CompetitorLinear)):
                return type(layers[0]).concat(layers)
            merged = nn.Linear(layers[0].in_features, sum(layer.out_features for layer in layers), bias=False,
                               device=layers[0].weight.device, dtype=layers[0].weight.dtype)
            merged.weight.copy_(torch.cat([layer.weight for layer in layers]))
            return merged

        self.qkv_proj = fused([self.q_proj, self.k_proj, self.v_proj])
        self.gate_up_proj = fused([self.gate_proj, self.up_proj])
        del self.q_proj, self.k_proj, self.v_proj, self.gate_proj, self.up_proj

    def forward(self, x: torch.Tensor, pos: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        a, hd = self.arch, self.arch.head_dim
        h = rms_norm(x, self.attn_norm)
        if hasattr(self, "qkv_proj"):
            q, k, v = self.qkv_proj(h).split([a.heads * hd, a.kv_heads * hd, a.kv_heads * hd], dim=-1)
        else:
            q, k, v = self.q_proj(h), self.k_proj(h), self.v_proj(h)
        q = rotate(q.view(1, a.heads, 1, hd), cos, sin)
        self.k_cache.index_copy_(2, pos, rotate(k.view(1, a.kv_heads, 1, hd), cos, sin))
        self.v_cache.index_copy_(2, pos, v.view(1, a.kv_heads, 1, hd))
        attn = F.scaled_dot_product_attention(q, self.k_cache, self.v_cache, attn_mask=visible, enable_gqa=a.kv_heads != a.heads)
        x = x + self.o_proj(attn.reshape(1, 1, a.heads * hd))
        h = rms_norm(x, self.mlp_norm)
        if hasattr(self, "gate_up_proj"):
            gate, up = self.gate_up_proj(h).chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(h), self.up_proj(h)
        return x + self.down_proj(F.silu(gate) * up)


class Decoder(nn.Module):
    """Embedding, blocks, final norm and an fp16 LM head; ``step()`` decodes the token in ``self.token``."""

    def __init__(self, arch: Arch, kind: str, max_len: int, device: str = "cuda", fuse: bool = False) -> None:
        super().__init__()
        self.arch, self.max_len = arch, max_len
        self.embed = nn.Embedding(arch.vocab, arch.hidden, device=device, dtype=torch.float16)
        nn.init.normal_(self.embed.weight, std=WEIGHT_STD)
        self.blocks = nn.ModuleList(Block(arch, kind, max_len, device) for _ in range(arch.layers))
        if fuse:
            for block in self.blocks:
                block.fuse_projections()
        self.norm = nn.Parameter(torch.ones(arch.hidden, device=device, dtype=torch.float16))
        self.lm_head = make_linear("fp16", arch.hidden, arch.vocab, device)
        inv_freq = 1.0 / arch.rope_theta ** (torch.arange(0, arch.head_dim, 2, device=device).float() / arch.head_dim)
        angles = torch.outer(torch.arange(max_len, device=device).float(), inv_freq)
        self.register_buffer("cos", torch.cat((angles, angles), -1).cos().half())
        self.register_buffer("sin", torch.cat((angles, angles), -1).sin().half())
        self.register_buffer("token", torch.zeros(1, 1, dtype=torch.long, device=device))
        self.register_buffer("pos", torch.zeros(1, dtype=torch.long, device=device))
        self.register_buffer("logits", torch.zeros(1, 1, arch.vocab, dtype=torch.float16, device=device))

    @torch.no_grad()
    def step(self) -> None:
        """Decode one token: read ``token`` at ``pos``, write the logits to ``logits`` and their argmax to ``token``,
        advance ``pos``."""
        cos, sin = self.cos[self.pos].view(1, 1, 1, -1), self.sin[self.pos].view(1, 1, 1, -1)
        visible = (torch.arange(self.max_len, device=self.pos.device) <= self.pos).view(1, 1, 1, -1)
        x = self.embed(self.token)
        for block in self.blocks:
            x = block(x, self.pos, cos, sin, visible)
        self.logits.copy_(self.lm_head(rms_norm(x, self.norm)))
        self.token.copy_(self.logits.argmax(-1))
        self.pos.add_(1)

    def reset(self) -> None:
        self.token.random_(0, self.arch.vocab)
        self.pos.zero_()


def weight_bytes(model: nn.Module) -> int:
    held = sum(m.nbytes for m in model.modules() if isinstance(m, CompetitorLinear))  # outside the state dict
    return held + sum(t.numel() * t.element_size() for name, t in model.state_dict().items() if "cache" not in name)


def known_kind(kind: str) -> bool:
    """One of :data:`KINDS`, or ``KIND@COMPETITOR``: a low-bit kind on one of :data:`bench.competitors.COMPETITORS`."""
    base, at, rival = kind.partition("@")
    return kind in KINDS if not at else base in LOWBIT_KINDS and rival in COMPETITORS


def tokens_per_s(run_tokens: Callable[[int], None], tokens: int) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    run_tokens(tokens)
    torch.cuda.synchronize()
    return tokens / (time.perf_counter() - start)


def compare_steps(model: Decoder, step: Callable[[], None], other: Callable[[], None], tokens: int) -> tuple[float, int]:
    """Teacher-forced from ``model.reset()`` under seed 0: ``step`` and ``other`` each decode from the same token and
    position (``step``'s token goes on); the largest ``max |logits difference| / max |logits|`` and how many of the
    ``tokens`` argmaxes agree."""
    torch.manual_seed(0)
    model.reset()
    worst, agree = 0.0, 0
    for _ in range(tokens):
        token, pos = model.token.clone(), model.pos.clone()
        other()
        logits, chosen = model.logits.float().clone(), model.token.clone()
        model.token.copy_(token), model.pos.copy_(pos)
        step()
        worst = max(worst, ((model.logits.float() - logits).abs().max() / model.logits.float().abs().max()).item())
        agree += bool(torch.equal(model.token, chosen))
    return worst, agree


def measure(arch: Arch, kind: str, tokens: int, compile: bool = False, fuse: bool = False) -> dict:
    """tokens/s eager and with the step in a CUDA graph, for one weight kind; with ``compile``, also the step
    compiled by ``torch.compile`` (Inductor fuses the norms, rotary and residual code; the low-bit matmuls stay
    the project's kernels, through the ``qkernels::lowbit_matmul`` operator) in a CUDA graph, with its compile
    time and its logits against the uncompiled graph's (:func:`compare_steps`); with ``fuse``, q/k/v and gate/up
    fused (:meth:`Block.fuse_projections`). Peak memory over the whole run."""
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    model = Decoder(arch, kind, max_len=2 * tokens + 8, fuse=fuse).eval()
    model.reset()
    for _ in range(3):  # compile the kernels, warm the allocator
        model.step()
    model.reset()
    eager = tokens_per_s(lambda n: [model.step() for _ in range(n)], tokens)
    graph = capture(model.step)
    model.reset()
    graphed = tokens_per_s(lambda n: [graph.replay() for _ in range(n)], tokens)
    out = {
        "kind": kind, "fused": fuse, "tokens": tokens, "tokens_per_s_graph": graphed, "ms_per_token_graph": 1e3 / graphed,
        "tokens_per_s_eager": eager, "weight_gb": weight_bytes(model) / 1e9,
    }
    if compile:
        # every kind compiles Decoder.step again: past Dynamo's recompile limit it would run uncompiled, unnoticed
        torch.compiler.reset()
        step = torch.compile(model.step, fullgraph=True)
        start = time.perf_counter()
        model.reset()
        try:
            for _ in range(3):
                step()
        except Exception as err:  # noqa: BLE001 (a kind whose layers Dynamo cannot trace: recorded, the other kinds still run)
            out["compile_error"] = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
            print(f"{kind}: torch.compile failed ({out['compile_error']}); its compiled columns are left empty", file=sys.stderr)
            compile = False
    if compile:
        torch.cuda.synchronize()
        out["compile_s"] = time.perf_counter() - start
        compiled_graph = capture(step)
        model.reset()
        out["tokens_per_s_compiled"] = tokens_per_s(lambda n: [compiled_graph.replay() for _ in range(n)], tokens)
        out["ms_per_token_compiled"] = 1e3 / out["tokens_per_s_compiled"]
        check = min(tokens, 32)
        worst, agree = compare_steps(model, graph.replay, compiled_graph.replay, check)
        out["compiled_logits_rel_diff"], out["compiled_argmax_agree"] = worst, f"{agree}/{check}"
        del compiled_graph
    out["peak_gb"] = torch.cuda.max_memory_allocated() / 1e9
    del graph, model
    torch.cuda.empty_cache()
    return out


def markdown(rows: list[dict]) -> str:
    """The rows as a table; the "x fp16" columns against the fp16 row of the same projections (fused or not)."""
    fp16 = {r.get("fused", False): r for r in rows if r["kind"] == "fp16"}

    def ratio(r: dict, key: str) -> str:
        base = fp16.get(r.get("fused", False), {})
        return f"{r[key] / base[key]:.2f}" if base.get(key) and key in r else "-"

    compiled = any("tokens_per_s_compiled" in r for r in rows)
    head = "| weights | tokens/s (graph) | ms/token | x fp16 | tokens/s (eager) |"
    if compiled:
        head += " tokens/s (compiled graph) | ms/token | x fp16 | compile s | logits diff | argmax as uncompiled |"
    lines = [head + " weights GB | peak GB |", "|---" * (head.count("|") + 1) + "|"]
    for r in rows:
        label = r["kind"] + (" fused" if r.get("fused") else "")
        line = (f"| {label} | {r['tokens_per_s_graph']:.1f} | {r['ms_per_token_graph']:.2f} | {ratio(r, 'tokens_per_s_graph')} | "
                f"{r['tokens_per_s_eager']:.1f} |")
        if compiled and "tokens_per_s_compiled" not in r:  # this kind did not compile (its row says why in compile_error)
            line += " - | - | - | - | - | - |"
        elif compiled:
            line += (f" {r['tokens_per_s_compiled']:.1f} | {r['ms_per_token_compiled']:.2f} | {ratio(r, 'tokens_per_s_compiled')} | "
                     f"{r['compile_s']:.0f} | {r['compiled_logits_rel_diff']:.1e} | {r['compiled_argmax_agree']} |")
        lines.append(line + f" {r['weight_gb']:.2f} | {r['peak_gb']:.2f} |")
    if compiled and any(r["kind"] in ACT_KINDS for r in rows):
        lines.append("\nThe activation-quantized kinds' logits part from the uncompiled graph's more than the others': Inductor's "
                     "fused norms round the last bits differently and the per-token quantizers turn those bits into whole code "
                     "steps, which 32 layers of random weights carry (with backend=\"aot_eager\" the logits are equal; "
                     "bench/results/decode_latency_h200.md, session 18).")
    return "\n".join(lines)


FUSE_MODES = {"no": (False,), "yes": (True,), "both": (False, True)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="llama2-7b", choices=sorted(ARCHS))
    parser.add_argument("--kinds", default="fp16,w4g128,w3g128,w2g128,ternary2,w1g128")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--compile", action="store_true", help="also time the step compiled by torch.compile (in a CUDA graph)")
    parser.add_argument("--fuse", nargs="?", const="yes", default="no", choices=list(FUSE_MODES),
                        help="q/k/v and gate/up projections as one layer each (fp16 and low-bit alike); both: every kind "
                             "unfused, then fused, in one process")
    parser.add_argument("--out", type=Path, default=None, help="write the Markdown table here")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    kinds = [k for k in args.kinds.split(",") if k]
    unknown = [k for k in kinds if not known_kind(k)]
    if unknown or not kinds:
        parser.error(f"--kinds {unknown or 'none given'}; choose from {KINDS}, or a low-bit kind on a published kernel as "
                     f"KIND@COMPETITOR, COMPETITOR one of {list(COMPETITORS)}")
    if args.tokens < 1:
        parser.error(f"--tokens {args.tokens}; give at least 1")
    if not torch.cuda.is_available():
        print("no CUDA GPU: nothing to time", file=sys.stderr)
        return 1
    rivals = {k.partition("@")[2] for k in kinds} - {""}
    if missing := sorted(rivals - set(runnable(sorted(rivals), torch.device("cuda")))):
        parser.error(f"--kinds: competitors {missing} cannot run here (the lines above say why)")
    torch.manual_seed(0)
    arch = ARCHS[args.arch]
    rows = []
    for kind in kinds:
        for fuse in FUSE_MODES[args.fuse]:
            try:
                rows.append(measure(arch, kind, args.tokens, args.compile, fuse))
            except Exception as err:  # noqa: BLE001 - another project's kernel failing leaves its row out, not the table
                if "@" not in kind:
                    raise
                print(f"{kind}{' fused' if fuse else ''}: left out ({type(err).__name__}: {(str(err).splitlines() or [''])[0][:160]})",
                      file=sys.stderr, flush=True)
                torch.cuda.empty_cache()
                continue
            print(f"{kind}{' fused' if fuse else ''}: {rows[-1]['tokens_per_s_graph']:.1f} tokens/s (graph)", file=sys.stderr, flush=True)
    header = (f"GPU: {gpu_name()} | {args.arch} {asdict(arch)} | batch 1, {args.tokens} tokens after a 1-token prompt"
              + {"no": "", "yes": " | q/k/v and gate/up fused", "both": " | each kind unfused, then fused"}[args.fuse])
    table = header + "\n\n" + markdown(rows)
    print(table, flush=True)
    if args.out:
        args.out.write_text(table + "\n")
    if args.json:
        args.json.write_text(json.dumps({"gpu": gpu_name(), "arch": args.arch, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

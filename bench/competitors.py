"""Published low-bit kernels, timed beside the project's by ``bench.kernel_latency --competitors ...``.

The issue's goals cite published H100 ratios (Marlin 2.2x, torchao's tinygemm 2.26x: W4, 8192^2, batch 1). Quoted
ratios come from other GPUs, clocks and cuBLAS versions; here the kernels that researchers use run in the same
process, on the same GPU, at the same shapes, and wherever their format holds the weight, on the same weight:

* ``tinygemm``: PyTorch's int4 kernel (``aten._weight_int4pack_mm``: torchao's int4 weight-only layout, gpt-fast's
  int4 path). uint4 codes in groups of 32 to 256 with bf16 activations, scales and zero points. Its zero points
  are floats added after ``(code - 8) * scale``, so a group's is ``(8 - zero) * scale`` in bf16: about 3e-3
  relative error against the fp32 reference, bf16's rounding, where the project's kernels have about 1e-4.
* ``gemlite``: GemLite's Triton kernels (Mobius Labs; behind HQQ's vLLM backend and torchao/SGLang's GemLite
  layout). uint1, uint2 and uint4 codes, fp16, groups of a multiple of 32 or one a row, ``(code - zero) *
  scale``; its own dispatch (GEMV, split-K GEMM or GEMM by batch) and autotuning. It ships tuned configs for
  some GPUs (an H100 among them, none for the H200): on another Hopper GPU the H100's are loaded, and shapes
  they lack are autotuned at the first call. It needs a CUDA GPU to import.
* ``bnb_nf4``: bitsandbytes' 4-bit weights (NF4 in blocks of 64 with fp32 absmax, QLoRA's format; its batch-1
  GEMV, dequantize + matmul above). Not the same codes: the dequantized weight requantized to NF4, and its
  error is against its own dequantized weight.

Each competitor says why it cannot run here (not installed, no GPU) instead of failing: the table leaves it out.
No hydra imports: this runs on the bare device machine (carry gemlite and bitsandbytes as wheels).
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from typing import Any, Callable

import torch

from bench.timing import capture, copies_for
from qkernels import lowbit_matmul as lm
from qkernels.pack import PackedWeight, concat_packed, dequantize_packed, unpack_codes


@dataclass
class Held:
    """A competitor's copy of one weight: its own tensors (``state``) and their bytes. Nothing else is kept: in the
    decode benchmark every layer holds one, and its peak memory must be the competitor's own."""

    state: Any
    nbytes: int


class Competitor:
    """A published kernel: whether it can run here, which packed weights its format holds, its own copy of one, and
    its call (on activations in the dtype it takes)."""

    name: str = ""
    module: str | None = None  # the package it needs

    def why_not(self, device: torch.device) -> str | None:
        """Why it cannot run on ``device`` (None: it can)."""
        if self.module is None:
            return None
        try:
            importlib.import_module(self.module)
        except Exception as err:  # noqa: BLE001 - an import that fails for any reason means the competitor is left out
            return f"{self.module} does not import here ({type(err).__name__}: {(str(err).splitlines() or [''])[0][:120]})"
        return None

    def takes(self, pw: PackedWeight) -> bool:
        raise NotImplementedError

    def hold(self, pw: PackedWeight) -> Held:
        """Its own copy of ``pw`` (fresh tensors each call: the steady timing rotates through several)."""
        raise NotImplementedError

    def reference(self, pw: PackedWeight, held: Held) -> torch.Tensor:
        """The fp32 weight ``[N, K]`` its output is measured against: what its format holds of ``pw``."""
        return dequantize_packed(pw)

    def activations(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def matmul(self, x: torch.Tensor, held: Held) -> torch.Tensor:
        raise NotImplementedError


def tinygemm_inner_k_tiles(k: int) -> int | None:
    """The widest of tinygemm's K tilings (8, 4 or 2 tiles of 16) that divides K."""
    return next((tiles for tiles in (8, 4, 2) if k % (16 * tiles) == 0), None)


class Tinygemm(Competitor):
    name = "tinygemm"

    def why_not(self, device: torch.device) -> str | None:
        if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] < 8:
            return "tinygemm's CUDA kernel needs compute capability 8.0 or newer"
        return None

    def takes(self, pw: PackedWeight) -> bool:
        return pw.layout == "uint4" and pw.group_size in (32, 64, 128, 256) and pw.n % 8 == 0 and tinygemm_inner_k_tiles(pw.k) is not None

    def hold(self, pw: PackedWeight) -> Held:
        codes = unpack_codes(pw).to(torch.int32)
        tiles = tinygemm_inner_k_tiles(pw.k)
        if pw.words.is_cuda:  # the CUDA kernel takes two codes a byte, the even K in the high nibble
            weight = torch.ops.aten._convert_weight_to_int4pack((codes[:, ::2] << 4 | codes[:, 1::2]).to(torch.uint8), tiles)
        else:
            weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, tiles)
        scale = pw.scale.float()
        zero = pw.zero.float() if pw.zero is not None else torch.full_like(scale, pw.zero_const)
        values = torch.stack([scale, (8 - zero) * scale], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)  # [groups, N, 2]
        return Held((weight, pw.group_size, values), weight.numel() * weight.element_size() + values.numel() * 2)

    def reference(self, pw: PackedWeight, held: Held) -> torch.Tensor:
        """The weight tinygemm holds: ``(code - 8) * scale + zero`` with its bf16 scales and zero points."""
        values = held.state[2]
        s, z = values[..., 0].float().t(), values[..., 1].float().t()
        group = torch.arange(pw.k, device=values.device) // pw.group_size
        return (unpack_codes(pw).float() - 8) * s[:, group] + z[:, group]

    def activations(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(torch.bfloat16)

    def matmul(self, x: torch.Tensor, held: Held) -> torch.Tensor:
        weight, group, values = held.state
        if x.is_cuda:
            return torch.ops.aten._weight_int4pack_mm(x, weight, group, values)
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, weight, group, values)


GEMLITE_BITS = {"uint1": 1, "uint2": 2, "uint4": 4}


class Gemlite(Competitor):
    name = "gemlite"
    module = "gemlite"

    def why_not(self, device: torch.device) -> str | None:
        if device.type != "cuda":
            return "gemlite runs on a CUDA GPU only"
        if reason := super().why_not(device):
            return reason
        gemlite_configs(device)
        return None

    def takes(self, pw: PackedWeight) -> bool:
        """uint1/2/4 codes, K a multiple of 32, groups of a multiple of 32 (or one a row), zero points or an integer offset."""
        per_row = pw.n_groups == 1
        offset_ok = pw.zero is not None or float(pw.zero_const).is_integer()
        return (pw.layout in GEMLITE_BITS and pw.k % 32 == 0 and offset_ok
                and (per_row or (pw.group_size % 32 == 0 and pw.k % pw.group_size == 0)))

    def hold(self, pw: PackedWeight) -> Held:
        from gemlite import DType, GemLiteLinear

        layer = GemLiteLinear(GEMLITE_BITS[pw.layout], group_size=pw.k if pw.n_groups == 1 else pw.group_size, in_features=pw.k,
                              out_features=pw.n, input_dtype=DType.FP16, output_dtype=DType.FP16)
        zero = pw.zero.half().contiguous() if pw.zero is not None else int(pw.zero_const)  # (an integer offset: takes)
        layer.pack(unpack_codes(pw).to(torch.uint8), pw.scale.half().contiguous(), zero, bias=None)
        return Held(layer, sum(t.numel() * t.element_size() for t in layer.get_tensor_args()))

    def matmul(self, x: torch.Tensor, held: Held) -> torch.Tensor:
        return held.state(x)


def gemlite_configs(device: torch.device) -> None:
    """On a Hopper GPU GemLite has no configs for (an H200), load its H100 ones (it loads a GPU's own at import)."""
    import gemlite

    name = torch.cuda.get_device_name(device).lower()
    shipped = os.path.join(os.path.dirname(gemlite.__file__), "configs", "h100.json")
    if lm.is_hopper(device) and "h100" not in name and os.path.exists(shipped):
        gemlite.load_config(shipped)


class BnbNf4(Competitor):
    name = "bnb_nf4"
    module = "bitsandbytes"
    BLOCK = 64

    def takes(self, pw: PackedWeight) -> bool:
        return pw.layout == "uint4" and (pw.n * pw.k) % self.BLOCK == 0

    def hold(self, pw: PackedWeight) -> Held:
        import bitsandbytes.functional as F

        packed, state = F.quantize_4bit(dequantize_packed(pw, torch.float16), blocksize=self.BLOCK, quant_type="nf4")
        nbytes = packed.numel() + state.absmax.numel() * state.absmax.element_size()
        return Held((packed, state), nbytes)

    def reference(self, pw: PackedWeight, held: Held) -> torch.Tensor:
        """Its own weight: the NF4 requantization, dequantized."""
        import bitsandbytes.functional as F

        return F.dequantize_4bit(*held.state).float()

    def matmul(self, x: torch.Tensor, held: Held) -> torch.Tensor:
        import bitsandbytes as bnb

        packed, state = held.state
        return bnb.matmul_4bit(x, packed.t(), quant_state=state)


COMPETITORS: dict[str, Competitor] = {c.name: c for c in (Tinygemm(), Gemlite(), BnbNf4())}


def parse(names: str) -> list[str]:
    """``--competitors`` (a comma list, or ``all``) as names; a clear error for one it does not know."""
    chosen = list(COMPETITORS) if names == "all" else [n for n in names.split(",") if n]
    if bad := [n for n in chosen if n not in COMPETITORS]:
        raise ValueError(f"unknown competitors {bad}; choose from {list(COMPETITORS)} or 'all'")
    return chosen


def runnable(names: list[str], device: torch.device) -> list[str]:
    """The competitors among ``names`` that can run on ``device``; a line for each left out, saying why."""
    kept = []
    for name in names:
        if reason := COMPETITORS[name].why_not(device):
            print(f"competitor {name} left out: {reason}", flush=True)
        else:
            kept.append(name)
    return kept


def trial(x: torch.Tensor, pw: PackedWeight, name: str) -> Held | str:
    """``name``'s first copy of ``pw`` once its call has run and been captured in a CUDA graph (the steady timing replays
    graphs), or why that failed; the benchmark leaves such a cell out and says why instead of losing the shape."""
    comp = COMPETITORS[name]
    try:
        held, xc = comp.hold(pw), comp.activations(x)
        capture(lambda: comp.matmul(xc, held))
    except Exception as err:  # noqa: BLE001 - any failure of another project's kernel leaves only that cell out
        return f"{type(err).__name__}: {(str(err).splitlines() or [''])[0][:160]}"
    return held


def competitor_calls(x: torch.Tensor, pw: PackedWeight, name: str, first: Held) -> Callable[[], list]:
    """A maker for :func:`bench.timing.time_side_by_side`: one call per held copy of ``pw`` (``first`` and fresh ones),
    as many as the steady timing rotates through (:func:`bench.timing.copies_for`)."""
    comp = COMPETITORS[name]
    xc = comp.activations(x)

    def make() -> list:
        held = [first] + [comp.hold(pw) for _ in range(copies_for(first.nbytes) - 1)]
        return [lambda h=h: comp.matmul(xc, h) for h in held]

    return make


def competitor_error(x: torch.Tensor, pw: PackedWeight, name: str, held: Held | None = None) -> float:
    """Relative error of its output (on ``held``, else a fresh copy) against the fp32 product with the weight it holds."""
    comp = COMPETITORS[name]
    held = held or comp.hold(pw)
    ref = x.float() @ comp.reference(pw, held).t()
    out = comp.matmul(comp.activations(x), held).float()
    return ((out - ref).norm() / ref.norm()).item()


class CompetitorLinear(torch.nn.Module):
    """A bias-free linear layer on a competitor's kernel (the decode benchmark's ``KIND@COMPETITOR`` kinds): its held
    copy of the packed weight, which stays out of the state dict (``nbytes`` counts it), and the packed weight on the
    CPU, from which fused projections are built (:meth:`concat`)."""

    def __init__(self, name: str, pw: PackedWeight) -> None:
        super().__init__()
        self.name, self.in_features, self.out_features = name, pw.k, pw.n
        self.held = COMPETITORS[name].hold(pw)
        self.source = pw.to("cpu")
        self.device = pw.words.device

    @property
    def nbytes(self) -> int:
        return self.held.nbytes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        comp = COMPETITORS[self.name]
        y = comp.matmul(comp.activations(x.reshape(-1, self.in_features)), self.held)
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    @classmethod
    def concat(cls, layers: list[CompetitorLinear]) -> CompetitorLinear:
        return cls(layers[0].name, concat_packed([layer.source for layer in layers]).to(layers[0].device))

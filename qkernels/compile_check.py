"""Compile the project's Triton kernels for a GPU target on a machine without one.

    python -m qkernels.compile_check              # sm_90 (Hopper), every kernel and config below
    python -m qkernels.compile_check --arch 80    # Ampere
    python -m qkernels.compile_check --dispatch "NVIDIA H200" --shapes 8192x8192,4096x14336   # what runs there, by batch

The Triton interpreter (the CPU tests) runs a kernel's Python, not its code generator: a kernel can pass every
interpreter test and still fail to compile (session 17: an ``if`` on a constexpr whose branches returned int8
and uint8). Compiling for the target needs no GPU (the Triton wheel ships ``ptxas``), so this catches those
errors, and reports each kernel's registers and spills where ``cuobjdump`` is there to read them. Run it in a
fresh process: with ``TRITON_INTERPRET=1`` set, ``triton.jit`` makes interpreter functions that do not compile.
The Gluon kernels (:mod:`qkernels.gemv_mma`, :mod:`qkernels.gemm_wgmma`, :mod:`qkernels.gemm_ws`) are compiled for sm_90
whatever ``--arch`` says (they are Hopper kernels; the GEMV's ``mma.sync`` would also run on Ampere), with the argument
specializations a launch gives them (:func:`as_launched`), and each line says where ptxas serialized the wgmmas
(:func:`wgmma_serialized`) and how many spill loads and stores sit in the main loop (:func:`loop_spills`). ``--dispatch``
compiles, instead of the representative cases, the configs the dispatcher picks on a named Hopper GPU (its rules and
its saved configs: :func:`as_gpu`) for each kind, shape and batch that runs a Gluon kernel.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Any, Iterator

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource


@dataclass
class Case:
    """One kernel and config: argument types beyond the defaults (pointers ``*fp32``, other scalars ``i32``) and
    every constexpr's value."""

    name: str
    kernel: Any
    types: dict[str, str] = field(default_factory=dict)
    constexprs: dict[str, Any] = field(default_factory=dict)
    num_warps: int = 4
    gluon: bool = False  # a Gluon kernel (its own AST source)
    options: dict[str, Any] = field(default_factory=dict)  # more compile options (maxnreg)
    attrs: dict[tuple[int], list] = field(default_factory=dict)  # argument specializations: (index,) -> [["tt.divisibility", 16]]


def signature(case: Case) -> dict[str, str]:
    """The kernel's signature: ``constexpr`` for its constexprs, else the case's type or the default."""
    parameters = inspect.signature(case.kernel.fn).parameters  # (a JITFunction's, or an interpreter function's)
    names = list(parameters)
    constexprs = [name for name, p in parameters.items() if "constexpr" in str(p.annotation)]
    if missing := [name for name in constexprs if name not in case.constexprs]:
        raise ValueError(f"{case.name}: no value for the constexprs {missing}")
    if unknown := sorted(set(case.types) - set(names)):
        raise ValueError(f"{case.name}: {unknown} are not arguments of {case.kernel.__name__}")
    return {name: "constexpr" if name in case.constexprs else case.types.get(name, "*fp32" if name.endswith("_ptr") else "i32")
            for name in names}


def cases() -> list[Case]:
    """Every Triton kernel of the project (a representative config of each, several where constexprs pick code)."""
    from qkernels import block_matmul as bm
    from qkernels import int_matmul as im
    from qkernels import quant
    from bench.read_floor import _read_kernel
    from methods.common.microscaling import MxFormat, NvFormat

    out: list[Case] = []
    for a_zero, (block_m, block_k, split) in ((True, (16, 128, 3)), (False, (64, 64, 1))):
        out.append(Case(f"int8 gemm {block_m}x64x{block_k} split {split} zero {a_zero}", im._int8_gemm_kernel,
                        {"a_ptr": "*u8" if a_zero else "*i8", "b_ptr": "*i8", "y_ptr": "*fp16", "count_ptr": "*i32"},
                        dict(BLOCK_M=block_m, BLOCK_N=64, BLOCK_K=block_k, SPLIT_K=split, A_ZERO=a_zero)))
    out.append(Case("int8 scaling", im._scale_int32_kernel, {"acc_ptr": "*i32", "y_ptr": "*fp16"}, dict(BLOCK_M=32, BLOCK_N=128, A_ZERO=True)))
    for a_zero, block_m, split in ((True, 16, 4), (False, 32, 1)):
        out.append(Case(f"w4a8 rows {block_m} split {split} zero {a_zero}", im._w4a8_kernel,
                        {"a_ptr": "*u8" if a_zero else "*i8", "w_ptr": "*i32", "hi_ptr": "*i32", "scale_ptr": "*fp16", "zero_ptr": "*fp16",
                         "y_ptr": "*fp16", "count_ptr": "*i32"},
                        dict(SLOTS=8, RUN=32, HAS_ZERO=True, SUB=4, BLOCK_M=block_m, BLOCK_N=64, A_ZERO=a_zero, SPLIT_K=split)))
    for scaled, digit, block_m, split in ((True, 7, 16, 4), (False, 1, 64, 1)):
        out.append(Case(f"bit-plane W4A4 digits {digit} rows {block_m} split {split} scaled {scaled}", im._bitplane_kernel,
                        {"a_ptr": "*u8", "w_ptr": "*i32", "y_ptr": "*fp16" if scaled else "*i32", "count_ptr": "*i32"},
                        dict(W_BITS=4, A_BITS=4, W_DIGIT=digit, A_DIGIT=digit, RUN=16, SUB=8, BLOCK_M=block_m, BLOCK_N=64, SCALED=scaled,
                             SPLIT_K=split)))
    out.append(Case("bit-plane dequant W4", im._bitplane_dequant_kernel, {"w_ptr": "*i32", "out_ptr": "*fp16"},
                    dict(W_BITS=4, RUN=16, BLOCK_N=16)))
    for symmetric in (True, False):
        out.append(Case(f"int quantize a code a byte, symmetric {symmetric}", quant._int_group_kernel,
                        {"x_ptr": "*fp16", "out_ptr": "*fp16", "codes_ptr": "*i8" if symmetric else "*u8"},
                        dict(GROUP=4096, GROUP_P2=4096, TILE=1, SYMMETRIC=symmetric, QMIN=-128 if symmetric else 0, QMAX=127 if symmetric else 255,
                             BITS=8, FP16_SCALE=True, FP16_TINY=quant.FP16_TINY, FAKE=False, SOFT_BF16=False, UNPACKED=True)))
    out.append(Case("int fake quant g128", quant._int_group_kernel, {"x_ptr": "*fp16", "out_ptr": "*fp16", "codes_ptr": "*u8"},
                    dict(GROUP=128, GROUP_P2=128, TILE=32, SYMMETRIC=False, QMIN=0, QMAX=15, BITS=4, FP16_SCALE=True,
                         FP16_TINY=quant.FP16_TINY, FAKE=True, SOFT_BF16=False, UNPACKED=False)))
    out.append(Case("finite amax", quant._finite_amax_kernel, {"x_ptr": "*fp16"}, dict(BLOCK=16384)))
    for fmt, fake in ((MxFormat("e2m1"), True), (MxFormat("e2m1"), False), (NvFormat("e2m1"), False), (MxFormat("int8"), False)):
        out.append(Case(f"{fmt.name} {'fake quant' if fake else 'quantize'}", quant._block_kernel,
                        {"x_ptr": "*fp16", "out_ptr": "*fp16", "codes_ptr": "*u8", "scales_ptr": "*u8"},
                        dict(BLOCK=fmt.BLOCK, TILE=64, RAGGED=False, NV=isinstance(fmt, NvFormat), FAKE=fake, SOFT_BF16=False,
                             **quant._element_constants(fmt.elem))))
    block_types = {"x_ptr": "*fp16", "words_ptr": "*i32", "scales_ptr": "*u8", "y_ptr": "*fp16", "count_ptr": "*i32", "out_scale": "fp32",
                   "value_scale": "fp32"}
    int8 = dict(BLOCK=32, PER_WORD=4, MX=True, DECODE="int", ELEM_BITS=8, MAN_BITS=0)  # MXINT8: the K-order kernels (6- and 8-bit elements)
    gemv_types = {k: v for k, v in block_types.items() if k != "value_scale"}
    out.append(Case("block gemv MXINT8", bm._block_gemv_kernel, gemv_types, dict(int8, WORDS=16, BLOCK_N=16, SPLIT_K=2)))
    for scaled, step in ((True, 64), (False, 32)):
        out.append(Case(f"block dot MXINT8 step {step}", bm._block_matmul_kernel, block_types,
                        dict(int8, SCALED_WEIGHTS=scaled, STEP=step, BLOCK_M=16, BLOCK_N=64, INTERPRET=False, SPLIT_K=2)))
    out.append(Case("block dequant MXINT8", bm._block_dequant_kernel, {"words_ptr": "*i32", "scales_ptr": "*u8", "w_ptr": "*fp16",
                                                                       "out_scale": "fp32", "value_scale": "fp32"},
                    dict(int8, WORDS=32, BLOCK_N=32)))
    mma_types = {"x_ptr": "*fp16", "words_ptr": "*i32", "scales_ptr": "*u8", "y_ptr": "*fp16", "count_ptr": "*i32", "out_scale": "fp32"}
    for label, mx, decode in (("MXFP4", True, "fp"), ("NVFP4", False, "fp"), ("NVINT4", False, "int")):  # chunked 4-bit elements
        for block_m in (16, 64):
            for prescale in (False, True):
                out.append(Case(f"block mma {label} {block_m} rows{' prescaled' if prescale else ''}", bm._block_mma_kernel, mma_types,
                                dict(RUN=32 if mx else 16, MX=mx, DECODE=decode, BLOCK_N=64, BLOCK_M=block_m, SPLIT_K=2, PRESCALE=prescale,
                                     INTERPRET=False)))
        out.append(Case(f"block dequant {label}", bm._block_dequant_chunked_kernel, {"words_ptr": "*i32", "scales_ptr": "*u8", "w_ptr": "*fp16",
                                                                                      "out_scale": "fp32"},
                        dict(RUN=32 if mx else 16, MX=mx, DECODE=decode, BLOCK_N=32, INTERPRET=False)))
    out.append(Case("read floor", _read_kernel, {"src_ptr": "*i32", "out_ptr": "*i32"}, dict(BLOCK=4096)))
    return out + lowbit_cases() + gluon_cases()


def lowbit_cases() -> list[Case]:
    """The packed int kernels of :mod:`qkernels.lowbit_matmul` (fp32 and fp16-pair GEMV, MMA, GEMM, dequant) for
    grouped W1 to W4 with zero points, their constexprs from a small packed weight of each layout."""
    import torch

    from qkernels import lowbit_matmul as lm
    from qkernels.pack import CODE_BITS, pack_weight

    types = {"x_ptr": "*fp16", "w_ptr": "*i32", "hi_ptr": "*i32", "scale_ptr": "*fp16", "zero_ptr": "*fp16", "y_ptr": "*fp16",
             "count_ptr": "*i32", "zero_const": "fp32"}
    out = []
    for layout in lm.UINT_LAYOUTS:
        top = 2 ** CODE_BITS[layout] - 1
        pw = pack_weight(torch.randint(0, top + 1, (64, 1024)), torch.rand(64, 8).half(), torch.randint(0, top + 1, (64, 8)).half(), layout, 128,
                         run=32)
        _, consts = lm._kernel_args(pw)
        pair = {name: consts[name] for name in ("BITS", "SLOTS", "RUN", "SLOTS_PER_GROUP", "HAS_ZERO")}
        out += [
            Case(f"{layout} fp32 GEMV", lm._gemv_kernel, types, dict(consts, BLOCK_N=32, SPLIT_K=2)),
            Case(f"{layout} MMA", lm._mma_kernel, types, dict(pair, BLOCK_N=64, BLOCK_M=16, SPLIT_K=2, FOLD=layout == "uint4", INTERPRET=False)),
            Case(f"{layout} GEMM", lm._gemm_kernel, types, dict(consts, BLOCK_M=64, BLOCK_N=64, SUB=lm.gemm_sub_slots(pw, 64), SPLIT_K=1,
                                                                 INTERPRET=False)),
            Case(f"{layout} dequant", lm._dequant_kernel, {k: v for k, v in types.items() if k in ("w_ptr", "hi_ptr", "scale_ptr", "zero_ptr",
                                                                                                 "zero_const")} | {"out_ptr": "*fp16"},
                 dict(consts, MATH_DTYPE=lm.math_dtype(torch.float16), BLOCK_N=32)),
        ]
        if lm.pairs_fit(pw, torch.float16):
            out.append(Case(f"{layout} fp16-pair GEMV", lm._gemv_pairs_kernel, types,
                            dict(pair, GROUPS_IN_CHUNK=pw.chunk % pw.group_size == 0, INTEGER_ZEROS=True, BLOCK_N=64, SPLIT_K=2, EVEN_K=True,
                                 EVEN_N=True, INTERPRET=False)))
    return out


def as_launched(name: str, kernel: Any, consts: dict, values: list, num_warps: int, options: dict | None = None) -> Case:
    """A Gluon kernel's case as a launch with ``values`` (the arguments after ``consts``) would compile it: Triton's JIT
    marks 16-byte aligned pointers and integers divisible by 16 (``tt.divisibility``), which lets it vectorize loads,
    and makes an integer 1 a constant. Compiled without them, a kernel's row loads can come out as 32-bit ones where
    the GPU runs 128-bit ones."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend

    params = list(inspect.signature(kernel.fn).parameters)
    types, constexprs, attrs = {}, dict(consts), {}
    for arg, value in zip([p for p in params if p not in consts], values):
        kind, key = native_specialize_impl(BaseBackend, value, False, True, True)
        if kind == "constexpr":
            constexprs[arg] = key
            continue
        types[arg] = kind
        if key == "D":
            attrs[(params.index(arg),)] = [["tt.divisibility", 16]]
    return Case(name, kernel, types, constexprs, num_warps, gluon=True, options=options or {}, attrs=attrs)


def gemv_mma_case(name: str, pw: Any, config: Any) -> Case:
    """The tensor-core GEMV (:mod:`qkernels.gemv_mma`) at batch 1 on ``pw`` with ``config``, as its launcher calls it."""
    import torch

    from qkernels import gemv_mma as gm

    kernel, sizes, consts = gm.launch_constants(pw, config)
    options = {name: consts.pop(name) for name in ("num_warps", "launch_pdl", "maxnreg") if name in consts}
    partial, count = torch.empty(16), torch.zeros(16, dtype=torch.int32)
    values = [torch.empty(1, pw.k).half(), *gm._weight_args(pw, config), torch.empty(1, pw.n).half(), partial, count, *sizes, pw.k, pw.n]
    return as_launched(name, kernel, consts, values, options["num_warps"], {"maxnreg": options.get("maxnreg")})


def wgmma_case(name: str, pw: Any, config: Any, m: int, sms: int = 132) -> Case:
    """The wgmma GEMM (:mod:`qkernels.gemm_wgmma`) at ``m`` rows on ``pw`` with ``config`` on ``sms`` multiprocessors,
    as its launcher calls it (its tiles, split tail and K splits)."""
    import torch

    from qkernels import gemm_wgmma as gw
    from qkernels import lowbit_matmul as lm

    tiles_n = triton.cdiv(pw.n, config.block_n)
    tiles = tiles_n * triton.cdiv(m, config.block_m)
    n_full, tail_split = gw.tail_tiles(tiles, config.tail_split, sms)
    consts = gw.launch_constants(pw, config, max(config.split_k, tail_split), triton.cdiv(m, config.block_m))
    num_warps = consts.pop("num_warps")
    words, high, scale, zero = lm.kernel_tensors(pw)
    partial, count = torch.empty(16), torch.zeros(16, dtype=torch.int32)
    values = [gw.x_descriptor(torch.empty(m, pw.k).half(), pw, config), words, high, scale, zero, torch.empty(m, pw.n).half(), partial, count,
              m, pw.n, words.shape[1] // pw.run, pw.n_groups, *scale.stride(), pw.zero_const, words.stride(0), high.stride(0), pw.n,
              tiles_n, tiles, n_full, tail_split]
    return as_launched(name, gw._gemm_wgmma_kernel, consts, values, num_warps)


def gemm_ws_case(name: str, pw: Any, config: Any, m: int) -> Case:
    """The warp-specialized GEMM (:mod:`qkernels.gemm_ws`) at ``m`` rows on ``pw`` with ``config``, as its launcher calls it."""
    import torch

    from qkernels import gemm_ws
    from qkernels import lowbit_matmul as lm

    block_m = gemm_ws.block_m_for(m)
    gemm_ws.check_config(config, block_m, gemm_ws.values_bytes(pw, config))  # (only what the launcher would run)
    consts = gemm_ws.launch_constants(pw, config, block_m)
    num_warps = consts.pop("num_warps")
    words, _, scale, zero = lm.kernel_tensors(pw)
    partial, count = torch.empty(16), torch.zeros(16, dtype=torch.int32)
    x_desc, w_desc = gemm_ws.descriptors(torch.empty(m, pw.k).half(), words, config.block_n, block_m)
    s_desc, z_desc = gemm_ws.value_descriptors(pw, config.block_n) if config.values_tma else (x_desc, x_desc)
    values = [x_desc, w_desc, s_desc, z_desc, scale, zero, torch.empty(m, pw.n).half(), partial, count, m, pw.n, words.shape[1] // pw.run,
              pw.n_groups, *scale.stride(), pw.zero_const, pw.n]
    return as_launched(name, gemm_ws._gemm_ws_kernel, consts, values, num_warps)


def gluon_cases() -> list[Case]:
    """The Gluon kernels (sm_90 only): the tensor-core GEMV on plain loads (W1, W3) and on its TMA feed (W4, routed W1,
    W3), the wgmma GEMM (W4, W3), the warp-specialized GEMM (W4, W2, ternary, W1), their constants from a packed weight
    as the launchers build them; the loop of :mod:`bench.wgmma_ceiling`."""
    import torch

    from qkernels import gemm_wgmma as gw
    from qkernels import gemm_ws
    from qkernels import gemv_mma as gm
    from qkernels.pack import CODE_BITS, pack_weight

    def packed(layout: str, n: int) -> Any:
        if layout == "ternary":  # uint2 codes 0-2, one scale a row, no zero points
            return pack_weight(torch.randint(0, 3, (n, 4096)), torch.rand(n, 1).half(), None, "uint2", None, zero_const=1.0, run=32)
        top = 2 ** CODE_BITS[layout] - 1
        return pack_weight(torch.randint(0, top + 1, (n, 4096)), torch.rand(n, 32).half(), torch.randint(0, top + 1, (n, 32)).half(), layout,
                           128, run=32)

    out = []
    for layout, config in (("uint1", gm.GemvMmaConfig(64, 4, 2)), ("uint3", gm.GemvMmaConfig(64, 4, 4)), ("uint4", gm.GemvMmaConfig(128, 4, 4, stages=2)),
                           ("uint1", gm.GemvMmaConfig(128, 4, 2, stages=2, route=True, maxnreg=gm.WIDE_TILE_REGISTERS)),
                           ("uint3", gm.GemvMmaConfig(64, 4, 2, stages=2)), ("ternary", gm.GemvMmaConfig(128, 4, 4, stages=2, maxnreg=gm.WIDE_TILE_REGISTERS)),
                           ("uint2", gm.GemvMmaConfig(64, 16, 1, k_warps=4)), ("ternary", gm.GemvMmaConfig(64, 16, 1, k_warps=4)),
                           ("uint2", gm.GemvMmaConfig(64, 16, 1, k_warps=4, values_box=True)),
                           ("uint1", gm.GemvMmaConfig(64, 8, 2, k_warps=2, values_box=True)),
                           ("uint4", gm.GemvMmaConfig(32, 8, 1, k_warps=4, tiled_words=True)),
                           ("uint2", gm.GemvMmaConfig(64, 16, 1, k_warps=4, lane_words=True)), ("uint3", gm.GemvMmaConfig(64, 4, 4, lane_words=True)),
                           ("uint4", gm.GemvMmaConfig(128, 4, 4, stages=2, tiled_words=True)),
                           ("uint1", gm.GemvMmaConfig(128, 4, 2, stages=2, route=True, maxnreg=gm.WIDE_TILE_REGISTERS, tiled_words=True))):
        out.append(gemv_mma_case(f"{layout} tensor-core GEMV{' TMA' if config.stages else ''}{' routed' if config.route else ''}"
                                 f"{f' {config.k_warps} K warp groups' if config.k_warps > 1 else ''}{' values box' if config.values_box else ''}"
                                 f"{' tiled words' if config.tiled_words else ''}{' lane words' if config.lane_words else ''}",
                                 packed(layout, 256), config))
    for layout, ahead in (("uint4", 1), ("uint3", 1), ("uint4", 2), ("uint3", 2)):
        config = gw.GemmWgmmaConfig(block_n=64, block_m=64, num_warps=4, words_ahead=ahead)
        out.append(wgmma_case(f"{layout} wgmma GEMM{' words 2 ahead' if ahead == 2 else ''}", packed(layout, 512), config, 64))
    for layout, config, m in (("uint4", gemm_ws.GemmWsConfig(128, 4, 2), 64), ("uint4", gemm_ws.GemmWsConfig(128, 4, 2, apart=True), 64),
                              ("uint4", gemm_ws.GemmWsConfig(128, 4, 1), 64), ("uint2", gemm_ws.GemmWsConfig(128, 4, 1, apart=True), 64),
                              ("uint2", gemm_ws.GemmWsConfig(128, 3, 1, values_ahead=1), 64), ("ternary", gemm_ws.GemmWsConfig(64, 4, 1), 32),
                              ("uint1", gemm_ws.GemmWsConfig(64, 2, 3, apart=True), 16), ("uint1", gemm_ws.GemmWsConfig(256, 2, 1), 16),
                              ("uint4", gemm_ws.GemmWsConfig(128, 4, 2, values_tma=True), 64),
                              ("uint2", gemm_ws.GemmWsConfig(128, 4, 1, apart=True, values_tma=True), 64),
                              ("ternary", gemm_ws.GemmWsConfig(128, 3, 2, values_tma=True), 32)):
        out.append(gemm_ws_case(f"{layout} warp-specialized GEMM block_n {config.block_n} stages {config.stages} split {config.split_k} M {m}"
                                f"{' apart' if config.apart else ''}{' values 1 ahead' if config.values_ahead == 1 else ''}"
                                f"{' values by TMA' if config.values_tma else ''}",
                                packed(layout, 512), config, m))
    from bench.wgmma_ceiling import _mma_loop  # the tensor-core ceiling benchmark's loop (bench/, not qkernels/)

    for n, rs in ((64, True), (256, False)):
        out.append(Case(f"wgmma ceiling N {n} {'rs' if rs else 'ss'}", _mma_loop, constexprs=dict(ITERS=4, N=n, RS=rs, IN_FLIGHT=1),
                        gluon=True))
    return out


@contextlib.contextmanager
def as_gpu(gpu: str, sms: int) -> Iterator[None]:
    """The dispatcher as it runs on a Hopper GPU named ``gpu`` with ``sms`` multiprocessors, on a machine without one: the
    rules see a Hopper GPU of that size and the configs saved for that name (:mod:`qkernels.tuned`) apply."""
    from qkernels import gemm_wgmma as gw
    from qkernels import gemm_ws
    from qkernels import lowbit_matmul as lm
    from qkernels import tuned
    from qkernels.pack import clear_shared_plans

    patches = [(lm, "is_hopper", lambda device: True), (gw, "sm_count", lambda device: sms), (gemm_ws, "sm_count", lambda device: sms),
               (tuned, "gpu_of", lambda device: gpu)]
    saved = [(module, attr, getattr(module, attr)) for module, attr, _ in patches]
    for module, attr, value in patches:
        setattr(module, attr, value)
    clear_shared_plans()
    try:
        yield
    finally:
        for module, attr, value in saved:
            setattr(module, attr, value)
        clear_shared_plans()


def dispatch_cases(gpu: str, sms: int, shapes: list[tuple[int, int]], kinds: list[str], batches: list[int]) -> list[Case]:
    """What the dispatcher runs on a Hopper GPU (:func:`as_gpu`) for each low-bit kind of ``bench.kernel_latency``, shape
    (``K x N``) and batch where it picks a Gluon kernel: the tensor-core GEMV, the wgmma GEMM or the warp-specialized
    one, with its config (saved for that GPU, else the rules'). Other paths (Triton kernels, dequant + cuBLAS) are left
    out."""
    import torch

    from bench.kernel_latency import LOWBIT_KINDS, random_packed
    from qkernels import gemm_wgmma as gw
    from qkernels import gemm_ws
    from qkernels import gemv_mma as gm
    from qkernels import lowbit_matmul as lm

    out = []
    with as_gpu(gpu, sms):
        for kind in kinds:
            for k, n in shapes:
                torch.manual_seed(0)
                pw = random_packed(LOWBIT_KINDS[kind], n, k, device="cpu")
                for m in batches:
                    path = lm.pick_path(m, pw, torch.device("cuda"))
                    if path == "gemv_mma":
                        config = gm.config_for(pw)
                        out.append(gemv_mma_case(f"{kind} {k}x{n} M={m} gemv_mma {config}", pw, config))
                    elif path == "wgmma":
                        config = gw.config_for(m, pw)
                        out.append(wgmma_case(f"{kind} {k}x{n} M={m} wgmma {config}", pw, config, m, sms))
                    elif path == "wgmma_ws":
                        config = gemm_ws.default_config(m, pw)
                        out.append(gemm_ws_case(f"{kind} {k}x{n} M={m} wgmma_ws {config}", pw, config, m))
    return out


def resources(cubin: bytes) -> str:
    """``cuobjdump -res-usage`` of a cubin (registers, stack = spills), if the Triton wheel's cuobjdump is there; with a
    stack, how many of its local-memory loads and stores sit in its main loops (``LOOP-SPILLS``, :func:`loop_spills`:
    spills in an epilogue cost once a program, in the main loop every step)."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool) and not (tool := shutil.which("cuobjdump") or ""):
        return "(no cuobjdump)"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True).stdout
        line = next((line.strip() for line in usage.splitlines() if "REG:" in line), "")
        out = " ".join(part for part in line.split() if part.split(":")[0] in ("REG", "STACK", "SHARED", "LOCAL"))
        if "STACK:0" not in out.split():
            out += f" LOOP-SPILLS:{loop_spills(subprocess.run([tool, '-sass', f.name], capture_output=True, text=True).stdout)}"
    return out


def loop_spills(sass: str) -> int:
    """Local-memory loads and stores (``LDL``, ``STL``) inside the main loops of a SASS listing: the loops (a predicated
    backward branch to its target) that hold tensor-core instructions (``HMMA``, ``HGMMA``). Epilogue loops do not count,
    nor the unpredicated jumps back from the out-of-line retries of mbarrier waits (placed after the epilogue)."""
    at = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)(?:\s+(?:`\()?(0x[0-9a-f]+))?")
    ops = [(int(m.group(1), 16), bool(m.group(2)), m.group(3), m.group(4)) for m in map(at.search, sass.splitlines()) if m]
    loops = [(int(target, 16), addr) for addr, predicated, op, target in ops if op == "BRA" and predicated and target and int(target, 16) < addr]
    mma = [addr for addr, _, op, _ in ops if op.startswith(("HMMA", "HGMMA"))]
    main = [(a, b) for a, b in loops if any(a <= addr <= b for addr in mma)]
    return sum(1 for addr, _, op, _ in ops if op.startswith(("LDL", "STL")) and any(a <= addr <= b for a, b in main))


def wgmma_serialized(ptx: str) -> str | None:
    """Why ptxas serializes a kernel's ``wgmma``s, or None: serialized, each wgmma is waited for before the code after it
    runs, so no decode overlaps the tensor cores. ptxas says so only in an info line under ``-v`` (C7512), which
    Triton's build does not show; the kernel is still correct, only slower. Session 26 found two such builds of
    :mod:`qkernels.gemm_ws`: one K split (accumulators zeroed on a branch that skips the loop) and ``apart`` with a
    consumer warpgroup in the default partition ("insufficient register resources")."""
    if "wgmma.mma_async" not in ptx:
        return None
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    if not os.path.exists(tool) and not (tool := shutil.which("ptxas") or ""):
        return None
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        info = subprocess.run([tool, "-arch=sm_90a", "-v", path, "-o", os.path.join(tmp, "kernel.cubin")], capture_output=True, text=True)
    why = [line.split("serialized due to ")[-1].split(" for the function")[0] for line in info.stderr.splitlines() if "serialized" in line]
    return why[0] if why else None


def compile_case(case: Case, arch: int) -> str:
    """Compile one case for ``sm_<arch>`` (Gluon: sm_90); its resource line with the shared memory a launch allocates
    (``DYNAMIC-SMEM``, bytes: what decides the programs a multiprocessor holds), and where ptxas serializes its wgmmas a
    note saying why (a CompilationError propagates)."""
    if case.gluon:
        from triton.experimental.gluon._runtime import GluonASTSource

        source = GluonASTSource(case.kernel, signature(case), constexprs=case.constexprs, attrs=case.attrs)
    else:
        source = ASTSource(case.kernel, signature(case), constexprs=case.constexprs, attrs=case.attrs)
    target = GPUTarget("cuda", 90 if case.gluon else arch, 32)
    kernel = triton.compile(source, target=target, options=dict(num_warps=case.num_warps, **case.options))
    serial = wgmma_serialized(kernel.asm["ptx"]) if case.gluon else None
    return resources(kernel.asm["cubin"]) + f" DYNAMIC-SMEM:{kernel.metadata.shared}" + (f" WGMMA SERIALIZED ({serial})" if serial else "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability as an integer: 80, 89, 90")
    parser.add_argument("--only", default="", help="cases whose name contains this")
    parser.add_argument("--dispatch", default=None, metavar="GPU",
                        help="instead of the representative cases, what the dispatcher runs on this Hopper GPU (its name, e.g. "
                             "'NVIDIA H200': its saved configs apply) at --shapes, --kinds and --batches")
    parser.add_argument("--sms", type=int, default=132, help="with --dispatch: the GPU's multiprocessors (132 on an H100 SXM or H200)")
    parser.add_argument("--shapes", default="8192x8192", help="with --dispatch: comma list of INxOUT")
    parser.add_argument("--kinds", default="w4g128,w3g128,w2g128,ternary2,w1g128", help="with --dispatch: low-bit kinds of bench.kernel_latency")
    parser.add_argument("--batches", default="1,16,64,256,1024", help="with --dispatch: comma list of batch sizes")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("TRITON_INTERPRET=1 is set: triton.jit makes interpreter functions, which do not compile; unset it", file=sys.stderr)
        return 2
    if args.dispatch:
        from bench.config_ab import parse_grid

        try:
            kinds, shapes, batches = parse_grid(args.kinds, args.shapes, args.batches)
        except ValueError as err:
            parser.error(str(err))
        chosen = dispatch_cases(args.dispatch, args.sms, shapes, kinds, batches)
    else:
        chosen = cases()
    failed = []
    for case in (c for c in chosen if args.only in c.name):
        try:
            print(f"{case.name}: {compile_case(case, args.arch)}", flush=True)
        except Exception as err:  # noqa: BLE001 (every failure is reported, the other cases still compile)
            failed.append(case.name)
            print(f"{case.name}: FAILED {type(err).__name__}: {str(err).strip().splitlines()[-1] if str(err).strip() else ''}", flush=True)
    if failed:
        print(f"{len(failed)} failed: {failed}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

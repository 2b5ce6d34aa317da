"""The tensor-core ceiling of the wgmma GEMM's instruction: ``wgmma m64nNk16`` (fp16, fp32 accumulate) issued back to
back by one warpgroup a program, with nothing else in the loop, so its rate is what the tensor cores give at that N.

    python -m bench.wgmma_ceiling                                   # N 64, 128, 256; A in registers and in shared memory
    python -m bench.wgmma_ceiling --n 64 --operands rs --programs 1,2 --in-flight 0,1 --gemm 64x8192x8192

Each program holds a fixed A tile (``[64, 32]``: in registers, ``rs``, as the low-bit GEMM decodes its weights into,
or in shared memory, ``ss``) and a fixed ``[N, 32]`` B tile in shared memory, and runs ``--iters`` times one
``warpgroup_mma`` of K 32 (two ``m64nNk16``) into its accumulator, then waits until at most ``--in-flight`` of them are
outstanding; the grid is ``--programs`` programs a multiprocessor. Printed: TFLOP/s and ns per ``m64nNk16`` on one
multiprocessor (``triton.testing.do_bench``, median). With ``--gemm MxNxK`` it also prints that GEMM's tensor-core
time at the fastest rate measured for N = M (the activation rows are the wgmma's N in :mod:`qkernels.gemm_wgmma`):
what no decode or feed can beat. H200, session 24 (bench/results/wgmma_ceiling_h200_session24.md): N = 64 in registers
948-960 TFLOP/s with two or three programs a multiprocessor (18.0-18.3 ns an instruction), 918 with one program and
one group in flight, 559 with one program waiting on every group; at 960 the batch-64 W4 GEMM at 8192^2 has 8.9 us of
tensor-core work, where the kernel takes 25-29 us (bench/results/kernel_latency_h200.md, session 24).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, warpgroup_mma, warpgroup_mma_wait

from qkernels.gluon_compat import barrier

K_STEP = 32  # K of one warpgroup_mma here (two m64nNk16)
ROWS = 64  # the wgmma M: one warpgroup, 16 rows a warp
N_CHOICES = (16, 32, 64, 128, 256)
OPERANDS = ("rs", "ss")


@gluon.jit
def _mma_loop(y_ptr, ITERS: gl.constexpr, N: gl.constexpr, RS: gl.constexpr, IN_FLIGHT: gl.constexpr):
    """``ITERS`` warpgroup_mmas on fixed tiles (A in registers with ``RS``, else in shared memory), each followed by a
    wait for all but ``IN_FLIGHT`` groups; the accumulator's sum is stored so that nothing is dropped."""
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, N, 16])
    a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)
    rows: gl.constexpr = gl.BlockedLayout([1, 8], [8, 4], [4, 1], [1, 0])
    b_tile = gl.full([N, 32], 0.001, gl.float16, rows)
    b_smem = gl.allocate_shared_memory(gl.float16, [N, 32], gl.NVMMASharedLayout.get_default_for([N, 32], gl.float16), b_tile)
    a_tile = gl.full([64, 32], 0.002, gl.float16, rows)
    a_smem = gl.allocate_shared_memory(gl.float16, [64, 32], gl.NVMMASharedLayout.get_default_for([64, 32], gl.float16), a_tile)
    fence_async_shared()  # the tiles' stores (generic proxy) before the wgmmas read them (async proxy), from every warp
    barrier()
    a = gl.convert_layout(a_tile, a_layout)
    b = b_smem.permute((1, 0))
    acc = gl.zeros([64, N], gl.float32, mma)
    for _ in range(ITERS):
        if RS:
            acc = warpgroup_mma(a, b, acc, is_async=True)
        else:
            acc = warpgroup_mma(a_smem, b, acc, is_async=True)
        acc = warpgroup_mma_wait(num_outstanding=IN_FLIGHT, deps=(acc,))
    acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
    gl.store(y_ptr + gl.program_id(0), gl.sum(gl.sum(acc, axis=1), axis=0))


def launch(y: torch.Tensor, n: int, operands: str, in_flight: int, iters: int) -> torch.Tensor:
    """One program per entry of ``y`` (fp32), each storing its accumulator's sum: ``iters * 32 * a * b`` a cell, ``a`` and
    ``b`` the tiles' values (0.001 and 0.002 in fp16), over ``64 x n`` cells."""
    _mma_loop[(y.numel(),)](y, ITERS=iters, N=n, RS=operands == "rs", IN_FLIGHT=in_flight, num_warps=4)
    return y


def rate(n: int, operands: str, programs: int, in_flight: int, iters: int) -> dict:
    """One config's row: TFLOP/s over the whole GPU and ns per ``m64nNk16`` on one multiprocessor."""
    grid = torch.cuda.get_device_properties(0).multi_processor_count * programs
    y = torch.empty(grid, device="cuda")

    def run():
        launch(y, n, operands, in_flight, iters)

    run()
    torch.cuda.synchronize()
    ms = triton.testing.do_bench(run, warmup=5, rep=50, return_mode="median")
    instructions = iters * (K_STEP // 16) * programs  # m64nNk16 a multiprocessor
    return dict(n=n, operands=operands, programs_per_sm=programs, in_flight=in_flight, iters=iters, us=ms * 1e3,
                tflops=2 * grid * iters * ROWS * n * K_STEP / (ms * 1e-3) / 1e12, ns_per_instruction=ms * 1e6 / instructions)


def gemm_floor_us(m: int, n: int, k: int, rows: list[dict]) -> float | None:
    """The tensor-core time (us) of an ``m x n x k`` GEMM at the fastest rate in ``rows`` for wgmma N = ``m``."""
    rates = [row["tflops"] for row in rows if row["n"] == m]
    return 2 * m * n * k / (max(rates) * 1e12) * 1e6 if rates else None


def int_list(text: str, name: str, allowed=None, low: int = 0) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v]
    except ValueError:
        raise ValueError(f"--{name} {text!r} is not a comma list of integers") from None
    if bad := [v for v in values if v < low or (allowed is not None and v not in allowed)]:
        raise ValueError(f"--{name} {bad} not valid; choose from {list(allowed)}" if allowed else f"--{name} {bad}: at least {low}")
    return values


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", default="64,128,256", help=f"wgmma N (comma list of {list(N_CHOICES)})")
    parser.add_argument("--operands", default="rs,ss", help="where A is: rs (registers), ss (shared memory)")
    parser.add_argument("--programs", default="1,2,3", help="programs (warpgroups) a multiprocessor")
    parser.add_argument("--in-flight", default="0,1,3", help="warpgroup_mma groups left outstanding by each wait")
    parser.add_argument("--iters", type=int, default=2048, help="warpgroup_mmas a program")
    parser.add_argument("--gemm", default="", help="MxNxK: print this GEMM's tensor-core time at the rate measured for N = M")
    parser.add_argument("--json", type=Path, default=None, help="write the rows here")
    args = parser.parse_args(argv)
    try:
        ns = int_list(args.n, "n", N_CHOICES)
        programs = int_list(args.programs, "programs", low=1)
        in_flight = int_list(args.in_flight, "in-flight")
        operands = [o for o in args.operands.split(",") if o]
        if bad := [o for o in operands if o not in OPERANDS]:
            raise ValueError(f"--operands {bad} not valid; choose from {list(OPERANDS)}")
        gemm = int_list(args.gemm.replace("x", ","), "gemm", low=1) if args.gemm else None
        if gemm is not None and len(gemm) != 3:
            raise ValueError(f"--gemm {args.gemm!r} is not MxNxK")
        if args.iters < 1:
            raise ValueError(f"--iters {args.iters}: at least 1")
    except ValueError as err:
        parser.error(str(err))
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9:
        print("needs a Hopper GPU (wgmma): nothing to time", file=sys.stderr)
        return 1
    print(f"GPU: {torch.cuda.get_device_name()} | {torch.cuda.get_device_properties(0).multi_processor_count} multiprocessors")
    print("| N | A | programs/SM | in flight | TFLOP/s | ns per m64nNk16 per SM |\n|---|---|---|---|---|---|")
    rows = []
    for n in ns:
        for where in operands:
            for p in programs:
                for f in in_flight:
                    row = rate(n, where, p, f, args.iters)
                    rows.append(row)
                    print(f"| {n} | {where} | {p} | {f} | {row['tflops']:.0f} | {row['ns_per_instruction']:.2f} |", flush=True)
    if gemm is not None:
        floor = gemm_floor_us(*gemm, rows)
        print(f"{args.gemm}: {'no N = M measured' if floor is None else f'{floor:.1f} us of tensor-core time'}")
    if args.json:
        args.json.write_text(json.dumps(dict(gpu=torch.cuda.get_device_name(), rows=rows), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

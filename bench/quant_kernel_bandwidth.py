"""GPU bandwidth of the MXFP4 and NVFP4 quantization kernels, next to a device-to-device copy.

    python -m bench.quant_kernel_bandwidth [--sizes 4096 8192 16384] [--out FILE] [--no-tune]

First checks every kernel bit for bit against its torch reference on the GPU (random bf16 with NaN, inf,
all-zero blocks, ties and huge values planted; a ragged width too). Then, on bf16 inputs of ``size x size``,
times a device-to-device copy and each kernel over a grid of launch configs (fake quant; the packing
kernels run their default config), and prints the best of each as a Markdown table. Timing: one CUDA
graph holding one call per input, over rotating inputs (256 MB in all, so no call finds its input in L2),
timed by ``triton.testing.do_bench`` (median; L2 cleared before each run) and divided by the number of
calls: device time, without the host's launch overhead. Achieved bandwidth = (bytes read + bytes written)
/ time: a fake quant reads and writes bf16 (4 bytes per element); NVFP4 "with amax pass" also reads the
input once more for its tensor scale; packed outputs write 4-bit codes + scales.

Plain torch + triton (no hydra/omegaconf/wandb): the GPU machine has only those.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from typing import Callable

import torch
import triton
from triton.testing import do_bench

from qkernels import quant
from methods.common.formats import IntFormat, same_bits
from methods.common.microscaling import MxFormat, NvFormat

COLD_BYTES = 256 * 2**20  # inputs rotated per timing: several times the 50 MB L2 of an H100
LAUNCH_CONFIGS = [(epp, warps) for epp in (1024, 2048, 4096, 8192) for warps in (2, 4, 8)]
CHECK_FORMATS = (MxFormat("e2m1"), MxFormat("int8"), MxFormat("e4m3"), MxFormat("e5m2"), MxFormat("e2m3"),
                 NvFormat("e2m1"), NvFormat("int4"))


def edge_input(rows: int, width: int, device: str, huge: bool) -> torch.Tensor:
    """Random bf16 over six decades, with an all-zero block, NaN, +-inf, E2M1 ties and optionally 1e30."""
    x = torch.randn(rows, width, device=device) * torch.logspace(-3, 3, rows, device=device)[:, None]
    x[0, :64] = 0.0
    x[1, 5], x[2, 7], x[3, 9] = float("nan"), float("inf"), -float("inf")
    x[4, :32] = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0] * 4, device=device)
    if huge:
        x[5, :16] = 1e30
    return x.to(torch.bfloat16)


def check_kernels(device: str = "cuda", shapes: tuple[tuple[int, int], ...] = ((512, 4096), (333, 1000))) -> bool:
    """Compare every kernel with its torch reference, bit for bit; print one line per format and shape."""
    ok = True
    for index, (rows, width) in enumerate(shapes):
        x = edge_input(rows, width, device, huge=index % 2 == 1)
        for fmt in CHECK_FORMATS:
            reference = fmt.dequantize(fmt.quantize(x))
            fake = quant.mx_fake_quant(x, fmt) if isinstance(fmt, MxFormat) else quant.nv_fake_quant(x, fmt)
            results = {"fake": same_bits(fake, reference)}
            if fmt.elem.bits in (4, 8):
                if isinstance(fmt, MxFormat):
                    packed, expected = quant.mx_quantize(x, fmt), quant.mx_quantize_reference(x, fmt)
                else:
                    packed, expected = quant.nv_quantize(x, fmt), quant.nv_quantize_reference(x, fmt)
                results["packed"] = same_bits(packed.codes, expected.codes) and same_bits(packed.scale, expected.scale)
            ok &= all(results.values())
            print(f"check {fmt.name:<11} {rows}x{width}: {results}")
        if width % 128 == 0:
            for fmt in (IntFormat(4, 128), IntFormat(8, 128, symmetric=True)):
                fake_ok = same_bits(quant.int_fake_quant(x, fmt), fmt.dequantize(fmt.quantize(x)))
                packed, expected = quant.int_quantize(x, fmt), quant.int_quantize_reference(x, fmt)
                packed_ok = same_bits(packed.codes, expected.codes) and same_bits(packed.scale, expected.scale)
                ok &= fake_ok and packed_ok
                print(f"check {fmt.describe():<11} {rows}x{width}: fake={fake_ok} packed={packed_ok}")
    return ok


@dataclass
class Row:
    size: int
    kernel: str
    config: str
    ms: float
    bytes_moved: float


def time_per_call_ms(call: Callable[[torch.Tensor], object], inputs: list[torch.Tensor]) -> float:
    """Device time of one ``call``: ``do_bench`` (L2 cleared before each run) of a CUDA graph that holds one
    call per input, divided by the number of inputs. Rotating inputs keep every call's input cold in L2;
    the graph takes the host's launch overhead out of small sizes."""
    for x in inputs:
        call(x)  # compiles and warms up outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for x in inputs:
            call(x)
    return do_bench(graph.replay, warmup=25, rep=100, return_mode="median") / len(inputs)


def best_over_configs(name: str, make: Callable[[int, int], Callable[[torch.Tensor], object]],
                      inputs: list[torch.Tensor], tune: bool) -> tuple[str, float]:
    """Time ``make(elems_per_program, num_warps)`` over the launch configs; print all, return the best."""
    configs = LAUNCH_CONFIGS if tune else [(quant.DEFAULT_ELEMS_PER_PROGRAM, quant.DEFAULT_NUM_WARPS)]
    timings = {f"{epp} el/prog, {warps} warps": time_per_call_ms(make(epp, warps), inputs) for epp, warps in configs}
    print(f"  {name}: " + "; ".join(f"{config}: {ms * 1e3:.1f} us" for config, ms in timings.items()), flush=True)
    config = min(timings, key=timings.get)
    return config, timings[config]


def measure(size: int, tune: bool) -> list[Row]:
    n = size * size
    copies = max(1, min(8, COLD_BYTES // (2 * n)))
    inputs = [torch.randn(size, size, device="cuda", dtype=torch.bfloat16) for _ in range(copies)]
    mxfp4, nvfp4 = MxFormat("e2m1"), NvFormat("e2m1")
    static = nvfp4.tensor_scales(torch.stack([quant.finite_amax(x) for x in inputs]).amax())
    kernels: dict[str, tuple[Callable[[int, int], Callable[[torch.Tensor], object]], float]] = {
        "mxfp4 fake-quant": (lambda e, w: lambda x: quant.mx_fake_quant(x, mxfp4, e, w), 4 * n),
        "nvfp4 fake-quant (static tensor scale)": (lambda e, w: lambda x: quant.nv_fake_quant(x, nvfp4, static, e, w), 4 * n),
        "nvfp4 fake-quant (with amax pass)": (lambda e, w: lambda x: quant.nv_fake_quant(x, nvfp4, None, e, w), 6 * n),
        "mxfp4 quantize (packed)": (lambda e, w: lambda x: quant.mx_quantize(x, mxfp4, e, w), 2 * n + n / 2 + n / 32),
        "nvfp4 quantize (packed, static scale)": (lambda e, w: lambda x: quant.nv_quantize(x, nvfp4, static, e, w), 2 * n + n / 2 + n / 16),
    }
    copy_ms = time_per_call_ms(lambda x: torch.empty_like(x).copy_(x), inputs)
    rows = [Row(size, "copy (torch, device to device)", "-", copy_ms, 4 * n)]
    for name, (make, bytes_moved) in qkernels.items():
        config, ms = best_over_configs(f"{size}^2 {name}", make, inputs, tune and "fake" in name)
        rows.append(Row(size, name, config, ms, bytes_moved))
    del inputs
    torch.cuda.empty_cache()
    return rows


def table(rows: list[Row]) -> str:
    copy = {row.size: row for row in rows if row.kernel.startswith("copy")}
    lines = ["| size | kernel | best launch config | time (us) | TB/s | % of copy |", "|---|---|---|---:|---:|---:|"]
    for row in rows:
        tbps = row.bytes_moved / row.ms / 1e9
        copy_tbps = copy[row.size].bytes_moved / copy[row.size].ms / 1e9
        lines.append(f"| {row.size}^2 | {row.kernel} | {row.config} | {row.ms * 1e3:.1f} | {tbps:.2f} | {100 * tbps / copy_tbps:.0f}% |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[4096, 8192, 16384])
    parser.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "quant_kernel_bandwidth.md"))
    parser.add_argument("--no-tune", action="store_true", help="time only the default launch config")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: this benchmark needs a GPU", file=sys.stderr)
        return 2
    header = f"{torch.cuda.get_device_name()} | torch {torch.__version__} | triton {triton.__version__}"
    print(header, flush=True)
    exact = check_kernels()
    rows = [row for size in args.sizes for row in measure(size, not args.no_tune)]
    report = f"{header}\n\nbit-exact against the torch references on this GPU: {exact}\n\n{table(rows)}\n"
    with open(args.out, "w") as f:
        f.write(report)
    print(report)
    return 0 if exact else 1


if __name__ == "__main__":
    sys.exit(main())

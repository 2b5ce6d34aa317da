"""bench.ws_gemm, the warp-specialized prototype: its argument checks on the CPU; on a Hopper GPU, every config's
per-split sums add up to ``x @ codes^T`` (scales 1, zero points 0). Its kernel compiles for sm_90 in
tests/test_compile_check.py."""

from __future__ import annotations

import pytest
import torch

from bench.kernel_latency import LOWBIT_KINDS, random_packed
from bench.ws_gemm import torch_reference, ws_gemm
from qkernels import lowbit_matmul as lm

HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9


@pytest.mark.parametrize("m, k, n, block_n", [(48, 1024, 256, 128), (64, 1000, 256, 128), (64, 1024, 200, 128), (64, 1024, 256, 96)])
def test_shapes_it_cannot_take_are_named(m: int, k: int, n: int, block_n: int) -> None:
    x = torch.zeros(m, k, dtype=torch.float16)
    with pytest.raises(ValueError, match=f"got M={m}, K={k}, N={n}, block_n={block_n}"):
        ws_gemm(x, torch.zeros(n, k // 8, dtype=torch.int32), block_n)


@pytest.mark.skipif(not HOPPER, reason="wgmma and TMA need a Hopper GPU")
@pytest.mark.parametrize("m, block_n, stages, split_k", [(64, 128, 2, 1), (64, 128, 3, 2), (64, 64, 2, 3), (32, 128, 2, 2), (16, 256, 2, 1)])
def test_the_splits_add_up_to_the_codes_product(m: int, block_n: int, stages: int, split_k: int) -> None:
    torch.manual_seed(0)
    pw = random_packed(LOWBIT_KINDS["w4g128"], 512, 2560)  # 10 chunks: uneven splits
    x = torch.randn(m, pw.k, device="cuda", dtype=torch.float16)
    got = ws_gemm(x, lm.kernel_tensors(pw)[0], block_n, stages, split_k).sum(0).t()
    reference = torch_reference(x, pw)
    assert ((got - reference).norm() / reference.norm()).item() < 1e-5

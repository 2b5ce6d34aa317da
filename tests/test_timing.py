"""GPU timing (bench/timing.py): kernels compared side by side keep their order and their ratio."""

import pytest
import torch

from bench.timing import time_side_by_side


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_side_by_side_times_rank_one_and_four_matmuls() -> None:
    """One 4096^2 fp16 matmul a call against four: steady times interleaved, cold one after another; four
    take 3x to 5x as long in both modes (a timer that mixed up its graphs or its replay counts would not)."""
    a = torch.randn(4096, 4096, device="cuda", dtype=torch.float16)
    out = torch.empty_like(a)

    def calls(repeat: int):
        def call() -> None:
            for _ in range(repeat):
                torch.mm(a, a, out=out)
        return lambda: [call, call]

    times = time_side_by_side({"one": calls(1), "four": calls(4)})
    for mode in ("cold", "steady"):
        assert 3.0 < times["four"][mode] / times["one"][mode] < 5.0, times

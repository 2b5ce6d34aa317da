"""The read floor (bench/read_floor.py): every word of the buffer is read in every layout, in the interpreter and on a
GPU; the floor is the fastest layout per mode; bad layouts are named."""

import os

import numpy as np
import pytest
import torch

from bench.read_floor import LAYOUTS, fastest, programs, read_calls, read_xor

DEVICE = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("n_words", [1, 2047, 2048, 2049, 50_001])
def test_the_programs_xors_cover_every_word_once(n_words: int, layout: str) -> None:
    """Random words (a word read twice or missed would change the xor of the programs' xors)."""
    src = torch.randint(-(2**31), 2**31 - 1, (n_words,), dtype=torch.int32, device=DEVICE)
    assert np.bitwise_xor.reduce(read_xor(src, layout=layout).cpu().numpy()) == np.bitwise_xor.reduce(src.cpu().numpy())
    missing_last = read_xor(src[:-1], layout=layout).cpu().numpy()
    assert np.bitwise_xor.reduce(missing_last) != np.bitwise_xor.reduce(src.cpu().numpy()) or src[-1] == 0


def test_a_block_layout_launches_a_program_per_block() -> None:
    assert programs(torch.device("cpu"), 50_001, "blocks") == 13 and programs(torch.device("cpu"), 50_001, "blocks_8k") == 25
    assert programs(torch.device("cpu"), 0, "blocks") == 1


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_read_calls_rotate_over_their_copies_and_refuse_other_buffers(layout: str) -> None:
    calls = read_calls(10_001, torch.device(DEVICE), 3, layout)()
    assert len(calls) == 3 and calls[0]().shape == calls[2]().shape
    with pytest.raises(ValueError, match="int32"):
        read_xor(torch.zeros(8, dtype=torch.float16, device=DEVICE))


def test_unknown_layouts_and_short_outputs_are_named() -> None:
    with pytest.raises(ValueError, match=r"'rows'.*blocks"):
        read_calls(1024, torch.device(DEVICE), 1, "rows")
    src = torch.ones(50_001, dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="needs 13 output words"):
        read_xor(src, torch.empty(4, dtype=torch.int32, device=DEVICE), "blocks")


def test_the_floor_is_the_fastest_layout_in_each_mode() -> None:
    times = {"stride": {"cold": 9.0, "steady": 8.4}, "blocks": {"cold": 9.5, "steady": 7.1}, "blocks_8k": {"cold": 9.2, "steady": 7.3}}
    assert fastest(times) == ({"cold": 9.0, "steady": 7.1}, {"cold": "stride", "steady": "blocks"})

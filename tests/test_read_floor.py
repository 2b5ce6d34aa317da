"""The read floor (bench/read_floor.py): every word of the buffer is read, in the interpreter and on a GPU; on a
GPU it is timed beside a matmul of the same bytes."""

import os

import numpy as np
import pytest
import torch

from bench.read_floor import read_calls, read_xor

DEVICE = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"


@pytest.mark.parametrize("n_words", [1, 2047, 2048, 2049, 50_001])
def test_the_programs_xors_cover_every_word_once(n_words: int) -> None:
    """Random words (a word read twice or missed would change the xor of the programs' xors)."""
    src = torch.randint(-(2**31), 2**31 - 1, (n_words,), dtype=torch.int32, device=DEVICE)
    assert np.bitwise_xor.reduce(read_xor(src).cpu().numpy()) == np.bitwise_xor.reduce(src.cpu().numpy())
    assert np.bitwise_xor.reduce(read_xor(src[:-1]).cpu().numpy()) != np.bitwise_xor.reduce(src.cpu().numpy()) or src[-1] == 0


def test_read_calls_rotate_over_their_copies_and_refuse_other_buffers() -> None:
    calls = read_calls(10_001, torch.device(DEVICE), 3)()
    assert len(calls) == 3 and calls[0]().shape == calls[2]().shape
    with pytest.raises(ValueError, match="int32"):
        read_xor(torch.zeros(8, dtype=torch.float16, device=DEVICE))

import math

import pytest
import torch

from methods.common.formats import FormatError, IntFormat


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
def test_rtn_error_is_at_most_half_a_step(bits: int, symmetric: bool) -> None:
    torch.manual_seed(bits)
    w = torch.randn(16, 256) * torch.rand(16, 1) * 3
    fmt = IntFormat(bits=bits, group_size=64, symmetric=symmetric)
    q = fmt.quantize(w)
    err = (fmt.dequantize(q) - w).reshape(16, 4, 64).abs()
    # half a step, plus what rounding the scale to fp16 (relative 2^-11) can add at the range's ends
    assert torch.all(err <= q.scale / 2 * (1 + 1e-5) + q.scale * fmt.qmax * 2**-11)
    assert q.codes.min() >= fmt.qmin and q.codes.max() <= fmt.qmax


def test_codes_cover_the_grid_and_scales_are_fp16() -> None:
    w = torch.linspace(0, 1.4, 64).repeat(4, 1)
    q = IntFormat(bits=3, group_size=64).quantize(w)
    assert set(q.codes.unique().tolist()) == set(range(8))
    assert torch.equal(q.scale, q.scale.half().float())


@pytest.mark.parametrize(
    ("bits", "symmetric", "group_size", "expected"),
    [
        (4, False, 64, 4 + (16 + 4) / 64),
        (4, True, 128, 4 + 16 / 128),
        (3, False, 64, 3 + 19 / 64),
        (2, False, "channel", 2 + 18 / 576),
        (8, True, "tensor", 8 + 16 / (1536 * 576)),
    ],
)
def test_exact_bits_per_weight(bits, symmetric, group_size, expected) -> None:
    fmt = IntFormat(bits=bits, group_size=group_size, symmetric=symmetric)
    assert math.isclose(fmt.bits_per_element((1536, 576)), expected, rel_tol=1e-12)


def test_more_bits_less_error() -> None:
    w = torch.randn(64, 128)
    errors = [(IntFormat(bits=b, group_size=32).fake_quant(w) - w).pow(2).mean().item() for b in (2, 3, 4, 8)]
    assert errors == sorted(errors, reverse=True)
    assert errors[-1] < errors[0] / 1000


def test_bad_values_are_named() -> None:
    with pytest.raises(FormatError, match="bits=0"):
        IntFormat(bits=0)
    with pytest.raises(FormatError, match="group_size='row'"):
        IntFormat(group_size="row")
    with pytest.raises(FormatError, match=r"width 576 of layer blocks\.0\.q.*\[16, 32, 64\]"):
        IntFormat(group_size=128).check_width(576, "blocks.0.q")

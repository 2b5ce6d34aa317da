"""Number formats: exact bits per element, grids, rounding, special values and errors."""

from __future__ import annotations

import math

import pytest
import torch

from methods.common.binary_formats import BinaryFormat, TernaryFormat
from methods.common.elements import ELEMENTS, FpElement, IntElement, pow2
from methods.common.formats import FormatError, IntFormat, same_bits
from methods.common.fp_formats import FpFormat
from methods.common.microscaling import MxFormat, NvFormat
from methods.common.hadamard_format import HadamardFormat

SHAPE = (64, 4096)


def all_codes(elem: FpElement) -> torch.Tensor:
    return torch.arange(2**elem.bits)


def positive_grid(elem: FpElement) -> list[float]:
    values = elem.decode(all_codes(elem))
    return sorted({v for v in values.tolist() if v >= 0 and math.isfinite(v)})


# ---------------------------------------------------------------------------------------------------
# Bits per element


@pytest.mark.parametrize(
    ("fmt", "expected"),
    [
        (MxFormat("e2m1"), 4.25),
        (MxFormat("e2m3"), 6.25),
        (MxFormat("e3m2"), 6.25),
        (MxFormat("e4m3"), 8.25),
        (MxFormat("e5m2"), 8.25),
        (MxFormat("int8"), 8.25),
        (NvFormat("e2m1"), 4.5 + 32 / (64 * 4096)),
        (NvFormat("int4"), 4.5 + 32 / (64 * 4096)),
        (IntFormat(4, 128), 4 + 20 / 128),
        (IntFormat(4, 128, symmetric=True), 4 + 16 / 128),
        (IntFormat(3, "channel", scale_bits=32), 3 + 35 / 4096),
        (FpFormat(2, 1, group_size=32), 4.5),
        (FpFormat(2, 1, group_size=32, scale="e8m0"), 4.25),
        (FpFormat(4, 3, group_size=128, scale="fp32"), 8.25),
        (FpFormat(3, 0, scale="none"), 4.0),
        (BinaryFormat(group_size=128), 1 + 16 / 128),
        (TernaryFormat(group_size="tensor"), 1.6 + 16 / (64 * 4096)),
        (HadamardFormat(MxFormat("e2m1"), 32), 4.25),
    ],
    ids=lambda v: v.describe() if hasattr(v, "describe") else str(v),
)
def test_bits_per_element_exact(fmt, expected):
    assert fmt.bits_per_element(SHAPE) == pytest.approx(expected, rel=0, abs=1e-12)


def test_ragged_blocks_count_their_padding():
    # width 40 = one full block of 32 + a padded one: 2 blocks of (32 codes x 4 bits + 8 scale bits) per row
    assert MxFormat("e2m1").bits_per_element((3, 40)) == pytest.approx(2 * (32 * 4 + 8) / 40)
    assert NvFormat("e2m1").bits_per_element((3, 40)) == pytest.approx((3 * 3 * (16 * 4 + 8) + 32) / 120)


def test_element_bits_and_granularity_are_the_formats_own():
    assert (MxFormat("int8").element_bits, MxFormat("int8").granularity) == (8, 32)
    assert (NvFormat("e2m1").element_bits, NvFormat("e2m1").granularity) == (4, 16)
    assert FpFormat(4, 3).element_bits == 8
    assert TernaryFormat().element_bits == pytest.approx(1.6)
    assert HadamardFormat(NvFormat("int4"), 16).granularity == 16


# ---------------------------------------------------------------------------------------------------
# Element grids


@pytest.mark.parametrize(
    ("name", "grid_max", "smallest", "n_positive"),
    [
        ("e2m1", 6.0, 0.5, 8),
        ("e2m3", 7.5, 0.125, 32),
        ("e3m2", 28.0, 0.0625, 32),
        ("e3m0", 16.0, 0.25, 8),
        ("e4m3", 448.0, 2.0**-9, 127),
        ("e5m2", 57344.0, 2.0**-16, 124),
    ],
)
def test_fp_element_grids(name, grid_max, smallest, n_positive):
    elem = ELEMENTS[name]
    grid = positive_grid(elem)
    assert (elem.max_value, grid[-1], grid[1], len(grid)) == (grid_max, grid_max, smallest, n_positive)


def test_e2m1_grid_values():
    assert positive_grid(ELEMENTS["e2m1"]) == [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]


def test_special_codes():
    e4m3, e5m2 = ELEMENTS["e4m3"], ELEMENTS["e5m2"]
    assert torch.isnan(e4m3.decode(torch.tensor([0x7F, 0xFF]))).all()
    assert e5m2.decode(torch.tensor([0x7C, 0xFC])).tolist() == [math.inf, -math.inf]
    assert torch.isnan(e5m2.decode(torch.tensor([0x7D]))).all()
    assert e4m3.encode(torch.tensor([math.nan])).item() == 0x7F


@pytest.mark.parametrize("name", ["e2m1", "e2m3", "e3m2", "e3m0", "e4m3", "e5m2"])
def test_encode_decode_round_trip(name):
    elem = ELEMENTS[name]
    codes = all_codes(elem)
    values = elem.decode(codes)
    finite = torch.isfinite(values)
    assert torch.equal(elem.encode(values[finite]), codes[finite])
    assert torch.equal(elem.round(values[finite]), values[finite])


def test_ties_round_to_even_and_saturate():
    e2m1 = ELEMENTS["e2m1"]
    x = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -5.0, 7.0, 100.0, math.inf, -math.inf])
    assert e2m1.round(x).tolist() == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, -4.0, 6.0, 6.0, 6.0, -6.0]
    e4m3 = ELEMENTS["e4m3"]
    assert e4m3.round(torch.tensor([464.0, 470.0, 1e9])).tolist() == [448.0, 448.0, 448.0]
    assert torch.isnan(e2m1.round(torch.tensor([math.nan]))).all()


def test_subnormals_and_their_absence():
    with_sub = ELEMENTS["e2m1"]
    without = FpElement(2, 1, subnormals=False)
    x = torch.tensor([0.2, 0.3, 0.5, 0.6, 0.75])
    assert with_sub.round(x).tolist() == [0.0, 0.5, 0.5, 0.5, 1.0]
    assert without.round(x).tolist() == [0.0, 0.0, 0.0, 1.0, 1.0]
    assert torch.signbit(with_sub.round(torch.tensor([-0.1]))).item()  # -0.1 rounds to -0


def test_exponent_bias_sets_the_range():
    assert FpElement(4, 3, bias=10).max_value == 2.0**5 * 1.875
    assert FpElement(4, 3, bias=10).min_normal == 2.0**-9


def test_int_elements():
    int8 = ELEMENTS["int8"]
    assert isinstance(int8, IntElement) and int8.max_value == 127 / 64 and int8.emax == 0
    assert int8.round(torch.tensor([1.0 / 128, 3.0 / 128, 5.0, -5.0])).tolist() == [0.0, 2 / 64, 127 / 64, -127 / 64]
    codes = torch.arange(-127, 128).float() / 64
    assert torch.equal(int8.decode(int8.encode(codes)), codes)


def test_pow2_is_exact_down_to_subnormals():
    k = torch.arange(-149, 128)
    assert torch.equal(pow2(k), torch.tensor([2.0**i for i in k.tolist()], dtype=torch.float32))


# ---------------------------------------------------------------------------------------------------
# MX and NV


def test_mx_shared_scale_follows_ocp():
    fmt = MxFormat("e2m1")
    block = torch.tensor([[7.9, 0.26] + [0.0] * 30, [0.0] * 32])
    q = fmt.quantize(block)
    assert q.scale.flatten().tolist() == [1.0, 2.0**-127]  # floor(log2 7.9) - emax(E2M1)=2 -> 2^0; zeros -> E8M0 0
    assert fmt.dequantize(q)[0, :2].tolist() == [6.0, 0.5]  # 7.9 saturates; 0.26 rounds up to the subnormal 0.5


def test_mxint8_grid():
    fmt = MxFormat("int8")
    x = torch.tensor([[1.5, 1.0 / 64 + 1.0 / 256, -1.999] + [0.0] * 29])
    assert fmt.fake_quant(x)[0, :3].tolist() == [1.5, 1.0 / 64, -127 / 64]


def test_nonfinite_block_becomes_nan_and_stays_in_its_block():
    x = torch.randn(2, 96)
    x[0, 40], x[1, 3] = math.nan, math.inf
    for fmt in (MxFormat("e2m1"), NvFormat("e2m1"), IntFormat(4, 32), FpFormat(group_size=32), BinaryFormat(group_size=32)):
        y = fmt.fake_quant(x)
        block = 32 if not isinstance(fmt, NvFormat) else 16
        nan = torch.isnan(y)
        expected = torch.zeros_like(nan)
        expected[0, 40 // block * block : 40 // block * block + block] = True
        expected[1, :block] = True
        assert torch.equal(nan, expected), fmt.describe()


def test_ragged_last_block_is_scaled_by_itself():
    x = torch.cat([torch.full((1, 32), 100.0), torch.full((1, 8), 0.5)], dim=1)
    y = MxFormat("e2m1").fake_quant(x)
    assert y.shape == x.shape and torch.equal(y[0, 32:], x[0, 32:])


def test_nv_two_level_scales():
    fmt = NvFormat("e2m1")
    x = torch.randn(8, 64) * 3
    q = fmt.quantize(x)
    amax = x.abs().max()
    assert q.tensor_scale.item() == pytest.approx(amax.item() / (6 * 448), rel=1e-6)
    e4m3 = ELEMENTS["e4m3"]
    assert torch.equal(e4m3.round(q.scale), q.scale)  # block scales are E4M3 values
    assert q.scale.max().item() == 448.0  # the block holding the tensor max uses the top of E4M3
    assert ((fmt.fake_quant(x) - x).norm() / x.norm()).item() < 0.15
    assert torch.equal(fmt.fake_quant(torch.zeros(2, 32)), torch.zeros(2, 32))


def test_nvint4_is_symmetric():
    q = NvFormat("int4").quantize(torch.tensor([[-7.0, 7.0, 3.5, 2.5] + [0.0] * 12]))
    assert ELEMENTS["int4"].decode(q.codes).flatten()[:4].tolist() == [-7.0, 7.0, 4.0, 2.0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("fmt", [MxFormat(e) for e in ("e2m1", "int8", "e4m3", "e5m2", "e2m3", "e3m2")] + [NvFormat("e2m1"), NvFormat("int4")], ids=lambda f: f.name)
def test_fake_quant_is_dequantize_of_quantize_bit_for_bit(fmt, dtype):
    x = torch.randn(5, 72) * torch.logspace(-3, 3, 72)
    x[0, :40], x[1, 3], x[2, 50], x[3, :3] = 0.0, math.nan, -math.inf, torch.tensor([-1e-3, -0.0, 5.0])
    x = x.to(dtype)
    assert same_bits(fmt.fake_quant(x), fmt.dequantize(fmt.quantize(x)))


def test_fake_quant_keeps_dtype_and_shape():
    x = torch.randn(3, 5, 64, dtype=torch.bfloat16)
    for fmt in (MxFormat("e4m3"), NvFormat("e2m1"), FpFormat(group_size=32), HadamardFormat(MxFormat("e2m1"), 32)):
        y = fmt.fake_quant(x)
        assert (y.shape, y.dtype) == (x.shape, x.dtype)


# ---------------------------------------------------------------------------------------------------
# INT, FP, binary, ternary


def test_int_keeps_min_max_grids():
    x = torch.tensor([[-1.0, 0.0, 2.0, 3.0] * 8])
    q = IntFormat(4, 32).quantize(x)
    assert q.scale.item() == pytest.approx(4.0 / 15, rel=1e-3) and q.zero.item() == 4.0
    assert q.codes.min().item() == 0 and q.codes.max().item() == 15
    sym = IntFormat(4, 32, symmetric=True).quantize(x)
    assert sym.scale.item() == pytest.approx(3.0 / 7, rel=1e-3)


def test_clipping_shrinks_the_range_and_mse_does_not_lose():
    torch.manual_seed(0)
    x = torch.randn(16, 128)
    x[:, 0] = 40.0
    minmax, percentile, mse = (IntFormat(4, 128, clip=c, clip_percentile=99.0) for c in ("minmax", "percentile", "mse"))
    assert (percentile.quantize(x).scale < minmax.quantize(x).scale).all()
    err = {f.clip: ((f.fake_quant(x) - x) ** 2).sum().item() for f in (minmax, mse)}
    assert err["mse"] < err["minmax"]
    assert mse.describe() == "int4-asym-g128-mse"


def test_fp_format_scales():
    x = torch.randn(4, 64)
    for scale in ("fp16", "fp32", "e8m0"):
        fmt = FpFormat(2, 1, group_size=32, scale=scale)
        q = fmt.quantize(x)
        values = ELEMENTS["e2m1"].decode(q.codes)
        assert values.abs().max() <= 6.0
        if scale == "e8m0":
            assert torch.equal(pow2(torch.log2(q.scale).round().int()), q.scale)
    raw = FpFormat(4, 3, bias=10, special="fn", scale="none").fake_quant(torch.tensor([100.0, 1.0, math.nan]))
    assert raw[:2].tolist() == [56.0, 1.0] and math.isnan(raw[2])  # E4M3 (fn) with bias 10: max 2^5 * 1.75


def test_binary_and_ternary():
    x = torch.tensor([[1.0, -2.0, 0.0, 3.0]])
    assert BinaryFormat(group_size="channel").fake_quant(x).tolist() == [[1.5, -1.5, 1.5, 1.5]]
    ternary = TernaryFormat(group_size="channel").quantize(x)
    assert ternary.codes.tolist() == [[[1, -1, 0, 1]]] and ternary.scale.item() == 1.5
    median = TernaryFormat(group_size="channel", scale="absmedian").quantize(torch.tensor([[1.0, -2.0, 0.1, 30.0]]))
    assert median.scale.item() == 1.0 and median.codes.tolist() == [[[1, -1, 0, 1]]]


def test_hadamard_stores_the_rotated_tensor_and_helps_outliers():
    torch.manual_seed(0)
    x = torch.randn(32, 256) * 0.1
    x[:, ::32] = 20.0  # one outlier per block
    plain, rotated = MxFormat("e2m1"), HadamardFormat(MxFormat("e2m1"), 32, seed=1)
    err = {f.describe(): ((f.fake_quant(x) - x).norm() / x.norm()).item() for f in (plain, rotated)}
    assert err["mxfp4+had32"] < err["mxfp4"]
    q = rotated.quantize(x)
    assert torch.allclose(rotated.inner.dequantize(q), rotated.fake_quant(x) @ torch.block_diag(*[rotated.rotation(x.device)] * 8), atol=1e-5)
    assert torch.allclose(rotated.dequantize(q), rotated.fake_quant(x), atol=1e-6)


# ---------------------------------------------------------------------------------------------------
# Errors


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: IntFormat(bits=0), "bits=0"),
        (lambda: IntFormat(bits=4, group_size="row"), "group_size='row'"),
        (lambda: IntFormat(bits=4, clip="max"), "clip='max'"),
        (lambda: FpFormat(exp_bits=9), "exp_bits=9"),
        (lambda: FpFormat(exp_bits=8, man_bits=7), "beyond what float32 simulates"),
        (lambda: FpFormat(scale="bf16"), "scale='bf16'"),
        (lambda: FpFormat(special="nan"), "special='nan'"),
        (lambda: MxFormat("e9m9"), "'int8', 'e4m3', 'e5m2', 'e2m3', 'e3m2', 'e2m1'"),
        (lambda: NvFormat("e4m3"), "['e2m1', 'int4']"),
        (lambda: TernaryFormat(scale="mean"), "['absmean', 'absmedian']"),
        (lambda: HadamardFormat(MxFormat(), block_size=7), "block_size=7"),
        (lambda: HadamardFormat("mxfp4"), "not a format"),
    ],
)
def test_bad_knobs_name_the_value_and_the_choices(make, message):
    with pytest.raises(FormatError, match=message.replace("[", r"\[").replace("(", r"\(")):
        make()


def test_width_errors_name_the_layer():
    with pytest.raises(FormatError, match="layer mlp.down"):
        IntFormat(4, 128).check_width(576, "mlp.down")
    with pytest.raises(FormatError, match="layer attn.q"):
        HadamardFormat(NvFormat(), 64).check_width(96, "attn.q")
    MxFormat().check_width(40, "ragged is fine")


def test_raw_grid_without_nan_code_refuses_nan():
    with pytest.raises(FormatError, match="no NaN code"):
        FpFormat(2, 1, scale="none").quantize(torch.tensor([math.nan]))

"""Triton quantization kernels against their torch references, bit for bit (NaN matches NaN), on CPU
through the Triton interpreter at small sizes: ties, saturation, subnormals, all-zero blocks, NaN/inf,
odd shapes and ragged last blocks. The same checks run on a GPU in bench/quant_kernel_bandwidth.py."""

from __future__ import annotations

import math
import os

import pytest
import torch

if torch.cuda.is_available():  # these feed CPU tensors to the kernels, which the interpreter alone accepts
    pytest.skip("interpreter suite; on a GPU `python -m bench.quant_kernel_bandwidth` runs the same bit-exact "
                "checks on the device", allow_module_level=True)
os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are decorated: they run on CPU tensors

pytest.importorskip("triton")

from qkernels import quant  # noqa: E402
from methods.common.elements import Element  # noqa: E402
from methods.common.formats import FormatError, IntFormat, same_bits  # noqa: E402
from methods.common.microscaling import MxFormat, NvFormat  # noqa: E402

MX = [MxFormat(element) for element in ("e2m1", "int8", "e4m3", "e5m2", "e2m3", "e3m2")]
NV = [NvFormat("e2m1"), NvFormat("int4")]
SHAPES = [(6, 96), (3, 2, 40)]  # whole blocks; leading dims with a ragged last block (40 = 32 + 8 = 2 x 16 + 8)
SMALL = 256  # elements per program: several programs even at these sizes


def edge_tensor(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Random rows over several decades, with an all-zero row, NaN/+-inf, a saturating block (amax 7.9 ->
    E2M1's 6), values in the elements' subnormal range and a float32/bf16 subnormal."""
    generator = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(*shape, generator=generator) * torch.logspace(-2, 2, shape[-1])
    rows = x.view(-1, shape[-1])
    rows[1] = 0.0
    rows[2, 3], rows[2, -1], rows[3, 5] = math.nan, math.inf, -math.inf
    rows[4, :4] = torch.tensor([7.9, -0.26, 0.2, 0.74])
    rows[-1, :3] = torch.tensor([6.0, 1e-39, -3e-3])
    return x.to(dtype)


def tie_tensor(elem: Element, block: int) -> torch.Tensor:
    """Blocks of the element's largest value followed by midpoints between its grid values: the block
    scale is then exactly 1 (MX; NV too, since the tensor maximum is the element's), so every midpoint
    is a tie."""
    codes = torch.arange(2**elem.bits)
    grid = torch.unique(elem.decode(codes)[torch.isfinite(elem.decode(codes))])
    midpoints = (grid[:-1] + grid[1:]) / 2
    values = torch.cat([midpoints, -midpoints])
    per_block = block - 1
    blocks = [torch.cat([torch.tensor([elem.max_value]), values[i : i + per_block]]) for i in range(0, len(values), per_block)]
    blocks[-1] = torch.nn.functional.pad(blocks[-1], (0, block - len(blocks[-1])))
    return torch.stack(blocks)


def fake_kernel(x: torch.Tensor, fmt: MxFormat | NvFormat) -> torch.Tensor:
    if isinstance(fmt, MxFormat):
        return quant.mx_fake_quant(x, fmt, elems_per_program=SMALL)
    return quant.nv_fake_quant(x, fmt, elems_per_program=SMALL)


def reference(x: torch.Tensor, fmt) -> torch.Tensor:
    return fmt.dequantize(fmt.quantize(x))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("fmt", MX + NV, ids=lambda f: f.name)
def test_block_fake_quant_is_bit_exact(fmt, shape, dtype):
    x = edge_tensor(shape, dtype)
    y = fake_kernel(x, fmt)
    assert same_bits(y, reference(x, fmt))
    assert torch.isnan(y).any() and not torch.isnan(y.view(-1, shape[-1])[0]).any()  # NaN stays in its block


@pytest.mark.parametrize("fmt", MX + NV, ids=lambda f: f.name)
def test_ties_round_to_even_in_kernel_and_reference(fmt):
    x = tie_tensor(fmt.elem, fmt.BLOCK)
    assert same_bits(fake_kernel(x, fmt), reference(x, fmt))
    assert same_bits(fake_kernel(-x, fmt), reference(-x, fmt))


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("fmt", [f for f in MX + NV if f.elem.bits in (4, 8)], ids=lambda f: f.name)
def test_packed_codes_and_scales_are_bit_exact(fmt, shape):
    x = edge_tensor(shape, torch.bfloat16)
    if isinstance(fmt, MxFormat):
        packed, expected = quant.mx_quantize(x, fmt, SMALL), quant.mx_quantize_reference(x, fmt)
    else:
        packed, expected = quant.nv_quantize(x, fmt, elems_per_program=SMALL), quant.nv_quantize_reference(x, fmt)
        assert same_bits(packed.tensor_scale, expected.tensor_scale)
    assert same_bits(packed.codes, expected.codes) and same_bits(packed.scale, expected.scale)
    rows = math.prod(shape[:-1])
    assert packed.codes.shape == (rows, -(-shape[-1] // fmt.BLOCK) * fmt.BLOCK * fmt.elem.bits // 8)


def test_huge_values_saturate_the_same_way():
    x = edge_tensor((6, 64), torch.float32)
    x[0, :2] = torch.tensor([3e38, -1e30])
    for fmt in (MxFormat("e2m1"), MxFormat("int8"), NvFormat("e2m1"), NvFormat("int4")):
        assert same_bits(fake_kernel(x, fmt), reference(x, fmt)), fmt.name


INT_FORMATS = [
    IntFormat(4, 32),
    IntFormat(4, 32, symmetric=True),
    IntFormat(8, "channel"),
    IntFormat(2, 16),
    IntFormat(3, 32, symmetric=True, scale_bits=32),
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("fmt", INT_FORMATS, ids=lambda f: f.describe())
def test_int_kernels_are_bit_exact(fmt, dtype):
    x = edge_tensor((6, 96), dtype)
    x[5, :8] = torch.tensor([float(fmt.qmax), 0.5, 1.5, 2.5, -0.5, -1.5, 0.0, 1.0]).to(dtype)  # ties (scale 1)
    assert same_bits(quant.int_fake_quant(x, fmt, SMALL), reference(x, fmt))
    if fmt.bits in quant.PACKABLE_BITS:
        packed, expected = quant.int_quantize(x, fmt, SMALL), quant.int_quantize_reference(x, fmt)
        assert same_bits(packed.codes, expected.codes) and same_bits(packed.scale, expected.scale)
        assert (packed.zero is None) == (expected.zero is None)
        assert packed.zero is None or same_bits(packed.zero, expected.zero)
    unpacked, q = quant.int_quantize_codes(x, fmt, SMALL), fmt.quantize(x)  # a code a byte (any bits), fp32 scales and zeros
    assert unpacked.codes.dtype == (torch.int8 if fmt.symmetric else torch.uint8)
    assert torch.equal(unpacked.codes.long(), q.codes.reshape(x.shape).long())
    exact = lambda a, b: torch.allclose(a, b.float().reshape(a.shape), rtol=0, atol=0, equal_nan=True)  # noqa: E731 (NaN: non-finite groups)
    assert exact(unpacked.scale, q.scale) and (unpacked.zero is None) == fmt.symmetric and (fmt.symmetric or exact(unpacked.zero, q.zero))


def test_finite_amax_ignores_nan_and_inf():
    x = edge_tensor((6, 96), torch.float32)
    assert quant.finite_amax(x, block=128).item() == x[torch.isfinite(x)].abs().max().item()


def test_pack_codes_puts_earlier_elements_in_lower_bits():
    assert quant.pack_codes(torch.tensor([[1, 2, 3, 4]]), 4).tolist() == [[0x21, 0x43]]
    assert quant.pack_codes(torch.tensor([[1, 2, 3, 0, 3, 3, 3, 3]]), 2).tolist() == [[0b00111001, 0xFF]]


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: quant.int_fake_quant(torch.randn(2, 40), IntFormat(4, 32)), "does not divide the last dim 40"),
        (lambda: quant.int_fake_quant(torch.randn(2, 64), IntFormat(4, "tensor")), "group_size='tensor'"),
        (lambda: quant.int_fake_quant(torch.randn(2, 64), IntFormat(4, 32, clip="mse")), "clip='mse'"),
        (lambda: quant.int_quantize(torch.randn(2, 64), IntFormat(3, 32)), "bits=3"),
        (lambda: quant.mx_quantize(torch.randn(2, 64), MxFormat("e2m3")), "4- and 8-bit"),
        (lambda: quant.mx_fake_quant(torch.randn(0, 64), MxFormat("e2m1")), "empty tensor"),
    ],
)
def test_refusals_are_clear(call, message):
    with pytest.raises(FormatError, match=message):
        call()

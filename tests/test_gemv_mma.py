"""The tensor-core GEMV (qkernels/gemv_mma.py, Gluon): its decode constants, MMA operand map, input checks
and dispatch on CPU (Gluon has no interpreter), the kernel against the fp32 reference on a GPU."""

from __future__ import annotations

import re
from dataclasses import replace

import pytest
import torch

from qkernels import lowbit_matmul as lm
from qkernels.gemv_mma import (
    WINDOW, GemvMmaConfig, _by_group, _descriptors, _value_boxes, config_for, default_config, gemv_mma, group_box, k_warps_config, mma_asm,
    launch_constants, routes, rule_config, tile_words, values_box_fits,
    slot3_constants, slot_constants, tma_config,
)
from qkernels.pack import PackedWeight, pack_weight

requires_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def half_value(bits: torch.Tensor) -> torch.Tensor:
    return (bits & 0xFFFF).to(torch.int16).view(torch.float16).float()


@pytest.mark.parametrize("bits", [1, 2, 4])
def test_slot_pairs_decode_to_offset_plus_code_exactly(bits: int) -> None:
    """The shift and lop3 of ``_decode_slot`` (``(word >> shift) & mask | exp``, a negative shift to the
    left) read, per half, as the fp16 ``2**(10 - P) + code`` of slot ``s`` (low half) and slot
    ``s + SLOTS/2`` (high half), with ``P`` in the top ``WINDOW`` mantissa bits (offsets at most 256)."""
    slots = 32 // bits
    words = torch.randint(-(2**31), 2**31, (4096,), dtype=torch.int64) & 0xFFFFFFFF
    shifts = set()
    for s in range(slots // 2):
        c = slot_constants(s, bits)
        assert 10 - WINDOW[bits] <= c["p"] <= 10 - bits and c["offset"] == 2 ** (10 - c["p"]) <= 256
        moved = words >> c["shift"] if c["shift"] >= 0 else (words << -c["shift"]) & 0xFFFFFFFF
        v = moved & c["mask"] | c["exp"]
        for half, slot in ((0, s), (1, s + slots // 2)):
            code = (words >> (bits * slot)) & ((1 << bits) - 1)
            assert torch.equal(half_value(v >> (16 * half)), c["offset"] + code.float()), (s, half)
        shifts.add(c["shift"])
    assert len(shifts) == 16 // WINDOW[bits]  # one shift per window of a half word


def test_uint3_slot_pairs_decode_to_64_plus_code_exactly() -> None:
    """``_decode_slot3`` on packed uint3 (the low plane's word, the high plane's word for two chunks, spread as in
    ``_spread_high``), emulated: per half the fp16 ``64 + code`` of slot ``s`` and ``s + 8`` of either chunk."""
    torch.manual_seed(3)
    codes = torch.randint(0, 8, (4, 2 * 16 * lm.GEMV_MMA_RUN))  # two chunks of 512 codes: one high chunk
    pw = pack_weight(codes, torch.rand(4, 8).half(), None, "uint3", 128, zero_const=3.5, run=lm.GEMV_MMA_RUN)
    run = lm.GEMV_MMA_RUN
    for chunk in range(2):
        words = pw.words[:, chunk * run:(chunk + 1) * run].long() & 0xFFFFFFFF
        high = (pw.high[:, :run].long() & 0xFFFFFFFF) >> (16 * chunk)
        spread = (high & 0xFF) | ((high & 0xFF00) << 8)
        for s in range(8):
            c = slot3_constants(s)
            shift = lambda v, n: v >> n if n >= 0 else (v << -n) & 0xFFFFFFFF  # noqa: E731
            v = (shift(words, c["shift_lo"]) & c["mask_lo"] | c["exp"]) | (shift(spread, c["shift_hi"]) & c["mask_hi"])
            for half, slot in ((0, s), (1, s + 8)):
                code = codes[:, chunk * 512 + slot * run:chunk * 512 + (slot + 1) * run].float()
                assert torch.equal(half_value(v >> (16 * half)), c["offset"] + code), (chunk, s, half)


@pytest.mark.parametrize("bits", [1, 2, 4])
def test_offsets_and_zero_points_come_off_with_the_activation_sums(bits: int) -> None:
    """The kernel's algebra for one step of one row, in float64: the MMA sums ``(2**(10 - P) + code) * x``
    over the step's slots, starting from ``-(sum 2**(10 - P) x) - zero * sum x`` (the staged sums), and
    the scale multiplies the result: that is ``scale * sum (code - zero) * x``, for any zero point."""
    torch.manual_seed(bits)
    step = 4
    codes = torch.randint(0, 2**bits, (step, lm.GEMV_MMA_RUN)).double()
    x = torch.randn(step, lm.GEMV_MMA_RUN).double()
    offsets = torch.tensor([slot_constants(s, bits)["offset"] for s in range(step)]).double()[:, None]
    zero, scale = 0.37 * 2**bits, 0.02
    start = -(offsets * x).sum() - zero * x.sum()
    got = scale * (start + ((offsets + codes) * x).sum())
    assert torch.isclose(got, scale * ((codes - zero) * x).sum(), rtol=1e-12)


def test_mma_operand_map() -> None:
    """Each of the four MMAs writes its own 4 accumulators (in and out the same elements), takes the
    A pairs of both passes at words 2j and 2j + 1, and the activation pairs of those two words."""
    lines = mma_asm().splitlines()
    assert len(lines) == 4
    outs, a_seen = [], []
    for j, line in enumerate(lines):
        d, a, b, c = ([int(v) for v in re.findall(r"\$(\d+)", group)] for group in re.findall(r"\{([^}]*)\}", line))
        assert [x + 48 for x in d] == c
        assert d == [2 * j, 2 * j + 1, 8 + 2 * j, 8 + 2 * j + 1]
        assert a == [16 + 2 * j, 24 + 2 * j, 17 + 2 * j, 25 + 2 * j]  # rows g, g+8 at k pair t, then at t + 4
        assert b == [32 + 2 * j, 33 + 2 * j]
        outs += d
        a_seen += a
    assert sorted(outs) == list(range(16)) and sorted(a_seen) == list(range(16, 32))


def test_rejects_what_it_cannot_take() -> None:
    codes = torch.randint(0, 8, (8, 256))
    scale = torch.rand(8, 2).half()
    uint3 = pack_weight(codes, scale, None, "uint3", 128, zero_const=3.5)  # a run of 8 (K = 256)
    assert not lm.gemv_mma_fits(uint3, torch.float16)
    with pytest.raises(ValueError, match="run 8"):
        gemv_mma(torch.randn(1, 256, dtype=torch.float16), uint3)
    assert lm.gemv_mma_fits(pack_weight(codes, scale, None, "uint3", 128, zero_const=3.5, run=32), torch.float16)
    half_zeros = pack_weight(codes % 4, scale, None, "uint2", 128, zero_const=1.5, run=32)
    assert lm.gemv_mma_fits(half_zeros, torch.float16)  # any zero point: they come off in fp32
    assert not lm.gemv_mma_fits(pack_weight(codes % 4, scale, None, "uint2", 128, zero_const=1.5, run=16), torch.float16)
    ternary = pack_weight(codes % 3, scale[:, :1], None, "uint2", None, zero_const=1.0, run=32)
    assert lm.gemv_mma_fits(ternary, torch.float16) and not lm.gemv_mma_fits(ternary, torch.bfloat16)
    with pytest.raises(ValueError, match="multiple of 16"):
        gemv_mma(torch.randn(1, 256, dtype=torch.float16), ternary, GemvMmaConfig(block_n=32, num_warps=4))
    x = torch.randn(1, 256, dtype=torch.float16)
    with pytest.raises(ValueError, match=r"block_n must be a multiple of 16 \* num_warps / k_warps = 32, got 16"):
        gemv_mma(x, ternary, GemvMmaConfig(block_n=16, num_warps=8, k_warps=4))
    with pytest.raises(ValueError, match="k_warps must be a power of two that divides num_warps = 8, got 3"):
        gemv_mma(x, ternary, GemvMmaConfig(block_n=32, num_warps=8, k_warps=3))
    with pytest.raises(ValueError, match=r"k_warps=4 runs on the plain loads \(stages=0\) and one plane of words \(not uint3\); got stages=2"):
        gemv_mma(x, ternary, GemvMmaConfig(block_n=32, num_warps=8, k_warps=4, stages=2))
    uint3_32 = pack_weight(codes, scale, None, "uint3", 128, zero_const=3.5, run=32)
    with pytest.raises(ValueError, match="got stages=0, uint3"):
        gemv_mma(x, uint3_32, GemvMmaConfig(block_n=32, num_warps=8, k_warps=4))
    with pytest.raises(ValueError, match=r"lane_words=True runs on the plain loads \(stages=0; .*\); got stages=2"):
        gemv_mma(x, ternary, GemvMmaConfig(block_n=32, num_warps=2, stages=2, lane_words=True))
    with pytest.raises(ValueError, match=r"tiled_words=True runs on .* \(stages > 0, not uint3\); got k_warps=1, stages=0, uint2"):
        gemv_mma(x, ternary, GemvMmaConfig(block_n=32, num_warps=2, tiled_words=True))
    with pytest.raises(ValueError, match="got k_warps=1, stages=2, uint3"):
        gemv_mma(x, uint3_32, GemvMmaConfig(block_n=32, num_warps=2, stages=2, tiled_words=True))


@pytest.mark.parametrize("tiled", [False, True])
def test_the_warp_group_kernel_finds_every_word_in_either_layout(tiled: bool) -> None:
    """The warp-group GEMV's word address ``tile * stride_wb + row * stride_wn + chunk * stride_wc + word`` (the sizes
    its launch passes) reads word ``w`` of chunk ``c`` of row ``r`` from the packed rows, and from :func:`tile_words`'s
    copy with ``tiled_words`` (rows padded with zeros to whole tiles)."""
    n, k, block_n = 200, 1024, 64
    pw = pack_weight(torch.randint(0, 4, (n, k)), torch.rand(n, k // 128).half(), None, "uint2", 128, zero_const=1.5, run=32)
    config = GemvMmaConfig(block_n, 16, 1, k_warps=4, tiled_words=tiled)
    _, sizes, consts = launch_constants(pw, config)
    assert not consts["LANES"]
    stride_wb, stride_wn, stride_wc = sizes[8:11]
    words = pw.words
    flat = (tile_words(words, block_n) if tiled else words).flatten()
    assert flat.numel() == (4 * block_n if tiled else n) * words.shape[1]
    r, c, w = torch.meshgrid(torch.arange(n), torch.arange(words.shape[1] // 32), torch.arange(32), indexing="ij")
    address = r // block_n * stride_wb + r % block_n * stride_wn + c * stride_wc + w
    assert torch.equal(flat[address], words[r, c * 32 + w])
    if tiled:
        assert not flat.view(4, -1, block_n, 32)[3, :, n % block_n:].any()  # the padding rows
    assert launch_constants(pw, replace(config, lane_words=True))[2]["LANES"]


def test_lane_words_reads_each_run_in_64_byte_pieces() -> None:
    """``lane_words``'s map (the kernel's own ``_lane_place``, run as Python on a tensor): a permutation of a run's 32
    columns (the activations are staged through the same map, so every word meets its own activations), under which
    lane ``t``'s load ``h`` (columns ``8t + 4h .. 8t + 4h + 3``) reads places ``16h + 4t ..``: for each ``h`` the four
    lanes of a row read 64 bytes in a row."""
    from qkernels.gemv_mma import _lane_place

    place = _lane_place.fn(torch.arange(32))
    assert sorted(place.tolist()) == list(range(32))
    by_load = place.view(4, 2, 4).transpose(0, 1)  # [load h, lane t, word j]
    assert torch.equal(by_load.flatten(), torch.arange(32))


def test_the_tma_feed_finds_each_box_of_the_tiled_words() -> None:
    """With ``tiled_words`` on the TMA feed, the box ``[block_n, 32]`` at row ``row0 * n_chunks + chunk * block_n`` of the
    tile-by-tile copy seen as rows of 32 words (``_fetch``'s coordinates) holds what the box at ``[row0, chunk * 32]`` of
    the packed rows holds (rows past N: zeros, as TMA fills them there)."""
    n, k, block_n = 200, 2048, 64
    pw = pack_weight(torch.randint(0, 16, (n, k)), torch.rand(n, k // 128).half(), None, "uint4", 128, zero_const=7.5, run=32)
    n_chunks = pw.words.shape[1] // 32
    tiled = tile_words(pw.words, block_n).view(-1, 32)
    packed = torch.cat([pw.words, pw.words.new_zeros(4 * block_n - n, pw.words.shape[1])])
    for row0 in range(0, n, block_n):
        for chunk in range(n_chunks):
            at = row0 * n_chunks + chunk * block_n
            assert torch.equal(tiled[at:at + block_n], packed[row0:row0 + block_n, chunk * 32:(chunk + 1) * 32])


def test_the_box_of_group_values_takes_even_runs_on_hopper(monkeypatch: pytest.MonkeyPatch) -> None:
    """``values_box`` (warp groups along K, the split's group values in one TMA box): every reason it cannot run is
    named, and the box's descriptor reads group ``(split * KW + warp group) * run's groups + j`` at ``[split, j, warp
    group]`` (a run's groups first in shared memory)."""
    def packed(n: int, k: int, group: int | None = 128, top: int = 3) -> PackedWeight:
        n_groups = 1 if group is None else k // group
        return pack_weight(torch.randint(0, top + 1, (n, k)), torch.rand(n, n_groups).half(), torch.randint(0, top + 1, (n, n_groups)).half(),
                           "uint2", group, run=32)

    w2 = packed(64, 4096)  # 8 chunks of 512 K, four groups a chunk
    even = GemvMmaConfig(64, 8, 2, k_warps=2, values_box=True)
    assert "a Hopper GPU" in values_box_fits(w2, even)
    with pytest.raises(ValueError, match="values_box needs a Hopper GPU"):
        gemv_mma(torch.randn(1, 4096, dtype=torch.float16), w2, even)
    monkeypatch.setattr(lm, "is_hopper", lambda device: True)
    assert values_box_fits(w2, even) is None and values_box_fits(w2, GemvMmaConfig(64, 16, 1, k_warps=4, values_box=True)) is None
    assert "k_warps=1 (warp groups along K)" in values_box_fits(w2, GemvMmaConfig(64, 4, 2, values_box=True))
    assert "every run the same power of two chunks (8 chunks in 6 runs)" in values_box_fits(w2, GemvMmaConfig(64, 8, 3, k_warps=2))
    assert "every run the same power of two chunks (7 chunks" in values_box_fits(packed(64, 3584), even)
    assert "groups inside a chunk half" in values_box_fits(packed(64, 4096, None, 2), even)
    assert "16-byte aligned group-major scales and zero points (N=60)" in values_box_fits(packed(60, 4096), even)
    _, _, scale, zero = lm.kernel_tensors(w2)
    desc = _value_boxes(w2, scale, zero, even)[0]
    assert list(desc.shape) == [2, 8, 2, 64] and list(desc.block_shape) == [1, 8, 2, 64]
    view = torch.as_strided(scale, desc.shape, desc.strides, scale.storage_offset())
    s_, j, g = 1, 5, 1
    assert torch.equal(view[s_, j, g], scale[:, (s_ * 2 + g) * 8 + j])


def test_small_weights_split_k_across_warp_groups() -> None:
    """The rule for small weights (at most 4096^2 codes on at least 4096 rows): 32-row tiles of 8 warps in 4 groups
    along K and no global K split, for W2, ternary and W4, before the TMA feed's rule; not for W1 or W3, nor larger
    or narrower weights."""
    def packed(layout: str, top: int, n: int, k: int, group: int | None):
        scale = torch.rand(n, 1 if group is None else k // group).half()
        return pack_weight(torch.randint(0, top + 1, (n, k)), scale, None, layout, group, zero_const=1.0, run=32)

    small = [packed("uint2", 3, 4096, 4096, 128), packed("uint2", 2, 4096, 4096, None), packed("uint4", 15, 4096, 2048, 128)]
    kw = GemvMmaConfig(block_n=32, num_warps=8, split_k=1, k_warps=4)
    assert [k_warps_config(pw) for pw in small] == [kw] * 3 and [rule_config(pw) for pw in small] == [kw] * 3
    others = [packed("uint1", 1, 4096, 4096, 128), packed("uint3", 7, 4096, 4096, 128), packed("uint2", 3, 11008, 4096, 128),
              packed("uint2", 3, 2048, 4096, 128)]
    assert [k_warps_config(pw) for pw in others] == [None] * 4
    assert rule_config(others[2]) == default_config(others[2])  # (no Hopper here: the plain loads' rule)


def test_dispatch_at_batch_1(monkeypatch: pytest.MonkeyPatch) -> None:
    """Grouped W1 and W2 and ternary take the tensor-core GEMV at batch 1 (not at 2); grouped W4 only for a
    long K and at most 4096 rows, else it keeps the pair GEMV, except on Hopper GPUs."""
    cuda = torch.device("cuda")
    codes = torch.randint(0, 2, (64, 1024))
    w1 = pack_weight(codes, torch.rand(64, 8).half(), torch.randint(0, 2, (64, 8)).half(), "uint1", 128, run=32)
    ternary = pack_weight(codes * 2, torch.rand(64, 1).half(), None, "uint2", None, zero_const=1.0, run=32)
    w4_long_k = pack_weight(codes * 15, torch.rand(64, 8).half(), torch.randint(0, 16, (64, 8)).half(), "uint4", 128, run=32)
    w4 = pack_weight(torch.randint(0, 16, (256, 256)), torch.rand(256, 2).half(), torch.randint(0, 16, (256, 2)).half(), "uint4", 128, run=32)
    w2 = pack_weight(codes * 3, torch.rand(64, 8).half(), None, "uint2", 128, zero_const=1.5, run=32)
    w3 = pack_weight(codes * 7, torch.rand(64, 8).half(), None, "uint3", 128, zero_const=3.5, run=32)
    monkeypatch.setattr(lm, "is_hopper", lambda device: False)
    assert [lm.pick_path(1, w, cuda) for w in (w1, w2, w3, ternary, w4_long_k, w4)] == ["gemv_mma"] * 5 + ["gemv"]
    monkeypatch.setattr(lm, "is_hopper", lambda device: True)
    assert [lm.pick_path(1, w, cuda) for w in (w1, w2, w3, ternary, w4_long_k, w4)] == ["gemv_mma"] * 6
    assert tma_config(w3) == GemvMmaConfig(64, 4, 4, stages=2)  # uint3 on TMA, 4 splits for this long K (1024 x 64)
    assert tma_config(replace(w3, n=1024)).split_k == 2
    w3_g64 = pack_weight(codes * 7, torch.rand(64, 16).half(), None, "uint3", 64, zero_const=3.5, run=32)
    assert w3_g64.group_size * 8 == w3_g64.chunk and not routes(w3_g64)  # four groups a chunk half, but two planes
    assert default_config(w3) == GemvMmaConfig(64, 4, 8) and default_config(replace(w3, n=1024)) == GemvMmaConfig(64, 4, 4)  # long K
    monkeypatch.setattr(lm, "before_ampere", lambda device: True)  # a V100 or T4: no m16n8k16 mma.sync
    assert [lm.pick_path(1, w, cuda) for w in (w1, w2, w3, ternary, w4)] == ["gemv", "gemv", "gemv", "gemv", "gemv"]
    monkeypatch.undo()
    assert lm.pick_path(2, w1, cuda) != "gemv_mma" and lm.pick_path(1, w1, cuda, torch.bfloat16) != "gemv_mma"
    square = pack_weight(torch.randint(0, 2, (1024, 1024)), torch.rand(1024, 8).half(), None, "uint1", 128, zero_const=1.0)
    wide = pack_weight(torch.randint(0, 2, (1024, 256)), torch.rand(1024, 2).half(), None, "uint1", 128, zero_const=1.0)
    wide_ternary = pack_weight(torch.randint(0, 3, (1024, 256)), torch.rand(1024, 1).half(), None, "uint2", None, zero_const=1.0)
    configs = [default_config(w) for w in (w1, square, wide, wide_ternary)]
    assert configs == [GemvMmaConfig(64, 4, 8), GemvMmaConfig(128, 8, 4), GemvMmaConfig(64, 4, 2), GemvMmaConfig(128, 4, 4)]
    assert default_config(replace(w1, n=8192, k=28672)) == GemvMmaConfig(128, 8, 4)  # a long K, but rows enough for 4 splits


@requires_gpu
@pytest.mark.parametrize(
    "layout,top,group,zeros",
    [("uint4", 15, 128, "integer"), ("uint2", 3, 128, "integer"), ("uint2", 3, 128, "float"), ("uint2", 2, None, 1.0),
     ("uint2", 3, 64, "float"), ("uint1", 1, 128, "integer"), ("uint1", 1, 128, 0.5), ("uint1", 1, None, 0.5),
     ("uint3", 7, 128, "integer"), ("uint3", 7, 128, 3.5), ("uint3", 7, None, 3.5)],
)
@pytest.mark.parametrize("n,k", [(200, 1152), (64, 4096)])
def test_matches_the_reference_on_ragged_shapes(layout: str, top: int, group: int | None, zeros: str | float, n: int, k: int) -> None:
    """Random codes, scales and zero points (integer, any float, or one offset for all), outputs poisoned
    with NaN, tiles and K splits that leave ragged edges: within fp16 output rounding of the fp32 reference."""
    codes = torch.randint(0, top + 1, (n, k))
    n_groups = 1 if group is None else k // group
    scale = (torch.rand(n, n_groups) * 0.02 + 0.01).half()
    zero = {"integer": torch.randint(0, top + 1, (n, n_groups)).half(), "float": (torch.rand(n, n_groups) * top).half()}.get(zeros)
    pw = pack_weight(codes, scale, zero, layout, group, zero_const=zeros if zero is None else 0.0, run=32).to("cuda")
    assert lm.gemv_mma_fits(pw, torch.float16)
    x = torch.randn(3, k, device="cuda", dtype=torch.float16)
    ref = lm.reference_matmul(x, pw).float()
    configs = [None, GemvMmaConfig(128, 8, 2), GemvMmaConfig(32, 2, 1), GemvMmaConfig(64, 4, 8, maxnreg=None), GemvMmaConfig(pdl=True),
               GemvMmaConfig(64, 4, 3, lane_words=True)]  # (the words read in 64-byte runs: uint3's high plane too)
    if pw.high is None:  # the warps in groups along K: uneven runs, groups with no chunk, with and without global K splits
        configs += [GemvMmaConfig(32, 8, 1, k_warps=4), GemvMmaConfig(64, 8, 2, k_warps=2), GemvMmaConfig(16, 8, 3, k_warps=8),
                    GemvMmaConfig(128, 16, 1, k_warps=2, maxnreg=None), GemvMmaConfig(32, 8, 1, k_warps=4, tiled_words=True),
                    GemvMmaConfig(16, 8, 3, k_warps=8, tiled_words=True, lane_words=True), GemvMmaConfig(64, 8, 2, k_warps=2, lane_words=True)]
        # (the words tile by tile with a ragged last tile; read in 64-byte runs, the activations staged to match)
    if lm.is_hopper(x.device):  # the TMA feed: every chunk in flight, and a ring that refills (1 and 2 stages)
        configs += [GemvMmaConfig(128, 8, 2, stages=4), GemvMmaConfig(64, 4, 1, stages=1), GemvMmaConfig(32, 2, 2, stages=2),
                    GemvMmaConfig(128, 4, 2, stages=2, maxnreg=168)]  # (the 168-register cap of 128-row tiles)
        if pw.high is None:  # the words tile by tile: a ring that refills, and every chunk in flight
            configs += [GemvMmaConfig(64, 4, 2, stages=2, tiled_words=True), GemvMmaConfig(128, 8, 2, stages=4, tiled_words=True)]
        boxed = [GemvMmaConfig(64, 16, 1, k_warps=4, values_box=True), GemvMmaConfig(64, 8, 2, k_warps=2, values_box=True)]
        configs += [c for c in boxed if values_box_fits(pw, c) is None]  # the split's group values in one TMA box
        if routes(pw):  # four groups a chunk half in their own MMA columns
            configs += [GemvMmaConfig(64, 4, 2, stages=2, route=True), GemvMmaConfig(128, 8, 1, stages=1, route=True),
                        GemvMmaConfig(128, 4, 2, stages=2, route=True), GemvMmaConfig(128, 4, 2, stages=2, route=True, tiled_words=True)]
    for config in configs:
        y = lm.gemv_mma(x, pw, config, out=torch.full((3, n), float("nan"), device="cuda", dtype=torch.float16)).float()
        assert not y.isnan().any()
        assert ((y - ref).norm() / ref.norm()).item() < 5e-4, config


@requires_gpu
@pytest.mark.parametrize("layout,top,group", [("uint1", 1, 128), ("uint2", 3, 128), ("uint2", 2, None), ("uint4", 15, 128)])
def test_chained_launches_wait_for_their_inputs(layout: str, top: int, group: int | None) -> None:
    """A chain ``h = W_i h`` of six GEMVs, each reading the previous one's output, eagerly and replayed from
    a CUDA graph: with programmatic dependent launch (each launch's weight loads issued before the previous
    kernel ends) the result is the same as without it, bit for bit, and matches the fp32 reference chain."""
    n = 2048
    weights = []
    for _ in range(6):
        n_groups = 1 if group is None else n // group
        scale = ((torch.rand(n, n_groups) + 0.5) / (n * top**2 / 2) ** 0.5).half()  # activations of about unit size all along
        zero = None if group is None else torch.randint(0, top + 1, (n, n_groups)).half()
        weights.append(pack_weight(torch.randint(0, top + 1, (n, n)), scale, zero, layout, group, zero_const=1.0, run=32).to("cuda"))
    x = torch.randn(1, n, device="cuda", dtype=torch.float16)
    ref = x
    for pw in weights:
        ref = lm.reference_matmul(ref, pw)
    results = {}
    for pdl in (False, True):
        outs = [torch.full((1, n), float("nan"), device="cuda", dtype=torch.float16) for _ in weights]

        def chain() -> None:
            h = x
            for pw, out in zip(weights, outs):
                h = gemv_mma(h, pw, replace(config_for(pw), pdl=pdl), out=out)

        chain()
        eager = outs[-1].clone()
        graph, side = torch.cuda.CUDAGraph(), torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            chain()  # compile and warm up outside the capture
        torch.cuda.current_stream().wait_stream(side)
        with torch.cuda.graph(graph):
            chain()
        for out in outs:
            out.fill_(float("nan"))
        for _ in range(3):
            graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(outs[-1], eager), pdl
        results[pdl] = eager.float()
    assert torch.equal(results[True], results[False])
    assert ((results[True] - ref.float()).norm() / ref.float().norm()).item() < 5e-3


def test_tma_feed_configs_and_group_boxes() -> None:
    """Hopper's TMA feed: its configs by kind and shape (None: the plain loads; routes for four groups a
    chunk half), the box of group values one K split reads, the group-major scales seen as ``[n_groups,
    n]`` (one group: rows of ``n``), and clear errors where it or its routes cannot run."""
    def packed(layout: str, top: int, n: int, k: int, group: int | None):
        scale = torch.rand(n, 1 if group is None else k // group).half()
        return pack_weight(torch.randint(0, top + 1, (n, k)), scale, None, layout, group, zero_const=1.0, run=32)

    assert tma_config(packed("uint1", 1, 1024, 1024, 128)) == GemvMmaConfig(128, 4, 4, stages=2, route=True, maxnreg=168)
    assert tma_config(packed("uint1", 1, 1024, 256, 128)) == GemvMmaConfig(128, 4, 2, stages=2, route=True, maxnreg=168)  # more rows than K
    assert tma_config(packed("uint1", 1, 256, 1024, 128)) == GemvMmaConfig(64, 4, 4, stages=2)  # a long K: no routes
    assert tma_config(packed("uint2", 3, 1024, 1024, 64)) == GemvMmaConfig(128, 4, 4, stages=2, route=True, maxnreg=168)
    assert tma_config(packed("uint2", 3, 1024, 1024, 128)) == GemvMmaConfig(128, 4, 4, stages=2, maxnreg=168)  # 128-row tiles: 168 registers
    assert tma_config(packed("uint2", 3, 256, 1024, 128)) == GemvMmaConfig(64, 4, 4, stages=2)  # a long K
    assert tma_config(packed("uint4", 15, 1024, 1024, 128)) == GemvMmaConfig(128, 4, 4, stages=2)  # W4: 128 registers
    assert tma_config(packed("uint4", 15, 256, 1024, 128)) is None  # W4 with a long K stays plain
    ternary = packed("uint2", 2, 256, 1024, None)
    assert tma_config(ternary) is None  # one scale a row: plain loads for a small weight,
    assert tma_config(replace(ternary, n=8192, k=8192)) == GemvMmaConfig(128, 4, 4, stages=2, maxnreg=168)  # TMA for a large one
    assert tma_config(replace(ternary, n=14336, k=4096)) is None  # but not where the rows outnumber K
    assert tma_config(replace(packed("uint1", 1, 256, 1024, None), n=8192, k=8192)) is None  # nor for other one-scale layouts
    w4 = packed("uint4", 15, 64, 2048, 128)  # 8 chunks of 256, 16 groups
    assert group_box(w4, GemvMmaConfig(64, 4, 3)) == 8  # 3 chunks a split: 6 groups
    assert group_box(w4, GemvMmaConfig(64, 4, 1)) == 16
    assert group_box(packed("uint4", 15, 64, 2048, 256), GemvMmaConfig(64, 4, 3)) == 4  # a group a chunk
    assert _by_group(ternary.scale) == ([1, 256], [256, 1]) and _by_group(w4.scale) == ([16, 64], [64, 1])
    assert config_for(w4) == default_config(w4)  # no Hopper GPU here: the plain loads
    assert routes(packed("uint1", 1, 64, 1024, 128)) and routes(packed("uint2", 3, 64, 512, 64))
    assert not routes(w4) and not routes(packed("uint2", 3, 64, 512, 128)) and not routes(ternary)
    with pytest.raises(ValueError, match="stages=2 .*Hopper"):
        gemv_mma(torch.randn(1, 2048, dtype=torch.float16), w4, GemvMmaConfig(64, 4, 2, stages=2))
    w3 = packed("uint3", 7, 64, 2048, 128)  # two planes: the high plane's words in boxes of their own, the same shape
    w_desc, h_desc, _, _ = _descriptors(w3, w3.words, w3.scale, w3.scale, GemvMmaConfig(64, 4, 4, stages=2))
    assert h_desc.base is w3.high and h_desc.block_shape == w_desc.block_shape == [64, 32] and h_desc.shape == [64, 64]
    one_plane = _descriptors(w4, w4.words, w4.scale, w4.scale, GemvMmaConfig(64, 4, 4, stages=2))
    assert one_plane[1] is one_plane[0]  # the words' descriptor stands in for the high plane's
    with pytest.raises(ValueError, match="route=True runs on the TMA feed only"):
        gemv_mma(torch.randn(1, 1024, dtype=torch.float16), packed("uint1", 1, 64, 1024, 128), GemvMmaConfig(64, 4, 2, route=True))


def test_tuned_configs_and_the_search_space(monkeypatch: pytest.MonkeyPatch) -> None:
    """What ``bench.kernel_latency --tune-gemv-mma`` installs is used for the same kind and shape only; its
    search space holds valid, distinct configs: plain loads off Hopper, and on Hopper the TMA feed too,
    routed only where four groups share a chunk half."""
    from bench.kernel_latency import gemv_mma_search
    from qkernels import gemv_mma as gm

    def packed(layout: str, top: int, n: int, k: int, group: int):
        return pack_weight(torch.randint(0, top + 1, (n, k)), torch.rand(n, k // group).half(), None, layout, group, zero_const=1.0, run=32)

    w1, w1_other, w2 = packed("uint1", 1, 256, 2048, 128), packed("uint1", 1, 256, 1024, 128), packed("uint2", 3, 256, 2048, 128)
    tuned = GemvMmaConfig(64, 4, 8)
    monkeypatch.setattr(gm, "TUNED", {gm.tuned_key(w1): tuned})
    assert config_for(w1) == tuned and config_for(w1_other) == default_config(w1_other) and config_for(w2) == default_config(w2)
    plain = gemv_mma_search(w1, hopper=False)
    assert plain and all(c.stages == 0 and not c.route for c in plain)
    assert {replace(c, lane_words=False) for c in plain if c.lane_words} == {c for c in plain if not c.lane_words}  # both ways of reading
    monkeypatch.setattr(gm, "tma_fits", lambda pw, config: True)  # (no Hopper GPU here)
    for pw, routed in ((w1, True), (w2, False)):
        search = gemv_mma_search(pw, hopper=True)
        assert len(set(search)) == len(search) and set(plain) < set(search)
        assert all(c.block_n % (16 * c.num_warps // c.k_warps) == 0 and (c.stages > 0 or not c.route) for c in search)
        assert {c.k_warps for c in search} == {1, 2, 4, 8} and all(c.stages == 0 for c in search if c.k_warps > 1)
        assert any(c.route for c in search) == routed and {c.stages for c in search} == {0, 2, 3, 4}
        assert {c.split_k for c in search if c.stages} == {1, 2, 3, 4, 6, 8} and {c.maxnreg for c in search} == {128, gm.WIDE_TILE_REGISTERS}
        assert all(c.maxnreg == 128 for c in search if (c.block_n, c.num_warps) != (128, 4) or not c.stages)
        assert not any(c.pdl for c in search)  # the timing's chain of one GEMV flatters programmatic dependent launch
        assert not any(c.tiled_words for c in search) and all(c.stages == 0 for c in search if c.lane_words)  # (tiled: a copy)


def test_the_tuner_deals_configs_to_compile_workers_and_survives_their_failure(capsys: pytest.CaptureFixture) -> None:
    """``--compile-workers``: every config in exactly one worker's share (none empty); off below two workers; workers that
    fail (here: no CUDA GPU in them) are reported and the tuner goes on (it compiles what is left as it times)."""
    from bench.kernel_latency import main, precompile, shares

    with pytest.raises(SystemExit):
        main(["--tune-gemv-mma", "--compile-workers", "-1"])
    assert "--compile-workers -1: give 0 (off) or a number of processes" in capsys.readouterr().err
    configs = [GemvMmaConfig(64, 4, split) for split in range(1, 8)]
    dealt = shares(configs, 3)
    assert len(dealt) == 3 and sorted(c.split_k for share in dealt for c in share) == list(range(1, 8))
    assert shares(configs[:2], 4) == [[configs[0]], [configs[1]]]
    precompile("gemv_mma", "w4g128", 64, 256, 1, configs, workers=1)
    assert capsys.readouterr().out == ""
    if torch.cuda.is_available():
        return
    precompile("gemv_mma", "w4g128", 64, 256, 1, configs[:2], workers=2)
    assert "--compile-workers: the workers failed" in capsys.readouterr().out

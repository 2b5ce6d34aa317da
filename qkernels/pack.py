"""Packing of integer weight codes along K for the low-bit matmul kernels, with torch unpack references.

A weight ``[N, K]`` (an ``nn.Linear``'s ``[out, in]``) with unsigned codes is stored row by row in
*chunks*. A chunk holds ``slots * run`` consecutive codes of a row in ``run`` words; word ``w`` of the
chunk holds, in slot ``i``, the code at ``chunk_start + i * run + w``. So slot ``i`` of a chunk's
words is a contiguous run of ``run`` codes: a kernel decodes one slot of a whole tile with one
constant shift, and multiplies it with a contiguous slice of the activations (a dot of depth ``run``
for tensor cores). One slot run never crosses a scale group (``group_size % run == 0``).

Layouts:

* ``uint1``, ``uint2``, ``uint4``: int32 words, 32/16/8 slots of 1/2/4 bits; slot ``i`` at bits
  ``[b*i, b*i + b)``.
* ``uint3``: two planes. The low two bits of each code in the ``uint2`` layout (``words``) and the top
  bit in the ``uint1`` layout (``high``), both with the same ``run``: exactly 3 bits per code, and each
  plane decodes with constant shifts (10-per-word packing would waste 2 bits in 32 and cross words).
* ``ternary5``: trits ``{0, 1, 2}`` five to a byte in base 3 (1.6 bits per code). The byte is
  ``ceil(v * 256 / 243)`` for ``v = sum_i t_i 3^(4-i)``, so trit ``i`` decodes with two multiplies,
  a mask and a shift: ``t_i = (((byte * 3^i) & 255) * 3) >> 8`` (no division).

Ternary weights also fit ``uint2`` (codes ``{0, 1, 2}``, zero point 1): 2 bits, faster to decode.
Rows are padded with code 0 up to a whole number of chunks; kernels mask the activations past ``K``,
so padded codes never contribute.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import torch

LAYOUTS = ("uint1", "uint2", "uint3", "uint4", "ternary5")
SLOTS = {"uint1": 32, "uint2": 16, "uint3": 16, "uint4": 8, "ternary5": 5}
CODE_BITS = {"uint1": 1, "uint2": 2, "uint3": 3, "uint4": 4, "ternary5": 2}
STORED_BITS = {"uint1": 1.0, "uint2": 2.0, "uint3": 3.0, "uint4": 4.0, "ternary5": 1.6}
# Runs to try, largest first: 32 int32 words or 128 bytes is one cache line per row and chunk; smaller
# runs spare small matrices the padding (the tensor-core kernel needs a run of at least 16).
RUN_CHOICES = {"ternary5": (256, 128, 64, 32, 16)}
WORD_RUN_CHOICES = (32, 16, 8, 4, 2, 1)
TERNARY5_POWERS = (1, 3, 9, 27, 81)
MAX_PLANS = 64  # launch plans a weight keeps (PackedWeight.memo); all dropped when a new one would pass this
MAX_SHARED_PLANS = 4096  # plans that hold no tensor, kept across PackedWeights (least recently used dropped first)
_SHARED_PLANS: OrderedDict = OrderedDict()


def clear_shared_plans() -> None:
    """Forget the shared plans (``PackedWeight.memo(shared=True)``): after changing a dispatch rule in a running
    process (tests that patch one), weights at the addresses of earlier ones must not get the old rule's answer."""
    _SHARED_PLANS.clear()


class PackError(ValueError):
    """Codes, shapes or group sizes that a layout cannot hold; the message names the constraint."""


@dataclass
class PackedWeight:
    """A packed ``[n, k]`` weight with per-group scales: ``w = (code - zero) * scale``.

    ``scale`` and ``zero`` are ``[n, n_groups]`` (any strides, both the same; :func:`pack_weight` stores
    them group-major); ``zero`` is None when every group shares
    ``zero_const`` (symmetric formats: the code offset). ``group_size`` counts codes of the padded row
    (``k_pad`` for one group per row).
    """

    layout: str
    words: torch.Tensor
    high: torch.Tensor | None
    scale: torch.Tensor
    zero: torch.Tensor | None
    zero_const: float
    n: int
    k: int
    run: int
    group_size: int
    zero_grid: float = 0.0  # 1.0: every zero point is an integer; 1/16: on that grid (within +-64); 0: neither or unknown
    # launch plans (configs, TMA descriptors, paths) built for these tensors: see memo(); QuantLinear keeps one across calls
    plans: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def slots(self) -> int:
        return SLOTS[self.layout]

    @property
    def chunk(self) -> int:
        """Codes per chunk of one row (the unit that a kernel's K loop advances by)."""
        return self.slots * self.run

    @property
    def k_pad(self) -> int:
        return self.words.shape[1] // self.run * self.chunk

    @property
    def n_groups(self) -> int:
        return self.scale.shape[1]

    def memo(self, what: Any, build: Callable[[], Any], shared: bool = False) -> Any:
        """``build()`` once for these tensors (addresses, shapes, strides, dtypes) and fields, then from ``plans``: the
        Python work of a launch (config rules, alignment checks, TMA descriptors) is done once per weight, not per
        call. An entry is a function of its key, or holds the tensors it was built from (TMA descriptors do): while it
        lives their memory is never handed to other tensors, so another weight never matches its key. Values rewritten
        in place are seen (plans hold tensors, not values), except zero points in other strides than the scales, which
        a plan holds as a copy in the scales' strides (``lowbit_matmul.kernel_tensors``).

        ``shared``: the value holds no tensor (a function of the key alone), so it is also kept across PackedWeights,
        in a table of at most :data:`MAX_SHARED_PLANS`: the custom operator (``qkernels.qlinear``) builds a new
        PackedWeight, with empty ``plans``, every call."""
        key = (what, self._tensors_key())
        if key in self.plans:
            return self.plans[key]
        if shared and key in _SHARED_PLANS:
            _SHARED_PLANS.move_to_end(key)
            value = _SHARED_PLANS[key]
        else:
            value = build()
            if shared:
                _SHARED_PLANS[key] = value
                while len(_SHARED_PLANS) > MAX_SHARED_PLANS:
                    _SHARED_PLANS.popitem(last=False)
        if len(self.plans) >= MAX_PLANS:  # (batch sizes are part of some keys: a long run meets many)
            self.plans.clear()
        self.plans[key] = value
        return value

    def _tensors_key(self) -> tuple:
        spec = lambda t: None if t is None else (t.data_ptr(), t.shape, t.stride(), t.dtype, t.device)  # noqa: E731
        return (self.layout, spec(self.words), spec(self.high), spec(self.scale), spec(self.zero), self.zero_const, self.n, self.k,
                self.run, self.group_size, self.zero_grid)

    def nbytes(self) -> int:
        """Bytes a matmul reads for the weight: codes, scales and zeros."""
        tensors = [self.words, self.high, self.scale, self.zero]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def to(self, device: torch.device | str) -> PackedWeight:
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return PackedWeight(
            self.layout, move(self.words), move(self.high), move(self.scale), move(self.zero),
            self.zero_const, self.n, self.k, self.run, self.group_size, self.zero_grid,
        )


def layout_for_bits(bits: int) -> str:
    layouts = {1: "uint1", 2: "uint2", 3: "uint3", 4: "uint4"}
    if bits not in layouts:
        raise PackError(f"no packed layout for {bits}-bit codes; the kernels take bits in {sorted(layouts)}")
    return layouts[bits]


def chunk_period(layout: str, run: int) -> int:
    """Codes per row that padding must round up to (uint3's high plane spans two low-plane chunks)."""
    period = SLOTS[layout] * run
    return 2 * period if layout == "uint3" else period


def run_fits_groups(layout: str, run: int, group_size: int | None) -> bool:
    """A slot run stays inside one group, and groups tile chunks evenly (one divides the other)."""
    if group_size is None:
        return True
    chunk = SLOTS[layout] * run
    return group_size % run == 0 and (chunk % group_size == 0 or group_size % chunk == 0)


RUN_PADDING_SLACK = 1 / 16  # padding of K a longer run may add beyond the least: the fast kernels need a run of 32


def choose_run(layout: str, k: int, group_size: int | None) -> int:
    """The longest run that fits the groups and pads ``k`` at most :data:`RUN_PADDING_SLACK` of ``k`` more than
    the least-padding run (ternary5: no slack). The tensor-core GEMV and the wgmma GEMM take a run of 32 only,
    and they beat the kernels that take shorter runs by more than that: W1, W2 and W3 at Llama-2's K = 11008
    pad 256 codes (2.3%) at a run of 32 and none at 8 or 16; W3 at batch 1 (H200, 8192^2) takes 17.7 us on the
    tensor-core GEMV against 20.1 on the pair GEMV."""
    choices = RUN_CHOICES.get(layout, WORD_RUN_CHOICES)
    fitting = [r for r in choices if run_fits_groups(layout, r, group_size)]
    if not fitting:
        raise PackError(f"group_size={group_size} fits no run {choices} of layout {layout}; "
                        "use a power-of-two group size (ternary5: a run of 16..256 bytes, or one group per row)")
    padding = {r: padded_width(k, chunk_period(layout, r)) - k for r in fitting}
    slack = 0 if layout in RUN_CHOICES else k * RUN_PADDING_SLACK  # ternary5 (byte runs): the least padding
    return max(r for r in fitting if padding[r] <= min(padding.values()) + slack)


def padded_width(k: int, period: int) -> int:
    return -(-k // period) * period


def pack_weight(
    codes: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor | None,
    layout: str,
    group_size: int | None,
    zero_const: float = 0.0,
    run: int | None = None,
) -> PackedWeight:
    """Pack unsigned ``codes [n, k]`` with ``scale``/``zero`` ``[n, n_groups]`` (``group_size=None``: per row)."""
    if layout not in LAYOUTS:
        raise PackError(f"layout={layout!r} is not valid; choose one of {LAYOUTS}")
    n, k = codes.shape
    check_codes(codes, layout)
    check_groups(scale, zero, n, k, group_size)
    run = run or choose_run(layout, k, group_size)
    if not run_fits_groups(layout, run, group_size):
        raise PackError(f"run={run} does not fit group_size={group_size} in layout {layout}")
    k_pad = padded_width(k, chunk_period(layout, run))
    padded = torch.nn.functional.pad(codes.to(torch.int64), (0, k_pad - k))
    if layout == "uint3":
        words, high = pack_uint(padded & 3, 2, run), pack_uint(padded >> 2, 1, run)
    elif layout == "ternary5":
        words, high = pack_ternary5(padded, run), None
    else:
        words, high = pack_uint(padded, CODE_BITS[layout], run), None
    scale_dtype = scale.dtype if scale.dtype in (torch.float16, torch.float32) else torch.float32
    return PackedWeight(
        layout, words, high, group_major(scale.to(scale_dtype)),
        None if zero is None else group_major(zero.to(torch.float16 if scale_dtype == torch.float16 else torch.float32)),
        float(zero_const), n, k, run, group_size or k_pad, zero_grid(zero, zero_const),
    )


ZERO_GRIDS = (1.0, 1 / 16)


def concat_packed(weights: list[PackedWeight]) -> PackedWeight:
    """Weights that read the same input, stacked along N (rows are packed independently): one matmul instead of
    several, e.g. a block's q, k and v projections. They must share the layout, K, run, group size and zero
    handling; the scales are stored group-major again."""
    first = weights[0]
    fields = lambda pw: (pw.layout, pw.k, pw.run, pw.group_size, pw.zero is None, pw.zero_const, pw.scale.dtype)  # noqa: E731
    different = [i for i, pw in enumerate(weights) if fields(pw) != fields(first)]
    if different:
        raise PackError(f"concat_packed needs the same (layout, k, run, group_size, no zeros, zero_const, scale dtype) for every "
                        f"weight; weight 0 has {fields(first)}, weight {different[0]} has {fields(weights[different[0]])}")
    cat = lambda ts: None if ts[0] is None else torch.cat(ts)  # noqa: E731
    zero = cat([pw.zero for pw in weights])
    return PackedWeight(
        first.layout, cat([pw.words for pw in weights]), cat([pw.high for pw in weights]),
        group_major(cat([pw.scale for pw in weights])), None if zero is None else group_major(zero), first.zero_const,
        sum(pw.n for pw in weights), first.k, first.run, first.group_size, min(pw.zero_grid for pw in weights),
    )


def slice_rows(pw: PackedWeight, start: int, stop: int) -> PackedWeight:
    """Rows ``start:stop`` of a packed weight (views: rows are packed independently), e.g. to dequantize a large
    weight a block of rows at a time."""
    if not 0 <= start < stop <= pw.n:
        raise ValueError(f"rows {start}:{stop} are not a non-empty range within the weight's {pw.n} rows")
    rows = lambda t: None if t is None else t[start:stop]  # noqa: E731
    return replace(pw, words=rows(pw.words), high=rows(pw.high), scale=rows(pw.scale), zero=rows(pw.zero), n=stop - start, plans={})


def zero_grid(zero: torch.Tensor | None, zero_const: float) -> float:
    """The coarsest grid of :data:`ZERO_GRIDS` that holds every zero point (within +-64), else 0.0.

    The fp16-pair GEMV subtracts zero points in fp16, divided by 16, next to an offset of 1024 / 16
    (integers only) or 64 / 16 (sixteenths); it runs only where that is exact."""
    values = torch.tensor([zero_const]) if zero is None else zero.float()
    if values.abs().max() >= 64:
        return 0.0
    for grid in ZERO_GRIDS:
        if torch.equal(values / grid, (values / grid).round()):
            return grid
    return 0.0


def group_major(t: torch.Tensor) -> torch.Tensor:
    """``[n, n_groups]`` stored group by group (strides ``(1, n)``): a kernel reads one group's scales
    of a block of rows as one contiguous run instead of one scattered value per row."""
    return t.t().contiguous().t()


def check_codes(codes: torch.Tensor, layout: str) -> None:
    if codes.dim() != 2 or codes.dtype.is_floating_point:
        raise PackError(f"codes must be a 2-D integer tensor [n, k], got {codes.dtype} {tuple(codes.shape)}")
    top = 2 if layout == "ternary5" else 2 ** CODE_BITS[layout] - 1
    if codes.numel() and (codes.min() < 0 or codes.max() > top):
        raise PackError(f"layout {layout} holds unsigned codes 0..{top}; got {int(codes.min())}..{int(codes.max())}")


def check_groups(scale: torch.Tensor, zero: torch.Tensor | None, n: int, k: int, group_size: int | None) -> None:
    n_groups = 1 if group_size is None else k // group_size
    if group_size is not None and k % group_size:
        raise PackError(f"group_size={group_size} does not divide k={k}")
    if tuple(scale.shape) != (n, n_groups):
        raise PackError(f"scale must be [n, n_groups] = {(n, n_groups)}, got {tuple(scale.shape)}")
    if zero is not None and tuple(zero.shape) != (n, n_groups):
        raise PackError(f"zero must be [n, n_groups] = {(n, n_groups)}, got {tuple(zero.shape)}")


def to_int32_words(words: torch.Tensor) -> torch.Tensor:
    """Unsigned 32-bit values held in int64 -> int32 with the same bits."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def pack_uint(codes: torch.Tensor, bits: int, run: int) -> torch.Tensor:
    """``codes [n, k_pad]`` (int64, each < 2**bits) -> int32 words ``[n, k_pad * bits / 32]``."""
    n, k_pad = codes.shape
    slots = 32 // bits
    by_slot = codes.reshape(n, k_pad // (slots * run), slots, run)
    shifts = (torch.arange(slots, device=codes.device) * bits).view(1, 1, slots, 1)
    words = (by_slot << shifts).sum(dim=2)
    return to_int32_words(words).reshape(n, -1).contiguous()


def unpack_uint(words: torch.Tensor, bits: int, run: int) -> torch.Tensor:
    """Inverse of :func:`pack_uint`: int32 words -> int64 codes ``[n, k_pad]``."""
    n = words.shape[0]
    slots = 32 // bits
    chunks = words.to(torch.int64).reshape(n, -1, 1, run) & 0xFFFFFFFF
    shifts = (torch.arange(slots, device=words.device) * bits).view(1, 1, slots, 1)
    return ((chunks >> shifts) & (2**bits - 1)).reshape(n, -1)


def pack_ternary5(codes: torch.Tensor, run: int) -> torch.Tensor:
    """Trits ``[n, k_pad]`` -> bytes ``[n, k_pad / 5]``; byte ``w`` of a chunk holds slots 0..4 at ``w``."""
    n, k_pad = codes.shape
    by_slot = codes.reshape(n, k_pad // (5 * run), 5, run)
    weights = torch.tensor([81, 27, 9, 3, 1], device=codes.device).view(1, 1, 5, 1)
    value = (by_slot * weights).sum(dim=2)
    return ((value * 256 + 242) // 243).to(torch.uint8).reshape(n, -1).contiguous()


def unpack_ternary5(packed: torch.Tensor, run: int) -> torch.Tensor:
    n = packed.shape[0]
    chunks = packed.to(torch.int64).reshape(n, -1, 1, run)
    powers = torch.tensor(TERNARY5_POWERS, device=packed.device).view(1, 1, 5, 1)
    return ((((chunks * powers) & 255) * 3) >> 8).reshape(n, -1)


def unpack_codes(pw: PackedWeight) -> torch.Tensor:
    """The unsigned codes ``[n, k]`` (int64) of a packed weight."""
    if pw.layout == "uint3":
        codes = unpack_uint(pw.words, 2, pw.run) | (unpack_uint(pw.high, 1, pw.run) << 2)
    elif pw.layout == "ternary5":
        codes = unpack_ternary5(pw.words, pw.run)
    else:
        codes = unpack_uint(pw.words, CODE_BITS[pw.layout], pw.run)
    return codes[:, : pw.k]


def dequantize_packed(pw: PackedWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Reference dequantization ``(code - zero) * scale`` in fp32, returned as ``dtype`` ``[n, k]``."""
    codes = unpack_codes(pw).float()
    group = torch.arange(pw.k, device=codes.device) // pw.group_size
    zero = pw.zero.float()[:, group] if pw.zero is not None else pw.zero_const
    return ((codes - zero) * pw.scale.float()[:, group]).to(dtype)

"""Inverted dropout whose masks cost a quarter of the random draws on CPU (LoRA dropout of Hu et al. 2021, §4.2).

    dropout(x) = x ⊙ m / (1 − p'),   m_i = 1[u_i ≥ t],   t = round(p · 2^15),   p' = t / 2^15

with u_i uniform on {0, …, 2^15 − 1}. On CPU the generator draws one number per element, and that draw, not
the multiply, is the cost of `nn.Dropout` (≈ 5 ns per element: 14 ms for a 2048 × 1376 mask on 2 cores, more than
the LoRA matmuls it feeds). Here one int64 draw holds four 15-bit uniforms (bits 0–14, 16–30, 32–46, 48–62 of a
uniform integer in [0, 2^63)), so a mask costs a quarter of the draws. The drop probability is p rounded to a
multiple of 2^-15 (0.05 → 0.049988) and the rescaling uses that same p', so E[dropout(x)] = x (up to the rounding
of 1 / (1 − p') in x's dtype, as for `nn.Dropout`). On other devices, and where p' would be 0 or 1 (0 < p ≤ 2^-16
or 1 − 2^-16 ≤ p < 1, as round() takes halves to even), it is `torch.nn.functional.dropout`; a module drawing
from a stream of its own draws there one float per element at p itself (`keep_mask`). Under torch.compile on the
CPU the mask is drawn by an operator the compiler leaves whole (`compiled_keep_mask`). Masks come from torch's default
generator, so `torch.manual_seed` and the Trainer's RNG checkpointing make them reproducible, unless the module
draws from a stream of its own (`Dropout.use_stream`: a multi-job job's masks, `ops.job_streams`).
"""

from __future__ import annotations

import itertools
import weakref
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

_BITS = 15
_LEVELS = 1 << _BITS


def _threshold(p: float) -> int:
    return round(p * _LEVELS)


def _off_grid(p: float) -> bool:
    """0 < p < 1 but p' = round(p · 2^15) / 2^15 is 0 or 1 (p ≤ 2^-16 or p ≥ 1 − 2^-16: halves round to even)."""
    return 0 < p < 1 and _threshold(p) in (0, _LEVELS)


def keep_mask(shape: torch.Size | tuple[int, ...], p: float, device: torch.device | str = "cpu",
              generator: torch.Generator | None = None) -> torch.Tensor:
    """Boolean mask of `shape`, each entry True (kept) with probability 1 − p' (module docstring), drawn from
    `generator` (None: torch's default one)."""
    on = torch.device(device) if generator is None else generator.device  # (a stream lives on one device)
    if p >= 1:  # nothing kept (the 16-bit draws compared with 2^15 kept everything before 2026-12-08; the output
        return torch.zeros(shape, dtype=torch.bool, device=device)  # was right all the same: scale 0)
    if _off_grid(p):  # p' would be 0 or 1: one float draw per element, at p itself
        return torch.rand(shape, generator=generator, device=on).to(device) >= p
    count = 1
    for size in shape:
        count *= size
    draws = torch.empty((count + 3) // 4, dtype=torch.int64, device=on).random_(generator=generator).to(device)
    uniform15 = draws.view(torch.int16)[:count] & (_LEVELS - 1)  # the low 15 bits of each 16-bit quarter
    return (uniform15 >= _threshold(p)).view(shape)


# Generators of their own, registered under an int id that modules keep and operators take as a plain argument
# (torch.compile cannot pass a generator to an operator): a multi-job job's stream (`ops.job_streams`).
_STREAMS: dict[int, torch.Generator] = {}
_OWNERS: dict[int, weakref.ref] = {}  # stream -> the object (a model) that registered it, if one was given
_IDS = itertools.count(1)
# checkpointed forwards now running (`ops.stream_checkpoint.stream_replay_contexts`): {stream: its state before its
# first draw in the region}, so that the region's recomputation in the backward draws the same masks again
_RECORDERS: list[dict[int, torch.Tensor]] = []


def register_stream(generator: torch.Generator, reuse: int | None = None, owner: object | None = None) -> int:
    """Register `generator`; returns its id (never 0: 0 stands for torch's default generator).

    With an `owner` (a model), the stream is its: dropped from the registry when the owner is garbage collected,
    and `reuse`, the id of a stream this owner registered before, gives `generator` that id's place, so the modules
    and compiled graphs that hold the id (a constant to Dynamo) stay as they are. An id the owner did not register
    (a copied or unpickled model's) is not reused: the generator gets a new id.
    """
    ref = _OWNERS.get(reuse) if reuse is not None else None
    if owner is None or ref is None or ref() is not owner:
        reuse = next(_IDS)
        if owner is not None:
            _OWNERS[reuse] = weakref.ref(owner)
            weakref.finalize(owner, _forget, reuse)
    _STREAMS[reuse] = generator
    return reuse


def _forget(stream: int) -> None:
    _STREAMS.pop(stream, None)
    _OWNERS.pop(stream, None)


def stream_generator(stream: int) -> torch.Generator | None:
    """The generator registered as `stream`, or None (torch's default) for 0."""
    if not stream:
        return None
    if stream not in _STREAMS:
        raise KeyError(f"random stream {stream} is not registered (register_stream)")
    generator = _STREAMS[stream]
    for states in _RECORDERS:  # called before each draw: a checkpointed region keeps the state it began with
        if stream not in states:
            states[stream] = generator.get_state()
    return generator


class StreamLayout(NamedTuple):
    """Where a stream's job lies in the padded batch now trained (`set_stream_widths`, read by `stream_draw`)."""

    step: int  # the batch's padded width T
    own: int  # w: the last real token of the job's rows, + 1 (of its whole micro-batch's rows, for a piece)
    rows: torch.Tensor | None = None  # a piece of a micro-batch: its rows' indices in the micro-batch (1-D)
    of_rows: int = 0  # a piece: the micro-batch's row count


# per stream, its `StreamLayout` in the batch now trained: set by `MultiJobModel` for each padded mixed step
_WIDTHS: dict[int, StreamLayout] = {}


def set_stream_widths(widths: dict[int, tuple]) -> None:
    """{stream: `StreamLayout` (or its fields)} for the batch now being trained (replacing the last batch's): a
    stream whose job's rows end before the batch's padded width draws over its own width only, and a stream whose
    job trains a piece of a micro-batch draws as for the whole micro-batch (`stream_draw`). They stay set after the
    forward, for activation checkpointing's recomputation in the backward."""
    _WIDTHS.clear()
    _WIDTHS.update({stream: StreamLayout(*layout) for stream, layout in widths.items()})


def stream_draw(shape: tuple[int, ...], stream: int, draw, fill) -> torch.Tensor:
    """`draw(shape)`, where a multi-job step's rows are padded wider than the stream's job's own rows
    (`set_stream_widths`) drawn over the job's own width only and filled with `fill` beyond it:

        (n, T, ...) rows, or (n·T, ...) tokens of n rows:   draw((n, w, ...)) in [:, :w], `fill` in [:, w:]

    where T is the batch's padded width and w the last real token of the job's rows (+ 1). So a job draws the same
    numbers whatever the length of the rows beside it in a step (the positions beyond w are padding, whose values
    no real token sees). Where the job's n rows are rows r_1 < … < r_n of a micro-batch of m rows cut into several
    steps (`StreamLayout.rows`; its stream restarts from the micro-batch's state for each piece), w is the whole
    micro-batch's and

        draw((m, w, ...))[[r_1, …, r_n], :T]   (then `fill` in [:, w:] where w < T)

    so each row draws the numbers it draws when the micro-batch runs whole, whichever steps its rows are cut into."""
    layout = _WIDTHS.get(stream) if stream else None
    if layout is None or (layout.rows is None and layout.own >= layout.step):
        return draw(tuple(shape))
    step, own, rows, of_rows = layout
    if len(shape) >= 3 and shape[1] == step:
        n, rest = shape[0], tuple(shape[2:])
    elif len(shape) == 2 and shape[0] % step == 0:
        n, rest = shape[0] // step, tuple(shape[1:])
    else:  # not laid out by rows of this batch
        return draw(tuple(shape))
    if rows is None:
        drawn = draw((n, own, *rest))
    elif n == len(rows):
        drawn = draw((of_rows, own, *rest))
        drawn = drawn.index_select(0, rows.to(drawn.device))[:, :step]
    else:
        raise RuntimeError(f"stream {stream} draws for {n} rows but its job's piece of a micro-batch has {len(rows)}")
    if own >= step:
        return drawn.contiguous().view(shape)  # (a slice [:, :step] of a piece's draw is not)
    out = torch.full((n, step, *rest), fill, dtype=drawn.dtype, device=drawn.device)
    out[:, :own] = drawn
    return out.view(shape)


def stream_keep_mask(shape: tuple[int, ...], p: float, device: torch.device | str, stream: int) -> torch.Tensor:
    """`keep_mask` drawn from `stream` (0: torch's default generator) over the job's own width (`stream_draw`)."""
    if not stream:
        return keep_mask(shape, p, device)
    return stream_draw(shape, stream, lambda s: keep_mask(s, p, device, stream_generator(stream)), True)


def dropout_scale(p: float) -> float:
    """1 / (1 − p') of `ops.dropout` (1 where nothing is dropped, 0 where everything is; 1 / (1 − p) where p'
    would be 0 or 1 but p is not, as `keep_mask` then draws at p)."""
    if _off_grid(p):
        return 1.0 / (1.0 - p)
    threshold = _threshold(p)
    if threshold == 0:
        return 1.0
    return 0.0 if threshold == _LEVELS else _LEVELS / (_LEVELS - threshold)


# Seeded draws from a job's own generator (and, per job, the rows' jobs read on the host): a CUDA graph
# (`mode="reduce-overhead"`) can capture neither, so Inductor splits the graph around these operators
# (`cudagraph_unsafe`; found by a review of the CUDA-only paths, 2026-12-07, before any GPU ran them).
GENERATOR_OP_TAGS = (torch.Tag.nondeterministic_seeded, torch.Tag.cudagraph_unsafe)


@torch.library.custom_op("peft_mole::keep_mask", mutates_args=(), tags=GENERATOR_OP_TAGS)
def compiled_keep_mask(like: torch.Tensor, p: float, call_site: int, stream: int = 0) -> torch.Tensor:
    """`keep_mask` of like's shape as an operator that torch.compile calls as it is: the compiler's own random
    kernels draw one Philox number per element, 21 ms fwd + bwd for a (1024, 1376) dropout on 2 CPU threads
    against this mask's 4 ms. It draws from torch's default generator, as eagerly. Tagged as seeded randomness,
    so the partitioner does not recompute it for the backward. The compiler's common-subexpression pass merges
    calls with equal arguments all the same (it exempts only torch's own random operators), so each caller passes
    its own `call_site`: q, k and v dropping out the same input keep three masks, as eagerly. `stream`: the id of
    a registered generator (`ops.job_streams`), 0 for the default one."""
    return stream_keep_mask(like.shape, p, like.device, stream)


@compiled_keep_mask.register_fake
def _(like: torch.Tensor, p: float, call_site: int, stream: int = 0) -> torch.Tensor:
    return torch.empty(like.shape, dtype=torch.bool, device=like.device)


_CALL_SITES = itertools.count(1)


class _MaskAndScale(torch.autograd.Function):
    """y = where(keep, x, 0) · c and dx = where(keep, dy, 0) · c, one pass each (plain autograd of x * keep * c
    converts the boolean mask to x's dtype in both directions; tests/ops/test_dropout.py checks the two agree)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, keep: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return torch.where(keep, x, 0).mul_(scale)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (keep,) = ctx.saved_tensors
        return torch.where(keep, grad, 0).mul_(ctx.scale), None, None


def dropout(x: torch.Tensor, p: float, training: bool = True, call_site: int = 0, stream: int = 0) -> torch.Tensor:
    """Inverted dropout of x with drop probability p (rounded to a multiple of 2^-15 on CPU, see above).

    `call_site`: under torch.compile, calls on the same tensor with the same `call_site` share one mask (see
    `compiled_keep_mask`); each `Dropout` module has its own. `stream`: a registered generator to draw from
    (`ops.job_streams`; on every device the masks of this module, 2^-15 steps included), 0 for torch's default."""
    threshold = _threshold(p)
    if not training or p == 0:
        return x
    if not stream and (x.device.type != "cpu" or threshold in (0, _LEVELS)):
        return F.dropout(x, p, training=True)
    scale = dropout_scale(p)
    if torch.compiler.is_compiling():  # the mask as an opaque operator, the rest for the compiler to fuse
        return torch.where(compiled_keep_mask(x.detach(), p, call_site, stream), x, 0) * scale
    return _MaskAndScale.apply(x, stream_keep_mask(x.shape, p, x.device, stream), scale)


class Dropout(nn.Dropout):
    """`nn.Dropout` with the cheaper CPU masks of `dropout` (same `p`, same module interface and state;
    `inplace=True` keeps torch's in-place dropout)."""

    def __init__(self, p: float = 0.5, inplace: bool = False) -> None:
        super().__init__(p, inplace)
        self.call_site = next(_CALL_SITES)  # its own masks under torch.compile (`compiled_keep_mask`)
        self.stream = 0  # torch's default generator; `use_stream` gives it one of its own

    def use_stream(self, stream: int) -> None:
        """Draw the masks from registered generator `stream` (`register_stream`; 0: the default)."""
        self.stream = stream

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.inplace and not self.stream:
            return F.dropout(x, self.p, self.training, inplace=True)
        return dropout(x, self.p, self.training, self.call_site, self.stream)

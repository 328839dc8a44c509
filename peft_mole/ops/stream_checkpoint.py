"""Activation checkpointing with the jobs' random streams (`ops.job_streams`).

A checkpointed layer runs its forward again in the backward. torch restores its default generator for that
(`preserve_rng_state`) but knows nothing of the jobs' streams: the recomputation would draw other masks than the
forward did (gradients of another function than the loss) and move the streams on. So every checkpointed layer of
a multi-job model runs with `stream_replay_contexts` (`replay_streams_in_checkpoints`): its forward notes each
stream's state before the stream's first draw in the layer (`ops.dropout.stream_generator`), and its recomputation
draws from those states, with the batch's widths of that forward (`ops.dropout.stream_draw`) and the rows the
forward set in the tuners' contexts (`ForwardContext.rows`), then puts the streams and rows back where they were.
Compiled layers cannot run that inside their backward: they checkpoint selectively and keep
the drawn values (`compiled_stream_contexts`).
"""

from __future__ import annotations

import contextlib
import functools

import torch
from torch import nn

import peft_mole.ops.job_streams  # noqa: F401  (registers the per-job drawing operators the policy names)
from peft_mole.forward_context import LIVE_CONTEXTS
from peft_mole.ops.dropout import _RECORDERS, _STREAMS, _WIDTHS, set_stream_widths


def stream_replay_contexts(user_context_fn=None) -> tuple:
    """`context_fn` for `torch.utils.checkpoint.checkpoint` (non-reentrant) that makes a checkpointed region's
    recomputation draw the same stream masks as its forward (module docstring); `user_context_fn`'s contexts, if
    given, are entered too. Returns (forward context, recompute context)."""
    recorded: dict[int, torch.Tensor] = {}  # stream -> its state before its first draw in the forward
    widths = dict(_WIDTHS)  # the batch this forward trains (`stream_draw`), which the recomputation must see again
    # and its rows' adapters, jobs, segments and token mask (before 2026-12-08 a forward between this one and its
    # backward left its rows in the tuners' contexts, and the recomputation ran them: gradients off by 1.8e-3)
    rows = [(context, context.rows()) for context in list(LIVE_CONTEXTS)]

    @contextlib.contextmanager
    def forward():
        _RECORDERS.append(recorded)
        try:
            yield
        finally:  # by identity: an enclosing region's record may be equal to this one (both empty, say)
            del _RECORDERS[next(i for i, r in enumerate(_RECORDERS) if r is recorded)]

    @contextlib.contextmanager
    def recompute():
        now, widths_now = {stream: _STREAMS[stream].get_state() for stream in recorded}, dict(_WIDTHS)
        rows_now = [(context, context.rows()) for context, _ in rows]
        for stream, state in recorded.items():
            _STREAMS[stream].set_state(state)
        set_stream_widths(widths)
        for context, values in rows:
            context.set_rows(values)
        try:
            yield
        finally:
            for stream, state in now.items():
                _STREAMS[stream].set_state(state)
            set_stream_widths(widths_now)
            for context, values in rows_now:
                context.set_rows(values)

    if user_context_fn is None:
        return forward(), recompute()
    user_forward, user_recompute = user_context_fn()
    return _both(user_forward, forward()), _both(user_recompute, recompute())


@contextlib.contextmanager
def _both(first, second):
    with first, second:
        yield


def replay_streams_in_checkpoints(model: nn.Module) -> int:
    """Make every checkpointed layer of `model` (transformers' `_gradient_checkpointing_func`, set by
    `gradient_checkpointing_enable`) checkpoint with `stream_replay_contexts`, the caller's own `context_fn`
    kept. Under torch.compile the replay cannot run inside the compiled backward, so the layers checkpoint
    selectively there (`compiled_stream_contexts`): the drawn masks are kept, one byte per element, as an
    uncheckpointed layer keeps them. Returns how many layers it wrapped; call it again after enabling checkpointing
    anew."""
    wrapped = 0
    for module in model.modules():
        func = getattr(module, "_gradient_checkpointing_func", None)
        if func is None or getattr(func, "replays_streams", False):
            continue
        keywords = getattr(func, "keywords", None) or {}
        if keywords.get("use_reentrant") is not False:
            continue  # reentrant checkpointing (torch's default) takes no context_fn; MultiJobTrainer refuses it
        module._gradient_checkpointing_func = _replaying(func, keywords.get("context_fn"))
        wrapped += 1
    return wrapped


def _keep_draws(ctx, op, *args, **kwargs):
    """Selective-checkpointing policy of a compiled checkpointed layer: keep the masks and jitter drawn from the jobs'
    streams (a recomputation would draw new ones), recompute everything else, as plain checkpointing does."""
    from torch.utils.checkpoint import CheckpointPolicy

    if op in (torch.ops.peft_mole.per_job_keep_mask.default, torch.ops.peft_mole.per_job_jitter.default,
              torch.ops.peft_mole.keep_mask.default):
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def compiled_stream_contexts():
    """`context_fn` of a checkpointed layer under torch.compile: selective checkpointing (`_keep_draws`), as the
    compiled graph's backward would otherwise run the drawing operators again, past the stream's forward state.
    Where the layer breaks the graph (a block that runs eagerly: DynMoLE jobs, DoRA experts) it checkpoints
    eagerly, and its eager draws (aten's in-place `random_`, which selective checkpointing cannot keep) are
    replayed (`stream_replay_contexts`)."""
    from torch.utils.checkpoint import create_selective_checkpoint_contexts

    if not torch.compiler.is_compiling():  # the layer broke the graph (an eager block) and checkpoints eagerly
        return stream_replay_contexts()
    return create_selective_checkpoint_contexts(_keep_draws)


def _replaying(func, user_context_fn):
    def checkpoint_replaying_streams(function, *args, **kwargs):
        if torch.compiler.is_compiling():  # a caller's own context_fn must be selective checkpointing: kept as is
            if user_context_fn is None and "context_fn" not in kwargs:
                kwargs["context_fn"] = compiled_stream_contexts
            return func(function, *args, **kwargs)
        context_fn = functools.partial(stream_replay_contexts, kwargs.pop("context_fn", user_context_fn))
        return func(function, *args, context_fn=context_fn, **kwargs)

    checkpoint_replaying_streams.replays_streams = True
    return checkpoint_replaying_streams

"""`sdpa_packed` inside `torch.compile`: the chunked attention of a packed row as one custom operator.

A compiled graph cannot read a row's sequence bounds on the host without breaking at every layer. So under
`torch.compile`, `packed_sdpa_attention_forward` calls `torch.ops.peft_mole.packed_sdpa`, which Dynamo and
AOTAutograd treat as opaque: its fake implementation gives the output's shape, and at run time it reads the bounds
and runs the chunks eagerly (`packed_attention.chunk_plan`), the same computation as the eager attention.

Its backward is a second operator, `peft_mole.packed_sdpa_backward`, which runs the chunks' forward again under
`torch.func.vjp` and returns the query, key and value gradients: the attention's forward is computed twice per
step, once more than an eager step (recomputing keeps the operator independent of each device's SDPA kernels and
the softmax statistics they keep). Nothing of size (T × T) is saved: the row's mask is an input, as it is to the
masked attention it replaces. Both operators read the bounds on the host, so they are tagged `cudagraph_unsafe`
(a CUDA graph, `mode="reduce-overhead"`, is split around them). Under autocast the caller casts the inputs as
autocast casts SDPA's; the operators run with autocast off, so the forward and its recompute agree.

Tested against the eager attention's values and gradients (`tests/test_packed_attention.py`, with
`torch.library.opcheck` and `torch.autograd.gradcheck`).
"""

from __future__ import annotations

from types import SimpleNamespace

import torch

from peft_mole import packed_attention


def _chunks(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, ends: torch.Tensor,
            mask: torch.Tensor | None, scaling: float, groups: int, from_positions: bool,
            window: int | None) -> torch.Tensor:
    """(1, T, heads, d): the packed row's attention, chunk by chunk where it is a packed row of causal sequences,
    else SDPA over the row under `mask`."""
    module = SimpleNamespace(is_causal=True, num_key_value_groups=groups)
    kwargs = {"position_ids" if from_positions else "cu_seq_lens_q": ends, "sliding_window": window}
    with torch.autocast(query.device.type, enabled=False):  # (the caller cast the inputs: forward = recompute)
        plan = packed_attention.chunk_plan(module, query, key, mask, kwargs)
        if plan is None:
            return packed_attention.sdpa_attention_forward(module, query, key, value, mask, scaling=scaling)[0]
        return packed_attention.run_plan(module, query, key, value, plan, 0.0, scaling, {})


@torch.library.custom_op("peft_mole::packed_sdpa", mutates_args=(), tags=(torch.Tag.cudagraph_unsafe,))
def packed_sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, ends: torch.Tensor,
                mask: torch.Tensor | None, scaling: float, groups: int, from_positions: bool,
                window: int | None) -> torch.Tensor:
    """query (1, heads, T, d), key and value (1, kv heads, T, d); `ends`: `cu_seq_lens_q`, or the row's position
    ids (`from_positions`); `groups`: query heads per key head. Returns (1, T, heads, d)."""
    return _chunks(query, key, value, ends, mask, scaling, groups, from_positions, window).contiguous()


@packed_sdpa.register_fake
def _packed_sdpa_fake(query, key, value, ends, mask, scaling, groups, from_positions, window):
    return query.new_empty(query.shape[0], query.shape[2], query.shape[1], value.shape[3])


@torch.library.custom_op("peft_mole::packed_sdpa_backward", mutates_args=(), tags=(torch.Tag.cudagraph_unsafe,))
def packed_sdpa_backward(grad: torch.Tensor, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         ends: torch.Tensor, mask: torch.Tensor | None, scaling: float, groups: int,
                         from_positions: bool, window: int | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gradients of `packed_sdpa` for the query, key and value: its chunks run again under `torch.func.vjp`
    (an operator's body runs below autograd, where `torch.autograd.grad` would see no graph)."""
    def attention(q, k, v):
        return _chunks(q, k, v, ends, mask, scaling, groups, from_positions, window)

    _, pullback = torch.func.vjp(attention, query, key, value)
    # in the inputs' layouts (strides), as the fake implementation gives them to the traced graph
    return tuple(torch.empty_like(x).copy_(g) for x, g in zip((query, key, value), pullback(grad), strict=True))


@packed_sdpa_backward.register_fake
def _packed_sdpa_backward_fake(grad, query, key, value, ends, mask, scaling, groups, from_positions, window):
    return torch.empty_like(query), torch.empty_like(key), torch.empty_like(value)


def _setup_context(ctx, inputs, output) -> None:
    query, key, value, ends, mask, *ctx.settings = inputs
    ctx.save_for_backward(query, key, value, ends, mask)


def _backward(ctx, grad):
    query, key, value, ends, mask = ctx.saved_tensors
    grads = packed_sdpa_backward(grad.contiguous(), query, key, value, ends, mask, *ctx.settings)
    return (*grads, None, None, None, None, None, None)


packed_sdpa.register_autograd(_backward, setup_context=_setup_context)

"""The chunked attention of a packed row as one custom operator, `peft_mole::packed_sdpa`, that keeps the softmax
statistics for its backward.

**Why an operator.** A compiled graph cannot read a row's sequence bounds on the host without breaking at every
layer. So under `torch.compile`, `packed_sdpa_attention_forward` calls `torch.ops.peft_mole.packed_sdpa`, which
Dynamo and AOTAutograd treat as opaque: its fake implementation gives the output's shape, and at run time it reads
the bounds (`packed_attention.chunk_plan`) and runs the chunks. Eager steps on the CPU call it too.

**The CPU kernel, with its statistics kept.** On the CPU, SDPA runs these chunks with its flash kernel
(`aten::_scaled_dot_product_flash_attention_for_cpu`, the one `torch.nn.functional.scaled_dot_product_attention`
picks for them), which returns the output O and, per query i, the log-sum-exp of its scores, lse_i = log Σ_j
exp(s·q_i·k_j) over the keys the mask allows (s: the scale). The operator calls that kernel per chunk, with the mask
turned additive (0 where allowed, −inf elsewhere) as SDPA turns a boolean mask, and with the keys and values as
transformers' SDPA call gives them (grouped-query attention: grouped for a causal chunk without a mask, as
`enable_gqa=True`; repeated per query head, as `repeat_kv`, under a mask). Its backward,
`peft_mole::packed_sdpa_backward`, gives each chunk's O, lse and output gradient to the kernel's backward
(`..._for_cpu_backward`), which rebuilds the softmax P = exp(s·QKᵀ − lse) and computes dV = Pᵀ dO, dP = dO Vᵀ, dS =
P ⊙ (dP − rowsum(dO ⊙ O)), dQ = s·dS K, dK = s·dSᵀ Q. So nothing is computed twice, and the numbers are the eager
SDPA chunks' bit for bit (their autograd calls the same two kernels, and sums a repeated key head's gradient over
its query heads as here). Where the kernel does not apply (a value head size other than the query's, as in
DeepSeek's latent attention, or rows that are not contiguous: `takes_kernel`) the operator runs transformers' SDPA,
as below. Measured in steps (`python bench/packed_attention.py --compile`): eager 0.93–1.00×, compiled 0.91–0.96×
the step without the statistics.

**Elsewhere** (CUDA, other devices, and a call that is not a packed row, where the plan is None), the operator
runs the chunks through transformers' `sdpa_attention_forward`, and its backward runs them again under
`torch.func.vjp` (an operator's body runs below autograd, where `torch.autograd.grad` would see no graph): the
attention's forward is computed twice per step, which keeps it independent of each device's kernels and their
statistics. Eager steps there use the chunks under autograd (`packed_attention.run_plan`) instead.

Nothing of size (T × T) is saved: the row's mask is an input, as it is to the masked attention it replaces. Both
operators read the bounds on the host, so they are tagged `cudagraph_unsafe` (a CUDA graph, `mode="reduce-overhead"`,
is split around them). Under autocast the caller casts the inputs as autocast casts SDPA's; the operators run with
autocast off. Tested against the eager attention's values and gradients (`tests/test_packed_attention.py`, with
`torch.library.opcheck` and `torch.autograd.gradcheck`).
"""

from __future__ import annotations

from types import SimpleNamespace

import torch

from peft_mole import packed_attention

FLASH_FORWARD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
FLASH_BACKWARD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


def keeps_statistics(device: torch.device) -> bool:
    """Whether the operator calls SDPA's kernel with its statistics on this device (the CPU's flash kernel), rather
    than recomputing the forward in its backward."""
    return device.type == "cpu"


def takes_kernel(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> bool:
    """Whether the operator runs SDPA's CPU kernel with its statistics on these inputs: on the CPU
    (`keeps_statistics`), with one head size for the query, key and value (not so in multi-head latent attention,
    DeepSeek's, where SDPA takes its math kernel) and each row of a head contiguous, as SDPA requires before it picks
    that kernel. Else the operator runs transformers' SDPA and recomputes in its backward."""
    return (keeps_statistics(query.device) and query.shape[-1] == key.shape[-1] == value.shape[-1]
            and query.stride(-1) == key.stride(-1) == value.stride(-1) == 1)


def _takes_grouped_keys() -> bool:
    """Whether this torch's CPU kernel takes fewer key heads than query heads (grouped-query attention, as SDPA's
    `enable_gqa=True` gives them to it; torch 2.13 does)."""
    try:
        FLASH_FORWARD(torch.zeros(1, 2, 2, 8), torch.zeros(1, 1, 2, 8), torch.zeros(1, 1, 2, 8), 0.0, True)
    except RuntimeError:
        return False
    return True


GROUPED_KEYS = _takes_grouped_keys()


def _plan(query: torch.Tensor, key: torch.Tensor, ends: torch.Tensor, mask: torch.Tensor | None, groups: int,
          from_positions: bool, window: int | None) -> tuple:
    """(a stand-in for the attention module, the call's kwargs, the chunk plan or None): as the eager call makes it
    (`packed_attention.chunk_plan`; cached, so the backward finds the forward's plan)."""
    module = SimpleNamespace(is_causal=True, num_key_value_groups=groups)
    kwargs = {"position_ids" if from_positions else "cu_seq_lens_q": ends, "sliding_window": window}
    return module, kwargs, packed_attention.chunk_plan(module, query, key, mask, kwargs)


def _additive(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """A boolean mask as SDPA gives it to its kernels: 0 where a key is seen, −inf where it is not."""
    return None if mask is None else torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(
        ~mask, float("-inf"))


def _key_heads(tensor: torch.Tensor, groups: int, mask: torch.Tensor | None) -> torch.Tensor:
    """A chunk's keys or values (1, kv heads, L, d) as transformers' SDPA call gives them to the kernel: as they are
    for a causal chunk without a mask (`enable_gqa=True`), else each key head repeated for its `groups` query heads
    (`repeat_kv`; also where this torch's kernel takes no grouped keys)."""
    grouped = mask is None and GROUPED_KEYS
    return tensor if groups == 1 or grouped else tensor.repeat_interleave(groups, dim=1)


def _statistics_forward(query, key, value, plan, scaling: float, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(1, T, heads, d) and the log-sum-exp (1, heads, T): SDPA's CPU kernel over each chunk."""
    outputs, statistics = [], []
    for start, end, mask in plan:
        output, lse = FLASH_FORWARD(query[:, :, start:end], _key_heads(key[:, :, start:end], groups, mask),
                                    _key_heads(value[:, :, start:end], groups, mask), 0.0, mask is None,
                                    attn_mask=_additive(mask, query.dtype), scale=scaling)
        outputs.append(output.transpose(1, 2))
        statistics.append(lse)
    return torch.cat(outputs, dim=1), torch.cat(statistics, dim=2)


def _statistics_backward(grad, query, key, value, output, lse, plan, scaling: float,
                         groups: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The query, key and value gradients from each chunk's kept output and log-sum-exp (the kernel's backward), in
    the inputs' layouts (strides), as the fake implementation gives them to the traced graph."""
    grads = tuple(torch.empty_like(x) for x in (query, key, value))
    for start, end, mask in plan:
        chunk = slice(start, end)
        keys, values = (_key_heads(x[:, :, chunk], groups, mask) for x in (key, value))
        dq, dk, dv = FLASH_BACKWARD(grad[:, chunk].transpose(1, 2), query[:, :, chunk], keys, values,
                                    output[:, chunk].transpose(1, 2), lse[:, :, chunk], 0.0, mask is None,
                                    attn_mask=_additive(mask, query.dtype), scale=scaling)
        if dk.shape[1] != key.shape[1]:  # repeated keys: a key head's gradient sums its query heads' (as repeat_kv's)
            dk, dv = (g.unflatten(1, (-1, groups)).sum(2) for g in (dk, dv))
        for whole, part in zip(grads, (dq, dk, dv), strict=True):
            whole[:, :, chunk] = part
    return grads


def _chunks(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, ends: torch.Tensor,
            mask: torch.Tensor | None, scaling: float, groups: int, from_positions: bool,
            window: int | None) -> torch.Tensor:
    """(1, T, heads, d) by transformers' SDPA: chunk by chunk where it is a packed row of causal sequences, else
    over the row under `mask` (the path that recomputes in its backward)."""
    module, kwargs, plan = _plan(query, key, ends, mask, groups, from_positions, window)
    if plan is None:
        return packed_attention.sdpa_attention_forward(module, query, key, value, mask, scaling=scaling)[0]
    return packed_attention.run_plan(module, query, key, value, plan, 0.0, scaling, {})


def _statistics_dtype(query: torch.Tensor) -> torch.dtype:
    return torch.float64 if query.dtype == torch.float64 else torch.float32  # (the kernel's accumulation type)


@torch.library.custom_op("peft_mole::packed_sdpa", mutates_args=(), tags=(torch.Tag.cudagraph_unsafe,))
def packed_sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, ends: torch.Tensor,
                mask: torch.Tensor | None, scaling: float, groups: int, from_positions: bool,
                window: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """query (1, heads, T, d), key and value (1, kv heads, T, d); `ends`: `cu_seq_lens_q`, or the row's position
    ids (`from_positions`); `groups`: query heads per key head. Returns the output (1, T, heads, d) and the softmax's
    log-sum-exp per head and query (1, heads, T), float32 (float64 for float64 inputs), computed where the
    operator runs SDPA's CPU kernel (`takes_kernel`) and zeros elsewhere."""
    with torch.autocast(query.device.type, enabled=False):  # (the caller cast the inputs: forward = recompute)
        _, _, plan = _plan(query, key, ends, mask, groups, from_positions, window)
        if plan is not None and takes_kernel(query, key, value):
            return _statistics_forward(query, key, value, plan, scaling, groups)
        output = _chunks(query, key, value, ends, mask, scaling, groups, from_positions, window).contiguous()
        return output, query.new_zeros(query.shape[:3], dtype=_statistics_dtype(query))


@packed_sdpa.register_fake
def _packed_sdpa_fake(query, key, value, ends, mask, scaling, groups, from_positions, window):
    output = query.new_empty(query.shape[0], query.shape[2], query.shape[1], value.shape[3])
    return output, query.new_empty(query.shape[:3], dtype=_statistics_dtype(query))


@torch.library.custom_op("peft_mole::packed_sdpa_backward", mutates_args=(), tags=(torch.Tag.cudagraph_unsafe,))
def packed_sdpa_backward(grad: torch.Tensor, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         output: torch.Tensor, lse: torch.Tensor, ends: torch.Tensor, mask: torch.Tensor | None,
                         scaling: float, groups: int, from_positions: bool,
                         window: int | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gradients of `packed_sdpa`'s output for the query, key and value: from the kept statistics where the
    forward kept them, else by running the chunks again under `torch.func.vjp`."""
    with torch.autocast(query.device.type, enabled=False):
        _, _, plan = _plan(query, key, ends, mask, groups, from_positions, window)
        if plan is not None and takes_kernel(query, key, value):  # (the forward's inputs: its branch)
            return _statistics_backward(grad, query, key, value, output, lse, plan, scaling, groups)

        def attention(q, k, v):
            return _chunks(q, k, v, ends, mask, scaling, groups, from_positions, window)

        _, pullback = torch.func.vjp(attention, query, key, value)
        # in the inputs' layouts (strides), as the fake implementation gives them to the traced graph
        return tuple(torch.empty_like(x).copy_(g) for x, g in zip((query, key, value), pullback(grad), strict=True))


@packed_sdpa_backward.register_fake
def _packed_sdpa_backward_fake(grad, query, key, value, output, lse, ends, mask, scaling, groups, from_positions,
                               window):
    return torch.empty_like(query), torch.empty_like(key), torch.empty_like(value)


def _setup_context(ctx, inputs, output) -> None:
    query, key, value, ends, mask, *ctx.settings = inputs
    ctx.save_for_backward(query, key, value, *output, ends, mask)
    ctx.mark_non_differentiable(output[1])  # (the statistics are kept for the backward, not a result)


def _backward(ctx, grad, _lse_grad):
    query, key, value, output, lse, ends, mask = ctx.saved_tensors
    grads = packed_sdpa_backward(grad.contiguous(), query, key, value, output, lse, ends, mask, *ctx.settings)
    return (*grads, None, None, None, None, None, None)


packed_sdpa.register_autograd(_backward, setup_context=_setup_context)

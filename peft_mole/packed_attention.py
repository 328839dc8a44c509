"""SDPA attention for packed rows that keeps each sequence to itself: `attn_implementation="sdpa_packed"`.

A padding-free batch (TRL's `padding_free=True`, or packing with the "bfd" strategies) is one row of T tokens made
of sequences of lengths L_1 … L_n. With `attn_implementation="sdpa"` transformers builds the row's block-diagonal
causal mask and SDPA scores every (query, key) pair of the row: T² pairs, where the sequences need Σ L_i²
(flash attention's varlen kernels do that, on a GPU with the `flash-attn` package only).

`sdpa_packed` runs transformers' own `sdpa_attention_forward` over chunks of consecutive whole sequences, each of at
most C = `CHUNK_TOKENS` tokens or one sequence longer than that. A chunk takes its diagonal block of the mask
transformers built for the row (a sliding window, chunked attention, padding, or spans that see ahead, as Gemma 3's
image tokens, stay), restricted to each sequence's own keys; a chunk of one sequence that is plainly causal runs
SDPA's causal kernel (`is_causal=True`, which skips the upper triangle). So at most Σ_chunks c² ≤ T·C + Σ_{L_i > C}
L_i² pairs are scored, in at most T/C + n calls. Each query attends to exactly the keys the row's block-diagonal
mask allows it, so the outputs are the masked row's, up to the rounding of a softmax over fewer (masked-out) terms.
Where transformers builds no block-diagonal mask (a forward that makes a cache: `use_cache` left on, which TRL and
Trainer turn off for training), `sdpa` lets the sequences attend to each other; `sdpa_packed` keeps them apart, as
flash attention's varlen kernels do.

The sequences are the batch's `cu_seq_lens_q` (TRL's padding-free collator and peft-mole's packed mixed steps pass
them, as flash attention takes them; a repeated bound, an empty sequence, is skipped), else where the `position_ids`
restart (as transformers finds packed sequences for its mask). Bounds that do not run from 0 to the row's end get
one chunk under the row's sequence mask (`sequence_mask`) where transformers built no mask. They are read from the
device once per step and mask (a plan per step, kept while its tensors live).
Everything else is `sdpa` itself, with its mask: several rows (padded batches), decoding and a prefill after cached
tokens (more keys than queries), a row of one sequence, a non-causal call (`is_causal=False`), a position bias, a
float mask, and a sliding window without a mask that is shorter than a sequence. transformers' `sdpa` mask is
registered for the name. Under `torch.compile` the chunks run inside one opaque operator (`packed_attention_op`), as
a graph cannot read the bounds on the host without a break per layer; where attention dropout is on, the compiled
step traces the masked row. On the CPU eager steps call the operator too: it keeps SDPA's softmax statistics for
its backward (0.6× the time of the chunks under autograd); elsewhere eager steps run the chunks under autograd.

Measured on the CPU (`python bench/packed_attention.py`; docs/multijob.md, "Padding-free steps").
"""

from __future__ import annotations

import logging
import weakref

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, causal_mask_function, sdpa_mask

logger = logging.getLogger(__name__)

PACKED_SDPA = "sdpa_packed"
CHUNK_TOKENS = 64  # C: on the CPU's kernel with kept statistics, within 9 % of the fastest over four length mixes
# (32–256 tried; 128, the best through transformers' SDPA calls, lost 27 % on 64 sequences of 16 tokens)

Plan = list[tuple[int, int, "torch.Tensor | None"]]  # per chunk: start, end, its mask (None: causal)
_PLANS: dict[tuple[int, int, int], tuple] = {}  # chunk plans by (sequences' tensor, mask, C): made once per step
_KEPT_PLANS = 8  # (a model of sliding and full layers has two masks per step)


def packed_row(module, query: torch.Tensor, key: torch.Tensor, attention_mask: torch.Tensor | None,
               kwargs: dict) -> tuple[torch.Tensor, bool] | None:
    """(the tensor that gives the sequences, whether it is `position_ids`) of a call that may be a packed row of
    causal sequences: one row, as many keys as queries, causal, no position bias, a boolean 4D mask or none, and
    `cu_seq_lens_q` or `position_ids`; else None (plain `sdpa`). The eager chunks and the compiled operator's call
    both start here."""
    if (query.shape[0] != 1 or key.shape[2] != query.shape[2] or kwargs.get("position_bias") is not None
            or kwargs.get("is_causal") is False or not getattr(module, "is_causal", True)):
        return None
    if attention_mask is not None and not (attention_mask.dtype == torch.bool and attention_mask.dim() == 4):
        return None  # a float (additive) mask: the masked row decides
    from_positions = kwargs.get("cu_seq_lens_q") is None
    source = kwargs.get("position_ids") if from_positions else kwargs["cu_seq_lens_q"]
    return None if source is None else (source, from_positions)


def whole_packed_row(module, query: torch.Tensor, key: torch.Tensor, attention_mask: torch.Tensor | None,
                     kwargs: dict) -> tuple[torch.Tensor, bool] | None:
    """`packed_row` of at least two tokens whose mask (if any) and positions cover the whole row: what the chunks
    and the traced row mask (`sequence_mask`) are made for."""
    tokens = query.shape[2]
    row = packed_row(module, query, key, attention_mask, kwargs) if tokens > 1 else None
    if row is None or (attention_mask is not None and tuple(attention_mask.shape[-2:]) != (tokens, tokens)):
        return None
    return None if row[1] and tuple(row[0].shape) != (1, tokens) else row


def chunk_plan(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
               attention_mask: torch.Tensor | None, kwargs: dict) -> Plan | None:
    """The chunks of a packed row, or None where `sdpa_packed` is plain `sdpa` (see the module's docstring). Made
    once per step and mask (every layer gets the same `cu_seq_lens_q` or `position_ids` and the same mask)."""
    tokens = query.shape[2]
    row = None if torch.compiler.is_compiling() else whole_packed_row(module, query, key, attention_mask, kwargs)
    if row is None:
        return None
    source, from_positions = row
    window = kwargs.get("sliding_window")
    plan_key = (id(source), id(attention_mask), CHUNK_TOKENS, window)
    kept = _PLANS.get(plan_key)
    if kept is not None and _same(kept[0], source) and _same(kept[1], attention_mask):
        return kept[2]
    for old_key, (source_kept, mask_kept, _) in list(_PLANS.items()):  # (a copy: other threads may add plans)
        if source_kept[0]() is None or (mask_kept is not None and mask_kept[0]() is None):
            _PLANS.pop(old_key, None)  # its step is over (its tensors are gone): its masks go before new ones come
    plan = _make_plan(source, attention_mask, tokens, window, from_positions, query.device)
    if not (source.is_inference() or (attention_mask is not None and attention_mask.is_inference())):
        _PLANS[plan_key] = (_reference(source), _reference(attention_mask), plan)
        while len(_PLANS) > _KEPT_PLANS:
            _PLANS.pop(next(iter(_PLANS)), None)
    return plan


def _reference(tensor: torch.Tensor | None) -> tuple | None:
    return None if tensor is None else (weakref.ref(tensor), tensor._version)


def _same(reference: tuple | None, tensor: torch.Tensor | None) -> bool:
    """Whether `tensor` is the one `_reference` noted, unchanged since (not modified in place)."""
    if reference is None or tensor is None:
        return reference is None and tensor is None
    return reference[0]() is tensor and reference[1] == tensor._version


def sequence_bounds(source: torch.Tensor, tokens: int, from_positions: bool) -> list[int]:
    """[0, end_1, …, T]: `cu_seq_lens_q` as a list, or, from `position_ids`, the ends of the runs of consecutive
    positions (a sequence starts where a position does not follow its predecessor's, as transformers finds packed
    sequences). A read from the device. An empty sequence (a bound repeated in `cu_seq_lens_q`, as transformers'
    `DataCollatorWithFlattening` writes for an empty example) is left out: it has no token to attend."""
    if not from_positions:
        ends = [int(end) for end in source.tolist()]
        return [end for i, end in enumerate(ends) if i == 0 or end != ends[i - 1]]
    row = source[0]
    starts = torch.nonzero(row[1:] != row[:-1] + 1).flatten() + 1
    return [0, *starts.tolist(), tokens]


def _make_plan(source: torch.Tensor, attention_mask: torch.Tensor | None, tokens: int, window: int | None,
               from_positions: bool, device: torch.device) -> Plan | None:
    bounds = sequence_bounds(source, tokens, from_positions)
    if bounds[0] != 0 or bounds[-1] != tokens or any(
            end <= start for start, end in zip(bounds[:-1], bounds[1:], strict=True)):
        # bounds that do not describe this row. With the row's mask, the masked row decides; without one (the lean
        # mask, `packed_sdpa_mask`, built none for this row: it relies on the plan), plain causal SDPA would let the
        # sequences attend to each other: one chunk under the row's sequence mask instead, as a compiled step traces
        return None if attention_mask is not None else [
            (0, tokens, sequence_mask(source, from_positions, tokens, None, window, device))]
    if len(bounds) < 3:
        return None  # one sequence: plain causal SDPA
    longest = max(end - start for start, end in zip(bounds[:-1], bounds[1:], strict=True))
    if attention_mask is None and window is not None and longest > window:
        return None  # (a key is seen while q − k < window: all of a sequence where L ≤ window)
    plan: Plan = []
    for chunk in chunk_bounds(bounds, CHUNK_TOKENS):
        start, end = chunk[0], chunk[-1]
        if len(chunk) == 2 and attention_mask is None:
            plan.append((start, end, None))  # one sequence: causal (SDPA's causal kernel skips the upper triangle)
            continue
        blocks = [torch.ones(b - a, b - a, dtype=torch.bool, device=device)
                  for a, b in zip(chunk[:-1], chunk[1:], strict=True)]
        if attention_mask is None:  # several sequences, each causal
            mask = torch.block_diag(*[block.tril_() for block in blocks])[None, None]
        else:  # the row's mask within each sequence: its causality, window, padding, or spans that see ahead
            mask = attention_mask[..., start:end, start:end] & torch.block_diag(*blocks)[None, None]
            causal = torch.ones(end - start, end - start, dtype=torch.bool, device=device).tril_()
            if len(chunk) == 2 and torch.equal(mask, causal.expand_as(mask)):
                mask = None  # one sequence that the mask leaves plainly causal: SDPA's causal kernel
        plan.append((start, end, mask))
    return plan


def chunk_bounds(bounds: list[int], chunk_tokens: int) -> list[list[int]]:
    """Consecutive whole sequences, grouped into chunks of at most `chunk_tokens` tokens (a longer sequence alone).
    Each chunk is given by its sequences' bounds.

    Example:
        >>> chunk_bounds([0, 50, 100, 300, 340, 360], chunk_tokens=128)
        [[0, 50, 100], [100, 300], [300, 340, 360]]
    """
    if isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int) or chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be a positive int, got {chunk_tokens!r}")
    chunks: list[list[int]] = []
    current = [bounds[0]]
    for end in bounds[1:]:
        if len(current) > 1 and end - current[0] > chunk_tokens:
            chunks.append(current)
            current = [current[-1]]
        current.append(end)
    chunks.append(current)
    return chunks


def packed_sdpa_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                                  value: torch.Tensor, attention_mask: torch.Tensor | None, dropout: float = 0.0,
                                  scaling: float | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: query (1, heads, T, d), key and value (1, kv heads, T, d);
    returns (1, T, heads, d) as `sdpa_attention_forward` does. Under `torch.compile`, one opaque operator
    (`packed_attention_op`)."""
    if torch.compiler.is_compiling():
        output = _operator_call(module, query, key, value, attention_mask, dropout, scaling, kwargs)
        if output is not None:
            return output, None
        row = whole_packed_row(module, query, key, attention_mask, kwargs)
        if row is not None:  # (dropout in the attention): the masked row, its mask traced
            mask = sequence_mask(*row, query.shape[2], attention_mask, kwargs.get("sliding_window"), query.device)
            kwargs = {name: value for name, value in kwargs.items() if name != "is_causal"}
            return sdpa_attention_forward(module, query, key, value, mask, dropout=dropout, scaling=scaling,
                                          is_causal=False, **kwargs)
    plan = chunk_plan(module, query, key, attention_mask, kwargs)
    if plan is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    from peft_mole.packed_attention_op import takes_kernel

    if takes_kernel(query, key, value):  # the operator keeps the softmax statistics for its backward
        output = _operator_call(module, query, key, value, attention_mask, dropout, scaling, kwargs)
        if output is not None:
            return output, None
    return run_plan(module, query, key, value, plan, dropout, scaling, kwargs), None


def sequence_mask(source: torch.Tensor, from_positions: bool, tokens: int, attention_mask: torch.Tensor | None,
                  window: int | None, device: torch.device) -> torch.Tensor:
    """(1, 1, T, T) boolean: token i sees token j of its own sequence at or before it (within `window`, and where
    `attention_mask` lets it), the sequences given by `cu_seq_lens_q` or by `position_ids` (a sequence starts where
    a position does not follow its predecessor's), all on the device: no value is read back. What a compiled step
    with dropout in the attention traces, where the operator does not apply: transformers' own mask, made from the
    positions only, and only without a cache, would miss the job bounds that exist only in `cu_seq_lens_q`, and
    every bound with a cache (found by a review, 2026-12-07: sequences attended to each other there)."""
    places = torch.arange(tokens, device=device)
    if from_positions:
        positions = source.reshape(-1).to(device)
        starts = torch.ones(tokens, dtype=torch.bool, device=device)
        starts[1:] = positions[1:] != positions[:-1] + 1
        sequence = starts.cumsum(0)
    else:
        sequence = torch.searchsorted(source.to(device)[1:].contiguous(), places, right=True)
    mask = (sequence[:, None] == sequence[None, :]) & (places[:, None] >= places[None, :])
    if window is not None:
        mask = mask & (places[:, None] - places[None, :] < window)
    mask = mask[None, None]
    return mask if attention_mask is None else mask & attention_mask.to(device, torch.bool)


def run_plan(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, plan: Plan, dropout: float,
             scaling: float | None, kwargs: dict) -> torch.Tensor:
    """(1, T, heads, d): SDPA over each chunk of `plan` (`chunk_plan`), concatenated."""
    kwargs = {name: value for name, value in kwargs.items() if name != "is_causal"}
    outputs = []
    for start, end, mask in plan:
        output, _ = sdpa_attention_forward(module, query[:, :, start:end], key[:, :, start:end],
                                           value[:, :, start:end], mask, dropout=dropout, scaling=scaling,
                                           is_causal=True, **kwargs)
        outputs.append(output)
    return torch.cat(outputs, dim=1)


def _operator_call(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   attention_mask: torch.Tensor | None, dropout: float, scaling: float | None,
                   kwargs: dict) -> torch.Tensor | None:
    """The call of `peft_mole.packed_sdpa` (`packed_attention_op`): what a compiled step traces, and an eager step
    on the CPU runs; None where it does not apply (not a packed row, `packed_row`; dropout in the attention; a soft
    cap): there the masked row is traced, or the chunks run under autograd (`run_plan`). Under autocast the query,
    key and value are cast as autocast casts SDPA's (a custom operator has no autocast rule, and AOTAutograd runs
    the compiled graphs with autocast off)."""
    row = packed_row(module, query, key, attention_mask, kwargs)
    if row is None or dropout or kwargs.get("softcap") is not None:
        return None
    ends, from_positions = row
    device_type = query.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        query, key, value = query.to(dtype), key.to(dtype), value.to(dtype)
    if not query.dtype == key.dtype == value.dtype:
        return None
    from peft_mole.packed_attention_op import packed_sdpa

    scale = float(scaling) if scaling is not None else query.shape[-1] ** -0.5
    groups = int(getattr(module, "num_key_value_groups", 1))
    return packed_sdpa(query, key, value, ends, attention_mask, scale, groups, from_positions,
                       kwargs.get("sliding_window"))[0]


def packed_sdpa_mask(batch_size: int, q_length: int, kv_length: int, q_offset: int = 0, kv_offset: int = 0,
                     mask_function=causal_mask_function, attention_mask: torch.Tensor | None = None,
                     local_size: int | None = None, use_vmap: bool = False, **kwargs) -> torch.Tensor | None:
    """`sdpa_packed`'s mask function (transformers' mask interface): None where the row's mask would be plainly
    causal within each sequence (the block-diagonal causal mask of a packed row), which the chunks make themselves
    from the sequences' bounds (`chunk_plan`: `tril` blocks); else `sdpa_mask`'s (T × T) mask. So an eager packed
    step builds no (T × T) tensor (T² bytes while the forward runs: 64 MB for 8192 tokens, 256 MB and 0.5 s on this
    CPU for 16384). "Plainly causal": one row, as many keys as queries, no cache offset, no padding in the 2D mask,
    no sliding window or chunked attention (`local_size`), no custom mask functions (`use_vmap`), every token seeing
    itself and no token its successor (what spans that see ahead, such as the image blocks of PaliGemma or Gemma 4,
    would allow; a probe of the mask function on those 2T − 1 pairs), and a model that hands the mask to its
    attention function alone (`LEAN_MASK_MODELS`: others use it themselves, as Doge's dynamic mask or DeepSeek
    V3.2's indexer do, and need the tensor). Under `torch.compile` (no read of the probe on the host) the mask is
    `sdpa_mask`'s."""
    full = dict(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                kv_offset=kv_offset, mask_function=mask_function, attention_mask=attention_mask, local_size=local_size,
                use_vmap=use_vmap, **kwargs)
    if (torch.compiler.is_compiling() or batch_size != 1 or q_length != kv_length or q_length < 2 or q_offset
            or kv_offset or use_vmap or local_size is not None
            or getattr(kwargs.get("config"), "model_type", None) not in LEAN_MASK_MODELS
            or (attention_mask is not None and attention_mask.shape[-1] != kv_length)):
        return sdpa_mask(**full)
    device = kwargs.get("device", "cpu")
    index = torch.arange(q_length, device=device)[None, None, :, None]
    zero = torch.zeros(1, 1, 1, 1, dtype=torch.long, device=device)
    plain = (mask_function(zero, zero, index, index).all()  # every token sees itself, none its successor
             & ~mask_function(zero, zero, index[:, :, :-1], index[:, :, 1:]).any())
    if attention_mask is not None:
        plain = plain & attention_mask.all()  # no padding
    return None if bool(plain) else sdpa_mask(**full)  # (one read from the device)


# Decoder models whose layers give the causal mask to the attention function and nothing else (checked in their
# transformers 5 modelling code): `packed_sdpa_mask` may leave their packed rows' mask to the chunks.
LEAN_MASK_MODELS = frozenset({"llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "phi3",
                              "gemma", "olmo2", "granite", "starcoder2", "smollm3", "cohere"})


def register() -> None:
    """Make `sdpa_packed` an attention implementation of transformers, with its mask function
    (`packed_sdpa_mask`); idempotent."""
    AttentionInterface.register(PACKED_SDPA, packed_sdpa_attention_forward)
    import peft_mole.packed_attention_op  # noqa: F401  (the operator compiled steps call: registered before tracing)
    ALL_MASK_ATTENTION_FUNCTIONS.register(PACKED_SDPA, packed_sdpa_mask)


register()


def suggest_packed_attention(attention: str | None, padding_free: bool) -> None:
    """Log, for a padding-free run on `sdpa`, that `sdpa_packed` would attend its packed sequences apart (the same
    numbers, less time: docs/multijob.md, "Padding-free steps")."""
    if padding_free and attention == "sdpa":
        logger.info("padding_free=True with attn_implementation='sdpa': each packed row's attention spans the whole "
                    "row. After `import peft_mole`, attn_implementation=%r computes each sequence's attention "
                    "apart (the same outputs, less time).", PACKED_SDPA)


def isolates_non_finite(attention: str | None) -> bool:
    """Whether a NaN in one packed sequence's keys or values stays in it: flash attention's varlen kernels compute
    each sequence alone. `sdpa_packed`'s chunks of several sequences are masked SDPA, where masked-out NaN values
    still reach the other sequences' outputs (0 · NaN), as over a whole masked row."""
    return "flash" in str(attention)


ROW_MASK_TOKENS = 8192  # a packed step's most tokens where the row gets transformers' (T × T) bool mask: 64 MB


def packed_row_tokens(attention: str | None, compiled: bool = False, config=None) -> int | None:
    """The most tokens a multi-job packed step should hold where the attention keeps sequences apart (None: no
    limit). Flash attention builds no row mask, and neither does `sdpa_packed` on eager steps of a model whose
    layers all attend causally over the whole sequence (`packed_sdpa_mask`). Compiled (the mask is traced), or with
    sliding-window or chunked layers, the row gets transformers' (T × T) boolean mask, so its steps are kept to
    `ROW_MASK_TOKENS` (or the longest micro-batch, `JobScheduler.group_packed`)."""
    if "flash" in str(attention) or (attention == PACKED_SDPA and not compiled and full_attention_only(config)):
        return None
    return ROW_MASK_TOKENS


def full_attention_only(config) -> bool:
    """Whether the model the config describes gets no (T × T) mask for its packed rows from `packed_sdpa_mask`: one
    of `LEAN_MASK_MODELS` (its own config's type, not a multimodal wrapper's), every layer attending over the whole
    (causal) sequence: no sliding window (Mistral's `sliding_window`, or `layer_types` other than "full_attention")
    and no chunked attention (`attention_chunk_size`). Unknown (no config): False."""
    if (config is None or getattr(config, "model_type", None) not in LEAN_MASK_MODELS
            or getattr(config, "attention_chunk_size", None)):
        return False
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return all(kind == "full_attention" for kind in layer_types)
    return not getattr(config, "sliding_window", None)


def keeps_sequences_apart(attention: str | None) -> bool:
    """Whether the model's attention computes a packed row's sequences apart (cost Σ L_i², not T²): flash attention's
    varlen kernels, and `sdpa_packed` (eager, or compiled: `packed_attention_op`)."""
    return "flash" in str(attention) or attention == PACKED_SDPA

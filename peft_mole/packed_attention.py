"""SDPA attention for packed rows that keeps each sequence to itself: `attn_implementation="sdpa_packed"`.

A padding-free batch (TRL's `padding_free=True`, or packing with the "bfd" strategies) is one row of T tokens made
of sequences of lengths L_1 … L_n. With `attn_implementation="sdpa"` transformers builds the row's block-diagonal
causal mask and SDPA scores every (query, key) pair of the row: T² pairs, where the sequences need Σ L_i²
(flash attention's varlen kernels do that, on a GPU with the `flash-attn` package only).

`sdpa_packed` runs transformers' own `sdpa_attention_forward` over chunks of consecutive whole sequences, each of at
most C = `CHUNK_TOKENS` tokens or one sequence longer than that:
- a chunk of one sequence is causal (`is_causal=True`, so SDPA's kernel skips the upper triangle);
- a chunk of several takes the block-diagonal causal mask of its own sequences (c × c, c ≤ C).
So at most Σ_chunks c² ≤ T·C + Σ_{L_i > C} L_i² pairs are scored, and at most T/C + n calls made. Each query still
attends to exactly its own sequence's earlier keys, so the outputs are the masked row's, up to the rounding of a
softmax over fewer (masked-out) terms.

The sequences are the batch's `cu_seq_lens_q` (TRL's padding-free collator and peft-mole's packed mixed steps pass
them, as flash attention takes them), else where the `position_ids` restart (as transformers finds packed sequences
for its mask). Everything else is `sdpa` as it is: padded batches (several rows), generation with a cache, a row of
one sequence, attention with a position bias, a sliding window shorter than a sequence (Mistral, Qwen2), and any
step under `torch.compile` (the chunks are read on the host, which a graph cannot do without a break per layer).
transformers' `sdpa` mask is registered for the name, so those cases get exactly `sdpa`'s mask.

Measured on the CPU (`python bench/packed_attention.py`; docs/multijob.md, "Padding-free steps").
"""

from __future__ import annotations

import logging
import weakref

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

logger = logging.getLogger(__name__)

PACKED_SDPA = "sdpa_packed"
CHUNK_TOKENS = 128  # C: fastest or within 15 % of it over four length mixes of ~1k tokens on the CPU (64–512 tried)

_last_bounds: tuple[weakref.ref, int, list[int]] | None = None  # (tensor, its version, bounds): read once per step


def sequence_bounds(query: torch.Tensor, key: torch.Tensor, kwargs: dict) -> list[int] | None:
    """[0, end_1, …, T]: the ends of the packed row's sequences, or None where `sdpa_packed` is plain `sdpa` (see the
    module's docstring). Read on the host once per step: every layer gets the same `cu_seq_lens_q` or
    `position_ids` tensor."""
    tokens = query.shape[2]
    if (query.shape[0] != 1 or key.shape[2] != tokens or tokens < 2 or kwargs.get("position_bias") is not None
            or torch.compiler.is_compiling()):
        return None
    ends = kwargs.get("cu_seq_lens_q")
    if ends is not None:
        bounds = _host_bounds(ends, tokens, from_positions=False)
    else:
        positions = kwargs.get("position_ids")
        if positions is None or positions.shape != (1, tokens):
            return None
        bounds = _host_bounds(positions, tokens, from_positions=True)
    if bounds is None or len(bounds) < 3 or bounds[0] != 0 or bounds[-1] != tokens:
        return None  # one sequence, or bounds that do not describe this row: the masked row decides
    window = kwargs.get("sliding_window")  # a key is seen while q − k < window: all of a sequence if L ≤ window
    if window is not None and max(end - start for start, end in zip(bounds[:-1], bounds[1:], strict=True)) > window:
        return None
    return bounds


def _host_bounds(tensor: torch.Tensor, tokens: int, from_positions: bool) -> list[int] | None:
    global _last_bounds
    if _last_bounds is not None and _last_bounds[0]() is tensor and _last_bounds[1] == tensor._version:
        return _last_bounds[2]
    if from_positions:  # a sequence starts where the position does not follow its predecessor's
        row = tensor[0]
        starts = torch.nonzero(row[1:] != row[:-1] + 1).flatten() + 1
        bounds = [0, *starts.tolist(), tokens]
    else:
        bounds = [int(end) for end in tensor.tolist()]
    _last_bounds = (weakref.ref(tensor), tensor._version, bounds)
    return bounds


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


def _block_causal_mask(chunk: list[int], device: torch.device) -> torch.Tensor:
    """(1, 1, c, c) bool: query i may attend to key j when both are in one sequence of the chunk and j ≤ i."""
    lengths = torch.tensor([end - start for start, end in zip(chunk[:-1], chunk[1:], strict=True)], device=device)
    sequence = torch.repeat_interleave(torch.arange(len(lengths), device=device), lengths)
    position = torch.arange(sequence.numel(), device=device)
    allowed = (sequence[:, None] == sequence[None, :]) & (position[:, None] >= position[None, :])
    return allowed[None, None]


def packed_sdpa_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                                  value: torch.Tensor, attention_mask: torch.Tensor | None, dropout: float = 0.0,
                                  scaling: float | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: query (1, heads, T, d), key and value (1, kv heads, T, d);
    returns (1, T, heads, d) as `sdpa_attention_forward` does."""
    bounds = sequence_bounds(query, key, kwargs) if getattr(module, "is_causal", True) else None
    if bounds is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    kwargs.pop("is_causal", None)
    outputs = []
    for chunk in chunk_bounds(bounds, CHUNK_TOKENS):
        start, end = chunk[0], chunk[-1]
        mask = None if len(chunk) == 2 else _block_causal_mask(chunk, query.device)
        output, _ = sdpa_attention_forward(module, query[:, :, start:end], key[:, :, start:end],
                                           value[:, :, start:end], mask, dropout=dropout, scaling=scaling,
                                           is_causal=True, **kwargs)
        outputs.append(output)
    return torch.cat(outputs, dim=1), None


def register() -> None:
    """Make `sdpa_packed` an attention implementation of transformers (with `sdpa`'s mask); idempotent."""
    AttentionInterface.register(PACKED_SDPA, packed_sdpa_attention_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(PACKED_SDPA, sdpa_mask)


register()


def suggest_packed_attention(attention: str | None, padding_free: bool, compiled: bool) -> None:
    """Log, for a padding-free run on `sdpa` with eager steps, that `sdpa_packed` would attend its packed
    sequences apart (the same numbers, less time: docs/multijob.md, "Padding-free steps")."""
    if padding_free and attention == "sdpa" and not compiled:
        logger.info("padding_free=True with attn_implementation='sdpa': each packed row's attention spans the whole "
                    "row. After `import peft_mole`, attn_implementation=%r computes each sequence's attention "
                    "apart (the same outputs, less time).", PACKED_SDPA)


def keeps_sequences_apart(attention: str | None, compiled: bool) -> bool:
    """Whether the model's attention computes a packed row's sequences apart (cost Σ L_i², not T²): flash attention's
    varlen kernels, and `sdpa_packed` where the step is not compiled."""
    return "flash" in str(attention) or (attention == PACKED_SDPA and not compiled)

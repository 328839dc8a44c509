"""`sdpa_packed` on sequence bounds that are not one strictly increasing run from 0 to the row's end: the sequences
still attend to themselves only (a review found them attending across, 2026-12-08)."""

from __future__ import annotations

import pytest
import torch

from peft_mole import PACKED_SDPA
from tests.helpers import tiny_base

LENGTHS = [5, 7, 4]


def sequences_and_row():
    gen = torch.Generator().manual_seed(0)
    sequences = [torch.randint(3, 512, (n,), generator=gen) for n in LENGTHS]
    ids = torch.cat(sequences)[None]
    positions = torch.cat([torch.arange(n) for n in LENGTHS])[None]
    return sequences, ids, positions


@pytest.mark.parametrize(("bounds", "why"), [
    ([0, 5, 5, 12, 16], "an empty sequence (a repeated bound, as DataCollatorWithFlattening writes for one)"),
    ([0, 5, 12, 12, 16, 16], "empty sequences, the last one too"),
    ([0, 5, 12], "bounds that end before the row does (its last tokens a sequence of their own)"),
])
def test_bounds_that_are_not_a_plain_run_keep_each_sequence_to_itself(bounds, why):
    """Without a mask from transformers (the packed mask builds none for a row of causal sequences), such bounds
    made no chunk plan and the row ran plain causal SDPA: the second sequence saw the first (0.13 logits off)."""
    sequences, ids, positions = sequences_and_row()
    model = tiny_base().eval()
    model.set_attn_implementation(PACKED_SDPA)
    with torch.no_grad():
        alone = torch.cat([model(input_ids=s[None]).logits[0] for s in sequences])
        cu = torch.tensor(bounds, dtype=torch.int32)
        packed = model(input_ids=ids, position_ids=positions, cu_seq_lens_q=cu, cu_seq_lens_k=cu,
                       max_length_q=7, max_length_k=7, use_cache=False).logits[0]
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=1e-5, msg=why)


def test_gradients_through_an_empty_sequence_match_each_sequence_alone():
    sequences, ids, positions = sequences_and_row()
    model = tiny_base()
    model.set_attn_implementation(PACKED_SDPA)
    cu = torch.tensor([0, 5, 5, 12, 16], dtype=torch.int32)
    model(input_ids=ids, position_ids=positions, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=7,
          max_length_k=7, use_cache=False).logits.square().sum().backward()
    packed = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    sum(model(input_ids=s[None]).logits.square().sum() for s in sequences).backward()
    for got, want in zip(packed, [p.grad for p in model.parameters()], strict=True):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)

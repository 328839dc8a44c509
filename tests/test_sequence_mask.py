"""`sdpa_packed` in compiled steps with dropout in the attention: the packed row's block-diagonal mask
(`packed_attention.sequence_mask`), traced where the operator does not apply."""

import pytest
import torch

from peft_mole import PACKED_SDPA
from tests.helpers import one_layer_base
from tests.test_packed_attention import with_attention


@pytest.mark.parametrize("bounds", ["cu_seq_lens", "positions_with_cache"])
def test_compiled_steps_with_attention_dropout_keep_the_sequences_apart(bounds):
    """With dropout in the attention the compiled step cannot use the operator, and traced transformers' mask: made
    from the positions only, and only without a cache, so job bounds given by `cu_seq_lens_q` alone (a job whose
    positions go on from the job before, `multijob.batching`) and every bound with a cache were lost, and sequences
    attended to each other (before 2026-12-07: a gradient of 1.3e3 from one job's loss on the other's tokens). Now
    the compiled step traces the row's block-diagonal mask (`packed_attention.sequence_mask`): no gradient crosses."""
    torch.manual_seed(0)
    model = with_attention(one_layer_base(attention_dropout=0.3), PACKED_SDPA).train()
    lengths = (5, 13)
    if bounds == "cu_seq_lens":  # the second job's positions continue the first's
        positions = torch.arange(sum(lengths))[None]
        kwargs = dict(cu_seq_lens_q=torch.tensor([0, 5, 18], dtype=torch.int32), max_length_q=13, use_cache=False)
        kwargs.update(cu_seq_lens_k=kwargs["cu_seq_lens_q"], max_length_k=13)
    else:
        positions = torch.cat([torch.arange(n) for n in lengths])[None]
        kwargs = dict(use_cache=True)
    ids = torch.randint(3, 500, (1, sum(lengths)))
    compiled = torch.compile(model, backend="aot_eager")
    embeddings = model.get_input_embeddings()(ids).detach().requires_grad_()
    out = compiled(inputs_embeds=embeddings, position_ids=positions, **kwargs)
    out.logits[0, 5:].sum().backward()  # the second sequence's outputs
    crossed, own = embeddings.grad[0, :5].abs().sum().item(), embeddings.grad[0, 5:].abs().sum().item()
    assert crossed == 0.0 and own > 0.0


def test_sequence_mask_is_the_block_diagonal_causal_mask_of_the_sequences():
    """The mask a compiled step with attention dropout traces: token i sees token j of its own sequence at or
    before it, within a sliding window (j > i − w, as transformers'), the sequences from `cu_seq_lens_q` or from
    positions that do not follow their predecessor's."""
    from peft_mole.packed_attention import sequence_mask

    lengths = [3, 1, 4]
    expected = torch.block_diag(*[torch.ones(n, n, dtype=torch.bool).tril() for n in lengths])[None, None]
    cu = torch.tensor([0, 3, 4, 8], dtype=torch.int32)
    positions = torch.tensor([[0, 1, 2, 7, 3, 4, 5, 6]])  # (the second sequence does not start at 0)
    for source, from_positions in ((cu, False), (positions, True)):
        assert torch.equal(sequence_mask(source, from_positions, 8, None, None, torch.device("cpu")), expected)
    windowed = sequence_mask(cu, False, 8, None, 2, torch.device("cpu"))
    places = torch.arange(8)
    assert torch.equal(windowed, expected & (places[:, None] - places[None, :] < 2))
    padding = torch.ones(1, 1, 8, 8, dtype=torch.bool)
    padding[..., 7] = False  # a mask given with the row: kept
    assert torch.equal(sequence_mask(cu, False, 8, padding, None, torch.device("cpu")), expected & padding)

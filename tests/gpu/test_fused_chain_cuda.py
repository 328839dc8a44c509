"""The fused dense chain (`ops.fused_chain`, compiled to Triton kernels) on CUDA against the eager chain on CUDA.
Skipped without a CUDA device (CI has none)."""

from __future__ import annotations

import pytest
import torch

from peft_mole.ops import dense_mixture, fused_chain, gated
from tests.ops.test_fused_chain import (
    INTER,
    TOKENS_PER_BLOCK,
    CountedKernels,
    E,
    chain_inputs,
    values_and_gradients,
)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("mask", [True, False], ids=["dropout", "no_dropout"])
def test_fused_blocks_on_cuda_equal_the_eager_chain(mask, monkeypatch):
    monkeypatch.setattr(gated, "ACCELERATOR_BLOCK_ELEMENTS", TOKENS_PER_BLOCK * E * INTER)  # blocks of 5 tokens
    monkeypatch.setattr(dense_mixture, "BLOCK_ELEMENTS", TOKENS_PER_BLOCK * E * INTER)
    args = {k: (tuple(t.detach().cuda().requires_grad_() for t in v) if isinstance(v, tuple)
                else None if v is None else v.detach().cuda().requires_grad_(v.requires_grad))
            for k, v in chain_inputs(13, mask=mask).items()}
    counted = CountedKernels(monkeypatch)
    try:
        found = values_and_gradients(args, True)
        assert (counted.forward, counted.backward) == (2, 2) and not fused_chain._state["failed"]
        reference = values_and_gradients(args, False)
    finally:
        fused_chain.set_fused_chain(None)
    torch.testing.assert_close(found, reference, rtol=1e-4, atol=1e-4)

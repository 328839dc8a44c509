"""What a training forward refuses, and what it must not: rows of a frozen adapter beside a trained one train as PEFT's
LoRA does, lost router gradients are refused per adapter, and DataParallel replicas are refused (found by reviews on
2026-12-08)."""

import pytest
import torch
from peft import get_peft_model

from tests.helpers import batch, mixlora, tiny_base


@pytest.mark.parametrize("attention", [[], None], ids=["experts_only", "with_attention_lora"])
@pytest.mark.parametrize("names", [["default", "ref"], ["ref", "default"], ["ref", "ref"], ["model", "default"]])
def test_rows_of_a_frozen_adapter_beside_a_trained_one_run_in_training(names, attention):
    """A second, inactive adapter is frozen (a reference beside the policy). Before 2026-12-08 a training forward
    whose first rows were its was refused as "reentrant gradient checkpointing" (the first router record alone was
    read); the loss's gradient now reaches the trained adapter's routers only through its own rows."""
    overrides = {} if attention is None else {"attn_target_modules": attention}
    model = get_peft_model(tiny_base(), mixlora(**overrides))
    frozen = names[0] if names[0] != "default" else names[1]  # ("model": a word of every parameter's name)
    model.add_adapter(frozen, mixlora(**overrides))
    model.train()
    ids, mask, labels = batch(2, 6)
    out = model(input_ids=ids, attention_mask=mask, labels=labels, adapter_names=names)
    routers = [p for n, p in model.named_parameters() if "router.default." in n]
    assert routers and all(p.requires_grad for p in routers)
    assert not any(p.requires_grad for n, p in model.named_parameters() if f"_router.{frozen}." in n)
    if "default" not in names:  # nothing of the forward trains (as with PEFT's LoRA)
        assert torch.isfinite(out.loss) and not out.loss.requires_grad
        return
    grads = torch.autograd.grad(out.loss, routers)
    assert all(g.abs().sum() > 0 for g in grads)


def test_a_dataparallel_replica_is_refused():
    """One forward context per tuner, shared by DataParallel's replica threads (rows, masks and router records of one
    replica read by another): refused, naming the distributed launch. (torch marks each replica `_is_replica`;
    CPU-only here, so the mark is set by hand.)"""
    model = get_peft_model(tiny_base(), mixlora())
    ids, mask, labels = batch(2, 6)
    model.base_model._is_replica = True
    with pytest.raises(ValueError, match="do not run under torch.nn.DataParallel .*accelerate launch"):
        model(input_ids=ids, attention_mask=mask, labels=labels)

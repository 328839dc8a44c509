"""The central multi-job property (SPEC.md §3): jobs trained together in mixed batches end with exactly the
adapters they would have if each were trained alone on the same rows, with the same initialisation and order."""

import pytest
import torch
from peft import get_peft_model

from peft_mole.multijob import mixed_batch, per_job_losses
from tests.helpers import METHODS, randomize_adapters, tiny_base


def job_batches(seed: int, rows: int, length: int, pad_last: int):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 512, (rows, length), generator=gen)
    mask = torch.ones_like(ids)
    mask[0, length - pad_last :] = 0
    ids = ids.masked_fill(mask == 0, 0)
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :2] = -100  # a prompt part that does not train
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def two_job_model(method: str):
    model = get_peft_model(tiny_base(), METHODS[method](), adapter_name="math")
    model.add_adapter("code", METHODS[method](num_experts=3, r=2))
    model.base_model.set_adapter(["math", "code"])
    randomize_adapters(model)
    model.train()
    return model


def optimizers(model):
    params = {job: [p for n, p in model.named_parameters() if f".{job}" in n] for job in ("math", "code")}
    lrs = {"math": 2e-3, "code": 1e-3}  # per-job hyper-parameters
    return {job: torch.optim.AdamW(params[job], lr=lrs[job], weight_decay=0.01) for job in params}


def adapter_state(model, job):
    return {n: p.detach().clone() for n, p in model.named_parameters() if f".{job}" in n}


@pytest.mark.parametrize("method", ["mixlora", "dynmole"])
def test_jobs_trained_together_equal_jobs_trained_alone(method):
    steps = [
        {"math": job_batches(10 + s, rows=2, length=9, pad_last=3), "code": job_batches(20 + s, 3, 12, 4)}
        for s in range(3)
    ]
    # together: one mixed batch per step, per-job losses summed, one backward, per-job optimizers
    together = two_job_model(method)
    opts = optimizers(together)
    for parts in steps:
        batch = mixed_batch(parts)
        out = together(**batch.model_inputs())
        losses = per_job_losses(out.logits, batch.labels, batch.rows, out.aux_loss_per_adapter)
        sum(losses.values()).backward()
        for opt in opts.values():
            opt.step()
            opt.zero_grad()
    # alone: each job on its own rows only, through the model's own loss (LM mean + its aux loss)
    for job in ("math", "code"):
        alone = two_job_model(method)
        opt = optimizers(alone)[job]
        for parts in steps:
            part = parts[job]
            out = alone(**part, adapter_names=[job] * part["input_ids"].shape[0])
            out.loss.backward()
            opt.step()
            opt.zero_grad()
        got, expected = adapter_state(together, job), adapter_state(alone, job)
        assert got.keys() == expected.keys() and got
        for name in got:
            torch.testing.assert_close(got[name], expected[name], atol=1e-5, rtol=1e-5, msg=name)


def test_per_job_loss_uses_each_jobs_own_token_count():
    logits = torch.randn(3, 4, 7)
    labels = torch.tensor([[1, 2, -100, -100], [1, 2, 3, 4], [5, 6, 1, -100]])
    losses = per_job_losses(logits, labels, {"a": slice(0, 1), "b": slice(1, 3)})
    ce = torch.nn.functional.cross_entropy
    torch.testing.assert_close(losses["a"], ce(logits[0, :1], labels[0, 1:2]))
    expected_b = (ce(logits[1, :3], labels[1, 1:], reduction="sum") + ce(logits[2, :2], labels[2, 1:3], reduction="sum")) / 5
    torch.testing.assert_close(losses["b"], expected_b)
    scaled = per_job_losses(logits, labels, {"b": slice(1, 3)}, num_items={"b": 10})
    torch.testing.assert_close(scaled["b"], expected_b / 2)


def test_per_job_loss_of_a_packed_batch_takes_each_jobs_tokens():
    """A packed batch's `rows` are token spans: given the MixedBatch, each job's loss is over its own tokens, as
    alone; given the spans as a dict they are refused (they were taken as rows: the first job got every token)."""
    from peft_mole.multijob.batching import packed_mixed_batch

    parts = {job: {"input_ids": torch.arange(3, 3 + n)[None], "labels": torch.arange(3, 3 + n)[None],
                   "position_ids": torch.arange(n)[None]} for job, n in (("a", 3), ("b", 4))}
    mixed = packed_mixed_batch(parts)
    logits = torch.randn(1, 7, 11)
    losses = per_job_losses(logits, mixed.labels, mixed)
    ce = torch.nn.functional.cross_entropy
    torch.testing.assert_close(losses["a"], ce(logits[0, :2], parts["a"]["labels"][0, 1:]))
    torch.testing.assert_close(losses["b"], ce(logits[0, 3:6], parts["b"]["labels"][0, 1:]))
    with pytest.raises(ValueError, match=r"rows\['a'\] is slice\(0, 3, None\), past the batch's 1 row.*MixedBatch"):
        per_job_losses(logits, mixed.labels, mixed.rows)


def test_mixed_batch_pads_each_job_and_keeps_rows_contiguous():
    batch = mixed_batch({"a": job_batches(0, 2, 5, 1), "b": job_batches(1, 1, 8, 2)})
    assert batch.input_ids.shape == (3, 8) and batch.adapter_names == ["a", "a", "b"]
    assert batch.rows == {"a": slice(0, 2), "b": slice(2, 3)}
    assert (batch.attention_mask[:2, 5:] == 0).all() and (batch.labels[:2, 5:] == -100).all()
    with pytest.raises(ValueError, match="lacks \\['labels'\\]"):
        mixed_batch({"a": {"input_ids": torch.ones(1, 2), "attention_mask": torch.ones(1, 2)}})

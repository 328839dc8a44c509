"""A MixLoRA or DynMoLE job whose micro-batch runs out of memory alone trains it in row halves, with the router
loads of the whole micro-batch (`multijob.halves`): the same weights as the uncut run. Before 2026-12-06 the job
failed ("ran out of memory even alone"): its load-balance loss is not a sum over rows."""

from __future__ import annotations

import contextlib

import pytest
import torch

from peft_mole import JobConfig
from peft_mole.multijob import MultiJobModel
from tests.helpers import dynmole, mixlora
from tests.multijob.test_faults import _adapter
from tests.multijob.test_faults import _trainer as _checkpointing_trainer

# dropout and jitter drawn from the job's stream (the halves must draw as the whole), aux losses weighted so that
# a half-only load balance shows in the weights
CONFIGS = {
    "mixlora": lambda: mixlora(lora_dropout=0.1, jitter_noise=0.1, router_aux_loss_coef=1.0),
    "dynmole": lambda: dynmole(lora_dropout=0.1, jitter_noise=0.1, entropy_loss_coef=1.0, lb_loss_coef=1.0),
    "dynmole-projection": lambda: dynmole(router_scope="projection", lora_dropout=0.1, entropy_loss_coef=1.0,
                                          lb_loss_coef=1.0),
}


def _trainer(tokenizer, jobs, output_dir, args: dict | None = None, **kwargs):
    """test_faults' trainer without its checkpoints (only the final adapters are compared here)."""
    return _checkpointing_trainer(tokenizer, jobs, output_dir, {"save_strategy": "no", **(args or {})}, **kwargs)


def _squeeze(trainer, rows: int, rows_without_autograd: int | None = None) -> list[tuple[int, bool]]:
    """Make the trainer's forwards of more than `rows` rows (`rows_without_autograd` without autograd) run out of
    memory; returns (rows, autograd) per call."""
    forward, calls = trainer.jobs_model.forward, []

    def forward_that_fits(*args, input_ids=None, **kwargs):
        calls.append((input_ids.shape[0], torch.is_grad_enabled()))
        if input_ids.shape[0] > (rows if torch.is_grad_enabled() or rows_without_autograd is None
                                 else rows_without_autograd):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return forward(*args, input_ids=input_ids, **kwargs)

    trainer.jobs_model.forward = forward_that_fits
    return calls


def _difference(tmp_path, a: str, b: str) -> float:
    """The largest difference between the "moe" adapters trained into tmp_path/a and tmp_path/b."""
    first, second = _adapter(tmp_path / a / "moe"), _adapter(tmp_path / b / "moe")
    assert first.keys() == second.keys()
    return max((first[k] - second[k]).abs().max().item() for k in first)


def _normal_and_squeezed(tokenizer, jobs, tmp_path, args=None, **limits):
    """`jobs()` trained as they are and with the forwards over `limits` (`_squeeze`) out of memory: (the squeezed
    run's calls, the largest weight difference, both trainers)."""
    normal = _trainer(tokenizer, jobs(), tmp_path / "normal", args=args)
    normal.train()
    halved = _trainer(tokenizer, jobs(), tmp_path / "halved", args=args)
    calls = _squeeze(halved, **limits)
    halved.train()
    return calls, _difference(tmp_path, "normal", "halved"), normal, halved


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_a_moe_job_out_of_memory_alone_trains_in_halves_with_the_whole_micro_batch_router_loads(
        assets, tmp_path, monkeypatch, kind):
    tokenizer, datasets = assets
    jobs = lambda: [JobConfig("moe", CONFIGS[kind](), datasets["capital"], per_device_train_batch_size=4)]  # noqa: E731
    calls, difference, normal, halved = _normal_and_squeezed(tokenizer, jobs, tmp_path, rows=2)
    assert [r["status"] for r in halved.job_summary] == ["done"]
    # per step: the whole (out of memory), its halves without autograd (the router loads), then with autograd
    assert calls == [(4, True), (2, False), (2, False), (2, True), (2, True)] * 4
    assert difference <= 1e-5  # fp32 sums in another order, through 4 AdamW steps
    logged = {k: v for k, v in normal.state.log_history[-2].items() if k.endswith("aux_loss")}
    assert logged and logged == pytest.approx(
        {k: v for k, v in halved.state.log_history[-2].items() if k.endswith("aux_loss")}, rel=1e-5)

    # each half with its own router loads (no first pass) trains other weights: the test sees the difference
    monkeypatch.setattr(MultiJobModel, "whole_router_loads", lambda self, whole: contextlib.nullcontext())
    naive = _trainer(tokenizer, jobs(), tmp_path / "naive")
    _squeeze(naive, rows=2)
    naive.train()
    assert _difference(tmp_path, "normal", "naive") > 1e-3  # (measured: 4e-3 to 5e-3, where the halves with the whole's loads: <= 1.5e-6)


def test_a_moe_job_whose_halves_run_out_of_memory_too_is_halved_again_with_the_same_router_loads(assets, tmp_path):
    tokenizer, datasets = assets
    jobs = lambda: [JobConfig("moe", CONFIGS["mixlora"](), datasets["capital"], per_device_train_batch_size=4)]  # noqa: E731
    calls, difference, *_ = _normal_and_squeezed(tokenizer, jobs, tmp_path, {"max_steps": 2}, rows=1,
                                                 rows_without_autograd=2)
    # the whole, its halves without autograd (loads), a half (out of memory again), its rows, the other half ...
    assert calls[:7] == [(4, True), (2, False), (2, False), (2, True), (1, True), (1, True), (2, True)]
    assert difference <= 1e-5


def test_the_first_pass_is_halved_too_and_a_job_whose_rows_never_fit_fails_alone(assets, tmp_path):
    tokenizer, datasets = assets
    jobs = lambda: [JobConfig("moe", CONFIGS["dynmole"](), datasets["capital"], per_device_train_batch_size=4)]  # noqa: E731
    # the halves run out of memory without autograd too: their rows, one by one
    calls, difference, *_ = _normal_and_squeezed(tokenizer, jobs, tmp_path, {"max_steps": 1}, rows=1)
    assert calls == [(4, True), (2, False), (1, False), (1, False), (2, False), (1, False), (1, False),
                     (2, True), (1, True), (1, True), (2, True), (1, True), (1, True)]
    assert difference <= 1e-5

    jobs = [JobConfig("moe", CONFIGS["mixlora"](), datasets["capital"], per_device_train_batch_size=4),
            JobConfig("other", mixlora(), datasets["sentiment"], per_device_train_batch_size=1)]
    trainer = _trainer(tokenizer, jobs, tmp_path / "run", step_overhead_tokens=None)
    _squeeze(trainer, rows=1, rows_without_autograd=0)  # not even one row fits
    trainer.train()
    summary = {row["job"]: row for row in trainer.job_summary}
    assert summary["moe"]["status"] == "failed" and summary["other"]["status"] == "done"
    assert "the first pass of its halves raised OutOfMemoryError" in summary["moe"]["error"]


def test_a_padding_free_moe_job_out_of_memory_alone_trains_its_sequences_in_halves(assets, tmp_path):
    """A packed micro-batch's sequences in two halves of about equal tokens, each token drawing as in the whole."""
    tokenizer, datasets = assets
    jobs = lambda: [JobConfig("moe", CONFIGS["dynmole"](), datasets["capital"], per_device_train_batch_size=4)]  # noqa: E731
    packed = {"padding_free": True, "max_length": None, "max_steps": 2}
    _trainer(tokenizer, jobs(), tmp_path / "normal", args=packed).train()
    halved = _trainer(tokenizer, jobs(), tmp_path / "halved", args=packed)
    forward, sequences_run = halved.jobs_model.forward, []

    def forward_that_fits_two_sequences(*args, position_ids=None, **kwargs):
        sequences = int((position_ids == 0).sum())
        sequences_run.append((sequences, torch.is_grad_enabled()))
        if sequences > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return forward(*args, position_ids=position_ids, **kwargs)

    halved.jobs_model.forward = forward_that_fits_two_sequences
    halved.train()
    assert sequences_run == [(4, True), (2, False), (2, False), (2, True), (2, True)] * 2
    assert _difference(tmp_path, "normal", "halved") <= 1e-5

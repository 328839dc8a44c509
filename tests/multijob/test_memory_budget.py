"""`max_memory`: the memory model is fitted per kind of job (their adapters keep different activations per token),
predicts a mixed step of several kinds (padded or packed), and profiling changes no weight: a budget that never
binds trains what a run without one trains (one that defers a micro-batch reorders later dropout draws)."""

from __future__ import annotations

import contextlib
from types import SimpleNamespace

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig
from transformers import TrainerCallback
from transformers.optimization import Adafactor

from peft_mole import PACKED_SDPA, JobConfig, MultiJobTrainer
from peft_mole.multijob import memory_profile
from peft_mole.multijob.batching import profile_inputs
from peft_mole.multijob.memory import MemoryModel, step_memory
from tests.helpers import mixlora, tiny_base
from tests.multijob.test_trainer import ALL_LINEAR, run_args


def _jobs(datasets) -> list[JobConfig]:
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=ALL_LINEAR)
    return [
        JobConfig("lora", lora, datasets["sentiment"], per_device_train_batch_size=2),
        JobConfig("mix", mixlora(num_experts=8, top_k=2, r=8), datasets["capital"], per_device_train_batch_size=2),
        # the same adapter settings as "lora" but another learning rate: the same memory kind
        JobConfig("lora_fast", LoraConfig(r=4, lora_alpha=16, lora_dropout=0.1, target_modules=ALL_LINEAR),
                  datasets["add"], per_device_train_batch_size=2, learning_rate=5e-3),
    ]


def _weights(trainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}


def test_memory_model_is_fitted_per_kind_of_job_and_predicts_a_mixed_step(assets, tmp_path):
    tokenizer, datasets = assets
    # profiled up to 96 tokens a row: the tiny model's MixLoRA block keeps more per token below ~32 tokens a step
    trainer = MultiJobTrainer(model=tiny_base(vocab_size=len(tokenizer)), jobs=_jobs(datasets),
                              args=run_args(tmp_path / "budget", max_steps=2, max_length=96),
                              processing_class=tokenizer, max_memory=1e12)
    trainer.train()
    kinds = {run.name: run.memory_kind for run in trainer.runs}
    assert kinds["lora"] == kinds["lora_fast"] != kinds["mix"]
    memory = trainer.job_scheduler.memory_model
    # five shapes of "lora", one step of "lora" and "lora_fast", two of "mix", one of "lora" and "mix"
    assert memory.kinds == [kinds["lora"], kinds["mix"]] and len(memory.samples) == 5 + 1 + 3
    assert memory.columns[1] == [kinds["lora"], kinds["mix"]]  # each kind's per-job constant is fitted

    model = trainer.jobs_model
    params = [p for p in model.parameters() if p.requires_grad]
    adapters = ["lora", "mix", "mix", "mix", "mix", "lora_fast"]  # each job's rows consecutive, as the trainer mixes
    ids = torch.randint(3, len(tokenizer), (len(adapters), 40), generator=torch.Generator().manual_seed(0))

    def mixed_step() -> None:  # as the trainer runs one (TRL's fused LM head)
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids, adapter_names=adapters,
                    fused_lm_head=True, use_cache=False)
        torch.autograd.grad(-out.log_probs.sum(), params, allow_unused=True)

    measured = step_memory(torch.device("cpu"), mixed_step)
    error = abs(memory.predict([40] * len(adapters), jobs=adapters) - measured) / measured
    one_job = MemoryModel()  # what profiling the first job alone predicts (its constant once, its rate per token)
    for tokens, squares, value in memory.samples[:5]:  # the first job's five shapes: rows of one length each
        length = round(squares / tokens["lora"])
        one_job.observe([length] * (tokens["lora"] // length), value)
    one_job_error = abs(one_job.predict([40] * len(adapters)) - measured) / measured
    assert error < 0.03 and one_job_error > 2 * error, (error, one_job_error)


def test_a_memory_budget_changes_no_weight(assets, tmp_path):
    tokenizer, datasets = assets
    trained = []
    for budget in (None, 1e12):
        trainer = MultiJobTrainer(model=tiny_base(vocab_size=len(tokenizer)), jobs=_jobs(datasets),
                                  args=run_args(tmp_path / str(budget), max_steps=2), processing_class=tokenizer,
                                  max_memory=budget)
        trainer.train()
        trained.append(_weights(trainer))
    assert trained[0].keys() == trained[1].keys() and len(trained[0]) > 0
    for name, weight in trained[0].items():
        assert torch.equal(weight, trained[1][name]), name


def _state_bytes(run) -> int:
    return sum(v.nbytes for s in run.optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor))


@pytest.mark.parametrize("measured", [True, False], ids=["cuda-peak", "cpu-activations"])
def test_the_budget_counts_optimizer_states_created_after_profiling_and_ended_jobs_free_theirs(
        assets, tmp_path, monkeypatch, measured):
    """`measured`: the profile's peaks hold the jobs' gradient buffers (CUDA), so predictions add what changes
    since; or not (CPU), so they add every byte the jobs keep and never go below the activations."""
    monkeypatch.setattr(memory_profile, "measures_resident", lambda device: measured)
    tokenizer, datasets = assets
    jobs = _jobs(datasets)
    jobs[0].max_steps = 1  # "lora" ends after its first step, the others run on
    seen = []

    class Watch(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            runs = {run.name: run for run in trainer.runs}
            seen.append((trainer.job_scheduler.resident_change(), {n: _state_bytes(r) for n, r in runs.items()},
                         {n: r.flat.gradient_bytes for n, r in runs.items()}, {n: r.status for n, r in runs.items()}))

    trainer = MultiJobTrainer(model=tiny_base(vocab_size=len(tokenizer)), jobs=jobs,
                              args=run_args(tmp_path / "budget", max_steps=2, max_length=96, optim="adamw_torch_fused"),
                              processing_class=tokenizer, max_memory=1e12, callbacks=[Watch()])
    trainer.train()
    assert all(run.flat is not None for run in trainer.runs)  # fused AdamW: flat tensors, one gradient buffer each
    profiled_gradients = trainer.job_scheduler.profiled_resident_bytes
    weights = {run.name: sum(p.nbytes for p in run.stepped_tensors()) for run in trainer.runs}
    # before any step: no optimizer state, the gradient buffers (in the profile's peaks only where measured)
    assert profiled_gradients == (sum(weights.values()) if measured else 0)
    change, states, gradients, status = seen[0]  # after step 1: "lora" has ended, the others hold AdamW states
    assert status["lora"] == "done" and states["lora"] == 0 and gradients["lora"] == 0
    assert states["mix"] >= 2 * weights["mix"] and states["lora_fast"] >= 2 * weights["lora_fast"]  # two moments
    assert gradients["mix"] == weights["mix"] and gradients["lora_fast"] == weights["lora_fast"]
    kept = states["mix"] + states["lora_fast"] + gradients["mix"] + gradients["lora_fast"]
    assert change == kept - (sum(weights.values()) if measured else 0)  # "lora"'s gradient buffer is freed
    # all ended: every state and buffer is freed (what the profile held comes off; nothing, where it held none)
    assert [c for c, *_ in seen][-1] == -profiled_gradients
    assert measured or min(c for c, *_ in seen) >= 0
    for run in trainer.runs:  # every job has ended: nothing is kept for training, the adapters stay
        assert run.released and run.resident_bytes() == 0 and not run.optimizer.state
        assert all(p.grad is None for p in run.stepped_tensors())
    trained = _weights(trainer)
    assert trained and all(torch.isfinite(w).all() for w in trained.values())


@pytest.mark.parametrize("attention", ["sdpa", PACKED_SDPA])
def test_padding_free_training_profiles_packed_steps_and_predicts_a_packed_mixed_step(assets, tmp_path, attention):
    """With `padding_free=True` the profiling steps are packed rows, as the training steps: each sample is one row
    of {job: tokens}, and the model predicts a packed mixed step (the scheduler's query) it never saw; also where
    the row's sequences attend apart (`sdpa_packed`: no (row × row) mask saved, and one step of all the jobs)."""
    tokenizer, datasets = assets
    base = tiny_base(vocab_size=len(tokenizer))
    base.set_attn_implementation(attention)
    trainer = MultiJobTrainer(model=base, jobs=_jobs(datasets)[:2],
                              args=run_args(tmp_path / "packed", max_steps=1, padding_free=True, max_length=None),
                              processing_class=tokenizer, max_memory=1e12)
    trainer.train()
    memory = trainer.job_scheduler.memory_model
    assert len(memory.samples) == 5 + 3  # five shapes of "lora", two of "mix", one of both
    for tokens, squares, _ in memory.samples:  # one packed row each: Σ L² is the square of all its tokens
        assert squares == sum(tokens.values()) ** 2
    assert memory.samples[-1][0] == {"lora": 256, "mix": 256}  # ["lora", "mix"] rows of 256 (max_length 512 / 2)

    model = trainer.jobs_model
    params = [p for p in model.parameters() if p.requires_grad]
    row_jobs = ["mix", "lora", "lora", "mix", "lora"]
    ids = torch.randint(3, len(tokenizer), (len(row_jobs), 48), generator=torch.Generator().manual_seed(0))
    inputs = profile_inputs(ids, row_jobs, packed=True, job_order=list(model.peft_config))
    assert inputs["adapter_names"] == ["lora"] * 144 + ["mix"] * 96 and inputs["input_ids"].shape == (1, 240)
    assert inputs["position_ids"][0].tolist() == list(range(24)) * 10 and "attention_mask" not in inputs
    assert torch.equal(inputs["input_ids"][0, :48], ids[1]) and torch.equal(inputs["input_ids"][0, 144:192], ids[0])

    def packed_step() -> None:  # as the trainer runs one (TRL's fused LM head)
        out = model(**inputs, fused_lm_head=True, use_cache=False)
        torch.autograd.grad(-out.log_probs.sum(), params, allow_unused=True)

    measured = step_memory(torch.device("cpu"), packed_step)
    error = abs(memory.predict([240], jobs=[{"lora": 144, "mix": 96}]) - measured) / measured
    assert error < 0.05, error


def _record_rounds(trainer, monkeypatch) -> list[list]:
    """The parts `_next_parts` returns, round by round."""
    rounds, next_parts = [], trainer._next_parts

    def recorded(running):
        rounds.append(next_parts(running))
        return rounds[-1]
    monkeypatch.setattr(trainer, "_next_parts", recorded)
    return rounds


def test_a_binding_budget_defers_micro_batches_and_trains_every_one_of_them(assets, tmp_path, monkeypatch):
    """A budget that fits two of the three jobs' micro-batches in a step: every round's step holds at most two, a
    deferred micro-batch waits for a later step (peek/consume), and each job trains the same micro-batches, token
    for token and step for step, as without a budget."""
    tokenizer, datasets = assets
    runs = {}

    class Bar(TrainerCallback):  # a progress bar as transformers' ProgressCallback keeps it
        def on_train_begin(self, args, state, control, **kwargs):
            self.training_bar = SimpleNamespace(total=state.max_steps, refresh=lambda: None,
                                                set_postfix=lambda *a, **k: None)
            self.first_total = state.max_steps

    for budget in (None, 250.0):
        bar = Bar()
        trainer = MultiJobTrainer(model=tiny_base(vocab_size=len(tokenizer)), jobs=_jobs(datasets),
                                  args=run_args(tmp_path / str(budget), max_steps=3, max_length=96),
                                  processing_class=tokenizer, max_memory=budget, callbacks=[bar])
        if budget is not None:  # 100 "bytes" a micro-batch: the budget binds on every round of three
            monkeypatch.setattr(trainer.job_scheduler, "predict", lambda parts, resident=None: 100.0 * len(parts))
        rounds = _record_rounds(trainer, monkeypatch)
        trainer.train()
        if budget is not None:  # the deferred micro-batches took more steps than first estimated: the bar's total grew
            assert bar.first_total < trainer.state.global_step == bar.training_bar.total
        runs[budget] = ({run.name: (run.status, run.global_step, run.stats.tokens) for run in trainer.runs},
                        [[run.name for run, _ in parts] for parts in rounds if parts])
    (free, free_rounds), (bound, bound_rounds) = runs[None], runs[250.0]
    assert max(len(r) for r in free_rounds) == 3 and max(len(r) for r in bound_rounds) == 2
    assert len(bound_rounds) > len(free_rounds)  # the deferred micro-batches took rounds of their own
    assert bound == free and all(status == "done" and steps == 3 for status, steps, _ in bound.values()), bound


@pytest.mark.parametrize("scope", ["block", "projection"])
def test_dynmole_jobs_are_profiled_at_their_costliest_selection(assets, tmp_path, monkeypatch, scope):
    """A DynMoLE step's memory depends on how many experts its routers pick per token. The profile forces the
    costlier of the most pairs that still dispatch and every pair (dense): a step under it keeps at least what the
    same step keeps with the routers sharpened to any degree (the peak lies between ×4 and ×10 here, where a grid
    of ×1, ×10, ×100 missed it). The rules come back after. The trainer forces every DynMoLE job and measures one
    job of each kind."""
    from peft_mole.multijob import MultiJobModel
    from peft_mole.multijob.memory import costliest_selection
    from tests.helpers import dynmole, randomize_adapters

    torch.manual_seed(0)
    model = MultiJobModel(tiny_base(), {"d": dynmole(num_experts=8, router_scope=scope)})
    randomize_adapters(model, std=0.02)
    model.train()
    params = model.job_parameters("d")
    settings = model.expert_settings("d")
    rules = [setting.rule for setting in settings]
    assert settings and all(setting.selection_varies for setting in settings)

    def step(ids, row_jobs):
        out = model(input_ids=ids, adapter_names=row_jobs, labels=ids)
        torch.autograd.grad(out.loss, list(params.values()), allow_unused=True)

    cpu, ids = torch.device("cpu"), torch.randint(0, 500, (2, 128), generator=torch.Generator().manual_seed(1))
    with costliest_selection(step, cpu, {"d": settings}, 500, 128) as costs:
        forced = step_memory(cpu, lambda: step(ids, ["d", "d"]))
    dispatch, dense = costs["d"]["dispatch"], costs["d"]["dense"]
    assert forced == max(dispatch, dense) and dispatch != dense, costs
    assert [setting.rule for setting in settings] == rules  # the hybrid rule back
    routers = [p for name, p in params.items() if "_router.d." in name]
    with torch.no_grad():
        for scale in (1.0, 5.0, 6.0, 10.0, 100.0):  # as training sharpens them
            for router in routers:
                router.mul_(scale)
            with torch.enable_grad():
                measured = step_memory(cpu, lambda: step(ids, ["d", "d"]))
            assert measured <= forced, (scale, measured, forced)
            for router in routers:
                router.div_(scale)

    tokenizer, datasets = assets
    seen = []
    real = memory_profile.costliest_selection

    @contextlib.contextmanager
    def spy(*args):
        with real(*args) as costs:
            yield costs
        seen.append((sorted(args[2]), sorted(costs)))

    monkeypatch.setattr(memory_profile, "costliest_selection", spy)
    jobs = [JobConfig("lora", LoraConfig(r=4, lora_alpha=8, target_modules=ALL_LINEAR), datasets["sentiment"]),
            JobConfig("dyn1", dynmole(router_scope=scope), datasets["capital"]),
            JobConfig("dyn2", dynmole(router_scope=scope), datasets["add"])]
    trainer = MultiJobTrainer(model=tiny_base(vocab_size=len(tokenizer)), jobs=jobs, processing_class=tokenizer,
                              args=run_args(tmp_path, max_steps=1, max_length=32), max_memory=1e12)
    trainer.train()
    assert seen == [(["dyn1", "dyn2"], ["dyn1"])]  # both forced; dyn2 shares dyn1's kind: only dyn1 measured


def test_a_job_that_never_fits_fails_at_once_and_frees_its_place(assets, tmp_path):
    """Before, a job whose micro-batch cannot fit the budget even alone held its `max_concurrent_jobs` place until
    no other job was left (failed at the run's end), so the jobs that fit ran one after the other."""
    tokenizer, datasets = assets
    words = ["red", "blue", "cat", "dog", "sun", "rain", "tree", "road"]
    long_rows = Dataset.from_list([{"text": " ".join(words[(i + k) % 8] for k in range(100 + 7 * (i % 5)))}
                                   for i in range(16)])
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=ALL_LINEAR)
    jobs = [JobConfig("long", lora, long_rows, per_device_train_batch_size=2, priority=5),
            JobConfig("s1", lora, datasets["sentiment"], max_steps=4),
            JobConfig("s2", lora, datasets["capital"], max_steps=4)]
    trainer = MultiJobTrainer(model=tiny_base(vocab_size=len(tokenizer)), jobs=jobs, processing_class=tokenizer,
                              args=run_args(tmp_path, max_length=160), max_memory=3e6, max_concurrent_jobs=2)
    steps = []
    forward_backward = trainer._forward_backward
    trainer._forward_backward = lambda parts: (steps.append({run.name for run, _ in parts}), forward_backward(parts))
    trainer.train()
    summary = {row["job"]: row for row in trainer.job_summary}
    assert summary["long"]["status"] == "failed" and summary["long"]["steps"] == 0
    assert "over max_memory=3 MiB; lower per_device_train_batch_size" in summary["long"]["error"]
    assert "long" not in set().union(*steps)
    # s2 takes the place "long" left after the first round: 5 mixed steps (8 before: s1, then s2)
    assert trainer.state.global_step == 5
    assert (summary["s1"]["status"], summary["s2"]["status"]) == ("done", "done")


@pytest.mark.parametrize("make", [
    lambda ps: torch.optim.AdamW(ps), lambda ps: torch.optim.AdamW(ps, amsgrad=True), lambda ps: torch.optim.SGD(ps),
    lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9), lambda ps: torch.optim.Adagrad(ps),
    lambda ps: torch.optim.RMSprop(ps), lambda ps: torch.optim.RMSprop(ps, momentum=0.9, centered=True),
    lambda ps: Adafactor(ps, lr=1e-3, relative_step=False, scale_parameter=False, warmup_init=False),
    lambda ps: Adafactor(ps, lr=1e-3, beta1=0.9, relative_step=False, scale_parameter=False, warmup_init=False),
], ids=["adamw", "amsgrad", "sgd", "momentum", "adagrad", "rmsprop", "rmsprop-centered", "adafactor",
        "adafactor-beta1"])
def test_the_state_a_first_step_creates_is_predicted_per_kind_of_optimizer(make):
    """What the budget counts for a job that has not stepped: before 2026-12-07 every optimizer but SGD was taken to
    keep two buffers like the tensors (RMSprop with momentum, centered, keeps three: under-counted; Adafactor keeps
    a row and a column: over-counted 140×, so its jobs waited for nothing). Within the step counters' bytes."""
    from peft_mole.multijob.memory import first_step_state_bytes

    params = [torch.nn.Parameter(torch.randn(16, 32)), torch.nn.Parameter(torch.randn(8))]
    optimizer = make(params)
    predicted = first_step_state_bytes(optimizer, params)
    for p in params:
        p.grad = torch.randn_like(p)
    optimizer.step()
    made = sum(v.nbytes for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor))
    scalars = sum(v.nbytes for s in optimizer.state.values() for v in s.values()
                  if isinstance(v, torch.Tensor) and v.dim() == 0)  # (step counters, Adafactor's RMS)
    assert predicted == made - scalars, (predicted, made)

"""A failing job never takes the others down: NaN losses, data that raises, and out-of-memory steps."""

from __future__ import annotations

import functools
import json
import os
import weakref

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig
from safetensors.torch import load_file
from transformers import TrainerCallback

from peft_mole import PACKED_SDPA, JobConfig, MultiJobTrainer
from peft_mole.multijob.checkpoint import list_checkpoints
from tests.helpers import mixlora, randomize_adapters, tiny_base
from tests.multijob.test_trainer import ALL_LINEAR, run_args

LORA = dict(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=ALL_LINEAR)


def _trainer(tokenizer, jobs, output_dir, args: dict | None = None, attention: str = "sdpa",
             **kwargs) -> MultiJobTrainer:
    """4 steps, a checkpoint at each (`args`: other `run_args` settings)."""
    settings = {"max_steps": 4, "save_strategy": "steps", "save_steps": 1, **(args or {})}
    base = tiny_base(vocab_size=len(tokenizer))
    base.set_attn_implementation(attention)
    trainer = MultiJobTrainer(model=base, jobs=jobs, processing_class=tokenizer,
                              args=run_args(output_dir, **settings), **kwargs)
    randomize_adapters(trainer.jobs_model, seed=3)
    return trainer


def _adapter(path) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(path, "adapter_model.safetensors"))


def _assert_same(a: dict, b: dict, atol: float = 1e-5) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert (a[key] - b[key]).abs().max().item() <= atol, key


class PoisonAt(TrainerCallback):
    """Turn one job's adapter into NaN after a given mixed step (a diverged job)."""

    def __init__(self, trainer, job: str, step: int) -> None:
        self.trainer, self.job, self.step = trainer, job, step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            with torch.no_grad():
                for p in self.trainer.jobs_model.job_parameters(self.job).values():
                    p.fill_(float("nan"))


def test_nan_job_and_broken_data_job_fail_alone(assets, tmp_path, monkeypatch):
    tokenizer, datasets = assets
    jobs = [
        JobConfig("good", LoraConfig(**LORA), datasets["sentiment"]),
        JobConfig("nan", mixlora(), datasets["capital"]),
        JobConfig("broken", LoraConfig(**LORA), datasets["add"]),
    ]
    make_run = MultiJobTrainer._make_run

    def make_run_with_broken_data(self, job):
        run = make_run(self, job)
        if job.name == "broken":
            batches, length = iter(run.dataloader), len(run.dataloader)

            class Broken:
                def __len__(self):
                    return length

                def __iter__(self):
                    yield next(batches)
                    raise RuntimeError("corrupt row 7")

            run.dataloader = Broken()
            run.batches_per_epoch = len(run.dataloader)
        return run

    monkeypatch.setattr(MultiJobTrainer, "_make_run", make_run_with_broken_data)
    trainer = _trainer(tokenizer, jobs, tmp_path / "faulty")
    trainer.jobs_model.save_job("good", str(tmp_path / "good-init"))
    trainer.add_callback(PoisonAt(trainer, "nan", step=2))
    trainer.train()
    status = {r["job"]: r for r in trainer.job_summary}
    assert status["good"]["status"] == "done" and status["good"]["steps"] == 4
    assert status["nan"]["status"] == "failed" and "its loss became nan at step 3" in status["nan"]["error"]
    assert status["broken"]["status"] == "failed" and "corrupt row 7" in status["broken"]["error"]
    # the failed jobs keep their last good checkpoints, get no final adapter, and say why
    nan_dir = tmp_path / "faulty" / "nan"
    assert [step for step, _ in list_checkpoints(nan_dir)] == [1, 2]
    assert all(torch.isfinite(t).all() for t in _adapter(nan_dir / "checkpoint-2").values())
    assert not (nan_dir / "adapter_model.safetensors").exists()
    assert "its loss became nan" in json.loads((nan_dir / "job_failed.json").read_text())["error"]
    # the good job ends exactly where it ends when trained without the failing jobs
    monkeypatch.setattr(MultiJobTrainer, "_make_run", make_run)
    alone = _trainer(tokenizer, [JobConfig("good", LoraConfig(**LORA), datasets["sentiment"])], tmp_path / "alone")
    alone.jobs_model.load_job("good", str(tmp_path / "good-init"))
    alone.train()
    _assert_same(_adapter(tmp_path / "faulty" / "good"), _adapter(tmp_path / "alone" / "good"))


@pytest.mark.parametrize("where", ["job_step", "inside_the_optimizer"])
def test_a_job_whose_optimizer_step_raises_fails_alone(assets, tmp_path, monkeypatch, where):
    """An optimizer step that raises (its state allocated at the first step, out of memory here; a callback of the
    job's step events) fails that job alone with its checkpoints kept; before, it ended the whole run. Raised before
    the job's step begins, or by the optimizer itself after its gradients were clipped."""
    from peft_mole.multijob import run as run_module

    tokenizer, datasets = assets
    step, make_run = run_module.JobRun.optimizer_step, MultiJobTrainer._make_run
    out_of_memory = RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 8 bytes")

    def running_out_of_memory(self, event=lambda name: None):
        if self.name == "bad" and self.global_step == 2:
            raise out_of_memory
        return step(self, event)

    def optimizer_running_out_of_memory(self, job):
        run = make_run(self, job)
        if job.name == "bad":
            own_step = run.optimizer.step

            @functools.wraps(own_step)  # (keeps the LR scheduler's mark on the step it wrapped)
            def raising(*args, **kwargs):
                if run.global_step == 2:
                    raise out_of_memory
                return own_step(*args, **kwargs)

            run.optimizer.step = raising
        return run

    if where == "job_step":
        monkeypatch.setattr(run_module.JobRun, "optimizer_step", running_out_of_memory)
    else:
        monkeypatch.setattr(MultiJobTrainer, "_make_run", optimizer_running_out_of_memory)
    jobs = [JobConfig("good", LoraConfig(**LORA), datasets["sentiment"]),
            JobConfig("bad", LoraConfig(**LORA), datasets["capital"])]
    trainer = _trainer(tokenizer, jobs, tmp_path / "run")
    trainer.train()
    _assert_failed_alone(trainer, tmp_path / "run", "bad",
                         "its optimizer step 3 raised RuntimeError: DefaultCPUAllocator")
    assert not (tmp_path / "run" / "bad" / "adapter_model.safetensors").exists()
    assert all(torch.isfinite(t).all() for t in _adapter(tmp_path / "run" / "good").values())


def test_out_of_memory_step_is_split_and_nothing_is_lost(assets, tmp_path, monkeypatch):
    tokenizer, datasets = assets
    jobs = lambda: [  # noqa: E731
        JobConfig("a", LoraConfig(**LORA), datasets["sentiment"]),
        JobConfig("b", mixlora(), datasets["capital"], per_device_train_batch_size=2),
    ]
    normal = _trainer(tokenizer, jobs(), tmp_path / "normal")
    normal.train()
    squeezed = _trainer(tokenizer, jobs(), tmp_path / "oom", step_overhead_tokens=None)  # one step per round
    forward = squeezed.jobs_model.forward
    calls = {"oom": 0}

    def forward_that_runs_out_of_memory(*args, adapter_names=None, **kwargs):
        if adapter_names is not None and len(set(adapter_names)) > 1:  # more than one job's rows: too big
            calls["oom"] += 1
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return forward(*args, adapter_names=adapter_names, **kwargs)

    monkeypatch.setattr(squeezed.jobs_model, "forward", forward_that_runs_out_of_memory)
    squeezed.train()
    assert calls["oom"] == 4  # every mixed step ran out of memory once and was retried in halves
    assert [r["status"] for r in squeezed.job_summary] == ["done", "done"]
    for job in ("a", "b"):
        _assert_same(_adapter(tmp_path / "oom" / job), _adapter(tmp_path / "normal" / job))


def test_out_of_memory_while_laying_out_gradients_adds_no_job_twice(assets, tmp_path, monkeypatch):
    """Per-tensor optimizers: a job's first gradients are copied into its parameters' layout, which allocates. Where
    that ran out of memory for the second job, the first job's were added already, and the retried step added them
    again; every job's are now laid out before any is added."""
    import peft_mole.multijob.run as run_module

    tokenizer, datasets = assets
    jobs = lambda: [  # noqa: E731
        JobConfig("a", LoraConfig(**LORA), datasets["sentiment"]),
        JobConfig("b", LoraConfig(**LORA), datasets["capital"]),
    ]
    trainers = {}
    for name in ("normal", "oom"):
        trainers[name] = _trainer(tokenizer, jobs(), tmp_path / name,  # (SGD, no clipping: a step follows the
                                  {"optim": "sgd", "max_grad_norm": 0.0, "learning_rate": 0.05},  # gradient's scale)
                                  step_overhead_tokens=None)
        trainers[name].flat_job_parameters = False  # (the per-tensor path, where the layout copy is made)
    b_params = {id(p) for p in trainers["oom"].jobs_model.job_parameters("b").values()}
    lay_out, raised, b_calls = run_module.in_layout_of, [], []

    def runs_out_of_memory_once_for_b(param, grad):  # at its second step
        b_calls.append(id(param) in b_params)
        if sum(b_calls) == len(b_params) + 1 and not raised:
            raised.append(True)
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return lay_out(param, grad)

    trainers["normal"].train()
    monkeypatch.setattr(run_module, "in_layout_of", runs_out_of_memory_once_for_b)
    trainers["oom"].train()
    assert raised and [r["status"] for r in trainers["oom"].job_summary] == ["done", "done"]
    for job in ("a", "b"):
        _assert_same(_adapter(tmp_path / "oom" / job), _adapter(tmp_path / "normal" / job))


OUT_OF_MEMORY = {  # what each allocator raises (the CPU's a RuntimeError: before, the job failed instead)
    "cuda": lambda: torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    "cpu": lambda: RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate "
                                "memory: you tried to allocate 2147483648 bytes. Error code 12"),
}


@pytest.mark.parametrize("device", sorted(OUT_OF_MEMORY))
def test_lora_job_out_of_memory_alone_is_retried_in_row_halves(assets, tmp_path, monkeypatch, device):
    tokenizer, datasets = assets
    jobs = lambda: [  # noqa: E731
        JobConfig("a", LoraConfig(**LORA), datasets["sentiment"], per_device_train_batch_size=4),
        JobConfig("b", mixlora(), datasets["capital"], per_device_train_batch_size=2),
    ]
    normal = _trainer(tokenizer, jobs(), tmp_path / "normal")
    normal.train()
    squeezed = _trainer(tokenizer, jobs(), tmp_path / "oom")
    forward = squeezed.jobs_model.forward
    rows_run, failed_outputs = [], []

    def forward_that_fits_two_rows(*args, input_ids=None, **kwargs):
        out = forward(*args, input_ids=input_ids, **kwargs)
        if input_ids.shape[0] > 2:  # runs out of memory after the forward: its activations exist
            failed_outputs.append(weakref.ref(out.log_probs))
            raise OUT_OF_MEMORY[device]()
        # a retry runs only once the failed step's tensors are freed (not from inside its except block)
        assert all(ref() is None for ref in failed_outputs)
        rows_run.append(input_ids.shape[0])
        return out

    monkeypatch.setattr(squeezed.jobs_model, "forward", forward_that_fits_two_rows)
    squeezed.train()
    assert [r["status"] for r in squeezed.job_summary] == ["done", "done"]
    assert rows_run == [2, 2, 2] * 4  # per round: a's 4 rows as 2 + 2, then b's 2 rows
    for job in ("a", "b"):
        _assert_same(_adapter(tmp_path / "oom" / job), _adapter(tmp_path / "normal" / job))


def test_job_failing_on_a_later_piece_of_its_cut_micro_batch_fails_alone(assets, tmp_path, monkeypatch):
    """Rows cut apart run in several steps of one round, shortest first: when a later piece of a job raises, the job
    fails (the gradients of its earlier pieces are dropped, its other pieces skipped) and the other job ends as
    trained alone."""
    tokenizer, _ = assets
    words = ["red", "blue", "cat", "dog", "sun", "rain", "tree", "road"]
    rows = Dataset.from_list([{"text": " ".join(words[(i + k) % 8] for k in range(2 + (7 * i) % 11))} for i in range(24)])
    jobs = lambda names: [JobConfig(n, LoraConfig(**LORA), rows, per_device_train_batch_size=4)  # noqa: E731
                          for n in names]
    alone = _trainer(tokenizer, jobs(["good"]), tmp_path / "alone", step_overhead_tokens=0)
    alone.jobs_model.load_job("good", str(_saved_init(alone, "good", tmp_path)))
    alone.train()
    trainer = _trainer(tokenizer, jobs(["good", "bad"]), tmp_path / "run", step_overhead_tokens=0)
    trainer.jobs_model.load_job("good", str(tmp_path / "init-good"))
    first_batch = next(iter(trainer._make_run(trainer.jobs[1]).dataloader))
    lengths = sorted(set(first_batch["attention_mask"].sum(1).tolist()))
    assert len(lengths) > 2  # the first micro-batch of "bad" is cut into steps of three or more lengths
    forward, bad_steps = trainer.jobs_model.forward, []

    def forward_failing_on_a_middle_row(*args, input_ids=None, adapter_names=None, **kwargs):
        if trainer.state.global_step == 1 and "bad" in adapter_names:
            bad_steps.append(input_ids.shape[1])
            if input_ids.shape[1] == lengths[1]:
                raise RuntimeError("bad row")
        return forward(*args, input_ids=input_ids, adapter_names=adapter_names, **kwargs)

    monkeypatch.setattr(trainer.jobs_model, "forward", forward_failing_on_a_middle_row)
    trainer.train()
    # its shortest piece ran, the next raised (then again alone, to tell which job failed), its longer were skipped
    assert bad_steps[:2] == lengths[:2] and max(bad_steps) == lengths[1] < lengths[2]
    status = {r["job"]: r for r in trainer.job_summary}
    assert status["bad"]["status"] == "failed" and "bad row" in status["bad"]["error"]
    assert status["good"]["status"] == "done"
    _assert_same(_adapter(tmp_path / "run" / "good"), _adapter(tmp_path / "alone" / "good"))



def _assert_failed_alone(trainer, run_dir, bad: str, error: str) -> None:
    """Job `bad` failed after its second step with `error` in its message, its checkpoints 1 and 2 kept, while job
    "good" ran its 4 steps."""
    status = {r["job"]: r for r in trainer.job_summary}
    assert status["good"]["status"] == "done" and status["good"]["steps"] == 4
    assert status[bad]["status"] == "failed" and status[bad]["steps"] == 2
    assert error in status[bad]["error"]
    assert [step for step, _ in list_checkpoints(run_dir / bad)] == [1, 2]

def _saved_init(trainer, job, tmp_path):
    path = tmp_path / f"init-{job}"
    trainer.jobs_model.save_job(job, str(path))
    return path


def test_priority_and_max_concurrent_jobs(assets, tmp_path):
    tokenizer, datasets = assets
    jobs = [
        JobConfig("low", LoraConfig(**LORA), datasets["sentiment"], max_steps=2),
        JobConfig("high", LoraConfig(**LORA), datasets["capital"], priority=5, max_steps=2),
        JobConfig("mid", mixlora(), datasets["add"], priority=1, max_steps=2),
    ]
    trainer = _trainer(tokenizer, jobs, tmp_path, max_concurrent_jobs=1)
    trainer.train()
    order = [key.split("/")[0] for h in trainer.state.log_history for key in h if key.endswith("/loss")]
    assert order == ["high", "high", "mid", "mid", "low", "low"]
    assert trainer.state.global_step == 6  # one job at a time: 3 jobs x 2 steps


def test_a_job_whose_evaluation_raises_fails_alone(assets, tmp_path, caplog):
    """Eval data that raises fails its job at that evaluation, as training data that raises does; the other job
    trains on, and `evaluate()` still reports the others (before: the whole run raised)."""
    import datasets as hf_datasets

    tokenizer, datasets = assets
    rows = list(datasets["add"].select(range(6)))

    def breaking_rows():
        for i, row in enumerate(rows):
            if i == 3:
                raise RuntimeError("corrupt eval row 3")
            yield row

    jobs = [
        JobConfig("good", LoraConfig(**LORA), datasets["sentiment"], eval_dataset=datasets["sentiment"].select(range(4)),
                  eval_steps=2),
        JobConfig("evalbad", LoraConfig(**LORA), datasets["add"], eval_steps=2,
                  eval_dataset=hf_datasets.IterableDataset.from_generator(breaking_rows)),
    ]
    trainer = _trainer(tokenizer, jobs, tmp_path / "run")
    trainer.train()
    _assert_failed_alone(trainer, tmp_path / "run", "evalbad",
                         "its evaluation at step 2 raised RuntimeError: corrupt eval row 3")
    assert (tmp_path / "run" / "good" / "adapter_model.safetensors").exists()
    metrics = trainer.evaluate()
    assert set(metrics) == {"good/eval_loss"} and metrics["good/eval_loss"] > 0
    assert "job evalbad: its evaluation raised RuntimeError: corrupt eval row 3" in caplog.text


@pytest.mark.parametrize("poisoned", ["router", "experts"])
def test_a_nan_job_leaves_the_other_jobs_finite_in_a_compiled_step(poisoned):
    """The compiled multi-job block holds every job's routers and experts in one table: a token must never meet
    another job's (before: the router product over all jobs and the padding slots of the top-k made the other
    jobs' aux losses and 50 of their gradients NaN through 0 · NaN; eagerly they stayed finite)."""
    from peft_mole.multijob import MultiJobModel

    model = MultiJobModel(tiny_base(), {"bad": mixlora(num_experts=4, top_k=2), "good": mixlora(num_experts=2, top_k=1),
                                        "lora": LoraConfig(**LORA)})
    randomize_adapters(model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and ".bad" in name and poisoned in name:
                p.fill_(float("nan"))
    model.compile_mixed_steps(backend="eager")
    model.train()
    names = ["bad", "good", "lora", "good"]
    ids = torch.randint(3, 500, (4, 9), generator=torch.Generator().manual_seed(0))
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids), adapter_names=names)
    assert torch.isfinite(out.logits[1:]).all() and not torch.isfinite(out.logits[0]).all()
    aux = out["aux_loss_per_adapter"]
    assert torch.isfinite(aux["good"]) and not torch.isfinite(aux["bad"])
    others = {n: p for n, p in model.named_parameters() if p.requires_grad and ".bad" not in n}
    loss = out.logits[1:].float().logsumexp(-1).mean() + aux["good"]
    grads = torch.autograd.grad(loss, list(others.values()), allow_unused=True)
    assert [n for (n, _), g in zip(others.items(), grads, strict=True) if g is not None and not g.isfinite().all()] == []
    assert sum(g is not None for g in grads) > 10  # the good and LoRA jobs' gradients were computed


def _packed_trainer(tokenizer, jobs, output_dir, max_steps: int, attention: str = "sdpa") -> MultiJobTrainer:
    """Padding-free steps (SDPA over one packed row per step), micro-batches grouped first fit (with `sdpa_packed`:
    every job's micro-batch in one step)."""
    return _trainer(tokenizer, jobs, output_dir, step_overhead_tokens=32, attention=attention,
                    args={"max_steps": max_steps, "padding_free": True, "max_length": None, "save_strategy": "no"})


@pytest.mark.parametrize("attention", ["sdpa", PACKED_SDPA])
def test_a_nan_job_in_a_packed_step_fails_alone(assets, tmp_path, caplog, attention):
    """Padding-free, the jobs' micro-batches share one packed row, where SDPA's attention over the whole row (a
    block-diagonal mask), or over `sdpa_packed`'s chunks of several sequences, turns a diverged job's NaN keys and
    values into NaN for the other jobs' tokens. The step is retried in smaller steps, so only the diverged job fails
    and the others end as without it (before: a job in its packed step failed with it, "its loss became nan")."""
    tokenizer, datasets = assets

    def trainer(jobs, output_dir):
        return _packed_trainer(tokenizer, jobs, output_dir, max_steps=4, attention=attention)

    def near():  # a job whose micro-batch fits in the diverged job's packed step
        return JobConfig("near", LoraConfig(**LORA), datasets["sentiment"], per_device_train_batch_size=2)

    jobs = [JobConfig("wide", LoraConfig(**LORA), datasets["add"], per_device_train_batch_size=4), near(),
            JobConfig("nan", mixlora(), datasets["capital"], per_device_train_batch_size=1)]
    faulty = trainer(jobs, tmp_path / "faulty")
    faulty.jobs_model.save_job("near", str(tmp_path / "near-init"))
    faulty.add_callback(PoisonAt(faulty, "nan", step=2))
    shared = []  # (optimizer steps done, the step's jobs) per mixed step
    forward_backward = faulty._forward_backward
    faulty._forward_backward = lambda parts: shared.append(
        (faulty.state.global_step, {r.name for r, _ in parts})) or forward_backward(parts)
    faulty.train()
    status = {r["job"]: r for r in faulty.job_summary}
    assert status["nan"]["status"] == "failed" and "its loss became nan at step 3" in status["nan"]["error"]
    assert status["near"]["status"] == "done" and status["wide"]["status"] == "done"
    # the case: they shared a packed step after the poison (the round of optimizer step 3), then ran apart
    assert any(step == 3 and {"near", "nan"} <= jobs for step, jobs in shared), shared
    assert any(step == 3 and "near" in jobs and "nan" not in jobs for step, jobs in shared), shared
    assert "became non-finite in a packed step" in caplog.text
    alone = trainer([near()], tmp_path / "alone")
    alone.jobs_model.load_job("near", str(tmp_path / "near-init"))
    alone.train()
    _assert_same(_adapter(tmp_path / "faulty" / "near"), _adapter(tmp_path / "alone" / "near"))


def test_a_nan_gradient_under_finite_losses_in_a_packed_step_is_retried(assets, tmp_path):
    """A diverged job's NaN can reach the other jobs' gradients while every loss stays finite (attention's backward
    over the packed row: 0 · NaN in the other tokens' key and value gradients). Simulated by a hook that turns a
    job's gradient NaN only while the step holds another job: the step is retried in smaller steps, and the job
    ends as trained alone (before: it stepped with NaN weights)."""
    tokenizer, datasets = assets
    lora = LoraConfig(**LORA)

    def trainer(jobs, output_dir):
        return _packed_trainer(tokenizer, jobs, output_dir, max_steps=2)

    # "wide" the longest micro-batch, in a step of its own; "a" and "b" share one (`group_packed`: first fit)
    jobs = [JobConfig("a", lora, datasets["sentiment"], per_device_train_batch_size=2),
            JobConfig("b", lora, datasets["capital"], per_device_train_batch_size=1),
            JobConfig("wide", lora, datasets["add"], per_device_train_batch_size=4)]
    together = trainer(jobs, tmp_path / "together")
    together.jobs_model.save_job("a", str(tmp_path / "a-init"))
    jobs_in_step = []
    forward_backward = together._forward_backward
    together._forward_backward = lambda parts: jobs_in_step.append(len(parts)) or forward_backward(parts)
    weight = next(iter(together.jobs_model.job_parameters("a").values()))
    weight.register_hook(lambda grad: grad * float("nan") if jobs_in_step[-1] > 1 else grad)
    together.train()
    assert 2 in jobs_in_step and all(r["status"] == "done" for r in together.job_summary), jobs_in_step
    alone = trainer([jobs[0]], tmp_path / "alone")
    alone.jobs_model.load_job("a", str(tmp_path / "a-init"))
    alone.train()
    _assert_same(_adapter(tmp_path / "together" / "a"), _adapter(tmp_path / "alone" / "a"))


@pytest.mark.parametrize("fault", ["infinite-gradient", "disk-full"])
def test_a_job_whose_checkpoint_would_be_bad_or_cannot_be_written_fails_alone(assets, tmp_path, monkeypatch, fault):
    """A non-finite gradient under a finite loss (padded steps check losses only) made the job's weights NaN, and
    its next checkpoint kept them; a checkpoint write that raised (a full disk) ended the whole run. Now the job
    fails alone at that step, keeping its last good checkpoint, and the others end as without it."""
    from peft_mole.multijob.model import MultiJobModel

    tokenizer, datasets = assets

    def jobs(with_bad: bool):
        good = [JobConfig("g1", LoraConfig(**LORA), datasets["sentiment"]),
                JobConfig("g2", mixlora(), datasets["capital"], per_device_train_batch_size=3)]
        return good + ([JobConfig("bad", LoraConfig(**LORA), datasets["add"], max_grad_norm=1.0)] if with_bad else [])

    trainer = _trainer(tokenizer, jobs(True), tmp_path / "faulty")
    for job in ("g1", "g2"):
        trainer.jobs_model.save_job(job, str(tmp_path / "init" / job))
    if fault == "infinite-gradient":  # the second backward of "bad" gives one of its tensors an inf gradient
        parameter = next(iter(trainer.jobs_model.job_parameters("bad").values()))
        calls = []
        parameter.register_hook(lambda g: (calls.append(1), g * float("inf") if len(calls) == 2 else g)[1])
    else:
        save_job = MultiJobModel.save_job

        def disk_full_at_step_2(self, name, directory):
            if name == "bad" and "checkpoint-2" in str(directory):
                raise OSError(28, "No space left on device")
            return save_job(self, name, directory)

        monkeypatch.setattr(MultiJobModel, "save_job", disk_full_at_step_2)
    trainer.train()
    summary = {row["job"]: row for row in trainer.job_summary}
    expected = {"infinite-gradient": "its weights became non-finite by step 2 (a non-finite gradient)",
                "disk-full": "its checkpoint at step 2 could not be written: OSError: [Errno 28] No space left"}[fault]
    assert summary["bad"]["status"] == "failed" and expected in summary["bad"]["error"]
    bad_dir = tmp_path / "faulty" / "bad"
    assert [step for step, _ in list_checkpoints(bad_dir)] == [1]
    assert all(torch.isfinite(t).all() for t in _adapter(bad_dir / "checkpoint-1").values())
    assert expected in json.loads((bad_dir / "job_failed.json").read_text())["error"]
    monkeypatch.undo()
    alone = _trainer(tokenizer, jobs(False), tmp_path / "alone")
    for job in ("g1", "g2"):
        alone.jobs_model.load_job(job, str(tmp_path / "init" / job))
    alone.train()
    for job in ("g1", "g2"):
        assert summary[job]["status"] == "done"
        _assert_same(_adapter(tmp_path / "faulty" / job), _adapter(tmp_path / "alone" / job), atol=1e-6)

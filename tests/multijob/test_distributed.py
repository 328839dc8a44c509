"""MultiJobTrainer under `accelerate launch` with 2 CPU processes (gloo) ends with the adapters of the 1-process
run that sees the same global batches (per-device batch x 2)."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import free_port

SCRIPT = textwrap.dedent('''
    import hashlib, os, sys
    sys.path.insert(0, {root!r})
    os.environ["HF_HUB_OFFLINE"] = "1"
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import SFTConfig
    from peft_mole import JobConfig, MultiJobTrainer, synthetic
    from tests.helpers import mixlora, randomize_adapters, tiny_base

    # argv: the output root, the per-device batch, then the runs "<padding_free>-<mode>", trained one after another
    # in this process (the imports take most of a process's time); each writes to <root>/<run> and starts its lines
    # with "<run> "
    root, per_device, runs = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    rank = int(os.environ.get("RANK", "0"))
    tokenizer = synthetic.demo_tokenizer()
    make_run = MultiJobTrainer._make_run

    def say(text):
        """The two processes share stdout, a pipe: a write of more than 4096 bytes (the trainer's buffered logs) may be
        split, and the other process's lines put into it, mid-line. Each block of lines is one write of its own,
        under 4096 bytes (the pipe keeps it whole), starting on a line of its own."""
        sys.stdout.flush()
        sys.stdout.write("\\n" + text)
        sys.stdout.flush()

    class Breaks:
        """A loader that raises at its second micro-batch."""
        def __init__(self, loader):
            self.loader = loader
        def __len__(self):
            return len(self.loader)
        def __iter__(self):
            for i, batch in enumerate(self.loader):
                if i == 1:
                    raise RuntimeError("corrupt shard")
                yield batch

    def make_run_breaking_on_process_1(self, job):
        run = make_run(self, job)
        if job.name == "bad" and self.accelerator.process_index == 1:
            run.dataloader = Breaks(run.dataloader)
        return run

    def train(run):
        padding_free, mode = run.split("-")
        padding_free, out = padding_free == "1", os.path.join(root, run)
        def data(task):
            rows = synthetic.multitask_rows(24, tasks=(task,))
            if mode == "own_tokens":  # every row the same number of target tokens: each process's count is half
                rows = [{{**r, "completion": " yes."}} for r in rows]
            return Dataset.from_list([{{"prompt": r["prompt"], "completion": r["completion"]}} for r in rows])
        jobs = [
            # 7 eval rows: not a multiple of the processes' batches (each row must count once)
            JobConfig("lora", LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                         target_modules=["q_proj", "v_proj", "down_proj"]),
                      data("sentiment"), per_device_train_batch_size=2 * per_device,
                      eval_dataset=data("capital").select(range(7))),
            # the load-balance loss is not additive over batch shards (as with DDP in plain Trainer): coef 0 here
            JobConfig("mix", mixlora(router_aux_loss_coef=0.0), data("capital"),
                      per_device_train_batch_size=per_device, gradient_accumulation_steps=2),
        ]
        if mode == "best":  # every job evaluated: load_best_model_at_end needs it
            jobs[1].eval_dataset = data("sentiment").select(range(5))
        if mode in ("budget", "fail"):  # "fail": a third job whose data raises on process 1 only
            jobs.append(JobConfig("add" if mode == "budget" else "bad", LoraConfig(
                r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj"]), data("add"),
                per_device_train_batch_size=per_device))
        MultiJobTrainer._make_run = make_run_breaking_on_process_1 if mode == "fail" else make_run
        # "own_tokens": each process divides by its own token count and the gradients are averaged, as DDP does;
        # plain SGD without clipping, so a gradient off by the number of processes would show (Adam would hide it)
        own_tokens = dict(average_tokens_across_devices=False, optim="sgd", max_grad_norm=0.0, learning_rate=0.5)
        settings = dict(output_dir=out, max_steps=3, learning_rate=1e-3, bf16=False, use_cpu=True, report_to=[],
                        save_strategy="no", logging_steps=1, max_length=None if padding_free else 40,
                        gradient_checkpointing=False, dataloader_num_workers=0, seed=0, disable_tqdm=True,
                        padding_free=padding_free)
        # "best": evaluated and saved after each step, the eval losses scripted (each job's best: its step 2)
        best = dict(eval_strategy="steps", eval_steps=1, save_strategy="steps", save_steps=1, save_total_limit=1,
                    load_best_model_at_end=True, metric_for_best_model="eval_loss", learning_rate=5e-2)
        args = SFTConfig(**{{**settings, **{{"own_tokens": own_tokens, "best": best}}.get(mode, {{}})}})
        # "budget": a memory budget that fits two of the three jobs' micro-batches on process 1 only; the
        # processes must agree to run a micro-batch only where it fits everywhere (else their collectives fall out
        # of step)
        budget = {{"max_memory": 250.0 if rank == 1 else 1e15}} if mode == "budget" else {{}}
        trainer = MultiJobTrainer(model=tiny_base(vocab_size=len(tokenizer)), jobs=jobs, args=args,
                                  processing_class=tokenizer, **budget)
        if budget and rank == 1:
            trainer.job_scheduler.predict = lambda parts, resident=None: 100.0 * len(parts)
        if mode == "stop":  # a callback that stops on process 1 only, after the second round (a wall-clock limit)
            class StopOnProcess1(TrainerCallback):
                def on_step_end(self, args, state, control, **kwargs):
                    if rank == 1 and state.global_step == 2:
                        control.should_training_stop = True
            trainer.add_callback(StopOnProcess1())
        widest = []
        train_round = trainer._train_round
        def recording_round(parts):
            widest.append(len(parts))
            return train_round(parts)
        trainer._train_round = recording_round
        # other adapters on every process: train() must broadcast process 0's, as the 1-process run starts from them
        randomize_adapters(trainer.jobs_model, seed=7 + rank)
        if mode == "best":
            step = lambda name: next(run.global_step for run in trainer.runs if run.name == name)
            trainer._eval_loss = lambda name, batch_size: {{1: 2.0, 2: 1.0, 3: 3.0}}[step(name)]
            trainer.train()
            for name in ("lora", "mix"):  # the adapter each process holds at the end
                state = trainer.jobs_model.job_state_dict(name)
                digest = hashlib.sha256(b"".join(state[k].numpy().tobytes() for k in sorted(state))).hexdigest()
                say(f"{{run}} process {{rank}} {{name}} {{digest}}\\n")
            return trainer
        trainer.train()
        statuses = sorted((row["job"], row["status"], row["steps"]) for row in trainer.job_summary)
        evaluation = round(trainer.evaluate()["lora/eval_loss"], 6)
        # the same 7 rows streamed: each process reads its own (before: process 0's, one repeated to fill a batch)
        trainer.job_eval_datasets["lora"] = trainer.job_eval_datasets["lora"].to_iterable_dataset()
        streamed = round(trainer.evaluate()["lora/eval_loss"], 6)
        logged = [[h[f"lora/{{k}}"] for k in ("entropy", "mean_token_accuracy", "num_tokens")]
                  for h in trainer.state.log_history if "lora/loss" in h]
        padding = trainer.padding_stats
        say(f"{{run}} process {{rank}} rounds {{len(widest)}} most jobs in a round {{max(widest)}}\\n"
            f"{{run}} process {{rank}} logged {{logged}}\\n"
            f"{{run}} process {{rank}} eval {{evaluation}}\\n"
            f"{{run}} process {{rank}} eval {{streamed}}\\n"
            f"{{run}} process {{rank}} padding {{padding.real}} {{padding.total}}\\n"
            f"{{run}} processes {{trainer.accelerator.num_processes}}\\n"
            f"{{run}} process {{rank}} statuses {{statuses}}\\n")
        return trainer

    for run in runs:
        trainer = train(run)
    trainer.accelerator.end_training()  # the process group closed before exit (its threads aborted at exit once)
''')


def accelerate_launch() -> list[str]:
    """`accelerate launch` of 2 CPU processes (gloo), on a free port; the script and its arguments follow."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(free_port())]


# the SCRIPT's runs: "<padding_free>-<mode>" (`test_load_best...` adds "0-best" under 2 processes)
# ("0-fail" last: its failing loader on process 1 is left unfinished in accelerate's GradientState)
RUNS = ["0-plain", "1-plain", "0-budget", "0-own_tokens", "0-stop", "0-fail"]
LINUX_ONLY = pytest.mark.skipif(sys.platform != "linux", reason="gloo multi-process test runs on Linux")


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple:
    """The SCRIPT's runs in one process with 4 rows per device and under 2 processes with 2 (the same global
    batches): (root, {"one": its process, "two": the launch}); each run's outputs in root/one/<run>, root/two/<run>.
    The runs share each interpreter (one start instead of 11; each run's trainer seeds itself as a new process's)."""
    root = tmp_path_factory.mktemp("distributed")
    script = root / "train.py"
    script.write_text(SCRIPT.format(root=os.getcwd()))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, str(script), str(root / "one"), "4", *RUNS],
                         capture_output=True, text=True, timeout=600, env=env)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run(accelerate_launch() + [str(script), str(root / "two"), "2", "0-best", *RUNS],
                         capture_output=True, text=True, timeout=600, env=env)
    assert two.returncode == 0, two.stderr[-3000:]
    return root, {"one": one.stdout, "two": two.stdout}


def lines(stdout: str, run: str) -> list[str]:
    """The lines `run` printed, without its name."""
    return [line[len(run) + 1:] for line in stdout.splitlines() if line.startswith(f"{run} ")]


def assert_same_adapters(root, run: str, jobs=("lora", "mix")) -> None:
    """Each job's final adapter of the 2-process run is the 1-process run's."""
    for job in jobs:
        a = load_file(root / "one" / run / job / "adapter_model.safetensors")
        b = load_file(root / "two" / run / job / "adapter_model.safetensors")
        assert a.keys() == b.keys()
        assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-5, job


@LINUX_ONLY
@pytest.mark.parametrize("padding_free", ["0", "1"])  # "1": each process packs its own shard's sequences
def test_two_processes_match_one_process(trained, padding_free):
    root, out = trained
    run = f"{padding_free}-plain"
    one, two = lines(out["one"], run), lines(out["two"], run)
    assert "processes 2" in two and "processes 1" in one
    assert_same_adapters(root, run)
    # the run summary counts every process's target tokens (before: process 0's shard only, half of them)
    summaries = [json.loads((root / side / run / "jobs_summary.json").read_text())["jobs"] for side in ("one", "two")]
    tokens = [{row["job"]: row["tokens"] for row in summary} for summary in summaries]
    assert tokens[0] == tokens[1] and min(tokens[0].values()) > 0, tokens
    # a job's logged entropy, accuracy and input tokens are over every process's rows, as SFTTrainer gathers them
    logged = [ast.literal_eval(line.split(" logged ")[1]) for side in (one, two) for line in side
              if " logged " in line]
    assert len(logged) == 3 and len(logged[0]) == 3, logged
    flat = [[value for step in run for value in step] for run in logged]
    assert flat[1] == pytest.approx(flat[0], rel=1e-5) and flat[2] == pytest.approx(flat[0], rel=1e-5), logged
    # a job's eval loss counts each of its 7 eval rows once, from a dataset or a stream (before: the loader repeated
    # a row on one process)
    # (Trainer's eval loss, each batch's token mean weighted by its examples, is the same for any batching here
    # because every "capital" row has as many target tokens; test_trainer.py checks the weighting itself)
    losses = [float(line.split(" eval ")[1]) for side in (one, two) for line in side if " eval " in line]
    assert len(losses) == 6 and max(losses) - min(losses) <= 1e-5, losses
    # the summary's padding counts every process's mixed batches (before: process 0's alone)
    padding = [[int(n) for n in line.split(" padding ")[1].split()] for line in two if " padding " in line]
    assert len(padding) == 2 and all(total > 0 for _, total in padding)
    real, total = (sum(column) for column in zip(*padding, strict=True))
    assert json.loads((root / "two" / run / "jobs_summary.json").read_text())["pad_fraction"] == pytest.approx(
        1 - real / total, abs=1e-12)


@LINUX_ONLY
def test_a_job_failing_on_one_process_fails_on_every_process_and_the_others_go_on(trained):
    """A job whose data raises on process 1 only: both processes fail it at the same step (no collective is left
    waiting), and the other jobs end with the adapters of the 1-process run, where that job trains."""
    root, out = trained
    assert any("('bad', 'done', 3)" in line for line in lines(out["one"], "0-fail"))  # no process 1: it trains
    statuses = [line for line in lines(out["two"], "0-fail") if " statuses " in line]
    assert len(statuses) == 2 and all("('bad', 'failed', 1)" in line for line in statuses), statuses
    assert statuses[0].split("statuses")[1] == statuses[1].split("statuses")[1]  # the same on both processes
    assert_same_adapters(root, "0-fail")


@LINUX_ONLY
def test_a_stop_asked_on_one_process_stops_every_process_at_that_step(trained):
    """A callback sets `should_training_stop` on process 1 only, after the second round: both processes stop there
    and checkpoint every job (lora at its step 2, mix, accumulating 2 micro-batches, at its step 1) (before: process
    1 checkpointed, a collective, while process 0 went on to its next round's
    collectives, and both hung). In one process (rank 0: no stop) the jobs train their 3 steps."""
    root, out = trained
    assert any("('lora', 'done', 3)" in line for line in lines(out["one"], "0-stop"))
    statuses = [ast.literal_eval(line.split(" statuses ")[1]) for line in lines(out["two"], "0-stop")
                if " statuses " in line]
    assert len(statuses) == 2 and statuses[0] == statuses[1], statuses
    assert sorted((job, steps) for job, _, steps in statuses[0]) == [("lora", 2), ("mix", 1)], statuses
    for job, step in (("lora", 2), ("mix", 1)):
        assert (root / "two" / "0-stop" / job / f"checkpoint-{step}" / "adapter_model.safetensors").exists()


@LINUX_ONLY
@pytest.mark.parametrize("mode", ["budget", "own_tokens"])
def test_two_processes_agree_on_a_budget_and_average_per_process_token_means(trained, mode):
    """"budget": a `max_memory` that binds on process 1 only (two of three jobs' micro-batches a step): both
    processes run the same micro-batches in the same rounds, at most two a round, and every job ends with the
    adapters of the 1-process run without a binding budget (a deferred micro-batch changes no gradient).
    "own_tokens": `average_tokens_across_devices=False`, each process's loss divided by its own token count and the
    gradients averaged over processes (as DDP); with equal counts per process that is the 1-process gradient (plain
    SGD, no clipping: a sum over processes instead of a mean would double it)."""
    root, out = trained
    run = f"0-{mode}"
    one, two = lines(out["one"], run), lines(out["two"], run)
    rounds = sorted(line for line in two if " rounds " in line)
    statuses = [line.split("statuses")[1] for line in two if " statuses " in line]
    assert len(rounds) == 2 and rounds[0].split("rounds")[1] == rounds[1].split("rounds")[1], rounds
    assert len(statuses) == 2 and statuses[0] == statuses[1] and "failed" not in statuses[0], statuses
    if mode == "budget":
        assert any(line.endswith("most jobs in a round 3") for line in one), one
        assert rounds[0].endswith("most jobs in a round 2"), rounds
    assert_same_adapters(root, run, ("lora", "mix", "add") if mode == "budget" else ("lora", "mix"))


RESUME_SCRIPT = textwrap.dedent('''
    import os, sys
    sys.path.insert(0, {root!r})
    os.environ["HF_HUB_OFFLINE"] = "1"
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import SFTConfig
    from peft_mole import JobConfig, MultiJobTrainer, synthetic
    from tests.helpers import tiny_base

    # argv: the output root, then the runs "<phase>-<variant>", one after another in this process: "full" writes to
    # <root>/full-<variant>, "stop" and "resume" to <root>/cut-<variant>
    root, runs = sys.argv[1], sys.argv[2:]
    tokenizer = synthetic.demo_tokenizer()
    rows = synthetic.multitask_rows(32, tasks=("sentiment",))
    # rows of several lengths: each process's micro-batches have their own width, so its stream draws its own count
    data = Dataset.from_list([{{"prompt": r["prompt"] + " please" * (i % 5), "completion": r["completion"]}}
                              for i, r in enumerate(rows)])

    def train(phase, variant):
        out = os.path.join(root, f"{{'full' if phase == 'full' else 'cut'}}-{{variant}}")
        job = JobConfig("drop", LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["q_proj", "v_proj"]),
                        data, per_device_train_batch_size=2 if variant == "stream" else 4)
        # "order": a length-grouped sampler with a generator of its own (accelerate's, without the seedable
        # sampler), stopped in its second epoch (4 steps an epoch)
        order = dict(train_sampling_strategy="group_by_length", accelerator_config={{"use_seedable_sampler": False}})
        args = SFTConfig(output_dir=out, max_steps=4 if variant == "stream" else 7, learning_rate=1e-2, bf16=False,
                         use_cpu=True, report_to=[], save_strategy="steps", save_steps=1, max_length=40,
                         gradient_checkpointing=False, disable_tqdm=True, seed=0,
                         **(order if variant == "order" else {{}}))
        stop = 2 if variant == "stream" else 5

        class StopAfterTwo(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                control.should_training_stop = state.global_step == stop

        trainer = MultiJobTrainer(model=tiny_base(vocab_size=len(tokenizer)), jobs=[job], args=args,
                                  processing_class=tokenizer, callbacks=[StopAfterTwo()] if phase == "stop" else None)
        trainer.train(resume_from_checkpoint=True if phase == "resume" else None)
        return trainer

    for run in runs:
        trainer = train(*run.split("-"))
    trainer.accelerator.end_training()  # the process group closed before exit (a gloo thread aborted at exit once)
''')


@pytest.fixture(scope="module")
def resumed(tmp_path_factory):
    """RESUME_SCRIPT's two variants under 2 processes: run whole and stopped in one launch, resumed in another (a
    new process, as a resume is)."""
    root = tmp_path_factory.mktemp("resume")
    script = root / "train.py"
    script.write_text(RESUME_SCRIPT.format(root=os.getcwd()))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for runs in (["full-stream", "full-order", "stop-stream", "stop-order"], ["resume-stream", "resume-order"]):
        done = subprocess.run(accelerate_launch() + [str(script), str(root), *runs],
                              capture_output=True, text=True, timeout=600, env=env)
        assert done.returncode == 0, done.stderr[-3000:]
    return root


@LINUX_ONLY
@pytest.mark.parametrize("variant", ["stream", "order"])
def test_resume_under_two_processes_gives_each_process_its_own_stream_and_sampler_back(resumed, variant):
    """With dropout each process draws over its own rows, so the processes' random streams differ; a checkpoint
    keeps every process's state and resume gives each its own (before: process 0's to all, and the resumed run
    ended 1e-2 away from the uninterrupted one). "order": the length-grouped sampler's own generator is kept too
    (`multijob.data_order`; before 2026-12-06 a resumed run restarted it from its seed)."""
    full = load_file(resumed / f"full-{variant}" / "drop" / "adapter_model.safetensors")
    cut = load_file(resumed / f"cut-{variant}" / "drop" / "adapter_model.safetensors")
    assert max((full[k] - cut[k]).abs().max().item() for k in full) <= 1e-6
    if variant == "stream":
        streams = load_file(resumed / "cut-stream" / "drop" / "checkpoint-2" / "random_stream.safetensors")
        assert streams["per_process"].shape[0] == 2 and not torch.equal(*streams["per_process"])
    else:
        assert "sampler" in load_file(resumed / "cut-order" / "drop" / "checkpoint-5" / "data_order.safetensors")


def test_gradients_are_summed_over_processes_in_their_own_dtype():
    """float64 gradients (and the step's numbers) are summed in float64, fp32 and bf16 ones in fp32, as DDP keeps
    float64 (before: every gradient was cast to fp32 for the collective, 1e-6 relative on a float64 run). Two
    processes with equal gradients, simulated by an accelerator whose reduce doubles."""
    from types import SimpleNamespace

    from peft_mole.multijob.distributed import reduce_gradients

    accelerator = SimpleNamespace(num_processes=2, device=torch.device("cpu"),
                                  reduce=lambda t, reduction: t * 2)
    wide = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
    wide.grad = torch.full((3,), 1 + 1e-12, dtype=torch.float64)
    narrow = torch.nn.Parameter(torch.zeros(2, dtype=torch.bfloat16))
    narrow.grad = torch.full((2,), 1.5, dtype=torch.bfloat16)
    extra = reduce_gradients(accelerator, [wide, narrow], [1 / 3, 7.0], mean=False)
    assert wide.grad.dtype == torch.float64 and torch.equal(wide.grad, torch.full((3,), 2 + 2e-12, dtype=torch.float64))
    assert narrow.grad.dtype == torch.bfloat16 and torch.equal(narrow.grad, torch.full((2,), 3.0, dtype=torch.bfloat16))
    assert extra == [2 / 3, 14.0]


def test_a_parameter_without_a_gradient_on_every_process_keeps_none():
    """A parameter no process computed a gradient for keeps `grad=None`, so AdamW skips it (no weight decay, no
    momentum) as in one process and under DDP (before: it got a zero gradient and was stepped). One with a gradient
    on some process gets the sum. Two processes simulated: the first has `a`'s gradient, neither has `b`'s."""
    from types import SimpleNamespace

    from peft_mole.multijob.distributed import reduce_gradients

    accelerator = SimpleNamespace(num_processes=2, device=torch.device("cpu"),
                                  reduce=lambda t, reduction: t + torch.cat([torch.zeros(t.numel() - 4), t[-4:] * 0]))
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(3))
    a.grad = torch.tensor([1.0, 2.0])
    extra = reduce_gradients(accelerator, [a, b], [5.0, 6.0], mean=False)
    assert b.grad is None and torch.equal(a.grad, torch.tensor([1.0, 2.0])) and extra == [5.0, 6.0]
    weights = b.detach().clone() + 1
    with torch.no_grad():
        b.copy_(weights)
    torch.optim.AdamW([a, b], lr=0.1, weight_decay=0.5).step()
    assert torch.equal(b.detach(), weights)


@LINUX_ONLY
def test_load_best_model_at_end_under_two_processes_gives_every_process_the_best_checkpoint(trained):
    """`load_best_model_at_end` under 2 processes: process zero alone writes the checkpoints, and every process
    takes the best one back at the job's end (before, only the writing process knew which checkpoint was best:
    process 1 kept its last adapter); the final adapter is the best checkpoint's."""
    root, out = trained
    held = dict(line.rsplit(" ", 1) for line in lines(out["two"], "0-best"))
    folder = root / "two" / "0-best"
    for job in ("lora", "mix"):
        assert sorted(p.name for p in (folder / job).glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]
        best = load_file(folder / job / "checkpoint-2" / "adapter_model.safetensors")
        final = load_file(folder / job / "adapter_model.safetensors")
        assert all(torch.equal(best[k], final[k]) for k in best)
        digests = {held[f"process {rank} {job}"] for rank in (0, 1)}
        last = load_file(folder / job / "checkpoint-3" / "adapter_model.safetensors")
        assert not all(torch.equal(best[k], last[k]) for k in best), job
        assert len(digests) == 1, (job, digests)


def test_processes_that_resume_jobs_from_different_steps_stop_before_training(assets, tmp_path, monkeypatch):
    """Each process reads the job folders itself; one that found no checkpoint (folders not shared between nodes)
    started from step 0 while the others went on from theirs, and their collectives fell out of step. Now `train`
    raises on every process, naming the jobs and each process's step. A second process is simulated: a gather that
    adds its row (no checkpoint found: step 0)."""
    from peft import LoraConfig

    from peft_mole import JobConfig, MultiJobTrainer
    from peft_mole.multijob import distributed
    from peft_mole.multijob.trainer_args import JobSetupError
    from tests.helpers import tiny_base
    from tests.multijob.test_trainer import ALL_LINEAR, run_args

    tokenizer, datasets = assets
    jobs = [JobConfig("a", LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=ALL_LINEAR),
                      datasets["add"])]
    first = MultiJobTrainer(model=tiny_base(vocab_size=len(tokenizer)), jobs=jobs, processing_class=tokenizer,
                            args=run_args(tmp_path, save_strategy="steps", save_steps=1, max_steps=2))
    first.train()
    gather = distributed.gather_rows
    monkeypatch.setattr(distributed, "gather_rows", lambda accelerator, row: torch.cat(
        [gather(accelerator, row), torch.zeros_like(row).unsqueeze(0)]))
    again = MultiJobTrainer(model=tiny_base(vocab_size=len(tokenizer)), jobs=jobs, processing_class=tokenizer,
                            args=run_args(tmp_path, save_strategy="steps", save_steps=1, max_steps=2))
    with pytest.raises(JobSetupError, match=r"resumed jobs differently .*\{'a': \[\{'step': 2, 'ended': 1, "
                                            r"'stopping': 0, 'best_step': -1\}, \{'step': 0, 'ended': 0"):
        again.train(resume_from_checkpoint=True)
    # a process whose read of a job's folder raised: every process stops (before: the others waited in the gather)
    monkeypatch.setattr(distributed, "gather_rows", lambda accelerator, row: torch.cat(
        [gather(accelerator, row), torch.cat([row[:-1], torch.ones(1)]).unsqueeze(0)]))
    with pytest.raises(JobSetupError, match="a job could not resume on another process"):
        again.train(resume_from_checkpoint=True)
    # this process's read raises something else than a ValueError (a truncated optimizer.pt: torch's RuntimeError):
    # it reaches the gather too, then raises, naming the job (before, it left the other processes in the gather)
    monkeypatch.setattr(distributed, "gather_rows", gather)
    monkeypatch.setattr(MultiJobTrainer, "_resume_job", lambda self, run: (_ for _ in ()).throw(
        RuntimeError("PytorchStreamReader failed reading zip archive")))
    with pytest.raises(JobSetupError, match="job 'a' cannot resume .*RuntimeError: PytorchStreamReader"):
        again.train(resume_from_checkpoint=True)


def test_processes_that_read_a_jobs_end_differently_stop_before_training(assets, tmp_path, monkeypatch):
    """Same step, other views: this process sees the job's end (done at step 2), another only its checkpoint of
    step 2 (a copy lagging behind). Comparing steps alone let them train, and they hung in the first round."""
    from peft import LoraConfig

    from peft_mole import JobConfig, MultiJobTrainer
    from peft_mole.multijob import distributed
    from peft_mole.multijob.lifecycle import RESUMED_FIELDS
    from peft_mole.multijob.trainer_args import JobSetupError
    from tests.helpers import tiny_base
    from tests.multijob.test_trainer import ALL_LINEAR, run_args

    tokenizer, datasets = assets
    jobs = [JobConfig("a", LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=ALL_LINEAR),
                      datasets["add"])]
    args = run_args(tmp_path, save_strategy="steps", save_steps=1, max_steps=2)
    MultiJobTrainer(model=tiny_base(vocab_size=len(tokenizer)), jobs=jobs, processing_class=tokenizer,
                    args=args).train()
    gather, ended = distributed.gather_rows, RESUMED_FIELDS.index("ended")

    def with_a_lagging_process(accelerator, row):
        other = row.clone()
        other[ended] = 0  # the checkpoint of the same step, not the end
        return torch.cat([gather(accelerator, row), other.unsqueeze(0)])

    monkeypatch.setattr(distributed, "gather_rows", with_a_lagging_process)
    again = MultiJobTrainer(model=tiny_base(vocab_size=len(tokenizer)), jobs=jobs, processing_class=tokenizer,
                            args=args)
    with pytest.raises(JobSetupError, match=r"resumed jobs differently .*\{'a': \[\{'step': 2, 'ended': 1, .*"
                                            r"\{'step': 2, 'ended': 0"):
        again.train(resume_from_checkpoint=True)

"""Per-job checkpoints are atomic and resume continues exactly, also after kill -9; LoRA jobs load with plain peft."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from peft import LoraConfig
from safetensors.torch import load_file
from torch._dynamo.utils import counters
from transformers import TrainerCallback

from peft_mole import JobConfig, MultiJobTrainer
from peft_mole.multijob.checkpoint import list_checkpoints, write_atomically
from tests.helpers import mixlora, one_layer_base, randomize_adapters, tiny_base
from tests.multijob.test_trainer import ALL_LINEAR, run_args

SCRIPT = textwrap.dedent('''
    """Train two jobs on generated data; KILL_AT=n kills the process (SIGKILL) after mixed step n."""
    import os, signal, sys
    sys.path.insert(0, {root!r})
    os.environ["HF_HUB_OFFLINE"] = "1"
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import SFTConfig
    from peft_mole import JobConfig, MultiJobTrainer, synthetic
    from tests.helpers import mixlora, randomize_adapters, tiny_base

    out, kill_at, resume = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "resume"
    tokenizer = synthetic.demo_tokenizer()
    def data(task):
        rows = synthetic.multitask_rows(16, tasks=(task,))
        return Dataset.from_list([{{"prompt": r["prompt"], "completion": r["completion"]}} for r in rows])
    jobs = [
        JobConfig("lora", LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"]),
                  data("sentiment"), gradient_accumulation_steps=2, save_steps=1),
        JobConfig("mix", mixlora(), data("capital"), per_device_train_batch_size=2, save_steps=2),
    ]
    args = SFTConfig(output_dir=out, max_steps=4, per_device_train_batch_size=4, learning_rate=1e-3, bf16=False,
                     use_cpu=True, report_to=[], save_strategy="steps", logging_steps=1, max_length=40,
                     gradient_checkpointing=False, dataloader_num_workers=0, seed=0, save_total_limit=2)

    class Kill(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)

    trainer = MultiJobTrainer(model=tiny_base(vocab_size=len(tokenizer)), jobs=jobs, args=args,
                              processing_class=tokenizer, callbacks=[Kill()])
    randomize_adapters(trainer.jobs_model, seed=5)
    trainer.train(resume_from_checkpoint=resume or None)
''')


def _train(script, out, kill_at=-1, resume=False):
    return subprocess.run(
        [sys.executable, str(script), str(out), str(kill_at), "resume" if resume else "fresh"],
        capture_output=True, text=True, timeout=300,
    )


@pytest.fixture(scope="module")
def script(tmp_path_factory):
    path = tmp_path_factory.mktemp("resume") / "train_jobs.py"
    path.write_text(SCRIPT.format(root=os.getcwd()))
    return path


def test_kill_9_then_resume_gives_the_uninterrupted_adapters(script, tmp_path):
    full = _train(script, tmp_path / "full")
    assert full.returncode == 0, full.stderr[-2000:]
    killed = _train(script, tmp_path / "run", kill_at=7)  # "mix" is done by then, "lora" mid-window
    assert killed.returncode == -9  # SIGKILL, mid-run
    assert not (tmp_path / "run" / "lora" / "adapter_model.safetensors").exists()  # no final adapter yet
    assert [s for s, _ in list_checkpoints(tmp_path / "run" / "lora")] == [2, 3]  # save_total_limit=2
    resumed = _train(script, tmp_path / "run", resume=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    for job in ("lora", "mix"):
        a = load_file(tmp_path / "full" / job / "adapter_model.safetensors")
        b = load_file(tmp_path / "run" / job / "adapter_model.safetensors")
        assert a.keys() == b.keys()
        assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6, job
    # the LoRA job is a plain PEFT LoRA adapter: it loads in a process that never imports peft_mole
    check = subprocess.run([sys.executable, "-c", textwrap.dedent(f"""
        import sys
        from peft import PeftConfig, PeftModel
        from transformers import AutoModelForCausalLM, LlamaConfig
        cfg = PeftConfig.from_pretrained({str(tmp_path / "run" / "lora")!r})
        assert cfg.peft_type == "LORA", cfg.peft_type
        base = AutoModelForCausalLM.from_config(LlamaConfig(hidden_size=64, intermediate_size=172, num_hidden_layers=2,
            num_attention_heads=4, vocab_size=512))
        model = PeftModel.from_pretrained(base, {str(tmp_path / "run" / "lora")!r})
        assert "peft_mole" not in sys.modules
        print("loaded", sum(p.numel() for n, p in model.named_parameters() if "lora_" in n))
    """)], capture_output=True, text=True, timeout=120)
    assert check.returncode == 0, check.stderr[-2000:]
    assert "loaded 2048" in check.stdout  # (64x4 + 4x64) x 2 projections x 2 layers


def test_a_failed_write_leaves_the_previous_checkpoint(tmp_path):
    def good(d):
        torch.save({"x": 1}, os.path.join(d, "optimizer.pt"))
        open(os.path.join(d, "job_state.json"), "w").write("{}")

    write_atomically(str(tmp_path / "checkpoint-1"), good)

    def disk_full(d):
        open(os.path.join(d, "adapter_model.safetensors"), "wb").write(b"partial")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        write_atomically(str(tmp_path / "checkpoint-2"), disk_full)
    with pytest.raises(OSError, match="No space left"):
        write_atomically(str(tmp_path / "checkpoint-1"), disk_full)  # overwriting keeps the old one too
    assert [s for s, _ in list_checkpoints(tmp_path)] == [1]
    assert torch.load(tmp_path / "checkpoint-1" / "optimizer.pt", weights_only=True) == {"x": 1}
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-1"]  # no temporary folder left behind


def test_a_failed_write_of_the_summary_or_a_failure_record_leaves_the_previous_file(tmp_path, monkeypatch):
    """`jobs_summary.json` and `job_failed.json` (`checkpoint.write_json`): before, written in place, a disk that
    filled midway left a truncated file where the previous summary was."""
    from peft_mole.multijob import checkpoint, report

    row = {"job": "a", "status": "done", "steps": 3, "tokens": 10, "time_share": 1.0, "final_loss": 1.0,
           "error": None}
    report.write_summary([row], 0.0, str(tmp_path))
    real_dump = json.dump

    def disk_full(data, f, **kwargs):
        f.write(json.dumps(data, **kwargs)[:40])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(json, "dump", disk_full)
    with pytest.raises(OSError, match="No space left"):
        report.write_summary([dict(row, status="failed")], 0.0, str(tmp_path))
    monkeypatch.setattr(json, "dump", real_dump)
    assert checkpoint.read_json(str(tmp_path / "jobs_summary.json"))["jobs"][0]["status"] == "done"
    assert sorted(os.listdir(tmp_path)) == ["jobs_summary.json"]  # no temporary file left behind
    assert oct(os.stat(tmp_path / "jobs_summary.json").st_mode & 0o777) == oct(0o666 & ~checkpoint._UMASK)
    # a file there keeps its permissions, and a symbolic link stays one, to the file written
    os.chmod(tmp_path / "jobs_summary.json", 0o640)
    os.rename(tmp_path / "jobs_summary.json", tmp_path / "kept.json")
    os.symlink("kept.json", tmp_path / "jobs_summary.json")
    report.write_summary([row], 1.0, str(tmp_path))
    assert os.path.islink(tmp_path / "jobs_summary.json")
    assert checkpoint.read_json(str(tmp_path / "kept.json"))["pad_fraction"] == 1.0
    assert oct(os.stat(tmp_path / "kept.json").st_mode & 0o777) == oct(0o640)



KILL_DURING_WRITE = textwrap.dedent('''
    import os, sys, time
    sys.path.insert(0, {root!r})
    import torch
    from peft_mole.multijob.checkpoint import write_atomically

    def slow_write(d):
        torch.save({{"step": 2}}, os.path.join(d, "optimizer.pt"))
        with open(os.path.join(d, "adapter_model.safetensors"), "wb") as f:
            f.write(b"half of the tensors")
            f.flush()
            print("writing", flush=True)
            time.sleep(60)  # killed here

    write_atomically(sys.argv[1], slow_write)
''')


def test_kill_9_during_a_checkpoint_write_keeps_the_previous_one(tmp_path):
    from peft_mole.multijob.checkpoint import prune_checkpoints

    def good(d):
        torch.save({"step": 1}, os.path.join(d, "optimizer.pt"))
        open(os.path.join(d, "job_state.json"), "w").write("{}")

    write_atomically(str(tmp_path / "checkpoint-1"), good)
    script = tmp_path / "writer.py"
    script.write_text(KILL_DURING_WRITE.format(root=os.getcwd()))
    writer = subprocess.Popen([sys.executable, str(script), str(tmp_path / "checkpoint-2")], stdout=subprocess.PIPE,
                              text=True)
    assert writer.stdout.readline().strip() == "writing"
    writer.kill()  # SIGKILL in the middle of the write
    writer.wait(timeout=30)
    assert writer.returncode == -9
    assert [s for s, _ in list_checkpoints(tmp_path)] == [1]  # the half-written one is invisible
    assert torch.load(tmp_path / "checkpoint-1" / "optimizer.pt", weights_only=True) == {"step": 1}
    assert any(name.startswith(".tmp-checkpoint-2") for name in os.listdir(tmp_path))
    prune_checkpoints(str(tmp_path), keep=None)  # the next completed write clears the leftovers
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-1", "writer.py"]


KILL_BETWEEN_SWAP_RENAMES = textwrap.dedent('''
    import os, sys, time
    sys.path.insert(0, {root!r})
    from peft_mole.multijob import checkpoint

    real_replace, calls = os.replace, []

    def replace(src, dst):
        calls.append(dst)
        if len(calls) == 2:  # the old checkpoint has moved away, the new one not yet in
            print("between", flush=True)
            time.sleep(60)  # killed here
        real_replace(src, dst)

    checkpoint.os.replace = replace
    checkpoint.write_atomically(sys.argv[1], lambda d: open(os.path.join(d, "job_state.json"), "w").write("new"))
''')


def test_kill_9_while_a_step_is_checkpointed_again_keeps_the_old_one(tmp_path):
    """A stopping callback writes again the checkpoint its step wrote: the old one is swapped out, then the new one
    in. Before: a kill between the two renames left no checkpoint-2, and resume started the job over."""
    from peft_mole.multijob.checkpoint import prune_checkpoints

    write_atomically(str(tmp_path / "checkpoint-2"), lambda d: open(os.path.join(d, "job_state.json"), "w").write("old"))
    script = tmp_path / "writer.py"
    script.write_text(KILL_BETWEEN_SWAP_RENAMES.format(root=os.getcwd()))
    writer = subprocess.Popen([sys.executable, str(script), str(tmp_path / "checkpoint-2")], stdout=subprocess.PIPE,
                              text=True)
    assert writer.stdout.readline().strip() == "between"
    writer.kill()
    writer.wait(timeout=30)
    assert not (tmp_path / "checkpoint-2").exists()  # the window this guards
    assert [s for s, _ in list_checkpoints(tmp_path)] == [2]  # restored
    assert (tmp_path / "checkpoint-2" / "job_state.json").read_text() == "old"
    prune_checkpoints(str(tmp_path), keep=None)
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-2", "writer.py"]


def test_the_final_folder_gets_its_job_state_last(tmp_path, monkeypatch):
    """Before: the .json files were moved in listdir's order, so job_state.json (the job ended) could land before
    adapter_config.json, and a kill in between left a finished job whose folder did not load."""
    from peft_mole.multijob import checkpoint

    names = ["adapter_model.safetensors", "job_state.json", "adapter_config.json", "tokenizer.json", "README.md"]
    moved = []
    real_listdir, real_replace = os.listdir, os.replace
    monkeypatch.setattr(checkpoint.os, "listdir", lambda d: names if ".tmp-final-" in str(d) else real_listdir(d))
    monkeypatch.setattr(checkpoint.os, "replace", lambda src, dst: (moved.append(os.path.basename(dst)),
                                                                     real_replace(src, dst)))

    def write(tmp):
        for name in names:
            open(os.path.join(tmp, name), "w").close()

    checkpoint.replace_files_atomically(str(tmp_path / "job"), write)
    assert moved[-1] == "job_state.json" and moved[0] == "adapter_model.safetensors"
    assert sorted(moved) == sorted(names)


class _StopAt(TrainerCallback):
    """Stops training at one mixed step, as a preemption or time-limit callback does."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def _whole_and_stopped(make, tmp_path):
    """Train `make(tmp_path / "whole")` through, and `make(tmp_path / "stopped", callbacks)` until a callback stops
    it at mixed step 3; return both trainers."""
    whole = make(tmp_path / "whole")
    whole.train()
    stopped = make(tmp_path / "stopped", [_StopAt(3)])
    stopped.train()
    return whole, stopped


@pytest.mark.parametrize(("padding_free", "compiled"), [(False, False), (True, False), (False, True)],
                         ids=["padded", "padding-free", "compiled"])
def test_a_callback_stopping_training_checkpoints_every_unfinished_job_and_resume_ends_the_same(
        assets, tmp_path, padding_free, compiled):
    """`control.should_training_stop` from a callback, in the middle of the LoRA job's accumulation window (2
    micro-batches) and between the MixLoRA job's checkpoints: each unfinished job is checkpointed at its last
    optimizer step (nothing is lost), and resuming ends with the uninterrupted run's adapters. With dropout and
    router jitter on: each job's random stream is part of its checkpoint, and a job's draws do not depend on the
    jobs beside it. The resumed run pairs the jobs' micro-batches otherwise than the uninterrupted one, so padded
    steps pad a job's rows to other widths: each job draws over its own width (`ops.dropout.stream_draw`).
    `step_overhead_tokens="auto"` (the default) may cut the LoRA job's micro-batches into steps by measured step
    times, otherwise in each run: the pieces draw as the whole (`MultiJobModel.drawing_pieces`). Compiled steps
    (`torch_compile=True`, the "eager" backend: Dynamo's graphs run as traced, 22 s where aot_eager took 60 s, on
    two layers; one now, 10 s) resume alike: the per-row LoRA products, the MixLoRA per-row block and their draws
    give the uninterrupted run's adapters (1.5e-8 apart on two layers: the resumed run's steps hold other rows)."""
    tokenizer, datasets = assets
    compile_args = dict(torch_compile=True, torch_compile_backend="eager") if compiled else {}
    torch._dynamo.reset()

    def trainer(out, callbacks=()):
        noise = 0.2
        # the LoRA job's rows are shorter than the MixLoRA job's, whose micro-batches' widths vary (not truncated)
        jobs = [JobConfig("lora", LoraConfig(r=4, lora_alpha=8, lora_dropout=noise, target_modules=ALL_LINEAR),
                          datasets["capital"], gradient_accumulation_steps=2, max_steps=3),
                JobConfig("mix", mixlora(lora_dropout=noise, jitter_noise=noise), datasets["sentiment"],
                          per_device_train_batch_size=2, max_steps=5, save_steps=4)]
        args = run_args(out, save_strategy="steps", save_steps=100, padding_free=padding_free,
                        max_length=None if padding_free else 128, **compile_args)
        base = (one_layer_base if compiled else tiny_base)(vocab_size=len(tokenizer))
        built = MultiJobTrainer(model=base, jobs=jobs, processing_class=tokenizer, args=args,
                                callbacks=list(callbacks))
        randomize_adapters(built.jobs_model, seed=3)
        return built

    whole, stopped = _whole_and_stopped(trainer, tmp_path)  # mixed step 3: "lora" has stepped once and is one
    # micro-batch into its second window
    state = {run.name: (run.status, run.global_step) for run in stopped.runs}
    assert state == {"lora": ("running", 1), "mix": ("running", 3)}
    assert [step for step, _ in list_checkpoints(tmp_path / "stopped" / "lora")] == [1]
    assert [step for step, _ in list_checkpoints(tmp_path / "stopped" / "mix")] == [3]
    resumed = trainer(tmp_path / "stopped")
    counters.clear()
    resumed.train(resume_from_checkpoint=True)
    assert (counters["stats"]["unique_graphs"] >= 1) == compiled  # the resumed steps ran compiled
    assert {run.name: (run.status, run.global_step) for run in resumed.runs} == {"lora": ("done", 3),
                                                                                   "mix": ("done", 5)}
    assert resumed.jobs_model.__dict__.get("_compiled_steps", False) == compiled
    for job in ("lora", "mix"):
        uninterrupted = load_file(tmp_path / "whole" / job / "adapter_model.safetensors")
        again = load_file(tmp_path / "stopped" / job / "adapter_model.safetensors")
        assert max((uninterrupted[k] - again[k]).abs().max().item() for k in uninterrupted) <= 1e-6, job
    # the summary counts the whole run: the window begun before the stop is not counted twice (tokens were 8 % over)
    expected = {row["job"]: row for row in whole.job_summary}
    for row in resumed.job_summary:
        assert (row["steps"], row["tokens"]) == (expected[row["job"]]["steps"], expected[row["job"]]["tokens"])
        assert row["final_loss"] == pytest.approx(expected[row["job"]]["final_loss"], rel=1e-5)
    assert sum(row["time_share"] for row in resumed.job_summary) == pytest.approx(1.0)  # (was over 1)
    steps = [h["step"] for h in resumed.state.log_history if "step" in h]  # (the stopped run's logs included)
    assert steps == sorted(steps) and steps[0] == 1 and steps[-1] > 3  # it counts on, as Trainer's global_step
    for job in ("lora", "mix"):  # the log history holds each job's logs from before the stop too, as Trainer's
        # resume restores it (before 2026-12-07 it started again: the resumed run had the later steps' logs only)
        logged = [h[f"{job}/{key}"] for h in resumed.state.log_history if f"{job}/loss" in h
                  for key in ("step", "loss", "learning_rate")]
        assert logged == pytest.approx([h[f"{job}/{key}"] for h in whole.state.log_history if f"{job}/loss" in h
                                        for key in ("step", "loss", "learning_rate")], rel=1e-5), job
    for job in ("lora", "mix"):  # a job's last log after the resume: its input tokens counted on, its epoch
        last = [h for h in resumed.state.log_history if f"{job}/loss" in h][-1]
        expected = [h for h in whole.state.log_history if f"{job}/loss" in h][-1]
        for key in ("num_tokens", "epoch", "step", "mean_token_accuracy"):
            assert last[f"{job}/{key}"] == pytest.approx(expected[f"{job}/{key}"], rel=1e-6), (job, key)


@pytest.mark.parametrize("workers", [0, 2], ids=["no-workers", "persistent-workers"])
def test_resume_continues_each_jobs_length_grouped_order(assets, tmp_path, workers):
    """With `group_by_length` each job's permutation comes from its own data state, which a checkpoint keeps
    (`multijob.data_order`): stopped in the middle of one job's second epoch, at the end of another's, and in the
    middle of a third's first window of its second epoch, the resumed run trains the uninterrupted run's batches.
    Before: the resumed epoch drew a new permutation (5e-4). Persistent workers draw their base seed at the
    loader's first epoch only; the resumed run's new iterators draw none where the uninterrupted run drew none
    (before: one extra draw each, 5e-4)."""
    tokenizer, datasets = assets
    loading = dict(dataloader_num_workers=workers, dataloader_persistent_workers=workers > 0)

    def trainer(out, callbacks=()):
        lora = dict(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=ALL_LINEAR)
        jobs = [JobConfig("a", LoraConfig(**lora), datasets["sentiment"], num_train_epochs=2),  # 6 steps an epoch
                JobConfig("b", LoraConfig(**lora), datasets["capital"], per_device_train_batch_size=6,
                          num_train_epochs=3, seed=4),  # 4 steps an epoch
                JobConfig("c", LoraConfig(**lora), datasets["add"], gradient_accumulation_steps=4,
                          num_train_epochs=3, seed=2)]  # 2 windows of 4 and 2 micro-batches an epoch
        args = run_args(out, save_strategy="steps", save_steps=100, max_steps=-1,
                        train_sampling_strategy="group_by_length", **loading)
        return MultiJobTrainer(model=tiny_base(vocab_size=len(tokenizer)), jobs=jobs, processing_class=tokenizer,
                               args=args, callbacks=list(callbacks))

    trainer(tmp_path / "whole").train()
    stopped = trainer(tmp_path / "stopped", [_StopAt(8)])
    stopped.train()
    assert {run.name: (run.global_step, run.epoch, run.state_dict()["batches_done"], run.window_pos)
            for run in stopped.runs} == {"a": (8, 1, 2, 1), "b": (8, 1, 4, 1), "c": (2, 1, 0, 2)}
    # in a's second epoch; at the end of b's second; c half-way through the first window of its second epoch
    trainer(tmp_path / "stopped").train(resume_from_checkpoint=True)
    for job in ("a", "b", "c"):
        uninterrupted = load_file(tmp_path / "whole" / job / "adapter_model.safetensors")
        again = load_file(tmp_path / "stopped" / job / "adapter_model.safetensors")
        assert max((uninterrupted[k] - again[k]).abs().max().item() for k in uninterrupted) <= 1e-6, job


def test_resume_says_an_ended_job_is_not_trained_further_and_a_finished_job_drops_its_old_failure(
        assets, tmp_path, caplog):
    tokenizer, datasets = assets

    def trainer(max_steps, epochs=None):
        job = JobConfig("a", LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=ALL_LINEAR),
                        datasets["add"], max_steps=max_steps, num_train_epochs=epochs)
        return MultiJobTrainer(model=tiny_base(vocab_size=len(tokenizer)), jobs=[job], processing_class=tokenizer,
                               args=run_args(tmp_path, save_strategy="steps", save_steps=1))

    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "job_failed.json").write_text('{"status": "failed"}')  # left by an earlier, failed run
    first = trainer(2)
    first.train()
    assert not (tmp_path / "a" / "job_failed.json").exists()
    with caplog.at_level("WARNING"):
        again = trainer(4)
        again.train(resume_from_checkpoint=True)
    assert [(r.status, r.global_step) for r in again.runs] == [("done", 2)]
    assert [h["a/step"] for h in again.state.log_history if "a/loss" in h] == [1, 2]  # its logs, from its end
    # the ended job's summary is its run's, not zeros (it was tokens 0, final_loss None)
    assert [(r["tokens"], r["final_loss"]) for r in again.job_summary] == [
        (r["tokens"], r["final_loss"]) for r in first.job_summary]
    # no mixed step in the resumed call: its padding is unknown, not 0 (it read 0.0)
    assert json.loads((tmp_path / "jobs_summary.json").read_text())["pad_fraction"] is None
    assert "job a ended at step 2; resume does not train an ended job further (its max_steps is now 4)" in caplog.text
    with caplog.at_level("WARNING"):
        trainer(None, epochs=2.0).jobs[0].training_args(run_args(tmp_path))
    assert "job a: num_train_epochs=2.0 has no effect, since max_steps=3" in caplog.text


@pytest.mark.parametrize("earlier", ["with-ids", "before-ids"])
def test_a_new_run_in_an_earlier_runs_folders_resumes_from_its_own_checkpoints_only(assets, tmp_path, caplog,
                                                                                   earlier):
    """Before, a run started afresh where an earlier one had ended, then stopped and resumed, took the earlier
    run's final state for its own end (the job 'done', with the earlier adapter: 0.02 from the new run's); a new
    run's checkpoints would also be pruned in favour of the earlier run's later steps, and a resume continue from
    those. Now each run has an id (`run.json`), and its resume and pruning see its own checkpoints only."""
    tokenizer, datasets = assets

    def trainer(out, learning_rate, callbacks=()):
        job = JobConfig("a", LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=ALL_LINEAR),
                        datasets["add"], max_steps=4, learning_rate=learning_rate)
        return MultiJobTrainer(model=tiny_base(vocab_size=len(tokenizer)), jobs=[job], processing_class=tokenizer,
                               args=run_args(out, save_strategy="steps", save_steps=1, save_total_limit=2),
                               callbacks=list(callbacks))

    trainer(tmp_path / "shared", 1e-2).train()  # the earlier run: ends, checkpoints 3 and 4 kept
    assert [step for step, _ in list_checkpoints(tmp_path / "shared" / "a")] == [3, 4]
    if earlier == "before-ids":  # a run of an earlier version: no run.json, no run_id in its states
        os.remove(tmp_path / "shared" / "a" / "run.json")
        for state in (tmp_path / "shared" / "a").glob("**/job_state.json"):
            state.write_text(json.dumps({k: v for k, v in json.loads(state.read_text()).items() if k != "run_id"}))
    trainer(tmp_path / "clean", 1e-3).train()  # the new run alone, uninterrupted
    with caplog.at_level("WARNING"):
        trainer(tmp_path / "shared", 1e-3, [_StopAt(2)]).train()   # the new run, in the earlier run's folders
    assert "holds checkpoints of an earlier run (steps [3, 4]); they are kept" in caplog.text
    assert [step for step, _ in list_checkpoints(tmp_path / "shared" / "a")] == [1, 2, 3, 4]   # none pruned
    resumed = trainer(tmp_path / "shared", 1e-3)
    resumed.train(resume_from_checkpoint=True)
    assert [(r.status, r.global_step) for r in resumed.runs] == [("done", 4)]
    clean = load_file(tmp_path / "clean" / "a" / "adapter_model.safetensors")
    again = load_file(tmp_path / "shared" / "a" / "adapter_model.safetensors")
    assert max((clean[k] - again[k]).abs().max().item() for k in clean) <= 1e-6


def test_checkpoint_folders_get_the_usual_permissions(tmp_path):
    """A checkpoint folder is made as any other (mode 0777 less the process's umask), as Trainer's are; `mkdtemp`,
    where it is written first, makes it private (0700), which locked other users of a shared output_dir out."""
    from peft_mole.multijob import checkpoint

    final = write_atomically(str(tmp_path / "checkpoint-1"), lambda tmp: open(os.path.join(tmp, "x"), "w").close())
    assert os.stat(final).st_mode & 0o777 == 0o777 & ~checkpoint._UMASK != 0o700


def test_resuming_on_the_same_trainer_adds_no_gradient_left_by_the_stop(assets, tmp_path):
    """A stop inside an accumulation window leaves the window's first gradients on the parameters (per-tensor
    optimizers: `adamw_torch`); `train(resume_from_checkpoint=True)` on that same trainer added its first window to
    them (1.3e-3 off). Each run of `train()` now starts its jobs without gradients."""
    tokenizer, datasets = assets

    def trainer(out, callbacks=()):
        jobs = [JobConfig("lora", LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=ALL_LINEAR),
                          datasets["capital"], gradient_accumulation_steps=2, max_steps=3)]
        built = MultiJobTrainer(model=tiny_base(vocab_size=len(tokenizer)), jobs=jobs, processing_class=tokenizer,
                                args=run_args(out, save_strategy="steps", save_steps=100, optim="adamw_torch"),
                                callbacks=list(callbacks))
        randomize_adapters(built.jobs_model, seed=3)
        return built

    _, stopped = _whole_and_stopped(trainer, tmp_path)  # one optimizer step, and one micro-batch into the window
    assert any(p.grad is not None for p in stopped.jobs_model.job_parameters("lora").values())
    stopped.callback_handler.pop_callback(_StopAt)
    stopped.train(resume_from_checkpoint=True)
    uninterrupted = load_file(tmp_path / "whole" / "lora" / "adapter_model.safetensors")
    resumed = load_file(tmp_path / "stopped" / "lora" / "adapter_model.safetensors")
    assert max((uninterrupted[k] - resumed[k]).abs().max().item() for k in uninterrupted) <= 1e-6

"""Each job's best checkpoint, as Trainer keeps its one: `metric_for_best_model` ("eval_loss" / "loss") tracks it,
`save_total_limit` keeps it, `load_best_model_at_end` makes it the job's final adapter (`multijob.best_checkpoint`).
The jobs' eval losses are scripted per step, so which checkpoint is best is known."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig
from safetensors.torch import load_file
from transformers import TrainerCallback

from peft_mole import JobConfig, MultiJobTrainer
from peft_mole.multijob.best_checkpoint import checkpoints_to_delete
from tests.helpers import mixlora, tiny_base
from tests.multijob.test_trainer import ALL_LINEAR, run_args

# the eval loss of each job after its steps 1..5: "lora" is best at step 2, "mix" at its last step
EVAL_LOSSES = {"lora": [3.0, 1.0, 2.0, 4.0, 5.0], "mix": [5.0, 4.0, 3.0, 2.0, 1.0]}


def jobs(datasets, **overrides) -> list[JobConfig]:
    return [JobConfig("lora", LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=ALL_LINEAR),
                      datasets["capital"], eval_dataset=datasets["capital"], **overrides),
            JobConfig("mix", mixlora(), datasets["sentiment"], eval_dataset=datasets["sentiment"], **overrides)]


def trainer(assets, out, callbacks=(), **overrides) -> MultiJobTrainer:
    """Two jobs of 5 steps, evaluated and saved after each, learning fast enough that every step's adapter differs;
    a job's eval loss after step s is EVAL_LOSSES[job][s - 1]."""
    tokenizer, datasets = assets
    settings = dict(max_steps=5, learning_rate=5e-2, eval_strategy="steps", eval_steps=1, save_strategy="steps",
                    save_steps=1, save_total_limit=1, metric_for_best_model="eval_loss")
    made = MultiJobTrainer(model=tiny_base(vocab_size=len(tokenizer)), jobs=jobs(datasets),
                           args=run_args(out, **{**settings, **overrides}), processing_class=tokenizer,
                           callbacks=list(callbacks))
    steps = lambda name: next(run.global_step for run in made.runs if run.name == name)  # noqa: E731
    # before the first step (eval_on_start): lower than any later loss
    made._eval_loss = lambda name, batch_size: EVAL_LOSSES[name][steps(name) - 1] if steps(name) else 0.5
    return made


def adapter(folder) -> dict[str, torch.Tensor]:
    return load_file(folder / "adapter_model.safetensors")


def equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_save_total_limit_keeps_the_newest_checkpoints_and_the_best_one_as_trainer():
    paths = [f"/o/checkpoint-{s}" for s in (1, 2, 3, 4, 5)]
    assert checkpoints_to_delete(paths, 1, None) == paths[:4]
    assert checkpoints_to_delete(paths, 1, "checkpoint-2") == [paths[0], paths[2], paths[3]]  # best and latest
    assert checkpoints_to_delete(paths, 3, "checkpoint-2") == [paths[0], paths[2]]  # best, then the newest two
    assert checkpoints_to_delete(paths, 2, "checkpoint-5") == paths[:3]  # the best is the latest
    assert checkpoints_to_delete(paths, None, "checkpoint-2") == [] and checkpoints_to_delete(paths, 0, None) == []
    assert checkpoints_to_delete(paths, 2, "checkpoint-9") == paths[:3]  # a best of another run: not in the list


@pytest.mark.parametrize("load_best", [True, False], ids=["load_best_model_at_end", "metric_only"])
def test_the_best_checkpoint_is_kept_and_with_load_best_model_at_end_is_the_final_adapter(assets, tmp_path, load_best):
    """save_total_limit=1 keeps a job's latest checkpoint and its best (before: the latest alone, and
    metric_for_best_model was refused); with load_best_model_at_end the final adapter is the best checkpoint's, bit
    for bit, and without it the last step's. Each job's state names its best checkpoint."""
    made = trainer(assets, tmp_path, load_best_model_at_end=load_best)
    made.train()
    assert sorted(p.name for p in (tmp_path / "lora").glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-5"]
    assert sorted(p.name for p in (tmp_path / "mix").glob("checkpoint-*")) == ["checkpoint-5"]
    best, last = adapter(tmp_path / "lora" / "checkpoint-2"), adapter(tmp_path / "lora" / "checkpoint-5")
    assert not equal(best, last)
    assert equal(adapter(tmp_path / "lora"), best if load_best else last)
    assert equal(adapter(tmp_path / "mix"), adapter(tmp_path / "mix" / "checkpoint-5"))
    state = json.loads((tmp_path / "lora" / "job_state.json").read_text())
    assert (state["best_model_checkpoint"], state["best_global_step"], state["best_eval_loss"]) == ("checkpoint-2", 2,
                                                                                                   1.0)
    assert state["global_step"] == 5 and state["status"] == "done"


class _StopAt(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 3:
            control.should_training_stop = True


def test_a_resumed_run_keeps_the_best_checkpoint_of_the_run_before_it(assets, tmp_path):
    """Stopped after step 3 (best: step 2) and resumed: the best checkpoint is kept through the resumed run's saves
    and is the final adapter, as in the uninterrupted run."""
    whole = trainer(assets, tmp_path / "whole", load_best_model_at_end=True)
    whole.train()
    trainer(assets, tmp_path / "cut", callbacks=[_StopAt()], load_best_model_at_end=True).train()
    assert sorted(p.name for p in (tmp_path / "cut" / "lora").glob("checkpoint-*")) == ["checkpoint-2",
                                                                                         "checkpoint-3"]
    trainer(assets, tmp_path / "cut", load_best_model_at_end=True).train(resume_from_checkpoint=True)
    assert sorted(p.name for p in (tmp_path / "cut" / "lora").glob("checkpoint-*")) == ["checkpoint-2",
                                                                                         "checkpoint-5"]
    assert equal(adapter(tmp_path / "cut" / "lora"), adapter(tmp_path / "whole" / "lora"))  # both step 2's
    cut, whole = adapter(tmp_path / "cut" / "mix"), adapter(tmp_path / "whole" / "mix")  # a resume's rounding
    assert max((cut[k] - whole[k]).abs().max().item() for k in whole) <= 1e-5
    assert equal(adapter(tmp_path / "cut" / "lora"), adapter(tmp_path / "cut" / "lora" / "checkpoint-2"))


def test_a_best_checkpoint_that_cannot_be_loaded_fails_its_job_alone(assets, tmp_path):
    """The best checkpoint deleted before the job ends: the job fails naming it (its other checkpoints stay), the
    other job ends with its best adapter."""

    class DeleteBest(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 4:
                (tmp_path / "lora" / "checkpoint-2" / "adapter_model.safetensors").unlink()

    made = trainer(assets, tmp_path, callbacks=[DeleteBest()], load_best_model_at_end=True)
    made.train()
    summary = {row["job"]: row for row in made.job_summary}
    assert summary["lora"]["status"] == "failed" and "its best checkpoint checkpoint-2 could not be loaded" in \
        json.loads((tmp_path / "lora" / "job_failed.json").read_text())["error"]
    assert (tmp_path / "lora" / "checkpoint-5").is_dir() and summary["mix"]["status"] == "done"


def test_best_model_options_the_jobs_cannot_honour_are_refused(assets, tmp_path):
    tokenizer, datasets = assets

    def make(job_list=None, **overrides):
        settings = dict(eval_strategy="steps", save_strategy="steps", eval_steps=2, save_steps=4)
        MultiJobTrainer(model=tiny_base(vocab_size=len(tokenizer)), jobs=job_list or jobs(datasets),
                        args=run_args(tmp_path, **{**settings, **overrides}), processing_class=tokenizer)

    with pytest.raises(ValueError, match=r"metric_for_best_model must be one of \['eval_loss', 'loss'\] .* got "
                                         "'accuracy'"):
        make(metric_for_best_model="accuracy", greater_is_better=False)
    with pytest.raises(ValueError, match="greater_is_better=True: a job's best checkpoint is the one of its lowest"):
        make(metric_for_best_model="eval_loss", greater_is_better=True)
    no_eval = [JobConfig("plain", LoraConfig(r=4, target_modules=ALL_LINEAR), datasets["add"])]
    with pytest.raises(ValueError, match="load_best_model_at_end=True: job 'plain' has no eval_dataset"):
        make(no_eval, load_best_model_at_end=True)
    with pytest.raises(ValueError, match="job 'lora' saves every 3 steps and evaluates every 2; its save_steps must "
                                         "be a multiple of its eval_steps"):
        make(jobs(datasets, save_steps=3), load_best_model_at_end=True)
    make(jobs(datasets, save_steps=6), load_best_model_at_end=True)  # a multiple: taken
    with pytest.raises(ValueError, match="job 'lora' has save_steps=0.5 and eval_steps=2: both must be fractions"):
        make(jobs(datasets, save_steps=0.5), load_best_model_at_end=True)
    make(no_eval, metric_for_best_model="loss", eval_strategy="no")  # tracked where evaluated: here nowhere
    with pytest.raises(ValueError, match="save_strategy='best': job 'lora' is never evaluated"):
        make(eval_strategy="no", save_strategy="best", metric_for_best_model="loss")
    make(jobs(datasets, eval_steps=2), eval_strategy="no", save_strategy="best", metric_for_best_model="loss")
    # a job's eval_steps 0 is its logging_steps, as it runs (it was a ZeroDivisionError, or a false refusal)
    make(jobs(datasets, eval_steps=0, logging_steps=2), load_best_model_at_end=True)
    with pytest.raises(ValueError, match="job 'lora' has save_steps=0.5 and eval_steps=1: both must be fractions"):
        make(jobs(datasets, eval_steps=0, save_steps=0.5), load_best_model_at_end=True)
    # and a job's own logging_steps are its default eval_steps where the trainer's are its logging_steps
    with pytest.raises(ValueError, match="job 'lora' saves every 4 steps and evaluates every 3"):
        make(jobs(datasets, logging_steps=3), load_best_model_at_end=True, eval_steps=None)


def test_save_strategy_best_saves_a_job_after_each_new_lowest_eval_loss(assets, tmp_path):
    """save_strategy="best" (before: refused): a job's checkpoint after each evaluation that lowered its eval loss,
    none after the others (not the last step either, as Trainer); a job without an eval set is refused."""
    made = trainer(assets, tmp_path, save_strategy="best", save_total_limit=None)
    made.train()
    assert sorted(p.name for p in (tmp_path / "lora").glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    assert sorted(p.name for p in (tmp_path / "mix").glob("checkpoint-*")) == [f"checkpoint-{s}" for s in range(1, 6)]
    tokenizer, datasets = assets
    no_eval = [JobConfig("plain", LoraConfig(r=4, target_modules=ALL_LINEAR), datasets["add"])]
    with pytest.raises(ValueError, match="save_strategy='best': job 'plain' has no eval_dataset.*"
                                         "save_strategy='steps'"):
        MultiJobTrainer(model=tiny_base(vocab_size=len(tokenizer)), jobs=no_eval, processing_class=tokenizer,
                        args=run_args(tmp_path, save_strategy="best", metric_for_best_model="loss"))


def test_a_job_stopped_early_ends_with_its_best_checkpoint(assets, tmp_path):
    """Early stopping with `load_best_model_at_end`, as EarlyStoppingCallback with Trainer: the "lora" job stops after
    two evaluations without a lower loss (steps 3 and 4) and ends with its step-2 adapter; its state says so."""
    made = trainer(assets, tmp_path, load_best_model_at_end=True)
    made.jobs[0].early_stopping_patience = 2  # (read at each evaluation)
    made.train()
    assert {row["job"]: (row["status"], row["steps"]) for row in made.job_summary}["lora"] == ("stopped_early", 4)
    assert equal(adapter(tmp_path / "lora"), adapter(tmp_path / "lora" / "checkpoint-2"))
    assert sorted(p.name for p in (tmp_path / "lora").glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    state = json.loads((tmp_path / "lora" / "job_state.json").read_text())
    assert (state["status"], state["global_step"], state["best_model_checkpoint"]) == ("stopped_early", 4,
                                                                                     "checkpoint-2")
    # killed after the stop's checkpoint (which says so) and before the final folder's state was renamed into place,
    # its staging folder left: a resume ends the job as it was, stopped at step 4 with its best adapter (before
    # 2026-12-08 it trained steps 5 on), and clears the staging folder
    assert json.loads((tmp_path / "lora" / "checkpoint-4" / "job_state.json").read_text())["stopping"] is True
    assert json.loads((tmp_path / "lora" / "checkpoint-2" / "job_state.json").read_text())["stopping"] is False
    final = adapter(tmp_path / "lora")
    (tmp_path / "lora" / "job_state.json").unlink()
    (tmp_path / "lora" / ".tmp-final-killed").mkdir()
    resumed = trainer(assets, tmp_path, load_best_model_at_end=True)
    resumed.jobs[0].early_stopping_patience = 2
    resumed.train(resume_from_checkpoint=True)
    assert {row["job"]: (row["status"], row["steps"]) for row in resumed.job_summary}["lora"] == ("stopped_early", 4)
    assert equal(adapter(tmp_path / "lora"), final)
    assert json.loads((tmp_path / "lora" / "job_state.json").read_text())["status"] == "stopped_early"
    assert not (tmp_path / "lora" / ".tmp-final-killed").exists()


def test_an_evaluation_on_start_makes_no_best_checkpoint(assets, tmp_path):
    """`eval_on_start`'s loss (here lower than any later one) is no best, as in Trainer: the evaluations after steps
    still write their checkpoints under save_strategy="best" (before, none was written after it)."""
    made = trainer(assets, tmp_path, save_strategy="best", save_total_limit=None, eval_on_start=True)
    made.train()
    assert sorted(p.name for p in (tmp_path / "lora").glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    assert [h["lora/eval_loss"] for h in made.state.log_history if "lora/eval_loss" in h][0] == 0.5


def test_a_resumed_run_whose_best_checkpoint_is_gone_warns_and_keeps_its_own_best(assets, tmp_path, caplog):
    """The best checkpoint deleted between the runs: the resume warns, as Trainer's does, and the job ends with the
    best of its own checkpoints (none here: steps 4 and 5 were worse), its last adapter, instead of failing."""
    import shutil

    trainer(assets, tmp_path, callbacks=[_StopAt()], load_best_model_at_end=True).train()
    shutil.rmtree(tmp_path / "lora" / "checkpoint-2")
    resumed = trainer(assets, tmp_path, load_best_model_at_end=True)
    with caplog.at_level("WARNING", logger="peft_mole.multijob.trainer"):
        resumed.train(resume_from_checkpoint=True)
    assert "its best checkpoint checkpoint-2 is gone" in caplog.text
    assert {row["job"]: row["status"] for row in resumed.job_summary}["lora"] == "done"
    assert equal(adapter(tmp_path / "lora"), adapter(tmp_path / "lora" / "checkpoint-5"))


def test_fractions_of_max_steps_that_round_to_no_multiple_are_refused_at_train(assets, tmp_path):
    """eval_steps=0.25 and save_steps=0.5 of 10 steps: every 3 and every 5 steps (rounded up, as the job counts
    them), so a best evaluation at steps 3, 6 or 9 would have no checkpoint: refused before any step."""
    from peft_mole.multijob.trainer_args import JobSetupError

    made = trainer(assets, tmp_path, max_steps=10, eval_steps=0.25, save_steps=0.5, load_best_model_at_end=True)
    with pytest.raises(JobSetupError, match=r"job 'lora' saves every 5 and evaluates every 3 of its 10 steps "
                                            r"\(save_steps=0.5, eval_steps=0.25\)"):
        made.train()


class _StopAtFirst(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        control.should_training_stop = state.global_step == 1


def test_a_stops_checkpoint_is_never_the_best_one(assets, tmp_path):
    """A callback stops both jobs at step 1, which evaluates (each job's lowest loss so far) but does not save
    (save_steps=2): the stop's checkpoint keeps the run, and it is not marked best, as the uninterrupted run has no
    checkpoint there (it was: load_best_model_at_end then ended the resumed run with it, 7.5e-2 off)."""
    made = trainer(assets, tmp_path, callbacks=[_StopAtFirst()], save_steps=2, save_total_limit=None)
    made.train()
    assert all((tmp_path / job / "checkpoint-1").is_dir() for job in ("lora", "mix"))
    assert {run.name: run.stats.best_checkpoint for run in made.runs} == {"lora": None, "mix": None}
    assert {run.name: run.stats.best_metric for run in made.runs} == {"lora": 3.0, "mix": 5.0}  # (tracked still)
    state = json.loads((tmp_path / "lora" / "checkpoint-1" / "job_state.json").read_text())
    assert state["best_model_checkpoint"] is None

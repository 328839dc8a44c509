"""Each job's best checkpoint, as Trainer keeps its one (`metric_for_best_model`, `load_best_model_at_end`).

A job has one evaluation metric, its eval loss (`<job>/eval_loss`, lower is better), so `metric_for_best_model` is
"eval_loss" or "loss" (Trainer's short name for it; `load_best_model_at_end` sets "loss" itself). As in Trainer:
- a checkpoint written right after an evaluation that gave the job its lowest eval loss so far becomes the job's
  best checkpoint (Trainer's `best_model_checkpoint`); its folder name is in the job's state, so a resume goes on
  with it;
- `save_total_limit` keeps the job's newest checkpoints and its best one besides (`checkpoints_to_delete`: with a
  limit of 1, the latest, which a resume needs, and the best);
- with `load_best_model_at_end`, a job that ends (done, or stopped early) takes its best checkpoint's adapter back
  before its final adapter is written (`MultiJobTrainer._finish`), so `output_dir/<job>/` holds the best adapter.
Every job then needs an eval set, and its `save_steps` a multiple of its `eval_steps` (its own values where the
`JobConfig` sets them), as TrainingArguments requires of the trainer's. `save_strategy="best"` writes a job's
checkpoint only after an evaluation that gave it a new lowest eval loss (`JobEvents.should_save`), as Trainer.
"""

from __future__ import annotations

import math
import os

from peft_mole.multijob.trainer_args import JobSetupError, option_name

BEST_METRICS = ("eval_loss", "loss")


def tracks_best(args) -> bool:
    """Whether a job's best checkpoint is tracked under `args`."""
    return args.metric_for_best_model is not None


def check_best_model_args(args, jobs) -> None:
    """Raise ValueError where `args` ask for a best checkpoint the jobs cannot have: another metric than the eval
    loss, `greater_is_better=True`; with `load_best_model_at_end` or `save_strategy="best"` a job without an eval
    set; with `load_best_model_at_end` and "steps" a job whose save steps are no multiple of its eval steps."""
    metric = args.metric_for_best_model
    if metric is None:
        return
    if metric not in BEST_METRICS:
        raise ValueError(f"metric_for_best_model must be one of {list(BEST_METRICS)} (a job's one evaluation metric is "
                         f"its eval loss, logged as <job>/eval_loss), got {metric!r}")
    if args.greater_is_better:
        raise ValueError("greater_is_better=True: a job's best checkpoint is the one of its lowest eval loss; set "
                         "greater_is_better=False or leave it unset")
    strategy = option_name(args.save_strategy)
    if not args.load_best_model_at_end and strategy != "best":
        return
    option, instead = (("load_best_model_at_end=True", "load_best_model_at_end=False") if args.load_best_model_at_end
                       else ("save_strategy='best'", "save_strategy='steps'"))
    evaluated = option_name(args.eval_strategy) != "no"
    for job in jobs:
        if job.eval_dataset is None:
            raise ValueError(f"{option}: job {job.name!r} has no eval_dataset, so it has no best checkpoint; give "
                             f"every job one, or set {instead}")
        if strategy == "best" and not (evaluated or job.eval_steps is not None or job.early_stopping_patience):
            raise ValueError(f"save_strategy='best': job {job.name!r} is never evaluated (eval_strategy='no' and no "
                             "JobConfig.eval_steps), so it would write no checkpoint; set eval_strategy to 'steps' "
                             "or 'epoch', or the job's eval_steps")
        if strategy != "steps":
            continue
        own = job.training_args(args, warn=False)  # (its values as it runs: eval_steps 0 is logging_steps)
        save, evaluate = own.save_steps, own.eval_steps or own.logging_steps
        if (save < 1) != (evaluate < 1):
            raise ValueError(f"load_best_model_at_end=True: job {job.name!r} has save_steps={save} and eval_steps="
                             f"{evaluate}: both must be fractions of max_steps (< 1) or both step counts, the save "
                             "steps a multiple of the eval steps (as TrainingArguments requires)")
        if not _multiple(save, evaluate):
            raise ValueError(f"load_best_model_at_end=True: job {job.name!r} saves every {save} steps and evaluates "
                             f"every {evaluate}; its save_steps must be a multiple of its eval_steps (as "
                             "TrainingArguments requires), so that its best evaluation has a checkpoint")


def check_job_steps(run) -> None:
    """With `load_best_model_at_end` and "steps": the job's save steps a multiple of its eval steps as the job
    counts them (`JobEvents.every`: a fraction of its max_steps rounded up), so that each of its evaluations that
    may be best has a checkpoint (fractions that pass `check_best_model_args` can round otherwise)."""
    args = run.args
    if not args.load_best_model_at_end or run._strategy("save_strategy") != "steps":
        return
    save, evaluate = run.every(args.save_steps), run.every(args.eval_steps or args.logging_steps)
    if save % evaluate:
        raise JobSetupError(f"load_best_model_at_end=True: job {run.name!r} saves every {save} and evaluates every "
                            f"{evaluate} of its {run.max_steps} steps (save_steps={args.save_steps}, eval_steps="
                            f"{args.eval_steps or args.logging_steps}); its save steps must be a multiple of its eval "
                            "steps, so that its best evaluation has a checkpoint")


def _multiple(save: float, evaluate: float) -> bool:
    """`save` a whole multiple of `evaluate` (both fractions of max_steps, or both step counts: TrainingArguments'
    rule)."""
    ratio = save / evaluate
    return math.isclose(ratio, round(ratio), abs_tol=1e-9) and round(ratio) >= 1


def checkpoints_to_delete(checkpoints: list[str], keep: int | None, best: str | None) -> list[str]:
    """Of a job's checkpoint paths (oldest first), those `save_total_limit=keep` deletes: the best one (its folder
    name `best`) counts within the limit, kept with the newest `keep - 1` others (at least the latest, a resume's
    start: with a limit of 1 the best and the latest), as Trainer's rotation keeps them."""
    if not keep or keep <= 0:
        return []
    best_path = next((path for path in checkpoints if best is not None and os.path.basename(path) == best), None)
    if best_path is None:
        return checkpoints[:-keep]
    others = [path for path in checkpoints if path != best_path]
    kept = {best_path, checkpoints[-1], *others[len(others) - max(keep - 1, 0):]}
    return [path for path in checkpoints if path not in kept]


def best_checkpoint_path(job_dir: str, best: str | None) -> str | None:
    """The best checkpoint's folder, where it still is."""
    if best is None:
        return None
    path = os.path.join(job_dir, best)
    return path if os.path.isdir(path) else None

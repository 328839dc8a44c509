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
    strategy = str(getattr(args.save_strategy, "value", args.save_strategy))
    if not args.load_best_model_at_end and strategy != "best":
        return
    option, instead = (("load_best_model_at_end=True", "load_best_model_at_end=False") if args.load_best_model_at_end
                       else ("save_strategy='best'", "save_strategy='steps'"))
    for job in jobs:
        if job.eval_dataset is None:
            raise ValueError(f"{option}: job {job.name!r} has no eval_dataset, so it has no best checkpoint; give "
                             f"every job one, or set {instead}")
        if strategy != "steps":
            continue
        save = job.save_steps if job.save_steps is not None else args.save_steps
        logging = job.logging_steps if job.logging_steps is not None else args.logging_steps
        evaluate = job.eval_steps if job.eval_steps is not None else (args.eval_steps or logging)
        if not _multiple(save, evaluate):
            raise ValueError(f"load_best_model_at_end=True: job {job.name!r} saves every {save} steps and evaluates "
                             f"every {evaluate}; its save_steps must be a multiple of its eval_steps (as "
                             "TrainingArguments requires), so that its best evaluation has a checkpoint")


def _multiple(save: float, evaluate: float) -> bool:
    """`save` a whole multiple of `evaluate`; both fractions of max_steps, or both step counts (TrainingArguments'
    rule)."""
    if (save < 1) != (evaluate < 1):
        return False
    ratio = save / evaluate
    return math.isclose(ratio, round(ratio), abs_tol=1e-9) and round(ratio) >= 1


def checkpoints_to_delete(checkpoints: list[str], keep: int | None, best: str | None) -> list[str]:
    """Of a job's checkpoint paths (oldest first), those `save_total_limit=keep` deletes: all but the newest `keep`,
    the best one (its folder name `best`) always kept besides, and with it the latest (a resume's start), as
    Trainer's rotation keeps them."""
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

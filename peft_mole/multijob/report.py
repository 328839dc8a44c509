"""What a multi-job run reports: padding of the mixed batches and the per-job summary table."""

from __future__ import annotations

import os

from peft_mole.multijob import checkpoint as ckpt
from peft_mole.multijob.run import JobRun


class PaddingStats:
    """Real and padded token counts of the mixed batches the trainer built (`pad_fraction`), and of the jobs' own
    micro-batches before mixing (`micro_batch_pad_fraction`: the padding the jobs' collators made). The scheduler
    cuts plain-LoRA micro-batches into rows of their real length, which can take the mixed batches below it."""

    def __init__(self) -> None:
        self.real = 0
        self.total = 0
        self.micro_batch_total = 0

    def add(self, parts: list[tuple[JobRun, dict]]) -> None:
        """Count one mixed step: every row padded to the step's longest; packed micro-batches (no attention mask)
        are concatenated into one row, without padding."""
        length = max(batch["input_ids"].shape[1] for _, batch in parts)
        for _, batch in parts:
            mask = batch.get("attention_mask")
            self.real += batch["input_ids"].numel() if mask is None else int(mask.sum())
            self.total += batch["input_ids"].numel() if mask is None else batch["input_ids"].shape[0] * length

    def add_micro_batches(self, parts: list[tuple[JobRun, dict]]) -> None:
        """Count the jobs' micro-batches of one round as their collators made them."""
        self.micro_batch_total += sum(batch["input_ids"].numel() for _, batch in parts)

    @property
    def pad_fraction(self) -> float:
        return 1.0 - self.real / self.total if self.total else 0.0

    @property
    def micro_batch_pad_fraction(self) -> float:
        return 1.0 - self.real / self.micro_batch_total if self.micro_batch_total else 0.0


def summary_rows(runs: list[JobRun]) -> list[dict]:
    """Per job: status, optimizer steps, target tokens, share of the jobs' step time, final loss, error. Counted over
    the whole run, resumes included (each job's checkpoint keeps its tokens and seconds as of its step)."""
    total = sum(run.stats.seconds for run in runs)
    return [
        {
            "job": run.name, "status": run.status, "steps": run.global_step, "tokens": run.stats.tokens,
            "time_share": run.stats.seconds / total if total > 0 else 0.0,
            "final_loss": run.stats.last_loss, "error": run.error,
        }
        for run in runs
    ]


def summary_table(rows: list[dict], pad_fraction: float | None) -> str:
    header = f"{'job':<16} {'status':<14} {'steps':>6} {'tokens':>9} {'time':>6} {'final loss':>10}"
    lines = [header] + [
        f"{r['job']:<16} {r['status']:<14} {r['steps']:>6} {r['tokens']:>9} {r['time_share']:>6.1%} "
        + (f"{r['final_loss']:>10.4f}" if r["final_loss"] is not None else f"{'-':>10}")
        for r in rows
    ]
    lines.append("padding: no mixed step in this run" if pad_fraction is None
                 else f"padding: {pad_fraction:.1%} of the tokens in this run's mixed batches")
    return "\n".join(lines)


def write_summary(rows: list[dict], pad_fraction: float | None, output_dir: str) -> None:
    """`output_dir/jobs_summary.json` (written atomically) and the table on stdout. `pad_fraction`: of the mixed
    batches this run (this `train()` call) built; None where it built none (a resume of jobs that had all ended;
    before 2026-12-06 it read 0.0 there)."""
    os.makedirs(output_dir, exist_ok=True)
    ckpt.write_json(os.path.join(output_dir, "jobs_summary.json"), {"jobs": rows, "pad_fraction": pad_fraction})
    print(summary_table(rows, pad_fraction))


def _training_bars(callbacks: list) -> list:
    """The progress bars of Trainer's callbacks (transformers' ProgressCallback keeps one while tqdm is on)."""
    return [bar for bar in (getattr(callback, "training_bar", None) for callback in callbacks) if bar is not None]


def show_progress(callbacks: list, progress: dict[str, str], run: JobRun) -> None:
    """Per-job step and loss (`progress`: job -> text, updated for `run`) in the postfix of Trainer's progress bar
    (when tqdm is on)."""
    progress[run.name] = f"{run.global_step}/{run.max_steps} loss {run.stats.last_loss:.3f}"
    for bar in _training_bars(callbacks):
        bar.set_postfix(progress, refresh=False)


def raise_progress_total(callbacks: list, total: int) -> None:
    """Set the total of Trainer's progress bar to `total` steps (the trainer's estimate grew: a memory budget
    deferred micro-batches)."""
    for bar in _training_bars(callbacks):
        bar.total = total
        bar.refresh()

"""A job's optimizer step and what follows it — its logs, evaluation, checkpoint and end — with the Trainer
callback events of one job, as `MultiJobTrainer` methods (a mixin).

Trainer's loop has one optimizer, one epoch count and one checkpoint folder; a multi-job run has one of each per job.
The events of the mixed steps (`on_train_begin/end`, `on_step_begin`, `on_step_end`, `on_log`, `on_evaluate`) reach
the callbacks with the trainer's arguments and state, as Trainer sends them. The events of one job's training —
`on_epoch_begin`, `on_epoch_end`, `on_substep_end`, `on_pre_optimizer_step`, `on_optimizer_step` and `on_save` —
reach them as that job's own run would send them: with the job's arguments (`output_dir/<job>/`, its overrides), a
copy of the state whose `global_step`, `epoch`, `max_steps`, `num_train_epochs`, `train_batch_size` and
`logging/eval/save_steps` are the job's, the job's optimizer, LR scheduler and training loader as the `optimizer`,
`lr_scheduler` and `train_dataloader` keywords, and `job=<name>`. A callback written for SFTTrainer thus finds the
folder of an `on_save` at `args.output_dir/checkpoint-{state.global_step}`.

They are notifications: a job logs, evaluates and saves by its own strategies, so the `control` flags a callback
(or transformers' flow callback, at a job's epoch end) sets in a job event are set back after it, except
`should_training_stop`, which stops the run (every unfinished job checkpointed), as it stops Trainer's.
"""

from __future__ import annotations

import contextlib
import copy
import math
from functools import partial

from peft_mole.multijob import distributed as dist
from peft_mole.multijob import report
from peft_mole.multijob.evaluation import EvalOutcome
from peft_mole.multijob.memory import free_memory, is_oom
from peft_mole.multijob.run import MICRO_BATCH_METRICS, STOPPED, JobRun
from peft_mole.multijob.trainer_args import temporarily

JOB_EVENTS = ("on_epoch_begin", "on_epoch_end", "on_substep_end", "on_pre_optimizer_step", "on_optimizer_step",
              "on_save")


class JobStepping:
    """The trainer's per-job step and callback events (see the module docstring); mixed into `MultiJobTrainer`."""

    def _job_event(self, event: str, run: JobRun) -> None:
        """Send `event` to every callback as the job's own run would (module docstring): the state's `epoch` is the
        job's as of its last optimizer step, as Trainer's `state.epoch` (an epoch's first sub-step still says 0.0)."""
        if event not in JOB_EVENTS:
            raise ValueError(f"{event!r} is not a job event; job events: {JOB_EVENTS}")
        if event == "on_epoch_begin":
            self.control.should_epoch_stop = False  # as Trainer's CallbackHandler does
        elif event == "on_save":
            self.control.should_save = False
        state = copy.copy(self.state)
        state.global_step, state.max_steps = run.global_step, run.max_steps
        state.epoch = run.step_epoch
        state.num_train_epochs = math.ceil(run.max_steps / run.updates_per_epoch)
        state.train_batch_size = run.args.per_device_train_batch_size
        for name in ("logging_steps", "eval_steps", "save_steps"):  # as Trainer resolves them: a fraction of max_steps
            every = getattr(run.args, name) or run.args.logging_steps  # (eval_steps None: logging_steps)
            setattr(state, name, math.ceil(run.max_steps * every) if every < 1 else every)
        control = self.control
        kept = {flag: getattr(control, flag) for flag in ("should_log", "should_evaluate", "should_save",
                                                           "should_epoch_stop")}
        handler = self.callback_handler
        with contextlib.ExitStack() as stack:
            for name, value in (("optimizer", run.optimizer), ("lr_scheduler", run.scheduler),
                                ("train_dataloader", run.dataloader)):
                stack.enter_context(temporarily(handler, name, value))
            stop = handler.call_event(event, run.args, state, control, job=run.name).should_training_stop
        for flag, value in kept.items():  # notifications: only a stop is acted on (module docstring)
            setattr(control, flag, value)
        control.should_training_stop = stop

    def _job_logs(self, run: JobRun) -> list[dict]:
        """The entries of the run's log history that are `run`'s (each log of a job carries its `<job>/` keys)."""
        prefix = f"{run.name}/"
        return [entry for entry in self.state.log_history if any(key.startswith(prefix) for key in entry)]

    def _job_step(self, run: JobRun) -> None:
        """Step the job whose window is complete (gradients summed over processes, clipped), then log, evaluate,
        checkpoint and end it as its strategies say."""
        mean = not self.args.average_tokens_across_devices
        counts = [float(run.window_tokens), float(run.window_input_tokens), *(x for m in run.window_metrics for x in m)]
        run.window_loss, *counts = dist.reduce_gradients(self.accelerator, run.stepped_tensors(),
                                                         [run.window_loss, *counts], mean=mean)
        processes = self.accelerator.num_processes
        counts = [c * (processes if mean else 1) for c in counts]  # sums over processes
        run.stats.tokens += round(counts[0])  # the window's target tokens (the run summary's count)
        run.stats.num_tokens += round(counts[1])
        width = len(MICRO_BATCH_METRICS)
        for entropy, correct, targets, aux in zip(*[iter(counts[2:])] * width, strict=True):  # as SFTTrainer: per
            run.stats.entropy.append(entropy / targets if targets > 0 else 0.0)  # micro-batch, over all processes
            run.stats.accuracy.append(correct / targets if targets > 0 else 0.0)
            if not math.isnan(aux):
                run.stats.aux_loss.append(aux / processes)  # (the mean over processes)
        run.window_tokens = 0
        error, oom = None, False
        try:  # (an allocation of its optimizer state, a callback of its events): the others go on
            run.optimizer_step(lambda event: self._job_event(event, run))
        except Exception as raised:  # noqa: BLE001 — one job's step must not take the others down
            error = f"its optimizer step {run.global_step + 1} raised {type(raised).__name__}: {raised}"
            oom = is_oom(raised)
        if dist.any_process(self.accelerator, [error is not None])[0]:
            run.optimizer.zero_grad(set_to_none=True)
            if error is not None and oom:  # (outside the except block: its traceback keeps the step's tensors)
                free_memory()
            self._fail(run, error or "its optimizer step raised on another process")
            return
        if self.args.logging_nan_inf_filter and not math.isfinite(run.window_loss):  # (a loss scaler's skipped
            losses = run.stats.losses  # step) as Trainer: the mean of the steps since the last log instead
            run.window_loss = sum(losses) / len(losses) if losses else 0.0
        run.stats.last_loss, run.stats.stepped = run.window_loss, (run.stats.tokens, run.stats.seconds)
        run.mixed_step = self.state.global_step
        run.stats.losses.append(run.window_loss)
        run.window_loss = 0.0
        report.show_progress(self.callback_handler.callbacks, self.job_progress, run)
        logged = run.should_log()
        if logged:
            logs = {
                f"{run.name}/loss": sum(run.stats.losses) / len(run.stats.losses),
                f"{run.name}/learning_rate": run.learning_rate(),
                f"{run.name}/step": run.global_step,
                f"{run.name}/epoch": run.epoch_progress,
            }
            if run.last_grad_norm is not None:  # (a read-back on a GPU: only when logged)
                logs[f"{run.name}/grad_norm"] = float(run.last_grad_norm)
            means = (("entropy", run.stats.entropy), ("mean_token_accuracy", run.stats.accuracy),
                     ("aux_loss", run.stats.aux_loss))
            for key, values in means:
                if values:
                    logs[f"{run.name}/{key}"] = sum(values) / len(values)
            logs[f"{run.name}/num_tokens"] = run.stats.num_tokens
            self.log(logs)
        if logged or run.logs_nothing:  # (values never to be logged are not kept either)
            run.stats.clear_logged()
        # stop early, or fail (why the evaluation failed): after the checkpoint of this step
        outcome = (self._evaluate_job(run) if run.name in self.job_eval_datasets and run.should_evaluate()
                   else EvalOutcome())
        run.stopping = run.stopping or outcome.stop  # (in this step's checkpoint: a resume from it ends the job)
        if run.should_save():
            run.mark_best_checkpoint()
            states = self._stream_states(run)  # (a collective: on every process)
            save = partial(run.save_checkpoint, lambda d: self.jobs_model.save_job(run.name, d), stream_states=states,
                           logs=partial(self._job_logs, run))
            if not self._written(run, "checkpoint", save):  # (a collective too)
                return
            self._job_event("on_save", run)  # (on every process, as Trainer)
        if run.at_epoch_end or run.global_step >= run.max_steps or run.stopping:  # after the step's checkpoint, as
            self._job_event("on_epoch_end", run)  # Trainer (which also ends the epoch it stops in, early too)
        if outcome.failure is not None:
            self._fail(run, outcome.failure)
        elif outcome.stop:
            self._finish(run, STOPPED)
        elif run.global_step >= run.max_steps:
            self._finish(run)

"""How a job's run ends and starts again, as `MultiJobTrainer` methods (a mixin): its final save, its failure, a
checkpoint of every unfinished job when a callback stops training, and resume from those files.

Every write is atomic (`multijob.checkpoint`): a run killed at any point leaves each job's previous checkpoint or
final adapter whole. A failing job writes `job_failed.json` and keeps its checkpoints; the other jobs go on.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import uuid

import torch

from peft_mole.multijob import checkpoint as ckpt
from peft_mole.multijob import distributed as dist
from peft_mole.multijob.best_checkpoint import best_checkpoint_path
from peft_mole.multijob.run import DONE, FAILED, STOPPED, JobRun
from peft_mole.multijob.trainer_args import PUSH_EACH_JOB, JobSetupError
from peft_mole.tuners.load_checks import text_config

logger = logging.getLogger("peft_mole.multijob.trainer")  # one logger for the trainer's messages


def base_dropout_rates(model) -> dict[str, float]:
    """The dropout rates above 0 in the config of the frozen base (`attention_dropout`, `hidden_dropout`,
    `resid_pdrop`, ...; a multimodal model's text config too): dropout the base itself draws in training."""
    rates = {}
    for config in filter(None, (getattr(model, "config", None), text_config(model))):
        for key, value in vars(config).items():
            if ("dropout" in key or "pdrop" in key) and isinstance(value, float) and value > 0:
                rates[key] = value
    return rates


def read_logs(folder: str) -> list[dict]:
    """A job's log entries saved in `folder` (`ckpt.LOG_FILE`; none in folders written before 2026-12-07, and none,
    with a warning, where the file cannot be read: the logs are a record, not what training resumes from)."""
    path = os.path.join(folder, ckpt.LOG_FILE)
    if not os.path.isfile(path):
        return []
    try:
        return list(ckpt.read_json(path))
    except (OSError, ValueError, TypeError) as error:
        logger.warning("%s cannot be read (%s): the resumed run's log history leaves out its entries", path, error)
        return []


def resumed_log_history(runs: list[JobRun]) -> list[dict]:
    """The run's log history as of where its jobs resumed: each job's saved entries, in the order they were logged
    (by mixed step; a step's entries in the jobs' order), an entry of several jobs (an `evaluate()` of all of them)
    once."""
    seen, entries = set(), []
    for entry in (entry for run in runs for entry in run.resumed_logs):
        key = json.dumps(entry, sort_keys=True)
        if key not in seen:
            seen.add(key)
            entries.append(entry)
    return sorted(entries, key=lambda entry: entry.get("step", 0))


RESUMED_FIELDS = ("step", "ended", "stopping", "best_step")  # what every process must have read of a job alike


def resumed_view(run: JobRun) -> list[float]:
    """What this process read of a resumed job's folder (`RESUMED_FIELDS`): its step, whether it ended (1 done,
    2 stopped early, 0 not), whether it stops after its step, and the step of the best checkpoint it can read (−1:
    none)."""
    ended = {DONE: 1.0, STOPPED: 2.0}.get(run.status, 0.0)
    best = run.stats.best_checkpoint
    best_step = -1.0 if best is None else float(run.stats.best_step if run.stats.best_step is not None else 0)
    return [float(run.global_step), ended, float(run.stopping), best_step]


class JobLifecycle:
    """The trainer's job endings and resume (see the module docstring); mixed into `MultiJobTrainer`."""

    def _resume(self, runs: list[JobRun]) -> None:
        """Each job from where it ended: a done or stopped job's final adapter, else its latest checkpoint. A saved
        adapter that does not fit the job as it is set up now (another rank, type or target modules) is a
        `JobSetupError` naming the job and the folder."""
        rates = base_dropout_rates(self.jobs_model.model)
        if rates:
            logger.warning("the base model's own dropout is on in training (%s): it draws from torch's generator, "
                           "which train() seeds afresh, so the resumed steps draw other masks than an uninterrupted "
                           "run would (each job's adapter dropout and router jitter resume exactly); set those rates "
                           "to 0 for an exact resume", ", ".join(f"{k}={v}" for k, v in rates.items()))
        failure = None
        for run in runs:
            try:
                self._resume_job(run)
            except JobSetupError as error:
                failure = error
            except Exception as error:  # noqa: BLE001 — (a half-copied folder raises anything: OSError, a torch or
                # safetensors error, a KeyError; raised on every process after the gather below)
                failure = JobSetupError(f"job {run.name!r} cannot resume as it is set up now (the job was changed "
                                        f"since that run, or its folder is incomplete?): {type(error).__name__}: "
                                        f"{error}")
                failure.__cause__ = error
            if failure is not None:
                break
        # every process reads the job folders itself: one that saw another checkpoint (storage not shared between
        # nodes, a cache lagging behind) would run other steps and collectives than the rest, and one whose read
        # raised would leave the others waiting in this collective; so all agree here, and all stop together
        # (not the step alone: one process may see a job's end at step N where another sees its checkpoint of step
        # N, or a best checkpoint another cannot, and the two would then run other collectives at its end)
        read = [value for run in runs for value in resumed_view(run)] + [float(failure is not None)]
        resumed = dist.gather_rows(self.accelerator, torch.tensor(read, dtype=torch.float64))
        if failure is not None:
            raise failure
        if resumed[:, -1].any():
            raise JobSetupError("a job could not resume on another process (its error is in that process's log); "
                                "nothing was trained")
        views = resumed[:, :-1].reshape(len(resumed), len(runs), len(RESUMED_FIELDS))
        apart = {run.name: [dict(zip(RESUMED_FIELDS, map(int, view.tolist()), strict=True)) for view in views[:, i]]
                 for i, run in enumerate(runs) if (views[:, i] != views[0, i]).any()}
        if apart:
            raise JobSetupError(f"the processes resumed jobs differently ({{job: [what each process read]}}: "
                                f"{apart}): every process must see the same job folders under output_dir (shared "
                                "storage, or copy them to every node); nothing was trained")

    def _resume_job(self, run: JobRun) -> None:
        run_file = os.path.join(run.args.output_dir, ckpt.RUN_FILE)
        run.run_id = ckpt.read_json(run_file)["run_id"] if os.path.isfile(run_file) else None
        final_state = os.path.join(run.args.output_dir, ckpt.STATE_FILE)
        state = ckpt.read_json(final_state) if os.path.isfile(final_state) else {}
        if state.get("status") in (DONE, STOPPED) and state.get("run_id") == run.run_id:
            self.jobs_model.load_job(run.name, run.args.output_dir)
            run.resumed_logs = read_logs(run.args.output_dir)
            run.status, run.global_step = state["status"], state["global_step"]
            run.restore_account(state)
            run.release()
            if state["status"] == DONE and run.max_steps > run.global_step:
                logger.warning("job %s ended at step %d; resume does not train an ended job further (its "
                               "max_steps is now %d): train a job of another name from it, "
                               "JobConfig(init_adapter=%r)", run.name, run.global_step, run.max_steps,
                               run.args.output_dir)
            return
        path = ckpt.latest_checkpoint(run.args.output_dir, run.run_id)
        if path is not None:
            run.load_checkpoint(path, lambda d, name=run.name: self.jobs_model.load_job(name, d),
                                (self.accelerator.process_index, self.accelerator.num_processes))
            run.resumed_logs = read_logs(path)
            logger.info("job %s resumes from %s", run.name, path)
        else:  # (Trainer raises here; a restarted preemptible run may not have saved yet)
            logger.warning("job %s has no checkpoint in %s: it starts from the beginning", run.name,
                           run.args.output_dir)

    def _start_afresh(self, runs: list[JobRun]) -> None:
        """A run that does not resume gets an id of its own (`run.json` in each job's folder; its checkpoints and
        final state carry it). A resume of it takes only its own checkpoints and end, and it prunes only its own
        checkpoints: an earlier run in the same folders (its final `job_state.json`, checkpoints of later steps)
        is neither taken for this run's (a resume kept the earlier adapter as the job's end, or would continue
        from the earlier run's latest step) nor deleted."""
        if not self.is_world_process_zero():
            return
        for run in runs:
            run.run_id = uuid.uuid4().hex
            earlier = ckpt.list_checkpoints(run.args.output_dir)
            os.makedirs(run.args.output_dir, exist_ok=True)
            ckpt.write_json(os.path.join(run.args.output_dir, ckpt.RUN_FILE), {"run_id": run.run_id})
            if earlier:
                logger.warning("job %s: %s holds checkpoints of an earlier run (steps %s); they are kept, and a "
                               "resume of this run does not take them", run.name, run.args.output_dir,
                               [step for step, _ in earlier])

    def _checkpoint_unfinished(self, runs: list[JobRun]) -> None:
        """A callback stopped training (`control.should_training_stop`): checkpoint every job that has stepped and
        not ended, at its last optimizer step, so `train(resume_from_checkpoint=True)` continues it."""
        if all(run.finished for run in runs):  # the flow callback's stop after the last step
            return
        unfinished = [run for run in runs if not run.finished and run.global_step > 0]
        states = [self._stream_states(run) for run in unfinished]  # (a collective: on every process)
        # not marked best: the uninterrupted run writes no checkpoint here unless the step saves anyway, and then it
        # was marked when that checkpoint was written (before 2026-12-07 a stop's checkpoint could become the best
        # one, and load_best_model_at_end ended the resumed run with it)
        for run, stream_states in zip(unfinished, states, strict=True):  # whole, even with `save_only_model`;
            # as every checkpoint: not where the weights are not finite, and a write error fails that job alone
            self._written(run, "checkpoint", functools.partial(
                run.save_checkpoint, lambda d, name=run.name: self.jobs_model.save_job(name, d), model_only=False,
                stream_states=stream_states, logs=functools.partial(self._job_logs, run)))
        for run in unfinished:  # as Trainer loads the best model at the end of train() whatever stopped it (the
            # checkpoint just written keeps the last step's adapter for a resume; before 2026-12-08 a stopped run's
            # adapters, saved or evaluated after it, were the last step's)
            if run.args.load_best_model_at_end and not run.finished:
                self._took_best_checkpoint(run)
        if self.is_world_process_zero():
            logger.warning("training stopped by a callback at step %d; unfinished jobs checkpointed: %s",
                           self.state.global_step, [run.name for run in unfinished])

    def _written(self, run: JobRun, what: str, write) -> bool:
        """Call `write()` on the world's process zero unless the job's weights are not finite; on any process's
        failure, fail the job alone (its earlier checkpoints stay) and return False. A collective: every process
        calls it for the same job (only process zero writes, so the others learn of its failure here)."""
        reason = None
        if self.is_world_process_zero():
            if not run.is_finite():
                reason = (f"its weights became non-finite by step {run.global_step} (a non-finite gradient); "
                          f"its {what} was not written, its last checkpoint is kept")
            else:
                try:
                    write()
                except Exception as error:  # noqa: BLE001 — one job's disk error must not take the others down
                    reason = (f"its {what} at step {run.global_step} could not be written: "
                              f"{type(error).__name__}: {error}")
        if dist.any_process(self.accelerator, [reason is not None])[0]:
            self._fail(run, reason or f"its {what} could not be written on process 0")
            return False
        return True

    def _finish(self, run: JobRun, status: str = DONE) -> None:
        if run.finished:
            return

        def write(tmp: str) -> None:
            self._save_job_folder(run.name, tmp)
            ckpt.write_json(os.path.join(tmp, ckpt.LOG_FILE), self._job_logs(run))
            ckpt.write_json(os.path.join(tmp, ckpt.STATE_FILE), run.state_dict())

        def write_final() -> None:  # (on the world's process zero only: `_written`)
            ckpt.remove_leftovers(run.args.output_dir, checkpoints=False)
            ckpt.replace_files_atomically(run.args.output_dir, write)
            failed_note = os.path.join(run.args.output_dir, "job_failed.json")
            if os.path.exists(failed_note):  # from an earlier run that failed, since resumed
                os.remove(failed_note)

        if run.args.load_best_model_at_end and not self._took_best_checkpoint(run):
            return
        run.status = status  # (what its final state says)
        if not self._written(run, "final adapter", write_final):
            return
        run.release()
        logger.info("job %s %s after %d steps", run.name, status, run.global_step)

    def _took_best_checkpoint(self, run: JobRun) -> bool:
        """`load_best_model_at_end`: the job's adapter from its best checkpoint (`best_checkpoint`), on every process,
        before its final adapter is written; one whose best is its last step's, or that has none (no checkpoint
        written after an evaluation), keeps its adapter. False where the checkpoint cannot be read: the job failed
        alone (its checkpoints stay). A collective: every process calls it for the same job."""
        best = run.stats.best_checkpoint
        if best is None or best == f"checkpoint-{run.global_step}":
            return True
        path, reason = best_checkpoint_path(run.args.output_dir, best), None
        try:
            if path is None:
                raise FileNotFoundError(f"{os.path.join(run.args.output_dir, best)} is gone")
            self.jobs_model.load_job(run.name, path)
        except Exception as error:  # noqa: BLE001 — one job's unreadable checkpoint must not take the others down
            reason = (f"its best checkpoint {best} could not be loaded for load_best_model_at_end: "
                      f"{type(error).__name__}: {error}; its checkpoints are kept (resume with "
                      "load_best_model_at_end=False to end with its last adapter)")
        if dist.any_process(self.accelerator, [reason is not None])[0]:
            self._fail(run, reason or f"its best checkpoint {best} could not be loaded on another process")
            return False
        logger.info("job %s: its best checkpoint %s (step %s, eval_loss %.6g) is its final adapter "
                    "(load_best_model_at_end)", run.name, best, run.stats.best_step, run.stats.best_metric)
        return True

    def _save_job_folders(self, root: str) -> None:
        """`save_model`: every job's adapter in `root/<job>/`, written as the final adapter is (each file replaced
        whole), except a failed job's or one whose weights are not finite (a NaN adapter must not look finished)."""
        runs = {run.name: run for run in self.runs}
        for job in self.jobs:
            run = runs.get(job.name)  # (None before train())
            if run is not None and (run.status == FAILED or not run.is_finite()):
                logger.warning("save_model: job %s is left out (%s); its folder keeps its last checkpoint", job.name,
                               run.error if run.status == FAILED else "its weights are not finite")
                continue
            ckpt.replace_files_atomically(os.path.join(root, job.name),
                                          lambda tmp, name=job.name: self._save_job_folder(name, tmp))

    def _save_job_folder(self, name: str, directory: str) -> None:
        """A job's adapter (`MultiJobModel.save_job`) and the tokenizer, as SFTTrainer's output folder holds them."""
        self.jobs_model.save_job(name, directory)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(directory)

    def push_to_hub(self, *args, **kwargs):
        """Refused: a run holds one adapter per job (`output_dir/<job>/`), each pushed as its own repo."""
        raise NotImplementedError(f"MultiJobTrainer.push_to_hub: {PUSH_EACH_JOB}")

    def _stream_states(self, run: JobRun) -> torch.Tensor | None:
        """Every process's state of the job's random stream as of its last step, for its checkpoint (a collective:
        each process draws over its own rows, so a resumed process must take its own state back)."""
        state = run.stream_state()
        return None if state is None else dist.gather_rows(self.accelerator, state)

    def _fail(self, run: JobRun, reason: str) -> None:
        """Stop one job (its checkpoints stay); the others go on."""
        run.status, run.error = FAILED, reason
        run.release()
        if self.is_world_process_zero():
            try:
                os.makedirs(run.args.output_dir, exist_ok=True)
                ckpt.write_json(os.path.join(run.args.output_dir, "job_failed.json"), run.state_dict())
            except OSError as error:  # (a full disk: the log and the summary still say it)
                logger.error("job %s: job_failed.json could not be written: %s", run.name, error)
        logger.error("job %s failed and was stopped (the other jobs go on): %s", run.name, reason)
        self.log({f"{run.name}/failed": 1.0})

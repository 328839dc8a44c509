"""Which jobs train in the next mixed step (ASPEN's scheduler, SPEC.md §3).

1. Admission: jobs run by priority (higher first), then arrival (their order in `jobs=`), at most
   `max_concurrent_jobs` at a time; a job that finishes or fails frees its place for the next waiting one.
2. Packing: of the admitted jobs' next micro-batches, take them in priority order while the memory model predicts
   the mixed batch (padded to its longest row) stays under `max_memory`; the rest wait, whole, for the next
   step. A micro-batch that alone exceeds the budget fails its job with a clear error instead of running out of
   memory.
3. Length-aware grouping: the packed micro-batches are sorted by length and cut into consecutive groups, each
   run as its own mixed step, where that saves more padded tokens than a step costs (`step_overhead_tokens`):
   short jobs are not padded to the longest job's length. Each job's loss is normalised by its own window's token
   count, so which step a micro-batch runs in changes nothing in its gradients. A plain-LoRA job's micro-batch is
   cut into its rows for this (its loss is a plain sum over rows); a MixLoRA/DynMoLE job's stays whole, since
   its router's load-balance loss is not a sum over rows. Packed (padding-free) micro-batches have no padding to
   save; they are grouped by `group_packed`.
"""

from __future__ import annotations

import math
import numbers
import statistics
from collections.abc import Callable

from peft_mole import packed_attention
from peft_mole.multijob.batching import is_packed, row_lengths, take_rows
from peft_mole.multijob.memory import MemoryModel
from peft_mole.multijob.run import FAILED, RUNNING, WAITING, JobRun


def readable_size(size: float) -> str:
    """Bytes in MiB, KiB below one MiB (a budget of a few KiB read as "0 MiB"), bytes below one KiB (a budget of 40
    bytes, 40 GB meant, read as "0.0 KiB"). The unit is chosen on the whole bytes: a fitted 1023.9999 is "1.0 KiB",
    not "1024 bytes"."""
    size = round(size)
    if abs(size) < 2**10:
        return f"{size:.0f} bytes"
    return f"{size / 2**20:.0f} MiB" if abs(size) >= 2**20 else f"{size / 2**10:.1f} KiB"

class StepCost:
    """Time of a mixed step ≈ c0 + c1 · padded tokens; the fixed cost of one more step in token terms, c0 / c1, is
    what length grouping weighs against padding.

    Fitted with the Theil–Sen estimator (c1 = median of the pairwise slopes, c0 = median of t − c1 · tokens) over the
    last `window` steps, so one slow step (a collection, another process) does not move it. The first step is not
    used (lazy initialisation and allocator warm-up make it slow), and the fit starts once three later steps, of at
    least two different sizes, are known. Until then the cost is `initial_tokens`, by default 0: every distinct
    length runs as its own step. That costs a few extra steps once and gives the fit steps of several sizes at once,
    where a guess would have to suit a CPU (tens of tokens) and a GPU (thousands) and would pad the first rounds,
    usually the longest (Trainer's length-grouped sampler puts the longest batch first), by its own error. Steps
    whose time does not grow with their tokens (slope ≤ 0) make padding free: `max_tokens`, one step per round.
    The pairwise slopes are O(window²), about 2000 for a full window: a millisecond per round."""

    def __init__(self, initial_tokens: int = 0, max_tokens: int = 4096, window: int = 64, min_samples: int = 3) -> None:
        self.initial_tokens = initial_tokens
        self.max_tokens = max_tokens
        self.window = window
        self.min_samples = min_samples
        self.samples: list[tuple[float, float]] = []
        self._seen_first = False

    def observe(self, tokens: int, seconds: float) -> None:
        if not self._seen_first:
            self._seen_first = True
            return
        self.samples.append((float(tokens), float(seconds)))
        del self.samples[: -self.window]

    def overhead_tokens(self) -> int:
        pairs = [(x1, y1, x2, y2) for i, (x1, y1) in enumerate(self.samples) for x2, y2 in self.samples[i + 1:]]
        slopes = [(y2 - y1) / (x2 - x1) for x1, y1, x2, y2 in pairs if x1 != x2]
        if len(self.samples) < self.min_samples or not slopes:
            return self.initial_tokens
        slope = statistics.median(slopes)
        if slope <= 0:
            return self.max_tokens
        intercept = statistics.median(y - slope * x for x, y in self.samples)
        return round(min(max(intercept / slope, 0.0), self.max_tokens))


class JobScheduler:
    def __init__(self, max_concurrent_jobs: int | None = None, max_memory: float | None = None) -> None:
        if max_concurrent_jobs is not None and (isinstance(max_concurrent_jobs, bool) or not isinstance(
                max_concurrent_jobs, int) or max_concurrent_jobs < 1):
            raise ValueError(f"max_concurrent_jobs must be an int >= 1 or None, got {max_concurrent_jobs!r}")
        if max_memory is not None and (isinstance(max_memory, bool) or not (
                isinstance(max_memory, numbers.Real) and math.isfinite(max_memory) and max_memory > 0)):
            raise ValueError(f"max_memory must be a finite number of bytes > 0 or None, got {max_memory!r}")
        self.max_concurrent_jobs = max_concurrent_jobs
        self.max_memory = None if max_memory is None else float(max_memory)  # (a numpy number too)
        self.memory_model = MemoryModel()
        self.varlen_attention = False  # packed sequences attended apart (`packed_attention.keeps_sequences_apart`)
        self.isolates_non_finite = False  # and a NaN kept in its sequence (`packed_attention.isolates_non_finite`)
        self.packed_row_tokens: int | None = None  # with varlen_attention: a step's most tokens (None: no limit)
        self.runs: list[JobRun] = []  # every job of the run (`admit`)
        self.profiled_resident_bytes: float | None = None  # the jobs' optimizer state and gradients when profiled
        self.measured_resident = True  # the profile's peaks hold those bytes (CUDA; not CPU: `profiled`)

    @staticmethod
    def order(runs: list[JobRun]) -> list[JobRun]:
        """Priority (high first), then arrival."""
        return sorted(runs, key=lambda r: -r.job.priority)  # sorted() is stable: ties keep arrival order

    def admit(self, runs: list[JobRun]) -> list[JobRun]:
        """Start waiting jobs while there is room; return the running ones in priority order."""
        self.runs = runs
        running = [r for r in runs if r.status == RUNNING]
        for run in self.order([r for r in runs if r.status == WAITING]):
            if self.max_concurrent_jobs is not None and len(running) >= self.max_concurrent_jobs:
                break
            run.status = RUNNING
            running.append(run)
        return self.order(running)

    def estimate_steps(self, runs: list[JobRun]) -> int:
        """Mixed steps if the jobs run side by side (max_concurrent_jobs lets fewer run at once: more steps)."""
        left = sorted((r.micro_batches_left() for r in runs), reverse=True)
        lanes = self.max_concurrent_jobs or len(left)
        per_lane = [0] * lanes
        for n in left:  # longest first onto the least loaded lane
            per_lane[per_lane.index(min(per_lane))] += n
        return max(max(per_lane), 1)

    def pack(self, candidates: list[tuple[JobRun, dict]],
             agree: Callable[[bool], bool] | None = None) -> list[tuple[JobRun, dict]]:
        """The candidates (priority order) that fit the memory budget together; the others wait, except those that
        would not fit even with every other job ended: they fail now, freeing their place for waiting jobs (before
        2026-12-06 only in a round where nothing fitted, so such a job held its `max_concurrent_jobs` slot while
        the others ran). Where none fits and each would alone, the last one fails (its memory freed, the others
        can go on).

        `agree`: with several processes, the AND of a decision over them (a collective; every process calls `pack`
        with the same candidates). Each candidate joins where it fits on every process, so all of them build one
        set: chosen apart, from their own shards' micro-batches, the sets could meet nowhere (process 0 taking job
        A, process 1 job B), and no job ran, round after round (until 2026-12-07, twenty-seventh session)."""
        agree = agree or (lambda decision: decision)
        if self.max_memory is None or not agree(self.memory_model.fitted):
            return candidates
        chosen: list[tuple[JobRun, dict]] = []
        # once per round (it walks every job's optimizer state): what the jobs keep, and what each job that has not
        # stepped will create at its first step, counted only in a step it is in (`resident_change`)
        held = self._held_bytes()
        kept = sum(k for k, _ in held.values()) - (self.profiled_resident_bytes or 0.0)
        projected = {run.name: held[run.name][1] if run.name in held else 0 for run, _ in candidates}
        for run, batch in candidates:
            trial = chosen + [(run, batch)]
            if agree(self.predict(trial, kept + sum(projected[r.name] for r, _ in trial)) <= self.max_memory):
                chosen = trial
        chosen_names = {run.name for run, _ in chosen}
        waiting = [(run, batch) for run, batch in candidates if run.name not in chosen_names]
        alone = {run.name: sum(held.get(run.name, (0, 0))) - (self.profiled_resident_bytes or 0.0)
                 for run, _ in waiting}
        # a job that does not fit even alone on some process fails on every one (one collective per waiting job:
        # decided apart, one process would fail its own and another the last job, and both jobs would fail)
        never = [(run, batch) for run, batch in waiting
                 if not agree(self.predict([(run, batch)], alone[run.name]) <= self.max_memory)]
        if chosen and not never:
            return chosen
        for run, batch in never or candidates[-1:]:
            resident = alone[run.name] if never else kept + projected[run.name]  # (what the decision weighed)
            whose = "its own optimizer state and gradients" if never else "the jobs' optimizer states and gradients"
            added = (f" (of which {readable_size(resident)} {whose}"
                     f"{' added since profiling' if self.measured_resident else ''})") if resident > 0 else ""
            smallest = self.memory_model.predict([1], [run.name]) + resident  # one row of one token
            advice = ("lower per_device_train_batch_size or max_length" if smallest <= self.max_memory else
                      f"even a step of one token needs about {readable_size(smallest)}: max_memory is below the "
                      "base's own cost; raise it")
            run.status, run.error = FAILED, (
                f"a micro-batch of {tuple(batch['input_ids'].shape)} needs about "
                f"{readable_size(self.predict([(run, batch)], resident))}{added}, over max_memory="
                f"{readable_size(self.max_memory)}; "
                + (advice if never else
                   "no job fits beside the optimizer states the others keep; this one, last by priority, stops")
            )
        return chosen

    @staticmethod
    def group_by_length(
        parts: list[tuple[JobRun, dict]], step_overhead_tokens: int | None,
        splittable: Callable[[JobRun], bool] | None = None
    ) -> list[list[tuple[JobRun, dict]]]:
        """Split the parts into mixed steps minimising Σ_steps (rows · longest length + overhead).

        The units are whole micro-batches, except for parts whose run is `splittable` (plain-LoRA jobs: their loss is
        a sum over rows normalised by the window's token count, so any split of their rows gives the same gradient):
        those are cut into rows of their real lengths. Units of equal length are merged (splitting them never pays),
        and an exact dynamic programme runs over the units sorted by length (consecutive groups are optimal for this
        cost). A step holds one part per run: the run's rows in that step, cut to their longest real length.
        """
        if step_overhead_tokens is None or not parts:
            return [parts]
        by_length: dict[int, list[tuple[int, list[int] | None]]] = {}  # length -> [(part index, rows or None)]
        rows_at: dict[int, int] = {}
        for k, (run, batch) in enumerate(parts):
            lengths = row_lengths(batch) if splittable is not None and splittable(run) else None
            if lengths is None:
                length = batch["input_ids"].shape[1]
                by_length.setdefault(length, []).append((k, None))
                rows_at[length] = rows_at.get(length, 0) + batch["input_ids"].shape[0]
                continue
            for i, length in enumerate(lengths):
                by_length.setdefault(length, []).append((k, [i]))
                rows_at[length] = rows_at.get(length, 0) + 1
        lengths = sorted(by_length)
        prefix = [0]
        for length in lengths:
            prefix.append(prefix[-1] + rows_at[length])
        n = len(lengths)
        best = [0.0] + [float("inf")] * n  # best[j]: cost of the first j lengths
        cut = [0] * (n + 1)
        for j in range(1, n + 1):
            for i in range(j):  # last step = lengths[i:j], padded to lengths[j - 1]
                cost = best[i] + (prefix[j] - prefix[i]) * lengths[j - 1] + step_overhead_tokens
                if cost < best[j]:
                    best[j], cut[j] = cost, i
        bounds, j = [], n
        while j > 0:
            bounds.append((cut[j], j))
            j = cut[j]
        if len(bounds) == 1 and all(rows is None for units in by_length.values() for _, rows in units):
            return [parts]
        groups = []
        for i, j in reversed(bounds):
            chosen: dict[int, list[int] | None] = {}
            longest: dict[int, int] = {}
            for length in lengths[i:j]:
                for k, rows in by_length[length]:
                    chosen[k] = None if rows is None else chosen.get(k, []) + rows
                    longest[k] = length
            group = []
            for k in sorted(chosen):  # the parts' own (priority) order
                run, batch = parts[k]
                rows = chosen[k]
                group.append((run, batch if rows is None else take_rows(batch, sorted(rows), longest[k])))
            groups.append(group)
        return groups

    def set_attention(self, attention: str | None, compiled: bool = False, config=None) -> None:
        """Take the model's attention implementation (`config._attn_implementation`) for packed steps: whether it
        keeps the sequences apart (`varlen_attention`), up to how many tokens a step (`packed_row_tokens`: for
        `sdpa_packed`, whether the steps are `compiled` and the model's layers, `config`), and whether a NaN stays
        in its sequence (`isolates_non_finite`); see `peft_mole.packed_attention`."""
        self.varlen_attention = packed_attention.keeps_sequences_apart(attention)
        self.packed_row_tokens = packed_attention.packed_row_tokens(attention, compiled, config)
        self.isolates_non_finite = packed_attention.isolates_non_finite(attention)

    def group_packed(self, parts: list[tuple[JobRun, dict]]) -> list[list[tuple[JobRun, dict]]]:
        """Steps for packed (padding-free) micro-batches: each step concatenates its micro-batches into one row.

        With an attention that computes each sequence apart (`varlen_attention`: flash attention's varlen kernels,
        or `sdpa_packed`) all of them go in one step, up to `packed_row_tokens` (`sdpa_packed` compiled, or on a
        model with sliding-window layers: its row gets transformers' (T × T) mask, T² bytes). Without one (SDPA,
        eager), a packed row's attention is computed over the whole row with a block-diagonal mask, so its cost
        and the mask grow with the square of the row's length: the micro-batches are then put, whole, into steps of at
        most the longest one's tokens. Both by first-fit decreasing; a longer micro-batch is a step of its own, so no
        step's attention is longer than one job's alone or the limit."""
        sizes = [batch["input_ids"].shape[1] for _, batch in parts]
        capacity = max(sizes, default=0)
        if self.varlen_attention:
            capacity = max(capacity, self.packed_row_tokens) if self.packed_row_tokens is not None else sum(sizes)
        if sum(sizes) <= capacity or len(parts) < 2:
            return [parts]
        bins: list[tuple[int, list[int]]] = []  # (tokens, part indices)
        for k in sorted(range(len(parts)), key=lambda k: -sizes[k]):
            for b, (tokens, members) in enumerate(bins):
                if tokens + sizes[k] <= capacity:
                    bins[b] = (tokens + sizes[k], members + [k])
                    break
            else:
                bins.append((sizes[k], [k]))
        return [[parts[k] for k in sorted(members)] for _, members in bins]

    def profiled(self, runs: list[JobRun], measured_resident: bool) -> None:
        """Note the jobs' resident bytes (`JobRun.resident_bytes`) while the memory model is profiled: where the
        profile measured them (`measured_resident`: the CUDA allocator's peak, `memory.measures_resident`) they are
        in its constant and what they grow or shrink by later is `resident_change`; where it did not (CPU: saved
        activations only) the constant holds none, and every byte the jobs keep is added (until 2026-12-06 a CPU
        prediction also subtracted what ended jobs freed, which it had never counted: a later step ran over
        `max_memory`)."""
        self.runs, self.measured_resident = runs, measured_resident
        self.profiled_resident_bytes = float(sum(run.resident_bytes() for run in runs)) if measured_resident else 0.0

    def resident_change(self, parts: list[tuple[JobRun, dict]] | None = None) -> float:
        """Bytes the jobs keep between steps now, less what they kept while profiled (none where the profile did not
        measure them, `profiled`): optimizer states created since (a job's first step) count, states and gradients
        freed by ended jobs (`JobRun.release`) come off.
        A job that has not stepped counts the state its first step creates only if it is among `parts` (default:
        every job): a job that waits creates none, so a budget that fits each job alone runs them in turn.
        0 for a memory model fitted without `profiled`."""
        if self.profiled_resident_bytes is None:
            return 0.0
        names = None if parts is None else {run.name for run, _ in parts}
        return sum(kept + (coming if names is None or name in names else 0)
                   for name, (kept, coming) in self._held_bytes().items()) - self.profiled_resident_bytes

    def _held_bytes(self) -> dict[str, tuple[int, int]]:
        """{job: (kept, coming)} (`JobRun.held_bytes`), once for every job; empty without `profiled`, whose
        constant the memory model's predictions start from."""
        if self.profiled_resident_bytes is None:
            return {}
        return {run.name: run.held_bytes() for run in self.runs}

    def predict(self, parts: list[tuple[JobRun, dict]], resident: float | None = None) -> float:
        """Predicted peak bytes of the parts' steps: one packed row per step of packed parts (the largest step), else
        one step padded to the longest part; each row through its job (the memory model knows each job's kind);
        plus `resident` (default: `resident_change(parts)`)."""
        if all(is_packed(batch) for _, batch in parts):
            step_bytes = max(self.memory_model.predict([sum(b["input_ids"].shape[1] for _, b in step)],
                                                       [{run.name: batch["input_ids"].shape[1] for run, batch in step}])
                             for step in self.group_packed(parts))
        else:
            length = max(batch["input_ids"].shape[1] for _, batch in parts)
            jobs = [run.name for run, batch in parts for _ in range(batch["input_ids"].shape[0])]
            step_bytes = self.memory_model.predict([length] * len(jobs), jobs)
        return step_bytes + (self.resident_change(parts) if resident is None else resident)

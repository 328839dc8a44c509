"""The ASPEN scheduler's pieces: memory model fit, admission order, packing under a budget, length grouping."""

from __future__ import annotations

import itertools
import threading

import pytest
import torch

from peft_mole.multijob.memory import MemoryModel, activation_bytes
from peft_mole.multijob.scheduler import JobScheduler


class FakeRun:
    def __init__(self, name, priority=0):
        self.name, self.status, self.error = name, "waiting", None
        self.resident = 0  # optimizer state and gradient bytes
        self.job = type("Job", (), {"priority": priority})()

        self.projected = 0  # of which the optimizer state its first step creates (it has not stepped)

    def resident_bytes(self) -> int:
        return self.resident

    def held_bytes(self) -> tuple[int, int]:
        return self.resident - self.projected, self.projected


def part(name, rows, length, priority=0):
    ids = torch.ones(rows, length, dtype=torch.long)
    return FakeRun(name, priority), {"input_ids": ids, "attention_mask": ids}


def lora_scheduler(max_memory: float, jobs: list[str]) -> JobScheduler:
    """A scheduler whose memory model is fitted on job "a" at 10 bytes per token; `jobs` share its kind."""
    scheduler = JobScheduler(max_memory=max_memory)
    scheduler.memory_model.kind_of = dict.fromkeys(jobs, "lora")
    for rows, length in [(1, 10), (2, 10), (1, 40)]:
        scheduler.memory_model.observe([length] * rows, 10.0 * rows * length, jobs=["a"] * rows)
    return scheduler


def as_two_processes(run) -> None:
    """`run(process, agree)` in two threads in lockstep, `agree(decision)` the AND of both processes' decisions (a
    collective, simulated); an error in either thread is raised here (an assertion inside a thread would only
    warn), and releases the other from its wait."""
    barrier, votes, errors = threading.Barrier(2), [None, None], []

    def agree_as(process: int):
        def agree(decision: bool) -> bool:
            votes[process] = decision
            barrier.wait()
            both = all(votes)
            barrier.wait()  # (both read before the next vote)
            return both
        return agree

    def target(process: int) -> None:
        try:
            run(process, agree_as(process))
        except BaseException as error:  # noqa: BLE001 — raised below, in the test's thread
            errors.append(error)
            barrier.abort()

    threads = [threading.Thread(target=target, args=(p,)) for p in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    real = [e for e in errors if not isinstance(e, threading.BrokenBarrierError)]
    if real or errors:
        raise (real or errors)[0]


def test_memory_model_recovers_a_quadratic_law_and_predicts_unseen_shapes():
    law = lambda lengths: 5e8 + 3e4 * sum(lengths) + 11.0 * sum(x * x for x in lengths)  # noqa: E731
    model = MemoryModel()
    for rows, length in [(1, 64), (2, 128), (4, 256), (1, 512)]:
        model.observe([length] * rows, law([length] * rows))
    beta = model.fit()
    torch.testing.assert_close(beta, torch.tensor([5e8, 3e4, 11.0], dtype=torch.float64), rtol=1e-6, atol=1e-3)
    for rows, length in itertools.product([1, 3, 8], [100, 300, 1000]):
        assert abs(model.predict([length] * rows) - law([length] * rows)) / law([length] * rows) < 1e-9
    assert max(model.relative_errors()) < 1e-9


def test_memory_model_never_fits_memory_that_falls_as_rows_grow():
    """Samples whose fit would give Σ L² a negative coefficient (here a concave law: 5 % less per token on the
    longer rows, as no (L × L) tensor is kept) get β2 = 0 and a linear fit, which does not predict less memory for
    a longer row than for a shorter one."""
    model = MemoryModel()
    for rows, length in [(1, 64), (2, 128), (4, 256), (1, 512), (2, 512)]:
        model.observe([length] * rows, 1e6 + 100.0 * rows * length * (0.95 if length >= 256 else 1.0))
    beta = model.fit()
    assert beta[-1] == 0.0 and beta[1] > 0
    assert model.predict([8192]) > model.predict([4096]) > model.predict([1024])
    quadratic = MemoryModel()
    for rows, length in [(1, 64), (2, 128), (4, 256), (1, 512)]:
        quadratic.observe([length] * rows, 1e6 + 100.0 * rows * length + 0.5 * rows * length**2)
    assert quadratic.fit()[-1] == pytest.approx(0.5)


def test_memory_model_needs_three_shapes():
    model = MemoryModel()
    model.observe([32], 10.0)
    model.observe([32], 11.0)
    assert not model.fitted
    with pytest.raises(ValueError, match="at least 3 different batch shapes"):
        model.fit()


def test_memory_model_per_kind_recovers_each_kinds_constant_and_rate_and_predicts_mixed_and_packed_steps():
    kind_of = {"a": "lora", "b": "lora", "m": "moe", "n": "moe", "d": "dyn"}
    per_job, rate = {"lora": 2e5, "moe": 9e6, "dyn": 4e6}, {"lora": 3e4, "moe": 5e4, "dyn": 4.2e4}

    def law(tokens: dict, squares: float) -> float:  # tokens per job
        return 5e8 + sum(per_job[kind_of[j]] + rate[kind_of[j]] * n for j, n in tokens.items()) + 11.0 * squares

    model = MemoryModel(kind_of)
    plan = [(["a"], 64), (["a", "a"], 128), (["a"], 512), (["a", "b"], 256), (["m"], 256), (["m", "m"], 100),
            (["a", "m"], 128), (["d"], 100), (["d", "d"], 300), (["a", "d"], 50)]  # as fit_by_profiling plans
    for jobs, length in plan:
        tokens = {}
        for job in jobs:
            tokens[job] = tokens.get(job, 0) + length
        model.observe([length] * len(jobs), law(tokens, len(jobs) * length**2), jobs=jobs)
    assert model.kinds == ["lora", "moe", "dyn"] and model.fitted
    expected = [5e8, 2e5, 9e6, 4e6, 3e4, 5e4, 4.2e4, 11.0]  # β0, γ per kind, β1 per kind, β2
    torch.testing.assert_close(model.fit(), torch.tensor(expected, dtype=torch.float64), rtol=1e-6, atol=1e-3)
    mixed = model.predict([300] * 4, jobs=["m", "a", "n", "m"])  # two MixLoRA jobs and a LoRA job in one step
    assert mixed == pytest.approx(law({"m": 600, "a": 300, "n": 300}, 4 * 300**2), rel=1e-9)
    packed = model.predict([700], jobs=[{"d": 200, "b": 500}])  # one packed row of two jobs' sequences
    assert packed == pytest.approx(law({"d": 200, "b": 500}, 700**2), rel=1e-9)
    one_job = MemoryModel()  # what profiling one job predicts: its constant once, its rate for every token
    for jobs, length in plan[:3]:
        one_job.observe([length] * len(jobs), law({"a": len(jobs) * length}, len(jobs) * length**2))
    missed = 2 * 9e6 + 900 * (5e4 - 3e4)  # the two MixLoRA jobs' constants and their rows' extra rate
    assert mixed - one_job.predict([300] * 4) == pytest.approx(missed)
    with pytest.raises(ValueError, match=r"not fitted on the kinds of jobs \['other'\]"):
        model.predict([10], jobs=["other"])
    with pytest.raises(ValueError, match="jobs has 1 entries for 2 rows"):
        model.predict([10, 10], jobs=["a"])
    with pytest.raises(ValueError, match="do not sum to its length 10"):
        model.predict([10], jobs=[{"a": 4, "m": 5}])


def test_memory_model_needs_each_kind_observed_apart():
    model = MemoryModel({"c": "c", "d": "d"})
    for rows, length in [(1, 16), (2, 16), (1, 64)]:
        model.observe([length] * rows, 100.0 * rows * length, jobs=["a"] * rows)
    model.observe([32], 3200.0, jobs=["b"])
    model.observe([64, 64], 12800.0, jobs=["b", "b"])
    model.observe([16, 16], 3200.0, jobs=["a", "b"])
    assert model.fitted  # [1, n_a, n_b, T_a, T_b, Σ L²] from six shapes
    model.observe([32, 32], 6400.0, jobs=["c", "d"])
    model.observe([16, 16], 3200.0, jobs=["c", "d"])
    model.observe([8, 8], 1600.0, jobs=["c", "d"])
    model.observe([4, 4], 800.0, jobs=["c", "d"])  # c and d only ever together: their terms are not separable
    assert not model.fitted
    with pytest.raises(ValueError, match="each kind of job also observed apart"):
        model.fit()
    for jobs, length in [(["c"], 48), (["d"], 24), (["d", "d"], 40)]:
        model.observe([length] * len(jobs), 100.0 * length * len(jobs), jobs=jobs)
    beta = model.fit()  # [1, n_a, n_b, n_c, n_d, T_a, T_b, T_c, T_d, Σ L²]
    torch.testing.assert_close(beta[5:9], torch.full((4,), 100.0, dtype=torch.float64), rtol=1e-6, atol=1e-6)
    assert max(model.relative_errors()) < 1e-9


def test_packing_weighs_each_jobs_rows_by_its_memory_kind():
    scheduler = JobScheduler(max_memory=900.0)
    scheduler.memory_model.kind_of = {"a": "lora", "b": "lora", "m": "moe"}
    for jobs, length in [(["a"], 10), (["a", "a"], 10), (["a"], 40), (["m"], 20), (["m"], 40), (["a", "m"], 10)]:
        bytes_ = sum(10.0 * length if job == "a" else 15.0 * length for job in jobs)
        scheduler.memory_model.observe([length] * len(jobs), bytes_, jobs=jobs)
    a, b = part("a", 2, 20), part("b", 2, 20)
    assert [r.name for r, _ in scheduler.pack([a, b])] == ["a", "b"]  # 400 + 400 bytes
    a, moe = part("a", 2, 20), part("m", 2, 20)
    assert [r.name for r, _ in scheduler.pack([a, moe])] == ["a"]  # 400 + 600: the MixLoRA job waits
    assert scheduler.predict([moe]) == pytest.approx(600.0)


def test_predictions_add_the_optimizer_state_created_or_freed_since_profiling():
    scheduler = lora_scheduler(1000.0, ["a", "b"])  # 10 bytes per token
    (run_a, batch_a), (run_b, batch_b) = part("a", 2, 20), part("b", 2, 20)
    run_a.resident = run_b.resident = 50  # gradient buffers, made before profiling
    scheduler.profiled([run_a, run_b], measured_resident=True)  # (as on CUDA)
    assert scheduler.predict([(run_a, batch_a), (run_b, batch_b)]) == pytest.approx(800.0)
    run_a.resident = run_b.resident = 150  # both stepped: 100 bytes of AdamW state each
    assert scheduler.predict([(run_a, batch_a), (run_b, batch_b)]) == pytest.approx(1000.0)
    run_c = FakeRun("c")
    scheduler.admit([run_a, run_b, run_c])  # a third job adds its state once it runs
    run_c.resident = 1
    assert [r.name for r, _ in scheduler.pack([(run_a, batch_a), (run_b, batch_b)])] == ["a"]
    run_b.resident = 0  # b ended and released its state and buffers
    assert scheduler.resident_change() == pytest.approx(150 + 0 + 1 - 100)
    assert [r.name for r, _ in scheduler.pack([(run_a, batch_a), (run_b, batch_b)])] == ["a", "b"]


def test_a_profile_that_did_not_measure_the_optimizer_state_adds_all_of_it_and_subtracts_nothing():
    """CPU: the profile measured saved activations only, so a prediction adds every byte the jobs keep, and a job
    that ends takes off only what it had added (before: its bytes at profiling came off too, which the profile
    never held, and the later step ran over `max_memory`)."""
    scheduler = lora_scheduler(900.0, ["a", "b"])  # 10 bytes per token
    (run_a, batch_a), (run_b, batch_b) = part("a", 2, 20), part("b", 2, 20)
    run_a.resident = run_b.resident = 50  # gradient buffers, made before profiling
    scheduler.profiled([run_a, run_b], measured_resident=False)
    assert scheduler.predict([(run_a, batch_a), (run_b, batch_b)]) == pytest.approx(800.0 + 100.0)
    run_a.resident = 450  # a stepped (its AdamW state), b ended and released its buffers
    run_b.resident = 0
    assert scheduler.resident_change() == pytest.approx(450.0)
    assert scheduler.predict([(run_a, batch_a)]) == pytest.approx(400.0 + 450.0)
    run_a.resident = 550
    assert scheduler.pack([(run_a, batch_a)]) == [] and run_a.status == "failed"  # 950 > 900 (before: 900 fitted)
    assert "gradients)" in run_a.error and "since profiling" not in run_a.error


def test_a_job_that_has_not_stepped_counts_its_coming_optimizer_state_only_in_a_step_it_is_in():
    """A budget that fits each job's step with its own coming state, not with every job's: the jobs run in turn
    (before: every job failed at its first step)."""
    scheduler = lora_scheduler(700.0, ["a", "b", "c", "high", "low", "huge"])  # 10 bytes per token
    parts = [part(name, 2, 20) for name in "abc"]  # 400 bytes each
    for run, _ in parts:
        run.status, run.resident = "running", 0
    scheduler.profiled([run for run, _ in parts], measured_resident=True)
    for run, _ in parts:
        run.resident = run.projected = 200  # AdamW state to come: 400 + 3 x 200 > 700, 400 + 200 fits
    assert [r.name for r, _ in scheduler.pack(parts)] == ["a"]
    assert all(run.status == "running" and run.error is None for run, _ in parts)  # b and c wait, not fail
    assert scheduler.predict(parts[:1]) == pytest.approx(600.0)
    parts[0][0].projected = 0  # a stepped: its state is real now and counts in every step
    high, low = part("high", 2, 20, priority=1), part("low", 2, 20)  # two more jobs, one before a, unstepped
    high[0].status = low[0].status = "running"
    high[0].resident = high[0].projected = low[0].resident = low[0].projected = 200
    scheduler.runs += [high[0], low[0]]
    # high does not fit beside a's state (200 + 400 + 200 > 700), a does: high waits for a to end, not fails
    assert [r.name for r, _ in scheduler.pack([high, parts[0]])] == ["a"] and high[0].status == "running"
    # nothing fits now, each would alone: the last by priority fails, its memory freed for the others
    assert scheduler.pack([high, low]) == [] and (high[0].status, low[0].status) == ("running", "failed")
    assert "no job fits beside the optimizer states the others keep" in low[0].error
    assert "over max_memory=700 bytes" in low[0].error  # (a budget under 1 MiB read "0 MiB" before)
    # a micro-batch that would not fit even alone fails, whatever its place
    huge = part("huge", 4, 40)
    huge[0].status = "running"
    assert scheduler.pack([huge, high]) == [] and huge[0].status == "failed" and high[0].status == "running"
    assert "lower per_device_train_batch_size" in huge[0].error


def test_activation_bytes_counts_what_autograd_saves():
    w = torch.randn(64, 64, requires_grad=True)
    with activation_bytes() as small:
        (torch.randn(8, 64) @ w).tanh().sum()
    with activation_bytes() as big:
        (torch.randn(32, 64) @ w).tanh().sum()
    assert small["bytes"] > 0 and big["bytes"] > 3 * small["bytes"]


def test_admission_by_priority_then_arrival_with_a_limit():
    runs = [FakeRun("a"), FakeRun("b", 2), FakeRun("c"), FakeRun("d", 2)]
    scheduler = JobScheduler(max_concurrent_jobs=3)
    assert [r.name for r in scheduler.admit(runs)] == ["b", "d", "a"]
    runs[1].status = "done"  # b finishes: c gets its place
    assert [r.name for r in scheduler.admit(runs)] == ["d", "a", "c"]


def test_packing_under_the_memory_budget_defers_and_fails_clearly():
    scheduler = lora_scheduler(1000.0, ["a", "b", "c", "huge"])  # 10 bytes per token
    a, b, huge = part("a", 2, 20), part("b", 2, 20), part("huge", 8, 40)
    assert [r.name for r, _ in scheduler.pack([a, b])] == ["a", "b"]  # 800 bytes: fits
    c = part("c", 2, 30)
    assert [r.name for r, _ in scheduler.pack([a, b, c])] == ["a", "b"]  # c waits for the next step
    assert c[0].status == "waiting" and c[0].error is None  # deferred, not failed
    # first the next time: it runs; a beside it would be padded to 30 tokens, 4 × 30 × 10 = 1200 bytes: a waits
    assert [r.name for r, _ in scheduler.pack([c, a, b])] == ["c"]
    assert scheduler.pack([huge]) == [] and huge[0].status == "failed" and "over max_memory" in huge[0].error
    with pytest.raises(ValueError, match="max_memory"):
        JobScheduler(max_memory=-1)
    with pytest.raises(ValueError, match="max_concurrent_jobs"):
        JobScheduler(max_concurrent_jobs=0)
    with pytest.raises(ValueError, match="max_memory must be a finite number of bytes"):
        JobScheduler(max_memory=True)  # (before: a budget of 1 byte)
    with pytest.raises(ValueError, match="max_concurrent_jobs must be an int"):
        JobScheduler(max_concurrent_jobs=True)


def test_processes_pack_one_agreed_set_where_their_own_choices_would_not_meet():
    """Two processes, each with its shard's micro-batches, and each job keeping 100 bytes of optimizer state
    (10 bytes per token, budget 1000): on process 0 A is short and B long, on process 1 A is too long to run beside
    B's state. Chosen apart, process 0 took A and process 1 took B, and the jobs both agreed on were none, every
    round (a hang). With `agree` (the AND over processes; here two threads in lockstep) both take B, which fits on
    both."""

    def scheduler_of(parts) -> JobScheduler:
        scheduler = lora_scheduler(1000.0, ["a", "A", "B"])
        for run, _ in parts:
            run.resident = 100
        scheduler.runs, scheduler.profiled_resident_bytes = [run for run, _ in parts], 0.0
        return scheduler

    def shards():
        # (A on process 1: 850 bytes and its 100 fit alone, 950; beside B's 100 more they do not. 90 tokens, which
        # fitted alone at exactly the budget, 1000, failed A on CI by a rounding of the fitted rate)
        return {0: [part("A", 1, 10), part("B", 1, 70)], 1: [part("A", 1, 85), part("B", 1, 10)]}

    alone = {p: [r.name for r, _ in scheduler_of(c).pack(c)] for p, c in shards().items()}
    assert alone == {0: ["A"], 1: ["B"]}  # what each process chose by itself: no job in common
    parts, chosen = shards(), {}

    def run(process: int, agree) -> None:
        chosen[process] = [r.name for r, _ in scheduler_of(parts[process]).pack(parts[process], agree)]

    as_two_processes(run)
    assert chosen == {0: ["B"], 1: ["B"]}
    assert all(run.status == "waiting" for shard in parts.values() for run, _ in shard)  # A waits, none failed


def test_processes_agree_on_the_job_that_never_fits_before_failing_the_last_one():
    """Nothing fits on every process (each job keeps 100 bytes of state, 10 bytes per token, budget 1000); job Z
    (first by priority) would not fit even alone on process 1, and on process 0 each job would fit alone. Decided
    apart, process 0 failed the last job, A, and process 1 failed Z: the trainer fails a job failed anywhere, so
    both failed. Agreed, both processes fail Z alone, and A waits."""

    shards = {0: [part("Z", 1, 85), part("A", 1, 85)], 1: [part("Z", 1, 200), part("A", 1, 10)]}
    for shard in shards.values():
        for run, _ in shard:
            run.resident = 100

    def run(process: int, agree) -> None:
        scheduler = lora_scheduler(1000.0, ["a", "Z", "A"])
        scheduler.runs, scheduler.profiled_resident_bytes = [r for r, _ in shards[process]], 0.0
        assert scheduler.pack(shards[process], agree) == []

    as_two_processes(run)
    statuses = {p: [(r.name, r.status) for r, _ in shard] for p, shard in shards.items()}
    assert statuses == {0: [("Z", "failed"), ("A", "waiting")], 1: [("Z", "failed"), ("A", "waiting")]}
    assert "lower per_device_train_batch_size" in shards[1][0][0].error


def test_a_budget_below_any_step_says_so_and_small_budgets_read_in_bytes():
    """A budget under the base's fixed cost: no batch size helps, so the error says to raise max_memory (before:
    "lower per_device_train_batch_size"); the figure of a job that fails alone counts its own state, not every
    job's; a budget of 40 bytes (40 GB meant) reads "40 bytes" (before: "0.0 KiB"); a numpy number is a budget."""
    import numpy as np

    scheduler = JobScheduler(max_memory=np.float64(40))
    assert scheduler.max_memory == 40.0 and type(scheduler.max_memory) is float
    scheduler.memory_model.kind_of = {"a": "lora", "b": "lora"}
    for rows, length in [(1, 10), (2, 10), (1, 40)]:  # 1000 bytes fixed, 10 per token
        scheduler.memory_model.observe([length] * rows, 1000.0 + 10.0 * rows * length, jobs=["a"] * rows)
    (run_a, batch_a), (run_b, _) = part("a", 1, 2), part("b", 1, 2)
    run_a.resident, run_b.resident = 4, 500
    scheduler.runs, scheduler.profiled_resident_bytes = [run_a, run_b], 0.0
    assert scheduler.pack([(run_a, batch_a)]) == [] and run_a.status == "failed"
    assert "needs about 1.0 KiB (of which 4 bytes its own optimizer state" in run_a.error, run_a.error
    assert "max_memory=40 bytes" in run_a.error and "max_memory is below the base's own cost; raise it" in run_a.error
    with pytest.raises(ValueError, match="max_memory must be a finite number of bytes"):
        JobScheduler(max_memory=float("inf"))


def test_length_grouping_splits_only_when_it_saves_more_than_a_step_costs():
    short1, short2, long = part("s1", 4, 20), part("s2", 4, 24), part("l", 4, 200)
    groups = JobScheduler.group_by_length([long, short1, short2], step_overhead_tokens=256)
    assert [[r.name for r, _ in g] for g in groups] == [["s1", "s2"], ["l"]]  # saves 8 x 176 tokens > 256
    groups = JobScheduler.group_by_length([long, short1, short2], step_overhead_tokens=5000)
    assert [[r.name for r, _ in g] for g in groups] == [["l", "s1", "s2"]]  # one step, in the parts' order
    assert JobScheduler.group_by_length([long, short1], step_overhead_tokens=None) == [[long, short1]]


def test_step_cost_fits_the_fixed_cost_of_a_step_in_tokens():
    from peft_mole.multijob.scheduler import StepCost

    assert StepCost().overhead_tokens() == 0  # by default, until measured: every distinct length its own step
    cost = StepCost(initial_tokens=256)
    assert cost.overhead_tokens() == 256  # nothing measured yet
    cost.observe(5000, 30.0)  # the first step (warm-up) is never used
    cost.observe(100, 0.05 + 0.001 * 100)
    cost.observe(100, 0.05 + 0.001 * 100)
    assert cost.overhead_tokens() == 256  # one size only: no slope yet
    cost.observe(400, 0.05 + 0.001 * 400)
    assert cost.overhead_tokens() == 50  # three steps of two sizes: 50 ms per step = 50 tokens
    for tokens in [200, 800, 1600, 300, 500, 700]:
        cost.observe(tokens, 0.05 + 0.001 * tokens)
    cost.observe(300, 2.0)  # one step slowed down 6x by something else
    assert cost.overhead_tokens() == 50
    cost = StepCost(initial_tokens=256)
    for tokens, seconds in [(1, 1.0), (100, 0.2), (200, 0.1), (300, 0.05)]:  # time not growing with size
        cost.observe(tokens, seconds)
    assert cost.overhead_tokens() == cost.max_tokens == 4096  # padding costs nothing: one step per round
    cost = StepCost(max_tokens=1000)
    for tokens in [100, 100, 200, 300]:
        cost.observe(tokens, 10.0 + 0.001 * tokens)  # a huge fixed cost is capped
    assert cost.overhead_tokens() == 1000


def test_padding_stats_separate_the_jobs_own_padding_from_what_mixing_adds():
    from peft_mole.multijob.report import PaddingStats

    short, long = part("s", 2, 10), part("l", 1, 40)
    short[1]["attention_mask"] = torch.tensor([[1] * 10, [1] * 6 + [0] * 4])  # the job's collator padded 4 tokens
    stats = PaddingStats()
    stats.add_micro_batches([short, long])
    stats.add([short, long])  # mixed: the short rows are padded to 40
    assert stats.real == 16 + 40 and stats.total == 3 * 40 and stats.micro_batch_total == 20 + 40
    assert stats.pad_fraction == pytest.approx(1 - 56 / 120)
    assert stats.micro_batch_pad_fraction == pytest.approx(1 - 56 / 60)
    stats.add([short])  # a second round, the job alone: no padding beyond the job's own
    stats.add_micro_batches([short])
    assert stats.total - stats.micro_batch_total == 120 - 60


def lora_part(name, lengths, seq=None):
    """A right-padded micro-batch with rows of the given real lengths; token ids encode (row, position)."""
    seq = seq or max(lengths)
    ids = torch.tensor([[100 * i + t for t in range(seq)] for i in range(len(lengths))])
    mask = (torch.arange(seq) < torch.tensor(lengths)[:, None]).long()
    labels = ids.masked_fill(mask == 0, -100)
    return FakeRun(name), {"input_ids": ids, "attention_mask": mask, "labels": labels}


def test_splittable_micro_batches_are_cut_into_rows_of_their_real_length():
    a = lora_part("a", [200, 10, 12])  # one long row among short ones
    b = part("b", 2, 11)  # not splittable: stays whole
    split = lambda run: run.name == "a"  # noqa: E731
    groups = JobScheduler.group_by_length([a, b], step_overhead_tokens=100, splittable=split)
    assert [[(r.name, tuple(batch["input_ids"].shape)) for r, batch in g] for g in groups] == [
        [("a", (2, 12)), ("b", (2, 11))], [("a", (1, 200))]
    ]
    short, long = groups[0][0][1], groups[1][0][1]
    assert torch.equal(short["input_ids"], a[1]["input_ids"][1:3, :12])  # rows 1 and 2, in order, cut to 12
    assert torch.equal(short["labels"], a[1]["labels"][1:3, :12])
    assert torch.equal(short["attention_mask"].sum(1), torch.tensor([10, 12]))
    assert torch.equal(long["input_ids"], a[1]["input_ids"][:1])
    # without splitting, a's micro-batch is one unit of 3 rows x 200: b gets a step of its own (cost 822 < 1100)
    assert JobScheduler.group_by_length([a, b], step_overhead_tokens=100) == [[b], [a]]
    # a large step cost keeps everything in one step, each micro-batch as it came
    assert JobScheduler.group_by_length([a, b], step_overhead_tokens=10**6, splittable=split) == [[a, b]]


def test_rows_are_not_cut_apart_when_the_batch_is_not_right_padded():
    from peft_mole.multijob.batching import row_lengths, take_rows

    run, batch = lora_part("a", [5, 3])
    assert row_lengths(batch) == [5, 3]
    left = dict(batch, attention_mask=batch["attention_mask"].flip(1))
    assert row_lengths(left) is None
    assert row_lengths({"input_ids": batch["input_ids"]}) is None
    assert row_lengths(dict(batch, extra=torch.zeros(3))) is None  # a tensor not laid out by rows
    assert row_lengths(dict(batch, scalar=torch.tensor(1.0))) is None
    trained_padding = batch["labels"].clone()
    trained_padding[1, 4] = 7  # a label on row 1's padding
    assert row_lengths(dict(batch, labels=trained_padding)) is None
    assert take_rows(batch, [0, 1], 5) is batch
    groups = JobScheduler.group_by_length([(run, left)], step_overhead_tokens=0, splittable=lambda r: True)
    assert groups == [[(run, left)]]


def test_profiling_that_runs_out_of_memory_profiles_again_at_half_the_length(caplog):
    """The profile's steps hold up to twice `max_length`'s tokens, whatever the jobs' batches; one that runs out of
    memory ended `train()` (before 2026-12-07). Now the profile starts again at half the length (here until its
    steps hold at most 64 tokens), and the fit, linear in the tokens, still predicts a full-length step."""
    def step(ids, row_jobs):
        tokens = ids.numel()
        if tokens > 64:
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 8 bytes")
        x = torch.randn(tokens, 16, requires_grad=True)
        torch.autograd.grad((x * x).sum(), x)  # saves x: 64 bytes per token

    model = MemoryModel()
    with caplog.at_level("WARNING"):
        model.fit_by_profiling(step, torch.device("cpu"), vocab_size=10, max_length=512, jobs=["a"])
    assert [r.getMessage().split(";")[0] for r in caplog.records] == [
        f"a memory-profiling step of {n} tokens per row ran out of memory" for n in (512, 256, 128, 64)]
    assert max(sum(tokens.values()) for tokens, _, _ in model.samples) == 64
    assert model.predict([512], ["a"]) == pytest.approx(512 * 64, rel=1e-6)
    with pytest.raises(RuntimeError, match="can't allocate memory"):  # not even 8 tokens fit: the error itself
        MemoryModel().fit_by_profiling(lambda ids, jobs: step(torch.zeros(100), jobs), torch.device("cpu"), 10, 16,
                                       jobs=["a"])


def test_dynmole_profiling_that_runs_out_of_memory_measures_again_at_half_the_length(caplog):
    """`costliest_selection` measures two-row steps of the full length before the fit; one that runs out of memory
    ended `train()` (before 2026-12-07): it is measured again at half the length, and the rules come back after."""
    from types import SimpleNamespace

    from peft_mole.multijob.memory import costliest_selection

    lengths = []

    def step(ids, row_jobs):
        lengths.append(ids.shape[1])
        if ids.shape[1] > 16:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        x = torch.randn(ids.numel(), 8, requires_grad=True)
        torch.autograd.grad((x * x).sum(), x)

    settings = [SimpleNamespace(rule="own", num_experts=4)]
    with caplog.at_level("WARNING"), costliest_selection(step, torch.device("cpu"), {"d": settings}, 10, 64) as costs:
        assert costs["d"]["dense"] > 0 and costs["d"]["dispatch"] > 0
    assert lengths[0] == 64 and set(lengths[-4:]) == {16} and settings[0].rule == "own"
    assert "profiling step of 64 tokens per row ran out of memory; measuring again at 32" in caplog.text

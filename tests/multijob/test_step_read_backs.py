"""A mixed step reads its jobs' losses and token counts back to the host once, not once per job (each read of a
scalar is a stream sync on CUDA, which stalls the kernel queue of a host-bound multi-job step)."""

from __future__ import annotations

from peft import LoraConfig

from peft_mole import JobConfig, MultiJobTrainer
from tests.helpers import tiny_base
from tests.multijob.test_trainer import ALL_LINEAR, run_args
from tests.ops.test_read_backs import _ReadBacks


def test_a_mixed_step_makes_no_per_job_scalar_reads(assets, tmp_path):
    """Counted on the CPU by the operators that read back on CUDA (`tests/ops/test_read_backs.py`): the per-job
    `int(...)`/`float(...)` reads of the step (two per job before) are gone; what remains is one `.tolist()` of all
    jobs' values, which the CPU does not dispatch as an operator."""
    tokenizer, datasets = assets
    jobs = [JobConfig(name, LoraConfig(r=4, lora_alpha=8, target_modules=ALL_LINEAR), datasets[task],
                      per_device_train_batch_size=2, max_steps=2)
            for name, task in (("a", "sentiment"), ("b", "capital"), ("c", "add"))]
    trainer = MultiJobTrainer(model=tiny_base(vocab_size=len(tokenizer)), jobs=jobs, args=run_args(tmp_path),
                              processing_class=tokenizer, step_overhead_tokens=None)  # one step per round
    step, sites, steps = trainer._forward_backward, [], []

    def counted(parts):
        with _ReadBacks() as reads:
            step(parts)
        if steps:  # the first step also runs one-off probes (`grouped_mm_exact`'s)
            sites.extend(reads.sites)
        steps.append(len(parts))

    trainer._forward_backward = counted
    trainer.train()
    assert [r["status"] for r in trainer.job_summary] == ["done"] * 3
    assert steps.count(3) >= 2  # steps of all three jobs ran under the count, after the first
    assert all(r["tokens"] > 0 for r in trainer.job_summary)  # the token counts still arrive, from the one read
    assert sites == []

"""torch.profiler breakdown of one train step (forward + backward + AdamW) of MixLoRA, of PEFT LoRA, and of a
4-job mixed step (4 LoRA jobs, one row each, one base pass; per-job losses and AdamW).

Forward time is grouped by the model's modules (`model::attention`, `model::mlp`, `model::lm_head`, entered by
forward hooks) and the named ranges of peft_mole: route, dispatch, experts_pairs (the blockwise pair function),
experts_dense, and on the step-by-step path experts_gate_up, combine, experts_down; `lora_deltas` for the LoRA
layers' adapter part. `loss` is the loss from the logits (per job in the mixed step); backward and optimizer are
reported whole. Ranges nest (experts inside model::mlp). Prints JSON lines, then the top operators of the last step
profiled.
Usage: python bench/profile_step.py [--shape small] [--steps 3]
"""

from __future__ import annotations

import argparse
from collections import defaultdict

import torch
from common import base_model, emit, lora_config, mixlora_config, random_batch, setup_threads
from peft import get_peft_model
from torch.profiler import ProfilerActivity, profile, record_function

from peft_mole.multijob import MultiJobModel, per_job_losses

RANGES = ("peft_mole::route", "peft_mole::dispatch", "peft_mole::experts_pairs", "peft_mole::experts_dense",
          "peft_mole::experts_gate_up", "peft_mole::combine", "peft_mole::experts_down", "peft_mole::lora_deltas",
          "model::attention", "model::mlp", "model::lm_head", "forward", "loss", "backward", "optimizer")


def label_modules(model: torch.nn.Module) -> None:
    """Profiler ranges around every attention block, MLP block and the LM head (forward only)."""
    labels = {"self_attn": "model::attention", "mlp": "model::mlp", "lm_head": "model::lm_head"}
    for name, module in model.named_modules():
        label = labels.get(name.rsplit(".", 1)[-1])
        if label is None:
            continue

        def enter(mod, args, label=label):
            mod._profile_range = record_function(label)
            mod._profile_range.__enter__()

        def leave(mod, args, output):
            mod._profile_range.__exit__(None, None, None)

        module.register_forward_pre_hook(enter)
        module.register_forward_hook(leave, always_call=True)  # closed even when the module raises


def single_adapter_step(model, batch):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step() -> None:
        with record_function("forward"):
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        with record_function("loss"):
            loss = torch.nn.functional.cross_entropy(out.logits[:, :-1].flatten(0, 1).float(),
                                                     batch["labels"][:, 1:].flatten())
            if out.get("aux_loss") is not None:  # MixLoRA's router loss, as its model adds it with labels
                loss = loss + out["aux_loss"]
        with record_function("backward"):
            loss.backward()
        with record_function("optimizer"):
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    return step


def mixed_step(model: MultiJobModel, batch, jobs: list[str]):
    """One row per job: one base pass, per-job losses (`per_job_losses`), one AdamW per job."""
    rows = {job: slice(i, i + 1) for i, job in enumerate(jobs)}
    optimizers = [torch.optim.AdamW(list(model.job_parameters(job).values()), lr=1e-4) for job in jobs]

    def step() -> None:
        with record_function("forward"):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           adapter_names=jobs).logits
        with record_function("loss"):
            loss = sum(per_job_losses(logits, batch["labels"], rows).values())
        with record_function("backward"):
            loss.backward()
        with record_function("optimizer"):
            for optimizer in optimizers:
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

    return step


def profiled_steps(model, step, steps: int):
    model.train()
    label_modules(model)
    for _ in range(3):
        step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    return prof


def breakdown(prof, steps: int) -> dict[str, float]:
    totals = defaultdict(float)
    for event in prof.key_averages():
        if event.key in RANGES:
            totals[event.key] += event.cpu_time_total / 1000 / steps  # ms per step
    return {key: round(value, 1) for key, value in totals.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="small")
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    setup_threads()
    jobs = [f"job{i}" for i in range(4)]
    models = {
        "peft_lora": get_peft_model(base_model(args.shape), lora_config()),
        "mixlora": get_peft_model(base_model(args.shape), mixlora_config()),
        "multijob_4_lora": MultiJobModel(base_model(args.shape), {job: lora_config() for job in jobs}),
    }
    batch = random_batch(args.shape, models["mixlora"].config.vocab_size)
    seq, vocab = batch["input_ids"].shape[1], models["mixlora"].config.vocab_size
    ids = torch.randint(3, vocab, (len(jobs), seq), generator=torch.Generator().manual_seed(0))
    one_row_per_job = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    for impl, model in models.items():
        if impl == "multijob_4_lora":
            step = mixed_step(model, one_row_per_job, jobs)
        else:
            step = single_adapter_step(model, batch)
        prof = profiled_steps(model, step, args.steps)
        emit({"name": "profile_step", "shape": args.shape, "impl": impl, "ms_per_step": breakdown(prof, args.steps)})
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


if __name__ == "__main__":
    main()

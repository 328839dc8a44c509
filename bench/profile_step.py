"""torch.profiler breakdown of one train step (forward + backward + AdamW) of MixLoRA, of PEFT LoRA, and of a
4-job mixed step (4 LoRA jobs, one row each, one base pass; per-job losses and AdamW).

Forward time is grouped by the model's modules (`model::attention`, `model::mlp`, `model::lm_head`, entered by
forward hooks) and the named ranges of peft_mole: route, dispatch, experts_pairs (the blockwise pair function),
experts_dense, and on the step-by-step path experts_gate_up, combine, experts_down; `lora_deltas` for the LoRA
layers' adapter part. `loss` is the loss from the logits (per job in the mixed step); backward and optimizer are
reported whole. Ranges nest (experts inside model::mlp). Prints JSON lines, then the top operators of the last step
profiled. On CUDA it also prints `gpu_busy` per model (kernels per step, their GPU time over the step's wall time)
and each model's top kernels.
Usage: python bench/profile_step.py [--shape small] [--steps 3] [--impls peft_lora mixlora multijob_4_lora]
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

import common
import torch
from common import base_model, device, emit, lora_config, mixlora_config, random_batch, setup_threads
from peft import get_peft_model
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile, record_function

from peft_mole.multijob import MultiJobModel, per_job_losses

RANGES = ("peft_mole::route", "peft_mole::dispatch", "peft_mole::experts_pairs", "peft_mole::experts_dense",
          "peft_mole::experts_gate_up", "peft_mole::combine", "peft_mole::experts_down", "peft_mole::lora_deltas",
          "model::attention", "model::mlp", "model::lm_head", "forward", "loss", "backward", "optimizer")


def label_modules(model: torch.nn.Module) -> list:
    """Profiler ranges around every attention block, MLP block and the LM head (forward only); returns the hooks'
    handles, removed after profiling."""
    labels = {"self_attn": "model::attention", "mlp": "model::mlp", "lm_head": "model::lm_head"}
    handles = []
    for name, module in model.named_modules():
        label = labels.get(name.rsplit(".", 1)[-1])
        if label is None:
            continue

        def enter(mod, args, label=label):
            mod._profile_range = record_function(label)
            mod._profile_range.__enter__()

        def leave(mod, args, output):
            mod._profile_range.__exit__(None, None, None)

        handles.append(module.register_forward_pre_hook(enter))
        handles.append(module.register_forward_hook(leave, always_call=True))  # closed even when the module raises
    return handles


def single_adapter_step(model, batch):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step() -> None:
        with record_function("forward"):
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
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
                           adapter_names=jobs, use_cache=False).logits
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
    handles = label_modules(model)
    try:
        for _ in range(3):
            step()
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device().type == "cuda" else [])
        with profile(activities=activities) as prof:
            for _ in range(steps):
                step()
    finally:  # the wall time is taken without the labelling hooks
        for handle in handles:
            handle.remove()
    return prof


WALL_STEPS = 10  # BENCH.md's timed steps


def wall_ms(step) -> float:
    """Mean wall-clock ms of `WALL_STEPS` unprofiled steps after one untimed step (the first after a profiler
    session), the GPU's queue drained before and after. Before 2026-12-06: as many steps as were profiled (2 on
    the GPU), right after the profiler, the labelling hooks still on, which makes the busy fraction a lower bound."""
    step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(WALL_STEPS):
        step()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3 / WALL_STEPS


def gpu_busy(prof, steps: int, wall: float) -> dict[str, float]:
    """How launch-bound a step is: kernels per step, their summed GPU time, and that time over the step's wall time
    (near 1: the GPU is kept busy; far below 1: the host's launches or syncs are the limit), and the stream syncs
    the host waited on (a value read back from the GPU, `.item()` or a boolean index). The GPU-side spans of the
    named ranges (user annotations) are not kernels and are left out. (Rows before 2026-12-05 counted
    `host_syncs_per_step` from `aten::_local_scalar_dense`, which includes reads of CPU scalars: AdamW's step
    counters, two per parameter.)"""
    kernels = [e for e in prof.events() if e.device_type == DeviceType.CUDA and not e.is_user_annotation]
    kernel_ms = sum(e.time_range.elapsed_us() for e in kernels) / 1000 / steps
    syncs = sum(1 for e in prof.events() if e.name in ("cudaStreamSynchronize", "cudaDeviceSynchronize"))
    return {"kernels_per_step": round(len(kernels) / steps), "kernel_ms_per_step": round(kernel_ms, 2),
            "wall_ms_per_step": round(wall, 2), "gpu_busy_fraction": round(kernel_ms / wall, 3),
            "stream_syncs_per_step": round(syncs / steps)}


def breakdown(prof, steps: int) -> dict[str, float]:
    totals = defaultdict(float)
    for event in prof.key_averages():
        if event.key in RANGES:
            totals[event.key] += event.cpu_time_total / 1000 / steps  # ms per step
    return {key: round(value, 1) for key, value in totals.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="small", choices=list(common.BATCH))
    parser.add_argument("--steps", type=common.positive_int, default=3)
    parser.add_argument("--impls", nargs="+", default=["peft_lora", "mixlora", "multijob_4_lora"],
                        choices=["peft_lora", "mixlora", "multijob_4_lora"])
    args = parser.parse_args()
    setup_threads()
    jobs = [f"job{i}" for i in range(4)]
    build = {
        "peft_lora": lambda: get_peft_model(base_model(args.shape), lora_config()),
        "mixlora": lambda: get_peft_model(base_model(args.shape), mixlora_config()),
        "multijob_4_lora": lambda: MultiJobModel(base_model(args.shape), {job: lora_config() for job in jobs}),
    }
    models = {impl: build[impl]() for impl in args.impls}
    batch = random_batch(args.shape, next(iter(models.values())).config.vocab_size)
    seq, vocab = batch["input_ids"].shape[1], next(iter(models.values())).config.vocab_size
    ids = torch.randint(3, vocab, (len(jobs), seq), generator=torch.Generator().manual_seed(0)).to(device())
    one_row_per_job = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    for impl, model in models.items():
        if impl == "multijob_4_lora":
            step = mixed_step(model, one_row_per_job, jobs)
        else:
            step = single_adapter_step(model, batch)
        prof = profiled_steps(model, step, args.steps)
        emit({"name": "profile_step", "shape": args.shape, "impl": impl, "ms_per_step": breakdown(prof, args.steps)})
        if device().type == "cuda":
            emit({"name": "gpu_busy", "shape": args.shape, "impl": impl,
                  **gpu_busy(prof, args.steps, wall_ms(step)), "wall_steps": WALL_STEPS})
            print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=12))
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
    if device().type != "cuda":
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


if __name__ == "__main__":
    main()

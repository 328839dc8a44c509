"""One job's optimizer step in a multi-job run: over one flat tensor per group / over the parameters themselves.

What MultiJobTrainer does for each job at its optimizer step, after the mixed step's backward: take the job's
gradients (the flat layout gathers them with one `torch.cat`, `multijob.flat_parameters`), clip their norm
(`max_grad_norm`, 1.0 by default in Trainer and TRL; --no-clip leaves it out), step the AdamW and clear the
gradients. The gradients are fixed random tensors, so only this part is timed; it runs on the host outside any
compiled graph, once per job and step. Job: BENCH.md's LoRA (r 16 on q,k,v,o,gate,up,down) on the shape's model.
Printed per shape: `ratio_median` = flat / per tensor (lower is better), the tensors per job and both times in µs.
Usage: python bench/job_optimizer.py [--shapes tiny small] [--optim adamw_torch_fused] [--no-clip] [--repeats 500]
"""

from __future__ import annotations

import argparse

import common
import torch
from common import OPTIMS, base_model, device, emit, lora_config, record, setup_threads, time_interleaved
from peft import get_peft_model

from peft_mole.multijob.flat_parameters import job_optimizer


def optimizer_step_fn(params: list[torch.nn.Parameter], grads: list[torch.Tensor], optim: str, flat: bool,
                      clip: bool):
    optimizer, layout = job_optimizer(torch.optim.AdamW, {"lr": 1e-4, "fused": optim == "adamw_torch_fused"},
                                      [{"params": params}], device(), flatten=flat)
    if flat and layout is None:
        raise ValueError(f"--optim {optim} is not flattened on {device()} (see flattening_applies)")

    def step() -> None:
        if layout is None:
            for param, grad in zip(params, grads, strict=True):
                param.grad = grad
            stepped = params
        else:
            layout.add_gradients(params, grads)
            stepped = layout.tensors
        if clip:
            torch.nn.utils.clip_grad_norm_(stepped, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shapes", nargs="+", default=["tiny", "small"], choices=list(common.BATCH))
    parser.add_argument("--optim", choices=OPTIMS, default="adamw_torch_fused")
    parser.add_argument("--no-clip", action="store_true")
    parser.add_argument("--repeats", type=common.positive_int, default=500)
    args = parser.parse_args()
    setup_threads()
    for shape in args.shapes:
        model = get_peft_model(base_model(shape), lora_config(0.0))
        params = [p for p in model.parameters() if p.requires_grad]
        gen = torch.Generator().manual_seed(0)
        grads = [(torch.randn(p.shape, generator=gen) * 1e-3).to(p.device, p.dtype) for p in params]
        steps = {
            "per_tensor": optimizer_step_fn(params, grads, args.optim, flat=False, clip=not args.no_clip),
            "flat": optimizer_step_fn(params, grads, args.optim, flat=True, clip=not args.no_clip),
        }
        times = time_interleaved(steps, warmup=20, repeats=args.repeats)
        rows = {impl: record("job_optimizer_step", shape, impl, t, 1, optim=args.optim, clip=not args.no_clip)
                for impl, t in times.items()}
        emit({"name": "job_optimizer", "shape": shape, "optim": args.optim, "clip": not args.no_clip,
              "tensors": len(params), "elements": sum(p.numel() for p in params),
              "ratio_median": rows["flat"]["median_s"] / rows["per_tensor"]["median_s"],
              "ratio_min": rows["flat"]["min_s"] / rows["per_tensor"]["min_s"],
              "per_tensor_us": rows["per_tensor"]["median_s"] * 1e6, "flat_us": rows["flat"]["median_s"] * 1e6})


if __name__ == "__main__":
    main()

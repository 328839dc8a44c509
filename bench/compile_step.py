"""`torch.compile` of an adapted model (issue 6, part 5): compile time and train-step time against eager.

Step = forward + backward + AdamW (BENCH.md). The compiled model is `torch.compile(peft_model)` (what
`TrainingArguments(torch_compile=True)` does), inductor backend. Impls: `peft_lora` (what compiling gains on the
frozen base and plain LoRA), `mixlora`, `mixdora`, `dynmole` (routers at init: every token on every expert) and
`dynmole_sharp` (router weights scaled by --router-scale, about 2 experts per token as after training). Each row
also reports the graph breaks Dynamo met while compiling (0: one graph per forward) and the graphs compiled
after the first step (recompilation; 0 expected). With --gradient-checkpointing both models recompute each decoder
layer in the backward (`gradient_checkpointing_enable(use_reentrant=False)`, TRL's default), and Dynamo is told not to
replay forward side effects in the recompute (`skip_fwd_side_effects_in_bwd_under_checkpoint`): otherwise the
context variable transformers' output capture sets inside each layer keeps the checkpointed layers eager (a compiled
step then costs what an eager one does). The breaks left are transformers' and PEFT's, not peft-mole's.
--compile-backend aot_eager (the test suite's smoke run) traces and differentiates the same graphs without inductor's
code generation; its rows name the backend, and the README table leaves them out.
Usage: python bench/compile_step.py [--shape small] [--impls mixlora dynmole] [--dropout 0.05] [--repeats 10]
       [--gradient-checkpointing] [--compile-backend inductor]
"""

from __future__ import annotations

import time

import torch
import torch._inductor.config
from common import (
    base_model,
    dynmole_config,
    emit,
    lora_config,
    mixlora_config,
    probability,
    random_batch,
    record,
    setup_threads,
    step_parser,
    synchronize,
    time_interleaved,
    train_step_fn,
)
from peft import get_peft_model
from torch._dynamo.utils import counters

IMPLS = ("peft_lora", "mixlora", "mixdora", "dynmole", "dynmole_sharp")


def adapted(shape: str, impl: str, dropout: float, router_scale: float, checkpointing: bool = False):
    if impl == "peft_lora":
        config = lora_config(dropout)
    elif impl.startswith("dynmole"):
        config = dynmole_config(dropout)
    else:
        config = mixlora_config(dropout, use_dora=impl == "mixdora")
    base = base_model(shape)
    if checkpointing:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        base.enable_input_require_grads()
    model = get_peft_model(base, config)
    if impl == "dynmole_sharp":
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "router" in name:
                    p.mul_(router_scale)
    return model


def main() -> None:
    parser = step_parser()
    parser.add_argument("--impls", nargs="+", choices=IMPLS, default=list(IMPLS))
    parser.add_argument("--dropout", type=probability, default=0.05)
    parser.add_argument("--router-scale", type=float, default=4.0, help="dynmole_sharp: router weights × this")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="both models recompute each layer")
    parser.add_argument("--compile-backend", default="inductor",
                        help="torch.compile backend (aot_eager: Dynamo's graphs and AOTAutograd, no code generated)")
    args = parser.parse_args()
    setup_threads()
    torch._inductor.config.force_disable_caches = True  # compile time from scratch, not from an earlier run's cache
    if args.gradient_checkpointing:
        torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint = True
    for impl in args.impls:
        settings = (args.shape, impl, args.dropout, args.router_scale, args.gradient_checkpointing)
        eager = adapted(*settings)
        batch = random_batch(args.shape, eager.config.vocab_size)
        compiled_step = train_step_fn(torch.compile(adapted(*settings), backend=args.compile_backend), batch)
        torch._dynamo.reset()
        counters.clear()
        start = time.perf_counter()
        error = None
        try:
            compiled_step()  # the first call compiles
            synchronize()
        except Exception as failure:  # noqa: BLE001 — reported, not hidden
            error = f"{type(failure).__name__}: {str(failure)[:300]}"
        compile_s = time.perf_counter() - start
        graphs = counters["stats"]["unique_graphs"]
        row = {"name": "compile_step", "shape": args.shape, "impl": impl, "dropout": args.dropout,
               **({"compile": args.compile_backend} if args.compile_backend != "inductor" else {}),
               **({"case": "gradient_checkpointing"} if args.gradient_checkpointing else {}),
               "compile_s": compile_s, "graph_breaks": sum(counters["graph_break"].values()), "graphs": graphs}
        if error is not None:
            emit({**row, "error": error})
            continue
        times = time_interleaved({"eager": train_step_fn(eager, batch), "compiled": compiled_step},
                                 repeats=args.repeats)
        tokens = batch["input_ids"].numel()
        steps = {kind: record("train_step", args.shape, f"{impl}_{kind}", t, tokens) for kind, t in times.items()}
        emit({**row, "graphs_compiled_while_timed": counters["stats"]["unique_graphs"] - graphs,
              "ratio_median": steps["compiled"]["median_s"] / steps["eager"]["median_s"],
              "ratio_min": steps["compiled"]["min_s"] / steps["eager"]["min_s"]})


if __name__ == "__main__":
    main()

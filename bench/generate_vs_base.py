"""BENCH.md ratio 8, `generate_vs_base` (higher is better): greedy generation tokens/s of MixLoRA, DynMoLE and,
for reference, PEFT LoRA (unmerged, same targets) over the base model's, KV cache on, same prompts. DynMoLE is measured with routers sharpened as in
dynmole_vs_mixlora.py (`--router-scale`), since near-uniform routers at init broadcast to all experts. MixDoRA
(`--impls mixdora`, DoRA experts) generates inside `peft.helpers.DoraCaching()`, as PEFT's DoRA inference.
With --compile every model (the base too) generates with a static cache and `CompileConfig(fullgraph=True)`: mode
"reduce-overhead" (CUDA graphs) on a GPU, "default" on the CPU. The rows are then `generate_compiled_vs_base`, with
each model's compile time (its first call less a timed one) and its speed-up over its own eager generation.
`--compile-backend aot_eager` (the test suite's smoke run) traces the same graphs without inductor's code generation
(inductor's decoding: tests/tuners/test_compiled_decoding.py); such rows name their backend.
Usage: python bench/generate_vs_base.py [--shape small] [--new-tokens 64] [--compile] [--compile-backend inductor]
"""

from __future__ import annotations

import time

import torch
from common import (
    BATCH,
    base_model,
    dynmole_config,
    emit,
    lora_config,
    mixlora_config,
    positive_int,
    random_batch,
    record,
    setup_threads,
    step_parser,
    synchronize,
    time_interleaved,
)
from peft import get_peft_model
from peft.helpers import DoraCaching
from transformers import CompileConfig


def compiled_generation(backend: str = "inductor") -> dict:
    """`generate` options for a static cache and one compiled graph per decoding step."""
    on_gpu = torch.cuda.is_available()
    config = CompileConfig(fullgraph=True, backend=backend, mode="reduce-overhead" if on_gpu else "default")
    config._compile_all_devices = True  # transformers compiles on accelerators only unless told so
    return {"cache_implementation": "static", "compile_config": config}


def generate_fn(model, batch, new_tokens: int, compiled: str | None = None):
    """Greedy generation of `new_tokens` after the batch's first 32 tokens; `compiled`: the compile backend."""
    model.eval()
    prompt = {"input_ids": batch["input_ids"][:, :32], "attention_mask": batch["attention_mask"][:, :32]}
    extra = compiled_generation(compiled) if compiled else {}

    @torch.no_grad()
    def generate() -> None:
        with DoraCaching():  # MixDoRA keeps its expert row norms between steps, as PEFT's DoRA inference
            model.generate(**prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                           use_cache=True, pad_token_id=0, **extra)

    return generate


def first_call_s(fn) -> float:
    start = time.perf_counter()
    fn()
    synchronize()
    return time.perf_counter() - start


def sharpened_dynmole(args):
    model = get_peft_model(base_model(args.shape), dynmole_config())
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "router" in name:
                p.mul_(args.router_scale)
    return model


ADAPTED = {
    "peft_lora": lambda args: get_peft_model(base_model(args.shape), lora_config()),
    "mixlora": lambda args: get_peft_model(base_model(args.shape), mixlora_config()),
    "dynmole": sharpened_dynmole,
    "mixdora": lambda args: get_peft_model(base_model(args.shape), mixlora_config(use_dora=True)),
}


def main() -> None:
    parser = step_parser()
    parser.add_argument("--new-tokens", type=positive_int, default=64)
    parser.add_argument("--router-scale", type=float, default=4.0)
    parser.add_argument("--compile", action="store_true", help="static cache + torch.compile, against eager")
    parser.add_argument("--compile-backend", default="inductor",
                        help="torch.compile backend of --compile (aot_eager: Dynamo's graphs, no code generated)")
    parser.add_argument("--impls", nargs="+", default=list(ADAPTED), choices=list(ADAPTED))
    args = parser.parse_args()
    setup_threads()
    base = base_model(args.shape)
    models = (("base", base), *((name, ADAPTED[name](args)) for name in args.impls))
    batch = random_batch(args.shape, base.config.vocab_size)
    steps = {name: generate_fn(m, batch, args.new_tokens) for name, m in models}
    compile_s = {}
    if args.compile:
        for name, m in models:
            steps[f"{name}_compiled"] = generate_fn(m, batch, args.new_tokens, compiled=args.compile_backend)
            compile_s[name] = first_call_s(steps[f"{name}_compiled"])
    mode = compiled_generation()["compile_config"].mode
    times = time_interleaved(steps, repeats=args.repeats)
    tokens = BATCH[args.shape][0] * args.new_tokens
    rows = {name: record("generate", args.shape, name, times[name], tokens, new_tokens=args.new_tokens)
            for name in steps}
    for name in args.impls:
        emit({"name": "generate_vs_base", "shape": args.shape, "impl": name,
              "ratio_median": rows[name]["tokens_per_s"] / rows["base"]["tokens_per_s"],
              "ratio_min": rows["base"]["min_s"] / rows[name]["min_s"]})
        if args.compile:
            compiled, base_compiled = rows[f"{name}_compiled"], rows["base_compiled"]
            emit({"name": "generate_compiled_vs_base", "shape": args.shape, "impl": name,
                  "mode": mode, **({"compile": args.compile_backend} if args.compile_backend != "inductor" else {}),
                  "ratio_median": compiled["tokens_per_s"] / base_compiled["tokens_per_s"],
                  "ratio_min": base_compiled["min_s"] / compiled["min_s"],
                  "compile_s": compile_s[name] - compiled["median_s"],
                  "speedup_vs_eager": compiled["tokens_per_s"] / rows[name]["tokens_per_s"],
                  "base_speedup_vs_eager": base_compiled["tokens_per_s"] / rows["base"]["tokens_per_s"]})


if __name__ == "__main__":
    main()

"""BENCH.md ratio 4, `multijob_speedup` (higher is better): N LoRA jobs trained together in one mixed-adapter step
vs the same jobs trained one after another with plain PEFT LoRA, same rows per job; and the base-only limit

    S(N) = Σ_i T_base(b_i) / T_base(Σ_i b_i)

(what batching the frozen base alone can gain; with --packed, T_base times one packed row, with the mixed base's
attention: the work the mixed step does; before 2026-12-07 padded rows with SDPA). Each job: LoRA r 16, alpha 32, dropout 0.05 on q,k,v,o,gate,up,down,
its own AdamW; b_i = --rows-per-job rows of the shape's sequence length. Step = forward + backward + optimizer(s);
the mixed step takes the jobs' gradients and steps their optimizers as MultiJobTrainer does.
--optim adamw_torch_fused gives every AdamW (the jobs' and the PEFT baseline's) one fused kernel per step, as
`TrainingArguments`' default since torch 2.8 does; rows then carry `optim` (absent: torch's default AdamW, foreach on
CUDA, a per-tensor loop on the CPU). A fused AdamW of a mixed step's job steps one flat tensor, as in the trainer
(`multijob.flat_parameters`); --compare-layouts also times the mixed step with each job's AdamW over its parameters
(`<impl>_per_tensor`, the same rounds) and adds `flat_vs_per_tensor` to the row. --kind mixlora makes every job
BENCH.md's MixLoRA (with its router loss), the baseline each job as a MixLoRA PEFT model; rows carry `kind`;
--kind dynmole likewise with BENCH.md's DynMoLE (routers at initialisation), whose blocks a compiled step runs eagerly.
--compile compiles the mixed model (`MultiJobModel.compile_mixed_steps`, inductor, as MultiJobTrainer does with
torch_compile=True), times it (`mixed_all_jobs_compiled`) in the same rounds as the eager mixed step, and takes the
speedup from it: the `multijob_speedup` row then carries `compile`, the compiled
over the eager step (`compiled_vs_eager`), the first step's compile time and the graphs Dynamo holds after steps of
other mixes (the jobs reversed; one job fewer, so the rows change; the graph count should not grow past 2). The
PEFT baseline stays eager: the jobs one after another are what a user would otherwise run. --packed makes the mixed
steps (eager and compiled) take the rows as one packed row, as TRL's padding_free=True does: one job per token,
position ids restarting per row, SDPA's block-diagonal mask over all the row's tokens; rows carry `packed`.
--attention sdpa_packed gives the mixed model's base that attention (`peft_mole.packed_attention`: a packed row's
sequences attend apart; compiled steps in one opaque operator); rows then carry `attention`.
The mixed models draw each job's dropout from its own random stream, as MultiJobTrainer's do
(`MultiJobModel.set_job_streams`). The baseline is a plain loop over PEFT models, not SFTTrainer (whose per-step
host work is larger): the conservative comparison.
Usage: python bench/multijob_speedup.py [--shape small] [--jobs 2 4 8] [--repeats 10] [--optim adamw_torch_fused]
       [--compile [--compile-mode reduce-overhead] [--compile-backend inductor]] [--compare-layouts]
       [--kind mixlora|dynmole] [--packed [--attention sdpa_packed]]
"""

from __future__ import annotations

import time

import torch
import torch._inductor.config
from common import (
    BATCH,
    OPTIMS,
    base_model,
    device,
    dynmole_config,
    emit,
    lora_config,
    mixlora_config,
    positive_int,
    probability,
    record,
    setup_threads,
    step_parser,
    time_interleaved,
    train_step_fn,
)
from peft import get_peft_model
from torch._dynamo.utils import counters

from peft_mole import PACKED_SDPA, packed_attention
from peft_mole.multijob import MultiJobModel, per_job_losses
from peft_mole.multijob.batching import packed_mixed_batch
from peft_mole.multijob.flat_parameters import job_optimizer


def rows_batch(rows: int, seq: int, vocab: int, seed: int = 0) -> dict[str, torch.Tensor]:
    ids = torch.randint(3, vocab, (rows, seq), generator=torch.Generator().manual_seed(seed)).to(device())
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def base_step_fn(model, batch):
    """The frozen base alone: forward + backward of the activations down to the input embeddings (the path adapters
    need); no weight gradients, as no base weight trains. `batch`: padded rows (with their attention mask) or one
    packed row (`packed`: position ids, the sequences' bounds)."""
    model.train()
    model.requires_grad_(False)
    embed = model.get_input_embeddings()
    inputs = {k: v for k, v in batch.items() if k not in ("input_ids", "labels")}

    def step() -> None:
        hidden = embed(batch["input_ids"]).detach().requires_grad_()
        model(inputs_embeds=hidden, labels=batch["labels"], use_cache=False, **inputs).loss.backward()

    return step


def packed(batch, jobs: list[str], rows_per_job: int) -> tuple[dict, list[str], dict]:
    """The rows of `batch` as one packed row (TRL's padding-free steps: position ids restarting per sequence, one
    job per token), the sequences' first labels -100: (model inputs and labels, names, {job: its tokens})."""
    parts = {job: {"input_ids": batch["input_ids"][i * rows_per_job:(i + 1) * rows_per_job].reshape(1, -1)}
             for i, job in enumerate(jobs)}
    seq = batch["input_ids"].shape[1]
    for part in parts.values():
        part["labels"] = part["input_ids"]
        part["position_ids"] = torch.arange(seq, device=part["input_ids"].device).repeat(rows_per_job)[None]
    mixed = packed_mixed_batch(parts)
    inputs = {k: v for k, v in mixed.model_inputs().items() if k != "adapter_names"}
    return {**inputs, "labels": mixed.labels}, mixed.adapter_names, {job: mixed.index(job) for job in jobs}


def mixed_step_fn(model: MultiJobModel, batch, jobs: list[str], rows_per_job: int, optim: str = "adamw_torch",
                  flat: bool = True, pack: bool = False):
    """One mixed-adapter step as MultiJobTrainer takes it: one base pass for all rows, per-job losses, the jobs'
    gradients by one `autograd.grad`, one AdamW step per job, over flat tensors where the trainer flattens (`flat`;
    `multijob.flat_parameters`: a fused AdamW) or over the parameters themselves. `pack`: the rows as one packed
    row (`packed`), the losses per job's tokens."""
    model.train()
    names = [job for job in jobs for _ in range(rows_per_job)]
    rows = {job: slice(i * rows_per_job, (i + 1) * rows_per_job) for i, job in enumerate(jobs)}
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    if pack:
        inputs, names, rows = packed(batch, jobs, rows_per_job)
    runs = []  # per job: (parameters, optimizer, FlatGroups or None)
    for job in jobs:
        params = list(model.job_parameters(job).values())
        optimizer, layout = job_optimizer(torch.optim.AdamW, {"lr": 1e-4, "fused": optim == "adamw_torch_fused"},
                                          [{"params": params}], device(), flatten=flat)
        runs.append((params, optimizer, layout))
    everything = [p for params, _, _ in runs for p in params]

    def step() -> None:
        labels = inputs["labels"] if pack else batch["labels"]
        out = model(**{k: v for k, v in inputs.items() if k != "labels"}, adapter_names=names, use_cache=False)
        aux = out.get("aux_loss_per_adapter") or {}  # MixLoRA jobs: each job's router loss, as the trainer adds it
        loss = sum(aux.get(job, 0.0) for job in jobs)
        if pack:
            token_losses = torch.nn.functional.cross_entropy(  # the packed row's targets, shifted as in the trainer
                out.logits[0, :-1].float(), labels[0, 1:], ignore_index=-100, reduction="none")
            targets = labels[0, 1:] != -100
            loss = loss + sum(token_losses[span.start:span.stop - 1].sum() / targets[span.start:span.stop - 1].sum()
                              for _, span in rows.values())
        else:
            loss = loss + sum(per_job_losses(out.logits, labels, rows).values())
        grads = torch.autograd.grad(loss, everything)
        for params, optimizer, layout in runs:
            job_grads, grads = grads[:len(params)], grads[len(params):]
            if layout is not None:
                layout.add_gradients(params, job_grads)
            else:
                for param, grad in zip(params, job_grads, strict=True):
                    param.grad = grad
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    return step


def main() -> None:
    parser = step_parser()
    parser.add_argument("--jobs", type=positive_int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--rows-per-job", type=positive_int, default=1)
    parser.add_argument("--dropout", type=probability, default=0.05,
                        help="LoRA dropout of every job (peft-mole's LoRA-job layers draw cheaper CPU masks than "
                             "PEFT's, see peft_mole/ops/dropout.py; 0 compares the products alone)")
    parser.add_argument("--optim", choices=OPTIMS, default="adamw_torch")
    parser.add_argument("--kind", choices=["lora", "mixlora", "dynmole"], default="lora",
                        help="the jobs' adapter: BENCH.md's LoRA, its MixLoRA (8 experts, top-2) or its DynMoLE (the "
                             "baseline then trains each job as such a PEFT model)")
    parser.add_argument("--compile", action="store_true", help="compiled mixed steps (see the module docstring)")
    parser.add_argument("--packed", action="store_true",
                        help="the mixed steps take the rows as one packed row (TRL's padding_free=True)")
    parser.add_argument("--attention", choices=["sdpa", PACKED_SDPA], default="sdpa",
                        help="the mixed model's attention implementation (sdpa_packed: packed sequences apart)")
    parser.add_argument("--compare-layouts", action="store_true",
                        help="also time the mixed step with the jobs' optimizers over their parameters rather than "
                             "flat tensors (`<impl>_per_tensor`; the row gets flat_vs_per_tensor)")
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile backend for --compile")
    parser.add_argument("--compile-mode", default=None,
                        help="torch.compile mode for --compile (e.g. reduce-overhead: CUDA graphs on a GPU)")
    args = parser.parse_args()
    setup_threads()
    torch._inductor.config.force_disable_caches = True  # compile time from scratch, not from an earlier run's cache
    seq = BATCH[args.shape][1]
    b = args.rows_per_job
    for n in args.jobs:
        jobs = [f"job{i}" for i in range(n)]
        # S(N) of the work the mixed step does: with --packed one packed row, with the mixed base's attention (until
        # 2026-12-07 padded rows with SDPA; rows carry `limit_packed` since)
        base = mixed_base(args) if args.packed else base_model(args.shape)
        vocab = base.config.vocab_size
        mixed = MultiJobModel(mixed_base(args), {job: job_config(args) for job in jobs})
        mixed.set_job_streams({job: i for i, job in enumerate(jobs)})  # as MultiJobTrainer
        lora = get_peft_model(base_model(args.shape), job_config(args))
        one, everyone = rows_batch(b, seq, vocab), rows_batch(n * b, seq, vocab)
        steps = {
            "peft_lora_one_job": train_step_fn(lora, one, optim=args.optim),
            "mixed_all_jobs": mixed_step_fn(mixed, everyone, jobs, b, args.optim, pack=args.packed),
            "base_one_job": base_step_fn(base, packed(one, jobs[:1], b)[0] if args.packed else one),
            "base_all_jobs": base_step_fn(base, packed(everyone, jobs, b)[0] if args.packed else everyone),
        }
        if args.compare_layouts:
            steps["mixed_all_jobs_per_tensor"] = mixed_step_fn(mixed, everyone, jobs, b, args.optim, flat=False,
                                                               pack=args.packed)
        compiled = compile_mixed(args, n, jobs, everyone, vocab) if args.compile else {}
        if compiled:
            steps["mixed_all_jobs_compiled"] = compiled.pop("step")
            per_tensor = compiled.pop("per_tensor_step")
            if per_tensor is not None:
                steps["mixed_all_jobs_compiled_per_tensor"] = per_tensor
        times = time_interleaved(steps, repeats=args.repeats)
        rows = {impl: record("multijob_step", args.shape, impl, t, (n if "all" in impl else 1) * b * seq, jobs=n)
                for impl, t in times.items()}
        sequential = {k: n * rows["peft_lora_one_job"][k] for k in ("median_s", "min_s")}
        limit = {k: n * rows["base_one_job"][k] / rows["base_all_jobs"][k] for k in ("median_s", "min_s")}
        mixed_impl = "mixed_all_jobs_compiled" if compiled else "mixed_all_jobs"
        mixed = rows[mixed_impl]
        speedup = {k: sequential[k] / mixed[k] for k in ("median_s", "min_s")}
        if compiled:  # the first step's time less a compiled step's (it ran the step too), as the other benches
            compiled["compile_s"] = compiled["first_step_s"] - mixed["median_s"]
        emit({
            "name": "multijob_speedup", "shape": args.shape, "jobs": n, "rows_per_job": b, "dropout": args.dropout,
            **({"kind": args.kind} if args.kind != "lora" else {}),
            **({"packed": True, "limit_packed": True} if args.packed else {}),
            **({"attention": args.attention, "chunk_tokens": packed_attention.CHUNK_TOKENS}
               if args.attention != "sdpa" else {}),
            "ratio_median": speedup["median_s"], "ratio_min": speedup["min_s"],
            "limit_median": limit["median_s"], "limit_min": limit["min_s"],
            "fraction_of_limit": speedup["median_s"] / limit["median_s"],
            **({"optim": args.optim} if args.optim != "adamw_torch" else {}),
            **compiled,
            **({"compiled_vs_eager": mixed["median_s"] / rows["mixed_all_jobs"]["median_s"]} if compiled else {}),
            **({"flat_vs_per_tensor": mixed["median_s"] / rows[mixed_impl + "_per_tensor"]["median_s"]}
               if args.compare_layouts else {}),
        })


def mixed_base(args):
    """The shape's random Llama for the mixed model, with `--attention`."""
    base = base_model(args.shape)
    base.set_attn_implementation(args.attention)
    return base


def job_config(args):
    if args.kind == "dynmole":
        return dynmole_config(args.dropout)
    return mixlora_config(args.dropout) if args.kind == "mixlora" else lora_config(args.dropout)


def compile_mixed(args, n: int, jobs: list[str], batch, vocab: int) -> dict:
    """A compiled mixed step of the n jobs (`compile_mixed_steps`): {step, compile, first_step_s, graphs}, the
    graphs counted after one step of each of two other mixes."""
    torch._dynamo.reset()
    counters.clear()
    model = MultiJobModel(mixed_base(args), {job: job_config(args) for job in jobs})
    model.set_job_streams({job: i for i, job in enumerate(jobs)})
    model.compile_mixed_steps(backend=args.compile_backend, mode=args.compile_mode)
    step = mixed_step_fn(model, batch, jobs, args.rows_per_job, args.optim, pack=args.packed)
    start = time.perf_counter()
    step()
    first_step_s = time.perf_counter() - start
    for mix in (jobs[::-1], jobs[1:]):  # other jobs in each row; then fewer rows
        rows = len(mix) * args.rows_per_job
        mixed_step_fn(model, rows_batch(rows, BATCH[args.shape][1], vocab, seed=rows), mix, args.rows_per_job,
                      args.optim, pack=args.packed)()
    per_tensor = None
    if args.compare_layouts:
        per_tensor = mixed_step_fn(model, batch, jobs, args.rows_per_job, args.optim, flat=False, pack=args.packed)
        per_tensor()  # the same graph: the layout of the optimizers' tensors is outside it
    mode = f" {args.compile_mode}" if args.compile_mode else ""
    return {"step": step, "per_tensor_step": per_tensor, "compile": args.compile_backend + mode,
            "first_step_s": first_step_s,
            "graphs": counters["stats"]["unique_graphs"]}


if __name__ == "__main__":
    main()

"""Train a MixLoRA (or, with --method dynmole, a DynMoLE) adapter with TRL's SFTTrainer, save it, reload it,
and compare task accuracy; print the routers' statistics per layer.

Offline by default (this is `make demo`): a random-init tiny Llama, a byte-level tokenizer trained here, and a
generated multi-task instruction set (sentiment, opposites, capitals, addition), all written under
--output-dir and loaded back with the usual `from_pretrained` / `load_dataset` calls.
On a real model: `python examples/sft_mixlora.py --model Qwen/Qwen2.5-0.5B --dataset my_data.jsonl`
(rows with "prompt" and "completion"); add `--eval-dataset my_eval.jsonl` (rows that also carry "task" and
"choices") for accuracy and router statistics before and after training.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from datasets import load_dataset
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig, SFTTrainer

import peft_mole
from peft_mole import synthetic
from peft_mole.diagnostics import RouterStatsCallback, layer_stats
from peft_mole.evaluation import choice_accuracy


def parse_args(method: str | None = None, description: str = __doc__) -> argparse.Namespace:
    """The options; with `method` fixed (sft_dynmole.py) there is no --method, and DynMoLE has no --top-k (its
    router picks a number of experts per token)."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    if method is None:
        parser.add_argument("--method", choices=["mixlora", "dynmole"], default="mixlora")
    parser.add_argument("--model", help="hub id or local path of a causal LM (default: build a tiny random Llama)")
    parser.add_argument("--dataset", help="hub dataset name (its train split) or a local .jsonl, .json, .csv or "
                                          ".parquet file (default: generate synthetic tasks)")
    parser.add_argument("--eval-dataset", help="rows with prompt, completion, task and choices to score (default: "
                                               "the generated tasks' eval rows, when --dataset is not given)")
    parser.add_argument("--eval-split", default="test", help="the split of a Hub --eval-dataset (default: test)")
    parser.add_argument("--output-dir", default=None, help="default: build/demo-<method>")
    parser.add_argument("--max-steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--learning-rate", type=float, default=3e-3)
    parser.add_argument("--num-experts", type=int, default=8)
    if method != "dynmole":
        parser.add_argument("--top-k", type=int, default=None, help="MixLoRA's experts per token (default 2)")
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--eval-rows", type=int, default=120)
    args = parser.parse_args()
    if method is not None:
        args.method = method
    if args.method == "dynmole" and getattr(args, "top_k", None) is not None:
        parser.error("--top-k is MixLoRA's: DynMoLE's router picks a number of experts per token")
    if args.method == "mixlora" and args.top_k is None:
        args.top_k = 2
    return args


def prepare_offline_assets(out: Path) -> tuple[str, str, str]:
    """Write a tokenizer, a random base model and train/eval JSONL files; return their paths."""
    tokenizer = synthetic.demo_tokenizer(save_dir=out / "tokenizer")
    base = synthetic.random_model(
        "llama", "tiny", seed=0, vocab_size=len(tokenizer), hidden_size=128, intermediate_size=344
    )
    base.save_pretrained(out / "base")
    tokenizer.save_pretrained(out / "base")
    synthetic.write_jsonl(synthetic.multitask_rows(2000, seed=0), out / "data" / "train.jsonl")
    synthetic.write_jsonl(synthetic.multitask_rows(400, seed=1), out / "data" / "eval.jsonl")
    return str(out / "base"), str(out / "data" / "train.jsonl"), str(out / "data" / "eval.jsonl")


LOCAL_FORMATS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


def load_rows(name: str, split: str):
    """A local data file (its one split) or a Hub dataset's `split`."""
    builder = LOCAL_FORMATS.get(Path(name).suffix.lower())
    if builder is not None:
        return load_dataset(builder, data_files=name, split="train")
    return load_dataset(name, split=split)


def adapter_config(args: argparse.Namespace):
    common = dict(num_experts=args.num_experts, r=args.r, lora_alpha=2 * args.r, lora_dropout=0.0)
    if args.method == "dynmole":
        return peft_mole.DynMoLEConfig(**common)
    return peft_mole.MixLoRAConfig(top_k=args.top_k, **common)


def main(method: str | None = None, description: str = __doc__) -> None:
    args = parse_args(method, description)
    torch.manual_seed(0)
    out = Path(args.output_dir or f"build/demo-{args.method}")
    eval_path = None
    if args.model is None or args.dataset is None:
        model_path, train_path, eval_path = prepare_offline_assets(out)
    model_path = args.model or model_path
    train_path = args.dataset or train_path
    eval_path = args.eval_dataset or (eval_path if args.dataset is None else None)  # (not another set's rows)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    train = load_rows(train_path, "train").select_columns(["prompt", "completion"])
    eval_rows = list(load_rows(eval_path, args.eval_split))[: args.eval_rows] if eval_path else []
    # the generated tasks are small closed sets: nearly every eval prompt is also a training prompt
    seen = " (generated eval rows: prompts also trained on, a fit check)" if eval_path and not args.eval_dataset else ""

    config = adapter_config(args)
    trainer = SFTTrainer(
        model=AutoModelForCausalLM.from_pretrained(model_path),
        args=SFTConfig(
            output_dir=str(out / "run"), max_steps=args.max_steps, per_device_train_batch_size=args.batch_size,
            learning_rate=args.learning_rate, logging_steps=max(1, args.max_steps // 10), report_to=[],
            save_strategy="no", max_length=128, seed=0, disable_tqdm=True,
            use_cpu=not torch.cuda.is_available(), bf16=torch.cuda.is_available() and torch.cuda.is_bf16_supported(),
        ),
        train_dataset=train, processing_class=tokenizer, peft_config=config,
    )
    RouterStatsCallback.attach(trainer)  # router metrics in the logs, router_stats.png in the run folder
    trainer.model.print_trainable_parameters()
    if eval_rows:
        print(f"accuracy before{seen}:", _fmt(choice_accuracy(trainer.model, tokenizer, eval_rows)))
        print_router_stats(trainer.model, tokenizer, eval_rows, "at init")

    start = time.perf_counter()
    trainer.train()
    losses = [(h["step"], h["loss"]) for h in trainer.state.log_history if "loss" in h]
    print(f"trained {args.max_steps} steps in {time.perf_counter() - start:.0f}s; loss by step:")
    print("  " + "  ".join(f"{step}:{loss:.3f}" for step, loss in losses))

    adapter_dir = out / "adapter"
    trainer.model.save_pretrained(adapter_dir)
    device = trainer.model.get_input_embeddings().weight.device  # (SFTTrainer moved it to the GPU, if any)
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_path), adapter_dir)
    reloaded = reloaded.to(device).eval()
    probe = tokenizer(["Capital of Peru?\nAnswer: Lima"], return_tensors="pt").to(device)
    trainer.model.eval()
    with torch.no_grad():
        same = torch.equal(trainer.model(**probe).logits, reloaded(**probe).logits)
    print(f"saved to {adapter_dir}; reloaded from disk: logits identical = {same}")

    if eval_rows:
        print(f"accuracy after (reloaded adapter){seen}:", _fmt(choice_accuracy(reloaded, tokenizer, eval_rows)))
        print_router_stats(reloaded, tokenizer, eval_rows, "after training")
    print(f"router plot: {out / 'run' / 'router_stats.png'}")

def print_router_stats(model, tokenizer, rows: list[dict], when: str) -> None:
    enc = tokenizer([r["prompt"] + r["completion"] for r in rows[:64]], return_tensors="pt", padding=True)
    print(f"router statistics {when} (entropy: normalised, 1 = uniform; load: share of selections per expert)")
    for layer, s in layer_stats(model, enc["input_ids"], enc["attention_mask"]).items():
        print(f"  {layer:<20} entropy {s.entropy:.2f}  broadcast {s.broadcast:.2f}  "
              f"experts/token {s.experts_per_token:.2f}  load " + " ".join(f"{x:.2f}" for x in s.load))


def _fmt(acc: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.2f}" for k, v in acc.items())


if __name__ == "__main__":
    main()

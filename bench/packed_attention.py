"""`packed_attention`: a training step on one packed row (TRL's `padding_free=True`) with
`attn_implementation="sdpa_packed"` (each sequence's attention apart, in chunks: `peft_mole.packed_attention`) /
the same step with `"sdpa"` (SDPA over the whole row under its block-diagonal mask). Each row also gives the same
sequences as padded rows (`"sdpa"` with the padding mask) against the packed step, in real tokens per second.

Cases (the row holds about the shape's batch × length tokens):
- `equal`: sequences of the shape's length (small: 4 × 256, the packed row of `multijob_speedup --packed`);
- `long_tailed`: log-normal lengths (median a quarter of the shape's length, σ 0.8, at most its length), drawn with
  seed 0 until the row holds the tokens.
Model: the shape's random Llama with PEFT LoRA (BENCH.md's r 16 on q,k,v,o,gate,up,down), dropout 0.05; a step is
forward + backward + AdamW, interleaved over the three layouts.
On the CPU, also timed in the same rounds: the `sdpa_packed` step with its chunks under autograd
(`packed_sdpa_packed_autograd`, as eager steps run them off the CPU) where they run in the operator that keeps
SDPA's softmax statistics for its backward (`peft_mole.packed_attention_op`); the row's `operator_vs_autograd` is
the step's ratio.
--compile also times the `sdpa_packed` step compiled (`torch.compile`, inductor; `--compile-backend`), where the
operator runs inside the graph, against the eager step; on the CPU with the statistics kept and, as a stand-in for
the devices that recompute, with its backward running the chunks again (`compiled_kept_vs_recompute`). The compiled
step leaves out the collator's `max_length_q`/`max_length_k` (flash attention's; Dynamo would compile again for
another int), so one graph serves every case (`dynamic=True`); `compile_s` is the first case's first step.
`--cases long_row` (not a default): one packed row of 32 sequences of the shape's length (small: 8192 tokens), the
`sdpa_packed` step with no (T × T) mask (its mask function, `packed_sdpa_mask`) / with transformers' row mask
(`packed_row_mask` rows).
--chunk-tokens C1 C2 ... also times `sdpa_packed` with other chunk sizes than its default (`CHUNK_TOKENS`, measured
on the CPU) in the same rounds; the row's `chunk_ratios` gives each one's step over the masked row's (for a GPU,
where each chunk is a kernel launch).
Usage: python bench/packed_attention.py [--shape small] [--cases equal long_tailed long_row] [--repeats 10]
       [--chunk-tokens 128 512 2048] [--compile]
"""

from __future__ import annotations

import contextlib
import random
import statistics
import time
from unittest import mock

import torch
from common import (
    BATCH,
    base_model,
    device,
    emit,
    lora_config,
    positive_int,
    record,
    setup_threads,
    step_parser,
    time_interleaved,
    train_step_fn,
)
from peft import get_peft_model
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from peft_mole import PACKED_SDPA, packed_attention, packed_attention_op
from peft_mole.packed_attention_op import keeps_statistics

CASES = ("equal", "long_tailed")
LONG_ROW_SEQUENCES = 32  # `--cases long_row`: one packed row of 32 sequences of the shape's length (small: 8192 tokens)


def case_lengths(case: str, shape: str) -> list[int]:
    rows, length = BATCH[shape]
    if case == "equal":
        return [length] * rows
    rng, lengths = random.Random(0), []
    while sum(lengths) < rows * length:
        lengths.append(min(max(int(rng.lognormvariate(0.0, 0.8) * length / 4), 2), length))
    return lengths


def batches(lengths: list[int], vocab: int) -> tuple[dict, dict]:
    """The sequences as one packed row (TRL's padding-free collator) and as rows padded to the longest."""
    gen = torch.Generator().manual_seed(0)
    sequences = [torch.randint(3, vocab, (n,), generator=gen) for n in lengths]
    packed = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)(
        [{"input_ids": s.tolist()} for s in sequences])
    ids = torch.zeros(len(sequences), max(lengths), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(sequences):
        ids[i, : len(s)], mask[i, : len(s)] = s, 1
    padded = {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}
    on_device = device()
    return ({k: v.to(on_device) if torch.is_tensor(v) else v for k, v in packed.items()},
            {k: v.to(on_device) for k, v in padded.items()})


def model_with(shape: str, attention: str):
    base = base_model(shape)
    base.set_attn_implementation(attention)
    return get_peft_model(base, lora_config())


def step_within(context, step):
    """`step` run inside a fresh `context()` each time: a setting changed for it alone, restored after."""
    def wrapped() -> None:
        with context():
            step()

    return wrapped


def with_chunks(chunk_tokens: int, step):
    """`step` with `sdpa_packed`'s chunks of at most `chunk_tokens` tokens."""
    return step_within(lambda: mock.patch.object(packed_attention, "CHUNK_TOKENS", chunk_tokens), step)


def without_statistics(step):
    """`step` with `sdpa_packed`'s operator keeping no statistics, as off the CPU: an eager step runs the chunks under
    autograd, a compiled step's operator runs them again in its backward."""
    return step_within(lambda: mock.patch.object(packed_attention_op, "keeps_statistics", lambda device: False), step)


@contextlib.contextmanager
def row_mask():
    """transformers' (T × T) mask built for `sdpa_packed`'s packed rows (`sdpa_mask`, as before its own mask function
    `packed_sdpa_mask`), the chunks taking their blocks from it."""
    ALL_MASK_ATTENTION_FUNCTIONS.register(PACKED_SDPA, sdpa_mask)
    try:
        yield
    finally:
        ALL_MASK_ATTENTION_FUNCTIONS.register(PACKED_SDPA, packed_attention.packed_sdpa_mask)


def long_row(args, model) -> None:
    """`--cases long_row`: the `sdpa_packed` step on one packed row of `LONG_ROW_SEQUENCES` sequences without the
    row's (T × T) mask (its mask function) / with it; the masked row and padded rows are not timed (T² attention)."""
    length = BATCH[args.shape][1]
    lengths = [length] * LONG_ROW_SEQUENCES
    packed, _ = batches(lengths, model.config.vocab_size)
    step = train_step_fn(model, packed)
    times = time_interleaved({"packed_sdpa_packed": step, "packed_sdpa_packed_row_mask": step_within(row_mask, step)},
                             repeats=args.repeats)
    tokens = sum(lengths)
    for impl, seconds in times.items():
        record("packed_attention_step", args.shape, impl, seconds, tokens, case="long_row")
    median = {impl: statistics.median(seconds) for impl, seconds in times.items()}
    emit({"name": "packed_row_mask", "shape": args.shape, "case": "long_row", "device": str(device()),
          "torch": torch.__version__, "sequences": len(lengths), "tokens": tokens, "row_mask_mb": tokens ** 2 / 2**20,
          "ratio_median": median["packed_sdpa_packed"] / median["packed_sdpa_packed_row_mask"],
          "ratio_min": min(times["packed_sdpa_packed"]) / min(times["packed_sdpa_packed_row_mask"]),
          "lean_ms": median["packed_sdpa_packed"] * 1e3, "row_mask_ms": median["packed_sdpa_packed_row_mask"] * 1e3})


def main() -> None:
    parser = step_parser()
    parser.add_argument("--cases", nargs="+", choices=[*CASES, "long_row"], default=list(CASES))
    parser.add_argument("--chunk-tokens", nargs="+", type=positive_int, default=[],
                        help="other chunk sizes of sdpa_packed to time (its default is always timed)")
    parser.add_argument("--compile", action="store_true", help="also time the sdpa_packed step compiled")
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile backend for --compile")
    args = parser.parse_args()
    setup_threads()
    models = {"sdpa": model_with(args.shape, "sdpa"), PACKED_SDPA: model_with(args.shape, PACKED_SDPA),
              "padded": model_with(args.shape, "sdpa")}
    compiled_model, compiled = None, {}
    if args.compile:  # one graph for every case (`dynamic=True`: the row's tokens vary); compiled by the first step
        torch._dynamo.reset()
        compiled_model = torch.compile(models[PACKED_SDPA], backend=args.compile_backend, dynamic=True)
    if "long_row" in args.cases:
        long_row(args, models[PACKED_SDPA])
    for case in (case for case in args.cases if case != "long_row"):
        lengths = case_lengths(case, args.shape)
        packed, padded = batches(lengths, models["sdpa"].config.vocab_size)
        steps = {"packed_sdpa_mask": train_step_fn(models["sdpa"], packed),
                 "packed_sdpa_packed": train_step_fn(models[PACKED_SDPA], packed),
                 "padded_rows": train_step_fn(models["padded"], padded)}
        kept = keeps_statistics(device())  # (elsewhere the eager chunks run under autograd, and nothing is kept)
        if kept:
            steps["packed_sdpa_packed_autograd"] = without_statistics(steps["packed_sdpa_packed"])
        for chunk in args.chunk_tokens:
            steps[f"packed_sdpa_packed_c{chunk}"] = with_chunks(chunk, steps["packed_sdpa_packed"])
        if compiled_model is not None:
            flash_ints = {k: v for k, v in packed.items() if not k.startswith("max_length")}
            steps["packed_sdpa_packed_compiled"] = train_step_fn(compiled_model, flash_ints)
            if not compiled:
                start = time.perf_counter()
                steps["packed_sdpa_packed_compiled"]()
                compiled["compile_s"] = time.perf_counter() - start
            if kept:
                steps["packed_sdpa_packed_compiled_recompute"] = without_statistics(
                    steps["packed_sdpa_packed_compiled"])
        times = time_interleaved(steps, repeats=args.repeats)
        tokens = sum(lengths)
        for impl, seconds in times.items():
            record("packed_attention_step", args.shape, impl, seconds, tokens, case=case)
        median = {impl: statistics.median(seconds) for impl, seconds in times.items()}
        emit({"name": "packed_attention", "shape": args.shape, "case": case, "device": str(device()),
              "torch": torch.__version__, "sequences": len(lengths), "tokens": tokens,
              "padded_tokens": len(lengths) * max(lengths), "longest": max(lengths),
              "ratio_median": median["packed_sdpa_packed"] / median["packed_sdpa_mask"],
              "ratio_min": min(times["packed_sdpa_packed"]) / min(times["packed_sdpa_mask"]),
              "packed_ms": median["packed_sdpa_packed"] * 1e3, "masked_ms": median["packed_sdpa_mask"] * 1e3,
              "padded_ms": median["padded_rows"] * 1e3,
              "padded_vs_packed": median["padded_rows"] / median["packed_sdpa_packed"],
              **({"operator_vs_autograd": median["packed_sdpa_packed"] / median["packed_sdpa_packed_autograd"]}
                 if kept else {}),
              "chunk_tokens": packed_attention.CHUNK_TOKENS,
              **({"compile": args.compile_backend, **compiled,
                  "compiled_vs_eager": median["packed_sdpa_packed_compiled"] / median["packed_sdpa_packed"]}
                 if args.compile else {}),
              **({"compiled_kept_vs_recompute": median["packed_sdpa_packed_compiled"]
                  / median["packed_sdpa_packed_compiled_recompute"]} if args.compile and kept else {}),
              **({"chunk_ratios": {chunk: median[f"packed_sdpa_packed_c{chunk}"] / median["packed_sdpa_mask"]
                                   for chunk in args.chunk_tokens}} if args.chunk_tokens else {})})


if __name__ == "__main__":
    main()

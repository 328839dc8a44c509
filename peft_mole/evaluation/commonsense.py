"""The commonsense-reasoning protocol of the MixLoRA and DynMoLE papers (SPEC.md §5).

Eight tasks: ARC-e, ARC-c, BoolQ, OBQA, PIQA, SIQA, HellaSwag, WinoGrande. Each example becomes a multiple-choice
prompt with lettered options ending in "Answer:"; the prediction is the option whose label token (" A", " B",
...) has the highest next-token logit — only the label tokens are scored. Accuracy per task and their average.

Data loads with `datasets.load_dataset` from the usual hub names, or from `<data_dir>/<task>.jsonl` files in the
same schema (used offline and in the tests). Several adapters are evaluated in one pass over the data: each
batch is repeated once per adapter with `adapter_names`, so the frozen base runs once per (row, adapter) batch.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from peft.helpers import DoraCaching

logger = logging.getLogger(__name__)


@dataclass
class Example:
    prompt: str
    num_options: int
    answer: int  # index of the correct option


def format_prompt(question: str, options: list[str]) -> str:
    """'<question>\\nA. <option>\\nB. <option>\\n...\\nAnswer:' (lettered options, as in the papers)."""
    lines = [question.strip()] + [f"{chr(65 + i)}. {option.strip()}" for i, option in enumerate(options)]
    return "\n".join(lines) + "\nAnswer:"


def _letter_choices(row: dict, question_key: str) -> Example:  # ARC, OBQA
    labels, texts = row["choices"]["label"], row["choices"]["text"]
    key = row["answerKey"].strip()  # ARC uses letters or digits "1".."4"; strip stray spaces (as lm-eval does)
    answer = labels.index(key) if key in labels else "ABCDE".index(key) if key.isalpha() else int(key) - 1
    return Example(format_prompt(row[question_key], texts), len(texts), answer)


def _boolq(row: dict) -> Example:
    question = f"{row['passage']}\nQuestion: {row['question']}?"
    return Example(format_prompt(question, ["yes", "no"]), 2, 0 if row["answer"] else 1)


def _piqa(row: dict) -> Example:
    return Example(format_prompt(f"Goal: {row['goal']}", [row["sol1"], row["sol2"]]), 2, int(row["label"]))


def _siqa(row: dict) -> Example:
    options = [row["answerA"], row["answerB"], row["answerC"]]
    return Example(format_prompt(f"{row['context']}\nQuestion: {row['question']}", options), 3, int(row["label"]) - 1)


def _hellaswag(row: dict) -> Example:
    question = f"Complete the sentence: {row['ctx']}"
    return Example(format_prompt(question, list(row["endings"])), len(row["endings"]), int(row["label"]))


def _winogrande(row: dict) -> Example:
    question = f"Fill in the blank: {row['sentence']}"
    return Example(format_prompt(question, [row["option1"], row["option2"]]), 2, int(row["answer"]) - 1)


@dataclass
class Task:
    hub_name: str
    hub_config: str | None
    split: str  # a split with labels (PIQA/SIQA/HellaSwag/WinoGrande test splits have none)
    build: Callable[[dict], Example]
    revision: str | None = None  # "refs/convert/parquet" where the main branch still holds a loading script


# The splits are those of the MixLoRA/MoE-PEFT evaluation. `ybisk/piqa` and `allenai/social_i_qa` still keep a
# loading script on main, which datasets >= 4 refuses to run; the Hub's parquet conversion branch has the same rows.


TASKS: dict[str, Task] = {
    "arc_e": Task("allenai/ai2_arc", "ARC-Easy", "test", lambda r: _letter_choices(r, "question")),
    "arc_c": Task("allenai/ai2_arc", "ARC-Challenge", "test", lambda r: _letter_choices(r, "question")),
    "boolq": Task("google/boolq", None, "validation", _boolq),
    "obqa": Task("allenai/openbookqa", "main", "test", lambda r: _letter_choices(r, "question_stem")),
    "piqa": Task("ybisk/piqa", None, "validation", _piqa, revision="refs/convert/parquet"),
    "siqa": Task("allenai/social_i_qa", None, "validation", _siqa, revision="refs/convert/parquet"),
    "hellaswag": Task("Rowan/hellaswag", None, "validation", _hellaswag),
    "winogrande": Task("allenai/winogrande", "winogrande_debiased", "validation", _winogrande),
}


def load_task(name: str, data_dir: str | Path | None = None, limit: int | None = None) -> list[Example]:
    """Examples of task `name` from `<data_dir>/<name>.jsonl` if given, else from the Hub."""
    from datasets import load_dataset

    if name not in TASKS:
        raise ValueError(f"task must be one of {sorted(TASKS)}, got {name!r}")
    task = TASKS[name]
    if data_dir is not None:
        path = Path(data_dir) / f"{name}.jsonl"
        if not path.exists():
            raise FileNotFoundError(f"{path} not found: write the task's rows there in its Hub schema")
        rows = load_dataset("json", data_files=str(path), split="train")
    else:
        rows = load_dataset(task.hub_name, task.hub_config, split=task.split, revision=task.revision)
    if limit is not None:
        rows = rows.select(range(min(limit, len(rows))))
    return [task.build(row) for row in rows]


def label_token_ids(tokenizer, num_options: int) -> list[int]:
    """Token id of " A", " B", ... (the first token of each label)."""
    ids = [tokenizer(f" {chr(65 + i)}", add_special_tokens=False)["input_ids"] for i in range(num_options)]
    if any(not t for t in ids) or len({t[0] for t in ids}) != num_options:
        raise ValueError("the tokenizer does not give distinct first tokens for the option labels ' A', ' B', ...")
    return [t[0] for t in ids]


@torch.no_grad()
def label_logits(model, tokenizer, examples: list[Example], adapters: list[str] | None = None) -> torch.Tensor:
    """Next-token logits of the option labels after each prompt: (adapters or 1, examples, max options) fp32,
    -inf where an example has fewer options. One left-padded forward for all (adapter, example) rows."""
    names = adapters or [None]
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    encoded = [tokenizer(e.prompt, add_special_tokens=True)["input_ids"] for e in examples]
    length = max(len(ids) for ids in encoded)
    ids = torch.full((len(examples), length), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(encoded):  # left padding: the last position is every prompt's last token
        ids[i, length - len(row) :] = torch.tensor(row)
        mask[i, length - len(row) :] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # positions count real tokens only
    reps = len(names)
    kwargs = {"adapter_names": [n for n in names for _ in examples]} if adapters else {}
    logits = model(
        input_ids=ids.repeat(reps, 1).to(device), attention_mask=mask.repeat(reps, 1).to(device),
        position_ids=positions.repeat(reps, 1).to(device), **kwargs,
    ).logits[:, -1].float().view(reps, len(examples), -1)
    width = max(e.num_options for e in examples)
    out = torch.full((reps, len(examples), width), float("-inf"))
    for i, example in enumerate(examples):
        out[:, i, : example.num_options] = logits[:, i, label_token_ids(tokenizer, example.num_options)].cpu()
    return out


@functools.cache
def accuracy_metric() -> Callable[[list[int], list[int]], float]:
    """`evaluate.load("accuracy")` as a function of (predictions, references), or, where that Hub module cannot
    be loaded (offline), the same mean of exact matches."""
    import evaluate

    try:
        metric = evaluate.load("accuracy")
    except (OSError, ValueError, ConnectionError) as error:  # FileNotFoundError offline
        logger.info("evaluate's accuracy metric is not available (%s); computing the same mean here", error)
        return lambda predictions, references: sum(
            p == r for p, r in zip(predictions, references, strict=True)) / max(1, len(references))
    return lambda predictions, references: (
        float(metric.compute(predictions=predictions, references=references)["accuracy"]) if references else 0.0)


@torch.no_grad()
def evaluate_commonsense(
    model,
    tokenizer,
    tasks: dict[str, list[Example]],
    adapters: list[str] | None = None,
    batch_size: int = 8,
) -> dict[str, dict[str, float]]:
    """Accuracy {adapter: {task: acc, ..., "average": mean over tasks}} in one pass over the data.

    `adapters` None evaluates the model as it is (key "model"); otherwise each batch runs once with every
    adapter's copy of its rows (`adapter_names`), which the peft-mole layers serve in one frozen-base pass.
    Accuracy comes from `evaluate`'s "accuracy" metric when it can be loaded (it is a Hub module); offline, the
    same mean of correct predictions is computed here (`accuracy_metric`). Nothing trains meanwhile, so DoRA
    experts (and PEFT's DoRA) keep their weight norms from batch to batch (`peft.helpers.DoraCaching`).
    """
    was_training = model.training
    model.eval()
    names = adapters or ["model"]
    results: dict[str, dict[str, float]] = {name: {} for name in names}
    accuracy = accuracy_metric()
    with DoraCaching():
        for task_name, examples in tasks.items():
            predictions = [label_logits(model, tokenizer, examples[start : start + batch_size], adapters).argmax(-1)
                           for start in range(0, len(examples), batch_size)]  # each (adapters, chunk)
            answers = [e.answer for e in examples]
            for a, name in enumerate(names):
                predicted = torch.cat([p[a] for p in predictions]).tolist() if predictions else []
                results[name][task_name] = accuracy(predicted, answers)
    for name in names:
        scores = list(results[name].values())
        results[name]["average"] = sum(scores) / max(1, len(scores))
    model.train(was_training)
    return results

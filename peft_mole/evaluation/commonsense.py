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
import glob
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from peft.helpers import DoraCaching

from peft_mole.quantised_eval import eval_keeping_4bit_training

logger = logging.getLogger(__name__)


@dataclass
class Example:
    """One multiple-choice question: `answer` must index one of the `num_options` options (a ValueError otherwise)."""

    prompt: str
    num_options: int
    answer: int  # index of the correct option

    def __post_init__(self) -> None:
        if self.num_options < 1:
            raise ValueError(f"num_options must be >= 1, got {self.num_options}")
        if not 0 <= self.answer < self.num_options:
            raise ValueError(f"answer must be an option index in [0, {self.num_options - 1}], got {self.answer}")


ANSWER_CUE = "\nAnswer:"  # every prompt ends with it; the option label (" A", " B", ...) is the next token


def format_prompt(question: str, options: list[str]) -> str:
    """'<question>\\nA. <option>\\nB. <option>\\n...\\nAnswer:' (lettered options, as in the papers)."""
    lines = [question.strip()] + [f"{chr(65 + i)}. {option.strip()}" for i, option in enumerate(options)]
    return "\n".join(lines) + ANSWER_CUE


def _label_index(field: str, value, labels: list[str]) -> int:
    """Index of `value` in `labels`, compared as stripped text (1 and "1" are the same label); a ValueError naming
    the field, the value and the allowed labels otherwise."""
    key = str(value).strip()
    if key not in labels:
        raise ValueError(f"{field} {value!r} is not one of the allowed labels {labels}")
    return labels.index(key)


def _letter_choices(row: dict, question_key: str) -> Example:  # ARC, OBQA
    """The answer key is one of the choice labels, or, where it is not (old OBQA rows label choices by their text),
    a letter A.. or a number 1.. within the number of choices (ARC mixes letters and digits; stray spaces are
    stripped, as lm-eval does)."""
    labels, texts = [str(label).strip() for label in row["choices"]["label"]], row["choices"]["text"]
    key = str(row["answerKey"]).strip()
    letters, numbers = [chr(65 + i) for i in range(len(texts))], [str(i + 1) for i in range(len(texts))]
    if key in labels:
        answer = labels.index(key)
    elif key in letters or key in numbers:
        answer = letters.index(key) if key in letters else numbers.index(key)
    else:
        raise ValueError(f"answerKey {row['answerKey']!r} is none of the choice labels {labels}, "
                         f"letters {letters} or numbers {numbers}")
    return Example(format_prompt(row[question_key], texts), len(texts), answer)


def _boolq(row: dict) -> Example:
    """`answer` is a bool, or the text "true"/"false" (any case); anything else is refused, not taken as truthy."""
    answer = row["answer"]
    if isinstance(answer, str) and answer.strip().lower() in ("true", "false"):
        answer = answer.strip().lower() == "true"
    if not isinstance(answer, bool):
        raise ValueError(f"answer {row['answer']!r} is not one of the allowed labels [True, False, 'true', 'false']")
    question = f"{row['passage']}\nQuestion: {row['question']}?"
    return Example(format_prompt(question, ["yes", "no"]), 2, 0 if answer else 1)


def _piqa(row: dict) -> Example:
    answer = _label_index("label", row["label"], ["0", "1"])
    return Example(format_prompt(f"Goal: {row['goal']}", [row["sol1"], row["sol2"]]), 2, answer)


def _siqa(row: dict) -> Example:
    options = [row["answerA"], row["answerB"], row["answerC"]]
    answer = _label_index("label", row["label"], ["1", "2", "3"])
    return Example(format_prompt(f"{row['context']}\nQuestion: {row['question']}", options), 3, answer)


def _hellaswag(row: dict) -> Example:
    endings = list(row["endings"])
    answer = _label_index("label", row["label"], [str(i) for i in range(len(endings))])
    return Example(format_prompt(f"Complete the sentence: {row['ctx']}", endings), len(endings), answer)


def _winogrande(row: dict) -> Example:
    question = f"Fill in the blank: {row['sentence']}"
    answer = _label_index("answer", row["answer"], ["1", "2"])
    return Example(format_prompt(question, [row["option1"], row["option2"]]), 2, answer)


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
    """Examples of task `name` from `<data_dir>/<name>.jsonl` if given, else from the Hub.

    A file or split without rows is a ValueError naming it; so is a row whose answer is not one of its options
    (e.g. ARC answerKey "E" with four choices), naming the task, the row (0-based) and the allowed labels.
    """
    from datasets import load_dataset

    if name not in TASKS:
        raise ValueError(f"task must be one of {sorted(TASKS)}, got {name!r}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1 (or None for every row), got {limit}")
    task = TASKS[name]
    if data_dir is not None:
        path = Path(data_dir) / f"{name}.jsonl"
        if not path.exists():
            raise FileNotFoundError(f"{path} not found: write the task's rows there in its Hub schema")
        with open(path) as lines:
            if not any(line.strip() for line in lines):
                raise ValueError(f"{path} has no rows: write the task's rows there in its Hub schema, one per line")
        source = str(path)
        # escaped: `datasets` reads data_files as a glob, so a folder like "runs[1]" would name another folder's file
        rows = load_dataset("json", data_files=glob.escape(source), split="train")
    else:
        source = f"{task.hub_name} ({task.hub_config or 'default'} config, {task.split} split)"
        rows = load_dataset(task.hub_name, task.hub_config, split=task.split, revision=task.revision)
    if len(rows) == 0:
        raise ValueError(f"{source} has no rows for task {name!r}")
    if limit is not None:
        rows = rows.select(range(min(limit, len(rows))))
    examples = []
    for index, row in enumerate(rows):
        try:
            examples.append(task.build(row))
        except ValueError as error:
            raise ValueError(f"task {name!r}, row {index} of {source}: {error}") from error
        except KeyError as error:
            raise ValueError(f"task {name!r}, row {index} of {source}: no field {error}") from error
    return examples


def prompt_token_ids(tokenizer, prompt: str) -> list[int]:
    """The prompt's tokens with the special tokens the tokenizer adds before the text (BOS, as the model expects)
    but none of those it adds after it (an appended EOS): the last token is the prompt's own last token, the
    position whose next-token logits are scored."""
    text = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    full = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    for start in range(len(full) - len(text) + 1):
        if full[start : start + len(text)] == text:
            return full[: start + len(text)]
    return text  # the special tokens are not around the text: the text alone


def label_token_ids(tokenizer, num_options: int) -> list[int]:
    """Token id of each option label " A", " B", ... as it follows the prompt's "Answer:": the first token of
    `"Answer: A"` after the tokens of `"Answer:"`.

    Taken in context because SentencePiece tokenizers of the Llama-2 kind split a bare " A" into ["▁", "▁A"]
    (its first token is the same for every label) while after "Answer:" the label is the one token "▁A". A
    ValueError when the tokens of "Answer:" change once a label follows, when a label is more than one token there
    (its first token, e.g. a bare space "Ġ" before "E", would score it), or the labels' tokens are not distinct.
    """
    cue = tokenizer(ANSWER_CUE, add_special_tokens=False)["input_ids"]
    ids = []
    for i in range(num_options):
        label = f" {chr(65 + i)}"
        with_label = tokenizer(ANSWER_CUE + label, add_special_tokens=False)["input_ids"]
        if with_label[: len(cue)] != cue or len(with_label) == len(cue):
            raise ValueError(f"the tokenizer merges the option label {label!r} into the prompt's {ANSWER_CUE!r}: "
                             "the label has no token of its own to score")
        if len(with_label) != len(cue) + 1:
            pieces = tokenizer.convert_ids_to_tokens(with_label[len(cue):])
            raise ValueError(f"the tokenizer splits the option label {label!r} after {ANSWER_CUE!r} into {pieces}: "
                             "its first token alone would score it; use a tokenizer with one token per label (or "
                             "fewer options)")
        ids.append(with_label[len(cue)])
    if len(set(ids)) != num_options:
        raise ValueError("the tokenizer does not give distinct tokens to the option labels ' A', ' B', ... after "
                         f"{ANSWER_CUE!r}: {tokenizer.convert_ids_to_tokens(ids)}")
    return ids


@torch.no_grad()
def label_logits(model, tokenizer, examples: list[Example], adapters: list[str] | None = None) -> torch.Tensor:
    """Next-token logits of the option labels after each prompt: (adapters or 1, examples, max options) fp32,
    -inf where an example has fewer options. One left-padded forward for all (adapter, example) rows; the scored
    position is each prompt's last token (`prompt_token_ids`: BOS added as the model expects, no EOS)."""
    names = adapters or [None]
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    encoded = [prompt_token_ids(tokenizer, e.prompt) for e in examples]
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
    labels = label_token_ids(tokenizer, width)  # label i's token does not depend on how many options follow
    out = torch.full((reps, len(examples), width), float("-inf"))
    for i, example in enumerate(examples):
        out[:, i, : example.num_options] = logits[:, i, labels[: example.num_options]].cpu()
    return out


@functools.cache
def accuracy_metric() -> Callable[[list[int], list[int]], float]:
    """`evaluate.load("accuracy")` as a function of (predictions, references), or, where that Hub module cannot
    be loaded (offline; or without scikit-learn, which the module imports and neither peft-mole nor `evaluate`
    requires), the same mean of exact matches."""
    import evaluate

    try:
        metric = evaluate.load("accuracy")
    except (OSError, ValueError, ConnectionError, ImportError) as error:  # FileNotFoundError offline
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

    Every task needs at least one example: an empty `tasks`, or a task with no examples, is a ValueError naming
    it (a task of zero examples has no accuracy, and counting it as 0.0 would lower the average); a `batch_size`
    that is not an int >= 1 is a ValueError, `adapters` other than None or a non-empty list of names a TypeError.
    The result goes on the adapters' model cards with `peft_mole.add_eval_results(model, result)`.
    """
    if not tasks:
        raise ValueError("tasks is empty: give at least one {task name: examples}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if adapters is not None and (not isinstance(adapters, (list, tuple)) or not adapters
                                 or not all(isinstance(a, str) and a for a in adapters)):
        raise TypeError(f"adapters must be a non-empty list of adapter names (or None for the model as it is), "
                        f"got {adapters!r}")
    empty = [name for name, examples in tasks.items() if not examples]
    if empty:  # a task of zero examples has no accuracy; scoring it 0.0 would pull the average down
        raise ValueError(f"task(s) {empty} have no examples: evaluate at least one example per task")
    names = adapters or ["model"]
    results: dict[str, dict[str, float]] = {name: {} for name in names}
    accuracy = accuracy_metric()
    with DoraCaching(), eval_keeping_4bit_training(model):  # (a 4-bit base's eval mode would end its training)
        for task_name, examples in tasks.items():
            predictions = [label_logits(model, tokenizer, examples[start : start + batch_size], adapters).argmax(-1)
                           for start in range(0, len(examples), batch_size)]  # each (adapters, chunk)
            answers = [e.answer for e in examples]
            for a, name in enumerate(names):
                predicted = torch.cat([p[a] for p in predictions]).tolist()
                results[name][task_name] = accuracy(predicted, answers)
    for name in names:
        scores = list(results[name].values())
        results[name]["average"] = sum(scores) / len(scores)
    return results

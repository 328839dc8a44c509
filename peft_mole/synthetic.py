"""Offline building blocks for demos, tests and benchmarks: random-init decoders, a locally trained tokenizer
and a small multi-task instruction dataset whose answers can be learned.

Nothing here downloads anything. Real use loads models, tokenizers and datasets with `from_pretrained` and
`load_dataset`; these helpers write the same artefacts to local folders so that the same loading code runs.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from transformers import GemmaConfig, LlamaConfig, MistralConfig, PretrainedConfig, Qwen2Config

# Shapes of ../shared/BENCH.md (tiny: unit tests, small: CPU benchmarks, medium: GPU benchmarks).
SHAPES = {
    "tiny": dict(hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=4, vocab_size=512, max_position_embeddings=256),
    "small": dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=8, vocab_size=4096, max_position_embeddings=512),
    "medium": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                   num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048),
}
FAMILIES = {"llama": LlamaConfig, "qwen2": Qwen2Config, "mistral": MistralConfig, "gemma": GemmaConfig}


def model_config(family: str = "llama", shape: str = "tiny", **overrides) -> PretrainedConfig:
    """A decoder config of a BENCH.md shape. Example: `model_config("qwen2", "tiny", vocab_size=300)`."""
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {sorted(FAMILIES)}, got {family!r}")
    if shape not in SHAPES:
        raise ValueError(f"shape must be one of {sorted(SHAPES)}, got {shape!r}")
    kwargs = {**SHAPES[shape], "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, **overrides}
    if family == "gemma":  # Gemma's default head_dim is 256 whatever the hidden size
        kwargs.setdefault("head_dim", kwargs["hidden_size"] // kwargs["num_attention_heads"])
    return FAMILIES[family](**kwargs)


def random_model(family: str = "llama", shape: str = "tiny", seed: int = 0, **overrides):
    """A random-init causal LM (fp32) of the given family and shape."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(model_config(family, shape, **overrides))


# ---------------------------------------------------------------- data
_SENTIMENT = {
    "positive": ["great", "fun", "lovely", "bright", "happy", "superb", "warm", "kind"],
    "negative": ["awful", "dull", "sad", "broken", "cruel", "grim", "cold", "bad"],
}
_OPPOSITES = {"hot": "cold", "up": "down", "big": "small", "fast": "slow", "old": "new", "dark": "light",
              "early": "late", "open": "closed", "full": "empty", "loud": "quiet"}
_CAPITALS = {"France": "Paris", "Spain": "Madrid", "Italy": "Rome", "Japan": "Tokyo", "Egypt": "Cairo",
             "Peru": "Lima", "Kenya": "Nairobi", "Chile": "Santiago", "Norway": "Oslo", "Cuba": "Havana"}
_NUMBERS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
TASKS = ("sentiment", "opposite", "capital", "add")


def _example(task: str, rng: random.Random) -> dict:
    if task == "sentiment":
        label = rng.choice(sorted(_SENTIMENT))
        words = rng.sample(_SENTIMENT[label], 2)
        prompt = f"Sentiment of: the day was {words[0]} and {words[1]}.\nAnswer:"
        return {"task": task, "prompt": prompt, "completion": f" {label}", "choices": [" positive", " negative"]}
    if task == "opposite":
        word = rng.choice(sorted(_OPPOSITES))
        return {"task": task, "prompt": f"Opposite of {word}?\nAnswer:", "completion": f" {_OPPOSITES[word]}",
                "choices": [f" {w}" for w in sorted(_OPPOSITES.values())]}
    if task == "capital":
        country = rng.choice(sorted(_CAPITALS))
        return {"task": task, "prompt": f"Capital of {country}?\nAnswer:", "completion": f" {_CAPITALS[country]}",
                "choices": [f" {c}" for c in sorted(_CAPITALS.values())]}
    if task == "add":
        a, b = rng.randrange(5), rng.randrange(5)
        return {"task": task, "prompt": f"Add {_NUMBERS[a]} and {_NUMBERS[b]}.\nAnswer:",
                "completion": f" {_NUMBERS[a + b]}", "choices": [f" {n}" for n in _NUMBERS]}
    raise ValueError(f"task must be one of {TASKS}, got {task!r}")


def multitask_rows(num_rows: int, seed: int = 0, tasks: tuple[str, ...] = TASKS) -> list[dict]:
    """`num_rows` prompt/completion rows cycling over `tasks` (fields: task, prompt, completion, choices)."""
    rng = random.Random(seed)
    return [_example(tasks[i % len(tasks)], rng) for i in range(num_rows)]


def write_jsonl(rows: list[dict], path: str | Path) -> Path:
    """Write rows as JSON lines (loadable with `datasets.load_dataset("json", data_files=path)`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


# ---------------------------------------------------------------- tokenizer
def train_tokenizer(texts: list[str], vocab_size: int = 512, save_dir: str | Path | None = None):
    """A byte-level BPE tokenizer trained on `texts`, as a `PreTrainedTokenizerFast` (pad=0, bos=1, eos=2).

    Saved with `save_pretrained(save_dir)` when given, so `AutoTokenizer.from_pretrained(save_dir)` loads it.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    special = ["<pad>", "<s>", "</s>"]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
    )
    if save_dir is not None:
        fast.save_pretrained(str(save_dir))
    return fast


def demo_tokenizer(save_dir: str | Path | None = None, vocab_size: int = 512):
    """The tokenizer of the synthetic tasks: trained on every prompt and answer the tasks can produce."""
    rows = multitask_rows(2000, seed=1234)
    texts = [r["prompt"] + r["completion"] for r in rows] + [c for r in rows for c in r["choices"]]
    return train_tokenizer(texts, vocab_size=vocab_size, save_dir=save_dir)


# ---------------------------------------------------------------- commonsense-format tasks
def write_commonsense_tasks(folder: str | Path, rows: int, seed: int = 0) -> Path:
    """Generated questions in two of the papers' Hub schemas, for offline runs of `peft_mole.evaluation`:
    `arc_e.jsonl` (question, lettered choices, answerKey; from the capital/opposite tasks, 4 options) and
    `boolq.jsonl` (passage, question, answer: sums above 9)."""
    rng = random.Random(seed)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "arc_e.jsonl", "w") as f:
        for row in multitask_rows(rows, seed=seed + 3, tasks=("capital", "opposite")):
            options = [row["completion"]] + rng.sample([c for c in row["choices"] if c != row["completion"]], 3)
            rng.shuffle(options)
            f.write(json.dumps({
                "question": row["prompt"].split("\n")[0], "answerKey": "ABCD"[options.index(row["completion"])],
                "choices": {"text": [o.strip() for o in options], "label": list("ABCD")},
            }) + "\n")
    with open(folder / "boolq.jsonl", "w") as f:
        for _ in range(rows):
            a, b = rng.randint(0, 9), rng.randint(0, 9)
            f.write(json.dumps({"passage": f"{a} plus {b} is {a + b}.", "question": f"is {a} plus {b} more than 9",
                                "answer": a + b > 9}) + "\n")
    return folder


def commonsense_tokenizer(task_folder: str | Path, save_dir: str | Path | None = None):
    """A tokenizer trained on the files of `write_commonsense_tasks` that gives each option label (" A" ... " D")
    its own token, as the label-logit scoring needs."""
    texts = [line for path in sorted(Path(task_folder).glob("*.jsonl")) for line in path.read_text().splitlines()]
    labels = [f"Answer: {letter}" for letter in "ABCD" for _ in range(50)]
    return train_tokenizer(texts + labels, vocab_size=400, save_dir=save_dir)

"""Multiple-choice scoring: pick the answer whose tokens the model finds most likely after the prompt."""

from __future__ import annotations

import logging
from collections import defaultdict

import torch
from peft.helpers import DoraCaching

from peft_mole.evaluation.commonsense import prompt_token_ids
from peft_mole.quantised_eval import eval_keeping_4bit_training

logger = logging.getLogger(__name__)


@torch.no_grad()
def choice_scores(model, tokenizer, prompt: str, choices: list[str], adapter: str | None = None) -> torch.Tensor:
    """Σ_t log p(choice_t | prompt, choice_<t) for each choice, (len(choices),) fp32.

    Each row is `prompt + choice` tokenised as one text, as TRL's SFTTrainer tokenises a prompt-completion row in
    training, with the special tokens the tokenizer puts before a text (BOS) and none after it
    (`prompt_token_ids`); the choice's tokens are those after the longest prefix the row shares with the prompt's
    own tokens, scored. Tokenised apart, a SentencePiece tokenizer of the Llama-2 kind turned " B" into
    ["▁", "▁B"], a token the model never saw there in training (before 2026-12-07). Where the choice merges with
    the prompt's end (a prompt ending in a space, whose "Ġ" becomes the choice's "Ġyes"), the merged token is the
    choice's, as lm-evaluation-harness moves a context's trailing space to the continuation; a warning says so.
    `adapter` runs all rows with that adapter (`adapter_names`) when given.

    The prompt must have at least one token the rows share (the first choice token is predicted from the one
    before it), and every choice at least one token of its own (a choice of no tokens would score log 1 = 0 and
    beat every real one): a ValueError otherwise, as for an empty `choices`.
    """
    if not choices:
        raise ValueError("choices is empty: give at least one answer choice")
    prompt_ids = prompt_token_ids(tokenizer, prompt)
    if not prompt_ids:
        raise ValueError(f"prompt {prompt!r} has no tokens: the first choice token needs a prompt token to follow")
    rows = [prompt_token_ids(tokenizer, prompt + c) for c in choices]
    starts = [shared_prefix(row, prompt_ids) for row in rows]
    if 0 in starts:
        raise ValueError(f"prompt {prompt!r} shares no token with choices "
                         f"{[c for c, start in zip(choices, starts, strict=True) if start == 0]!r} once they follow "
                         "it: there is no prompt token to predict their first token from")
    choice_ids = [row[start:] for row, start in zip(rows, starts, strict=True)]
    empty = [i for i, c in enumerate(choice_ids) if not c]
    if empty:
        raise ValueError(f"choices {[choices[i] for i in empty]!r} (at {empty}) have no tokens: every choice needs "
                         "at least one token to score")
    merged = [c for c, start in zip(choices, starts, strict=True) if start < len(prompt_ids)]
    if merged:
        logger.warning("the prompt's last tokens merge with choices %r that follow it; the merged tokens are scored "
                       "as the choice's", merged)
    length = max(len(row) for row in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = next(model.parameters()).device
    ids = torch.full((len(choices), length), pad, dtype=torch.long, device=device)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row, device=device)
        mask[i, : len(row)] = 1
    kwargs = {} if adapter is None else {"adapter_names": [adapter] * len(choices)}
    logits = model(input_ids=ids, attention_mask=mask, **kwargs).logits.float()
    log_probs = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    scores = torch.zeros(len(choices), device=device)
    for i, (c, start) in enumerate(zip(choice_ids, starts, strict=True)):
        scores[i] = log_probs[i, start - 1 : start - 1 + len(c)].sum()  # (position start − 1 predicts token start)
    return scores.cpu()


def shared_prefix(a: list[int], b: list[int]) -> int:
    """The number of leading tokens `a` and `b` share."""
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def choice_accuracy(model, tokenizer, rows: list[dict], adapter: str | None = None) -> dict[str, float]:
    """Accuracy per task, and their mean (`average`: each task weighted equally), over `rows` with fields task,
    prompt, completion, choices (DoRA weight norms kept from row to row, `peft.helpers.DoraCaching`: nothing trains
    meanwhile). `rows` must not be empty (a
    ValueError: there is no accuracy of zero rows), and each row's completion must be one of its choices (a
    ValueError naming the row: it could never be scored right)."""
    if not rows:
        raise ValueError("rows is empty: give at least one row with fields task, prompt, completion, choices")
    for index, row in enumerate(rows):  # a completion no choice spells out could never be hit: a formatting slip
        if row["completion"] not in row["choices"]:
            raise ValueError(f"row {index}: completion {row['completion']!r} is not one of its choices "
                             f"{row['choices']!r} (it must equal one of them exactly, spaces included)")
    hits: dict[str, list[bool]] = defaultdict(list)
    with DoraCaching(), eval_keeping_4bit_training(model):  # (a 4-bit base's eval mode would end its training)
        for row in rows:
            scores = choice_scores(model, tokenizer, row["prompt"], row["choices"], adapter)
            hits[row["task"]].append(row["choices"][int(scores.argmax())] == row["completion"])
    result = {task: sum(h) / len(h) for task, h in sorted(hits.items())}
    result["average"] = sum(result.values()) / len(result)
    return result

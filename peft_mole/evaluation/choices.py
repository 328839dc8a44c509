"""Multiple-choice scoring: pick the answer whose tokens the model finds most likely after the prompt."""

from __future__ import annotations

from collections import defaultdict

import torch
from peft.helpers import DoraCaching

from peft_mole.evaluation.commonsense import prompt_token_ids
from peft_mole.quantised_eval import eval_keeping_4bit_training


@torch.no_grad()
def choice_scores(model, tokenizer, prompt: str, choices: list[str], adapter: str | None = None) -> torch.Tensor:
    """Σ_t log p(choice_t | prompt, choice_<t) for each choice, (len(choices),) fp32.

    The prompt and each choice are tokenised separately and concatenated, so every choice is scored on the same
    prompt tokens: the prompt's with the special tokens the tokenizer puts before a text (BOS, as the model saw
    in training) and none after it (`prompt_token_ids`, as `label_logits` scores), each choice's without any.
    `adapter` runs all rows with that adapter (`adapter_names`) when given.

    The prompt must have at least one token (the first choice token is predicted from the prompt's last one), and
    so must every choice (a choice of no tokens would score log 1 = 0 and beat every real one): a ValueError
    otherwise, as for an empty `choices`.
    """
    if not choices:
        raise ValueError("choices is empty: give at least one answer choice")
    prompt_ids = prompt_token_ids(tokenizer, prompt)
    if not prompt_ids:
        raise ValueError(f"prompt {prompt!r} has no tokens: the first choice token needs a prompt token to follow")
    choice_ids = [tokenizer(c, add_special_tokens=False)["input_ids"] for c in choices]
    empty = [i for i, c in enumerate(choice_ids) if not c]
    if empty:
        raise ValueError(f"choices {[choices[i] for i in empty]!r} (at {empty}) have no tokens: every choice needs "
                         "at least one token to score")
    length = len(prompt_ids) + max(len(c) for c in choice_ids)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = next(model.parameters()).device
    ids = torch.full((len(choices), length), pad, dtype=torch.long, device=device)
    mask = torch.zeros_like(ids)
    for i, c in enumerate(choice_ids):
        row = prompt_ids + c
        ids[i, : len(row)] = torch.tensor(row, device=device)
        mask[i, : len(row)] = 1
    kwargs = {} if adapter is None else {"adapter_names": [adapter] * len(choices)}
    logits = model(input_ids=ids, attention_mask=mask, **kwargs).logits.float()
    log_probs = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    scores = torch.zeros(len(choices), device=device)
    for i, c in enumerate(choice_ids):
        start = len(prompt_ids) - 1  # position predicting the first choice token
        scores[i] = log_probs[i, start : start + len(c)].sum()
    return scores.cpu()


def choice_accuracy(model, tokenizer, rows: list[dict], adapter: str | None = None) -> dict[str, float]:
    """Accuracy per task, and their mean (`average`: each task weighted equally), over `rows` with fields task,
    prompt, completion, choices (DoRA weight norms kept from row to row, `peft.helpers.DoraCaching`: nothing trains
    meanwhile). `rows` must not be empty (a
    ValueError: there is no accuracy of zero rows)."""
    if not rows:
        raise ValueError("rows is empty: give at least one row with fields task, prompt, completion, choices")
    hits: dict[str, list[bool]] = defaultdict(list)
    with DoraCaching(), eval_keeping_4bit_training(model):  # (a 4-bit base's eval mode would end its training)
        for row in rows:
            scores = choice_scores(model, tokenizer, row["prompt"], row["choices"], adapter)
            hits[row["task"]].append(row["choices"][int(scores.argmax())] == row["completion"])
    result = {task: sum(h) / len(h) for task, h in sorted(hits.items())}
    result["average"] = sum(result.values()) / len(result)
    return result

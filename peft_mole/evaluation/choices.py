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
    (`prompt_token_ids`); the tokens after the prompt's own are the choice's, scored (TRL's completion mask).
    Tokenised apart, a SentencePiece tokenizer of the Llama-2 kind turned " B" into ["▁", "▁B"], a token the model
    never saw there in training. Where a choice changes the prompt's last tokens (a merge across the boundary),
    TRL warns and masks by the prompt's length; so does this. `adapter` runs all rows with that adapter
    (`adapter_names`) when given.

    The prompt must have at least one token (the first choice token is predicted from the prompt's last one), and
    so must every choice (a choice of no tokens would score log 1 = 0 and beat every real one): a ValueError
    otherwise, as for an empty `choices`.
    """
    if not choices:
        raise ValueError("choices is empty: give at least one answer choice")
    prompt_ids = prompt_token_ids(tokenizer, prompt)
    if not prompt_ids:
        raise ValueError(f"prompt {prompt!r} has no tokens: the first choice token needs a prompt token to follow")
    rows = [prompt_token_ids(tokenizer, prompt + c) for c in choices]
    choice_ids = [row[len(prompt_ids):] for row in rows]
    empty = [i for i, c in enumerate(choice_ids) if not c]
    if empty:
        raise ValueError(f"choices {[choices[i] for i in empty]!r} (at {empty}) have no tokens: every choice needs "
                         "at least one token to score")
    merged = [choices[i] for i, row in enumerate(rows) if row[:len(prompt_ids)] != prompt_ids]
    if merged:
        logger.warning("the prompt's tokens change when choices %r follow it; they are scored from the prompt's "
                       "length on, as TRL masks a completion in training", merged)
    length = len(prompt_ids) + max(len(c) for c in choice_ids)
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

"""Evaluation entry points: their arguments checked by name, data folders read literally, and DoRA norms never kept
from before an optimizer step."""

import json

import pytest
import torch
from peft import LoraConfig, get_peft_model

from peft_mole import synthetic
from peft_mole.evaluation import choice_accuracy, choice_scores, evaluate_commonsense, load_task
from peft_mole.quantised_eval import eval_keeping_4bit_training
from tests.helpers import count_row_norms, mixlora, randomize_adapters, tiny_base

ARC_ROW = {"question": "Which is a gas?", "choices": {"text": ["ice", "steam", "rock"], "label": ["A", "B", "C"]},
           "answerKey": "B"}


def write_arc(folder, copies: int) -> None:
    folder.mkdir()
    synthetic.write_jsonl([json.loads(json.dumps(ARC_ROW)) for _ in range(copies)], folder / "arc_e.jsonl")


def test_a_data_folder_with_glob_characters_is_read_literally(tmp_path):
    """`datasets` reads `data_files` as a glob: "x[1]/arc_e.jsonl" matched x1's file (3 rows for 1), and alone
    it was a bare StopIteration."""
    write_arc(tmp_path / "x[1]", 1)
    assert len(load_task("arc_e", tmp_path / "x[1]")) == 1
    write_arc(tmp_path / "x1", 3)
    assert len(load_task("arc_e", tmp_path / "x[1]")) == 1
    assert len(load_task("arc_e", tmp_path / "x1")) == 3


@pytest.mark.parametrize(("kwargs", "error", "message"), [
    ({"batch_size": 0}, ValueError, "batch_size must be an int >= 1, got 0"),
    ({"batch_size": 2.5}, ValueError, "batch_size must be an int >= 1, got 2.5"),
    ({"batch_size": True}, ValueError, "batch_size must be an int >= 1, got True"),
    ({"adapters": "default"}, TypeError, "adapters must be a non-empty list of adapter names"),
    ({"adapters": []}, TypeError, "adapters must be a non-empty list of adapter names"),
    ({"adapters": ["default", 3]}, TypeError, "adapters must be a non-empty list of adapter names"),
])
def test_evaluate_commonsense_names_a_bad_argument(tmp_path, kwargs, error, message):
    """Was: `range() arg 3 must not be zero`, a torch.cat error, and "default" split into adapters d, e, f, ..."""
    write_arc(tmp_path / "data", 2)
    tokenizer = synthetic.demo_tokenizer()
    model = tiny_base(vocab_size=len(tokenizer))
    with pytest.raises(error, match=message):
        evaluate_commonsense(model, tokenizer, {"arc_e": load_task("arc_e", tmp_path / "data")}, **kwargs)


def test_a_completion_outside_its_choices_is_refused_naming_the_row():
    """Was: counted as a miss, so one formatting slip (no leading space) set a task's accuracy to 0."""
    tokenizer = synthetic.demo_tokenizer()
    model = tiny_base(vocab_size=len(tokenizer))
    good = {"task": "t", "prompt": "Sky?\nAnswer:", "completion": " blue", "choices": [" blue", " red"]}
    bad = {**good, "completion": "blue"}
    with pytest.raises(ValueError, match=r"row 1: completion 'blue' is not one of its choices \[' blue', ' red'\]"):
        choice_accuracy(model, tokenizer, [good, bad])
    assert set(choice_accuracy(model, tokenizer, [good])) == {"t", "average"}


def test_an_evaluation_after_optimizer_steps_uses_the_new_dora_norms():
    """A loop that calls `train()` once: the evaluations restore training mode flag by flag, which skipped `train()`,
    the only call that empties PEFT's DoRA norm cache, so the second evaluation scored with the first's norms
    (0.31 off in the review's case)."""
    tokenizer = synthetic.demo_tokenizer()
    torch.manual_seed(0)
    config = LoraConfig(r=4, use_dora=True, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    model = get_peft_model(tiny_base(vocab_size=len(tokenizer)), config)
    model.train()
    row = {"task": "t", "prompt": "Sky?\nAnswer:", "completion": " blue", "choices": [" blue", " red"]}
    choice_accuracy(model, tokenizer, [row])  # caches the norms while it runs
    with torch.no_grad():  # an optimizer step
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.mul_(20.0)
    assert model.training
    from peft.helpers import DoraCaching

    with DoraCaching(), eval_keeping_4bit_training(model):  # as the next choice_accuracy scores
        scored = choice_scores(model, tokenizer, row["prompt"], row["choices"])
    model.eval()  # fresh norms (eval mode outside DoraCaching computes them each call)
    with torch.no_grad():
        fresh = choice_scores(model, tokenizer, row["prompt"], row["choices"])
    assert torch.allclose(scored, fresh, atol=1e-5), (scored - fresh).abs().max()


def test_mixdora_norms_are_dropped_when_an_evaluation_returns_to_training(monkeypatch):
    """The experts' own cache is emptied too (it is keyed by the weights' versions; emptied anyway, as `train()`
    would): a second evaluation computes its norms again."""
    calls = count_row_norms(monkeypatch)
    model = get_peft_model(tiny_base(), mixlora(use_dora=True))
    randomize_adapters(model, std=0.3)
    model.train()
    from peft.helpers import DoraCaching

    x = torch.randint(3, 100, (1, 6))
    for _ in range(2):
        with torch.no_grad(), DoraCaching(), eval_keeping_4bit_training(model):
            model(input_ids=x)
            model(input_ids=x)
    assert len(calls) == 2 * 2 * 3  # per evaluation: two layers × gate/up/down, once
    assert model.training

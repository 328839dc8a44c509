"""The commonsense protocol on local files in each task's Hub schema, and one-pass multi-adapter evaluation."""

import json

import pytest
import torch
from peft import PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from peft_mole import cli, synthetic
from peft_mole.evaluation import TASKS, evaluate_commonsense, format_prompt, load_task
from peft_mole.evaluation.commonsense import label_logits
from tests.helpers import count_row_norms, dynmole, mixlora, randomize_adapters, tiny_base

ROWS = {
    "arc_e": [{"question": "Which is a gas?", "choices": {"text": ["ice", "steam", "rock"], "label": ["A", "B", "C"]},
               "answerKey": "B"}],
    "arc_c": [{"question": "Pick two.", "choices": {"text": ["one", "two"], "label": ["1", "2"]}, "answerKey": "2"}],
    "boolq": [{"question": "is water wet", "passage": "Water is a liquid.", "answer": True}],
    "obqa": [{"question_stem": "The sun is a", "choices": {"text": ["star", "moon", "planet", "comet"],
                                                             "label": ["A", "B", "C", "D"]}, "answerKey": "A"}],
    "piqa": [{"goal": "Open a jar", "sol1": "twist the lid", "sol2": "eat the lid", "label": 0}],
    "siqa": [{"context": "Kim helped Lee.", "question": "How does Lee feel?", "answerA": "grateful",
              "answerB": "angry", "answerC": "bored", "label": "1"}],
    "hellaswag": [{"ctx": "He opens the door and", "endings": ["walks in", "x", "y", "z"], "label": "0"}],
    "winogrande": [{"sentence": "The cup fell because _ was slippery.", "option1": "the cup", "option2": "the table",
                    "answer": "1"}],
}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("commonsense")
    for name, rows in ROWS.items():
        copies = []
        for i in range(3):  # prompts of different lengths, so batches need padding
            row = json.loads(json.dumps(rows[0]))
            key = next(k for k in ("question", "question_stem", "goal", "ctx", "sentence", "passage") if k in row)
            row[key] += " really" * (2 * i)
            copies.append(row)
        synthetic.write_jsonl(copies, root / f"{name}.jsonl")
    return root


@pytest.fixture(scope="module")
def tokenizer():
    texts = [format_prompt("q", ["a", "b", "c", "d", "e"]) + f" {c}" for c in "ABCDE"] * 50
    return synthetic.train_tokenizer(texts + ["Question: Answer: yes no Goal: Fill in the blank"] * 10, vocab_size=300)


def test_every_task_builds_lettered_prompts_with_the_right_answer(data_dir):
    expected_answers = {"arc_e": 1, "arc_c": 1, "boolq": 0, "obqa": 0, "piqa": 0, "siqa": 0, "hellaswag": 0,
                        "winogrande": 0}
    assert set(TASKS) == set(expected_answers)
    for name, answer in expected_answers.items():
        examples = load_task(name, data_dir)
        assert len(examples) == 3 and examples[0].answer == answer, name
        assert examples[0].prompt.endswith("\nAnswer:") and "\nA. " in examples[0].prompt, name
    arc = load_task("arc_e", data_dir)[0]
    assert arc.prompt == "Which is a gas?\nA. ice\nB. steam\nC. rock\nAnswer:" and arc.num_options == 3
    assert load_task("boolq", data_dir, limit=2)[0].prompt.startswith("Water is a liquid.\nQuestion: is water wet?")
    with pytest.raises(ValueError, match="task must be one of"):
        load_task("mmlu", data_dir)


# Checked against the Hub repos and lm-eval's task files (2026-11): ids, configs, splits with labels, and the
# parquet branch for the two repos whose main branch still holds a loading script (refused by datasets >= 4).
HUB = {
    "arc_e": ("allenai/ai2_arc", "ARC-Easy", "test", None),
    "arc_c": ("allenai/ai2_arc", "ARC-Challenge", "test", None),
    "boolq": ("google/boolq", None, "validation", None),
    "obqa": ("allenai/openbookqa", "main", "test", None),
    "piqa": ("ybisk/piqa", None, "validation", "refs/convert/parquet"),
    "siqa": ("allenai/social_i_qa", None, "validation", "refs/convert/parquet"),
    "hellaswag": ("Rowan/hellaswag", None, "validation", None),
    "winogrande": ("allenai/winogrande", "winogrande_debiased", "validation", None),
}


def test_hub_loading_asks_for_the_verified_repo_config_split_and_revision(monkeypatch):
    import datasets

    calls = {}

    def fake_load_dataset(path, name=None, split=None, revision=None, **kwargs):
        calls[path, name] = (split, revision)
        return datasets.Dataset.from_list(ROWS[current])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    for current, (repo, config, split, revision) in HUB.items():
        examples = load_task(current)  # no data_dir: the Hub path
        assert calls[repo, config] == (split, revision) and len(examples) == 1, current


@pytest.mark.parametrize(
    ("row", "answer", "num_options"),
    [
        ({"choices": {"text": ["a", "b", "c", "d"], "label": ["1", "2", "3", "4"]}, "answerKey": "3"}, 2, 4),
        ({"choices": {"text": list("abcde"), "label": list("ABCDE")}, "answerKey": "E"}, 4, 5),
        ({"choices": {"text": ["a", "b", "c"], "label": ["A", "B", "C"]}, "answerKey": " B "}, 1, 3),
        ({"choices": {"text": ["x", "y"], "label": ["x", "y"]}, "answerKey": "B"}, 1, 2),  # old OBQA: labels = texts
    ],
)
def test_arc_style_answer_keys(tmp_path, row, answer, num_options):
    synthetic.write_jsonl([{"question": "q", **row}], tmp_path / "arc_c.jsonl")
    example = load_task("arc_c", tmp_path)[0]
    assert (example.answer, example.num_options) == (answer, num_options)


def test_accuracy_goes_through_evaluate_when_it_loads_and_is_the_same_mean_offline(monkeypatch, data_dir, tokenizer):
    import evaluate

    from peft_mole.evaluation import commonsense

    model = tiny_base(vocab_size=len(tokenizer))
    tasks = {name: load_task(name, data_dir) for name in ("arc_e", "piqa")}
    commonsense.accuracy_metric.cache_clear()
    monkeypatch.setattr(evaluate, "load", lambda name: (_ for _ in ()).throw(FileNotFoundError(name)))
    offline = evaluate_commonsense(model, tokenizer, tasks, batch_size=2)["model"]
    # the module found but scikit-learn, which it imports, missing (before: the ImportError ended the evaluation)
    commonsense.accuracy_metric.cache_clear()
    monkeypatch.setattr(evaluate, "load", lambda name: (_ for _ in ()).throw(ImportError(
        "To be able to use evaluate-metric/accuracy, you need to install the following dependencies['scikit-learn']")))
    assert evaluate_commonsense(model, tokenizer, tasks, batch_size=2)["model"] == offline
    calls = []

    class FakeAccuracy:  # what evaluate's module returns: {"accuracy": mean of exact matches}
        def compute(self, predictions, references):
            calls.append((list(predictions), list(references)))
            return {"accuracy": sum(p == r for p, r in zip(predictions, references, strict=True)) / len(references)}

    commonsense.accuracy_metric.cache_clear()
    monkeypatch.setattr(evaluate, "load", lambda name: FakeAccuracy() if name == "accuracy" else None)
    online = evaluate_commonsense(model, tokenizer, tasks, batch_size=2)["model"]
    commonsense.accuracy_metric.cache_clear()
    assert online == offline and len(calls) == 2
    assert [len(p) for p, _ in calls] == [3, 3] and calls[1][1] == [e.answer for e in tasks["piqa"]]


def test_one_pass_over_several_adapters_equals_each_adapter_alone(data_dir, tokenizer):
    model = get_peft_model(tiny_base(vocab_size=len(tokenizer)), mixlora())
    model.add_adapter("other", mixlora())
    model.base_model.set_adapter(["default", "other"])
    randomize_adapters(model, std=0.3)
    tasks = {name: load_task(name, data_dir) for name in ("arc_e", "obqa", "piqa", "hellaswag")}
    together = evaluate_commonsense(model, tokenizer, tasks, adapters=["default", "other"], batch_size=4)
    examples = [e for task in tasks.values() for e in task]
    mixed = label_logits(model, tokenizer, examples, adapters=["default", "other"])  # padded, both adapters
    assert not torch.equal(mixed[0], mixed[1])
    for a, name in enumerate(("default", "other")):
        model.base_model.set_adapter(name)
        for i, example in enumerate(examples):  # one example at a time: no padding, one adapter
            alone = label_logits(model, tokenizer, [example])[0, 0]
            torch.testing.assert_close(mixed[a, i, : example.num_options], alone, atol=1e-4, rtol=1e-4)
        assert together[name] == evaluate_commonsense(model, tokenizer, tasks, batch_size=1)["model"]
    # and the score is the label-token argmax of an unpadded forward
    model.base_model.set_adapter("default")
    example = tasks["obqa"][0]
    ids = torch.tensor([tokenizer(example.prompt)["input_ids"]])
    logits = model(input_ids=ids).logits[0, -1]
    options = [tokenizer(f" {c}", add_special_tokens=False)["input_ids"][0] for c in "ABCD"]
    predicted = int(logits[options].argmax())
    assert together["default"]["obqa"] in (0.0, 1 / 3, 2 / 3, 1.0)
    single = evaluate_commonsense(model, tokenizer, {"obqa": tasks["obqa"][:1]}, adapters=["default"])
    assert single["default"]["obqa"] == float(predicted == example.answer)
    assert together["default"]["average"] == pytest.approx(sum(together["default"][t] for t in tasks) / len(tasks))


def test_eval_cli_scores_several_adapters_and_writes_json_and_markdown(data_dir, tokenizer, tmp_path):
    import subprocess
    import sys

    base = tiny_base(vocab_size=len(tokenizer))
    base.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    # a folder name with a dot (before: "module name can't contain '.'"), and a task asked twice (one column)
    for name, seed, config in (("math", 1, mixlora()), ("chat", 3, dynmole()), ("qwen2.5-code", 2, mixlora())):
        model = get_peft_model(tiny_base(vocab_size=len(tokenizer)), config)
        randomize_adapters(model, std=0.3, seed=seed)
        model.save_pretrained(tmp_path / name)
    command = [
        sys.executable, "-m", "peft_mole.cli", "eval", "--base", str(tmp_path / "base"),
        "--adapters", ",".join(str(tmp_path / name) for name in ("math", "chat", "qwen2.5-code")),
        "--tasks", "arc_e,piqa,arc_e",
        "--data-dir", str(data_dir), "--out", str(tmp_path / "out"),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((tmp_path / "out" / "eval.json").read_text())
    # MixLoRA and DynMoLE adapters: one pass per type
    assert list(report["scores"]) == ["math", "chat", "qwen2_5-code"]
    tasks = {task: load_task(task, data_dir) for task in ("arc_e", "piqa")}
    for folder, name in (("chat", "chat"), ("qwen2.5-code", "qwen2_5-code")):  # each as its own model scores it
        alone = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "base"),
                                          str(tmp_path / folder))
        scored = evaluate_commonsense(alone, tokenizer, tasks, batch_size=8)["model"]  # the CLI's batch size
        assert report["scores"][name] == scored
    assert set(report["scores"]["math"]) == {"arc_e", "piqa", "average"}
    markdown = (tmp_path / "out" / "eval.md").read_text()
    assert markdown.startswith("| adapter | arc_e | piqa | average |") and "| math |" in markdown
    with pytest.raises(SystemExit, match=r"unknown task\(s\) \['mmlu'\]"):  # (in this process: a start costs 7 s)
        cli.main(command[3:-6] + ["--tasks", "mmlu"])


def test_dora_experts_compute_their_weight_norms_once_per_evaluation(data_dir, tokenizer, monkeypatch):
    """Nothing trains during an evaluation, so it runs inside PEFT's `DoraCaching`: MixDoRA's row norms are computed
    once per projection, not once per batch, with the same accuracies; the cache is off again afterwards."""
    from peft.tuners.lora import dora

    calls = count_row_norms(monkeypatch)
    model = get_peft_model(tiny_base(vocab_size=len(tokenizer)), mixlora(use_dora=True))
    randomize_adapters(model, std=0.3)
    tasks = {name: load_task(name, data_dir) for name in ("arc_e", "piqa")}
    cached = evaluate_commonsense(model, tokenizer, tasks, batch_size=1)  # 6 batches
    projections = 2 * 3  # two layers × gate/up/down
    assert len(calls) == projections and not dora.ENABLE_DORA_CACHING
    calls.clear()
    model.eval()
    with torch.no_grad():  # the same batches uncached: every forward computes the norms
        uncached = [label_logits(model, tokenizer, [e]).argmax(-1) for task in tasks.values() for e in task]
    assert len(calls) == projections * len(uncached)
    predicted = torch.cat(uncached).view(len(tasks), -1)
    for row, (name, examples) in zip(predicted, tasks.items(), strict=True):
        hits = sum(int(p) == e.answer for p, e in zip(row, examples, strict=True))
        assert cached["model"][name] == hits / len(examples)


def test_an_empty_task_or_no_task_is_refused_not_averaged_as_zero(data_dir, tokenizer):
    """A task of zero examples has no accuracy: scoring it 0.0 would halve this average (was: 0.0, counted)."""
    model = tiny_base(vocab_size=len(tokenizer))
    piqa = load_task("piqa", data_dir)
    with pytest.raises(ValueError, match=r"task\(s\) \['arc_e'\] have no examples"):
        evaluate_commonsense(model, tokenizer, {"arc_e": [], "piqa": piqa})
    with pytest.raises(ValueError, match="tasks is empty"):
        evaluate_commonsense(model, tokenizer, {})
    with pytest.raises(ValueError, match="limit must be >= 1"):
        load_task("piqa", data_dir, limit=0)


@pytest.mark.parametrize("content", ["", "\n\n"])
def test_an_empty_task_file_is_refused_naming_the_file(tmp_path, content):
    (tmp_path / "boolq.jsonl").write_text(content)  # was: a bare StopIteration (or "corresponds to no data")
    with pytest.raises(ValueError, match=f"{tmp_path / 'boolq.jsonl'} has no rows"):
        load_task("boolq", tmp_path)


@pytest.mark.parametrize(
    ("task", "row", "message"),
    [
        ("arc_e", {"question": "q", "choices": {"text": list("abcd"), "label": list("ABCD")}, "answerKey": "E"},
         r"answerKey 'E' is none of the choice labels \['A', 'B', 'C', 'D'\]"),
        ("arc_c", {"question": "q", "choices": {"text": list("abcd"), "label": list("ABCD")}, "answerKey": "F"},
         r"answerKey 'F' is none of the choice labels"),
        ("obqa", {"question_stem": "q", "choices": {"text": list("abcd"), "label": list("ABCD")}, "answerKey": "5"},
         r"answerKey '5' is none of .* or numbers \['1', '2', '3', '4'\]"),
        ("piqa", {"goal": "g", "sol1": "x", "sol2": "y", "label": -1}, r"label -1 is not one of .*\['0', '1'\]"),
        ("siqa", {"context": "c", "question": "q", "answerA": "a", "answerB": "b", "answerC": "c", "label": "4"},
         r"label '4' is not one of the allowed labels \['1', '2', '3'\]"),
        ("hellaswag", {"ctx": "c", "endings": list("abcd"), "label": "7"}, r"label '7' .*\['0', '1', '2', '3'\]"),
        ("winogrande", {"sentence": "s _", "option1": "a", "option2": "b", "answer": ""},
         r"answer '' is not one of the allowed labels \['1', '2'\]"),
        ("boolq", {"question": "q", "passage": "p", "answer": "maybe"}, r"answer 'maybe' is not one of"),
        ("boolq", {"question": "q", "passage": "p"}, r"answer None is not one of"),  # a row without answer
    ],
)
def test_an_answer_outside_the_options_is_refused_naming_task_row_and_labels(tmp_path, task, row, message):
    """Was: scored as a wrong prediction (an index no option has), or a bare 'substring not found' / int() error."""
    good = {**ROWS[task][0]}
    synthetic.write_jsonl([good, row], tmp_path / f"{task}.jsonl")
    with pytest.raises(ValueError, match=rf"task '{task}', row 1 of .*{task}.jsonl: {message}"):
        load_task(task, tmp_path)


def test_boolq_answers_given_as_text_are_parsed_not_taken_as_truthy(tmp_path):
    rows = [{"question": "q", "passage": "p", "answer": answer} for answer in ("false", "True", " FALSE ", False)]
    synthetic.write_jsonl(rows, tmp_path / "boolq.jsonl")
    assert [e.answer for e in load_task("boolq", tmp_path)] == [1, 0, 1, 1]  # 0 = "yes", 1 = "no"


def _bpe_tokenizer(texts, post_processor=None, llama2_style=False):
    """A small fast tokenizer: byte-level BPE (optionally with `post_processor`), or, with `llama2_style`, the
    legacy SentencePiece kind (prepend "▁", spaces become "▁") that splits a bare " A" into ["▁", "▁A"]."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    if llama2_style:
        backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        backend.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")
        backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.Strip(" ", 1, 0)])
        alphabet = []
    else:
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=200 if llama2_style else 300, initial_alphabet=alphabet,
                                  special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    backend.train_from_iterator(texts, trainer)
    if post_processor is not None:
        backend.post_processor = post_processor
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<unk>")


LABEL_TEXTS = [format_prompt("Which one is right?", ["ice", "steam", "rock", "sand"]) + f" {c}" for c in "ABCD"] * 50


def test_label_logits_scores_the_prompts_last_token_not_an_appended_eos():
    """A tokenizer whose post-processor wraps the text as "<s> $A </s>": the prompt keeps its BOS, loses the EOS,
    and the scored logits are those after the prompt's ':' (was: after '</s>')."""
    from tokenizers import processors

    from peft_mole.evaluation.commonsense import Example, label_token_ids

    wrap = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 1), ("</s>", 2)])
    tokenizer = _bpe_tokenizer(LABEL_TEXTS, post_processor=wrap)
    example = Example(format_prompt("Which one is right?", ["ice", "steam", "rock", "sand"]), 4, 1)
    text = tokenizer(example.prompt, add_special_tokens=False)["input_ids"]
    assert tokenizer(example.prompt)["input_ids"] == [1, *text, 2]
    model = tiny_base(vocab_size=len(tokenizer)).eval()
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[1, *text]])).logits[0, -1]
    expected = logits[label_token_ids(tokenizer, 4)]
    torch.testing.assert_close(label_logits(model, tokenizer, [example])[0, 0], expected, atol=1e-5, rtol=1e-5)
    from peft_mole.evaluation.commonsense import prompt_token_ids

    assert prompt_token_ids(tokenizer, example.prompt) == [1, *text]


def test_choice_scores_read_the_prompt_with_its_bos_and_without_an_eos():
    """A tokenizer that wraps a text as "<s> $A </s>": each choice is scored after "<s> prompt", as `label_logits`
    reads the prompt and as SFTTrainer tokenised it in training (was: without the BOS, 0.04 off here)."""
    from tokenizers import processors

    from peft_mole.evaluation import choice_scores

    wrap = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 1), ("</s>", 2)])
    tokenizer = _bpe_tokenizer(LABEL_TEXTS, post_processor=wrap)
    prompt = format_prompt("Which one is right?", ["ice", "steam", "rock", "sand"])
    text = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    model = tiny_base(vocab_size=len(tokenizer)).eval()
    expected = []
    for choice in (" A", " B C"):
        ids = [1, *text, *tokenizer(choice, add_special_tokens=False)["input_ids"]]
        with torch.no_grad():
            log_probs = model(input_ids=torch.tensor([ids])).logits[0].float().log_softmax(-1)
        expected.append(sum(log_probs[t - 1, ids[t]] for t in range(len(text) + 1, len(ids))))
    torch.testing.assert_close(choice_scores(model, tokenizer, prompt, [" A", " B C"]), torch.stack(expected),
                               atol=1e-5, rtol=1e-5)


def test_choice_scores_of_a_llama2_style_tokenizer_score_the_tokens_sft_trained_on():
    """A SentencePiece tokenizer of the Llama-2 kind splits a bare " B" into ["▁", "▁B"], but "prompt B" into the
    prompt's tokens and "▁B", what TRL's SFTTrainer tokenised in training (prompt + completion as one text). Each
    choice is scored on those tokens (before: on ["▁", "▁B"], a different sum)."""
    from peft_mole.evaluation import choice_scores

    tokenizer = _bpe_tokenizer(LABEL_TEXTS, llama2_style=True)
    prompt = format_prompt("Which one is right?", ["ice", "steam", "rock", "sand"])
    choices = [" B", " C D"]
    apart = tokenizer(" B", add_special_tokens=False)["input_ids"]
    model = tiny_base(vocab_size=len(tokenizer)).eval()
    prompt_ids = tokenizer(prompt)["input_ids"]
    expected = []
    for choice in choices:
        ids = tokenizer(prompt + choice)["input_ids"]
        assert ids[:len(prompt_ids)] == prompt_ids
        with torch.no_grad():
            log_probs = model(input_ids=torch.tensor([ids])).logits[0].float().log_softmax(-1)
        expected.append(sum(log_probs[t - 1, ids[t]] for t in range(len(prompt_ids), len(ids))))
    assert tokenizer(prompt + " B")["input_ids"][len(prompt_ids):] != apart  # the two tokenisations differ
    torch.testing.assert_close(choice_scores(model, tokenizer, prompt, choices), torch.stack(expected),
                               atol=1e-5, rtol=1e-5)


def test_choices_after_a_prompt_ending_in_a_space_score_their_whole_tokens(caplog):
    """A byte-level BPE merges a prompt's trailing space into the choice's first token ("Ġ" + "yes" = "Ġyes"): the
    choice is scored from where the row leaves the prompt's tokens, its merged first token included (a first
    version of the joint tokenisation dropped it, and refused one-token choices "A" as having no tokens)."""
    from peft_mole.evaluation import choice_scores

    tokenizer = synthetic.demo_tokenizer()
    model = tiny_base(vocab_size=len(tokenizer)).eval()
    prompt, choices = "Capital of Peru? Answer: ", ["Lima", "Rome Italy"]
    prompt_ids = tokenizer(prompt)["input_ids"]
    expected = []
    for choice in choices:
        ids = tokenizer(prompt + choice)["input_ids"]
        start = next(i for i, (a, b) in enumerate(zip(ids, prompt_ids, strict=False)) if a != b)
        assert start == len(prompt_ids) - 1  # the trailing space merged into the choice's first token
        with torch.no_grad():
            log_probs = model(input_ids=torch.tensor([ids])).logits[0].float().log_softmax(-1)
        expected.append(sum(log_probs[t - 1, ids[t]] for t in range(start, len(ids))))
    with caplog.at_level("WARNING"):
        scores = choice_scores(model, tokenizer, prompt, choices)
    torch.testing.assert_close(scores, torch.stack(expected), atol=1e-5, rtol=1e-5)
    assert "merge with choices ['Lima', 'Rome Italy']" in caplog.text


def test_label_tokens_of_a_llama2_style_sentencepiece_tokenizer_are_those_after_answer():
    """' A' alone is ['▁', '▁A'] (the first token is the same for every label: was a ValueError); after 'Answer:'
    the label is the one token '▁A', the token that follows the prompt's last token."""
    from peft_mole.evaluation.commonsense import label_token_ids

    tokenizer = _bpe_tokenizer(LABEL_TEXTS, llama2_style=True)
    assert tokenizer.convert_ids_to_tokens(tokenizer(" A", add_special_tokens=False)["input_ids"]) == ["▁", "▁A"]
    ids = label_token_ids(tokenizer, 4)
    assert tokenizer.convert_ids_to_tokens(ids) == ["▁A", "▁B", "▁C", "▁D"]
    prompt = format_prompt("Which one is right?", ["ice", "steam", "rock", "sand"])
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    for letter, label in zip("ABCD", ids, strict=True):
        assert tokenizer(f"{prompt} {letter}", add_special_tokens=False)["input_ids"] == [*prompt_ids, label]


def test_a_label_split_into_two_tokens_after_answer_is_refused(tmp_path):
    """The synthetic tokenizer has ' A'..' D' after 'Answer:' and splits ' E' into ['Ġ', 'E']: before, a fifth
    option was scored by the bare space's logit (a probe: arc_e accuracy 0.214 where its own token gives 0.286)."""
    from peft_mole.evaluation.commonsense import label_token_ids

    synthetic.write_commonsense_tasks(tmp_path, rows=8)
    tokenizer = synthetic.commonsense_tokenizer(tmp_path)
    assert tokenizer.convert_ids_to_tokens(label_token_ids(tokenizer, 4)) == ["ĠA", "ĠB", "ĠC", "ĠD"]
    with pytest.raises(ValueError, match=r"splits the option label ' E' after '.nAnswer:' into \['Ġ', 'E'\]"):
        label_token_ids(tokenizer, 5)


def test_choice_scoring_refuses_empty_rows_prompts_and_choices():
    """Was: ZeroDivisionError for no rows; 0.0 for every choice after an empty prompt; 0.0 (the best score, so it
    always won) for an empty choice."""
    from peft_mole.evaluation import choice_accuracy, choice_scores

    tokenizer = synthetic.demo_tokenizer()
    model = tiny_base(vocab_size=len(tokenizer))
    with pytest.raises(ValueError, match="rows is empty"):
        choice_accuracy(model, tokenizer, [])
    with pytest.raises(ValueError, match="prompt '' has no tokens"):
        choice_scores(model, tokenizer, "", [" Paris", " Rome"])
    with pytest.raises(ValueError, match=r"choices \[''\] \(at \[0\]\) have no tokens"):
        choice_scores(model, tokenizer, "Capital of Peru?\nAnswer:", ["", " Lima"])
    with pytest.raises(ValueError, match="choices is empty"):
        choice_scores(model, tokenizer, "Capital of Peru?\nAnswer:", [])
    assert choice_scores(model, tokenizer, "Capital of Peru?\nAnswer:", [" Lima", " Rome"]).shape == (2,)


def test_evaluate_adapters_example_pays_one_time_costs_before_timing(tmp_path, monkeypatch):
    """examples/evaluate_adapters.py: an evaluation with every adapter (loading `evaluate`'s metric, the first
    forward) runs before the first timer starts, so neither timed way pays it (was: the first timed call did)."""
    import importlib.util
    import sys
    from pathlib import Path
    from types import SimpleNamespace

    path = Path(__file__).resolve().parents[2] / "examples" / "evaluate_adapters.py"
    spec = importlib.util.spec_from_file_location("evaluate_adapters_example", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    events = []

    def recording_evaluate(model, tokenizer, tasks, adapters=None, batch_size=8):
        events.append(("evaluate", tuple(adapters)))
        return evaluate_commonsense(model, tokenizer, tasks, adapters=adapters, batch_size=batch_size)

    def timer():
        events.append(("timer",))
        return 0.0 if len(events) < 3 else float(len(events))

    monkeypatch.setattr(example, "evaluate_commonsense", recording_evaluate)
    monkeypatch.setattr(example, "time", SimpleNamespace(perf_counter=timer))
    monkeypatch.setattr(sys, "argv", ["evaluate_adapters.py", "--output-dir", str(tmp_path), "--limit", "4"])
    example.main()
    names = tuple(f"adapter{i}" for i in range(4))
    assert events[0] == ("evaluate", names) and events[1] == ("timer",)

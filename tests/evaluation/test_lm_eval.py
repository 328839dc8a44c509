"""lm-evaluation-harness evaluates a saved MixLoRA adapter through its `hf` model (`peft=`), offline, on a local
task: the log-likelihoods it computes are the adapter's (checked against a direct computation)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from peft import PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

import peft_mole
from peft_mole import synthetic
from tests.helpers import randomize_adapters

lm_eval = pytest.importorskip("lm_eval")

TASK = """task: mole_capitals
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{prompt}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
"""


@pytest.fixture(scope="module")
def local_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm_eval")
    tokenizer = synthetic.demo_tokenizer(save_dir=root / "base")
    synthetic.random_model("llama", "tiny", vocab_size=len(tokenizer)).save_pretrained(root / "base")
    model = get_peft_model(synthetic.random_model("llama", "tiny", vocab_size=len(tokenizer)),
                           peft_mole.MixLoRAConfig(num_experts=4, r=4))
    randomize_adapters(model, std=0.2)
    model.save_pretrained(root / "adapter")
    with open(root / "data.jsonl", "w") as f:
        for row in synthetic.multitask_rows(8, tasks=("capital",)):
            f.write(json.dumps({"prompt": row["prompt"], "choices": row["choices"],
                                "label": row["choices"].index(row["completion"])}) + "\n")
    (root / "tasks").mkdir()
    (root / "tasks" / "mole.yaml").write_text(TASK.format(data=root / "data.jsonl"))
    return root


def _evaluate(root, model_args: str):
    from lm_eval.tasks import TaskManager

    result = lm_eval.simple_evaluate(model="hf", model_args=model_args, tasks=["mole_capitals"], device="cpu",
                                     task_manager=TaskManager(include_path=str(root / "tasks")), batch_size=4,
                                     log_samples=True)
    return result["results"]["mole_capitals"]["acc,none"], result["samples"]["mole_capitals"][0]


def test_lm_eval_scores_the_adapter(local_run):
    root = local_run
    base_acc, base_sample = _evaluate(root, f"pretrained={root / 'base'}")
    acc, sample = _evaluate(root, f"pretrained={root / 'base'},peft={root / 'adapter'}")
    assert 0.0 <= acc <= 1.0 and 0.0 <= base_acc <= 1.0
    context, continuation = sample["arguments"][0]
    reported = sample["resps"][0][0][0]
    assert abs(reported - base_sample["resps"][0][0][0]) > 1e-3  # the adapter changed the scores
    # the same log-likelihood computed directly with the adapter
    tokenizer = AutoTokenizer.from_pretrained(root / "base")
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(root / "base"), root / "adapter").eval()
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    prefix = len(tokenizer(context, add_special_tokens=False)["input_ids"])
    with torch.no_grad():
        log_probs = torch.log_softmax(model(input_ids=torch.tensor([whole])).logits.float(), -1)[0]
    direct = sum(log_probs[i - 1, whole[i]].item() for i in range(prefix, len(whole)))
    assert abs(direct - reported) < 1e-4


def test_lm_eval_command_line_entry_point(local_run):
    root = local_run
    command = [sys.executable, "-m", "peft_mole.lm_eval", "--model", "hf", "--model_args",
               f"pretrained={root / 'base'},peft={root / 'adapter'}", "--tasks", "mole_capitals",
               "--include_path", str(root / "tasks"), "--device", "cpu", "--batch_size", "4", "--limit", "4"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "|mole_capitals|" in result.stdout and "acc" in result.stdout

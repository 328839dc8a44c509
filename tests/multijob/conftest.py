"""Fixtures shared by the multi-job trainer tests."""

from __future__ import annotations

import pytest
from datasets import load_dataset
from transformers import AutoTokenizer

from peft_mole import synthetic


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A tokenizer and three task datasets, written to disk and read back with the real loaders."""
    root = tmp_path_factory.mktemp("multijob")
    synthetic.demo_tokenizer(save_dir=root / "tokenizer")
    datasets = {}
    for task in ("sentiment", "capital", "add"):
        rows = [{"prompt": r["prompt"], "completion": r["completion"]} for r in synthetic.multitask_rows(24, tasks=(task,))]
        synthetic.write_jsonl(rows, root / f"{task}.jsonl")
        datasets[task] = load_dataset("json", data_files=str(root / f"{task}.jsonl"), split="train")
    return AutoTokenizer.from_pretrained(root / "tokenizer"), datasets

"""push_to_hub / from_pretrained(repo_id) through PEFT's unchanged code, against an in-process fake Hub.

The fake replaces the two network edges: `HfApi.create_repo/create_commit` (upload, as used by
transformers' PushToHubMixin) and `hf_hub_download/file_exists` (download, as used by PEFT). Everything between
— file selection, safetensors serialisation, config parsing, key remapping — is the real code.
"""

import dataclasses
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file

from tests.helpers import METHODS, batch, randomize_adapters, tiny_base


class FakeHub:
    def __init__(self, root: Path):
        self.root = root

    def create_repo(self, repo_id, **kwargs):
        (self.root / repo_id).mkdir(parents=True, exist_ok=True)
        return SimpleNamespace(repo_id=repo_id)

    def create_commit(self, repo_id, operations, **kwargs):
        for op in operations:
            target = self.root / repo_id / op.path_in_repo
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(op.path_or_fileobj, target)
        return SimpleNamespace(commit_url=f"fake://{repo_id}", oid="0" * 40)

    def hf_hub_download(self, repo_id, filename, subfolder=None, **kwargs):
        path = self.root / repo_id / (f"{subfolder}/{filename}" if subfolder else filename)
        if not path.exists():
            from huggingface_hub.errors import EntryNotFoundError

            raise EntryNotFoundError(f"{filename} not in {repo_id}")
        return str(path)

    def file_exists(self, repo_id, filename, **kwargs):
        return (self.root / repo_id / filename).exists()


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    import peft.config
    import peft.utils.save_and_load
    import transformers.utils.hub as transformers_hub

    hub = FakeHub(tmp_path / "hub")
    monkeypatch.setattr(transformers_hub, "_hf_api", hub)
    monkeypatch.setattr(peft.config, "hf_hub_download", hub.hf_hub_download)
    monkeypatch.setattr(peft.utils.save_and_load, "hf_hub_download", hub.hf_hub_download)
    monkeypatch.setattr(peft.utils.save_and_load, "file_exists", hub.file_exists)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    return hub


@pytest.mark.parametrize("method", METHODS)
def test_push_then_pull_gives_identical_logits(method, fake_hub):
    model = get_peft_model(tiny_base(), METHODS[method]())
    randomize_adapters(model)
    model.eval()
    ids, mask, _ = batch(2, 7)
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits
    model.push_to_hub(f"someone/tiny-{method}")
    files = sorted(p.name for p in (fake_hub.root / f"someone/tiny-{method}").iterdir())
    assert files == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    pulled = PeftModel.from_pretrained(tiny_base(), f"someone/tiny-{method}")
    pulled.eval()
    with torch.no_grad():
        assert torch.equal(pulled(input_ids=ids, attention_mask=mask).logits, expected)


@pytest.mark.parametrize("method", ["mixlora", "dynmole"])
def test_push_to_hub_writes_a_model_card(method, fake_hub, monkeypatch):
    import peft_mole
    import peft_mole.model_card

    monkeypatch.setattr(peft_mole.model_card, "HfApi", lambda token=None: fake_hub)
    model = get_peft_model(tiny_base(), METHODS[method]())
    randomize_adapters(model)
    model.train()
    ids, mask, labels = batch(2, 7)
    model(input_ids=ids, attention_mask=mask, labels=labels)  # router statistics of this pass go on the card
    peft_mole.add_eval_results(model, {"default": {"arc_e": 0.5, "boolq": 0.75}})
    assert peft_mole.push_to_hub(model, f"someone/card-{method}") == f"fake://someone/card-{method}"
    card = (fake_hub.root / f"someone/card-{method}" / "README.md").read_text()
    name = {"mixlora": "MixLoRA", "dynmole": "DynMoLE"}[method]
    assert f"## {name} adapter (peft-mole)" in card and "import peft_mole" in card
    header = card.split("---")[1]
    for tag in ("peft-mole", method, "peft"):
        assert f"- {tag}\n" in header, header
    assert "library_name: peft" in header
    assert "| num_experts | `4` |" in card and "| r | `4` |" in card
    assert "### Router statistics" in card and "model.layers.1.mlp" in card
    assert "| boolq | 0.7500 |" in card
    for _ in range(2):  # saving into the same folder again replaces the section, does not repeat it
        model.save_pretrained(fake_hub.root / "local")
    assert (fake_hub.root / "local" / "README.md").read_text().count("## " + name + " adapter") == 1
    with pytest.raises(ValueError, match="unknown adapter 'other'"):
        peft_mole.add_eval_results(model, {"other": {}})


def test_push_to_hub_leaves_a_local_base_model_off_the_card_and_keeps_a_hub_id(fake_hub, monkeypatch, tmp_path):
    """A base loaded from a local folder: PEFT names the folder as `base_model` (and a `base_model:adapter:` tag),
    which the Hub refuses in a commit; the pushed card names no base then. A Hub id stays."""
    from transformers import AutoModelForCausalLM

    import peft_mole
    import peft_mole.model_card

    monkeypatch.setattr(peft_mole.model_card, "HfApi", lambda token=None: fake_hub)
    tiny_base().save_pretrained(tmp_path / "base")
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    model = get_peft_model(base, METHODS["mixlora"]())
    model.save_pretrained(tmp_path / "saved")
    assert str(tmp_path / "base") in (tmp_path / "saved" / "README.md").read_text()  # what PEFT writes locally
    peft_mole.push_to_hub(model, "someone/local-base")
    header = (fake_hub.root / "someone/local-base" / "README.md").read_text().split("---")[1]
    assert "base_model" not in header and str(tmp_path) not in header and "- peft-mole\n" in header, header
    model.get_base_model().config._name_or_path = "someone/tiny-llama"  # (what PEFT writes on its card)
    peft_mole.push_to_hub(model, "someone/hub-base")
    header = (fake_hub.root / "someone/hub-base" / "README.md").read_text().split("---")[1]
    assert "base_model: someone/tiny-llama" in header, header


class RecordingApi:
    """HfApi's upload calls, recorded; create_commit answers as the Hub does (a pull request URL with create_pr)."""

    def __init__(self):
        self.calls = []

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))
        return SimpleNamespace(repo_id=repo_id)

    def create_branch(self, repo_id, **kwargs):
        self.calls.append(("create_branch", repo_id, kwargs))

    def create_commit(self, repo_id, operations, **kwargs):
        files = sorted(op.path_in_repo for op in operations)
        self.calls.append(("create_commit", repo_id, {**kwargs, "files": files}))
        pr_url = f"fake://{repo_id}/discussions/1" if kwargs.get("create_pr") else None
        return SimpleNamespace(commit_url=f"fake://{repo_id}/commit", pr_url=pr_url, oid="0" * 40)


def test_push_to_hub_commits_to_the_revision_opens_prs_and_refuses_unknown_arguments(monkeypatch):
    import peft_mole
    import peft_mole.model_card

    api = RecordingApi()
    monkeypatch.setattr(peft_mole.model_card, "HfApi", lambda token=None: api)
    model = get_peft_model(tiny_base(), METHODS["mixlora"]())
    randomize_adapters(model)
    assert peft_mole.push_to_hub(model, "me/x", revision="dev", commit_message="m") == "fake://me/x/commit"
    files = ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    assert api.calls == [
        ("create_repo", "me/x", {"private": None, "exist_ok": True}),
        ("create_branch", "me/x", {"branch": "dev", "exist_ok": True}),  # the branch is made if it is new
        ("create_commit", "me/x", {"commit_message": "m", "revision": "dev", "create_pr": False, "files": files}),
    ]
    api.calls.clear()
    assert peft_mole.push_to_hub(model, "me/x", create_pr=True) == "fake://me/x/discussions/1"
    assert [c[0] for c in api.calls] == ["create_repo", "create_commit"]  # no revision: main, no branch made
    assert api.calls[1][2]["create_pr"] is True and api.calls[1][2]["revision"] is None
    api.calls.clear()
    with pytest.raises(TypeError, match=r"unexpected keyword argument\(s\) \['privat'\]"):
        peft_mole.push_to_hub(model, "me/x", privat=True)
    assert api.calls == []  # refused before anything is created
    peft_mole.push_to_hub(model, "me/x", selected_adapters=["default"])  # save_pretrained's own arguments pass
    assert api.calls[-1][2]["files"] == files
    api.calls.clear()
    with pytest.raises(ValueError, match="safe_serialization=False, which would upload a pickle adapter_model.bin"):
        peft_mole.push_to_hub(model, "me/x", safe_serialization=False)  # (before: uploaded adapter_model.bin alone)
    assert api.calls == []


def cache_snapshot(cache: Path, repo_id: str, folder: Path) -> None:
    """`folder`'s files as huggingface_hub's cache holds a downloaded repo (blobs, a snapshot, refs/main)."""
    import hashlib

    root = cache / ("models--" + repo_id.replace("/", "--"))
    sha = hashlib.sha1(repo_id.encode()).hexdigest()
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(sha)
    for file in folder.iterdir():
        blob = root / "blobs" / hashlib.sha256(file.read_bytes()).hexdigest()
        blob.parent.mkdir(exist_ok=True)
        blob.write_bytes(file.read_bytes())
        (root / "snapshots" / sha).mkdir(parents=True, exist_ok=True)
        (root / "snapshots" / sha / file.name).symlink_to(blob)


def test_offline_a_cached_hub_repo_with_only_a_pickle_is_refused_and_one_with_safetensors_loads(tmp_path,
                                                                                                monkeypatch):
    """Offline the Hub cannot say what a repo holds, so the cache answers (before, the check gave up and PEFT
    loaded the cached pickle, which a local folder or the repo online is refused for)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    model = get_peft_model(tiny_base(), METHODS["mixlora"]())
    randomize_adapters(model)
    model.save_pretrained(tmp_path / "safe")
    shutil.copytree(tmp_path / "safe", tmp_path / "pickle")  # a pickle adapter as other tools write one (our own
    torch.save(load_file(tmp_path / "safe" / "adapter_model.safetensors"), tmp_path / "pickle" / "adapter_model.bin")
    os.remove(tmp_path / "pickle" / "adapter_model.safetensors")  # save_pretrained refuses to write it)
    assert sorted(p.name for p in (tmp_path / "pickle").iterdir()) == ["README.md", "adapter_config.json",
                                                                       "adapter_model.bin"]
    cache_snapshot(tmp_path / "cache", "owner/pickle", tmp_path / "pickle")
    cache_snapshot(tmp_path / "cache", "owner/safe", tmp_path / "safe")
    for kwargs in ({}, {"local_files_only": True}):
        with pytest.raises(ValueError, match="the Hub repo 'owner/pickle' holds only a pickle adapter_model.bin"):
            PeftModel.from_pretrained(tiny_base(), "owner/pickle", **kwargs)
    cache_snapshot(tmp_path / "own-cache", "owner/elsewhere", tmp_path / "pickle")  # in a cache_dir of the user's
    with pytest.raises(ValueError, match="the Hub repo 'owner/elsewhere' holds only a pickle adapter_model.bin"):
        PeftModel.from_pretrained(tiny_base(), "owner/elsewhere", cache_dir=str(tmp_path / "own-cache"))
    loaded = PeftModel.from_pretrained(tiny_base(), "owner/safe")
    ids, mask, _ = batch()
    model.eval()
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids, attention_mask=mask).logits,
                           model(input_ids=ids, attention_mask=mask).logits)


def test_add_eval_results_takes_what_evaluate_commonsense_returns_without_adapters(tmp_path):
    import peft_mole
    from peft_mole import synthetic
    from peft_mole.evaluation import evaluate_commonsense, format_prompt
    from peft_mole.evaluation.commonsense import Example

    tokenizer = synthetic.train_tokenizer([format_prompt("q", ["a", "b"]) + f" {c}" for c in "AB"] * 50, 300)
    model = get_peft_model(tiny_base(vocab_size=len(tokenizer)), METHODS["mixlora"]())
    scores = evaluate_commonsense(model, tokenizer, {"boolq": [Example(format_prompt("q", ["a", "b"]), 2, 0)]})
    assert list(scores) == ["model"]
    peft_mole.add_eval_results(model, scores)  # "model": the active adapter, "default"
    model.save_pretrained(tmp_path)
    assert f"| boolq | {scores['model']['boolq']:.4f} |" in (tmp_path / "README.md").read_text()
    model.add_adapter("other", METHODS["mixlora"]())
    model.base_model.set_adapter(["default", "other"])
    with pytest.raises(ValueError, match=r"active adapters \['default', 'other'\]"):
        peft_mole.add_eval_results(model, scores)  # two adapters ran: whose score is it?


@pytest.mark.parametrize(
    ("method", "settings", "rows"),
    [
        ("mixlora", dict(use_rslora=True, attn_r=2, attn_lora_alpha=4, layers_to_transform=[1]),
         ["| use_rslora | `True` |", "| attn_r | `2` |", "| attn_lora_alpha | `4` |",
          "| layers_to_transform | `[1]` |"]),
        ("mixlora", dict(modules_to_save=["lm_head"]), ["| modules_to_save | `['lm_head']` |"]),  # (since 2026-12-07)
        ("dynmole", dict(renormalize=True), ["| renormalize | `True` |", "| use_rslora | `False` |"]),
    ],
)
def test_model_card_lists_every_setting_that_changes_the_adapter(method, settings, rows, tmp_path):
    model = get_peft_model(tiny_base(), METHODS[method](**settings))
    model.save_pretrained(tmp_path)
    card = (tmp_path / "README.md").read_text()
    for row in rows:
        assert row in card, card


def test_push_to_hub_example_pushes_a_trained_looking_adapter_without_placeholder_scores(fake_hub, monkeypatch,
                                                                                         tmp_path, capsys):
    """examples/push_to_hub.py with --repo-id: the adapter's weights are not the zero-B init (so "logits identical"
    after the round trip means something), and the pushed card carries no made-up evaluation score."""
    import importlib.util
    import sys

    import peft_mole.model_card

    monkeypatch.setattr(peft_mole.model_card, "HfApi", lambda token=None: fake_hub)
    path = Path(__file__).resolve().parents[1] / "examples" / "push_to_hub.py"
    spec = importlib.util.spec_from_file_location("push_to_hub_example", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    monkeypatch.setattr(sys, "argv", ["push_to_hub.py", "--repo-id", "me/demo", "--output-dir", str(tmp_path)])
    example.main()
    printed = capsys.readouterr().out
    assert "the adapter changes the logits: True" in printed and "logits identical = True" in printed
    card = (fake_hub.root / "me/demo" / "README.md").read_text()
    assert "## MixLoRA adapter (peft-mole)" in card and "demo_task" not in card and "### Evaluation" not in card


def test_push_to_hub_lists_adapters_in_subfolders_on_the_root_card(fake_hub, monkeypatch):
    """The Hub shows the root README.md: a push of adapters saved in subfolders (`selected_adapters` without
    "default") names them there, with the line that loads each; each subfolder keeps its own card."""
    import peft_mole
    import peft_mole.model_card

    monkeypatch.setattr(peft_mole.model_card, "HfApi", lambda token=None: fake_hub)
    model = get_peft_model(tiny_base(), METHODS["mixlora"]())
    model.add_adapter("other", dataclasses.replace(METHODS["mixlora"](), top_k=1))
    peft_mole.push_to_hub(model, "someone/only-other", selected_adapters=["other"])
    repo = fake_hub.root / "someone/only-other"
    root = (repo / "README.md").read_text()
    assert '| `other` | MixLoRA | `PeftModel.from_pretrained(base, "<this repo>", subfolder="other")` |' in root
    assert "`default`" not in root and "- peft-mole\n" in root.split("---")[1]
    assert "| top_k | `1` |" in (repo / "other" / "README.md").read_text()
    peft_mole.push_to_hub(model, "someone/both", selected_adapters=["default", "other"])
    peft_mole.push_to_hub(model, "someone/both", selected_adapters=["default", "other"])
    root = (fake_hub.root / "someone/both" / "README.md").read_text()
    assert root.count("## MixLoRA adapter (peft-mole)") == 1 and root.count("## Adapters in subfolders") == 1
    assert "| top_k | `2` |" in root and '| `other` | MixLoRA |' in root
    pushed = PeftModel.from_pretrained(tiny_base(), str(fake_hub.root / "someone/both"), subfolder="other")
    assert pushed.peft_config["default"].top_k == 1


def test_a_lora_jobs_evaluation_reaches_its_card(tmp_path):
    """A multi-job LoRA job's scores (`add_eval_results` takes them) were dropped from its card before 2026-12-08:
    its card had PEFT's metadata only."""
    from peft import LoraConfig

    import peft_mole
    from peft_mole.multijob import MultiJobModel

    model = MultiJobModel(tiny_base(), {"a": LoraConfig(r=2, target_modules=["q_proj"])})
    peft_mole.add_eval_results(model, {"a": {"boolq": 0.75}})
    for _ in range(2):  # a second save replaces the table
        model.save_job("a", str(tmp_path))
    card = (tmp_path / "README.md").read_text()
    assert card.count("| boolq | 0.7500 |") == 1 and "- peft-mole\n" in card.split("---")[1]

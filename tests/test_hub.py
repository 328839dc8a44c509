"""push_to_hub / from_pretrained(repo_id) through PEFT's unchanged code, against an in-process fake Hub.

The fake replaces the two network edges: `HfApi.create_repo/create_commit` (upload, as used by
transformers' PushToHubMixin) and `hf_hub_download/file_exists` (download, as used by PEFT). Everything between
— file selection, safetensors serialisation, config parsing, key remapping — is the real code.
"""

import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from peft import PeftModel, get_peft_model

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

"""Check that MoE-PEFT and the `mixlora` package load a peft-mole export and compute the same logits.

    .venv/bin/python bench/peers/check_export.py make  build/export-check            # peft-mole side
    /work/peers-venv/bin/python bench/peers/check_export.py check build/export-check  # MoE-PEFT + mixlora side

`make` builds a random MixLoRA adapter on each fixture's tiny base (tests/fixtures/moe_peft_mixlora/base, a Llama;
tests/fixtures/mixlora_package/base, a Qwen2), records peft-mole's logits and exports the adapters (flavour
"moe-peft" and "mixlora"); `check` loads them with MoE-PEFT's `load_adapter` and with the package's
`load_adapter_weights` + `inject_adapter_in_model`, and prints one JSON line each with the largest logit difference.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

FIXTURES = Path(__file__).resolve().parents[2] / "tests" / "fixtures"
FIXTURE = FIXTURES / "moe_peft_mixlora"
PACKAGE_FIXTURE = FIXTURES / "mixlora_package"


def make(out: Path) -> None:
    _make(out / "moe-peft", FIXTURE, "moe-peft")
    _make(out / "mixlora", PACKAGE_FIXTURE, "mixlora")


def _make(out: Path, fixture: Path, flavour: str) -> None:
    from peft import get_peft_model
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    import peft_mole
    from peft_mole.interop import export_moe_peft

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(fixture / "base"),
                           peft_mole.MixLoRAConfig(num_experts=4, top_k=2, r=4, lora_alpha=8, lora_dropout=0.0))
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.1)
    model.eval()
    model.save_pretrained(out / "ours")
    ids = torch.tensor(json.loads((fixture / "input_ids.json").read_text()))
    with torch.no_grad():
        save_file({"logits": model(input_ids=ids).logits.contiguous()}, str(out / "ours_logits.safetensors"))
    export_moe_peft(str(out / "ours"), str(out / "exported"), flavour=flavour, act_fn="silu")


def check(out: Path) -> None:
    check_moe_peft(out / "moe-peft")
    check_mixlora_package(out / "mixlora")


def check_mixlora_package(out: Path) -> None:
    from make_mixlora_fixture import package_logits
    from safetensors.torch import load_file

    ids = torch.tensor(json.loads((PACKAGE_FIXTURE / "input_ids.json").read_text()))
    theirs = package_logits(PACKAGE_FIXTURE / "base", out / "exported", ids)
    ours = load_file(str(out / "ours_logits.safetensors"))["logits"]
    print(json.dumps({"name": "mixlora_package_export_check", "max_abs_logit_diff": (theirs - ours).abs().max().item()}))


def check_moe_peft(out: Path) -> None:
    import moe_peft
    from make_moe_peft_fixture import ADAPTER, load_base, moe_peft_logits
    from moe_peft.models import from_pretrained as moe_peft_wrap
    from safetensors.torch import load_file

    model = moe_peft.LLMModel(moe_peft_wrap(load_base(FIXTURE / "base"), attn_impl="eager", device="cpu"))
    model.load_adapter(str(out / "exported"), ADAPTER)
    ids = json.loads((FIXTURE / "input_ids.json").read_text())
    theirs = moe_peft_logits(model, ids)
    ours = load_file(str(out / "ours_logits.safetensors"))["logits"]
    print(json.dumps({"name": "moe_peft_export_check", "max_abs_logit_diff": (theirs - ours).abs().max().item()}))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    {"make": make, "check": check}[sys.argv[1]](Path(sys.argv[2]))

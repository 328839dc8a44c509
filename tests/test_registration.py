"""What tools that never import peft_mole see, and what they see after the import (fresh processes)."""

import subprocess
import sys
import textwrap

import pytest
from peft import get_peft_model
from transformers import AutoModelForCausalLM

from tests.helpers import dynmole, mixlora, tiny_base

TYPES = {"mixlora": ("PEFT_MOLE_MIXLORA", "MixLoRAModel"), "dynmole": ("PEFT_MOLE_DYNMOLE", "DynMoLEModel")}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A base model saved to a local folder, loaded back by path, and a MixLoRA adapter trained on it."""
    root = tmp_path_factory.mktemp("registration")
    tiny_base().save_pretrained(root / "base")
    base = AutoModelForCausalLM.from_pretrained(root / "base")
    get_peft_model(base, mixlora()).save_pretrained(root / "mixlora")
    base = AutoModelForCausalLM.from_pretrained(root / "base")
    get_peft_model(base, dynmole()).save_pretrained(root / "dynmole")
    return root


def run(script: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("method", TYPES)
def test_without_import_peft_fails_naming_the_package(method, saved):
    result = run(f"""
        from peft import AutoPeftModelForCausalLM
        AutoPeftModelForCausalLM.from_pretrained({str(saved / method)!r})
    """)
    assert result.returncode != 0
    assert f"KeyError: '{TYPES[method][0]}'" in result.stderr


@pytest.mark.parametrize("method", TYPES)
def test_after_import_auto_peft_model_loads(method, saved):
    peft_type, tuner = TYPES[method]
    result = run(f"""
        import peft_mole
        from peft import AutoPeftModelForCausalLM, PeftConfig, PeftType

        config = PeftConfig.from_pretrained({str(saved / method)!r})
        assert config.peft_type == PeftType.{peft_type}, config.peft_type
        assert config.base_model_name_or_path == {str(saved / "base")!r}
        model = AutoPeftModelForCausalLM.from_pretrained({str(saved / method)!r})
        print(type(model.base_model).__name__)
    """)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == tuner

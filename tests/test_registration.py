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


@pytest.fixture(scope="module")
def without_import(saved) -> dict[str, str]:
    """{method: the error AutoPeftModelForCausalLM raises on its adapter}, in one fresh process that never imports
    peft_mole."""
    result = run(f"""
        from peft import AutoPeftModelForCausalLM
        for method in {list(TYPES)!r}:
            try:
                AutoPeftModelForCausalLM.from_pretrained({str(saved)!r} + "/" + method)
                print(method, "loaded")
            except Exception as error:
                print(method, f"{{type(error).__name__}}: {{error}}")
    """)
    assert result.returncode == 0, result.stderr[-3000:]
    return dict(line.split(" ", 1) for line in result.stdout.strip().splitlines() if line.split(" ")[0] in TYPES)


@pytest.fixture(scope="module")
def after_import(saved) -> dict[str, str]:
    """{method: the tuner's class name AutoPeftModelForCausalLM loads its adapter with}, in one fresh process after
    `import peft_mole`, each config checked on the way."""
    checks = "".join(f"""
        config = PeftConfig.from_pretrained({str(saved / method)!r})
        assert config.peft_type == PeftType.{peft_type}, config.peft_type
        assert config.base_model_name_or_path == {str(saved / "base")!r}
        model = AutoPeftModelForCausalLM.from_pretrained({str(saved / method)!r})
        print({method!r}, type(model.base_model).__name__)
    """ for method, (peft_type, _) in TYPES.items())
    result = run("""
        import peft_mole
        from peft import AutoPeftModelForCausalLM, PeftConfig, PeftType
    """ + checks)
    assert result.returncode == 0, result.stderr[-3000:]
    return dict(line.split(" ", 1) for line in result.stdout.strip().splitlines() if line.split(" ")[0] in TYPES)


@pytest.mark.parametrize("method", TYPES)
def test_without_import_peft_fails_naming_the_package(method, without_import):
    assert without_import[method] == f"KeyError: '{TYPES[method][0]}'"


@pytest.mark.parametrize("method", TYPES)
def test_after_import_auto_peft_model_loads(method, after_import):
    assert after_import[method] == TYPES[method][1]


def test_a_reloaded_module_registers_its_classes_again_and_a_clash_is_refused():
    """`importlib.reload` (a notebook's autoreload) makes new classes of the same module and name: they replace the
    registered ones (before 2026-12-07 PEFT's KeyError "There is already PEFT method called ..."). Another module's
    class under the name is refused."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING

    from peft_mole import MixLoRAConfig
    from peft_mole.registration import register_method
    from peft_mole.tuners.mixlora.model import MixLoRAModel

    peft_type = MixLoRAConfig().peft_type
    reloaded = type("MixLoRAConfig", (MixLoRAConfig,), {"__module__": MixLoRAConfig.__module__})
    reloaded.__qualname__ = MixLoRAConfig.__qualname__
    try:
        assert register_method("peft_mole_mixlora", reloaded, MixLoRAModel, MixLoRAModel.prefix) is peft_type
        assert PEFT_TYPE_TO_CONFIG_MAPPING[peft_type] is reloaded
        other = type("MixLoRAConfig", (MixLoRAConfig,), {"__module__": "someone_else"})
        with pytest.raises(KeyError, match="There is already PEFT method called 'peft_mole_mixlora'"):
            register_method("peft_mole_mixlora", other, MixLoRAModel, MixLoRAModel.prefix)
        foreign_tuner = type("Foreign", (MixLoRAModel,), {"__module__": "someone_else"})  # (beside the reloaded config)
        with pytest.raises(KeyError, match="There is already PEFT method called 'peft_mole_mixlora'"):
            register_method("peft_mole_mixlora", reloaded, foreign_tuner, MixLoRAModel.prefix)
        assert PEFT_TYPE_TO_TUNER_MAPPING[peft_type] is MixLoRAModel
    finally:
        PEFT_TYPE_TO_CONFIG_MAPPING[peft_type], PEFT_TYPE_TO_TUNER_MAPPING[peft_type] = MixLoRAConfig, MixLoRAModel


def test_the_package_and_the_gpu_tests_import_without_datasets_trl_or_evaluate():
    """The GPU machines' image has torch, transformers and peft but no `datasets`, `trl` or `evaluate`: `import
    peft_mole`, an adapter made from it, the models the benches build, and the GPU test files must not need them
    (`jobs.py` imported `datasets` at the top from 2026-12-05, which would have failed every part of a GPU run;
    a review found it, 2026-12-07)."""
    result = run("""
        import importlib, importlib.abc, os, sys
        class Refuse(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name.split(".")[0] in ("datasets", "trl", "evaluate"):
                    raise ModuleNotFoundError(f"No module named {name!r} (as on the GPU image)")
        sys.meta_path.insert(0, Refuse())
        sys.path[:0] = [os.getcwd(), os.path.join(os.getcwd(), "bench")]
        import peft_mole, common
        from peft import get_peft_model
        from tests.helpers import tiny_base
        get_peft_model(tiny_base(), peft_mole.MixLoRAConfig(num_experts=4))
        for name in sorted(os.listdir("tests/gpu")):
            if name.startswith("test_") and name.endswith(".py"):
                importlib.import_module("tests.gpu." + name[:-3])
        print("imported")
    """)
    assert result.returncode == 0 and "imported" in result.stdout, result.stderr[-3000:]

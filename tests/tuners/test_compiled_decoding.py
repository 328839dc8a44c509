"""Decoding under torch.compile: `generate` with a static cache and a `CompileConfig` compiles each decoding step
of a MixLoRA / MixDoRA / DynMoLE model to one graph (no graph break: `fullgraph=True`), with the eager model's
tokens and logits. One graph per step is what lets CUDA graphs (`mode="reduce-overhead"`) replay it on a GPU
(tests/gpu/test_cuda_paths.py runs that). Up to `FEW_TOKENS_COMPILED` rows take the slot path there, also those
that decode through dispatch eagerly (more than `FEW_TOKENS`)."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from transformers import CompileConfig

from peft_mole.ops.experts import FEW_TOKENS, FEW_TOKENS_COMPILED
from peft_mole.tuners.mixlora import layer as layer_module
from peft_mole.tuners.mixlora import projection as projection_module
from tests.helpers import METHODS, compile_config, randomize_adapters, recording_backend, tiny_base

NEW_TOKENS = 5


def generate(model, ids, config: CompileConfig | None):
    extra = {} if config is None else {"cache_implementation": "static", "compile_config": config}
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                             min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0, return_dict_in_generate=True,
                             output_logits=True, **extra)
    return out.sequences, torch.stack(out.logits)


def adapted(method: str):
    model = get_peft_model(tiny_base(), METHODS[method]())
    randomize_adapters(model, std=0.2)  # sharp and flat routers both occur; B ≠ 0
    return model.eval()


@pytest.mark.parametrize("rows", [2, 80], ids=["few_rows", "rows_that_dispatch_eagerly"])
@pytest.mark.parametrize("method", ["mixlora", "mixdora", "dynmole", "dynmole-projection"])
def test_decoding_step_compiles_to_one_graph_with_the_eager_results(method, rows, monkeypatch):
    assert (rows <= FEW_TOKENS) == (rows == 2) and rows <= FEW_TOKENS_COMPILED  # 80 rows dispatch only when eager
    model = adapted(method)
    ids = torch.randint(3, 500, (rows, 6), generator=torch.Generator().manual_seed(0))
    graphs = []
    eager_tokens, eager_logits = generate(model, ids, None)

    def only_eagerly(real):  # the prefill runs eagerly and may dispatch
        def call(*args, **kwargs):
            if torch.compiler.is_compiling():
                raise AssertionError("a compiled decoding step left the slot path")
            return real(*args, **kwargs)
        return call

    for module in (layer_module, projection_module):  # compiled, every step takes the slot path: neither the dense
        for name in ("dense_weights", "dispatch"):  # choice nor dispatch is traced (tracing them would raise)
            monkeypatch.setattr(module, name, only_eagerly(getattr(module, name)))
    tokens, logits = generate(model, ids, compile_config(recording_backend(graphs)))
    assert len(graphs) >= 1  # the decoding steps ran compiled (fullgraph=True raises on any graph break)
    torch.testing.assert_close(logits, eager_logits, atol=2e-5, rtol=2e-5)
    assert torch.equal(tokens, eager_tokens)


def test_decoding_compiled_by_inductor_gives_the_eager_tokens():
    """The default backend, code generated and run on the CPU."""
    model = adapted("mixlora")
    ids = torch.randint(3, 500, (2, 6), generator=torch.Generator().manual_seed(1))
    eager_tokens, eager_logits = generate(model, ids, None)
    tokens, logits = generate(model, ids, compile_config("inductor"))
    torch.testing.assert_close(logits, eager_logits, atol=1e-4, rtol=1e-4)
    assert torch.equal(tokens, eager_tokens)


@pytest.mark.parametrize("method", ["mixlora", "dynmole"])
def test_mixed_adapter_decoding_compiles_to_one_graph(method):
    """One adapter per row (`adapter_names`), as PEFT serves several adapters in one batch: still one graph per
    step, and each row's tokens are those of its adapter alone, decoded eagerly."""
    model = get_peft_model(tiny_base(), METHODS[method]())
    model.add_adapter("other", METHODS[method](num_experts=3))
    model.base_model.set_adapter(["default", "other"])
    randomize_adapters(model, std=0.2)
    model.base_model.set_adapter("default")
    model.eval()
    ids = torch.randint(3, 500, (3, 6), generator=torch.Generator().manual_seed(2))
    names = ["default", "other", "__base__"]
    graphs = []
    config = compile_config(recording_backend(graphs))
    with torch.no_grad():
        mixed = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                               min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0, adapter_names=names,
                               cache_implementation="static", compile_config=config)
    assert len(graphs) >= 1
    for row, name in enumerate(names):
        if name == "__base__":
            with model.disable_adapter():
                alone, _ = generate(model, ids[row:row + 1], None)
        else:
            model.set_adapter(name)
            alone, _ = generate(model, ids[row:row + 1], None)
        assert torch.equal(mixed[row:row + 1], alone), name

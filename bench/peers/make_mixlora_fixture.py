"""Write a MixLoRA fixture whose reference logits come from the `mixlora` package (PyPI `mixlora` 0.2.3).

Run with the peers virtualenv, not the project's (the package needs transformers < 5):
    /work/peers-venv/bin/pip install --no-deps mixlora==0.2.3
    /work/peers-venv/bin/python bench/peers/make_mixlora_fixture.py [--out tests/fixtures/mixlora_package]

The `mixlora` package is inference-only: it reads an adapter folder (adapter_config.json + a pickle
adapter_model.bin, `torch.load(weights_only=True)`) and patches a transformers model in place
(`inject_adapter_in_model`). It cannot create or save adapters, so the adapter here is written by this script in
the package's format with N(0, 0.1^2) tensors, on a tiny random Qwen2 (attention biases on; the package treats
qwen2 like llama) and with `use_rslora` (scaling alpha / sqrt(r)), both paths the MoE-PEFT fixture does not cover.

Quirks of the package, handled here and noted in MOE_PEFT_FORMAT.md:
* `act_fn` must be in adapter_config.json (the package does not fall back to the model's hidden_act);
* `lora_dropout` must be > 0 and the expert LoRAs live in a plain dict, so `model.eval()` does not reach them:
  the reference forward puts each expert LoRA in eval mode by hand;
* expert LoRAs take r / lora_alpha from the top level; an `expert_lora` section is ignored (so none is written).

Writes: base/ (transformers save_pretrained), adapter/adapter_config.json, adapter/adapter_model.bin,
input_ids.json and reference_logits.safetensors (key "logits", the package's forward, no dropout).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import shutil
from pathlib import Path

import mixlora
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

REPO = Path(__file__).resolve().parents[2]
INPUT_IDS = [[1, 17, 42, 99, 5, 63, 120, 7], [1, 88, 3, 27, 101, 54, 9, 77]]
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
EXPERTS = ["gate_proj", "up_proj", "down_proj"]
ADAPTER_CONFIG = {
    "bias": "none", "peft_type": "MIXLORA", "r": 4, "lora_alpha": 8, "lora_dropout": 0.05, "use_rslora": True,
    "target_modules": ATTENTION + EXPERTS, "routing_strategy": "mixlora", "num_experts": 3, "top_k": 2,
    "act_fn": "silu", "base_model_name_or_path": "base", "task_type": "CAUSAL_LM",
}


def tiny_qwen2() -> Qwen2ForCausalLM:
    config = Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128, max_position_embeddings=64, tie_word_embeddings=False)
    torch.manual_seed(0)
    return Qwen2ForCausalLM(config)


def adapter_tensors(model: Qwen2ForCausalLM, cfg: dict) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(4321)
    r, out = cfg["r"], {}

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=gen) * 0.1

    for layer_idx, layer in enumerate(model.model.layers):
        prefix = f"mixlora.layers.{layer_idx}"
        out[f"{prefix}.mlp.moe_gate.weight"] = rand(cfg["num_experts"], model.config.hidden_size)
        for proj in ATTENTION:
            linear = getattr(layer.self_attn, proj)
            out[f"{prefix}.self_attn.{proj}.lora_A.weight"] = rand(r, linear.in_features)
            out[f"{prefix}.self_attn.{proj}.lora_B.weight"] = rand(linear.out_features, r)
        for proj in EXPERTS:
            linear = getattr(layer.mlp, proj)
            for expert in range(cfg["num_experts"]):
                out[f"{prefix}.mlp.{proj}.experts.{expert}.lora_A.weight"] = rand(r, linear.in_features)
                out[f"{prefix}.mlp.{proj}.experts.{expert}.lora_B.weight"] = rand(linear.out_features, r)
    return out


def package_logits(base_dir: Path, adapter_dir: Path, ids: torch.Tensor) -> torch.Tensor:
    """The package's own loader and forward, every LoRA in eval mode (no dropout)."""
    model = AutoModelForCausalLM.from_pretrained(base_dir, torch_dtype=torch.float32, attn_implementation="eager")
    config, weights = mixlora.load_adapter_weights(str(adapter_dir), device="cpu", dtype=torch.float32)
    mixlora.inject_adapter_in_model(model, config, weights)
    model.eval()
    for layer in model.model.layers:
        for moe in layer.mlp.mixlora_moes.values():
            for lora in moe.experts_.values():
                lora.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=str(REPO / "tests" / "fixtures" / "mixlora_package"))
    args = parser.parse_args()
    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    (out / "adapter").mkdir(parents=True)
    torch.set_num_threads(2)
    ids = torch.tensor(INPUT_IDS, dtype=torch.long)

    base = tiny_qwen2()
    base.save_pretrained(out / "base", safe_serialization=True)
    (out / "adapter" / "adapter_config.json").write_text(json.dumps(ADAPTER_CONFIG, indent=4) + "\n")
    torch.save(adapter_tensors(base, ADAPTER_CONFIG), out / "adapter" / "adapter_model.bin")

    reference = package_logits(out / "base", out / "adapter", ids)
    again = package_logits(out / "base", out / "adapter", ids)
    assert torch.equal(reference, again), "the package's forward is not deterministic with dropout in eval mode"
    with torch.no_grad():
        plain = AutoModelForCausalLM.from_pretrained(out / "base", torch_dtype=torch.float32)(input_ids=ids).logits
    base_gap = (plain - reference).abs().max().item()
    assert base_gap > 1e-2, f"reference logits are too close to the base model's ({base_gap})"

    (out / "input_ids.json").write_text(json.dumps(INPUT_IDS) + "\n")
    save_file({"logits": reference.contiguous()}, str(out / "reference_logits.safetensors"), metadata={
        "producer": "mixlora " + importlib.metadata.version("mixlora"), "torch": torch.__version__,
        "transformers": importlib.metadata.version("transformers"),
        "forward": "mixlora.load_adapter_weights + inject_adapter_in_model, model and expert LoRAs in eval mode",
    })
    total = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    assert total < 1_000_000, f"fixture is {total} bytes"
    print(json.dumps({"fixture": os.path.relpath(out, REPO), "bytes": total,
                      "adapter_tensors": len(torch.load(out / "adapter" / "adapter_model.bin", weights_only=True)),
                      "base_vs_reference_max_abs": base_gap}, indent=1))


if __name__ == "__main__":
    main()

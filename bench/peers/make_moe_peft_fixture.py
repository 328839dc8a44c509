"""Write a MixLoRA fixture produced by the reference implementation MoE-PEFT (moe_peft 2.0.2).

Run with the peers virtualenv, not the project's:
    /work/peers-venv/bin/python bench/peers/make_moe_peft_fixture.py [--out tests/fixtures/moe_peft_mixlora]

It builds a tiny random Llama, attaches a MixLoRA adapter through MoE-PEFT's public API, fills every adapter
tensor with N(0, 0.1^2) values (so lora_B is not zero), saves the adapter with MoE-PEFT's own saver, and writes:
    base/config.json, base/model.safetensors   the frozen model (transformers save_pretrained)
    adapter/adapter_config.json, adapter/adapter_model.bin   exactly as MoE-PEFT writes them
    input_ids.json                              2 x 7 token ids
    reference_logits.safetensors                key "logits", (2, 7, 128) fp32: MoE-PEFT's forward, no dropout

MoE-PEFT cannot be configured with lora_dropout 0 (Lora.__init__ asserts dropout > 0), and it never switches
LoRA dropout off at inference (its Lora modules live in plain dicts, and the fused attention LoRA op calls
F.dropout with training=True). The adapter is therefore saved with lora_dropout 0.05, and the reference forward
runs MoE-PEFT's non-fused operator path (efficient_operator_=False) with every Lora module put in eval mode, so
the reference logits are deterministic and dropout-free.

The script then checks, in order: the files exist and are small; the wrapped model with the freshly
initialised adapter (lora_B = 0) gives the same logits as plain transformers; the plain base model's logits differ
from the reference; MoE-PEFT's own load_adapter on the saved folder reproduces the reference; and an independent
re-implementation of the MixLoRA forward (MOE_PEFT_FORMAT.md section 3, written here on top of plain
transformers hooks) reproduces the reference.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import shutil
import types
from pathlib import Path

import moe_peft
import torch
from moe_peft.adapters import lora_config_factory
from moe_peft.models import from_pretrained as moe_peft_wrap
from moe_peft.tasks.common import CasualTask
from moe_peft.trainer import save_adapter_weight
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
from transformers.activations import ACT2FN

REPO = Path(__file__).resolve().parents[2]
ADAPTER = "adapter"  # MoE-PEFT saves into <dir>/<adapter_name>/
INPUT_IDS = [[1, 17, 42, 99, 5, 63, 120], [1, 88, 3, 27, 101, 54, 9]]
ADAPTER_DICT = {
    "name": ADAPTER,
    "task_name": "casual",
    "peft_type": "MIXLORA",
    "routing_strategy": "mixlora",
    "num_experts": 4,
    "top_k": 2,
    "r": 4,
    "lora_alpha": 8,
    "lora_dropout": 0.05,  # MoE-PEFT refuses 0.0; dropout is switched off for the reference forward
    "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}


def tiny_llama() -> LlamaForCausalLM:
    config = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, vocab_size=128, max_position_embeddings=64,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


def load_base(base_dir: Path) -> LlamaForCausalLM:
    return AutoModelForCausalLM.from_pretrained(base_dir, torch_dtype=torch.float32, attn_implementation="eager")


def all_loras(model: moe_peft.LLMModel):
    for layer in model.model_.layers_:
        attn, mlp = layer.state_dict()
        for linear in [*attn.values(), *mlp.values()]:
            yield from linear.loras_.values()


def moe_peft_logits(model: moe_peft.LLMModel, ids: list[list[int]]) -> torch.Tensor:
    """MoE-PEFT forward without dropout: non-fused operators, every Lora module in eval mode."""
    for lora in all_loras(model):
        lora.eval()
    batch = moe_peft.LLMModelInput(
        batch_configs_=[moe_peft.LLMBatchConfig(adapter_name_=ADAPTER, batch_start_idx_=0, batch_end_idx_=len(ids))],
        batch_tokens_=[list(row) for row in ids],
        inference_mode_=True,
        efficient_operator_=False,
    )
    with torch.inference_mode():
        return model.forward(batch)[0].logits.detach().clone().float()


def independent_mixlora_logits(base_dir: Path, adapter_dir: Path, ids: torch.Tensor) -> torch.Tensor:
    """The forward of MOE_PEFT_FORMAT.md section 3 on plain transformers modules (no MoE-PEFT code)."""
    model = load_base(base_dir).eval()
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    w = torch.load(adapter_dir / "adapter_model.bin", map_location="cpu", weights_only=True)
    w = {k: v.detach().float() for k, v in w.items()}
    s = cfg["lora_alpha"] / cfg["r"]
    act = ACT2FN[cfg.get("act_fn") or model.config.hidden_act]
    k, n_exp = cfg["top_k"], cfg["num_experts"]

    def delta(prefix: str, x: torch.Tensor) -> torch.Tensor:
        return s * (x @ w[f"{prefix}.lora_A.weight"].T) @ w[f"{prefix}.lora_B.weight"].T

    for L, layer in enumerate(model.model.layers):
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            prefix = f"mixlora.layers.{L}.self_attn.{proj}"
            getattr(layer.self_attn, proj).register_forward_hook(
                lambda mod, inp, out, p=prefix: out + delta(p, inp[0])
            )
        mlp = layer.mlp

        def moe_forward(x, mlp=mlp, L=L):
            shape = x.shape
            x = x.reshape(-1, shape[-1])
            probs = torch.softmax(x @ w[f"mixlora.layers.{L}.mlp.moe_gate.weight"].T, dim=-1)
            top_w, top_i = probs.topk(k, dim=-1)
            top_w = top_w / top_w.sum(-1, keepdim=True)
            y = torch.zeros_like(x)
            for e in range(n_exp):
                p = f"mixlora.layers.{L}.mlp.{{}}.experts.{e}"
                h = act(mlp.gate_proj(x) + delta(p.format("gate_proj"), x)) * (
                    mlp.up_proj(x) + delta(p.format("up_proj"), x)
                )
                out = mlp.down_proj(h) + delta(p.format("down_proj"), h)
                weight = (top_w * (top_i == e)).sum(-1, keepdim=True)  # 0 where e is not in the top-k
                y = y + weight * out
            return y.reshape(shape)

        mlp.forward = moe_forward
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=str(REPO / "tests" / "fixtures" / "moe_peft_mixlora"))
    args = parser.parse_args()
    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    torch.set_num_threads(2)
    ids = torch.tensor(INPUT_IDS, dtype=torch.long)

    # 1. base model, saved then re-read so everything below uses exactly the saved weights
    tiny_llama().save_pretrained(out / "base", safe_serialization=True)
    base_dir = out / "base"
    hf = load_base(base_dir)
    hf.config._name_or_path = "base"  # recorded by MoE-PEFT as base_model_name_or_path (relative to the fixture)
    model = moe_peft.LLMModel(moe_peft_wrap(hf, attn_impl="eager", device="cpu"))

    # 2. MixLoRA adapter through MoE-PEFT's config factory; check the freshly initialised one is a no-op
    config = lora_config_factory(dict(ADAPTER_DICT))
    model.init_adapter(config)
    with torch.no_grad():
        plain = load_base(base_dir)(input_ids=ids).logits.float()
    init_gap = (moe_peft_logits(model, INPUT_IDS) - plain).abs().max().item()
    assert init_gap < 1e-5, f"MoE-PEFT wrapper with lora_B = 0 differs from transformers by {init_gap}"

    # 3. random adapter tensors (gate included), then MoE-PEFT's own saver
    gen = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for _, param in sorted(model.get_adapter_weight_dict(ADAPTER).items()):
            param.copy_(torch.randn(param.shape, generator=gen) * 0.1)
    save_adapter_weight(model, types.SimpleNamespace(adapter_name=ADAPTER, task_=CasualTask()), str(out))

    # 4. reference logits and inputs
    ref = moe_peft_logits(model, INPUT_IDS)
    (out / "input_ids.json").write_text(json.dumps(INPUT_IDS) + "\n")
    save_file({"logits": ref.contiguous()}, str(out / "reference_logits.safetensors"), metadata={
        "producer": "moe_peft " + importlib.metadata.version("moe_peft"),
        "torch": torch.__version__,
        "forward": "LLMModel.forward, inference_mode_=True, efficient_operator_=False, Lora modules in eval (no dropout)",
        "adapter_tensor_init": "normal std 0.1, torch.Generator seed 1234, sorted key order",
    })

    # 5. checks
    expected = ["base/config.json", "base/model.safetensors", "adapter/adapter_config.json",
                "adapter/adapter_model.bin", "input_ids.json", "reference_logits.safetensors"]
    for rel in expected:
        assert (out / rel).is_file(), f"missing {rel}"
    total = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    assert total < 1_000_000, f"fixture is {total} bytes"
    base_gap = (plain - ref).abs().max().item()
    assert base_gap > 1e-2, f"reference logits are too close to the base model's ({base_gap})"

    fresh = moe_peft.LLMModel(moe_peft_wrap(load_base(base_dir), attn_impl="eager", device="cpu"))
    fresh.load_adapter(str(out / ADAPTER), ADAPTER)
    reload_gap = (moe_peft_logits(fresh, INPUT_IDS) - ref).abs().max().item()
    assert reload_gap < 1e-5, f"MoE-PEFT load_adapter of the saved folder differs by {reload_gap}"

    spec_gap = (independent_mixlora_logits(base_dir, out / ADAPTER, ids) - ref).abs().max().item()
    assert spec_gap < 1e-4, f"independent MixLoRA forward differs from MoE-PEFT by {spec_gap}"

    print(json.dumps({
        "fixture": os.path.relpath(out, REPO), "bytes": total, "files": sorted(
            str(f.relative_to(out)) for f in out.rglob("*") if f.is_file()),
        "adapter_tensors": len(torch.load(out / ADAPTER / "adapter_model.bin", weights_only=True)),
        "max_abs_diff": {"init_adapter_vs_transformers": init_gap, "base_vs_reference": base_gap,
                         "reload_vs_reference": reload_gap, "independent_forward_vs_reference": spec_gap},
    }, indent=1))


if __name__ == "__main__":
    main()

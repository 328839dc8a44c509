"""Train-step time of the `mixlora` package's MixLoRA (PyPI `mixlora` 0.2.3) / PEFT LoRA, BENCH 'small' shape.

Run with the peers virtualenv, not the project's:
    /work/peers-venv/bin/pip install --no-deps mixlora==0.2.3 peft==0.13.2
    /work/peers-venv/bin/python bench/peers/mixlora_package_step.py [--repeats 10]

The package is inference-only: `inject_adapter_in_model` patches a transformers Llama with weights given as a
dict. Training here makes those weights leaves with requires_grad (the expert and attention LoRA factors are
nn.Linear parameters inside the package's LoraLinear, the router gate is the given tensor) and steps AdamW over
them; the loss is transformers' causal-LM loss (the package has no router aux loss). Settings as
bench/mixlora_vs_lora.py: 8 experts, top-2, r 16, alpha 32, dropout 0.05 (the package refuses 0), expert LoRA on
gate/up/down, attention LoRA on q,k,v,o; PEFT LoRA r 16 on the same seven projections. 3 warm-up then `repeats`
timed steps, the two alternating. Prints JSON lines (`train_step` per impl and `mixlora_package_vs_lora`).
"""

from __future__ import annotations

import argparse
import copy
import importlib.metadata
import json
import math
import platform
import statistics
import time

import mixlora
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

SMALL = dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8,
             num_key_value_heads=8, vocab_size=4096, max_position_embeddings=512,
             pad_token_id=0, bos_token_id=1, eos_token_id=2)
BATCH, SEQ = 4, 256
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
EXPERTS = ["gate_proj", "up_proj", "down_proj"]
ADAPTER = {"bias": "none", "peft_type": "MIXLORA", "r": 16, "lora_alpha": 32, "lora_dropout": 0.05,
           "target_modules": ATTENTION + EXPERTS, "routing_strategy": "mixlora", "num_experts": 8, "top_k": 2,
           "act_fn": "silu", "base_model_name_or_path": "random-small", "task_type": "CAUSAL_LM"}


def package_model(hf: LlamaForCausalLM) -> tuple[LlamaForCausalLM, list[torch.Tensor]]:
    """A copy of `hf` with the package's MixLoRA injected; returns it and its trainable tensors."""
    model = copy.deepcopy(hf).requires_grad_(False)
    config = mixlora.MixLoraConfig.from_config(dict(ADAPTER))
    config.adapter_name_, config.dtype_ = "default", torch.float32
    config.check()
    weights, r = {}, ADAPTER["r"]
    for idx, layer in enumerate(model.model.layers):
        prefix = f"mixlora.layers.{idx}"
        weights[f"{prefix}.mlp.moe_gate.weight"] = (torch.randn(8, SMALL["hidden_size"]) * 0.02).requires_grad_()
        named = [(f"{prefix}.self_attn.{p}", getattr(layer.self_attn, p)) for p in ATTENTION]
        named += [(f"{prefix}.mlp.{p}.experts.{e}", getattr(layer.mlp, p)) for p in EXPERTS for e in range(8)]
        for name, linear in named:
            a = torch.empty(r, linear.in_features)
            torch.nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            weights[f"{name}.lora_A.weight"], weights[f"{name}.lora_B.weight"] = a, torch.zeros(linear.out_features, r)
    mixlora.inject_adapter_in_model(model, config, weights)
    params = [p for p in model.parameters() if p.requires_grad]  # attention LoraLinear (registered submodules)
    for layer in model.model.layers:
        moe = layer.mlp.mixlora_moes["default"]
        params.append(moe.gate_)
        for lora in moe.experts_.values():  # kept in a plain dict, so not in model.parameters()
            params += [lora.lora_A.weight, lora.lora_B.weight]
    return model, params


def step_fn(model, params: list[torch.Tensor], ids: torch.Tensor):
    optimizer = torch.optim.AdamW(params, lr=1e-4)

    def step() -> None:
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (mole_vs_reference passes its own)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(**SMALL))
    ids = torch.randint(3, SMALL["vocab_size"], (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    package, package_params = package_model(hf)
    lora = get_peft_model(copy.deepcopy(hf), LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05,
                                                        target_modules=ATTENTION + EXPERTS))
    lora_params = [p for p in lora.parameters() if p.requires_grad]
    package.train(), lora.train()
    steps = {"mixlora_package": step_fn(package, package_params, ids), "peft_lora": step_fn(lora, lora_params, ids)}
    n_params = {"mixlora_package": sum(p.numel() for p in package_params),
                "peft_lora": sum(p.numel() for p in lora_params)}
    times: dict[str, list[float]] = {name: [] for name in steps}
    for i in range(args.warmup + args.repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            if i >= args.warmup:
                times[name].append(time.perf_counter() - start)
    versions = {k: importlib.metadata.version(k) for k in ("mixlora", "peft", "transformers")}
    for name, secs in times.items():
        print(json.dumps({"name": "train_step", "impl": name, "shape": "small", "median_s": statistics.median(secs),
                          "min_s": min(secs), "steps": len(secs), "tokens_per_s": BATCH * SEQ / statistics.median(secs),
                          "trainable_params": n_params[name], "device": "cpu", "machine": platform.node(),
                          "torch": torch.__version__, **versions, "threads": torch.get_num_threads(),
                          "attention": hf.config._attn_implementation}), flush=True)
    mix, base = times["mixlora_package"], times["peft_lora"]
    print(json.dumps({"name": "mixlora_package_vs_lora", "shape": "small",
                      "ratio_median": statistics.median(mix) / statistics.median(base),
                      "ratio_min": min(mix) / min(base)}), flush=True)


if __name__ == "__main__":
    main()

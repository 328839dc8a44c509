"""Train-step time of the reference implementation MoE-PEFT (moe_peft 2.0.2): MixLoRA / LoRA, BENCH 'small' shape.

Run with the peers virtualenv, not the project's:
    /work/peers-venv/bin/python bench/peers/moe_peft_step.py [--repeats 10] [--checkpoint none|recompute]

Same settings as bench/mixlora_vs_lora.py: LlamaConfig hidden 512, intermediate 1376, 4 layers, 8 heads, 8 kv heads,
vocab 4096; batch 4 x 256 random tokens (ids 3..4095, seed 0). LoRA r 16, alpha 32, dropout 0.05 on
q,k,v,o,gate,up,down. MixLoRA 8 experts, top-2, same r/alpha/dropout, expert LoRA on gate/up/down, attention LoRA
on q,k,v,o. Step = MoE-PEFT's LLMModel.forward with labels (its causal-LM loss, plus MixLoRA's router aux loss as
its trainer adds it) + backward + torch AdamW (lr 1e-4) over the adapter tensors. Each adapter sits on its own
LLMModel (a MixLoRA adapter on the same model would send LoRA batches through the MoE feed-forward path).
MoE-PEFT's fused LoRA operator is on (its default). Its trainer uses gradient_checkpoint "recompute"; the default
here is "none", as in the project's benchmark. 3 warm-up then `repeats` timed steps, the two alternating.
"""

from __future__ import annotations

import argparse
import copy
import importlib.metadata
import json
import platform
import statistics
import time

import moe_peft
import torch
from moe_peft.adapters import lora_config_factory
from moe_peft.models import from_pretrained as moe_peft_wrap
from transformers import LlamaConfig, LlamaForCausalLM

SMALL = dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8,
             num_key_value_heads=8, vocab_size=4096, max_position_embeddings=512,
             pad_token_id=0, bos_token_id=1, eos_token_id=2)
BATCH, SEQ = 4, 256
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ADAPTERS = {
    "moe_peft_lora": {"peft_type": "LORA", "r": 16, "lora_alpha": 32, "lora_dropout": 0.05,
                      "target_modules": TARGETS},
    "moe_peft_mixlora": {"peft_type": "MIXLORA", "routing_strategy": "mixlora", "num_experts": 8, "top_k": 2,
                         "r": 16, "lora_alpha": 32, "lora_dropout": 0.05, "target_modules": TARGETS},
}


def emit(row: dict) -> None:
    print(json.dumps(row), flush=True)


def build(hf: LlamaForCausalLM, name: str) -> tuple[moe_peft.LLMModel, list[torch.Tensor]]:
    model = moe_peft.LLMModel(moe_peft_wrap(copy.deepcopy(hf), attn_impl="eager", device="cpu"))
    model.init_adapter(lora_config_factory({"name": name, "task_name": "casual", **ADAPTERS[name]}))
    params = [p for p in model.get_adapter_weight_dict(name).values() if p.requires_grad]
    return model, params


def step_fn(model: moe_peft.LLMModel, name: str, params: list[torch.Tensor], ids: list[list[int]], ckpt: str):
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    masks = [[1] * len(row) for row in ids]

    def step() -> None:
        batch = moe_peft.LLMModelInput(  # forward() consumes tokens/labels/masks, so a fresh input each step
            batch_configs_=[moe_peft.LLMBatchConfig(adapter_name_=name, batch_start_idx_=0, batch_end_idx_=len(ids))],
            batch_tokens_=ids, batch_labels_=ids, batch_masks_=masks, gradient_checkpoint_=ckpt,
        )
        out = model.forward(batch)[0]
        loss = out.loss if out.aux_loss is None else out.loss + out.aux_loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--checkpoint", default="none", choices=["none", "recompute"])
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (mole_vs_reference passes its own)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(**SMALL))
    ids = torch.randint(3, SMALL["vocab_size"], (BATCH, SEQ), generator=torch.Generator().manual_seed(0)).tolist()
    steps, n_params = {}, {}
    for name in ADAPTERS:
        model, params = build(hf, name)
        steps[name] = step_fn(model, name, params, ids, args.checkpoint)
        n_params[name] = sum(p.numel() for p in params)

    times: dict[str, list[float]] = {name: [] for name in steps}
    for i in range(args.warmup + args.repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            if i >= args.warmup:
                times[name].append(time.perf_counter() - start)

    for name, secs in times.items():
        emit({"name": "train_step", "impl": name, "shape": "small", "median_s": statistics.median(secs),
              "min_s": min(secs), "steps": len(secs), "tokens_per_s": BATCH * SEQ / statistics.median(secs),
              "trainable_params": n_params[name], "gradient_checkpoint": args.checkpoint, "device": "cpu",
              "machine": platform.node(), "torch": torch.__version__,
              "moe_peft": importlib.metadata.version("moe_peft"), "threads": torch.get_num_threads(),
              "attention": "eager"})  # (`build`: its only CPU attention)
    mix, lora = times["moe_peft_mixlora"], times["moe_peft_lora"]
    emit({"name": "moe_peft_mixlora_vs_lora", "shape": "small", "gradient_checkpoint": args.checkpoint,
          "ratio_median": statistics.median(mix) / statistics.median(lora), "ratio_min": min(mix) / min(lora),
          "params_ratio": n_params["moe_peft_mixlora"] / n_params["moe_peft_lora"]})


if __name__ == "__main__":
    main()

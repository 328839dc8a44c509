"""FSDP2 (`torch.distributed.fsdp.fully_shard`) on 2 CPU processes (gloo): MixLoRA, MixDoRA and DynMoLE adapters
are sharded like any parameter (stacked experts split on the expert axis, 3 experts over 2 processes unevenly),
train, and end with the adapters of the 1-process run on the same global batch. On CPU, accelerate turns
`--use_fsdp` into DDP (it enables FSDP on accelerators only), so this test shards with torch itself."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
from safetensors.torch import load_file

from tests.helpers import free_port

SCRIPT = textwrap.dedent('''
    import os, sys
    sys.path.insert(0, {root!r})
    import torch
    import torch.distributed as dist
    from peft import get_peft_model
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor
    from tests.helpers import batch, dynmole, mixlora, randomize_adapters, tiny_base

    out = sys.argv[1]
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if world > 1 else 0
    # the load-balance loss is not additive over batch shards (its coefficients are 0); the Tsallis entropy
    # loss is a mean over tokens, and every shard holds as many
    configs = {{"mixlora": mixlora(num_experts=3, router_aux_loss_coef=0.0),
               "mixdora": mixlora(use_dora=True, router_aux_loss_coef=0.0),
               "dynmole": dynmole(lb_loss_coef=0.0)}}
    ids, mask, labels = batch(4, 12)
    rows = slice(2 * rank, 2 * rank + 2) if world > 1 else slice(0, 4)
    for name, config in configs.items():
        torch.manual_seed(0)
        model = get_peft_model(tiny_base(), config)
        randomize_adapters(model)
        if world > 1:
            for layer in model.base_model.model.model.layers:
                fully_shard(layer)
            fully_shard(model)
        trainable = [p for p in model.parameters() if p.requires_grad]
        if world == 1:
            save_file({{k: p.detach().clone() for k, p in model.named_parameters() if p.requires_grad}},
                      f"{{out}}-{{name}}-start.safetensors")
        print(name, "sharded", all(isinstance(p, DTensor) for p in trainable))
        optimizer = torch.optim.SGD(trainable, lr=0.5)
        for _ in range(3):
            loss = model(input_ids=ids[rows], attention_mask=mask[rows], labels=labels[rows]).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        keys = {{k for k, p in model.named_parameters() if p.requires_grad}}
        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if rank == 0:
            save_file({{k: v.contiguous() for k, v in state.items() if k in keys}}, f"{{out}}-{{name}}.safetensors")
    if world > 1:
        dist.destroy_process_group()
''')


@pytest.mark.skipif(sys.platform != "linux", reason="gloo multi-process test runs on Linux")
def test_fully_sharded_adapters_train_as_in_one_process(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(SCRIPT.format(root=os.getcwd()))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, str(script), str(tmp_path / "one")],
                         capture_output=True, text=True, timeout=300, env=env)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                          "--master-port", str(free_port()), str(script), str(tmp_path / "two")],
                         capture_output=True, text=True, timeout=300, env=env)
    assert two.returncode == 0, two.stderr[-3000:]
    for name in ("mixlora", "mixdora", "dynmole"):
        assert f"{name} sharded True" in two.stdout and f"{name} sharded False" in one.stdout
        a = load_file(tmp_path / f"one-{name}.safetensors")
        b = load_file(tmp_path / f"two-{name}.safetensors")
        assert a.keys() == b.keys() and any("router" in k for k in a)
        assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6, name
        start = load_file(tmp_path / f"one-{name}-start.safetensors")  # the adapters trained: they moved
        assert max((a[k] - start[k]).abs().max().item() for k in a) > 1e-2
        assert min((a[k] - start[k]).abs().max().item() for k in a if "router" in k) > 1e-6  # top-k weights' grads

"""TRL's SFTTrainer with a MixLoRA `peft_config` under `accelerate launch` with 2 CPU processes (gloo, DDP) ends with
the adapter of the 1-process run that sees the same global batches (per-device batch x 2)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
from safetensors.torch import load_file

from tests.multijob.test_distributed import accelerate_launch

SCRIPT = textwrap.dedent('''
    import os, sys
    sys.path.insert(0, {root!r})
    os.environ["HF_HUB_OFFLINE"] = "1"
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer
    from peft_mole import synthetic
    from tests.helpers import mixlora, tiny_base

    out, per_device = sys.argv[1], int(sys.argv[2])
    tokenizer = synthetic.demo_tokenizer()
    rows = synthetic.multitask_rows(32)
    data = Dataset.from_list([{{"prompt": r["prompt"], "completion": r["completion"]}} for r in rows])
    # plain SGD (Adam would hide a gradient off by a factor); the load-balance loss is not additive over batch
    # shards (DDP averages each process's), so its coefficient is 0: the aux loss still rides on every output
    args = SFTConfig(output_dir=out, max_steps=3, per_device_train_batch_size=per_device, optim="sgd",
                     learning_rate=0.5, max_grad_norm=0.0, bf16=False, use_cpu=True, report_to=[],
                     save_strategy="no", logging_steps=1, max_length=40, dataloader_num_workers=0, seed=0,
                     disable_tqdm=True)
    trainer = SFTTrainer(model=tiny_base(vocab_size=len(tokenizer)), args=args, train_dataset=data,
                         processing_class=tokenizer, peft_config=mixlora(router_aux_loss_coef=0.0))
    trainer.train()
    trainer.save_model(out)
    print("processes", trainer.accelerator.num_processes)
    trainer.accelerator.end_training()  # the process group closed before exit
''')


@pytest.mark.skipif(sys.platform != "linux", reason="gloo multi-process test runs on Linux")
def test_sft_trainer_with_a_mixlora_config_trains_under_ddp_as_in_one_process(tmp_path):
    """Under DDP (Trainer's `find_unused_parameters=True` for PEFT models) the forward's output is rebuilt from its
    fields: the aux loss entries are fields of the output's class (`tuners.aux_outputs`). Before, both processes
    failed at the first step (`CausalLMOutputWithPast.__init__() got an unexpected keyword argument`)."""
    script = tmp_path / "train.py"
    script.write_text(SCRIPT.format(root=os.getcwd()))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, str(script), str(tmp_path / "one"), "4"],
                         capture_output=True, text=True, timeout=300, env=env)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run(accelerate_launch() + [str(script), str(tmp_path / "two"), "2"],
                         capture_output=True, text=True, timeout=300, env=env)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "processes 2" in two.stdout and "processes 1" in one.stdout
    a = load_file(tmp_path / "one" / "adapter_model.safetensors")
    b = load_file(tmp_path / "two" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and any("router" in k for k in a)
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-5

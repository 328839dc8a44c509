"""MixLoRA, DynMoLE and LoRA jobs over a 4-bit (bitsandbytes NF4) and an 8-bit (LLM.int8) base on CPU: the
frozen-MLP trick works on the quantised weights (the layers call the quantised modules, W2 once on the weighted
sum), the result equals the same adapter on the dequantised float base up to the kernel's own gap, and training
moves the loss. Skips cleanly without bitsandbytes or without its CPU kernels for that width."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from transformers import AutoModelForCausalLM

from peft_mole import MultiJobModel, synthetic
from tests.helpers import METHODS, batch, randomize_adapters

bnb = pytest.importorskip("bitsandbytes")


def _dequantised_weight(module: torch.nn.Module) -> torch.Tensor | None:
    if isinstance(module, bnb.nn.Linear4bit):
        # the weight the CPU kernel applies, probed with the identity (4-bit is weight-only, so the layer is
        # linear); after a first forward the CPU backend may repack the weight for its kernel, so
        # `dequantize_4bit(weight.data, quant_state)` no longer reads it
        with torch.no_grad():
            probe = module(torch.eye(module.in_features))
        return (probe if module.bias is None else probe - module.bias).t().float()
    if isinstance(module, bnb.nn.Linear8bitLt):  # int8 rows CB with per-row absmax SCB: W = CB · SCB / 127
        scale = module.weight.SCB if module.weight.SCB is not None else module.state.SCB  # moved by a forward
        return module.weight.data.float() * scale.float().unsqueeze(1) / 127
    return None


@pytest.fixture(scope="module", params=["4bit", "4bit-bf16-storage", "8bit"])
def bases(request, tmp_path_factory):
    """The same tiny Llama loaded in NF4 / int8 and, as reference, in float with the dequantised weights. NF4 packed
    into bfloat16 storage (`bnb_4bit_quant_storage`, QLoRA with FSDP) has a float weight dtype: before 2026-12-06 it
    was taken for a float weight (a shape error at the first forward, DoRA experts not refused)."""
    from transformers import BitsAndBytesConfig

    path = tmp_path_factory.mktemp("quantised") / "base"
    synthetic.random_model("llama", "tiny", intermediate_size=192).save_pretrained(path)  # 4-bit blocks need /64
    if request.param.startswith("4bit"):
        storage = {"bnb_4bit_quant_storage": torch.bfloat16} if request.param.endswith("storage") else {}
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                    bnb_4bit_compute_dtype=torch.float32, **storage)
    else:
        config = BitsAndBytesConfig(load_in_8bit=True)
    try:
        quantised = AutoModelForCausalLM.from_pretrained(path, quantization_config=config, device_map="cpu")
        quantised(input_ids=torch.tensor([[3, 4]]))
    except Exception as error:  # noqa: BLE001 — no CPU kernels for this width in this bitsandbytes build
        pytest.skip(f"bitsandbytes cannot run {request.param} on this CPU: {type(error).__name__}: {error}")
    assert sum(_dequantised_weight(m) is not None for m in quantised.modules()) == 2 * 7  # every projection

    def dequantised():
        model = AutoModelForCausalLM.from_pretrained(path)
        with torch.no_grad():
            for name, module in quantised.named_modules():
                if (weight := _dequantised_weight(module)) is not None:
                    model.get_submodule(name).weight.copy_(weight)
        return model

    return quantised, dequantised, path, config


@pytest.mark.parametrize("method", ["mixlora", "dynmole", "dynmole-projection"])
def test_adapter_on_a_quantised_base_equals_it_on_the_dequantised_base(bases, method):
    quantised_base, dequantised, path, config = bases
    quantised = get_peft_model(AutoModelForCausalLM.from_pretrained(path, quantization_config=config, device_map="cpu"),
                               METHODS[method]())
    reference = get_peft_model(dequantised(), METHODS[method]())
    randomize_adapters(quantised, std=0.1)
    randomize_adapters(reference, std=0.1)
    ids, mask, labels = batch(2, 8, pad_last=2)
    quantised.eval()
    reference.eval()
    with torch.no_grad():
        got = quantised(input_ids=ids, attention_mask=mask).logits
        expected = reference(input_ids=ids, attention_mask=mask).logits
        base_only = dequantised()(input_ids=ids, attention_mask=mask).logits
        kernel_gap = (quantised_base(input_ids=ids, attention_mask=mask).logits - base_only).abs().max()
    # bitsandbytes' CPU matmul itself differs from the float matmul with its weights by kernel_gap on the base's
    # logits (4-bit ~3e-3; 8-bit ~5e-3, it also rounds the inputs to int8), more where adapters change the
    # activations; the adapter on top must add nothing of the adapter's own order (> 20x the tolerance)
    tolerance = 4 * kernel_gap + 1e-4
    assert (expected - base_only).abs().max() > 20 * tolerance
    assert (got - expected).abs().max() <= tolerance, (kernel_gap, (got - expected).abs().max())


def test_training_mixed_jobs_over_a_quantised_base(bases):
    _, _, path, config = bases
    base = AutoModelForCausalLM.from_pretrained(path, quantization_config=config, device_map="cpu")
    model = MultiJobModel(base, {"lora": LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"]),
                                 "mix": METHODS["mixlora"](), "dyn": METHODS["dynmole"]()})
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    assert params and all(p.dtype == torch.float32 for p in params)
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    ids, mask, labels = batch(6, 8)
    rows = ["lora", "lora", "mix", "mix", "dyn", "dyn"]
    losses = []
    for _ in range(8):
        logits = model(input_ids=ids, attention_mask=mask, adapter_names=rows).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1


def test_dora_experts_on_a_quantised_base_are_refused(bases):
    _, _, path, config = bases
    base = AutoModelForCausalLM.from_pretrained(path, quantization_config=config, device_map="cpu")
    with pytest.raises(ValueError, match="DoRA experts need the float weights' row norms"):
        get_peft_model(base, METHODS["mixdora"]())


def test_the_block_check_probes_a_quantised_block_at_its_input_width(bases):
    """A 4-bit weight is stored packed ((N·K/2, 1)): the check read its width from the weight's shape, 1, and so ran
    the block on 1-feature inputs (the CPU kernel took them and passed anything; on CUDA, a shape error). Now a
    quantised block that computes more than the gated formula is refused as a float one is."""
    from transformers import AutoModelForCausalLM

    _, _, path, config = bases
    quantised = AutoModelForCausalLM.from_pretrained(path, quantization_config=config, device_map="cpu")
    mlp = quantised.model.layers[0].mlp
    standard = type(mlp).forward
    type(mlp).forward = lambda self, x: standard(self, x) * 2.0  # (Falcon-H1's multipliers, for instance)
    try:
        with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp \(LlamaMLP\) does not compute"):
            get_peft_model(quantised, METHODS["mixlora"]())
    finally:
        type(mlp).forward = standard


def test_eval_mode_keeps_4bit_linears_training_and_turns_their_wrappers_off(bases):
    """What `eval_keeping_4bit_training` does, on any CPU (the repacking itself needs AVX512-BF16): inside it, the
    4-bit linears are in training mode and every other module, PEFT's wrappers of them included (their router
    jitter and dropout read it), in eval mode; the adapter's creation (the block check) called no 4-bit linear in
    eval mode without autograd; after it, every module is in its mode before."""
    from peft_mole.quantised_eval import eval_keeping_4bit_training, is_4bit_linear

    _, _, path, config = bases
    base = AutoModelForCausalLM.from_pretrained(path, quantization_config=config, device_map="cpu")
    calls = []
    for module in base.modules():
        if is_4bit_linear(module):
            module.register_forward_pre_hook(lambda m, args: calls.append(m.training or torch.is_grad_enabled()))
    get_peft_model(base, METHODS["mixlora"]())  # (block scope: the block check probes each MLP block)
    assert all(calls) and (len(calls) > 0) == config.load_in_4bit  # (8-bit: no 4-bit linear)
    base = AutoModelForCausalLM.from_pretrained(path, quantization_config=config, device_map="cpu")
    model = get_peft_model(base, METHODS["dynmole-projection"]())  # (wrappers of the projections)
    model.train()
    with eval_keeping_4bit_training(model):
        assert all(not module.training for module in model.modules() if isinstance(module, BaseTunerLayer))
        training = [module for module in model.modules() if module.training]
        assert all(isinstance(module, bnb.nn.Linear4bit) for module in training)
        assert len(training) == (2 * 7 if config.load_in_4bit else 0)  # (every projection of the 2 layers)
    assert all(module.training for module in model.modules())


@pytest.mark.parametrize("method", ["mixlora", "dynmole"])
def test_gradients_on_a_quantised_base_equal_those_on_the_dequantised_base(bases, method):
    """Making the adapter probes each MLP block (`block_check`); in eval mode without autograd, bitsandbytes' CPU
    `Linear4bit` (AVX512-BF16) repacked its weight for an inference kernel for good, after which no gradient
    passed through it: the attention experts' gradients were 34-60 % off (100 % where only 4-bit layers follow).
    Now they are the dequantised base's to the kernel's gap, as PEFT LoRA's are (0.2-0.7 % here)."""
    _, dequantised, path, config = bases
    models = [get_peft_model(AutoModelForCausalLM.from_pretrained(path, quantization_config=config,
                                                                  device_map="cpu"), METHODS[method]()),
              get_peft_model(dequantised(), METHODS[method]())]
    ids, mask, labels = batch(2, 8)
    grads = []
    for model in models:
        randomize_adapters(model, std=0.1)
        model.train()
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    quantised, reference = grads
    assert quantised.keys() == reference.keys() and all(g is not None for g in quantised.values())
    errors = {n: ((quantised[n] - reference[n]).norm() / reference[n].norm()).item() for n in reference}
    assert max(errors.values()) <= 0.05, max(errors.items(), key=lambda item: item[1])


@pytest.mark.parametrize("evaluating", [False, True])
def test_multijob_trainer_trains_jobs_over_a_quantised_base_as_sft_trainer_does(bases, tmp_path, evaluating):
    """Trainer refuses to fine-tune a quantised model that is not a `PeftModel`; SFTTrainer, given a `peft_config`,
    has wrapped it in one, and MultiJobTrainer injects its jobs' adapters in place, so it says so to that check
    (before: every quantised base was refused, as a model or as a path with `quantization_config`). Each job ends
    as SFTTrainer trains it alone on the same quantised base (TRL casts the adapters to bf16 there, QLoRA's rule;
    plain SGD at lr 1, so that any difference in a gradient shows). `evaluating`: each job is evaluated after every
    step, which must change nothing in its training; in eval mode a 4-bit layer would stop passing gradients
    (`peft_mole.quantised_eval`; SFTTrainer alone is run without evaluation, which would end its training so)."""
    from datasets import Dataset
    from peft import get_peft_model_state_dict
    from safetensors.torch import load_file
    from trl import SFTConfig, SFTTrainer

    from peft_mole import JobConfig, MultiJobTrainer

    _, _, path, config = bases
    tokenizer = synthetic.demo_tokenizer()
    rows = Dataset.from_list([{"prompt": r["prompt"], "completion": r["completion"]}
                              for r in synthetic.multitask_rows(8)])
    evals = rows.select(range(2)) if evaluating else None
    jobs = [JobConfig("lora", LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]), rows, evals),
            JobConfig("mix", METHODS["mixlora"](), rows, evals)]
    evaluation = dict(eval_strategy="steps", eval_steps=1) if evaluating else {}

    def args(out, **options):
        return SFTConfig(output_dir=str(out), report_to=[], use_cpu=True, bf16=False, max_length=40, max_steps=2,
                         save_strategy="no", gradient_checkpointing=False, per_device_train_batch_size=2,
                         learning_rate=1.0, optim="sgd", seed=0, **options)

    trainer = MultiJobTrainer(model=str(path), jobs=jobs, args=args(tmp_path / "run", **evaluation),
                              processing_class=tokenizer,
                              quantization_config=config, step_overhead_tokens=None)  # (one step for both jobs)
    trainer.train()
    assert [run.status for run in trainer.runs] == ["done", "done"]
    evaluated = [h for h in trainer.state.log_history if "lora/eval_loss" in h]
    assert len(evaluated) == (2 if evaluating else 0)
    for job in jobs:
        solo = SFTTrainer(model=str(path), peft_config=job.peft_config, args=job.training_args(args(tmp_path / "solo")),
                          train_dataset=rows, processing_class=tokenizer, quantization_config=config)
        solo.train()
        expected = get_peft_model_state_dict(solo.model)
        together = load_file(str(tmp_path / "run" / job.name / "adapter_model.safetensors"))
        assert {t.dtype for t in together.values()} == {torch.bfloat16}  # (as TRL casts them)
        difference = max((together[k].float() - expected[k].float()).abs().max().item() for k in expected)
        assert difference <= 1e-6, (job.name, difference)

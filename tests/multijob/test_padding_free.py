"""Padding-free multi-job training (TRL's `padding_free=True`, or `packing=True` with the "bfd" strategy): each job's
micro-batch is one packed row, a mixed step concatenates them into one packed row with one adapter name per token,
and every job still trains exactly as alone."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model_state_dict
from safetensors.torch import load_file
from transformers import modeling_utils
from trl import SFTTrainer

from peft_mole import PACKED_SDPA, JobConfig, MultiJobTrainer, packed_attention
from peft_mole.multijob.batching import MixedBatch, is_packed, mix, packed_mixed_batch
from peft_mole.multijob.model import MultiJobModel
from peft_mole.multijob.report import PaddingStats
from peft_mole.multijob.scheduler import JobScheduler
from tests.helpers import dynmole, mixlora, randomize_adapters, tiny_base
from tests.multijob.test_model import _jobs
from tests.multijob.test_trainer import ALL_LINEAR, run_args, three_jobs


def packed_part(lengths: list[int], vocab: int = 512, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (1, sum(lengths)), generator=gen)
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    return {"input_ids": ids, "labels": ids.clone(), "position_ids": positions}


def test_packed_mixed_batch_concatenates_jobs_without_padding():
    parts = {"a": packed_part([3, 2]), "b": packed_part([4], seed=1)}
    mixed = packed_mixed_batch(parts)
    assert mixed.packed and mixed.input_ids.shape == (1, 9) and mixed.attention_mask is None
    assert mixed.adapter_names == ["a"] * 5 + ["b"] * 4
    assert mixed.rows == {"a": slice(0, 5), "b": slice(5, 9)}
    # no next-token target crosses from one sequence (or job) into the next
    assert (mixed.labels[0, [0, 3, 5]] == -100).all() and (mixed.labels[0, [1, 2, 4, 6, 7, 8]] != -100).all()
    inputs = mixed.model_inputs()
    assert inputs["cu_seq_lens_q"].tolist() == [0, 3, 5, 9] and inputs["max_length_q"] == 4
    assert inputs["seq_idx"].tolist() == [[0, 0, 0, 1, 1, 2, 2, 2, 2]]  # as TRL's collator: linear-attention layers
    assert "attention_mask" not in inputs
    logits = torch.arange(9.0).view(1, 9, 1)
    assert logits[mixed.index("b")].flatten().tolist() == [5.0, 6.0, 7.0, 8.0]
    assert mixed.share("a") == pytest.approx(5 / 9)
    assert isinstance(mix(parts), MixedBatch) and mix(parts).packed
    padded = {"input_ids": torch.ones(2, 4, dtype=torch.long), "attention_mask": torch.ones(2, 4, dtype=torch.long)}
    assert not is_packed(padded)
    with pytest.raises(ValueError, match="job 'b'.*all jobs' micro-batches must be packed, or none"):
        packed_mixed_batch({"a": parts["a"], "b": {**padded, "labels": padded["input_ids"]}})


def test_a_job_whose_positions_do_not_start_at_0_is_its_own_sequence():
    """Positions that continue a sequence (a job's `10, 11, 12` after another's `0..3`, or `4, 5, 6`, which follows
    on): each job's first token, and every position break, starts a sequence, as transformers' SDPA finds them, and
    no target crosses from one job into the next (only position 0 started one: under `sdpa_packed` the second job
    attended to the first, and the first job's last token was trained to predict the second's first token)."""
    a = packed_part([4])
    b = {**packed_part([3], seed=1), "position_ids": torch.tensor([[10, 11, 12]])}
    c = {**packed_part([3], seed=2), "position_ids": torch.tensor([[4, 5, 6]])}  # (continues a's positions)
    mixed = packed_mixed_batch({"a": a, "b": b, "c": c})
    assert mixed.model_inputs()["cu_seq_lens_q"].tolist() == [0, 4, 7, 10]
    assert mixed.labels[0, [0, 4, 7]].tolist() == [-100] * 3 and (mixed.labels[0, [1, 2, 3, 5, 6, 8, 9]] != -100).all()
    base = tiny_base()
    base.set_attn_implementation(PACKED_SDPA)
    base.eval()
    inputs = {k: v for k, v in mixed.model_inputs().items() if k != "adapter_names"}
    with torch.no_grad():
        together = base(**inputs, use_cache=False).logits
        for job, part in (("b", b), ("c", c)):
            alone = base(input_ids=part["input_ids"], position_ids=part["position_ids"], use_cache=False).logits
            torch.testing.assert_close(together[mixed.index(job)], alone, rtol=1e-5, atol=1e-5)


def test_padding_and_memory_of_a_packed_step_count_its_tokens_once():
    a, b = packed_part([3, 2]), packed_part([4], seed=1)
    stats = PaddingStats()
    stats.add([(None, a), (None, b)])
    assert (stats.real, stats.total, stats.pad_fraction) == (9, 9, 0.0)
    scheduler = JobScheduler(max_memory=1e9)
    scheduler.memory_model.kind_of = {"a": "lora", "b": "lora"}
    for rows, length in [(1, 10), (2, 10), (1, 40)]:
        scheduler.memory_model.observe([length] * rows, 1000.0 + 10.0 * rows * length + rows * length**2,
                                       jobs=["a"] * rows)
    run_a, run_b = SimpleNamespace(name="a"), SimpleNamespace(name="b")
    # SDPA: a and b run as two packed steps (`group_packed`), the larger one sets the peak
    assert scheduler.predict([(run_a, a), (run_b, b)]) == pytest.approx(scheduler.memory_model.predict([5], ["a"]))
    scheduler.varlen_attention = True  # flash attention: one packed row of all their tokens
    assert scheduler.predict([(run_a, a), (run_b, b)]) == pytest.approx(1000.0 + 10.0 * 9 + 81)


def test_packed_micro_batches_share_steps_no_longer_than_the_longest():
    parts = [(name, packed_part([n])) for name, n in [("a", 60), ("b", 27), ("c", 20), ("d", 41), ("e", 15)]]
    scheduler = JobScheduler()
    groups = scheduler.group_packed(parts)
    # first-fit decreasing into bins of 60 tokens: a | d + e | b + c; each step keeps the parts' own order
    assert [[name for name, _ in group] for group in groups] == [["a"], ["d", "e"], ["b", "c"]]
    assert scheduler.group_packed(parts[:1]) == [parts[:1]]
    scheduler.varlen_attention = True
    assert scheduler.group_packed(parts) == [parts]
    # sdpa_packed: no row mask on eager steps of a model of full-attention layers (no limit); compiled, with a
    # sliding window, or with no config known, transformers builds the row's T × T mask: one step up to
    # `packed_row_tokens`; beyond, first-fit decreasing into bins of that many tokens: a + b (87) | c + d + e (76)
    from transformers import (
        Gemma3Config,
        Llama4Config,
        LlamaConfig,
        MistralConfig,
        PaliGemmaConfig,
        Qwen2Config,
    )

    for config, compiled, limit in [(LlamaConfig(), False, None), (Qwen2Config(), False, None),
                                    (LlamaConfig(), True, packed_attention.ROW_MASK_TOKENS),
                                    (MistralConfig(), False, packed_attention.ROW_MASK_TOKENS),
                                    # multimodal wrappers: their own type, not a plain decoder's
                                    (Gemma3Config(), False, packed_attention.ROW_MASK_TOKENS),
                                    (PaliGemmaConfig(), False, packed_attention.ROW_MASK_TOKENS),
                                    (Llama4Config(), False, packed_attention.ROW_MASK_TOKENS),
                                    (Qwen2Config(use_sliding_window=True, sliding_window=64, max_window_layers=0),
                                     False, packed_attention.ROW_MASK_TOKENS)]:
        scheduler.set_attention(PACKED_SDPA, compiled, config)
        assert scheduler.packed_row_tokens == limit, (type(config).__name__, compiled)
    chunked = LlamaConfig()
    chunked.attention_chunk_size = 64  # (a plain decoder's type with chunked attention)
    scheduler.set_attention(PACKED_SDPA, False, chunked)
    assert scheduler.packed_row_tokens == packed_attention.ROW_MASK_TOKENS
    scheduler.set_attention(PACKED_SDPA)
    assert (scheduler.varlen_attention, scheduler.packed_row_tokens, scheduler.isolates_non_finite) == (
        True, packed_attention.ROW_MASK_TOKENS, False)
    assert scheduler.group_packed(parts) == [parts]
    scheduler.packed_row_tokens = 100
    assert [[name for name, _ in group] for group in scheduler.group_packed(parts)] == [["a", "b"], ["c", "d", "e"]]
    scheduler.packed_row_tokens = 50  # the longest micro-batch (60) is the least a step holds
    assert [[name for name, _ in group] for group in scheduler.group_packed(parts)] == [["a"], ["d", "e"], ["b", "c"]]
    scheduler.set_attention("sdpa")  # the masked row: steps of the longest micro-batch
    assert not scheduler.varlen_attention and len(scheduler.group_packed(parts)) == 3
    scheduler.set_attention("flash_attention_2")
    assert (scheduler.packed_row_tokens, scheduler.isolates_non_finite) == (None, True)
    assert scheduler.group_packed(parts) == [parts]


@pytest.mark.parametrize("family,scope,attention", [("llama", "block", "sdpa"), ("qwen2", "block", "sdpa"),
                                                    ("mistral", "block", "sdpa"), ("llama", "projection", "sdpa"),
                                                    ("llama", "block", PACKED_SDPA)])
def test_packed_forward_matches_padded_rows_for_every_job_kind(family, scope, attention, monkeypatch):
    """Tokens grouped by adapter (`ForwardContext.unit_view`) in LoRA, MixLoRA and DynMoLE layers (routed per MLP
    block, or per projection: one model holds one scope): the logits, router losses and gradients of a packed row
    equal those of the same sequences as padded rows; also where the packed row's sequences attend apart
    (`sdpa_packed`)."""
    if scope == "block":
        jobs, lengths = _jobs(), {"lora": [5, 3], "mix": [6], "dyn": [2, 7]}
    else:
        jobs = {"lora": _jobs()["lora"], "mix": dynmole(router_scope="projection"),
                "dyn": dynmole(router_scope="projection", num_experts=3)}
        lengths = {"lora": [4, 1, 3], "mix": [6], "dyn": [2, 7]}
    base = tiny_base(family)
    base.set_attn_implementation(attention)
    monkeypatch.setattr(packed_attention, "CHUNK_TOKENS", 8)  # sdpa_packed: chunks of one and of two sequences
    model = MultiJobModel(base, jobs)
    randomize_adapters(model)
    parts = {job: packed_part(n, seed=i) for i, (job, n) in enumerate(lengths.items())}
    mixed = packed_mixed_batch(parts)
    packed = model(**mixed.model_inputs(), labels=mixed.labels, use_cache=False)
    by_job = {job: list(model.job_parameters(job).values()) for job in jobs}  # routers included
    params = [p for job_params in by_job.values() for p in job_params]
    packed_grads = torch.autograd.grad(packed.logits.sum(), params)

    seqs, names = [], []
    for job, part in parts.items():
        seqs += list(part["input_ids"][0].split(lengths[job]))
        names += [job] * len(lengths[job])
    longest = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), longest, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, : len(s)], mask[i, : len(s)] = s, 1
    padded = model(input_ids=ids, attention_mask=mask, labels=ids, adapter_names=names, use_cache=False)
    real = torch.cat([padded.logits[i, : len(s)] for i, s in enumerate(seqs)])
    torch.testing.assert_close(packed.logits[0], real, atol=1e-5, rtol=1e-5)
    for job in ("mix", "dyn"):
        torch.testing.assert_close(packed.aux_loss_per_adapter[job], padded.aux_loss_per_adapter[job])
    padded_grads = torch.autograd.grad(sum(padded.logits[i, : len(s)].sum() for i, s in enumerate(seqs)), params)
    start = 0
    for job, job_params in by_job.items():  # every job's gradients are compared, and none is all zero
        assert max(g.abs().max().item() for g in padded_grads[start:start + len(job_params)]) > 1e-3, job
        start += len(job_params)
    for got, want in zip(packed_grads, padded_grads, strict=True):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def _solo_matches(job, init, together_dir, tokenizer, vocab, solo_args) -> None:
    solo = PeftModel.from_pretrained(tiny_base(vocab_size=vocab), str(init), is_trainable=True)
    SFTTrainer(model=solo, args=solo_args, train_dataset=job.train_dataset, processing_class=tokenizer).train()
    expected = get_peft_model_state_dict(solo)
    together = load_file(os.path.join(together_dir, "adapter_model.safetensors"))
    initial = load_file(os.path.join(init, "adapter_model.safetensors"))
    assert max((expected[k] - initial[k]).abs().max().item() for k in expected) > 1e-4, job.name
    diff = max((together[k] - expected[k]).abs().max().item() for k in expected)
    assert diff <= 1e-5, f"{job.name}: differs by {diff}"


@pytest.mark.parametrize("checkpointing,attention", [(False, "sdpa"), (True, "sdpa"), (False, PACKED_SDPA)])
def test_padding_free_jobs_train_in_packed_steps_as_each_alone(assets, tmp_path, monkeypatch, checkpointing,
                                                               attention):
    """Also under activation checkpointing (TRL's default), whose recomputation must group the tokens as the
    forward did, and with the attention that keeps the packed sequences apart (`sdpa_packed`), where every round's
    micro-batches go in one step."""
    tokenizer, datasets = assets
    vocab = len(tokenizer)
    jobs = three_jobs(datasets)
    args = run_args(tmp_path / "run", padding_free=True, max_length=None,  # TRL: padding_free does not truncate
                    gradient_checkpointing=checkpointing)
    base = tiny_base(vocab_size=vocab)
    base.set_attn_implementation(attention)
    trainer = MultiJobTrainer(model=base, jobs=jobs, args=args, processing_class=tokenizer)
    randomize_adapters(trainer.jobs_model)
    for job in jobs:
        trainer.jobs_model.save_job(job.name, str(tmp_path / "init" / job.name))
    checkpointed, real_checkpoint = [], modeling_utils.checkpoint
    monkeypatch.setattr(modeling_utils, "checkpoint", lambda *a, **k: checkpointed.append(1) or real_checkpoint(*a, **k))
    steps = []
    forward_backward = trainer._forward_backward
    trainer._forward_backward = lambda parts: (steps.append([tuple(b["input_ids"].shape) for _, b in parts]),
                                               forward_backward(parts))[1]
    trainer.train()
    assert [r["status"] for r in trainer.job_summary] == ["done"] * 3
    assert all(rows == 1 for shapes in steps for rows, _ in shapes)
    assert any(len(shapes) > 1 for shapes in steps)
    assert len(steps) < sum(len(shapes) for shapes in steps)
    # SDPA: jobs share packed steps no longer than the round's longest micro-batch (`group_packed`); sdpa_packed:
    # each round's micro-batches in one step (a round: one micro-batch of every job still training)
    totals = [sum(width for _, width in shapes) for shapes in steps]
    widest = max(width for shapes in steps for _, width in shapes)
    if attention == "sdpa":
        assert max(totals) <= widest
    else:  # the jobs only leave: each step holds every job still training, with no step limit (no row mask)
        assert len(steps[0]) == 3 and max(totals) > widest and trainer.job_scheduler.packed_row_tokens is None
        assert all(len(shapes) >= len(later) for shapes, later in zip(steps, steps[1:], strict=False))
    assert trainer.padding_stats.pad_fraction == 0.0
    assert bool(checkpointed) == checkpointing
    for job in jobs:  # against SFTTrainer on padded rows: the packed attention mask changes nothing
        _solo_matches(job, tmp_path / "init" / job.name, os.path.join(args.output_dir, job.name), tokenizer, vocab,
                      job.training_args(run_args(tmp_path / "solo", max_length=None)))


def test_bfd_packing_matches_sft_trainer(assets, tmp_path):
    tokenizer, datasets = assets
    vocab = len(tokenizer)
    jobs = [
        JobConfig("lora", LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=ALL_LINEAR),
                  datasets["sentiment"], per_device_train_batch_size=2),
        JobConfig("mix", mixlora(), datasets["capital"], per_device_train_batch_size=1, seed=1),
        JobConfig("dyn", dynmole(), datasets["add"], per_device_train_batch_size=2),
    ]
    packing = dict(packing=True, max_length=48, max_steps=2)  # TRL's default strategy: best-fit decreasing
    trainer = MultiJobTrainer(model=tiny_base(vocab_size=vocab), jobs=jobs, args=run_args(tmp_path / "run", **packing),
                              processing_class=tokenizer)
    randomize_adapters(trainer.jobs_model)
    for job in jobs:
        trainer.jobs_model.save_job(job.name, str(tmp_path / "init" / job.name))
    assert is_packed(next(iter(trainer._make_run(jobs[0]).dataloader)))
    trainer.train()
    assert trainer.padding_stats.pad_fraction == 0.0
    for job in jobs:
        _solo_matches(job, tmp_path / "init" / job.name, tmp_path / "run" / job.name, tokenizer, vocab,
                      job.training_args(run_args(tmp_path / "solo", **packing)))


def _record_evaluation(trainer, evaluated: list[bool]):
    def hook(module, args, kwargs) -> None:
        if not trainer.model.training:  # the trainer sets its model to eval for evaluation
            evaluated.append(kwargs.get("attention_mask") is None and kwargs.get("position_ids") is not None)
    return hook


def test_per_job_evaluation_of_packed_batches_equals_padded(assets, tmp_path):
    tokenizer, datasets = assets
    losses = {}
    for padding_free in (False, True):
        jobs = [JobConfig("lora", LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=ALL_LINEAR),
                          datasets["sentiment"], eval_dataset=datasets["capital"], eval_steps=1, max_steps=2),
                JobConfig("mix", mixlora(), datasets["add"], eval_dataset=datasets["add"], eval_steps=2, max_steps=2)]
        args = run_args(tmp_path / str(padding_free), padding_free=padding_free, max_length=None)
        trainer = MultiJobTrainer(model=tiny_base(vocab_size=len(tokenizer)), jobs=jobs, args=args,
                                  processing_class=tokenizer)
        randomize_adapters(trainer.jobs_model)
        evaluated = []  # per evaluation forward: whether it took a packed batch (position ids, no attention mask)
        trainer.jobs_model.register_forward_pre_hook(_record_evaluation(trainer, evaluated), with_kwargs=True)
        trainer.train()
        assert evaluated and set(evaluated) == {padding_free}, evaluated
        losses[padding_free] = [(k, h[k]) for h in trainer.state.log_history for k in h if k.endswith("eval_loss")]
    assert [k for k, _ in losses[True]] == ["lora/eval_loss", "lora/eval_loss", "mix/eval_loss"]
    assert [v for _, v in losses[True]] == pytest.approx([v for _, v in losses[False]], rel=1e-5)


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_packed_lora_job_out_of_memory_alone_is_retried_in_sequence_halves(assets, tmp_path, monkeypatch, dropout):
    """The halves give the uncut run's adapters; with dropout too: each half's tokens draw the masks they draw in the
    whole packed micro-batch (`batching.row_halves` keeps their indices; before, the halves drew masks of their own
    and the adapters differed by about 1e-3)."""
    tokenizer, datasets = assets

    def trainer_for(output_dir):
        jobs = [JobConfig("a", LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=ALL_LINEAR),
                          datasets["sentiment"], per_device_train_batch_size=4),
                JobConfig("b", mixlora(), datasets["capital"], per_device_train_batch_size=2)]
        trainer = MultiJobTrainer(model=tiny_base(vocab_size=len(tokenizer)), jobs=jobs, processing_class=tokenizer,
                                  args=run_args(output_dir, padding_free=True, max_length=None, max_steps=2))
        randomize_adapters(trainer.jobs_model, seed=3)
        return trainer

    trainer_for(tmp_path / "normal").train()
    squeezed = trainer_for(tmp_path / "oom")
    forward, sequences_run = squeezed.jobs_model.forward, []

    def forward_that_fits_two_sequences(*args, position_ids=None, **kwargs):
        sequences = int((position_ids == 0).sum())
        if sequences > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        sequences_run.append(sequences)
        return forward(*args, position_ids=position_ids, **kwargs)

    monkeypatch.setattr(squeezed.jobs_model, "forward", forward_that_fits_two_sequences)
    squeezed.train()
    assert [r["status"] for r in squeezed.job_summary] == ["done", "done"]
    assert sequences_run == [2, 2, 2] * 2  # per round: a's 4 sequences as 2 + 2, then b's 2
    for job in ("a", "b"):
        normal = load_file(tmp_path / "normal" / job / "adapter_model.safetensors")
        retried = load_file(tmp_path / "oom" / job / "adapter_model.safetensors")
        # 1.5e-5 measured with dropout (Adam's steps of 1e-3 on gradients summed in two parts); 3e-3 before
        assert max((normal[k] - retried[k]).abs().max().item() for k in normal) <= 5e-5, job


def test_pads_of_pad_to_multiple_of_are_cut_off_before_mixing(assets, tmp_path):
    """TRL's padding-free collator with `pad_to_multiple_of` appends pads (position 0, label -100) to each job's
    packed micro-batch; they are cut off before the jobs' rows are concatenated (`batching.strip_padding`), so
    they neither sit between two jobs' tokens nor count in a MixLoRA job's router losses: the adapters equal
    those of the run without them. `include_num_input_tokens_seen="all"` counts them, as Trainer counts the
    collated batch (before 2026-12-08 the cut micro-batch was counted)."""
    tokenizer, datasets = assets
    seen = {}

    def trained(output_dir, multiple):
        jobs = [JobConfig("a", mixlora(), datasets["sentiment"], per_device_train_batch_size=3),
                JobConfig("b", LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=ALL_LINEAR),
                          datasets["capital"], per_device_train_batch_size=2)]
        trainer = MultiJobTrainer(model=tiny_base(vocab_size=len(tokenizer)), jobs=jobs, processing_class=tokenizer,
                                  args=run_args(output_dir, padding_free=True, max_length=None, max_steps=2,
                                                pad_to_multiple_of=multiple, include_num_input_tokens_seen="all"))
        randomize_adapters(trainer.jobs_model, seed=4)
        trainer.train()
        seen[multiple] = trainer.state.num_input_tokens_seen
        return trainer.data_collator([trainer.job_datasets["a"][i] for i in range(3)])

    padded = trained(tmp_path / "pads", 64)
    assert padded["input_ids"].shape[1] == 64 and (padded["position_ids"][0, -2:] == 0).all()  # pads there are
    assert trained(tmp_path / "plain", None)["input_ids"].shape[1] < 64
    assert seen[64] == 4 * 64 > seen[None] > 0  # two steps of two jobs' micro-batches, 64 columns each
    for job in ("a", "b"):
        plain = load_file(tmp_path / "plain" / job / "adapter_model.safetensors")
        pads = load_file(tmp_path / "pads" / job / "adapter_model.safetensors")
        assert max((plain[k] - pads[k]).abs().max().item() for k in plain) <= 1e-6, job

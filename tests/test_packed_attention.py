"""`attn_implementation="sdpa_packed"` (`peft_mole.packed_attention`): a packed row's sequences attend apart, in
chunks, with the outputs and gradients of SDPA over the whole row's block-diagonal mask; everything that is not a
packed row is transformers' `sdpa` unchanged."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch
from transformers import AttentionInterface, AutoModelForCausalLM
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from peft_mole import PACKED_SDPA, packed_attention, packed_attention_op
from peft_mole.packed_attention import chunk_bounds, keeps_sequences_apart, suggest_packed_attention
from tests.helpers import one_layer_base, tiny_base

LENGTHS = [5, 40, 3, 70, 17, 1, 26]  # in chunks of at most 32 tokens: [5], [40], [3], [70], [17, 1], [26]


def with_attention(model, attention: str):
    model.set_attn_implementation(attention)
    return model


def sdpa_calls(monkeypatch) -> list[int]:
    """The query length of each SDPA call that `sdpa_packed` makes: of transformers' `sdpa_attention_forward`, or
    of SDPA's CPU kernel, which the operator calls to keep its statistics (`packed_attention_op`)."""
    calls, real, kernel = [], packed_attention.sdpa_attention_forward, packed_attention_op.FLASH_FORWARD
    monkeypatch.setattr(packed_attention, "sdpa_attention_forward",
                        lambda module, query, *a, **k: calls.append(query.shape[2]) or real(module, query, *a, **k))
    monkeypatch.setattr(packed_attention_op, "FLASH_FORWARD",
                        lambda query, *a, **k: calls.append(query.shape[2]) or kernel(query, *a, **k))
    return calls


def packed_batch(lengths=LENGTHS, seed: int = 0) -> tuple[dict, list[torch.Tensor]]:
    """TRL's padding-free collator's batch of random sequences, and the sequences."""
    # (imported here: the GPU test files import this module, and the GPU image has no trl)
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    gen = torch.Generator().manual_seed(seed)
    sequences = [torch.randint(3, 512, (n,), generator=gen) for n in lengths]
    collator = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)
    return collator([{"input_ids": s.tolist()} for s in sequences]), sequences


def test_chunks_hold_whole_sequences_up_to_the_chunk_size():
    assert chunk_bounds([0, 50, 100, 300, 340, 360], 128) == [[0, 50, 100], [100, 300], [300, 340, 360]]
    assert chunk_bounds([0, 10, 20, 30], 30) == [[0, 10, 20, 30]]
    assert chunk_bounds([0, 10, 20, 30], 19) == [[0, 10], [10, 20], [20, 30]]
    assert chunk_bounds([0, 200], 128) == [[0, 200]]
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="chunk_tokens must be a positive int"):
            chunk_bounds([0, 4], bad)


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])  # tiny: 4 query heads share 2 kv heads each
def test_packed_rows_give_sdpas_outputs_and_gradients(family, monkeypatch):
    monkeypatch.setattr(packed_attention, "CHUNK_TOKENS", 32)
    calls = sdpa_calls(monkeypatch)
    batch, sequences = packed_batch()
    reference = tiny_base(family)
    packed = with_attention(tiny_base(family), PACKED_SDPA)
    want = reference(**batch, use_cache=False)
    got = packed(**batch, use_cache=False)
    layers = reference.config.num_hidden_layers
    assert calls == [5, 40, 3, 70, 18, 26] * layers  # the chunks' tokens: nothing ran over the whole row
    torch.testing.assert_close(got.logits, want.logits, atol=1e-5, rtol=1e-5)
    alone = torch.cat([reference(input_ids=s[None], use_cache=False).logits[0] for s in sequences])
    torch.testing.assert_close(got.logits[0], alone, atol=1e-5, rtol=1e-5)
    got.loss.backward()
    want.loss.backward()
    for (name, a), b in zip(packed.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-4, msg=name)
    assert max(p.grad.abs().max().item() for p in packed.parameters()) > 1e-3


@pytest.mark.parametrize("window", [16, 70])
def test_a_sliding_window_is_kept_within_each_chunk(window, monkeypatch):
    """Mistral's window (a key is seen while q − k < window) comes in transformers' mask, whose slice each chunk
    takes: the chunks give the masked row's logits whether the window is shorter than a sequence (16) or not."""
    calls = sdpa_calls(monkeypatch)
    batch, _ = packed_batch()
    reference = tiny_base("mistral", sliding_window=window)
    packed = with_attention(tiny_base("mistral", sliding_window=window), PACKED_SDPA)
    torch.testing.assert_close(packed(**batch, use_cache=False).logits, reference(**batch, use_cache=False).logits,
                               atol=1e-5, rtol=1e-5)
    assert calls == [48, 70, 44] * 2  # chunks of at most 64 tokens: [5, 40, 3], [70], [17, 1, 26]


def attention_inputs(tokens: int = 20, batch: int = 1, seed: int = 0) -> tuple:
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(batch, 4, tokens, 16, generator=gen) for _ in range(3))


@pytest.mark.parametrize("case", ["not causal", "is_causal=False", "position bias", "float mask", "two rows",
                                  "keys after a cache", "one sequence", "window shorter than a sequence"])
def test_what_is_not_a_packed_row_of_causal_sequences_runs_sdpa_over_the_row(case, monkeypatch):
    calls = sdpa_calls(monkeypatch)
    module = SimpleNamespace(is_causal=case != "not causal")
    query, key, value = attention_inputs(batch=2 if case == "two rows" else 1)
    positions = torch.tensor([[*range(8), *range(12)]]) if case != "one sequence" else torch.arange(20)[None]
    kwargs = {"position_ids": positions, "is_causal": False if case == "is_causal=False" else None,
              "position_bias": torch.zeros(1, 4, 20, 20) if case == "position bias" else None,
              "sliding_window": 8 if case == "window shorter than a sequence" else None}
    mask = torch.zeros(1, 1, 20, 20) if case == "float mask" else None
    if case == "keys after a cache":
        key, value = torch.cat([key, key], dim=2), torch.cat([value, value], dim=2)
    got, _ = packed_attention.packed_sdpa_attention_forward(module, query, key, value, mask, **kwargs)
    want, _ = sdpa_attention_forward(module, query, key, value, mask, **kwargs)
    assert calls == [20] and torch.equal(got, want)


def test_inference_mode_keeps_the_sequences_apart():
    """Inference tensors have no version counter: their plans are not kept, and nothing fails."""
    batch, sequences = packed_batch(seed=4)
    model = with_attention(tiny_base(), PACKED_SDPA).eval()
    with torch.inference_mode():
        got = model(**batch, use_cache=False).logits[0]
        again = model(**batch, use_cache=False).logits[0]
        alone = torch.cat([model(input_ids=s[None]).logits[0] for s in sequences])
    torch.testing.assert_close(got, alone, atol=1e-5, rtol=1e-5)
    assert torch.equal(got, again)


def test_a_mask_that_lets_a_sequence_see_ahead_is_kept_within_it(monkeypatch):
    """Spans that attend both ways (Gemma 3's image tokens) come in the row's mask: each chunk keeps them, and only
    what crosses from one sequence to another is cut."""
    module = SimpleNamespace(is_causal=True)
    query, key, value = attention_inputs()
    positions = torch.tensor([[*range(8), *range(12)]])
    sequence = torch.tensor([0] * 8 + [1] * 12)
    index = torch.arange(20)
    allowed = (sequence[:, None] == sequence[None, :]) & (index[:, None] >= index[None, :])
    allowed[2:6, 2:6] = True  # tokens 2..5 of the first sequence see each other
    allowed[12:15, 12:15] = True  # and 4..6 of the second
    mask = allowed[None, None]
    monkeypatch.setattr(packed_attention, "CHUNK_TOKENS", 8)  # the first sequence a chunk of its own, not causal
    got, _ = packed_attention.packed_sdpa_attention_forward(module, query, key, value, mask, position_ids=positions)
    want, _ = packed_attention.sdpa_attention_forward(module, query, key, value, mask)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    plan = packed_attention.chunk_plan(module, query, key, mask, {"position_ids": positions})
    assert [(start, end, mask is None) for start, end, mask in plan] == [(0, 8, False), (8, 20, False)]


def test_a_plan_is_made_anew_for_sequences_changed_in_place(monkeypatch):
    reads = []
    real = packed_attention.sequence_bounds
    monkeypatch.setattr(packed_attention, "sequence_bounds", lambda *a: reads.append(1) or real(*a))
    module = SimpleNamespace(is_causal=True)
    query, key, value = attention_inputs()
    positions = torch.tensor([[*range(8), *range(12)]])
    first = packed_attention.chunk_plan(module, query, key, None, {"position_ids": positions})
    assert packed_attention.chunk_plan(module, query, key, None, {"position_ids": positions}) is first
    positions[0, 10:] = torch.arange(10)
    plan = packed_attention.chunk_plan(module, query, key, None, {"position_ids": positions})
    assert len(reads) == 2 and [(start, end) for start, end, _ in plan] == [(0, 20)]  # one chunk of 8, 2 and 10
    assert first[0][2][0, 0, 10, 8] and not plan[0][2][0, 0, 10, 8]  # token 10 now starts a sequence


def test_a_plan_is_made_once_per_step_and_chunk_size(monkeypatch):
    """Every layer (and a checkpointed layer's recompute) gets the same tensors: the sequences are read from the
    device once; a tensor changed in place, or another chunk size, makes a new plan."""
    reads = []
    real = packed_attention.sequence_bounds
    monkeypatch.setattr(packed_attention, "sequence_bounds", lambda *a: reads.append(1) or real(*a))
    module = SimpleNamespace(is_causal=True)
    query, key, value = attention_inputs()
    kwargs = {"position_ids": torch.tensor([[*range(8), *range(12)]])}
    for _ in range(3):
        packed_attention.packed_sdpa_attention_forward(module, query, key, value, None, **kwargs)
    assert len(reads) == 1
    kwargs["position_ids"][0, 10:] = torch.arange(10)  # three sequences now: 8, 2 and 10 tokens
    monkeypatch.setattr(packed_attention, "CHUNK_TOKENS", 8)
    calls = sdpa_calls(monkeypatch)
    packed_attention.packed_sdpa_attention_forward(module, query, key, value, None, **kwargs)
    assert len(reads) == 2 and calls == [8, 2, 10]


def test_position_ids_alone_give_the_sequences():
    """Without the collator's `cu_seq_lens_q` the sequences start where the positions restart (transformers' rule
    for its packed mask); with a cache transformers' own `sdpa` builds no packed mask, `sdpa_packed` still keeps
    the sequences apart."""
    batch, sequences = packed_batch()
    inputs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"]}
    model = with_attention(tiny_base(), PACKED_SDPA)
    alone = torch.cat([model(input_ids=s[None]).logits[0] for s in sequences])
    torch.testing.assert_close(model(**inputs, use_cache=False).logits[0], alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model(**inputs, use_cache=True).logits[0], alone, atol=1e-5, rtol=1e-5)


def test_what_is_not_a_packed_row_is_sdpa_itself():
    """Padded rows, one sequence, and generation with a cache take `sdpa`'s own path: identical numbers."""
    reference, packed = tiny_base().eval(), with_attention(tiny_base(), PACKED_SDPA).eval()
    ids = torch.randint(3, 512, (2, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding
    for inputs in ({"input_ids": ids, "attention_mask": mask}, {"input_ids": ids[:1]}):
        assert torch.equal(packed(**inputs).logits, reference(**inputs).logits)
    generated = packed.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
    assert torch.equal(generated, reference.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False))


def test_a_saved_model_loads_with_the_packed_attention(tmp_path):
    tiny_base().save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation=PACKED_SDPA)
    assert model.config._attn_implementation == PACKED_SDPA
    batch, sequences = packed_batch(seed=2)
    alone = torch.cat([model(input_ids=s[None]).logits[0] for s in sequences])
    torch.testing.assert_close(model(**batch).logits[0], alone, atol=1e-5, rtol=1e-5)


def test_compiled_steps_run_the_chunks_in_one_opaque_operator(monkeypatch):
    """Under torch.compile the chunks (read on the host) would break the graph at every layer: the compiled forward
    calls `peft_mole.packed_sdpa` instead, one graph for packed rows of any length and mix (`dynamic=True`), whose
    logits and gradients equal those of the eager chunks under autograd (the operator off: as off the CPU)."""
    from torch._dynamo.testing import CompileCounterWithBackend

    monkeypatch.setattr(packed_attention, "CHUNK_TOKENS", 32)
    calls = sdpa_calls(monkeypatch)
    torch._dynamo.reset()
    model = with_attention(one_layer_base(), PACKED_SDPA)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter, dynamic=True)
    frames = []
    for lengths, seed in [(LENGTHS, 3), ([9, 50, 4, 30], 5)]:
        batch, _ = packed_batch(lengths, seed=seed)
        batch = {k: v for k, v in batch.items() if not k.startswith("max_length")}  # (ints Dynamo specialises on)
        with monkeypatch.context() as chunks_under_autograd:
            chunks_under_autograd.setattr(packed_attention_op, "keeps_statistics", lambda device: False)
            eager = model(**batch, use_cache=False)
            eager.loss.backward()
        want = [p.grad.clone() for p in model.parameters()]
        model.zero_grad()
        calls.clear()
        got = compiled(**batch, use_cache=False)
        got.loss.backward()
        assert calls and max(calls) < sum(lengths), calls  # the chunks ran (forward; the backward kept statistics)
        torch.testing.assert_close(got.logits, eager.logits, atol=1e-6, rtol=1e-6)
        for (name, p), g in zip(model.named_parameters(), want, strict=True):
            torch.testing.assert_close(p.grad, g, atol=1e-6, rtol=1e-5, msg=name)
        model.zero_grad()
        frames.append(counter.frame_count)
    assert frames[0] == frames[1]  # no recompile for another row (2 frames, as with `sdpa`: the model, the loss)
    assert torch._dynamo.explain(model)(**batch, use_cache=False).graph_break_count == 0


def test_the_operator_passes_torch_library_checks_and_gradcheck():
    from peft_mole.packed_attention_op import packed_sdpa, packed_sdpa_backward

    gen = torch.Generator().manual_seed(0)
    query, key, value = (torch.randn(1, heads, 20, 8, generator=gen, dtype=torch.float64, requires_grad=True)
                         for heads in (4, 2, 2))
    ends = torch.tensor([0, 8, 11, 20], dtype=torch.int32)
    index = torch.arange(20)
    mask = (torch.ones(20, 20, dtype=torch.bool).tril() & (index[:, None] - index < 6))[None, None]  # a window
    grad = torch.randn(1, 20, 4, 8, generator=gen, dtype=torch.float64)
    detached = (query.detach(), key.detach(), value.detach())
    for args in [(ends, None, 0.3, 2, False, None), (ends, mask, 0.3, 2, False, None)]:
        torch.library.opcheck(packed_sdpa, (*detached, *args))
        torch.library.opcheck(packed_sdpa, (query, key, value, *args))  # with gradients: through its backward
        kept = packed_sdpa(*detached, *args)  # (the output and the log-sum-exp its backward takes)
        torch.library.opcheck(packed_sdpa_backward, (grad, *detached, *kept, *args))
        assert torch.autograd.gradcheck(lambda q, k, v, a=args: packed_sdpa(q, k, v, *a)[0], (query, key, value))
    transposed = query.detach().transpose(1, 2).contiguous().transpose(1, 2)  # the strides a q_proj view gives
    kept = packed_sdpa(transposed, *detached[1:], ends, None, 0.3, 2, False, None)
    grads = packed_sdpa_backward(grad, transposed, *detached[1:], *kept, ends, None, 0.3, 2, False, None)
    assert grads[0].stride() == transposed.stride()  # as the fake implementation's `empty_like`


@pytest.mark.parametrize("masked", [False, True])
def test_the_operator_keeps_the_softmax_statistics_on_the_cpu_and_recomputes_nothing(masked, monkeypatch):
    """On the CPU the operator's backward takes each chunk's output and log-sum-exp to SDPA's kernel backward: the
    chunks run once per step, and the values and gradients are those of the chunks under autograd (transformers'
    SDPA calls: grouped keys for a causal chunk, repeated ones under a mask) and of the recomputing path (the one
    other devices take), bit for bit, with a chunk longer than 128 tokens; eager steps call it."""
    from peft_mole.packed_attention_op import packed_sdpa

    gen = torch.Generator().manual_seed(3)
    query, key, value = (torch.randn(1, heads, 161, 8, generator=gen) for heads in (4, 2, 2))
    ends = torch.tensor([0, 8, 11, 161], dtype=torch.int32)
    index = torch.arange(161)
    window = torch.ones(161, 161, dtype=torch.bool).tril() & (index[:, None] - index < 6)
    mask = window[None, None] if masked else None
    grad = torch.randn(1, 161, 4, 8, generator=gen)
    monkeypatch.setattr(packed_attention, "CHUNK_TOKENS", 12)  # [8, 3] and [150]
    module = SimpleNamespace(is_causal=True, num_key_value_groups=2)

    def gradients(run) -> tuple:
        inputs = [x.clone().requires_grad_() for x in (query, key, value)]
        output = run(*inputs)
        output.backward(grad)
        return (output.detach(), *(x.grad for x in inputs))

    calls = sdpa_calls(monkeypatch)
    kept = gradients(lambda q, k, v: packed_sdpa(q, k, v, ends, mask, 0.3, 2, False, None)[0])
    assert calls == [11, 150]  # the forward's chunks: none again in the backward
    plan = packed_attention.chunk_plan(module, query, key, mask, {"cu_seq_lens_q": ends})
    under_autograd = gradients(lambda q, k, v: packed_attention.run_plan(module, q, k, v, plan, 0.0, 0.3, {}))
    monkeypatch.setattr(packed_attention, "run_plan", None)  # eager steps: the operator, not the chunks
    eager = gradients(lambda q, k, v: packed_attention.packed_sdpa_attention_forward(
        module, q, k, v, mask, cu_seq_lens_q=ends, scaling=0.3)[0])
    monkeypatch.undo()  # (run_plan back, for the recomputing path)
    monkeypatch.setattr(packed_attention, "CHUNK_TOKENS", 12)
    monkeypatch.setattr(packed_attention_op, "keeps_statistics", lambda device: False)
    calls = sdpa_calls(monkeypatch)
    recomputed = gradients(lambda q, k, v: packed_sdpa(q, k, v, ends, mask, 0.3, 2, False, None)[0])
    assert calls == [11, 150] * 2  # forward, and again in the backward
    for other in (under_autograd, eager, recomputed):
        assert all(torch.equal(got, want) for got, want in zip(kept, other, strict=True))
    row_mask = mask if masked else torch.ones(161, 161, dtype=torch.bool).tril()[None, None]
    sequence = torch.repeat_interleave(torch.arange(3), torch.tensor([8, 3, 150]))
    row = gradients(lambda q, k, v: packed_attention.sdpa_attention_forward(
        module, q, k, v, row_mask & (sequence[:, None] == sequence)[None, None], scaling=0.3)[0])
    for got, want in zip(kept, row, strict=True):  # the masked row: the same up to rounding
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("case", ["value head size", "not contiguous"])
def test_inputs_the_cpu_kernel_does_not_take_run_the_chunks_through_sdpa(case, monkeypatch):
    """Multi-head latent attention (DeepSeek's) has a value head size other than the query's, which SDPA's flash
    kernel refuses (SDPA takes its math kernel); rows that are not contiguous it would misread. Both run the chunks
    through transformers' SDPA, eager and in the operator, with their gradients."""
    from peft_mole.packed_attention_op import packed_sdpa, takes_kernel

    gen = torch.Generator().manual_seed(4)
    query, key = (torch.randn(1, 4, 20, 24, generator=gen) for _ in range(2))
    value = torch.randn(1, 4, 20, 16 if case == "value head size" else 24, generator=gen)
    if case == "not contiguous":
        query, key, value = (torch.randn(1, 4, 20, 24, 2, generator=gen)[..., 0] for _ in range(3))
    assert not takes_kernel(query, key, value)
    ends = torch.tensor([0, 8, 20], dtype=torch.int32)
    module = SimpleNamespace(is_causal=True, num_key_value_groups=1)
    alone = [packed_attention.sdpa_attention_forward(module, query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], None,
                                                     scaling=0.2, is_causal=True)[0] for a, b in [(0, 8), (8, 20)]]
    want = torch.cat(alone, dim=1)
    eager, _ = packed_attention.packed_sdpa_attention_forward(module, query, key, value, None, cu_seq_lens_q=ends,
                                                              scaling=0.2)
    torch.testing.assert_close(eager, want, atol=1e-6, rtol=1e-6)
    inputs = [x.clone().requires_grad_() for x in (query, key, value)]
    output, _ = packed_sdpa(*inputs, ends, None, 0.2, 1, False, None)
    torch.testing.assert_close(output, want, atol=1e-6, rtol=1e-6)
    output.sum().backward()
    reference = [x.clone().requires_grad_() for x in (query, key, value)]
    chunks = [packed_attention.sdpa_attention_forward(module, *(x[:, :, a:b] for x in reference), None, scaling=0.2,
                                                      is_causal=True)[0] for a, b in [(0, 8), (8, 20)]]
    torch.cat(chunks, 1).sum().backward()
    for got, ref in zip(inputs, reference, strict=True):
        torch.testing.assert_close(got.grad, ref.grad, atol=1e-6, rtol=1e-6)


def test_compiled_steps_under_bf16_autocast_cast_as_sdpa_would():
    """Autocast casts SDPA's inputs to bf16, but a custom operator has no autocast rule: the compiled call casts
    them itself, so the compiled step runs (fp32 weights: the query and key leave RoPE in fp32, the value bf16) and
    gives the eager step's logits and gradients to bf16 rounding."""
    torch._dynamo.reset()
    batch, _ = packed_batch(seed=6)
    model = with_attention(one_layer_base(), PACKED_SDPA)
    results = []
    for run in (model, torch.compile(model, backend="aot_eager")):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = run(**batch, use_cache=False)
        out.loss.backward()
        results.append((out.logits.float(), [p.grad.clone() for p in model.parameters()]))
        model.zero_grad()
    (eager, eager_grads), (compiled, compiled_grads) = results
    assert compiled.dtype == eager.dtype and torch.isfinite(compiled).all()
    torch.testing.assert_close(compiled, eager, atol=2e-2, rtol=2e-2)
    for got, want in zip(compiled_grads, eager_grads, strict=True):
        torch.testing.assert_close(got, want, atol=2e-2, rtol=5e-2)


def test_sft_trainer_trains_padding_free_with_it_as_with_sdpa(tmp_path, monkeypatch):
    """Plain TRL: `SFTTrainer(padding_free=True)` on a base with `sdpa_packed` (with a MixLoRA adapter) logs the
    losses and ends with the adapter of the same run on `sdpa`'s masked rows."""
    from datasets import Dataset
    from peft import get_peft_model_state_dict
    from trl import SFTConfig, SFTTrainer

    from peft_mole import MixLoRAConfig, synthetic

    monkeypatch.setattr(packed_attention, "CHUNK_TOKENS", 16)  # the rows' sequences: 8 to 20 tokens
    chunked, real_chunks = [], packed_attention.chunk_bounds
    monkeypatch.setattr(packed_attention, "chunk_bounds", lambda *a: chunked.append(real_chunks(*a)) or chunked[-1])
    tokenizer = synthetic.demo_tokenizer()
    rows = [{"prompt": r["prompt"], "completion": r["completion"]} for r in synthetic.multitask_rows(24)]
    results = {}
    for attention in ("sdpa", PACKED_SDPA):
        base = with_attention(tiny_base(vocab_size=len(tokenizer)), attention)
        args = SFTConfig(output_dir=str(tmp_path / attention), max_steps=3, per_device_train_batch_size=8,
                         learning_rate=5e-3, logging_steps=1, report_to=[], save_strategy="no", use_cpu=True,
                         bf16=False, padding_free=True, max_length=None, seed=0, dataloader_num_workers=0)
        trainer = SFTTrainer(model=base, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                             peft_config=MixLoRAConfig(num_experts=4, top_k=2, r=4, lora_dropout=0.0))
        trainer.train()
        losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
        results[attention] = (losses, get_peft_model_state_dict(trainer.model))
    (sdpa_losses, sdpa_weights), (losses, weights) = results["sdpa"], results[PACKED_SDPA]
    assert len(losses) == 3 and losses == pytest.approx(sdpa_losses, rel=1e-5)
    assert chunked and all(len(chunks) > 1 for chunks in chunked)  # every layer's packed rows ran in chunks
    assert max(w.abs().max().item() for k, w in weights.items() if "lora_B" in k) > 1e-4  # (B starts at 0)
    assert max((weights[k] - sdpa_weights[k]).abs().max().item() for k in weights) < 1e-5


def test_which_attentions_keep_packed_sequences_apart():
    assert keeps_sequences_apart("flash_attention_2") and keeps_sequences_apart(PACKED_SDPA)
    assert not keeps_sequences_apart("sdpa") and not keeps_sequences_apart(None)


def test_a_padding_free_run_on_sdpa_is_told_of_the_packed_attention(caplog):
    with caplog.at_level(logging.INFO, logger="peft_mole.packed_attention"):
        for attention, padding_free in [("sdpa", False), (PACKED_SDPA, True), ("flash_attention_2", True)]:
            suggest_packed_attention(attention, padding_free)
        assert not caplog.records
        suggest_packed_attention("sdpa", True)
    assert len(caplog.records) == 1 and "attn_implementation='sdpa_packed'" in caplog.records[0].getMessage()



def test_a_packed_rows_mask_is_left_to_the_chunks_and_any_other_mask_is_sdpas(monkeypatch):
    """transformers asks `sdpa_packed`'s mask function for each forward's mask: a packed row of plainly causal
    sequences gets None (no (T × T) tensor; the chunks make their blocks from the bounds), with `sdpa`'s logits;
    padding, a window, spans that see ahead (PaliGemma's image blocks), several rows or custom mask functions get
    `sdpa_mask`'s own mask."""
    from transformers import LlamaConfig
    from transformers.masking_utils import (
        and_masks,
        blockwise_overlay,
        find_packed_sequence_indices,
        or_masks,
        packed_sequence_mask_function,
        remap_positions_for_packed_sequence,
        sliding_window_causal_mask_function,
    )

    positions = torch.tensor([[*range(8), *range(12)]])
    apart = packed_sequence_mask_function(find_packed_sequence_indices(positions))
    causal = and_masks(remap_positions_for_packed_sequence(packed_attention.causal_mask_function, positions), apart)
    row = {"batch_size": 1, "q_length": 20, "kv_length": 20, "allow_is_causal_skip": False, "device": "cpu",
           "config": LlamaConfig()}
    assert packed_attention.packed_sdpa_mask(**row, mask_function=causal) is None
    assert packed_attention.packed_sdpa_mask(**row, mask_function=causal,
                                             attention_mask=torch.ones(1, 20, dtype=torch.bool)) is None
    padded = torch.ones(1, 20, dtype=torch.bool)
    padded[0, 13] = False
    image = torch.full((1, 20), -1)
    image[0, 2:6] = 0
    window = remap_positions_for_packed_sequence(sliding_window_causal_mask_function(4), positions)
    for case in [dict(row, mask_function=causal, attention_mask=padded),
                 dict(row, mask_function=and_masks(window, apart), local_size=4),
                 dict(row, mask_function=and_masks(or_masks(
                     remap_positions_for_packed_sequence(packed_attention.causal_mask_function, positions),
                     blockwise_overlay(image)), apart)),
                 dict(row, mask_function=causal, use_vmap=True),
                 dict(row, batch_size=2, mask_function=packed_attention.causal_mask_function),
                 dict(row, q_length=1, kv_offset=19, mask_function=packed_attention.causal_mask_function),
                 # models that use the mask themselves (Doge's dynamic mask, DeepSeek V3.2's indexer), or unknown
                 dict(row, mask_function=causal, config=SimpleNamespace(model_type="doge")),
                 dict(row, mask_function=causal, config=None)]:
        want = packed_attention.sdpa_mask(**case)
        assert want is not None and torch.equal(packed_attention.packed_sdpa_mask(**case), want), case

    masks = []  # what the attention function gets
    real = packed_attention.packed_sdpa_attention_forward
    AttentionInterface.register(PACKED_SDPA, lambda module, q, k, v, mask, **kw: masks.append(mask)
                                or real(module, q, k, v, mask, **kw))
    try:
        batch, _ = packed_batch()
        model = with_attention(tiny_base(), PACKED_SDPA)
        got = model(**batch, use_cache=False).logits
    finally:
        packed_attention.register()
    torch.testing.assert_close(got, tiny_base()(**batch, use_cache=False).logits, atol=1e-5, rtol=1e-5)
    assert masks == [None] * 2  # no mask built for either layer: the chunks made their blocks

"""Activation checkpointing with the jobs' random streams (`ops.stream_checkpoint`): a checkpointed layer's
recomputation in the backward draws what its forward drew, eager and compiled, so gradients equal those of a model
that keeps its activations."""

from __future__ import annotations

import contextlib
from types import SimpleNamespace

import pytest
import torch
from torch._dynamo.utils import counters

from peft_mole.multijob.model import enable_activation_checkpointing
from peft_mole.ops.dropout import Dropout, register_stream, set_stream_widths, stream_generator
from peft_mole.ops.stream_checkpoint import replay_streams_in_checkpoints, stream_replay_contexts
from tests.helpers import dynmole, randomize_adapters, tiny_base
from tests.multijob.test_job_streams import NOISY, _models

TRAINER_CHECKPOINTING = SimpleNamespace(gradient_checkpointing_kwargs=None, activation_checkpointing_kwargs=None)


def _assert_same_gradients(got, want, rtol: float, atol: float) -> None:
    """Every adapter gradient of `want` matched by `got` (more than ten of them: the jobs' adapters)."""
    pairs = [(g, w) for g, w in zip(got, want, strict=True) if w is not None]
    assert len(pairs) > 10
    for g, w in pairs:
        torch.testing.assert_close(g, w, rtol=rtol, atol=atol)


def test_checkpointed_layers_recompute_each_jobs_masks_as_the_forward_drew_them():
    """Activation checkpointing recomputes each decoder layer in the backward. torch restores only its default
    generator there; the jobs' streams are replayed (`stream_replay_contexts`), so the gradients equal those of the
    model that keeps its activations, and the streams end where the forward left them. A caller's own `context_fn`
    still runs."""
    kept, checkpointed = _models(2)
    entered = []

    @contextlib.contextmanager
    def counting(kind):
        entered.append(kind)
        yield

    checkpointed.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={
        "use_reentrant": False, "context_fn": lambda: (counting("forward"), counting("recompute"))})
    layers = sum(hasattr(m, "gradient_checkpointing") for m in checkpointed.model.modules()) - 1
    assert replay_streams_in_checkpoints(checkpointed.model) == layers + 1  # the layers and the decoder
    assert replay_streams_in_checkpoints(checkpointed.model) == 0  # wrapped once
    ids = torch.randint(3, 500, (4, 9), generator=torch.Generator().manual_seed(0))
    names = ["m", "a", "b", "n"]
    results = []
    for model in (kept, checkpointed):
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), adapter_names=names, use_cache=False)
        params = [p for p in model.parameters() if p.requires_grad]
        grads = torch.autograd.grad(out.logits.square().mean(), params, allow_unused=True)
        routed = next(m for m in model.modules() if isinstance(getattr(m, "settings", None), dict))
        states = {name: routed.settings[name].jitter_stream for name in ("m", "n")}
        results.append((out.logits, grads, {job: stream_generator(s).get_state() for job, s in states.items()}))
    (want, want_grads, want_states), (got, got_grads, got_states) = results
    assert entered.count("forward") == layers and entered.count("recompute") == layers
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    _assert_same_gradients(got_grads, want_grads, rtol=1e-5, atol=1e-6)
    for job in want_states:  # the recomputation put each stream back
        assert torch.equal(got_states[job], want_states[job]), job


def test_training_with_activation_checkpointing_and_dropout_gives_the_adapters_of_training_without(assets, tmp_path):
    """MultiJobTrainer with `gradient_checkpointing=True` (TRL's default), dropout 0.3 and router jitter on: the
    adapters after 3 steps equal those of the run that keeps its activations."""
    from safetensors.torch import load_file

    from peft_mole import JobConfig, MultiJobTrainer
    from tests.multijob.test_trainer import run_args

    tokenizer, datasets = assets
    for checkpointing in (False, True):
        jobs = [JobConfig("lora", NOISY["a"], datasets["sentiment"], per_device_train_batch_size=2),
                JobConfig("mix", NOISY["m"], datasets["capital"], per_device_train_batch_size=2)]
        trainer = MultiJobTrainer(model=tiny_base(vocab_size=len(tokenizer)), jobs=jobs, processing_class=tokenizer,
                                  args=run_args(tmp_path / str(checkpointing), gradient_checkpointing=checkpointing))
        randomize_adapters(trainer.jobs_model, seed=3)
        trainer.train()
    for job in ("lora", "mix"):
        kept = load_file(tmp_path / "False" / job / "adapter_model.safetensors")
        checkpointed = load_file(tmp_path / "True" / job / "adapter_model.safetensors")
        assert max((kept[k] - checkpointed[k]).abs().max().item() for k in kept) <= 1e-6, job


WITH_DYNMOLE = {"a": NOISY["a"], "d": dynmole(lora_dropout=0.3, jitter_noise=0.1)}


@pytest.mark.parametrize("jobs", ["lora-mixlora", "lora-dynmole"])
def test_compiled_checkpointed_layers_draw_nothing_again_in_the_backward(jobs):
    """Compiled mixed steps (aot_eager) with checkpointed decoder layers, as `MultiJobTrainer` sets them up:
    gradients equal the eager model's that keeps its activations, and the streams end the backward where the
    forward left them. Compiled layers checkpoint selectively and keep the drawn masks and jitter; a layer with a
    DynMoLE block (run eagerly, a graph break) checkpoints eagerly and replays its draws."""
    configs, names = ((NOISY, ["a", "m", "b", "a", "n"]) if jobs == "lora-mixlora"
                      else (WITH_DYNMOLE, ["a", "d", "a", "d"]))
    kept, compiled = _models(2, configs)
    enable_activation_checkpointing(compiled.model, TRAINER_CHECKPOINTING)
    torch._dynamo.reset()
    counters.clear()
    compiled.compile_mixed_steps(backend="aot_eager")
    ids = torch.randint(3, 500, (len(names), 7), generator=torch.Generator().manual_seed(1))
    results = []
    for model in (kept, compiled):
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), adapter_names=names, use_cache=False)
        streams = {m.stream for m in model.modules() if getattr(m, "stream", 0)}
        after_forward = {s: stream_generator(s).get_state() for s in streams}
        params = [p for p in model.parameters() if p.requires_grad]
        grads = torch.autograd.grad(out.logits.square().mean(), params, allow_unused=True)
        assert all(torch.equal(stream_generator(s).get_state(), state) for s, state in after_forward.items())
        results.append((out.logits, grads))
    if jobs == "lora-mixlora":
        assert not counters["graph_break"], dict(counters["graph_break"])
    (want, want_grads), (got, got_grads) = results
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    _assert_same_gradients(got_grads, want_grads, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("rows", ["same", "reordered"])
def test_the_recomputation_sees_the_widths_and_rows_of_its_own_forward(rows):
    """Right-padded rows of unequal lengths; another training forward (other widths, and its rows in another order)
    runs between a forward and its backward: the checkpointed model's gradients still equal those of the model that
    keeps its activations, as the recomputation draws over the widths its forward drew over and runs its rows'
    adapters (before 2026-12-08 the later forward's rows: 1.8e-3 off)."""
    kept, checkpointed = _models(2)
    enable_activation_checkpointing(checkpointed.model, TRAINER_CHECKPOINTING)
    names = ["m", "a", "b", "a", "n", "__base__"]
    ids = torch.randint(3, 500, (len(names), 12), generator=torch.Generator().manual_seed(3))
    mask = (torch.arange(12) < torch.tensor([5, 9, 4, 7, 6, 12]).unsqueeze(1)).long()
    grads = []
    for model in (kept, checkpointed):
        out = model(input_ids=ids, attention_mask=mask, adapter_names=names, use_cache=False)
        other = names if rows == "same" else [names[i] for i in (2, 0, 5, 1, 3, 4)]
        model(input_ids=ids[:, :8], attention_mask=mask[:, :8].flip(0), adapter_names=other, use_cache=False)
        params = [p for p in model.parameters() if p.requires_grad]
        grads.append(torch.autograd.grad(out.logits.square().mean(), params, allow_unused=True))
    _assert_same_gradients(grads[1], grads[0], rtol=1e-5, atol=1e-7)


def test_nested_replay_regions_restore_each_their_own_states():
    """A checkpointed region inside another (each with `stream_replay_contexts`), both drawing from one stream, or
    the inner one drawing nothing: each region's recomputation draws from the state its forward began with, and
    leaving a region removes its own record (not an equal one of the enclosing region)."""
    dropout = Dropout(0.5)
    dropout.use_stream(register_stream(torch.Generator().manual_seed(4)))
    x = torch.ones(64)
    for inner_draws in (True, False):
        outer_forward, outer_recompute = stream_replay_contexts()
        inner_forward, inner_recompute = stream_replay_contexts()
        with outer_forward:
            first = dropout(x)
            with inner_forward:
                inner = dropout(x) if inner_draws else None
            after_inner = dropout(x)
        end = stream_generator(dropout.stream).get_state()
        with outer_recompute:  # the outer region again: the inner checkpoint runs its forward anew inside it
            torch.testing.assert_close(dropout(x), first, rtol=0, atol=0)
            with stream_replay_contexts()[0]:
                again = dropout(x) if inner_draws else None
            torch.testing.assert_close(dropout(x), after_inner, rtol=0, atol=0)
        if inner_draws:
            torch.testing.assert_close(again, inner, rtol=0, atol=0)
            with inner_recompute:  # the inner region's own recomputation
                torch.testing.assert_close(dropout(x), inner, rtol=0, atol=0)
        assert torch.equal(stream_generator(dropout.stream).get_state(), end)  # each recomputation put it back
    set_stream_widths({})


def test_only_non_reentrant_checkpointing_is_wrapped():
    """torch takes a checkpoint without `use_reentrant` as reentrant, which accepts no context_fn: such layers are
    left as they are (a forward then works), and `use_reentrant=False` layers are wrapped."""
    base = tiny_base()
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"preserve_rng_state": True})
    assert replay_streams_in_checkpoints(base) == 0
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert replay_streams_in_checkpoints(base) > 0

"""Each job's own random stream (`MultiJobModel.set_job_streams`, `ops.job_streams`): a job's dropout masks and
router jitter do not depend on the other jobs in its step, and the per-row (compiled) layers draw what the eager
layers draw."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig
from torch._dynamo.utils import counters

from peft_mole import JobConfig, MultiJobTrainer
from peft_mole.multijob import MultiJobModel
from peft_mole.ops.dropout import stream_generator
from tests.helpers import mixlora, randomize_adapters, tiny_base
from tests.multijob.test_trainer import ALL_LINEAR, run_args

NOISY = {
    "a": LoraConfig(r=4, lora_alpha=8, lora_dropout=0.3, target_modules=ALL_LINEAR),
    "b": LoraConfig(r=4, lora_alpha=8, lora_dropout=0.3, target_modules=ALL_LINEAR),  # a's rank and rate: stacked
    "m": mixlora(lora_dropout=0.2, jitter_noise=0.1),
    "n": mixlora(num_experts=3, top_k=1, r=8, lora_dropout=0.5),
}


def _models(count: int, configs: dict | None = None) -> list[MultiJobModel]:
    """`count` equal models of `configs` (default NOISY) in training mode, each job with its own stream."""
    configs = configs or NOISY
    first = MultiJobModel(tiny_base(), configs)
    randomize_adapters(first)
    models = [first] + [MultiJobModel(tiny_base(), configs) for _ in range(count - 1)]
    for model in models[1:]:
        model.load_state_dict(first.state_dict())
    for model in models:
        model.set_job_streams({job: 11 + i for i, job in enumerate(configs)})
        model.train()
    return models


def test_a_jobs_masks_and_jitter_do_not_depend_on_the_other_jobs_in_its_step():
    """The same rows of each job, once in a mixed batch of all four jobs and once alone: the same outputs, in
    training mode (dropout and jitter on); torch's default generator is left alone."""
    mixed_model, *alone_models = _models(1 + len(NOISY))
    ids = torch.randint(3, 500, (6, 9), generator=torch.Generator().manual_seed(0))
    names = ["m", "a", "b", "a", "n", "m"]
    state = torch.get_rng_state()
    mixed = mixed_model(input_ids=ids, attention_mask=torch.ones_like(ids), adapter_names=names).logits
    assert torch.equal(torch.get_rng_state(), state)  # every draw came from the jobs' own streams
    eval_logits = mixed_model.eval()(input_ids=ids, attention_mask=torch.ones_like(ids), adapter_names=names).logits
    for job, model in zip(NOISY, alone_models, strict=True):
        rows = [i for i, name in enumerate(names) if name == job]
        alone = model(input_ids=ids[rows], attention_mask=torch.ones_like(ids[rows]), adapter_names=[job] * len(rows))
        torch.testing.assert_close(mixed[rows], alone.logits, rtol=1e-5, atol=1e-5)
        assert (mixed[rows] - eval_logits[rows]).abs().max() > 1e-3, job  # the noise is really on


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_per_job_dropout_scales_as_the_jobs_own_dropout_in_every_dtype(dtype):
    """The per-row layers' dropout (`per_job_dropout`) equals each job's `Dropout` on the same draws, bit for bit,
    values and gradients: the scale is applied in opmath precision and rounded once (it was rounded to x's dtype
    first: 1 ulp off in bfloat16, 2e-8 in float64)."""
    from peft_mole.ops.dropout import Dropout, register_stream
    from peft_mole.ops.job_streams import per_job_dropout

    dropouts = [Dropout(0.3), Dropout(0.1)]
    for seed, module in enumerate(dropouts):
        module.use_stream(register_stream(torch.Generator().manual_seed(seed)))
    x = torch.randn(4, 64, dtype=torch.float64).to(dtype).requires_grad_()
    rows = torch.tensor([0, 1, 1, 0])
    states = [stream_generator(d.stream).get_state() for d in dropouts]
    joined = per_job_dropout(x, rows, dropouts)
    for module, state in zip(dropouts, states, strict=True):
        stream_generator(module.stream).set_state(state)
    each = torch.empty_like(joined)
    for job, module in enumerate(dropouts):  # each job's rows in order through its module: its stream's draws
        each[rows == job] = module(x[rows == job])
    assert torch.equal(joined, each)
    (g1,) = torch.autograd.grad((joined * joined.detach()).sum(), x)
    (g2,) = torch.autograd.grad((each * each.detach()).sum(), x)
    assert torch.equal(g1, g2)


def test_per_row_layers_draw_no_down_mask_for_a_job_without_down_experts():
    """A MixLoRA job with experts on gate and up only, beside one with down experts: the per-row block drew a down
    mask for it too (an extra draw from its stream, 0.15 off its eager logits); now only for jobs with down experts."""
    configs = {"m": mixlora(lora_dropout=0.2), "g": mixlora(expert_target_modules=["gate_proj", "up_proj"],
                                                             lora_dropout=0.3)}
    eager, per_row = _models(2, configs)
    _per_row(per_row, compiled=False)
    for step in range(2):  # (the second step's masks follow the first's draws)
        ids = torch.randint(3, 500, (3, 7), generator=torch.Generator().manual_seed(step))
        logits = [model(input_ids=ids, attention_mask=torch.ones_like(ids), adapter_names=["m", "g", "m"]).logits
                  for model in (eager, per_row)]
        torch.testing.assert_close(logits[1], logits[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layers", ["eager", "per-row", "per-row-compiled"])
def test_a_jobs_draws_do_not_depend_on_how_far_the_rows_beside_it_are_padded(layers):
    """Right-padded rows of unequal lengths, with a base row longer than any job's: each job's rows in the mixed
    step give, on every real token, what they give alone padded to their own longest row only. The streams draw
    over each job's own width (`ops.dropout.stream_draw`), not the step's (before, a job's masks shifted with the
    width of the rows beside it)."""
    mixed_model, *alone_models = _models(1 + len(NOISY))
    if layers != "eager":
        _per_row(mixed_model, compiled=layers == "per-row-compiled")
    names = ["m", "a", "b", "a", "n", "m", "__base__"]
    lengths = torch.tensor([5, 9, 4, 7, 6, 3, 12])
    ids = torch.randint(3, 500, (len(names), 12), generator=torch.Generator().manual_seed(2))
    mask = (torch.arange(12) < lengths.unsqueeze(1)).long()
    mixed = mixed_model(input_ids=ids, attention_mask=mask, adapter_names=names).logits
    for job, model in zip(NOISY, alone_models, strict=True):
        rows = [i for i, name in enumerate(names) if name == job]
        own = int(lengths[rows].max())
        alone = model(input_ids=ids[rows, :own], attention_mask=mask[rows, :own], adapter_names=[job] * len(rows))
        real = mask[rows, :own].bool()
        torch.testing.assert_close(mixed[rows, :own][real], alone.logits[real], rtol=1e-5, atol=1e-5)


def _per_row(model: MultiJobModel, compiled: bool, backend: str = "aot_eager") -> None:
    """Switch `model` to the layers of compiled multi-job steps, compiled (by `backend`) or run eagerly."""
    if compiled:
        torch._dynamo.reset()
        counters.clear()
        model.compile_mixed_steps(backend=backend)
    else:
        model.__dict__["_compiled_steps"] = True  # the per-row layers, run eagerly


@pytest.mark.parametrize("compiled", [False, True], ids=["per-row-eager", "per-row-compiled"])
def test_per_row_layers_draw_each_jobs_stream_as_the_eager_layers_do(compiled):
    """The layers of compiled multi-job steps draw each job's rows from its stream in row order, as the eager
    layers draw its row group: equal logits and gradients in training mode, with rows of one job apart."""
    eager, per_row = _models(2)
    _per_row(per_row, compiled)
    ids = torch.randint(3, 500, (5, 7), generator=torch.Generator().manual_seed(1))
    names = ["a", "m", "b", "a", "n"]  # a's rows are not consecutive
    results = []
    for model in (eager, per_row):
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), adapter_names=names)
        params = [p for p in model.parameters() if p.requires_grad]
        results.append((out.logits, torch.autograd.grad(out.logits.square().mean(), params, allow_unused=True)))
    (want, want_grads), (got, got_grads) = results
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    if compiled:  # the per-job operators stay in the graph (MixLoRA blocks compile whole too)
        assert not counters["graph_break"], dict(counters["graph_break"])
    for g, w in zip(got_grads, want_grads, strict=True):
        if w is None:
            assert g is None or g.abs().max() == 0
        else:
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


def test_streams_set_again_keep_their_ids_so_a_compiled_step_is_not_compiled_again():
    """Each `train()` sets the jobs' streams afresh (from their seeds, or a checkpoint's states). The jobs keep their
    stream ids, constants in the compiled graphs' guards, and the new generators take their places: the same draws
    as at the first setting, and no new graph (before, new ids at every `train()`: a second call on one compiled
    trainer compiled again, and again at each resume)."""
    (model,) = _models(1)
    _per_row(model, compiled=True)
    ids = torch.randint(3, 500, (4, 6), generator=torch.Generator().manual_seed(3))
    names = ["a", "m", "b", "n"]
    seeds = {job: 11 + i for i, job in enumerate(NOISY)}
    first_ids = dict(model.__dict__["_stream_ids"])
    first = model(input_ids=ids, attention_mask=torch.ones_like(ids), adapter_names=names).logits
    graphs = counters["stats"]["unique_graphs"]
    generators = model.set_job_streams(seeds)
    assert model.__dict__["_stream_ids"] == first_ids
    assert all(stream_generator(first_ids[job]) is generators[job] for job in NOISY)
    again = model(input_ids=ids, attention_mask=torch.ones_like(ids), adapter_names=names).logits
    assert torch.equal(again, first) and counters["stats"]["unique_graphs"] == graphs >= 1


def test_a_copied_model_gets_streams_of_its_own_and_a_dropped_models_streams_are_forgotten():
    """A deep copy carries the ids; setting its streams must not take the original's ids over (the original would
    then draw from the copy's generators). A model's streams leave the registry with it."""
    import copy
    import gc

    (model,) = _models(1, {"a": NOISY["a"]})
    ids = dict(model.__dict__["_stream_ids"])
    generator = stream_generator(ids["a"])
    twin = copy.deepcopy(model)
    twin.set_job_streams({"a": 5})
    assert twin.__dict__["_stream_ids"]["a"] != ids["a"] and stream_generator(ids["a"]) is generator
    twin_id = twin.__dict__["_stream_ids"]["a"]
    del twin
    gc.collect()
    with pytest.raises(KeyError, match=f"random stream {twin_id} is not registered"):
        stream_generator(twin_id)


def test_stacked_blocks_draw_each_jobs_stream_and_apply_the_masks_in_one_pass():
    """`dropout_pieces`: the joined masks of equal-rate jobs give what each job's own dropout gives its block."""
    from peft_mole.ops.dropout import Dropout, register_stream
    from peft_mole.ops.job_streams import dropout_pieces

    dropouts = [Dropout(0.25) for _ in range(3)]
    for seed, module in enumerate(dropouts):
        module.use_stream(register_stream(torch.Generator().manual_seed(seed)))
    x = torch.randn(6, 5, 8, requires_grad=True)
    states = [torch.Generator().manual_seed(seed).get_state() for seed in range(3)]
    joined = dropout_pieces(x, [1, 3, 2], dropouts)
    for module, state in zip(dropouts, states, strict=True):  # the same draws again, block by block
        stream_generator(module.stream).set_state(state)
    each = torch.cat([d(piece) for d, piece in zip(dropouts, x.split([1, 3, 2]), strict=True)])
    torch.testing.assert_close(joined, each, rtol=0, atol=0)
    (g1,) = torch.autograd.grad(joined.sum(), x)
    (g2,) = torch.autograd.grad(each.sum(), x)
    torch.testing.assert_close(g1, g2, rtol=0, atol=0)
    assert 0.6 < (joined != 0).float().mean() < 0.9


@pytest.mark.parametrize("layers", ["eager", "per-row", "per-row-compiled"])
def test_a_micro_batch_cut_into_steps_draws_each_row_as_it_does_whole(layers):
    """A LoRA job's micro-batch of rows of unequal lengths, run whole, then cut into two steps by rows (each cut to
    its longest row, beside a longer base row) with `drawing_pieces` and the stream restarted for each piece: every
    real token's logits are those of the whole run, and the stream ends where the whole run left it. Without
    `drawing_pieces` a piece draws other masks."""
    whole_model, cut_model = _models(2)
    if layers != "eager":  # (Dynamo's graphs run as traced: a piece changes what the opaque draw operator does at
        # run time, which AOTAutograd never sees; its draws are test_per_row_layers_draw_each_jobs_stream_...'s)
        _per_row(cut_model, compiled=layers == "per-row-compiled", backend="eager")
    lengths = torch.tensor([5, 9, 4, 7])
    ids = torch.randint(3, 500, (4, 10), generator=torch.Generator().manual_seed(4))
    mask = (torch.arange(10) < lengths.unsqueeze(1)).long()
    stream = stream_generator(cut_model.__dict__["_stream_ids"]["a"])
    start = stream.get_state()
    whole = whole_model(input_ids=ids, attention_mask=mask, adapter_names=["a"] * 4).logits
    end = stream_generator(whole_model.__dict__["_stream_ids"]["a"]).get_state()
    base_ids, base_mask = torch.randint(3, 500, (1, 12)), torch.ones(1, 12, dtype=torch.long)
    # rows [1, 3] beside a longer base row (the step wider than the whole micro-batch), then rows [0, 2] alone (the
    # step narrower than it); rows not contiguous in the micro-batch
    for rows, beside in (([1, 3], True), ([0, 2], False)):
        own = int(lengths[rows].max())
        piece_ids, piece_mask, names = ids[rows, :own], mask[rows, :own], ["a", "a"]
        if beside:
            piece_ids = torch.cat([torch.nn.functional.pad(piece_ids, (0, 12 - own)), base_ids])
            piece_mask = torch.cat([torch.nn.functional.pad(piece_mask, (0, 12 - own)), base_mask])
            names = names + ["__base__"]
        stream.set_state(start)
        with cut_model.drawing_pieces({"a": (rows, 4, int(lengths.max()))}):
            cut = cut_model(input_ids=piece_ids, attention_mask=piece_mask, adapter_names=names).logits
        real = mask[rows, :own].bool()
        torch.testing.assert_close(cut[:2, :own][real], whole[rows, :own][real], rtol=1e-5, atol=1e-5)
    assert torch.equal(stream.get_state(), end)
    stream.set_state(start)  # without it, the piece draws as a micro-batch of its own rows
    plain = cut_model(input_ids=piece_ids, attention_mask=piece_mask, adapter_names=names).logits
    assert (plain[:2, :own][real] - whole[[0, 2], :own][real]).abs().max() > 1e-3


@pytest.mark.parametrize("layers", ["eager", "per-row", "per-row-compiled"])
def test_a_packed_micro_batch_cut_into_halves_draws_each_token_as_it_does_whole(layers):
    """A LoRA job's padding-free micro-batch (one packed row of four sequences) run whole, then as two halves of
    its sequences, each with `drawing_pieces` over its tokens' indices and the stream restarted: every token's
    logits are those of the whole run (a packed row's layers see each token as a row of width 1; no cache, so the
    attention is block-diagonal, as in training), and the stream
    ends where the whole run left it. Without `drawing_pieces` a half draws other masks."""
    whole_model, cut_model = _models(2)
    if layers != "eager":  # (Dynamo's graphs run as traced: a piece changes what the opaque draw operator does at
        # run time, which AOTAutograd never sees; its draws are test_per_row_layers_draw_each_jobs_stream_...'s)
        _per_row(cut_model, compiled=layers == "per-row-compiled", backend="eager")
    lengths = [5, 9, 4, 7]
    ids = torch.randint(3, 500, (1, sum(lengths)), generator=torch.Generator().manual_seed(5))
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    stream = stream_generator(cut_model.__dict__["_stream_ids"]["a"])
    start = stream.get_state()
    names = ["a"] * ids.shape[1]
    whole = whole_model(input_ids=ids, position_ids=positions, adapter_names=names, use_cache=False).logits
    end = stream_generator(whole_model.__dict__["_stream_ids"]["a"]).get_state()
    middle = lengths[0] + lengths[1]
    for tokens in (range(0, middle), range(middle, ids.shape[1])):
        part = slice(tokens.start, tokens.stop)
        stream.set_state(start)
        with cut_model.drawing_pieces({"a": (list(tokens), ids.shape[1], 1)}):
            cut = cut_model(input_ids=ids[:, part], position_ids=positions[:, part], adapter_names=["a"] * len(tokens),
                            use_cache=False)
        torch.testing.assert_close(cut.logits, whole[:, part], rtol=1e-5, atol=1e-5)
    assert torch.equal(stream.get_state(), end)
    stream.set_state(start)  # without it, the half draws as a micro-batch of its own tokens
    plain = cut_model(input_ids=ids[:, part], position_ids=positions[:, part], adapter_names=["a"] * len(tokens),
                      use_cache=False)
    assert (plain.logits - whole[:, part]).abs().max() > 1e-3


def test_a_resume_warns_that_the_bases_own_dropout_does_not_resume(assets, tmp_path, caplog):
    """Each job's adapter dropout and jitter resume exactly (their streams are in its checkpoints); a base whose
    config turns on dropout of its own draws from torch's generator, which `train()` seeds afresh: a warning names
    the rates (the resumed run was 1.07e-3 off an uninterrupted one, silently)."""
    tokenizer, datasets = assets
    jobs = [JobConfig("lora", LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=ALL_LINEAR),
                      datasets["capital"], max_steps=2)]
    for dropout in (0.0, 0.5):
        built = MultiJobTrainer(model=tiny_base(vocab_size=len(tokenizer), attention_dropout=dropout), jobs=jobs,
                                processing_class=tokenizer, args=run_args(tmp_path / str(dropout)))
        built.train()
        caplog.clear()
        built.train(resume_from_checkpoint=True)
        warned = [r.getMessage() for r in caplog.records if "base model's own dropout" in r.getMessage()]
        if dropout:
            assert len(warned) == 1 and "attention_dropout=0.5" in warned[0]
        else:
            assert warned == []

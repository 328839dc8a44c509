"""A job's optimizer over flat tensors (`multijob.flat_parameters`) moves every weight as the per-tensor one does,
keeps the module's parameters and saved layout, and resumes across the two layouts."""

from __future__ import annotations

import os

import pytest
import torch
from peft import LoraConfig
from safetensors.torch import load_file
from torch import nn
from transformers import TrainerCallback

from peft_mole import JobConfig, MultiJobTrainer
from peft_mole.multijob.flat_parameters import FlatGroups, flattening_applies, job_optimizer
from tests.helpers import mixlora, randomize_adapters, tiny_base
from tests.multijob.test_trainer import run_args


def _params(seed: int = 0) -> list[nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    shapes = [(4, 6), (6, 4), (3,), (5, 2)]
    params = [nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
    params.append(nn.Parameter(torch.randn(2, 3, generator=gen).t()))  # a transposed (non-contiguous) parameter
    return params


def _laid_out(flat: FlatGroups, like: torch.Tensor, params, values) -> torch.Tensor:
    """A flat tensor shaped as `like` holding each of `values` where its parameter lies, zeros between them."""
    out = torch.zeros_like(like)
    for param, value in zip(params, values, strict=True):
        out[flat.offset(param): flat.offset(param) + param.numel()] = value.reshape(-1)
    return out


def _groups(params):
    return [{"params": params[:3], "weight_decay": 0.1}, {"params": params[3:], "weight_decay": 0.0}]


def _grads(params, step: int) -> list[torch.Tensor | None]:
    gen = torch.Generator().manual_seed(100 + step)
    grads = [torch.randn(p.shape, generator=gen) for p in params]
    grads[-1] = grads[-1].t().contiguous().t()  # a gradient in another layout than its parameter's
    return grads


def _step(params, optimizer, flat, grads, clip: float | None) -> None:
    if flat is None:
        for p, g in zip(params, grads, strict=True):
            p.grad = None if g is None else g.clone()
        stepped = [p for p in params if p.grad is not None]
    else:
        flat.add_gradients(params, grads)
        stepped = flat.tensors
    if clip is not None:
        torch.nn.utils.clip_grad_norm_(stepped, clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


@pytest.mark.parametrize("fused", [True, False])
def test_flat_adamw_moves_every_weight_as_per_tensor(fused):
    reference, flattened = _params(), _params()
    before = [p.detach().clone() for p in flattened]
    ids = [id(p) for p in flattened]
    flat = FlatGroups([g["params"] for g in _groups(flattened)])
    assert [id(p) for p in flattened] == ids  # the same Parameter objects (module names and references unchanged)
    for p, b in zip(flattened, before, strict=True):
        assert torch.equal(p, b)
    storages = {p.untyped_storage().data_ptr() for p in flattened}
    assert storages == {f.untyped_storage().data_ptr() for f in flat.tensors} and len(flat.tensors) == 2

    per_tensor = torch.optim.AdamW(_groups(reference), lr=0.1, fused=fused)
    optimizer = torch.optim.AdamW(flat.optimizer_groups(_groups(flattened)), lr=0.1, fused=fused)
    for step in range(4):
        _step(reference, per_tensor, None, _grads(reference, step), None)
        _step(flattened, optimizer, flat, _grads(flattened, step), None)
    for p, q, b in zip(reference, flattened, before, strict=True):
        assert not torch.equal(q, b)
        _assert_same(p, q)


def _assert_same(reference: torch.Tensor, ours: torch.Tensor) -> None:
    """Bit for bit, the update being elementwise; a transposed tensor's elements meet the kernel's vector lanes in
    another order, which may round its last bit differently."""
    if reference.is_contiguous():
        assert torch.equal(reference, ours)
    else:
        torch.testing.assert_close(ours, reference, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("optimizer_class", ["adamw", "sgd"])
def test_clipping_over_the_flat_tensor_equals_per_tensor_to_rounding(optimizer_class):
    """The clipped gradients of the flat tensor equal per-tensor clipping's; SGD's update is the gradient itself,
    so there a clipping norm of 1.0 instead of 0.5 would move the weights by far more than the tolerance (AdamW
    normalises a gradient scaled alike every step away)."""
    reference, flattened = _params(), _params()
    flat = FlatGroups([g["params"] for g in _groups(flattened)])
    make = (lambda groups: torch.optim.AdamW(groups, lr=0.1, fused=True)) if optimizer_class == "adamw" else (
        lambda groups: torch.optim.SGD(groups, lr=0.1))
    per_tensor = make(_groups(reference))
    optimizer = make(flat.optimizer_groups(_groups(flattened)))
    for step in range(3):
        _step(reference, per_tensor, None, _grads(reference, step), 0.5)
        _step(flattened, optimizer, flat, _grads(flattened, step), 0.5)
    for p, q in zip(reference, flattened, strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)


def test_missing_gradient_counts_as_zero_and_gradients_accumulate():
    params = _params()
    flat = FlatGroups([params])
    grads = _grads(params, 0)
    flat.add_gradients(params, [None, *grads[1:]])
    flat.add_gradients(params, grads)  # a second micro-batch of the window adds
    (tensor,) = flat.tensors
    expected = _laid_out(flat, tensor, params, [grads[0]] + [2 * g for g in grads[1:]])
    assert torch.equal(tensor.grad, expected)
    flat.zero_grad()
    assert tensor.grad is None
    flat.add_gradients(params[::-1], grads[::-1])  # any order of the parameters
    assert torch.equal(tensor.grad, _laid_out(flat, tensor, params, grads))
    tensor.grad = torch.ones_like(tensor)  # a gradient set from outside is added to, not dropped
    flat.add_gradients(params, grads)
    assert torch.equal(tensor.grad, 1 + _laid_out(flat, tensor, params, grads))


def test_the_gaps_between_aligned_members_take_zero_gradients_again_after_a_non_finite_step():
    """Members start at 16-byte offsets; the gaps between them are not any member's. A clipping of a NaN gradient
    scales the whole buffer by NaN, gaps included, and a copy of the next step's gradients into the members' views
    left the gaps NaN: every later norm was NaN (under fp16 the scaler would skip every later step). The gaps are
    zeroed at each step's first backward."""
    params = [nn.Parameter(torch.zeros(3)), nn.Parameter(torch.zeros(5))]
    flat = FlatGroups([params])
    assert flat.offset(params[1]) == 4  # (3 float32 values, padded to 16 bytes)
    flat.add_gradients(params, [torch.full((3,), float("nan")), torch.ones(5)])
    torch.nn.utils.clip_grad_norm_(flat.tensors, 1.0)
    flat.zero_grad()
    flat.add_gradients(params, [torch.ones(3), torch.ones(5)])
    assert torch.nn.utils.get_total_norm([t.grad for t in flat.tensors]).item() == pytest.approx(8 ** 0.5)


def test_dtypes_split_a_group_and_errors_name_the_problem():
    params = [nn.Parameter(torch.ones(3)), nn.Parameter(torch.ones(2, dtype=torch.float64)), nn.Parameter(torch.ones(4))]
    flat = FlatGroups([params])
    assert sorted(t.numel() for t in flat.tensors) == [2, 8]  # float32 3 + 4 (each at 16 bytes: 3 → 4), float64 2
    assert all(p.data_ptr() % 16 == 0 for p in params)
    with pytest.raises(ValueError, match="appears twice"):
        FlatGroups([[params[0]], [params[0]]])
    with pytest.raises(ValueError, match="gradients for 2 parameters, this job has 3"):
        flat.add_gradients(params[:2], [None, None])
    with pytest.raises(ValueError, match="gradients for 2 parameters, this job has 3"):  # one of them twice
        flat.add_gradients([params[0], params[1], params[0]], [torch.ones(3), torch.ones(2), torch.ones(3)])
    with pytest.raises(ValueError, match="2 groups, the optimizer 1"):
        FlatGroups([params[:1], params[1:]]).optimizer_groups([{"params": params}])


def test_optimizer_state_round_trips_through_the_per_tensor_layout():
    """A flat run's checkpoint is what a per-tensor optimizer writes (every tensor equal), and a per-tensor
    checkpoint resumes a flat optimizer that then steps as the per-tensor one does."""
    reference, flattened = _params(), _params()
    per_tensor = torch.optim.AdamW(_groups(reference), lr=0.1, fused=True)
    optimizer, flat = job_optimizer(torch.optim.AdamW, {"lr": 0.1, "fused": True}, _groups(flattened), "cpu")
    assert flat is not None
    for step in range(2):
        _step(reference, per_tensor, None, _grads(reference, step), None)
        _step(flattened, optimizer, flat, _grads(flattened, step), None)
    saved, expected = flat.per_tensor_state(optimizer.state_dict()), per_tensor.state_dict()
    assert [g["params"] for g in saved["param_groups"]] == [g["params"] for g in expected["param_groups"]] == [
        [0, 1, 2], [3, 4]]
    assert saved["state"].keys() == expected["state"].keys()
    for index, state in expected["state"].items():
        for key, value in state.items():
            _assert_same(value, saved["state"][index][key])

    resumed_params = [nn.Parameter(p.detach().clone()) for p in reference]
    resumed, resumed_flat = job_optimizer(torch.optim.AdamW, {"lr": 0.1, "fused": True}, _groups(resumed_params), "cpu")
    resumed.load_state_dict(resumed_flat.flat_state(per_tensor.state_dict()))
    assert resumed_flat.flat_state(resumed.state_dict()) is not None  # a flat state passes through
    for step in range(2, 4):
        _step(reference, per_tensor, None, _grads(reference, step), None)
        _step(resumed_params, resumed, resumed_flat, _grads(resumed_params, step), None)
    for p, q in zip(reference, resumed_params, strict=True):
        _assert_same(p, q)
    with pytest.raises(ValueError, match="does not fit this job"):
        resumed_flat.flat_state({"state": {}, "param_groups": [{"params": [0]}]})


def test_which_optimizers_take_flat_tensors():
    assert flattening_applies(torch.optim.AdamW, {"fused": True}, torch.device("cpu"))
    assert not flattening_applies(torch.optim.AdamW, {}, torch.device("cpu"))  # per-operator passes: cache-bound
    assert flattening_applies(torch.optim.AdamW, {}, torch.device("cuda"))
    assert not flattening_applies(torch.optim.Adagrad, {"fused": True}, torch.device("cuda"))  # not on the list
    _, flat = job_optimizer(torch.optim.AdamW, {"lr": 0.1}, _groups(_params()), "cpu")
    assert flat is None
    _, flat = job_optimizer(torch.optim.AdamW, {"lr": 0.1, "fused": True}, _groups(_params()), "cpu", flatten=False)
    assert flat is None


class _Interrupt(Exception):
    pass


class _StopAt(TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise _Interrupt


class _CountSteps(TrainerCallback):
    def __init__(self) -> None:
        self.steps = 0

    def on_step_end(self, args, state, control, **kwargs):
        self.steps += 1


def _train(assets, out, flat: bool, stop_at: int | None = None, resume: bool = False):
    tokenizer, datasets = assets
    jobs = [
        JobConfig("lora", LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"]),
                  datasets["sentiment"], weight_decay=0.1, max_grad_norm=0.05),
        JobConfig("mix", mixlora(), datasets["capital"], per_device_train_batch_size=2, gradient_accumulation_steps=2),
    ]
    args = run_args(out, max_steps=4, save_strategy="steps", save_steps=1)
    trainer = MultiJobTrainer(model=tiny_base(vocab_size=len(tokenizer)), jobs=jobs, args=args, processing_class=tokenizer,
                              callbacks=[_CountSteps()] + ([] if stop_at is None else [_StopAt(stop_at)]))
    trainer.flat_job_parameters = flat
    randomize_adapters(trainer.jobs_model, seed=4 if resume else 3)  # a resumed run must take the checkpoint's
    if stop_at is None:
        trainer.train(resume_from_checkpoint=resume or None)
    else:
        with pytest.raises(_Interrupt):
            trainer.train()
    return trainer


def _steps(trainer) -> int:
    return next(c for c in trainer.callback_handler.callbacks if isinstance(c, _CountSteps)).steps


def _adapters(out):
    return {job: load_file(os.path.join(out, job, "adapter_model.safetensors")) for job in ("lora", "mix")}


def test_trainer_with_flat_jobs_trains_as_per_tensor_and_resumes_a_per_tensor_checkpoint(assets, tmp_path):
    flat_run = _train(assets, tmp_path / "flat", flat=True)
    assert all(run.flat is not None for run in flat_run.runs)  # the default optimizer (fused AdamW) is flattened
    _train(assets, tmp_path / "per_tensor", flat=False)
    stopped = _train(assets, tmp_path / "resumed", flat=False, stop_at=2)  # a per-tensor run, stopped after step 2
    saved = torch.load(tmp_path / "resumed" / "lora" / "checkpoint-2" / "optimizer.pt", weights_only=True)
    assert sum(len(g["params"]) for g in saved["param_groups"]) == len(stopped.runs[0].params)  # per tensor
    resumed = _train(assets, tmp_path / "resumed", flat=True, resume=True)  # resumed with flat optimizers
    assert [r["steps"] for r in resumed.job_summary] == [4, 4]
    assert all(run.flat is not None for run in resumed.runs)
    assert 0 < _steps(resumed) < _steps(flat_run)  # it went on from the checkpoints (and from other initial values)
    flat, per_tensor, both = (_adapters(tmp_path / d) for d in ("flat", "per_tensor", "resumed"))
    for job in ("lora", "mix"):
        for key, value in flat[job].items():
            torch.testing.assert_close(per_tensor[job][key], value, rtol=0, atol=1e-6, msg=f"{job} {key}")
            torch.testing.assert_close(both[job][key], value, rtol=0, atol=1e-6, msg=f"{job} {key} resumed")


@pytest.mark.parametrize("optimizer_cls, kwargs", [
    (torch.optim.AdamW, {"lr": 0.1, "fused": True, "amsgrad": True}),
    (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "fused": True}),
])
def test_other_elementwise_states_round_trip(optimizer_cls, kwargs):
    """AMSGrad's max_exp_avg_sq and SGD's momentum buffer go through both layouts like AdamW's moments."""
    reference, flattened = _params(), _params()
    per_tensor = optimizer_cls(_groups(reference), **kwargs)
    optimizer, flat = job_optimizer(optimizer_cls, kwargs, _groups(flattened), "cpu")
    for step in range(2):
        _step(reference, per_tensor, None, _grads(reference, step), None)
        _step(flattened, optimizer, flat, _grads(flattened, step), None)
    saved, expected = flat.per_tensor_state(optimizer.state_dict()), per_tensor.state_dict()
    for index, state in expected["state"].items():
        assert saved["state"][index].keys() == state.keys()
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                _assert_same(value, saved["state"][index][key])
    resumed_params = [nn.Parameter(p.detach().clone()) for p in reference]
    resumed, resumed_flat = job_optimizer(optimizer_cls, kwargs, _groups(resumed_params), "cpu")
    resumed.load_state_dict(resumed_flat.flat_state(expected))
    _step(reference, per_tensor, None, _grads(reference, 5), None)
    _step(resumed_params, resumed, resumed_flat, _grads(resumed_params, 5), None)
    for p, q in zip(reference, resumed_params, strict=True):
        _assert_same(p, q)


def test_states_that_do_not_fit_are_refused_and_missing_ones_start_at_zero():
    params = _params()
    optimizer, flat = job_optimizer(torch.optim.AdamW, {"lr": 0.1, "fused": True}, _groups(params), "cpu")
    shapes = [p.shape for p in params]
    moments = {i: {"step": torch.tensor(3.0), "exp_avg": torch.ones(s), "exp_avg_sq": torch.ones(s)}
               for i, s in enumerate(shapes)}
    groups = [{**g, "params": list(ids)} for g, ids in zip(optimizer.state_dict()["param_groups"], ([0, 1, 2], [3, 4]),
                                                                strict=True)]
    partial = {"state": {i: v for i, v in moments.items() if i != 0}, "param_groups": groups}  # the first never stepped
    joined = flat.flat_state(partial)
    first = joined["state"][0]["exp_avg"]
    assert first.numel() == flat.tensors[0].numel() == 24 + 24 + 4  # (3 values padded to 16 bytes)
    assert torch.equal(first, _laid_out(flat, first, params[:3], [torch.zeros(24), torch.ones(24), torch.ones(3)]))
    assert joined["state"][0]["step"].item() == 3.0
    optimizer.load_state_dict(joined)
    swapped = {"state": moments, "param_groups": [{**groups[0], "params": [0, 1]}, {**groups[1], "params": [2, 3, 4]}]}
    with pytest.raises(ValueError, match="does not fit this job"):
        flat.flat_state(swapped)
    wrong_size = {"state": {**moments, 1: {**moments[1], "exp_avg": torch.ones(5)}}, "param_groups": groups}
    with pytest.raises(ValueError, match="'exp_avg' has 5 values for a tensor of 24"):
        flat.flat_state(wrong_size)
    flat_layout = {"state": {0: {"step": torch.tensor(1.0), "exp_avg": torch.ones(3), "exp_avg_sq": torch.ones(3)}},
                   "param_groups": [{**groups[0], "params": [0]}, {**groups[1], "params": [1]}]}
    with pytest.raises(ValueError, match="has 3 values, the tensor 52"):
        flat.flat_state(flat_layout)

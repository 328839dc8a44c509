"""Training under torch.compile (`torch.compile(model)`, or `TrainingArguments(torch_compile=True)`).

The forward of a MixLoRA / MixDoRA / DynMoLE training step compiles to one graph (`fullgraph=True` raises on any
graph break): dispatch keeps the expert segments on the device (`segment_ops`), the dense-or-dispatch choice is
made by shape, dropout masks come from an operator the compiler keeps whole, and the aux loss masks padding out
instead of removing it. DynMoLE blocks, whose number of experts per token depends on the data, run their expert
step eagerly inside the compiled model (one break per MoE layer). The loss (aux loss included) and every adapter
gradient are the eager step's.
"""

from __future__ import annotations

import contextlib
import logging

import pytest
import torch
from peft import get_peft_model
from torch._dynamo.utils import counters
from transformers import TrainerCallback
from trl import SFTTrainer

from peft_mole.ops.experts import FEW_TOKENS_COMPILED
from tests.helpers import METHODS, batch, one_layer_base, randomize_adapters, tiny_base
from tests.test_trainer_integration import local_assets, sft_args  # noqa: F401 (a fixture)


def loss_and_gradients(model, ids, mask, labels):
    params = [p for p in model.parameters() if p.requires_grad]
    loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    return loss.detach(), torch.autograd.grad(loss, params)


@contextlib.contextmanager
def graph_break_log():
    """The messages of the graph breaks Dynamo logs inside the block (each names the user code it broke in)."""
    breaks = []
    handler = logging.Handler()
    handler.emit = lambda record: breaks.append(record.getMessage())
    logger = logging.getLogger("torch._dynamo.symbolic_convert.__graph_breaks")  # where Dynamo logs them
    torch._logging.set_logs(graph_breaks=True)
    logger.addHandler(handler)
    try:
        yield breaks
    finally:
        logger.removeHandler(handler)
        torch._logging.set_logs()


def breaks_in_peft_mole(breaks: list[str]) -> list[str]:
    return [message for message in breaks if "peft_mole" in message.split("Graph Break Reason")[0]]


@pytest.mark.parametrize("tokens", [(2, 12), (3, 100)], ids=["slot_path", "dispatch"])
@pytest.mark.parametrize("method", METHODS)
def test_training_step_compiles_to_one_graph_with_the_eager_loss_and_gradients(method, tokens):
    rows, seq = tokens
    assert (rows * seq > FEW_TOKENS_COMPILED) == (rows == 3)
    # two layers (the other tests here take one): the aux loss sums each layer's router records
    model = get_peft_model(tiny_base(), METHODS[method](router_aux_loss_coef=0.5) if "mix" in method
                           else METHODS[method](entropy_loss_coef=0.5))
    randomize_adapters(model, std=0.2)  # B ≠ 0, routers neither flat nor one-hot
    model.train()
    ids, mask, labels = batch(batch_size=rows, seq_len=seq, pad_last=5)  # padding: the aux loss masks it out
    eager_loss, eager_grads = loss_and_gradients(model, ids, mask, labels)
    # DynMoLE's blocks run their experts eagerly (a data-dependent number per token): one break per MoE layer
    eager_blocks = method == "dynmole" and rows * seq > FEW_TOKENS_COMPILED
    counters.clear()
    compiled = torch.compile(model, fullgraph=not eager_blocks, backend="aot_eager")  # a compiled backward too
    loss, grads = loss_and_gradients(compiled, ids, mask, labels)
    reasons = list(counters["graph_break"])
    assert all("run_eagerly" in reason for reason in reasons) and bool(reasons) == eager_blocks, reasons
    torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=1e-6)
    for got, want in zip(grads, eager_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    assert sum(g.abs().sum() for g in grads) > 0


class GraphCount(TrainerCallback):
    """The graphs Dynamo has compiled so far, at the end of each step."""

    def __init__(self) -> None:
        self.graphs: list[int] = []

    def on_step_end(self, args, state, control, **kwargs):
        self.graphs.append(counters["stats"]["unique_graphs"])


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "gradient_checkpointing"])
def test_sft_trainer_with_torch_compile_trains_mixlora_without_graph_breaks_of_ours(
    local_assets, tmp_path, checkpointing  # noqa: F811
):
    """The user's switch (`torch_compile=True`) with dropout: the loss goes down, and no graph break comes from
    peft-mole's code (PEFT's forward and TRL's loss have breaks of their own). With TRL's default gradient
    checkpointing, as the docs advise, Dynamo does not replay forward side effects in the recompute, so the
    checkpointed layers are compiled (and checked) too: that run is compiled by inductor (its code generated and run
    on the CPU) and pads every batch to 48 columns (one static graph per frame: 79 s cold instead of 179 s on two
    decoder layers; both runs now take a one-layer model, 48 and 20 s cold, 73 and 35 s on two layers). The
    plain run's batches are of several lengths, compiled with sizes dynamic from the first graph
    (`assume_static_by_default=False`: one graph per frame) by aot_eager (what it checks is Dynamo's; inductor took
    83 s on it with a cold cache, against 113 s for a static graph per frame and then a dynamic one). So inductor's
    code for a training step with dynamic sizes is not run on the CPU here (on CUDA: tests/gpu). No step after the
    first compiles (Dynamo's rule compiled every frame again at the plain run's second length: 5 graphs, then
    10, on two layers)."""
    tokenizer, dataset = local_assets
    config = METHODS["mixlora"](r=8, lora_alpha=16, lora_dropout=0.05)
    count = GraphCount()
    torch._dynamo.reset()
    counters.clear()
    with graph_break_log() as breaks, torch._dynamo.config.patch(
        skip_fwd_side_effects_in_bwd_under_checkpoint=checkpointing, assume_static_by_default=checkpointing
    ):
        trainer = SFTTrainer(model=one_layer_base(vocab_size=len(tokenizer)), peft_config=config, train_dataset=dataset,
                             processing_class=tokenizer, callbacks=[count],
                             args=sft_args(tmp_path, torch_compile=True, gradient_checkpointing=checkpointing,
                                           pad_to_multiple_of=48 if checkpointing else None,
                                           torch_compile_backend="inductor" if checkpointing else "aot_eager"))
        trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 12 and sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.3
    assert breaks, "the graph-break log was not captured, so the check below would prove nothing"
    assert not breaks_in_peft_mole(breaks), breaks_in_peft_mole(breaks)[0]
    graphs = count.graphs  # nothing compiled after the first step
    assert len(graphs) == 12 and graphs[0] >= 1 and graphs[-1] == graphs[0], graphs


@pytest.mark.parametrize("method", METHODS)
def test_compiled_training_under_bf16_autocast_follows_the_eager_autocast_step(method):
    """bf16 autocast (fp32 routers) inside a compiled step: the same loss, gradients within 5 % (norm) of the eager
    autocast step's, which is what bf16 rounding in another order of operations allows."""
    model = get_peft_model(one_layer_base(), METHODS[method]())
    randomize_adapters(model, std=0.2)
    model.train()
    ids, mask, labels = batch(batch_size=3, seq_len=100, pad_last=5)

    def run(m):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return loss_and_gradients(m, ids, mask, labels)

    eager_loss, eager_grads = run(model)
    loss, grads = run(torch.compile(model, backend="aot_eager"))
    torch.testing.assert_close(loss, eager_loss, rtol=1e-3, atol=1e-3)
    for got, want in zip(grads, eager_grads, strict=True):
        assert got.isfinite().all() and (got - want).norm() <= 0.05 * want.norm() + 1e-6


@pytest.mark.parametrize("dropout", [0.0, 0.05])
@pytest.mark.parametrize("side_effects_in_backward", [True, False], ids=["layers_compiled", "layers_eager"])
def test_compiled_training_with_gradient_checkpointing_equals_the_eager_step(side_effects_in_backward, dropout):
    """Gradient checkpointing under torch.compile. transformers' output capture mutates a context variable inside
    each checkpointed layer, so Dynamo runs those layers eagerly, unless told that forward side effects need not be
    replayed in the recompute (`skip_fwd_side_effects_in_bwd_under_checkpoint`; peft-mole's router records are made
    in the forward only, as eagerly). Either way: the eager loss (aux loss included) and gradients, no break of ours,
    and with the switch the routers run inside the compiled checkpointed layers. With dropout, after the same seed
    (aot_eager draws the masks in program order, as eager): the recompute in the backward uses the forward's masks,
    or the gradients would differ."""
    model = get_peft_model(one_layer_base(), METHODS["mixlora"](router_aux_loss_coef=0.5, lora_dropout=dropout))
    randomize_adapters(model, std=0.2)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    model.train()
    ids, mask, labels = batch(batch_size=3, seq_len=100, pad_last=5)
    torch.manual_seed(0)
    eager_loss, eager_grads = loss_and_gradients(model, ids, mask, labels)
    traced = []

    def recording_backend(graph_module, example_inputs):
        traced.extend(str(node.target) for sub in graph_module.modules() if isinstance(sub, torch.fx.GraphModule)
                      for node in sub.graph.nodes)
        return torch._dynamo.lookup_backend("aot_eager")(graph_module, example_inputs)

    with graph_break_log() as breaks, torch._dynamo.config.patch(
        skip_fwd_side_effects_in_bwd_under_checkpoint=side_effects_in_backward
    ):
        torch.manual_seed(0)
        loss, grads = loss_and_gradients(torch.compile(model, backend=recording_backend), ids, mask, labels)
    assert breaks, "the graph-break log was not captured, so the check below would prove nothing"
    assert not breaks_in_peft_mole(breaks), breaks_in_peft_mole(breaks)[0]
    assert any("sort" in target for target in traced) == side_effects_in_backward  # (the router's top-k)
    torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=1e-6)
    for got, want in zip(grads, eager_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    assert sum(g.abs().sum() for g in grads) > 0

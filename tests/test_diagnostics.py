"""Router statistics and the Trainer callback that logs them."""

import logging
import sys

import pytest
import torch
from datasets import Dataset
from trl import SFTConfig, SFTTrainer

from peft_mole import DynMoLEConfig, RouterStatsCallback, routing, synthetic
from peft_mole.diagnostics import router_stats
from tests.helpers import tiny_base


def test_router_stats_on_a_known_selection():
    probs = torch.tensor([[0.25, 0.25, 0.25, 0.25], [0.7, 0.1, 0.1, 0.1]])
    weights, experts = routing.dynmole_routing(probs, min_experts=2)
    stats = router_stats(probs, routing.selection_mask(experts, weights, 4), q=1.1)
    assert stats.broadcast == 0.5 and stats.experts_per_token == 3.0  # token 0: all 4, token 1: 2
    # token 0 selects each expert once, token 1 expert 0 and one of the tied 0.1 experts: 6 selections
    assert stats.load[0] == pytest.approx(2 / 6)
    assert sorted(stats.load) == pytest.approx([1 / 6, 1 / 6, 2 / 6, 2 / 6])
    assert stats.entropy == pytest.approx(routing.normalized_entropy(probs, 1.1).mean().item())


def test_callback_logs_router_statistics_and_draws_the_png(tmp_path):
    tokenizer = synthetic.demo_tokenizer()
    rows = [{"prompt": r["prompt"], "completion": r["completion"]} for r in synthetic.multitask_rows(64)]
    args = SFTConfig(
        output_dir=str(tmp_path), max_steps=6, per_device_train_batch_size=8, learning_rate=5e-3, logging_steps=3,
        report_to=[], save_strategy="no", use_cpu=True, max_length=48, seed=0,
    )
    trainer = SFTTrainer(
        model=tiny_base(vocab_size=len(tokenizer)), args=args, train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer, peft_config=DynMoLEConfig(num_experts=4, r=4, lora_dropout=0.0),
    )
    callback = RouterStatsCallback.attach(trainer)
    assert trainer.callback_handler.callbacks[0] is callback
    trainer.train()
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 2
    for entry in logged:
        assert 0.0 <= entry["router/entropy"] <= 1.0
        assert 2.0 <= entry["router/experts_per_token"] <= 4.0
        load = [entry[f"router/model.layers.0.mlp/load_{e}"] for e in range(4)]
        assert sum(load) == pytest.approx(1.0, abs=1e-5)
    png = tmp_path / "router_stats.png"
    assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_without_matplotlib_training_ends_with_a_warning_and_no_picture(tmp_path, monkeypatch, caplog):
    """matplotlib is not a dependency: before 2026-12-08 the callback's end raised ModuleNotFoundError, after the
    whole training and before the caller's save_pretrained (the README's snippet lost its adapter)."""
    from types import SimpleNamespace

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    callback = RouterStatsCallback()
    callback.total_load = {"model.layers.0.mlp": torch.tensor([3.0, 1.0])}
    callback.history = [(1, {"model.layers.0.mlp": 0.5})]
    with caplog.at_level(logging.WARNING, logger="peft_mole.diagnostics"):
        callback.on_train_end(SimpleNamespace(output_dir=str(tmp_path)), SimpleNamespace(is_world_process_zero=True),
                              None)
    assert "router_stats.png not written (ModuleNotFoundError" in caplog.text
    assert not (tmp_path / "router_stats.png").exists()

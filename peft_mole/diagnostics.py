"""Router diagnostics: how confident the routers are and which experts they use.

Per MoE layer (over non-padding tokens of one forward pass):
- entropy: mean normalised entropy h = S_q(p)/S_max (q of a DynMoLE config, Shannon for MixLoRA), in [0, 1];
- broadcast: fraction of tokens routed to all experts;
- experts_per_token: mean number of selected experts;
- load: fraction of all selections that each expert received (balanced = 1/E each).

`RouterStatsCallback` logs them through the Trainer (tqdm, TensorBoard, W&B see them when it runs first:
`RouterStatsCallback.attach(trainer)`) and draws a PNG of expert load and entropy at the end of training.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import TrainerCallback

from peft_mole import routing
from peft_mole.quantised_eval import eval_keeping_4bit_training

logger = logging.getLogger(__name__)


@dataclass
class RouterStats:
    entropy: float
    broadcast: float
    experts_per_token: float
    load: list[float]


@torch.no_grad()
def router_stats(probs: torch.Tensor, selected: torch.Tensor, q: float = 1.0) -> RouterStats:
    """Statistics of one layer from its (T, E) probabilities and selection mask (padding already removed)."""
    if probs.shape[0] == 0:
        return RouterStats(0.0, 0.0, 0.0, [0.0] * probs.shape[-1])
    per_token = selected.sum(-1).float()
    return RouterStats(
        entropy=routing.normalized_entropy(probs, q).mean().item(),
        broadcast=(per_token == probs.shape[-1]).float().mean().item(),
        experts_per_token=per_token.mean().item(),
        load=routing.expert_load(selected).tolist(),
    )


@torch.no_grad()
def expert_load(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> dict[str, list[float]]:
    """Expert load per MoE layer of the active adapter after one forward pass (dropout off).

    Example:
        >>> load = expert_load(peft_model, ids, mask)            # doctest: +SKIP
        >>> load["model.layers.0.mlp"]                           # doctest: +SKIP
        [0.13, 0.11, ...]
    """
    return {layer: stats.load for layer, stats in layer_stats(model, input_ids, attention_mask).items()}


@torch.no_grad()
def layer_stats(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> dict[str, RouterStats]:
    """`RouterStats` per MoE layer of the active adapter after one forward pass (dropout off), the inputs moved to
    the model's device."""
    device = model.get_input_embeddings().weight.device
    input_ids = input_ids.to(device)
    attention_mask = None if attention_mask is None else attention_mask.to(device)
    with eval_keeping_4bit_training(model):  # (a 4-bit base's eval mode would end its training)
        labels = input_ids if attention_mask is None else input_ids.masked_fill(attention_mask == 0, -100)
        model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)  # labels → the tuner records
    adapter = model.base_model.active_adapters[0]
    return {layer: stats for (_, layer), stats in model.base_model.router_stats({adapter}).items()}


def _trained_adapters(model, adapters: set[str]) -> set[str]:
    """Those of `adapters` with a parameter that requires grad (every adapter parameter's name holds
    `.<adapter>.`); all of them where none does."""
    trained = {a for a in adapters if any(p.requires_grad and f".{a}." in n for n, p in model.named_parameters())}
    return trained or adapters


class RouterStatsCallback(TrainerCallback):
    """Logs router statistics per MoE layer, averaged over the optimizer steps since the last log, and writes
    `router_stats.png` (expert load per layer; entropy per layer over training) to the output dir at the end
    (with matplotlib, which is optional: without it, a warning).

    Each optimizer step samples the statistics of the last forward pass of each adapter that trains (one whose
    parameters require grad; TRL's frozen "ref" copy under DPO is left out). Keys: `router/<layer>/entropy`,
    `.../broadcast`, `.../experts_per_token`, `.../load_<e>` (with `log_expert_load`), and the means over
    layers `router/entropy`, `router/experts_per_token`; an adapter other than "default" has its name in the keys
    (`router/<adapter>/<layer>/...`).
    """

    def __init__(self, log_expert_load: bool = True, plot: bool = True) -> None:
        self.log_expert_load = log_expert_load
        self.plot = plot
        self._pending: dict[str, list[RouterStats]] = defaultdict(list)
        self.history: list[tuple[int, dict[str, float]]] = []  # (step, {layer: entropy})
        self.total_load: dict[str, torch.Tensor] = {}
        self._trained: dict[frozenset, set[str]] = {}  # the model's adapters -> those that train

    @classmethod
    def attach(cls, trainer, **kwargs) -> RouterStatsCallback:
        """Add the callback ahead of the reporting callbacks, so TensorBoard/W&B/log_history get its metrics."""
        callback = cls(**kwargs)
        trainer.callback_handler.callbacks.insert(0, callback)
        return callback

    def on_step_end(self, args, state, control, model=None, **kwargs):
        tuner = getattr(model, "base_model", None)
        if not hasattr(tuner, "router_stats"):
            return
        adapters = frozenset(tuner.peft_config)
        if adapters not in self._trained:  # (asked once per set of adapters: a scan of the parameters)
            self._trained[adapters] = _trained_adapters(model, set(adapters))
        for (adapter, layer), s in tuner.router_stats(self._trained[adapters]).items():
            name = layer if adapter == "default" else f"{adapter}/{layer}"
            self._pending[name].append(s)
            load = torch.tensor(s.load)
            self.total_load[name] = self.total_load.get(name, torch.zeros_like(load)) + load

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not self._pending or logs is None or "loss" not in logs:
            return
        metrics: dict[str, float] = {}
        entropies = {}
        for name, samples in self._pending.items():
            n = len(samples)
            entropies[name] = sum(s.entropy for s in samples) / n
            metrics[f"router/{name}/entropy"] = entropies[name]
            metrics[f"router/{name}/broadcast"] = sum(s.broadcast for s in samples) / n
            metrics[f"router/{name}/experts_per_token"] = sum(s.experts_per_token for s in samples) / n
            if self.log_expert_load:
                for e, value in enumerate(torch.tensor([s.load for s in samples]).mean(0).tolist()):
                    metrics[f"router/{name}/load_{e}"] = value
        metrics["router/entropy"] = sum(entropies.values()) / len(entropies)
        per_token = [v for k, v in metrics.items() if k.endswith("/experts_per_token")]
        metrics["router/experts_per_token"] = sum(per_token) / len(per_token)
        logs.update(metrics)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(metrics)
        self.history.append((state.global_step, entropies))
        self._pending.clear()

    def on_train_end(self, args, state, control, **kwargs):
        if self.plot and self.total_load and state.is_world_process_zero:
            try:  # (matplotlib is optional: without it, or where the picture cannot be written, training ends as
                # it would without the picture, so the caller's save_pretrained after train() still runs)
                plot_router_stats(self.total_load, self.history, Path(args.output_dir) / "router_stats.png")
            except (ImportError, OSError) as error:
                logger.warning("router_stats.png not written (%s: %s); `pip install matplotlib` draws it, "
                               "RouterStatsCallback(plot=False) leaves it out", type(error).__name__, error)


def plot_router_stats(total_load: dict[str, torch.Tensor], history, path: Path) -> Path:
    """Heatmap of expert load (layers × experts) and entropy per layer over training, saved as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = list(total_load)
    width = max(len(v) for v in total_load.values())
    grid = torch.full((len(layers), width), float("nan"))
    for i, name in enumerate(layers):
        load = total_load[name] / total_load[name].sum().clamp(min=1e-12)
        grid[i, : len(load)] = load
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, max(3, 0.35 * len(layers) + 1.5)))
    image = ax1.imshow(grid.numpy(), aspect="auto", cmap="viridis")
    ax1.set_yticks(range(len(layers)), layers, fontsize=7)
    ax1.set_xlabel("expert")
    ax1.set_title("expert load (fraction of selections, whole run)")
    fig.colorbar(image, ax=ax1)
    for name in layers:
        steps = [step for step, entropies in history if name in entropies]
        ax2.plot(steps, [entropies[name] for _, entropies in history if name in entropies], label=name)
    ax2.set_xlabel("step")
    ax2.set_ylabel("mean normalised entropy")
    ax2.set_ylim(0, 1.05)
    ax2.set_title("router entropy per layer")
    if len(layers) <= 12:
        ax2.legend(fontsize=6)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path

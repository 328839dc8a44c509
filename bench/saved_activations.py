"""Activation memory the backward keeps: bytes of the tensors autograd saves during one training forward of
MixLoRA (top-2) and DynMoLE (routers at init, which broadcast most tokens to all experts), over PEFT LoRA's on the
same shape and batch (lower is better). Counted with `torch.autograd.graph.saved_tensors_hooks`, each storage
once; the model's own parameters and buffers (frozen weights saved for a product's backward) are not activations and
are counted apart (`saved_parameters_mb`). A count, not a timing, so median and min are the same value.
Usage: python bench/saved_activations.py [--shape small]
"""

from __future__ import annotations

import torch
from common import (
    base_model,
    device,
    dynmole_config,
    emit,
    lora_config,
    mixlora_config,
    random_batch,
    setup_threads,
    step_parser,
)
from peft import get_peft_model


def saved_mb(model, batch) -> tuple[float, float]:
    """(activations, the model's parameters and buffers) saved for the backward of one training forward, in MiB."""
    own = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(**batch, use_cache=False)
    parameters = sum(size for pointer, size in storages.items() if pointer in own)
    return (sum(storages.values()) - parameters) / 2**20, parameters / 2**20


def main() -> None:
    args = step_parser().parse_args()
    setup_threads()
    batch = {k: v.to(device()) for k, v in random_batch(args.shape, base_model(args.shape).config.vocab_size).items()}
    dynmole = dynmole_config()
    sizes = {name: saved_mb(get_peft_model(base_model(args.shape), config).to(device()), batch)
             for name, config in (("peft_lora", lora_config()), ("mixlora", mixlora_config()), ("dynmole_init", dynmole))}
    for name in ("mixlora", "dynmole_init"):
        ratio = sizes[name][0] / sizes["peft_lora"][0]
        emit({"name": "saved_activations", "shape": args.shape, "impl": name, "device": str(device()),
              "ratio_median": ratio, "ratio_min": ratio, "saved_mb": sizes[name][0],
              "lora_saved_mb": sizes["peft_lora"][0], "saved_parameters_mb": sizes[name][1],
              "lora_saved_parameters_mb": sizes["peft_lora"][1], "torch": torch.__version__})


if __name__ == "__main__":
    main()

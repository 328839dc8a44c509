"""The dense gated chain of one layer alone (`ops.dense_mixture`, forward and backward), with the compiled block
kernels of `ops.fused_chain` / without them, in interleaved rounds in one process.

Inputs have DynMoLE's shape at init: every token on every expert, E = 8, r = 16, dropout mask on; tokens and width
(I) are the shape's batch and intermediate size (small: 1024 tokens, I = 1376), or `--tokens`. On CUDA the frozen
side is bf16 and the adapters fp32, as PEFT keeps them on a bf16 base. Prints one JSON row: fused / eager time
(lower is better), both in ms; an `error` row if the compiled kernels never ran.
Usage: python bench/fused_chain.py [--shape small] [--tokens N] [--repeats 12]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from common import BATCH, device, emit, positive_int, setup_threads, synchronize
from torch import nn

from peft_mole import synthetic
from peft_mole.ops.dense_mixture import dense_gated_mixture
from peft_mole.ops.fused_chain import fused_blocks_run, set_fused_chain


def chain_step(tokens: int, width: int, experts: int, rank: int):
    """A forward and backward of the chain on random inputs; returns the step function."""
    where = device()
    frozen = torch.bfloat16 if where.type == "cuda" else torch.float32
    gen = torch.Generator().manual_seed(0)

    def leaf(*shape, scale=1.0, dtype=torch.float32):
        return (scale * torch.randn(*shape, generator=gen)).to(where, dtype).requires_grad_()

    gate, up = leaf(tokens, width, dtype=frozen), leaf(tokens, width, dtype=frozen)
    weight = torch.softmax(torch.randn(experts, tokens, 1, generator=gen), 0).to(where, frozen).requires_grad_()
    mask = ((torch.rand(tokens, width, generator=gen) > 0.05).float() / 0.95).to(where, frozen)
    loras = [(leaf(experts, tokens, rank), leaf(experts, width, rank, scale=0.1)) for _ in range(2)]
    down_a = leaf(experts, rank, width, scale=0.01)
    act = nn.SiLU()

    def step():
        hidden, z = dense_gated_mixture(gate, up, weight, act, down_a, mask, loras[0], loras[1], scaling=2.0)
        (hidden.float().square().mean() + z.square().mean()).backward()

    return step


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="small", choices=list(BATCH))
    parser.add_argument("--tokens", type=positive_int, default=None,
                        help="default: the shape's batch × sequence length")
    parser.add_argument("--experts", type=positive_int, default=8)
    parser.add_argument("--rank", type=positive_int, default=16)
    parser.add_argument("--repeats", type=positive_int, default=12)
    args = parser.parse_args()
    setup_threads()
    batch, length = BATCH[args.shape]
    tokens, width = args.tokens or batch * length, synthetic.SHAPES[args.shape]["intermediate_size"]
    step = chain_step(tokens, width, args.experts, args.rank)
    times = {True: [], False: []}
    for i in range(args.repeats + 2):  # two warm-up rounds (the first compiles)
        for fused in (True, False):
            set_fused_chain(fused)
            start = time.perf_counter()
            step()
            synchronize()
            if i >= 2:
                times[fused].append(time.perf_counter() - start)
    ran = fused_blocks_run()
    row = {"name": "fused_chain", "shape": args.shape, "device": str(device()), "tokens": tokens, "width": width,
           "experts": args.experts, "rank": args.rank, "fused_blocks_run": ran}
    if ran == 0:
        emit({**row, "error": "the compiled kernels never ran (compile failure or no full block)"})
        return
    median = {fused: statistics.median(t) for fused, t in times.items()}
    emit({**row, "ratio_median": median[True] / median[False], "ratio_min": min(times[True]) / min(times[False]),
          "fused_ms": 1e3 * median[True], "eager_ms": 1e3 * median[False]})


if __name__ == "__main__":
    main()

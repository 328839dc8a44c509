"""Issue 6, part 3: row-segment products by `torch._grouped_mm` against a loop of `F.linear` per segment (and, for
equal segments, the batched `stacked_linear`), forward + backward, on the device and dtype of the run.

Cases: the MixLoRA expert products of the small shape (2048 expert pairs over 8 experts, even and skewed
segments: A 512 → 16, B 16 → 1376, down A 1376 → 16, down B 16 → 512) and the LoRA-job products of a mixed step
(8 jobs of 256 tokens, and 8 jobs of uneven row counts; r 16 on 512 → 1376). Each row: median times, grouped /
loop, and the largest difference between the two (0 where the grouped kernel is `F.linear`'s arithmetic); then
one summary row `grouped_products` (median over the cases) for the README table.
Usage: python bench/grouped_products.py [--repeats 30]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from common import device, emit, positive_int, setup_threads

from peft_mole.ops.segmented_lora import grouped_linear, grouped_mm_exact, stacked_linear


def seconds(fn, repeats: int) -> tuple[float, float]:
    """(median, min) seconds of `repeats` timed calls after 10 warm-up calls (the GPU's queue drained after them:
    before 2026-12-06 the first timed call also waited for the warm-up's kernels)."""
    for _ in range(10):
        fn()
    if device().type == "cuda":
        torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if device().type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times), min(times)


def measure(name: str, counts: list[int], d_in: int, d_out: int, dtype: torch.dtype, repeats: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(sum(counts), d_in, generator=gen).to(device(), dtype).requires_grad_()
    weight = torch.randn(len(counts), d_out, d_in, generator=gen).to(device(), dtype).requires_grad_()
    grad = torch.randn(sum(counts), d_out, generator=gen).to(device(), dtype)
    ends = torch.tensor(counts, device=device()).cumsum(0).to(torch.int32)

    def loop():
        outs = [torch.nn.functional.linear(seg, weight[j]) for j, seg in enumerate(x.split(counts)) if seg.shape[0]]
        return torch.cat(outs)

    def grouped():
        return grouped_linear(x, weight, ends)

    steps = {"loop": loop, "grouped": grouped}
    if len(set(counts)) == 1:
        steps["stacked"] = lambda: stacked_linear(x.view(len(counts), counts[0], d_in), weight).flatten(0, 1)
    results = {impl: seconds(lambda fn=fn: fn().backward(grad), repeats) for impl, fn in steps.items()}
    difference = (loop() - grouped()).abs().max().item()
    grads = {}
    for impl in ("loop", "grouped"):
        x.grad = weight.grad = None
        steps[impl]().backward(grad)
        grads[impl] = (x.grad.clone(), weight.grad.clone())
    grad_difference = max((a - b).abs().max().item() for a, b in zip(*grads.values(), strict=True))
    return {"name": "grouped_product", "case": name, "shape": "small", "device": device().type, "dtype": str(dtype).removeprefix("torch."),
            "segments": len(counts), "rows": sum(counts), "d_in": d_in, "d_out": d_out,
            **{f"{impl}_ms": s[0] * 1e3 for impl, s in results.items()},
            "ratio_median": results["grouped"][0] / results["loop"][0], "ratio_min": results["grouped"][1] / results["loop"][1],
            "max_abs_difference": difference, "max_abs_grad_difference": grad_difference,
            "used_by_peft_mole": grouped_mm_exact(device(), dtype, d_in, d_out)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=positive_int, default=30)
    args = parser.parse_args()
    setup_threads()
    dtype = torch.bfloat16 if device().type == "cuda" else torch.float32
    if not hasattr(torch, "_grouped_mm"):
        emit({"name": "grouped_products_skipped", "reason": f"torch {torch.__version__} has no _grouped_mm"})
        return
    skewed = [30, 410, 95, 700, 12, 301, 220, 280]  # 2048 pairs, as routing makes them
    cases = [
        ("expert_A_even", [256] * 8, 512, 16), ("expert_B_even", [256] * 8, 16, 1376),
        ("expert_downA_even", [256] * 8, 1376, 16), ("expert_downB_even", [256] * 8, 16, 512),
        ("expert_A_skewed", skewed, 512, 16), ("expert_B_skewed", skewed, 16, 1376),
        ("jobs_equal_A", [256] * 8, 512, 16), ("jobs_uneven_A", [256, 512, 256, 768, 256, 512, 256, 256], 512, 16),
        ("jobs_uneven_B", [256, 512, 256, 768, 256, 512, 256, 256], 16, 1376),
    ]
    rows = []
    for name, counts, d_in, d_out in cases:
        try:
            rows.append(measure(name, counts, d_in, d_out, dtype, args.repeats))
            emit(rows[-1])
        except RuntimeError as error:  # a device/dtype the installed torch has no kernel for
            emit({"name": "grouped_products_skipped", "case": name, "reason": str(error).splitlines()[0]})
    if rows:
        ratios = [row["ratio_median"] for row in rows]
        emit({"name": "grouped_products", "shape": "small", "device": device().type,
              "dtype": str(dtype).removeprefix("torch."), "cases": len(rows), "ratio_median": statistics.median(ratios),
              # the cases' ratios of minima, their median as the value column's (before 2026-12-06 their lowest)
              "ratio_min": statistics.median(row["ratio_min"] for row in rows), "lowest": min(ratios),
              "highest": max(ratios),
              "max_abs_difference": max(row["max_abs_difference"] for row in rows)})


if __name__ == "__main__":
    main()

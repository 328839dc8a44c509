import pytest
import torch

from peft_mole.forward_context import BASE_ROW, ForwardContext
from peft_mole.ops.experts import (
    dense_a,
    dense_b_sum,
    dense_lora_sum,
    dense_weights,
    dispatch,
    grouped_lora,
    shared_input_lora,
)
from peft_mole.ops.segmented_lora import lora_delta, scatter_row_deltas, stacked_lora


def test_dispatch_groups_pairs_by_expert_and_drops_empty_slots():
    experts = torch.tensor([[2, 0], [0, 1], [2, 3]])
    weights = torch.tensor([[0.6, 0.4], [0.9, 0.0], [0.5, 0.5]])
    plan = dispatch(weights, experts, num_experts=4)
    assert plan.counts == [2, 0, 2, 1]
    assert plan.token.tolist() == [0, 1, 0, 2, 2]  # expert 0: tokens 0,1; expert 2: tokens 0,2; expert 3: token 2
    assert plan.expert.tolist() == [0, 0, 2, 2, 3]
    torch.testing.assert_close(plan.weight, torch.tensor([0.4, 0.9, 0.6, 0.5, 0.5]))


def test_grouped_lora_equals_per_row_reference():
    num_experts, r, din, dout = 3, 2, 5, 7
    a, b = torch.randn(num_experts, r, din), torch.randn(num_experts, dout, r)
    for num_tokens in (3, 100):  # few pairs: gathered factors; many: per-expert segments
        experts = torch.randint(0, num_experts, (num_tokens, 1))
        experts[0] = 1  # expert 1 used; the others may be empty
        plan = dispatch(torch.ones(num_tokens, 1), experts, num_experts)
        x = torch.randn(len(plan.token), din)
        out = grouped_lora(x, a, b, plan, scaling=0.5)
        ref = torch.stack([0.5 * b[e] @ (a[e] @ x[i]) for i, e in enumerate(plan.expert.tolist())])
        torch.testing.assert_close(out, ref)


@pytest.mark.parametrize("num_tokens", [7, 90])  # few pairs: gathered factors; many: fused segments
def test_shared_input_lora_equals_per_pair_reference(num_tokens):
    num_experts, r, din, dout = 4, 3, 6, 5
    a, b = torch.randn(num_experts, r, din), torch.randn(num_experts, dout, r)
    x = torch.randn(num_tokens, din)
    weights, experts = torch.rand(num_tokens, 2), torch.randint(0, num_experts, (num_tokens, 2))
    experts[:, 1] = (experts[:, 0] + 1) % num_experts
    plan = dispatch(weights, experts, num_experts)
    base = torch.randn(num_tokens, dout)  # per token
    out = shared_input_lora(x, a, b, plan, scaling=2.0, base=base)
    pairs = zip(plan.token.tolist(), plan.expert.tolist(), strict=True)
    ref = torch.stack([base[t] + 2.0 * b[e] @ (a[e] @ x[t]) for t, e in pairs])
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(shared_input_lora(x, a, b, plan, scaling=2.0), ref - base[plan.token])
    # mixed precision path (bf16 base, fp32 adapter) agrees too
    mixed = shared_input_lora(x, a, b, plan, scaling=2.0, base=base.bfloat16())
    delta = shared_input_lora(x, a, b, plan, scaling=2.0)  # (checked against the reference above)
    exact = base.bfloat16().float()[plan.token] + delta  # the bf16 base plus the fp32 delta, added in fp32
    torch.testing.assert_close(mixed, exact, atol=0, rtol=0)  # (0.1 before: a sum rounded to bf16 passed)


def test_expert_products_under_cpu_autocast_run_in_the_adapter_dtype_and_train_it():
    """CPU autocast is switched off inside the expert products (bf16 GEMM builds a kernel per new segment shape);
    the unwrapped function shows what CUDA autocast does: bf16 products, gradients back to the fp32 factors."""
    gen = torch.Generator().manual_seed(0)
    num_experts, r, din, dout, num_tokens = 4, 3, 8, 6, 100
    a = torch.randn(num_experts, r, din, generator=gen, requires_grad=True)
    b = torch.randn(num_experts, dout, r, generator=gen, requires_grad=True)
    x = torch.randn(num_tokens, din, generator=gen)
    weights = torch.rand(num_tokens, 2, generator=gen)
    experts = torch.randint(0, num_experts, (num_tokens, 2), generator=gen)
    experts[:, 1] = (experts[:, 0] + 1) % num_experts
    plan = dispatch(weights, experts, num_experts)
    base = torch.randn(num_tokens, dout, generator=gen).bfloat16()  # the frozen product under autocast
    plain = shared_input_lora(x, a, b, plan, scaling=2.0, base=base)
    pair_rows = x.bfloat16()[plan.token]  # e.g. the bf16 w_e h_e fed to the down experts
    plain_down = grouped_lora(pair_rows, a, b, plan, 1.0)
    per_expert_rows = x.bfloat16().unsqueeze(0).expand(num_experts, -1, -1)  # dense path: (E, N, in) in bf16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = shared_input_lora(x, a, b, plan, scaling=2.0, base=base)
        down = grouped_lora(pair_rows, a, b, plan, 1.0)
        emulated = shared_input_lora.__wrapped__(x, a, b, plan, scaling=2.0, base=base)
        dense = dense_a(x, a)
        dense_sum = dense_lora_sum(per_expert_rows, a, b, 1.0)
    assert dense.dtype == dense_sum.dtype == out.dtype == down.dtype == torch.float32
    assert torch.equal(dense, dense_a(x, a))
    assert torch.equal(dense_sum, dense_lora_sum(per_expert_rows, a, b, 1.0))
    assert torch.equal(out, plain) and torch.equal(down, plain_down)  # same fp32 arithmetic as without autocast
    assert emulated.dtype == torch.bfloat16
    bf16_tol = lambda ref: dict(atol=2**-7 * float(ref.detach().abs().max()), rtol=0)  # noqa: E731 — bf16: 8-bit mantissa
    torch.testing.assert_close(emulated.float(), plain, **bf16_tol(plain))
    (grad_a, grad_b) = torch.autograd.grad(emulated.float().sum(), (a, b))
    (ref_a, ref_b) = torch.autograd.grad(plain.sum(), (a, b))
    assert grad_a.dtype == grad_b.dtype == torch.float32
    torch.testing.assert_close(grad_b, ref_b, **bf16_tol(ref_b))
    torch.testing.assert_close(grad_a, ref_a, **bf16_tol(ref_a))


def test_dense_weights_only_when_most_pairs_are_selected_and_in_expert_order():
    from peft_mole.ops.experts import DENSE_FRACTION

    weights = torch.tensor([[0.5, 0.3, 0.2, 0.0], [0.4, 0.3, 0.2, 0.1], [0.4, 0.3, 0.2, 0.1]])
    chosen = torch.tensor([[2, 0, 3, 1], [1, 2, 3, 0], [0, 1, 2, 3]])
    expected = torch.tensor([[0.3, 0.0, 0.5, 0.2], [0.1, 0.4, 0.3, 0.2], [0.4, 0.3, 0.2, 0.1]])
    assert 11 / 12 >= DENSE_FRACTION > 5 / 8
    assert torch.equal(dense_weights(weights, chosen, 4), expected)  # 11 of 12 pairs selected
    fewer = torch.tensor([[0.5, 0.5, 0.0, 0.0], [0.6, 0.3, 0.1, 0.0]])
    assert dense_weights(fewer, chosen[:2], 4) is None  # 5 of 8: dispatch
    assert dense_weights(weights[:, :2], chosen[:, :2], 4) is None  # top-2 of 4: dispatch
    padded = torch.cat([weights, torch.tensor([[1.0, 0.0, 0.0, 0.0]] * 4)])  # + 4 pad tokens using one expert
    padded_chosen = torch.cat([chosen, torch.tensor([[0, 1, 2, 3]] * 4)])
    assert dense_weights(padded, padded_chosen, 4) is None  # 15 of 28 pairs
    real = torch.tensor([True] * 3 + [False] * 4)
    assert torch.equal(dense_weights(padded, padded_chosen, 4, token_mask=real)[:3], expected)  # real tokens decide
    assert dense_weights(padded, padded_chosen, 4, token_mask=torch.zeros(7, dtype=torch.bool)) is None
    # top-2 of 8 can never reach the fraction: decided without reading a value back (meta tensors have none)
    top2 = torch.zeros(5, 2, dtype=torch.long, device="meta")
    assert dense_weights(torch.ones(5, 2, device="meta"), top2, 8) is None
    duplicated = dense_weights(torch.tensor([[0.6, 0.4]]), torch.tensor([[1, 1]]), 2)  # a custom rule's repeat
    assert torch.equal(duplicated, torch.tensor([[0.0, 1.0]]))  # both slots count, as dispatch counts both pairs


def test_dense_expert_products_equal_the_per_pair_formula():
    gen = torch.Generator().manual_seed(3)
    num_experts, r, din, dout, num_tokens = 3, 2, 5, 4, 6
    a, b = torch.randn(num_experts, r, din, generator=gen), torch.randn(num_experts, dout, r, generator=gen)
    x, base = torch.randn(num_tokens, din, generator=gen), torch.randn(num_tokens, dout, generator=gen)
    per_expert = torch.randn(num_experts, num_tokens, din, generator=gen)
    w = torch.rand(num_tokens, num_experts, generator=gen)
    z = dense_a(x, a)
    torch.testing.assert_close(z, torch.stack([x @ a[e].t() for e in range(num_experts)]))
    out = base + dense_b_sum(z.transpose(0, 1), b, 0.5)
    torch.testing.assert_close(out, base + sum(0.5 * x @ a[e].t() @ b[e].t() for e in range(num_experts)))
    summed = dense_lora_sum(per_expert, a, b, 0.5)
    torch.testing.assert_close(summed, sum(0.5 * per_expert[e] @ a[e].t() @ b[e].t() for e in range(num_experts)))
    shared = dense_lora_sum(x, a, b, 0.5, weights=w)
    ref = sum(w[:, e : e + 1] * 0.5 * (x @ a[e].t() @ b[e].t()) for e in range(num_experts))
    torch.testing.assert_close(shared, ref)


def test_gather_segment_lora_backward_passes_gradcheck():
    from peft_mole.ops.experts import _GatherSegmentLoRA

    gen = torch.Generator().manual_seed(0)
    num_tokens, r, dout, counts = 5, 3, 4, [3, 0, 4, 1]  # an empty expert segment included
    base = torch.randn(num_tokens, dout, dtype=torch.float64, generator=gen, requires_grad=True)
    z = torch.randn(sum(counts), r, dtype=torch.float64, generator=gen, requires_grad=True)
    b = torch.randn(len(counts), dout, r, dtype=torch.float64, generator=gen, requires_grad=True)
    token = torch.tensor([0, 2, 4, 1, 2, 3, 0, 4])

    def fn(base, z, b):
        return _GatherSegmentLoRA.apply(base, z, b, token, counts)

    assert torch.autograd.gradcheck(fn, (base, z, b))
    expected = base[token] + torch.cat([z[0:3] @ b[0].t(), z[3:7] @ b[2].t(), z[7:8] @ b[3].t()])
    torch.testing.assert_close(fn(base, z, b), expected)


def test_scatter_row_deltas_applies_each_adapter_to_its_rows_only():
    x = torch.randn(4, 3, 5)
    base = torch.randn(4, 3, 6)
    weights = {"a": torch.randn(6, 5), "b": torch.randn(6, 5)}
    context = ForwardContext()
    context.set_row_adapters(["a", "b", BASE_ROW, "a"])
    groups = context.row_groups(4, ["a"], x.device)
    out = scatter_row_deltas(base, x, groups, lambda name, rows: rows @ weights[name].t())
    for row, name in enumerate(["a", "b", None, "a"]):
        expected = base[row] if name is None else base[row] + x[row] @ weights[name].t()
        torch.testing.assert_close(out[row], expected)


def test_lora_delta_formula():
    x, a, b = torch.randn(3, 4), torch.randn(2, 4), torch.randn(5, 2)
    torch.testing.assert_close(lora_delta(x, a, b, 2.0, torch.nn.Identity()), 2.0 * x @ a.t() @ b.t())


def _slow_slot_lora(x, lora_a, lora_b, chosen, scaling):
    """Per (token, slot): s · B_e A_e x_(t,j), one slot at a time."""
    n, k = chosen.shape
    rows = []
    for t in range(n):
        inputs = x[t] if x.dim() == 3 else x[t].expand(k, -1)
        rows.append(torch.stack([scaling * lora_b[e] @ (lora_a[e] @ inputs[j]) for j, e in enumerate(chosen[t])]))
    return torch.stack(rows)  # (N, k, out)


def test_slot_lora_and_its_sum_equal_the_per_slot_formula_with_gradients():
    from peft_mole.ops.experts import slot_lora, slot_lora_sum

    torch.manual_seed(0)
    n, k, num_experts, r, d, out = 3, 2, 5, 4, 6, 7
    chosen = torch.stack([torch.randperm(num_experts)[:k] for _ in range(n)])
    weights = torch.rand(n, k, dtype=torch.float64)
    weights[0, 1] = 0.0  # a padded slot (DynMoLE) adds nothing
    for shape in ((n, d), (n, k, d)):
        x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
        lora_a = torch.randn(num_experts, r, d, dtype=torch.float64, requires_grad=True)
        lora_b = torch.randn(num_experts, out, r, dtype=torch.float64, requires_grad=True)
        slow = _slow_slot_lora(x, lora_a, lora_b, chosen, 0.5)
        expected_sum = (slow * weights.unsqueeze(-1)).sum(1)
        got_sum = slot_lora_sum(x, lora_a, lora_b, chosen, 0.5, weights)
        torch.testing.assert_close(got_sum, expected_sum)
        grads = torch.autograd.grad(got_sum.square().sum(), (x, lora_a, lora_b))
        expected = torch.autograd.grad(expected_sum.square().sum(), (x, lora_a, lora_b))
        for g, e in zip(grads, expected, strict=True):
            torch.testing.assert_close(g, e)
        if x.dim() == 2:
            torch.testing.assert_close(slot_lora(x, lora_a, lora_b, chosen, 0.5), slow)


def test_slot_lora_sum_reads_only_the_chosen_experts():
    """Unchosen experts enter the decoding table through a `where`, not a product with 0: a non-finite A of an expert
    that no token chose (a diverged one) leaves the forward finite and equal to the chosen experts' formula."""
    from peft_mole.ops.experts import slot_lora_sum

    torch.manual_seed(1)
    n, k, num_experts, r, d, out = 3, 2, 6, 4, 5, 7
    chosen = torch.tensor([[0, 2], [1, 3], [2, 0]])  # experts 4 and 5 are nobody's
    x = torch.randn(n, k, d, dtype=torch.float64)
    lora_a = torch.randn(num_experts, r, d, dtype=torch.float64)
    lora_b = torch.randn(num_experts, out, r, dtype=torch.float64)
    expected = _slow_slot_lora(x, lora_a, lora_b, chosen, 0.5).sum(1)
    lora_a[4] = float("inf")
    lora_a[5] = float("nan")
    got = slot_lora_sum(x, lora_a, lora_b, chosen, 0.5)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, expected)


def test_stacked_linear_has_each_jobs_f_linear_arithmetic_and_passes_gradcheck():
    from peft_mole.ops.segmented_lora import stacked_linear

    x64 = torch.randn(3, 5, 4, dtype=torch.float64, requires_grad=True)
    w64 = torch.randn(3, 6, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(stacked_linear, (x64, w64))
    for jobs, rows, d_in, d_out in ((4, 15, 16, 4), (3, 96, 64, 4), (2, 40, 64, 8), (8, 256, 512, 16)):
        torch.manual_seed(0)
        x = torch.randn(jobs, rows, d_in, requires_grad=True)
        weight = torch.randn(jobs, d_out, d_in, requires_grad=True)
        grad = torch.randn(jobs, rows, d_out)
        out = stacked_linear(x, weight)
        gx, gw = torch.autograd.grad(out, (x, weight), grad)
        for j in range(jobs):
            xj, wj = x[j].detach().requires_grad_(), weight[j].detach().requires_grad_()
            ref = torch.nn.functional.linear(xj, wj)
            rx, rw = torch.autograd.grad(ref, (xj, wj), grad[j])
            for got, expected in ((out[j], ref), (gx[j], rx), (gw[j], rw)):
                torch.testing.assert_close(got, expected, atol=0, rtol=0)


def test_stacked_lora_is_the_two_stacked_products_bit_for_bit_and_passes_gradcheck():
    from peft_mole.ops.segmented_lora import scaled, stacked_linear

    def factors(jobs, d_in, rank, d_out, dtype):
        lora_a = [torch.randn(rank, d_in, dtype=dtype, requires_grad=True) for _ in range(jobs)]
        lora_b = [torch.randn(d_out, rank, dtype=dtype, requires_grad=True) for _ in range(jobs)]
        return lora_a, lora_b

    x64 = torch.randn(3, 5, 4, dtype=torch.float64, requires_grad=True)
    a64, b64 = factors(3, 4, 2, 6, torch.float64)
    s64 = torch.tensor([2.0, 0.5, 1.0], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x, *f: stacked_lora(x, s64, list(f[:3]), list(f[3:])), (x64, *a64, *b64))
    for jobs, rows, d_in, rank, d_out in ((4, 15, 16, 4, 12), (3, 96, 64, 8, 172), (8, 256, 512, 16, 1376)):
        torch.manual_seed(0)
        x = torch.randn(jobs, rows, d_in, requires_grad=True)
        lora_a, lora_b = factors(jobs, d_in, rank, d_out, torch.float32)
        scaling = torch.linspace(0.5, 2.0, jobs)
        grad = torch.randn(jobs, rows, d_out)
        out = stacked_lora(x, scaling, lora_a, lora_b)
        got = torch.autograd.grad(out, (x, *lora_a, *lora_b), grad)
        hidden = scaled(stacked_linear(x, torch.stack(lora_a)), scaling.view(-1, 1, 1))
        ref = stacked_linear(hidden, torch.stack(lora_b))
        expected = torch.autograd.grad(ref, (x, *lora_a, *lora_b), grad)
        torch.testing.assert_close(out, ref, atol=0, rtol=0)
        for g, e in zip(got, expected, strict=True):
            torch.testing.assert_close(g, e, atol=0, rtol=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the two-product path: bf16 products, float32 gradients
        out = stacked_lora(x, scaling, lora_a, lora_b)
    assert out.dtype == torch.bfloat16
    grads = torch.autograd.grad(out.float().sum(), lora_a)
    assert all(g.dtype == torch.float32 and g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_linear_has_each_segments_f_linear_arithmetic_on_cpu(dtype):
    from peft_mole.ops import segmented_lora
    from peft_mole.ops.segmented_lora import grouped_linear, grouped_mm_exact

    segmented_lora._grouped_mm_runs_on_cpu.cache_clear()
    with torch.inference_mode():  # the first call may come from generation: it must not decide the probe
        assert grouped_mm_exact("cpu", dtype, 16, 8, 1376)
    segmented_lora._grouped_mm_runs_on_cpu.cache_clear()
    with torch.device("meta"):  # nor another default device
        assert grouped_mm_exact("cpu", dtype, 16, 8, 1376)
    segmented_lora._grouped_mm_runs_on_cpu.cache_clear()

    def checkpointed(t):  # the first call inside a non-reentrant checkpoint: the probe must not save tensors there
        assert grouped_mm_exact("cpu", dtype, 16, 8, 1376)
        return (t * 2).sum()

    t = torch.randn(3, requires_grad=True)
    torch.utils.checkpoint.checkpoint(checkpointed, t, use_reentrant=False).backward()
    assert torch.equal(t.grad, torch.full((3,), 2.0))
    assert not grouped_mm_exact("cpu", dtype, 16, 2, 1376)  # 8 bytes: below the kernels' 16-byte stride rule
    assert not grouped_mm_exact("cpu", torch.float64, 16, 8) and not grouped_mm_exact("cuda", dtype, 16, 8)
    for segments, d_in, d_out in (((5, 1, 7), 16, 8), ((100, 37, 256, 3, 180), 512, 16), ((40, 300, 90), 16, 1376)):
        torch.manual_seed(0)
        x = torch.randn(sum(segments), d_in, dtype=dtype, requires_grad=True)
        weight = torch.randn(len(segments), d_out, d_in, dtype=dtype, requires_grad=True)
        grad = torch.randn(sum(segments), d_out, dtype=dtype)
        ends = torch.tensor(segments).cumsum(0).to(torch.int32)
        out = grouped_linear(x, weight, ends)
        gx, gw = torch.autograd.grad(out, (x, weight), grad)
        (sum_grad,) = torch.autograd.grad(grouped_linear(x, weight, ends).sum(), x)  # from an expanded gradient
        expected_sum_grad = torch.cat([weight[j].detach().float().sum(0).expand(n, d_in) for j, n in enumerate(segments)])
        torch.testing.assert_close(sum_grad.float(), expected_sum_grad, rtol=2e-2, atol=2e-2)
        bounds = [0, *ends.tolist()]
        for j in range(len(segments)):
            rows = slice(bounds[j], bounds[j + 1])
            xj, wj = x[rows].detach().requires_grad_(), weight[j].detach().requires_grad_()
            ref = torch.nn.functional.linear(xj, wj)
            rx, rw = torch.autograd.grad(ref, (xj, wj), grad[rows])
            for got, expected in ((out[rows], ref), (gx[rows], rx), (gw[j], rw)):
                torch.testing.assert_close(got, expected, atol=0, rtol=0)


@pytest.mark.parametrize("precision", ["fp32", "bf16_autocast", "bf16_adapters"])
@pytest.mark.parametrize("sizes", [(3, 3, 3, 3, 3), (3, 1, 4, 2, 5)], ids=["equal_rows", "unequal_rows"])
@pytest.mark.parametrize("order", [["a", "b", BASE_ROW, "c", "d"], ["a", "b", "d"]])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_stacked_lora_equals_each_adapter_alone_bit_for_bit(dropout, order, sizes, precision, monkeypatch):
    """Equal-rank adapters share their products (batched over adapters for equal row blocks, grouped over row
    segments otherwise); each adapter's delta and gradients are the ones its own F.linear products give (what keeps
    a job independent of the jobs in its step), also under CPU autocast and with bf16 adapters (scalings such as
    1/3 not representable in bf16). An adapter of another rank and the base rows take the per-group path; when one
    bucket covers every row the result is added whole."""
    from peft_mole.forward_context import RowGroup
    from peft_mole.ops import segmented_lora
    from peft_mole.ops.dropout import Dropout
    from peft_mole.ops.segmented_lora import LoraFactors

    calls = []
    real_grouped = segmented_lora.grouped_linear
    monkeypatch.setattr(segmented_lora, "grouped_linear", lambda *a: calls.append(1) or real_grouped(*a))
    torch.manual_seed(0)
    seq, d_in, d_out = 5, 16, 24
    ranks = {"a": 8, "b": 8, "c": 4, "d": 8}  # rank 8: 16 bytes in bf16, so the grouped product applies
    dtype = torch.bfloat16 if precision == "bf16_adapters" else torch.float32
    params = {name: (torch.randn(r, d_in, dtype=dtype, requires_grad=True),
                     torch.randn(d_out, r, dtype=dtype, requires_grad=True)) for name, r in ranks.items()}
    scales = {"a": 2.0, "b": 1 / 3, "c": 1.0, "d": 8 / 7}  # not all exact in binary
    dropouts = {name: Dropout(dropout) if dropout else torch.nn.Identity() for name in ranks}
    starts = [sum(sizes[:i]) for i in range(len(order) + 1)]
    groups = [RowGroup(name, slice(starts[i], starts[i + 1]), sizes[i]) for i, name in enumerate(order)]
    x = torch.randn(starts[-1], seq, d_in, requires_grad=True)
    base_out = torch.randn(starts[-1], seq, d_out)

    def factors(name):
        return LoraFactors(*params[name], scales[name], dropouts[name]) if name in params else None

    def delta(name, piece):
        return None if name not in params else lora_delta(piece, *params[name], scales[name], dropouts[name])

    def run(stacked: bool):
        torch.manual_seed(1)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16_autocast"):
            out = scatter_row_deltas(base_out, x, groups, delta, factors if stacked else None)
        inputs = [x, *(t for name, pair in params.items() if name in order for t in pair)]
        return out, torch.autograd.grad(out.square().sum(), inputs)

    if dropout:  # masks are drawn in another order when stacked: no bitwise comparison with the plain path
        out, grads = run(True)
        assert out.shape == base_out.shape and all(g.isfinite().all() for g in grads)
        for module in dropouts.values():
            module.eval()
        without, _ = run(True)
        for module in dropouts.values():
            module.train()
        for i, name in enumerate(order):  # each adapter's rows are dropped (differ from no dropout), base rows not
            rows = slice(starts[i], starts[i + 1])
            if name == BASE_ROW:
                torch.testing.assert_close(out[rows], base_out[rows], atol=0, rtol=0)
            else:
                assert (out[rows] - without[rows]).abs().max() > 1e-3, name
        return
    (plain, plain_grads), (stacked, stacked_grads) = run(False), run(True)
    assert len(calls) == (2 if sizes[0] != sizes[1] else 0)  # unequal blocks: the grouped A and B products
    torch.testing.assert_close(stacked, plain, atol=0, rtol=0)
    for got, expected in zip(stacked_grads, plain_grads, strict=True):
        torch.testing.assert_close(got, expected, atol=0, rtol=0)
    if BASE_ROW in order:
        base_rows = slice(starts[2], starts[3])
        torch.testing.assert_close(stacked[base_rows], base_out[base_rows], atol=0, rtol=0)


def test_used_slots_drops_only_columns_no_token_uses():
    from peft_mole.ops.experts import used_slots

    weights = torch.tensor([[0.6, 0.4, 0.0, 0.0], [0.5, 0.0, 0.0, 0.0], [0.3, 0.3, 0.0, 0.0]])
    chosen = torch.tensor([[1, 0, 2, 3], [2, 1, 0, 3], [3, 2, 1, 0]])
    trimmed_w, trimmed_c = used_slots(weights, chosen)
    assert trimmed_w.tolist() == weights[:, :2].tolist() and trimmed_c.tolist() == chosen[:, :2].tolist()
    full = torch.ones(2, 3)
    assert used_slots(full, chosen[:2, :3])[0] is full  # nothing to drop: unchanged
    zeros = torch.zeros(2, 3)
    assert used_slots(zeros, chosen[:2, :3])[0] is zeros  # nothing used at all: left to the caller
    # off the CPU nothing is read back (no host sync): a meta tensor, whose values cannot be read, passes through
    on_meta = weights.to("meta")
    assert used_slots(on_meta, chosen.to("meta"))[0] is on_meta


def test_expert_segment_products_trace_under_torch_compile():
    """`torch._grouped_mm` has no fake-tensor rule on CPU, so under Dynamo the per-expert loop is traced instead
    (a compiled MixLoRA step crashed on it otherwise); eager calls keep the grouped product."""
    from peft_mole.ops.experts import _segment_matmul

    torch.manual_seed(0)
    rows, weight, counts = torch.randn(12, 16, requires_grad=True), torch.randn(3, 8, 16, requires_grad=True), [5, 0, 7]
    expected = torch.cat([rows[:5] @ weight[0].t(), rows[5:] @ weight[2].t()])
    compiled = torch.compile(lambda r, w: _segment_matmul(r, w, counts), backend="eager")
    out = compiled(rows, weight)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(_segment_matmul(rows, weight, counts), expected)  # eager: grouped, empty segment
    out.sum().backward()
    assert weight.grad[1].abs().sum() == 0 and rows.grad.isfinite().all()


def test_constant_on_is_built_once_and_outside_inference_mode():
    """The jobs' scalings (and segment sizes) are made into a device tensor once, not at every projection call (on
    CUDA each such copy is followed by a stream sync). One first made under inference mode (evaluation) still
    serves a training step, which saves it for the backward."""
    from peft_mole.ops.segmented_lora import constant_on, scaled

    with torch.inference_mode():
        first = constant_on((2.0, 1 / 3), torch.float32, torch.device("cpu"))
    assert not first.is_inference() and first.tolist() == [2.0, torch.tensor(1 / 3).item()]
    assert constant_on((2.0, 1 / 3), torch.float32, torch.device("cpu")) is first
    assert constant_on((2.0, 1 / 3), torch.float64, torch.device("cpu")) is not first
    hidden = torch.ones(2, 3, requires_grad=True)
    scaled(hidden, first.view(-1, 1)).sum().backward()
    assert hidden.grad[:, 0].tolist() == first.tolist()


def test_dispatch_orders_the_kept_pairs_alike_with_and_without_a_boolean_index(monkeypatch):
    """A GPU's dispatch sorts the dropped slots to the end and cuts them off by the host count (a boolean index
    reads its size back: a second sync per layer), the CPU's removes them first: the same pairs in the same order."""
    import peft_mole.ops.experts as experts_module

    gen = torch.Generator().manual_seed(0)
    experts = torch.stack([torch.randperm(6, generator=gen)[:4] for _ in range(50)])
    weights = torch.rand(50, 4, generator=gen)
    weights[::3, 2:] = 0  # unused slots (a DynMoLE rule's)
    on_cpu = dispatch(weights, experts, 6)
    monkeypatch.setattr(experts_module, "BOOLEAN_INDEX_DEVICES", ())
    sorted_to_the_end = dispatch(weights, experts, 6)
    assert on_cpu.counts == sorted_to_the_end.counts and sum(on_cpu.counts) == 200 - 2 * 17
    for field in ("token", "expert", "weight"):
        assert torch.equal(getattr(on_cpu, field), getattr(sorted_to_the_end, field)), field


def test_a_selection_without_pairs_still_gives_zero_gradients():
    """An empty dispatch (no token) returned a tensor outside the graph: B's gradient was missing, not zero."""
    from peft_mole.ops.experts import dispatch, segment_b

    plan = dispatch(torch.zeros(0, 2), torch.zeros(0, 2, dtype=torch.long), num_experts=4)
    z = torch.zeros(0, 3, dtype=torch.float64, requires_grad=True)
    lora_b = torch.randn(4, 5, 3, dtype=torch.float64, requires_grad=True)
    out = segment_b(z, lora_b, plan, 2.0)
    grad_z, grad_b = torch.autograd.grad(out.sum(), (z, lora_b))
    assert out.shape == (0, 5) and grad_z.shape == (0, 3) and torch.equal(grad_b, torch.zeros_like(lora_b))

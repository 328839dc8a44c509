import pytest
import torch

from peft_mole import routing


def slow_top_k(probs, k):
    """Per-token reference: sort each row, keep k, renormalise."""
    weights, experts = [], []
    for row in probs.tolist():
        order = sorted(range(len(row)), key=lambda i: -row[i])[:k]
        total = sum(row[i] for i in order)
        experts.append(order)
        weights.append([row[i] / total for i in order])
    return torch.tensor(weights), torch.tensor(experts)


def slow_load_balance(probs, selected):
    num_tokens, num_experts = probs.shape
    selections = sum(sum(int(s) for s in row) for row in selected.tolist())
    loss = 0.0
    for i in range(num_experts):
        f_i = sum(int(selected[t, i]) for t in range(num_tokens)) / selections
        p_i = sum(float(probs[t, i]) for t in range(num_tokens)) / num_tokens
        loss += f_i * p_i
    return num_experts * loss


def test_router_probabilities_are_fp32_softmax():
    logits = torch.randn(5, 8, dtype=torch.bfloat16)
    probs = routing.router_probabilities(logits)
    assert probs.dtype == torch.float32
    torch.testing.assert_close(probs.sum(-1), torch.ones(5))
    torch.testing.assert_close(probs, torch.softmax(logits.float(), -1))


@pytest.mark.parametrize("k", [1, 2, 3, 8])
def test_top_k_matches_slow_reference(k):
    probs = torch.softmax(torch.randn(50, 8), -1)
    weights, experts = routing.top_k_routing(probs, k)
    ref_w, ref_e = slow_top_k(probs, k)
    assert torch.equal(experts, ref_e)
    torch.testing.assert_close(weights, ref_w)
    torch.testing.assert_close(weights.sum(-1), torch.ones(50))


def test_top_k_without_renormalisation_keeps_probabilities():
    probs = torch.tensor([[0.1, 0.6, 0.3]])
    weights, experts = routing.top_k_routing(probs, 2, renormalize=False)
    assert experts.tolist() == [[1, 2]]
    torch.testing.assert_close(weights, torch.tensor([[0.6, 0.3]]))


@pytest.mark.parametrize("k", [0, 9])
def test_top_k_rejects_bad_k(k):
    with pytest.raises(ValueError, match="k must be in"):
        routing.top_k_routing(torch.rand(2, 8), k)


def test_load_balance_is_one_at_perfect_balance():
    # 8 tokens, 4 experts, uniform probabilities, each expert chosen exactly 4 times with k = 2
    probs = torch.full((8, 4), 0.25)
    experts = torch.tensor([[0, 1], [2, 3]] * 4)
    selected = routing.selection_mask(experts, torch.ones(8, 2), 4)
    assert routing.load_balance_loss(probs, selected).item() == pytest.approx(1.0, abs=1e-7)


def test_load_balance_is_num_experts_at_collapse():
    probs = torch.zeros(6, 4)
    probs[:, 2] = 1.0
    selected = routing.selection_mask(torch.full((6, 1), 2), torch.ones(6, 1), 4)
    assert routing.load_balance_loss(probs, selected).item() == pytest.approx(4.0)


def test_load_balance_matches_slow_reference_and_has_gradient():
    logits = torch.randn(40, 8, requires_grad=True)
    probs = routing.router_probabilities(logits)
    weights, experts = routing.top_k_routing(probs, 2)
    selected = routing.selection_mask(experts, weights, 8)
    loss = routing.load_balance_loss(probs, selected)
    assert loss.item() == pytest.approx(slow_load_balance(probs.detach(), selected), rel=1e-6)
    loss.backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_selection_mask_ignores_zero_weight_slots():
    experts = torch.tensor([[0, 3], [1, 2]])
    weights = torch.tensor([[0.7, 0.0], [0.5, 0.5]])
    mask = routing.selection_mask(experts, weights, 4)
    assert mask.tolist() == [[True, False, False, False], [False, True, True, False]]
    torch.testing.assert_close(routing.expert_load(mask), torch.tensor([1 / 3, 1 / 3, 1 / 3, 0.0]))


def test_load_balance_of_no_tokens_is_zero():
    assert routing.load_balance_loss(torch.zeros(0, 4), torch.zeros(0, 4, dtype=torch.bool)).item() == 0.0


@pytest.mark.parametrize("q", [1.0, 1.5], ids=["shannon", "tsallis"])
def test_masked_aux_losses_equal_the_losses_on_the_counted_rows(q):
    """The masked form (all rows kept, padding masked out: what a compiled graph computes) gives the value and the
    router gradient of the loss on the real tokens alone; no real token gives 0, as no token does."""
    gen = torch.Generator().manual_seed(3)
    probs = torch.softmax(torch.randn(10, 4, generator=gen), -1).requires_grad_()
    weights, experts = routing.top_k_routing(probs, 2, renormalize=True)
    selected = routing.selection_mask(experts, weights, 4)
    mask = torch.tensor([1, 1, 0, 1, 0, 0, 1, 1, 1, 0], dtype=torch.bool)
    for loss in (lambda p, s, m=None: routing.load_balance_loss(p, s, m),
                 lambda p, s, m=None: routing.tsallis_loss(p, q, m)):
        masked, counted = loss(probs, selected, mask), loss(probs[mask], selected[mask])
        torch.testing.assert_close(masked, counted)
        torch.testing.assert_close(*(torch.autograd.grad(v, probs)[0] for v in (masked, counted)))
        assert loss(probs, selected, torch.zeros_like(mask)).item() == 0.0


@pytest.mark.parametrize("masked", [False, True])
def test_pieces_with_the_whole_load_add_up_to_the_whole_losses_and_gradients(masked):
    """A micro-batch trained in pieces (an out-of-memory retry): each piece's load-balance and entropy losses with
    the whole's f and |T| (`WholeLoad`) sum to the whole's losses, and so do their gradients."""
    from peft_mole.routing import (
        WholeLoad,
        load_balance_loss,
        router_load,
        selection_mask,
        top_k_routing,
        tsallis_loss,
    )

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(11, 4, generator=gen, dtype=torch.float64).requires_grad_()
    probs = logits.softmax(-1)
    weights, experts = top_k_routing(probs.detach(), k=2, renormalize=True)
    selected = selection_mask(experts, weights, 4)
    mask = torch.rand(11, generator=gen) > 0.3 if masked else None
    whole = load_balance_loss(probs, selected, mask) + tsallis_loss(probs, 1.1, mask)
    (expected,) = torch.autograd.grad(whole, logits, retain_graph=True)
    pieces = [slice(0, 4), slice(4, 11)]
    loads = [router_load(probs[p], selected[p], None if mask is None else mask[p]) for p in pieces]
    counts, tokens = sum(c for c, _ in loads), sum(n for _, n in loads)
    load = WholeLoad(counts / counts.sum(), tokens)
    summed = sum(load_balance_loss(probs[p], selected[p], None if mask is None else mask[p], load)
                 + tsallis_loss(probs[p], 1.1, None if mask is None else mask[p], load.tokens) for p in pieces)
    (got,) = torch.autograd.grad(summed, logits)
    torch.testing.assert_close(summed, whole, rtol=1e-6, atol=1e-6)  # (the losses compute in fp32)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7)
    alone = sum(load_balance_loss(probs[p], selected[p], None if mask is None else mask[p]) for p in pieces)
    assert abs(alone.item() - load_balance_loss(probs, selected, mask).item()) > 1e-3  # each piece's own f: not it

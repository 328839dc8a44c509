"""DynMoLE routing functions against slow per-token references, and their edge cases."""

import math

import pytest
import torch

from peft_mole import DynMoLEConfig, routing


def slow_entropy(row, q):
    row = [max(p, 1e-5) for p in row]
    if q == 1.0:
        return -sum(p * math.log(p) for p in row)
    return (1 - sum(p**q for p in row)) / (q - 1)


def slow_dynmole(row, q, top_p, threshold, min_experts, renormalize):
    """Returns {expert: weight} for one token."""
    num_experts = len(row)
    s_max = math.log(num_experts) if q == 1.0 else (1 - num_experts ** (1 - q)) / (q - 1)
    h = slow_entropy(row, q) / s_max
    order = sorted(range(num_experts), key=lambda i: -row[i])
    if h > threshold:
        chosen = order
    else:
        chosen, total = [], 0.0
        for i in order:
            total += row[i]
            if total <= top_p:
                chosen.append(i)
            else:
                break
        for i in order[:min_experts]:
            if i not in chosen:
                chosen.append(i)
    weights = {i: row[i] for i in chosen}
    if renormalize:
        z = sum(weights.values())
        weights = {i: w / z for i, w in weights.items()}
    return weights


def as_dict(weights, experts):
    return [{int(e): float(w) for w, e in zip(wr, er, strict=True) if w != 0} for wr, er in zip(weights, experts, strict=True)]


@pytest.mark.parametrize("q", [1.0, 1.1, 2.0, 0.5])
def test_tsallis_entropy_matches_reference(q):
    probs = torch.softmax(torch.randn(20, 6) * 2, -1)
    expected = torch.tensor([slow_entropy(r, q) for r in probs.tolist()])
    torch.testing.assert_close(routing.tsallis_entropy(probs, q), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("q", [1.0, 1.1, 3.0])
def test_normalised_entropy_is_one_for_uniform_and_near_zero_for_one_hot(q):
    assert routing.normalized_entropy(torch.full((1, 8), 1 / 8), q).item() == pytest.approx(1.0, abs=1e-5)
    one_hot = torch.zeros(1, 8)
    one_hot[0, 3] = 1.0
    assert routing.normalized_entropy(one_hot, q).item() < 1e-3


def test_q_near_one_approaches_shannon():
    probs = torch.softmax(torch.randn(5, 4), -1)
    torch.testing.assert_close(
        routing.normalized_entropy(probs, 1.0 + 1e-4), routing.normalized_entropy(probs, 1.0), atol=1e-3, rtol=1e-3
    )


def test_threshold_one_never_broadcasts_a_uniform_router():
    """In fp32 a uniform router's h can come out 1 + 2e-7 (E = 6, q = 1.1 did): at threshold 1 the rule still keeps
    the top-p experts, for every E and q."""
    above_one = 0
    for num_experts in range(2, 17):
        for q in (0.9, 1.0, 1.1, 2.0):
            probs = torch.softmax(torch.zeros(4, num_experts), -1)
            above_one += int((routing.normalized_entropy(probs, q) > 1.0).any())
            weights, _ = routing.dynmole_routing(probs, q=q, top_p=0.5, broadcast_threshold=1.0, min_experts=1)
            top_p_weights, _ = routing.top_p_routing(probs, 0.5, min_experts=1)
            assert torch.equal(weights, top_p_weights), (num_experts, q)
    assert above_one > 0  # the rounding this guards against happens


@pytest.mark.parametrize("q, top_p, threshold, min_experts, renormalize", [
    (1.1, 0.75, 0.9, 2, False),
    (1.1, 0.5, 0.95, 1, True),
    (1.0, 0.9, 0.8, 2, False),
    (2.0, 0.3, 0.99, 3, False),
])
def test_dynmole_rule_matches_reference(q, top_p, threshold, min_experts, renormalize):
    probs = torch.softmax(torch.randn(200, 6) * torch.rand(200, 1) * 4, -1)  # from flat to peaked
    weights, experts = routing.dynmole_routing(probs, q, top_p, threshold, min_experts, renormalize)
    got = as_dict(weights, experts)
    expected = [slow_dynmole(r, q, top_p, threshold, min_experts, renormalize) for r in probs.tolist()]
    for g, e in zip(got, expected, strict=True):
        assert g.keys() == e.keys()
        for k in g:
            assert g[k] == pytest.approx(e[k], abs=1e-6)
    # the rule really varies: some tokens broadcast, some use few experts
    sizes = {len(g) for g in got}
    assert 6 in sizes and min(sizes) < 6, sizes


def test_uniform_distribution_broadcasts_to_all_experts():
    weights, experts = routing.dynmole_routing(torch.full((3, 4), 0.25))
    assert (weights == 0.25).all() and sorted(experts[0].tolist()) == [0, 1, 2, 3]


def test_one_hot_uses_exactly_min_experts():
    probs = torch.tensor([[0.0, 1.0, 0.0, 0.0, 0.0]])
    weights, experts = routing.dynmole_routing(probs, min_experts=2)
    assert int((weights != 0).sum()) == 1  # the second expert has p = 0: selected but weight 0 ...
    weights, experts = routing.dynmole_routing(torch.tensor([[0.01, 0.96, 0.01, 0.01, 0.01]]), min_experts=2)
    assert int((weights != 0).sum()) == 2 and experts[0, 0] == 1


def test_ties_and_two_experts():
    weights, experts = routing.dynmole_routing(torch.tensor([[0.5, 0.5]]), min_experts=1)
    assert int((weights != 0).sum()) == 2  # uniform over 2 → broadcast
    weights, experts = routing.top_p_routing(torch.tensor([[0.4, 0.4, 0.2]]), top_p=0.5, min_experts=1)
    assert int((weights != 0).sum()) == 1 and weights.max().item() == pytest.approx(0.4)


def test_top_p_one_keeps_every_expert_despite_fp32_rounding():
    probs = torch.softmax(torch.randn(10_000, 8, generator=torch.Generator().manual_seed(0)), dim=-1)
    assert (probs.sort(dim=-1, descending=True).values.cumsum(-1)[:, -1] > 1.0).any()  # rounding ends above 1
    weights, _ = routing.top_p_routing(probs, top_p=1.0, min_experts=1)
    assert bool((weights != 0).all())  # (before: 13 % of the tokens lost their last expert)
    weights, _ = routing.dynmole_routing(probs, top_p=1.0, broadcast_threshold=1.0, min_experts=1)
    torch.testing.assert_close(weights.sum(-1), torch.ones(10_000))


def test_switch_is_top1_with_probability_weight():
    probs = torch.tensor([[0.2, 0.7, 0.1]])
    weights, experts = routing.switch_routing(probs)
    assert experts.tolist() == [[1]] and weights.tolist() == [[pytest.approx(0.7)]]


def test_tsallis_loss_is_mean_normalised_entropy_with_gradient():
    logits = torch.randn(10, 4, requires_grad=True)
    probs = routing.router_probabilities(logits)
    loss = routing.tsallis_loss(probs, 1.1)
    s_max = (1 - 4 ** (1 - 1.1)) / (1.1 - 1)  # the entropy of the uniform distribution over 4 experts
    by_hand = sum(slow_entropy(row, 1.1) / s_max for row in probs.tolist()) / 10
    assert loss.item() == pytest.approx(by_hand, abs=1e-5)
    loss.backward()
    assert logits.grad.abs().sum() > 0
    assert routing.tsallis_loss(torch.zeros(0, 4), 1.1).item() == 0.0


def test_load_balance_over_variable_size_selections():
    probs = torch.full((2, 4), 0.25)
    weights, experts = torch.tensor([[0.25] * 4, [0.5, 0.5, 0, 0]]), torch.tensor([[0, 1, 2, 3], [0, 1, 2, 3]])
    selected = routing.selection_mask(experts, weights, 4)
    # f = [2, 2, 1, 1] / 6, P = 1/4 each → L = 4 · Σ f·P = 1
    assert routing.load_balance_loss(probs, selected).item() == pytest.approx(1.0)
    torch.testing.assert_close(routing.expert_load(selected), torch.tensor([2, 2, 1, 1]) / 6)


@pytest.mark.parametrize("q", [0.999, 1.001])
def test_q_at_the_configs_nearest_allowed_distance_from_one_keeps_h_accurate(q):
    """`DynMoLEConfig` refuses 0 < |q − 1| < `routing.MIN_Q_DISTANCE` and takes 0.999 and 1.001; there fp32 h is
    within 1e-4 of the same formula in float64 (a uniform router and peaked ones)."""
    DynMoLEConfig(num_experts=8, q=q)
    logits = torch.randn(31, 8, generator=torch.Generator().manual_seed(0)) * torch.linspace(0.1, 5, 31).unsqueeze(-1)
    probs = torch.softmax(torch.cat([torch.zeros(1, 8), logits]), -1)
    p = probs.double().clamp(min=routing.PROB_FLOOR)
    exact = (1 - p.pow(q).sum(-1)) / (q - 1) / ((1 - 8 ** (1 - q)) / (q - 1))
    torch.testing.assert_close(routing.normalized_entropy(probs, q).double(), exact, atol=1e-4, rtol=0)

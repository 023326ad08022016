"""The mathematics of UDI: JS divergence, the CLUB bound, the controller, anchor choice, fusion."""

from __future__ import annotations

import math

import pytest
import torch

from benchmark.late_fusion import fuse
from benchmark.losses import entropy, js_divergence
from udi.anchor import select_anchor
from udi.club import CLUBEstimator, club_upper_bound, club_upper_bound_pairs
from udi.controller import DynamicController, controller_from_gradients, controller_weights, inner_product

# --- JS divergence ---------------------------------------------------------------------------


def test_js_is_zero_for_equal_distributions():
    p = torch.softmax(torch.randn(16, 5, generator=torch.Generator().manual_seed(0)), dim=1)
    assert js_divergence(p, p).item() == pytest.approx(0.0, abs=1e-7)
    z = torch.randn(16, 5)
    assert js_divergence(z, z, from_logits=True).item() == pytest.approx(0.0, abs=1e-7)


def test_js_is_ln2_for_disjoint_distributions():
    p = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.5, 0.5, 0.0, 0.0]])
    q = torch.tensor([[0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.3, 0.7]])
    assert js_divergence(p, q).item() == pytest.approx(math.log(2), abs=1e-7)
    # the logit form reaches ln 2 in the limit of one-hot predictions
    big = 60.0
    za = torch.tensor([[big, 0.0, 0.0]])
    zb = torch.tensor([[0.0, big, 0.0]])
    assert js_divergence(za, zb, from_logits=True).item() == pytest.approx(math.log(2), abs=1e-6)


def test_js_is_symmetric_bounded_and_matches_logit_form():
    gen = torch.Generator().manual_seed(1)
    za, zb = torch.randn(32, 6, generator=gen) * 3, torch.randn(32, 6, generator=gen) * 3
    pa, pb = za.softmax(dim=1), zb.softmax(dim=1)
    ab, ba = js_divergence(pa, pb).item(), js_divergence(pb, pa).item()
    assert ab == pytest.approx(ba, abs=1e-7)
    assert 0.0 < ab < math.log(2)
    assert js_divergence(za, zb, from_logits=True).item() == pytest.approx(ab, abs=1e-6)
    # the definition ½KL(p‖r) + ½KL(q‖r), per sample, averaged
    r = 0.5 * (pa + pb)
    direct = 0.5 * ((pa * (pa / r).log()).sum(1) + (pb * (pb / r).log()).sum(1))
    assert ab == pytest.approx(direct.mean().item(), abs=1e-6)


def test_js_gradient_reaches_only_what_requires_it():
    za = torch.randn(8, 4)
    zm = torch.randn(8, 4, requires_grad=True)
    js_divergence(za, zm, from_logits=True).backward()
    assert zm.grad is not None and torch.isfinite(zm.grad).all() and zm.grad.abs().sum() > 0


def test_entropy():
    assert entropy(torch.zeros(3, 4)).tolist() == pytest.approx([math.log(4)] * 3, abs=1e-6)
    assert entropy(torch.tensor([[100.0, 0.0, 0.0]])).item() == pytest.approx(0.0, abs=1e-6)


# --- CLUB --------------------------------------------------------------------------------------


def test_all_pairs_closed_form_equals_the_definition():
    gen = torch.Generator().manual_seed(2)
    mu, logvar = torch.randn(20, 3, generator=gen), torch.randn(20, 3, generator=gen).tanh()
    y = torch.randn(20, 3, generator=gen)
    fast = club_upper_bound(mu, logvar, y, mode="all_pairs")
    slow = club_upper_bound_pairs(mu, logvar, y)
    assert fast.item() == pytest.approx(slow.item(), rel=1e-5, abs=1e-5)


def _correlated(rho: float, n: int, d: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen)
    y = rho * x + math.sqrt(1 - rho**2) * torch.randn(n, d, generator=gen)
    return x, y


def _fitted_bound(rho: float, d: int = 4, n: int = 2000, steps: int = 300) -> float:
    x, y = _correlated(rho, n, d, seed=3)
    torch.manual_seed(0)
    est = CLUBEstimator(d, d, hidden=32)
    opt = torch.optim.Adam(est.parameters(), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        est.learning_loss(x, y).backward()
        opt.step()
    x_test, y_test = _correlated(rho, n, d, seed=4)
    with torch.no_grad():
        return est.bound(x_test, y_test).item()


def test_club_bound_on_correlated_gaussians_is_above_the_true_mi_and_falls_to_zero():
    d = 4
    rhos = [0.8, 0.5, 0.2, 0.0]
    bounds = [_fitted_bound(rho, d) for rho in rhos]
    true = [-0.5 * d * math.log(1 - rho**2) for rho in rhos]
    for rho, bound, mi in zip(rhos, bounds, true):
        assert bound >= mi - 0.05, (rho, bound, mi)
        # the fitted estimator approaches CLUB's value for the exact conditional, d·ρ²/(1−ρ²)
        assert bound == pytest.approx(d * rho**2 / (1 - rho**2), abs=0.15 + 0.1 * d * rho**2 / (1 - rho**2))
    assert bounds[0] > bounds[1] > bounds[2] > bounds[3]
    assert abs(bounds[-1]) < 0.05


def test_sampled_bound_averages_to_the_all_pairs_bound():
    gen = torch.Generator().manual_seed(5)
    mu, logvar = torch.randn(64, 3, generator=gen), 0.3 * torch.randn(64, 3, generator=gen).tanh()
    y = mu + 0.5 * torch.randn(64, 3, generator=gen)
    exact = club_upper_bound(mu, logvar, y, mode="all_pairs").item()
    neg_gen = torch.Generator().manual_seed(6)
    samples = [club_upper_bound(mu, logvar, y, mode="sampled", generator=neg_gen).item() for _ in range(400)]
    # a random permutation pairs i with itself with probability 1/N: the all-pairs bound counts j = i too
    assert sum(samples) / len(samples) == pytest.approx(exact, rel=0.05)
    with pytest.raises(ValueError):
        club_upper_bound(mu, logvar, y, mode="nope")


def test_club_gradient_through_the_samples_only_when_estimator_is_fixed():
    est = CLUBEstimator(3, 3, hidden=8)
    x = torch.randn(10, 3)
    y = torch.randn(10, 3, requires_grad=True)
    with torch.no_grad():
        mu, logvar = est(x)
    club_upper_bound(mu, logvar, y).backward()
    assert y.grad is not None and y.grad.abs().sum() > 0
    assert all(p.grad is None for p in est.parameters())


# --- controller --------------------------------------------------------------------------------


def test_controller_weights_for_hand_built_gradients():
    # two parameters, one of them unused by a term (None)
    g_cls = [torch.tensor([1.0, 1.0]), torch.tensor([2.0])]
    g_con = [torch.tensor([2.0, 0.0]), None]                # <g_cls, g_con> = 2
    g_com = [torch.tensor([0.0, 1.0]), torch.tensor([1.0])]  # <g_cls, g_com> = 1 + 2 = 3
    step = controller_from_gradients(g_cls, g_con, g_com, previous=(0.5, 0.5), eps=0.0)
    assert (step.ip_con, step.ip_com) == (2.0, 3.0)
    assert step.lambda_con == pytest.approx(0.4) and step.lambda_com == pytest.approx(0.6)
    assert not step.kept_previous


def test_controller_one_negative_inner_product_gets_zero_weight():
    step = controller_weights(-1.5, 0.25, previous=(0.5, 0.5), eps=1e-12)
    assert step.lambda_con == 0.0 and step.lambda_com == pytest.approx(1.0)


def test_controller_both_negative_keeps_previous_weights():
    g_cls = [torch.tensor([1.0, 0.0])]
    g_con = [torch.tensor([-1.0, 5.0])]
    g_com = [torch.tensor([-0.5, 0.0])]
    step = controller_from_gradients(g_cls, g_con, g_com, previous=(0.3, 0.9))
    assert step.ip_con == -1.0 and step.ip_com == -0.5
    assert (step.lambda_con, step.lambda_com) == (0.3, 0.9) and step.kept_previous
    assert controller_weights(0.0, 0.0, previous=(0.2, 0.1)).kept_previous


def test_inner_product_equals_flattened_dot_product():
    gen = torch.Generator().manual_seed(7)
    a = [torch.randn(3, 4, generator=gen), torch.randn(5, generator=gen)]
    b = [torch.randn(3, 4, generator=gen), torch.randn(5, generator=gen)]
    flat = torch.dot(torch.cat([t.flatten() for t in a]), torch.cat([t.flatten() for t in b])).item()
    assert inner_product(a, b) == pytest.approx(flat, rel=1e-6)


def test_dynamic_controller_uses_autograd_gradients_and_keeps_the_graph():
    w = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    cls = (w**2).sum()                 # g_cls = 2w = (2, 4)
    con = (w * torch.tensor([1.0, 0.0])).sum()   # g_con = (1, 0): <.,.> = 2
    com = (w * torch.tensor([-1.0, 1.0])).sum()  # g_com = (-1, 1): <.,.> = 2
    ctrl = DynamicController([w], (0.5, 0.5), every=None, eps=0.0)
    assert ctrl.due(0) and not ctrl.due(1)
    step = ctrl.update(cls, con, com)
    assert (step.ip_con, step.ip_com) == (2.0, 2.0) and ctrl.weights == (0.5, 0.5)
    (cls + con + com).backward()  # the graph survives the controller's gradient computation
    assert w.grad.tolist() == [2.0, 5.0]
    every = DynamicController([w], (0.5, 0.5), every=3)
    due = []
    for _ in range(7):
        due.append(every.due(5))
        every.advance()
    assert due == [True, False, False, True, False, False, True]


# --- anchor choice and fusion --------------------------------------------------------------------


def test_anchor_selection():
    acc = {"a": 0.700, "b": 0.650, "c": 0.697}
    ent = {"a": 0.9, "b": 0.1, "c": 0.5}
    assert select_anchor(acc, ent, tie_tol=0.0).anchor == "a"
    tie = select_anchor(acc, ent, tie_tol=0.5)  # c is 0.3 points behind a and more confident
    assert tie.anchor == "c" and tie.rule == "entropy tie-break" and set(tie.tied) == {"a", "c"}
    assert select_anchor(acc, ent, tie_tol=5.0).anchor == "b"
    assert select_anchor({"a": 0.7, "b": 0.695}, {"a": 1.0, "b": 0.2}, tie_tol=0.5).anchor == "b"
    forced = select_anchor(acc, ent, tie_tol=0.5, forced="b")
    assert forced.anchor == "b" and forced.rule == "forced"


def test_fusion_rules():
    za = torch.tensor([[2.0, 0.0], [0.0, 0.1]])
    zb = torch.tensor([[0.0, 1.0], [0.0, 5.0]])
    assert torch.equal(fuse([za, zb], "logit_sum"), za + zb)
    probs = fuse([za, zb], "prob_mean").exp()
    assert torch.allclose(probs, 0.5 * (za.softmax(1) + zb.softmax(1)))
    ent = fuse([za, zb], "entropy")
    ea, eb = entropy(za), entropy(zb)
    w = torch.softmax(torch.stack([torch.maximum(ea, eb) - ea, torch.maximum(ea, eb) - eb]), dim=0)
    assert torch.allclose(ent, w[0].unsqueeze(1) * za + w[1].unsqueeze(1) * zb)
    # the more confident (lower-entropy) modality gets the larger weight, per sample
    assert w[0, 0] > 0.5 and w[1, 1] > 0.5
    with pytest.raises(ValueError):
        fuse([za], "vote")

"""MCR: one encoder pass per batch, the gradient routing of every JS term in each game, the
supervised contrastive loss against a hand computation, the CEB term, unimodal initialisation
through the shared cache, and equivalence with ``joint`` when every regularizer is off."""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers import assert_same_run, guard_steps, wide_mlp

from baselines.mcr import ALL, MCR, supervised_nt_xent
from benchmark.cli import main
from benchmark.config import build_config
from benchmark.errors import UsageError
from benchmark.losses import js_divergence
from benchmark.runner import execute, prepare
from benchmark.trainer import Trainer


def _method(tiny: dict, **options) -> MCR:
    run = prepare(build_config(dict(tiny, method="mcr", **{f"method.{k}": v for k, v in options.items()})))
    torch.manual_seed(0)
    run.method.build()
    return run.method, run


def _batch(run, n: int = 16) -> dict[str, torch.Tensor]:
    split = run.data.splits["train"]
    idx = torch.arange(n)
    batch = {m: x[idx] for m, x in split.inputs.items()}
    batch["label"] = split.labels[idx]
    return batch


@pytest.mark.parametrize("perms", [1, 32])
def test_encoders_run_once_per_batch(tiny: dict, perms: int) -> None:
    method, run = _method(tiny, num_permutations=perms, ceb_weight=0.5)
    calls = {m: 0 for m in method.modalities}
    for m, enc in method.model.encoders.items():
        enc.register_forward_hook(lambda *_, m=m: calls.__setitem__(m, calls[m] + 1))
    out = method.training_step(_batch(run), None)
    out["loss"].backward()
    assert calls == {m: 1 for m in method.modalities}
    assert {"ce", "unimodal_ce", "game_reg", "contrastive", "ceb"} <= out.keys()


def _reached(method: MCR, term: torch.Tensor) -> set[str]:
    reached = set()
    for m, enc in method.model.encoders.items():
        params = [p for p in enc.parameters() if p.requires_grad]
        grads = torch.autograd.grad(term, params, retain_graph=True, allow_unused=True)
        if any(g is not None and g.abs().sum() > 0 for g in grads):
            reached.add(m)
    return reached


@pytest.mark.parametrize("fusion", ["concat", "film"])
@pytest.mark.parametrize("modalities", [2, 3])
@pytest.mark.parametrize("game", ["greedy", "independent", "collaborative"])
def test_each_js_term_reaches_exactly_its_encoders(tiny: dict, game: str, modalities: int, fusion: str) -> None:
    tiny = dict(tiny, fusion=fusion, **{"dataset.modalities": modalities})
    method, run = _method(tiny, game=game, num_permutations=4)
    feats = method.encode(_batch(run))
    terms = method.js_terms(feats)
    names = method.modalities
    if game == "greedy":
        assert set(terms) == {(k, m) for k in names for m in names}
    elif game == "independent":
        assert set(terms) == {(m, m) for m in names}
    else:
        assert set(terms) == {(ALL, m) for m in names}
    for (route, m), term in terms.items():
        assert term.item() > 0
        assert _reached(method, term) == (set(names) if route == ALL else {route}), (route, m)


@pytest.mark.parametrize("game", ["greedy", "independent", "collaborative"])
def test_each_encoder_gets_its_game_objective(tiny: dict, game: str) -> None:
    """Encoder m's gradient is that of −JSD_m + k·(−JSD_other), k = −1, 0, +1."""
    method, run = _method(tiny, game=game, num_permutations=4)
    feats = method.encode(_batch(run))
    gen_state = method._perm_gen.get_state()
    reg = method.game_regularizer(method.js_terms(feats))
    method._perm_gen.set_state(gen_state)  # the same permutations again
    method.options.game = "collaborative"
    full = method.js_terms(feats)  # every term attached to every encoder
    method.options.game = game
    k = {"greedy": -1.0, "independent": 0.0, "collaborative": 1.0}[game]
    a, v = method.modalities
    for mine, other in ((a, v), (a, v)[::-1]):
        objective = -full[(ALL, mine)] - k * full[(ALL, other)]
        params = list(method.model.encoders[mine].parameters())
        got = torch.autograd.grad(reg, params, retain_graph=True)
        want = torch.autograd.grad(objective, params, retain_graph=True)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-7)


def test_reference_routing_keeps_the_unpermuted_prediction_attached(tiny: dict) -> None:
    method, run = _method(tiny, route_target="false", num_permutations=4)
    terms = method.js_terms(method.encode(_batch(run)))
    assert all(_reached(method, t) == set(method.modalities) for t in terms.values())


def test_js_divergence_matches_its_definition() -> None:
    p_logits = torch.tensor([[1.0, 0.0, -1.0], [0.5, 0.5, 2.0]])
    q_logits = torch.tensor([[0.0, 2.0, 0.0], [0.5, 0.4, 2.1]])
    total = 0.0
    for pr, qr in zip(p_logits.tolist(), q_logits.tolist()):
        p = [math.exp(v) / sum(math.exp(u) for u in pr) for v in pr]
        q = [math.exp(v) / sum(math.exp(u) for u in qr) for v in qr]
        mix = [(a + b) / 2 for a, b in zip(p, q)]
        total += 0.5 * sum(a * math.log(a / c) for a, c in zip(p, mix)) + \
            0.5 * sum(b * math.log(b / c) for b, c in zip(q, mix))
    assert js_divergence(p_logits, q_logits, from_logits=True).item() == pytest.approx(total / 2, rel=1e-5)
    assert js_divergence(p_logits, p_logits, from_logits=True).item() == pytest.approx(0.0, abs=1e-7)


def test_contrastive_loss_matches_a_hand_computation_on_four_samples() -> None:
    fa = torch.tensor([[1.0, 0.0], [2.0, 1.0], [0.0, 1.0], [-1.0, 1.0]])
    fb = torch.tensor([[1.0, 1.0], [1.0, -1.0], [0.5, 2.0], [0.0, -3.0]])
    labels = torch.tensor([0, 0, 1, 1])
    tau = 0.5
    rows = [[v / math.hypot(*r) for v in r] for r in fa.tolist() + fb.tolist()]
    lab = labels.tolist() * 2

    def s(i: int, j: int) -> float:
        return sum(x * y for x, y in zip(rows[i], rows[j])) / tau

    losses = []
    for i in range(8):
        negatives = [math.exp(s(i, k)) for k in range(8) if lab[k] != lab[i]]
        for j in range(8):
            if j != i and lab[j] == lab[i]:
                losses.append(-math.log(math.exp(s(i, j)) / (math.exp(s(i, j)) + sum(negatives))))
    assert len(losses) == 8 * 3
    want = sum(losses) / len(losses)
    assert supervised_nt_xent([fa, fb], labels, tau).item() == pytest.approx(want, rel=1e-5)
    # features are L2-normalised first: scaling one row leaves the loss unchanged
    scaled = fa.clone()
    scaled[1] *= 7
    assert supervised_nt_xent([scaled, fb], labels, tau).item() == pytest.approx(want, rel=1e-5)


def test_ceb_term_reconstructs_features_from_detached_logits(tiny: dict) -> None:
    method, run = _method(tiny, ceb_weight=1.0, lambda_m=0, contrastive_weight=0, lambda_uni=0)
    assert hasattr(method.model, "ceb")
    out = method.training_step(_batch(run), None)
    assert out["ceb"] > 0
    out["loss"].backward()
    assert all(p.grad is not None for p in method.model.ceb.parameters())
    assert not hasattr(_method(tiny)[0].model, "ceb")  # off by default


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_all_regularizers_off_is_identical_to_joint(tiny: dict, optimizer: str) -> None:
    base = dict(tiny, seed=5, optimizer=optimizer)
    joint_run = prepare(build_config(dict(base, method="joint")))
    joint = execute(joint_run)
    off = {"method.lambda_m": 0, "method.contrastive_weight": 0, "method.lambda_uni": 0, "method.init": "scratch"}
    run = prepare(build_config(dict(base, method="mcr", **off)))
    record = execute(run)
    assert_same_run(joint, record)
    state_j, state_m = joint_run.method.model.state_dict(), run.method.model.state_dict()
    assert all(torch.equal(state_j[k], state_m[k]) for k in state_j)
    # any regularizer on changes the run
    on = execute(prepare(build_config(dict(base, method="mcr", **dict(off, **{"method.lambda_m": 0.5})))))
    assert on["history"][-1]["train_loss"] != joint["history"][-1]["train_loss"]


def test_unimodal_initialisation_trains_then_reuses_checkpoints(tiny: dict, tmp_path) -> None:
    cfg = dict(tiny, method="mcr", cache_dir=str(tmp_path))
    first_run = prepare(build_config(cfg))
    first = execute(first_run, cache_dir=str(tmp_path))
    infos = first["method_record"]["unimodal"]
    assert first["method_record"]["init"] == "unimodal"
    assert set(infos) == {"m0", "m1"} and not any(i["reused"] for i in infos.values())
    second = execute(prepare(build_config(cfg)), cache_dir=str(tmp_path))
    again = second["method_record"]["unimodal"]
    assert all(i["reused"] for i in again.values())
    assert {m: i["checkpoint"] for m, i in again.items()} == {m: i["checkpoint"] for m, i in infos.items()}
    assert second["metrics"]["accuracy"] == first["metrics"]["accuracy"]
    # the checkpoint's encoder is what MCR starts from: a unimodal run reuses the same file
    uni = execute(prepare(build_config(dict(tiny, method="unimodal", cache_dir=str(tmp_path)))),
                  cache_dir=str(tmp_path))
    assert uni["method_record"]["unimodal"]["m0"]["reused"] is True


def test_options_are_checked(tiny: dict, monkeypatch) -> None:
    for key, value, word in (("game", "selfish", "game"), ("init", "imagenet", "init"),
                             ("num_permutations", "0", "num_permutations"), ("lambda_m", "-1", "lambda_m")):
        with pytest.raises(UsageError, match=word):
            prepare(build_config(dict(tiny, method="mcr", **{f"method.{key}": value})))
    with pytest.raises(UsageError, match="contrastive_weight"):
        prepare(build_config(dict(tiny, method="mcr", **{"encoder.m1": wide_mlp(monkeypatch)})))


def test_command_line_sets_and_records_the_options(tmp_path, capsys) -> None:
    tiny = ["--set", "dataset.n_train=96", "--set", "dataset.n_val=32", "--set", "dataset.n_test=32",
            "--epochs", "1", "--quiet", "--out", str(tmp_path)]
    assert main(["run", "--method", "mcr", "--set", "method.game=independent", "--set", "method.init=scratch",
                 "--set", "method.num_permutations=4", *tiny]) == 0
    (path,) = tmp_path.glob("mcr-*.json")
    record = json.loads(path.read_text())
    options = record["config"]["method_options"]
    assert options["game"] == "independent" and options["num_permutations"] == 4
    assert options["lambda_m"] == 0.1 and options["lambda_uni"] == 0.01 and options["route_target"] is True
    assert record["method_record"] == {"init": "scratch"}
    assert main(["run", "--method", "mcr", "--set", "method.temperature=0", *tiny]) == 2
    assert "method.temperature" in capsys.readouterr().err


# --- host-device synchronisation -----------------------------------------------------------------



@pytest.mark.parametrize("fusion", ["concat", "film"])
def test_a_training_step_never_waits_for_the_device(tiny: dict, fusion: str) -> None:
    """Permutations are drawn on the features' device and the contrastive loss has no
    data-dependent branch or shape: no host read or device copy in any step."""
    run = prepare(build_config(dict(tiny, method="mcr", fusion=fusion, **{"method.init": "scratch",
                                                                          "method.ceb_weight": 0.5})))
    torch.manual_seed(0)
    run.method.build()
    stage = run.method.stage()
    per_step = guard_steps(stage)
    Trainer(run.cfg, run.data, run.device).fit(stage)
    assert len(per_step) == 2 * 6 and all(calls == [] for calls in per_step), per_step


def test_contrastive_loss_without_negatives_or_positives_is_zero_with_finite_gradient() -> None:
    fa = torch.randn(4, 3, requires_grad=True)
    fb = torch.randn(4, 3, requires_grad=True)
    same = supervised_nt_xent([fa, fb], torch.zeros(4, dtype=torch.long), 0.5)  # no negative pair
    same.backward()
    assert same.item() == 0.0 and torch.isfinite(fa.grad).all() and fa.grad.abs().sum() == 0
    # a single sample per modality: the only positive pair is across modalities, no negatives
    one = supervised_nt_xent([fa[:1], fb[:1]], torch.tensor([2]), 0.5)
    assert one.item() == 0.0
    # M·B rows with distinct labels within a modality: the positives are the cross-modal pairs only
    labels = torch.arange(4)
    value = supervised_nt_xent([fa.detach(), fb.detach()], labels, 0.5).item()
    z = torch.nn.functional.normalize(torch.cat([fa.detach(), fb.detach()]), dim=1)
    sim = z @ z.t() / 0.5
    want = []
    for i in range(8):
        j = (i + 4) % 8
        negatives = torch.logsumexp(torch.stack([sim[i, k] for k in range(8) if k not in (i, j)]), 0)
        want.append((torch.logaddexp(sim[i, j], negatives) - sim[i, j]).item())
    assert value == pytest.approx(sum(want) / 8, rel=1e-5)


@pytest.mark.parametrize("route_target", ["true", "false"])
@pytest.mark.parametrize("fusion", ["concat", "sum"])
@pytest.mark.parametrize("modalities", [2, 3])
@pytest.mark.parametrize("game", ["greedy", "independent", "collaborative"])
def test_scaled_regularizer_equals_the_routed_terms(tiny: dict, game: str, modalities: int, fusion: str,
                                                    route_target: str) -> None:
    """The training path for linear heads (one JS term per permuted modality, gradients scaled
    per readout) has the value and every parameter gradient of the routed terms' regularizer."""
    tiny = dict(tiny, fusion=fusion, **{"dataset.modalities": modalities})
    method, run = _method(tiny, game=game, num_permutations=4, route_target=route_target)
    feats = method.encode(_batch(run))
    state = method._perm_gen.get_state()
    routed = method.game_regularizer(method.js_terms(feats))
    method._perm_gen.set_state(state)
    scaled, jsd = method.scaled_game_regularizer(feats)
    torch.testing.assert_close(scaled, routed, rtol=1e-5, atol=1e-7)
    params = [p for p in method.model.parameters() if p.requires_grad]
    want = torch.autograd.grad(routed, params, retain_graph=True, allow_unused=True)
    got = torch.autograd.grad(scaled, params, retain_graph=True, allow_unused=True)
    for g, w in zip(got, want):
        g = torch.zeros(()) if g is None else g
        w = torch.zeros(()) if w is None else w
        torch.testing.assert_close(g.expand_as(w) if g.dim() == 0 else g, w, rtol=1e-4, atol=1e-7)
    assert set(jsd) == set(method.modalities) and all(v.item() > 0 for v in jsd.values())

"""Router: features, CVaR objective and dual ascent, calibration, thresholds, the risk model, baselines.
No Ray; the model tests train on small synthetic data in a few seconds."""
from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import torch

from r2v.config import RouterConfig
from r2v.envs.base import Observation, Task
from r2v.errors import R2VError
from r2v.eval.metrics import auroc, ece
from r2v.policies.base import Candidate, Decision, StepContext
from r2v.router.baselines import (HINDSIGHT_KEY, ORACLE_KEY, ROUTERS, PreExecutionRouter, fit_gmm2, load_router, make_router,
                                  rows_from_matrix, save_router, TWIN_DIR)
from r2v.router.features import (FEATURE_INDEX, FEATURE_NAMES, FEATURE_VERSION, FeatureTracker, check_feature_rows,
                                 features_by_name)
from r2v.router.model import (LogisticRiskModel, RiskModel, RiskNet, RouterData, batch_size,
                             fit_temperature, nll)
from r2v.router.objective import (cvar, dual_update, multiplier, per_group_residual_failure, router_loss,
                                  tail_count)
from r2v.router.thresholds import (above, bayes_threshold, budget_threshold, calibrate, cvar_threshold, realised_cvar,
                                   realised_rate)


# ----------------------------------------------------------------------------------------- objective
def test_cvar_known_vectors():
    v = torch.tensor([0.0, 0.1, 0.5, 0.9])
    assert cvar(v, 0.5).item() == pytest.approx(0.7)
    assert cvar(v, 1.0).item() == pytest.approx(0.375)
    assert cvar(v, 0.2).item() == pytest.approx(0.9)  # ⌈0.8⌉ = 1
    assert cvar(v, 0.3).item() == pytest.approx(0.7)  # ⌈1.2⌉ = 2
    assert [tail_count(n, 0.2) for n in (1, 5, 6, 10, 11)] == [1, 1, 2, 2, 3]
    assert tail_count(10, 0.3) == 3  # 0.3·10 is not rounded up to 4 by float error


def test_per_group_residual_failure_and_loss_gradient():
    p = torch.tensor([0.9, 0.1, 0.5, 0.5], requires_grad=True)
    y = torch.tensor([1.0, 1.0, 0.0, 1.0])
    g = torch.tensor([7, 7, 3, 3])
    r = per_group_residual_failure(p, y, g)
    assert r.tolist() == pytest.approx([0.25, 0.5])  # group 3: (0 + 0.5)/2; group 7: (0.1 + 0.9)/2
    loss, parts = router_loss(p, y, g, 2.0, alpha=0.5, epsilon=0.1, cost_llm=1.0, cost_slm=0.0, brier_weight=1.0)
    assert parts["cvar"] == pytest.approx(0.5) and parts["violation"] == pytest.approx(0.4)
    assert parts["loss"] == pytest.approx(parts["cost"] + 2.0 * 0.4 + parts["brier"], rel=1e-5)
    loss.backward()
    assert torch.isfinite(p.grad).all()
    assert p.grad[1] < 0  # an un-escalated failure in the worst seed: raising p lowers the loss


def test_dual_ascent_raises_then_lowers_lambda():
    rho = 0.0
    lams = [multiplier(rho)]
    for _ in range(20):
        rho = dual_update(rho, violation=0.2, lr=0.5)
        lams.append(multiplier(rho))
    assert all(b > a for a, b in zip(lams, lams[1:]))  # violated → λ rises
    for _ in range(500):
        rho = dual_update(rho, violation=-0.3, lr=0.5)
        assert multiplier(rho) >= 0
    assert multiplier(rho) < 1e-6  # satisfied → λ decays to (numerically) 0 and stays there
    assert dual_update(rho, -1.0, 0.5) == rho  # projected: held at the floor


def test_weights_count_rows_in_every_term():
    """A row of weight 2 counts as that row twice: in the cost, the per-seed residual failure and Brier."""
    p = torch.tensor([0.9, 0.1, 0.5, 0.2])
    y = torch.tensor([1.0, 1.0, 0.0, 1.0])
    g = torch.tensor([7, 7, 3, 3])
    w = torch.tensor([1.0, 2.0, 1.0, 3.0])
    r = per_group_residual_failure(p, y, g, w)
    assert r.tolist() == pytest.approx([(0 + 3 * 0.8) / 4, (0.1 + 2 * 0.9) / 3])
    rep = torch.tensor([0, 1, 1, 2, 3, 3, 3])  # the same rows, duplicated by their weights
    kw = dict(alpha=0.5, epsilon=0.1, cost_llm=1.0, cost_slm=0.05, brier_weight=1.0)
    _, weighted = router_loss(p, y, g, 2.0, weight=w, **kw)
    _, duplicated = router_loss(p[rep], y[rep], g[rep], 2.0, **kw)
    assert weighted == pytest.approx(duplicated)
    _, plain = router_loss(p, y, g, 2.0, **kw)
    assert plain["cvar"] != pytest.approx(weighted["cvar"])


# ----------------------------------------------------------------------------------------- thresholds
def test_bayes_threshold():
    assert bayes_threshold(1.0, 0.05, 2.0) == pytest.approx(0.475)
    assert bayes_threshold(1.0, 0.0, 0.5) == 1.0
    assert bayes_threshold(0.0, 1.0, 1.0) == 0.0
    with pytest.raises(R2VError, match="kappa"):
        bayes_threshold(1.0, 0.0, 0.0)


def test_budget_threshold_hits_budget_and_reports_held_out_rate():
    rng = np.random.default_rng(0)
    p_val, p_test = rng.random(5000), rng.random(5000)
    for budget in (0.0, 0.05, 0.2, 0.333, 0.7, 1.0):
        tau, rate = calibrate(p_val, budget)
        assert rate <= budget + 1e-12
        assert rate >= budget - 1.0 / len(p_val) - 1e-12  # within one step
        assert abs(realised_rate(p_test, tau) - budget) < 0.04  # held out: close, not exact
    assert budget_threshold(p_val, 0.0) > p_val.max()
    assert budget_threshold(p_val, 1.0) == 0.0


def test_budget_threshold_ties():
    p = np.array([0.9, 0.9, 0.9, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1])
    tau = budget_threshold(p, 0.2)  # the three tied 0.9s would exceed 20%: escalate none
    assert realised_rate(p, tau) == 0.0
    assert realised_rate(p, budget_threshold(p, 0.3)) == pytest.approx(0.3)
    assert realised_rate(p, budget_threshold(p, 0.95)) == pytest.approx(0.3)
    with pytest.raises(R2VError, match="empty"):
        budget_threshold([], 0.2)


def test_cvar_threshold_is_largest_feasible():
    rng = np.random.default_rng(1)
    n = 800
    g = rng.integers(0, 8, n)
    y = (rng.random(n) < 0.3 + 0.05 * g).astype(float)
    p = np.clip(0.5 * y + 0.5 * rng.random(n), 0, 1)
    for eps in (0.0, 0.05, 0.2, 1.0):
        tau = cvar_threshold(p, y, g, 0.25, eps)
        assert realised_cvar(p, y, g, tau, 0.25) <= eps + 1e-12
        higher = np.unique(p)[np.unique(p) > tau]
        if higher.size:  # the next larger distinct τ violates the bound
            assert realised_cvar(p, y, g, higher[0], 0.25) > eps
    assert cvar_threshold(p, y, g, 0.25, 1.0) > p.max()  # loose bound: never escalate


# ----------------------------------------------------------------------------------------- calibration
def test_temperature_scaling_lowers_nll_of_overconfident_logits():
    rng = np.random.default_rng(0)
    true_logit = rng.normal(0, 1.5, 4000)
    y = (rng.random(4000) < 1 / (1 + np.exp(-true_logit))).astype(float)
    over = 4.0 * true_logit  # deliberately over-confident
    t = fit_temperature(over, y)
    assert 3.0 < t < 5.5
    assert nll(over, y, t) < nll(over, y) - 0.1
    assert 0.05 <= fit_temperature(over, np.ones_like(y)) <= 20


# ----------------------------------------------------------------------------------------- features
def _ctx(step=0, history=(), obs="You are in a kitchen.", truncated=False, last_info=None):
    return StepContext(task=Task("t1", "textworld", goal="find the key"),
                       observation=Observation(goal="find the key", text=obs, truncated=truncated),
                       history=list(history), step=step, max_steps=10, last_info=last_info or {})


def _decision(action="go north", lps=(-1.0, -3.0, -4.0), vs=(0.9, 0.2, None), entropy=0.7):
    texts = [action, "go south", "take key"]
    cands = [Candidate(t, lp, lp / 2, v) for t, lp, v in zip(texts, lps, vs)]
    return Decision(action=action, actor="slm", candidates=cands, entropy=entropy)


ERR = "Error: the tool call failed (connection reset by peer). The command was not run."


def test_feature_tracker_values_and_dynamics():
    tr = FeatureTracker()
    f0 = features_by_name(tr.features(_ctx(), _decision()))
    assert len(f0) == len(FEATURE_NAMES) and all(math.isfinite(v) for v in f0.values())
    assert f0["logprob_margin"] == pytest.approx(2.0)
    assert f0["verifier_best"] == pytest.approx(0.9) and f0["verifier_worst"] == pytest.approx(0.2)
    assert f0["verifier_mean"] == pytest.approx((0.9 + 0.2 + 0.5) / 3)  # None counts as 0.5
    assert f0["verifier_spread"] == pytest.approx(0.7)
    assert f0["candidate_agreement"] == pytest.approx(1 / 3)
    assert f0["verifier_policy_agree"] == 1.0
    assert f0["repeated_action_count"] == 0 and f0["recent_tool_error"] == 0 and f0["verifier_trend"] == 0
    tr.update("go north", {"tool_failed": False})  # what the env's info says is never read

    hist = [("go north", ERR)]
    ctx1 = _ctx(step=1, history=hist, obs=ERR, truncated=True)
    f1 = features_by_name(tr.features(ctx1, _decision(vs=(0.5, 0.2, 0.1))))
    assert f1["repeated_action_count"] == 1
    assert f1["recent_tool_error"] == 1 and f1["observation_truncated"] == 1  # the error is in the text
    assert f1["verifier_trend"] == pytest.approx(0.5 - 0.9)
    assert f1["horizon_frac"] == pytest.approx(0.1)
    assert f1["context_chars_log1p"] > f0["context_chars_log1p"]
    tr.update("go north", {"tool_failed": True})

    hist.append(("go north", "A hall."))
    f2 = features_by_name(tr.features(_ctx(step=2, history=hist, obs="A hall."), _decision()))
    assert f2["repeated_action_count"] == 2
    assert f2["recent_tool_error"] == 1  # the error two steps back still counts
    assert f2["verifier_trend"] == pytest.approx(0.9 - (0.9 + 0.5) / 2)
    assert f2["observation_repeated"] == 0
    tr.update("open door", {"tool_failed": True})
    hist.append(("open door", "A hall."))  # a different action, the same text: what a stale output looks like
    f3 = features_by_name(tr.features(_ctx(step=3, history=hist, obs="A hall."), _decision()))
    assert f3["recent_tool_error"] == 0  # three steps back: forgotten
    assert f3["observation_repeated"] == 1
    hist.append(("open door", "A hall."))  # the same action again: the same text is expected
    f4 = features_by_name(tr.features(_ctx(step=4, history=hist, obs="A hall."), _decision()))
    assert f4["observation_repeated"] == 0


def test_features_ignore_the_envs_hidden_info():
    """Same texts and actions, contradicting bookkeeping (tool_failed, exit code, perturbations): same features."""
    def run(info):
        tr, hist, out = FeatureTracker(), [], []
        for step, (action, text) in enumerate([("look", "You are in a kitchen."), ("go north", "A hall."),
                                               ("open door", "A hall."), ("go east", ERR)]):
            out.append(tr.features(_ctx(step=step, history=list(hist), obs=hist[-1][1] if hist else "Start.",
                                        last_info=dict(info)), _decision(action)))
            tr.update(action, dict(info))
            hist.append((action, text))
        return out

    shown = run({})
    assert shown == run({"tool_failed": True, "exit_code": 1, "timed_out": True, "perturbations": ["x/y"]})
    assert shown == run({"tool_failed": False, "exit_code": 0, "perturbations": []})


def test_decision_features_describe_the_proposal():
    texts, lps, vs = ["go north", "take key", "go south"], [-1.0, -2.0, -4.0], [0.4, 0.9, 0.2]
    cands = [Candidate(t, lp, lp, v) for t, lp, v in zip(texts, lps, vs)]
    z = sum(math.exp(x) for x in lps)
    # the SLM's most likely action is proposed, the verifier prefers another
    f = features_by_name(FeatureTracker().features(_ctx(), Decision("go north", "slm", list(cands))))
    assert f["verifier_proposal"] == pytest.approx(0.4) and f["verifier_proposal_gap"] == pytest.approx(0.5)
    assert f["proposal_prob"] == pytest.approx(math.exp(-1.0) / z)
    assert f["proposal_logprob_margin"] == pytest.approx(1.0)
    # the verifier's pick is proposed (policy.select=verifier): no gap, and the SLM preferred another action
    f = features_by_name(FeatureTracker().features(_ctx(), Decision("take key", "slm", [cands[1], cands[0], cands[2]])))
    assert f["verifier_proposal"] == pytest.approx(0.9) and f["verifier_proposal_gap"] == 0.0
    assert f["proposal_prob"] == pytest.approx(math.exp(-2.0) / z)
    assert f["proposal_logprob_margin"] == pytest.approx(-1.0)
    # sampled duplicates of the proposal add up; its rivals are the other texts only
    dup = [Candidate("go north", -1.0, -1.0, 0.4), Candidate("Go  North", -1.5, -1.5, 0.4), cands[1]]
    f = features_by_name(FeatureTracker().features(_ctx(), Decision("go north", "slm", dup)))
    assert f["proposal_prob"] == pytest.approx((math.exp(-1.0) + math.exp(-1.5)) / (math.exp(-1.0) + math.exp(-1.5)
                                                                                      + math.exp(-2.0)))
    assert f["proposal_logprob_margin"] == pytest.approx(1.0)


def test_features_single_candidate_and_missing_entropy():
    d = Decision(action="look", actor="slm", candidates=[Candidate("look", float("-inf"), -2.0, None)], entropy=None)
    f = features_by_name(FeatureTracker().features(_ctx(), d))
    assert f["logprob_margin"] == 0.0 and f["entropy"] == 0.0 and f["top_prob"] == 1.0
    assert all(math.isfinite(v) for v in f.values())
    with pytest.raises(R2VError, match="collect-router"):
        features_by_name([0.0] * 24)  # a row of r2v-features@1


def test_old_router_rows_are_refused_with_the_fix():
    pd = pytest.importorskip("pandas")
    ok = pd.DataFrame({"features": [[0.0] * len(FEATURE_NAMES)], "feature_spec": [FEATURE_VERSION]})
    check_feature_rows(ok)
    for features, spec in (([0.0] * 24, "r2v-features@1"), ([0.0] * 24, FEATURE_VERSION)):
        with pytest.raises(R2VError, match="collect-router"):
            check_feature_rows(pd.DataFrame({"features": [features], "feature_spec": [spec]}))


# ----------------------------------------------------------------------------------------- risk model
def _synthetic(n, seed):
    """Failure depends on two features only: a small log-prob margin and a recent tool failure."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, len(FEATURE_NAMES))).astype(np.float32)
    g = rng.integers(0, 8, n)
    margin = rng.exponential(1.0, n)
    tool = (rng.random(n) < 0.1 + 0.04 * g).astype(np.float32)
    X[:, FEATURE_INDEX["logprob_margin"]] = margin
    X[:, FEATURE_INDEX["recent_tool_error"]] = tool
    y = (rng.random(n) < 1 / (1 + np.exp(3.0 * margin - 2.5 * tool - 0.5))).astype(np.float32)
    return RouterData(X, y, g, np.arange(n) // 10, np.arange(n) % 10)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    cfg = RouterConfig(epochs=30, device="cpu")
    train, val, test = _synthetic(3000, 0), _synthetic(1500, 1), _synthetic(2000, 2)
    model = RiskModel(cfg=cfg)
    history = model.fit(train, val, cfg, seed=0)
    return model, history, test, tmp_path_factory.mktemp("router")


def test_risk_model_learns_and_is_calibrated(trained):
    model, history, test, _ = trained
    p = model.predict(test.X)
    assert auroc(p, test.y) > 0.8
    assert ece(p, test.y) < 0.1
    final = history[-1]
    assert final["val_nll_after_ts"] <= final["val_nll_before_ts"] + 1e-9
    assert 0.05 <= model.temperature <= 20
    assert final["threshold_val_rate"] <= RouterConfig().budget + 1e-9


def test_risk_model_platt_calibration_removes_cost_shift():
    cfg = RouterConfig(epochs=15, device="cpu", calibration="platt")
    model = RiskModel(cfg=cfg)
    model.fit(_synthetic(2000, 3), _synthetic(1500, 4), cfg, seed=0)
    test = _synthetic(2000, 5)
    p = model.predict(test.X)
    assert abs(p.mean() - test.y.mean()) < 0.05 and ece(p, test.y) < 0.08


def test_risk_model_deterministic_and_save_load(trained):
    model, _, test, d = trained
    model.save(d)
    meta = json.loads((d / "router.json").read_text())
    assert meta["feature_spec"] == FEATURE_VERSION and meta["config"]["alpha"] == 0.2
    loaded = RiskModel.load(d, device="cpu")
    np.testing.assert_array_equal(loaded.predict(test.X), model.predict(test.X))
    assert loaded.threshold == model.threshold and loaded.temperature == model.temperature

    cfg = RouterConfig(epochs=2, device="cpu")
    a, b = RiskModel(cfg=cfg), RiskModel(cfg=cfg)
    a.fit(_synthetic(300, 0), _synthetic(200, 1), cfg, seed=3)
    b.fit(_synthetic(300, 0), _synthetic(200, 1), cfg, seed=3)
    np.testing.assert_array_equal(a.predict(test.X), b.predict(test.X))


def test_feature_spec_mismatch_raises(trained, tmp_path):
    model, _, _, d = trained
    model.save(tmp_path)
    meta = json.loads((tmp_path / "router.json").read_text())
    meta["feature_spec"] = "r2v-features@0"
    (tmp_path / "router.json").write_text(json.dumps(meta))
    with pytest.raises(R2VError, match=r"r2v-features@0.*" + re.escape(FEATURE_VERSION)):
        RiskModel.load(tmp_path)
    with pytest.raises(R2VError, match="not a router checkpoint"):
        RiskModel.load(tmp_path / "missing")
    with pytest.raises(R2VError, match="expects rows of"):
        model.predict(np.zeros((2, 3)))


def test_router_data_validation():
    with pytest.raises(R2VError, match="0/1"):
        RouterData(np.zeros((2, 3)), [0, 2], [0, 0], ["a", "b"])
    with pytest.raises(R2VError, match="entries"):
        RouterData(np.zeros((2, 3)), [0, 1, 1], [0, 0], ["a", "b"])
    pd = pytest.importorskip("pandas")
    df = pd.DataFrame({"features": [[0.0] * 3, [1.0] * 3], "feature_spec": ["r2v-features@0"] * 2,
                       "episode_failed": [True, False], "branch_label": [None, True], "perturbation_seed": [0, 1],
                       "episode_id": ["e1", "e2"], "step": [0, 0]})
    with pytest.raises(R2VError, match="feature spec"):
        RouterData.from_frame(df, "episode")
    df["feature_spec"] = FEATURE_VERSION
    assert len(RouterData.from_frame(df, "episode")) == 2
    assert len(RouterData.from_frame(df, "branch")) == 1  # only branched rows carry a branch label


def test_batches_sized_to_the_data():
    assert batch_size(242, 256) == 31 and math.ceil(242 / batch_size(242, 256)) == 8  # was 1 step per epoch
    assert batch_size(3000, 256) == 256  # router.batch_size caps it
    assert batch_size(60, 256) == 16 and batch_size(10, 256) == 10 and batch_size(242, 8) == 8


def _history_run(epsilon, epochs=6):
    cfg = RouterConfig(epochs=epochs, device="cpu", epsilon=epsilon, dual_lr=0.5, hidden_sizes=[16])
    model = RiskModel(cfg=cfg)
    return model, model.fit(_synthetic(242, 0), _synthetic(200, 1), cfg, seed=0)


def test_fit_takes_many_steps_and_records_the_dual():
    model, history = _history_run(epsilon=0.0)  # CVaR ≤ 0 cannot hold while any failure is left: it binds
    epochs, summary = history[:-1], history[-1]
    assert summary["batch_size"] == 31 and summary["optimiser_steps"] == 6 * 8 == epochs[-1]["steps"]
    for h in epochs:
        assert {"lambda_end", "train_lambda", "fit_cvar", "cal_cvar", "violation", "train_brier", "val_brier",
                "train_loss"} <= set(h)
    lams = [h["lambda_end"] for h in epochs]
    assert all(b > a for a, b in zip(lams, lams[1:])) and lams[0] > multiplier(0.0)  # violated: λ rises
    assert summary["epochs_constraint_violated"] == 6
    assert epochs[0]["fit_cvar"] <= summary["fit_cvar_unrouted"] + 1e-9  # routing only removes failure
    assert epochs[0]["cal_cvar"] <= summary["cal_cvar_unrouted"] + 1e-9
    loose_model, loose = _history_run(epsilon=1.0)  # never violated: λ decays, the constraint does nothing
    assert loose[-1]["epochs_constraint_violated"] == 0
    assert all(b < a for a, b in zip([h["lambda_end"] for h in loose[:-1]], [h["lambda_end"] for h in loose[1:-1]]))
    assert epochs[-1]["cal_cvar"] < loose[-2]["cal_cvar"]  # the binding constraint escalates more failures


def test_logistic_baseline_router(tmp_path):
    cfg = RouterConfig(epochs=30, device="cpu")
    model = LogisticRiskModel(cfg=cfg)
    assert model.architecture == "logistic" and RiskModel(cfg=cfg).architecture == "mlp-128x64"
    assert [type(m) for m in model.net.modules()] == [RiskNet, torch.nn.Sequential, torch.nn.Linear]
    history = model.fit(_synthetic(1500, 0), _synthetic(1000, 1), cfg, seed=0)
    test = _synthetic(2000, 2)
    assert auroc(model.predict(test.X), test.y) > 0.8 and history[-1]["architecture"] == "logistic"
    model.save(tmp_path)
    loaded = RiskModel.load(tmp_path, device="cpu")
    assert loaded.architecture == "logistic"
    np.testing.assert_array_equal(loaded.predict(test.X), model.predict(test.X))


def test_router_reads_only_its_chosen_features(tmp_path):
    """`router.features`: the network sees the named columns of the full spec vector, keeps that choice in its
    checkpoint, and is blind to every other column; an unknown name fails naming the key."""
    cfg = RouterConfig(epochs=20, device="cpu", hidden_sizes=[], features=["logprob_margin", "recent_tool_error"])
    model = RiskModel(cfg=cfg)
    model.fit(_synthetic(1500, 0), _synthetic(1000, 1), cfg, seed=0)
    test = _synthetic(2000, 2)
    assert auroc(model.predict(test.X), test.y) > 0.8  # the two columns the failures depend on
    assert model.architecture == "logistic on logprob_margin, recent_tool_error"
    noise = test.X.copy()
    others = [i for i, f in enumerate(FEATURE_NAMES) if f not in cfg.features]
    noise[:, others] = np.random.default_rng(0).normal(size=(len(noise), len(others)))
    np.testing.assert_array_equal(model.predict(noise), model.predict(test.X))
    model.save(tmp_path)
    loaded = RiskModel.load(tmp_path, device="cpu")
    assert loaded.inputs == ("logprob_margin", "recent_tool_error")
    np.testing.assert_array_equal(loaded.predict(test.X), model.predict(test.X))
    with pytest.raises(R2VError, match=r"router\.features.*unknown \['margin'\]"):
        RiskModel(cfg=RouterConfig(features=["margin"]))


def test_router_data_labels_and_weights():
    from r2v.config import LABELS
    from r2v.router.model import LABEL_COLUMNS

    assert set(LABEL_COLUMNS) == set(LABELS)  # every label router.label accepts has a column, and no other
    pd = pytest.importorskip("pandas")
    df = pd.DataFrame({"features": [[0.0] * 3, [1.0] * 3, [2.0] * 3], "episode_failed": [True, True, False],
                       "branch_label": [None, True, False], "step_label": [True, None, False],
                       "label_weight": [None, 4.0, 2.5], "perturbation_seed": [0, 1, 1],
                       "episode_id": ["e1", "e2", "e3"], "step": [0, 0, 1]})
    step = RouterData.from_frame(df, "step")
    assert step.y.tolist() == [1.0, 0.0] and step.weight.tolist() == [1.0, 1.0]  # null step labels dropped
    branch = RouterData.from_frame(df, "branch")
    assert branch.y.tolist() == [1.0, 0.0] and branch.weight.tolist() == [4.0, 2.5]
    assert branch.subset(np.array([False, True])).weight.tolist() == [2.5]
    assert RouterData.from_frame(df, "episode").weight.tolist() == [1.0] * 3  # every step: unweighted
    assert RouterData.from_frame(df.drop(columns="label_weight"), "branch").weight.tolist() == [1.0, 1.0]
    with pytest.raises(R2VError, match="label_weight"):
        RouterData.from_frame(df.assign(label_weight=[None, None, 2.5]), "branch")
    with pytest.raises(R2VError, match="step_label"):
        RouterData.from_frame(df.drop(columns="step_label"), "step")
    with pytest.raises(R2VError, match="not one of"):
        RouterData.from_frame(df, "episodes")
    with pytest.raises(R2VError, match="weights"):
        RouterData(np.zeros((2, 3)), [0, 1], [0, 0], ["a", "b"], weight=[1.0, -1.0])


def test_log_history_logs_one_series_per_metric():
    from types import SimpleNamespace

    from r2v.tracking import Tracker

    calls = []
    tracker = Tracker.__new__(Tracker)  # no MLflow store: record what would be logged
    tracker.enabled, tracker._mlflow = True, SimpleNamespace(log_metrics=lambda m, step=None: calls.append((step, m)))
    tracker.log_history([{"epoch": 0, "lambda_end": 0.7, "violation": 0.1},
                         {"epoch": 1, "lambda_end": 0.9, "violation": -0.2}, {"best_epoch": 1}])
    assert calls == [(0, {"router/lambda_end": 0.7, "router/violation": 0.1}),
                     (1, {"router/lambda_end": 0.9, "router/violation": -0.2})]


# ----------------------------------------------------------------------------------------- baselines
def _feat(**kw):
    f = dict.fromkeys(FEATURE_NAMES, 0.0)
    f.update(verifier_best=0.9, verifier_mean=0.8, entropy=0.5)
    f.update(kw)
    return f


def test_registry_and_fixed_routers():
    assert set(ROUTERS) == {"r2v", "slm_only", "llm_only", "random", "entropy", "heuristic", "verifier",
                            "verifier_action", "pre_execution", "steer", "oracle_teacher", "hindsight"}
    with pytest.raises(R2VError, match="unknown router"):
        make_router("nope")
    with pytest.raises(R2VError, match="bad arguments"):
        make_router("entropy", threshhold=1.0)
    assert not make_router("slm_only").escalate(_feat(entropy=9.0))
    assert make_router("llm_only").escalate(_feat())
    oracle = make_router("oracle_teacher")
    assert oracle.needs_oracle_action and not make_router("entropy").needs_oracle_action
    assert oracle.escalate(_feat(**{ORACLE_KEY: 1.0})) and not oracle.escalate(_feat(**{ORACLE_KEY: 0.0}))
    with pytest.raises(R2VError, match=ORACLE_KEY):
        oracle.escalate(_feat())
    assert oracle.calibrate([_feat(**{ORACLE_KEY: 1.0}), _feat(**{ORACLE_KEY: 0.0})], 0.1) == (1.0, 0.5)
    hindsight = make_router("hindsight")
    assert hindsight.fixed and hindsight.needs_lookahead and not oracle.needs_lookahead
    assert hindsight.escalate(_feat(**{HINDSIGHT_KEY: 1.0})) and not hindsight.escalate(_feat(**{HINDSIGHT_KEY: 0.0}))
    with pytest.raises(R2VError, match="logged router rows cannot score it"):
        hindsight.risks([_feat()])


def test_rule_routers():
    ent = make_router("entropy", threshold=1.0)
    assert ent.escalate(_feat(entropy=1.2)) and not ent.escalate(_feat(entropy=1.0))
    heu = make_router("heuristic")
    assert heu.escalate(_feat(entropy=2.6)) and heu.escalate(_feat(verifier_mean=0.3))
    assert not heu.escalate(_feat(entropy=2.5, verifier_mean=0.4))
    ver = make_router("verifier")
    assert ver.escalate(_feat(verifier_best=0.49)) and not ver.escalate(_feat(verifier_best=0.5))
    # a bad proposal beside a good candidate: only the router that reads the proposal's own score escalates
    bad_pick = _feat(verifier_best=0.9, verifier_proposal=0.2)
    act = make_router("verifier_action")
    assert act.escalate(bad_pick) and not ver.escalate(bad_pick)
    assert not act.escalate(_feat(verifier_proposal=0.5)) and act.escalate(_feat(verifier_proposal=0.49))


def test_random_router_matches_budget_and_is_seeded():
    a, b = make_router("random", budget=0.25, seed=1), make_router("random", budget=0.25, seed=1)
    da = [a.escalate(_feat()) for _ in range(4000)]
    assert da == [b.escalate(_feat()) for _ in range(4000)]
    assert abs(np.mean(da) - 0.25) < 0.03
    assert not any(make_router("random", budget=0.0).escalate(_feat()) for _ in range(200))


def test_thresholded_baselines_calibrate_to_budget():
    rng = np.random.default_rng(0)
    val = [_feat(entropy=float(h), verifier_best=float(v), verifier_mean=float(v), verifier_proposal=float(v))
           for h, v in zip(rng.exponential(1.0, 500), rng.random(500))]
    test = [_feat(entropy=float(h), verifier_best=float(v), verifier_mean=float(v), verifier_proposal=float(v))
            for h, v in zip(rng.exponential(1.0, 500), rng.random(500))]
    for name in ("entropy", "heuristic", "verifier", "verifier_action"):
        r = make_router(name)
        tau, rate = r.calibrate(val, 0.2)
        assert 0.2 - 1 / 500 <= rate <= 0.2
        assert abs(np.mean([r.escalate(f) for f in test]) - 0.2) < 0.06


def test_r2v_router_wraps_model(trained):
    model, _, test, d = trained
    model.save(d)
    r = make_router("r2v", model_dir=str(d), device="cpu")
    rows = rows_from_matrix(test.X[:50])
    np.testing.assert_allclose([r.risk(f) for f in rows], model.predict(test.X[:50]), rtol=1e-6)
    assert r.threshold == model.threshold
    tau, rate = r.calibrate(rows, 0.1)
    assert rate <= 0.1 and r.escalate(rows[int(np.argmax(r.risks(rows)))])
    with pytest.raises(R2VError, match="trained model"):
        make_router("r2v")


def test_cross_fitted_twin_routes_only_the_games_the_router_fitted_on(trained, tmp_path):
    from r2v.rollout.live_budget import TwinScale, assign_games, routed_folds

    model, _, test, _ = trained
    cfg = RouterConfig(epochs=2, device="cpu")
    twin = RiskModel(cfg=cfg)
    twin.fit(_synthetic(300, 7), _synthetic(200, 8), cfg, seed=0)
    model.save(tmp_path)
    r = make_router("r2v", model_dir=str(tmp_path), device="cpu")
    assert r.twin is None and assign_games(r, ["c1", "c2"], ["f1"]) == [(r, ["c1", "c2"])]  # learned: never in-sample
    twin.save(tmp_path / TWIN_DIR)
    r = make_router("r2v", model_dir=str(tmp_path), device="cpu")
    np.testing.assert_allclose(r.twin.risks(rows_from_matrix(test.X[:20])), twin.predict(test.X[:20]), rtol=1e-6)
    assert r.twin.threshold == twin.threshold  # its own τ: the same quantile as the main model's (TwinScale)
    assert assign_games(r, ["c1", "c2"], ["f1"]) == [(r, ["c1", "c2"]), (r.twin, ["f1"])]
    rows = rows_from_matrix(test.X)  # held-out steps: each model's scale, matched by quantile
    scale = TwinScale(r.risks(rows), r.twin.risks(rows))
    tau = float(np.quantile(r.risks(rows), 0.7))
    (main, main_games, main_is_twin), (tw, tw_games, tw_is_twin) = routed_folds(
        r, tau, assign_games(r, ["c1", "c2"], ["f1"]), scale)
    assert (main_games, main_is_twin, tw_games, tw_is_twin) == (["c1", "c2"], False, ["f1"], True)
    assert main.threshold == tau and tw.threshold == scale.to_twin(tau) != tau
    assert np.mean([tw.escalate(f) for f in rows]) == pytest.approx(np.mean([main.escalate(f) for f in rows]), abs=0.02)
    assert r.threshold == model.threshold and r.twin.threshold == twin.threshold  # copies: the originals keep theirs
    rnd = make_router("random")
    assert assign_games(rnd, ["c1"], ["f1"]) == [(rnd, ["c1", "f1"])]  # learned nothing: plays every val game


def test_twin_scale_routes_the_twin_at_the_same_escalation_share():
    """Two models calibrated on different games rank steps alike but disagree on the level: one τ escalated
    half as many of the twin's held-out steps in the quickstart. Matched by quantile, the shares agree."""
    from r2v.rollout.live_budget import TwinScale
    from r2v.router.thresholds import quantile_map

    rng = np.random.default_rng(0)
    sigmoid = lambda z: 1 / (1 + np.exp(-z))  # noqa: E731
    main, twin = sigmoid(rng.normal(0, 1.5, 800)), sigmoid(rng.normal(0, 1.5, 600) / 2 - 1)
    scale = TwinScale(main, twin)
    fresh = rng.normal(0, 1.5, 4000)  # unseen steps, scored by both models
    for tau in (0.2, 0.35, 0.5, 0.7, 0.85):
        assert np.mean(twin >= tau) < np.mean(main >= tau) - 0.1  # one τ: very different shares
        tau_twin = scale.to_twin(tau)
        assert np.mean(sigmoid(fresh / 2 - 1) >= tau_twin) == pytest.approx(np.mean(sigmoid(fresh) >= tau), abs=0.04)
        assert scale.to_main(np.array([tau_twin]))[0] == pytest.approx(tau, abs=1e-6)  # the inverse map
    taus = np.linspace(-1, 2, 61)
    assert np.all(np.diff(quantile_map(taus, main, twin)) > 0)  # monotone, so the bracketed search still holds
    assert scale.to_twin(above(main.max())) > twin.max()  # "escalate nothing" stays nothing
    assert scale.to_twin(0.0) <= twin.min() and scale.to_twin(np.inf) == np.inf  # ... and "everything" everything


def test_budget_pacer_holds_the_rate_where_a_fixed_threshold_drifts():
    """A τ set on calibration games meets riskier (or safer) ones in deployment; the pacer retunes τ until the
    running rate is the budget, and leaves it near where it was on a stream like the calibration one."""
    from r2v.router.thresholds import BudgetPacer

    rng = np.random.default_rng(0)
    tau = budget_threshold(rng.beta(2, 5, 5000), 0.3)
    for live, drift in ((rng.beta(2, 3, 20000), +1), (rng.beta(2, 9, 20000), -1), (rng.beta(2, 5, 20000), 0)):
        fixed = float(np.mean(live >= tau))
        pacer = BudgetPacer(tau, 0.3, every=200, memory=5000)
        escalated = []
        for p in live:
            escalated.append(bool(p >= pacer.tau))
            pacer.observe(p, escalated[-1])
        assert abs(np.mean(escalated[2000:]) - 0.3) < 0.02 and abs(np.mean(escalated) - 0.3) < 0.02
        assert pacer.steps == len(live) and pacer.rate == pytest.approx(np.mean(escalated))
        if drift:
            assert drift * (fixed - 0.3) > 0.1  # the fixed τ misses the budget by more than 0.1
            assert drift * (pacer.tau - tau) > 0.05  # riskier stream: τ rose; safer: it fell
        else:
            assert abs(pacer.tau - tau) < 0.05
    with pytest.raises(R2VError, match="pace_budget"):
        BudgetPacer(tau, 1.5)
    with pytest.raises(R2VError, match="finite threshold"):
        BudgetPacer(math.inf, 0.3)


def test_budget_pacer_makes_up_what_earlier_steps_underspent():
    """`retune(n)` aims the running rate, not the next steps' alone, at the budget, or spreads the shortfall over
    `catch_up` steps; steps without a risk count as steps; until a retune (or with no risk seen) τ stays where it
    is."""
    from r2v.router.thresholds import BudgetPacer

    risks = np.linspace(0.0, 1.0, 101)[:100]  # 100 distinct risks: a τ can escalate any whole share
    pacer = BudgetPacer(0.9, 0.3)
    for p in risks:
        pacer.observe(p, p >= 0.9)  # 10 of 100 escalated: 20 calls short of 0.3
    assert pacer.tau == 0.9 and pacer.rate == pytest.approx(0.1)
    tau = pacer.retune(100)  # the next 100 steps need 40 calls for 60 of 200
    assert np.mean(risks >= tau) == pytest.approx(0.5)
    spread = BudgetPacer(0.9, 0.3)
    for p in risks:
        spread.observe(p, p >= 0.9)
    tau = spread.retune(100, catch_up=800)  # the 20 calls made up over 800 steps: 0.3 + 20/800 of the next 100
    assert 0.31 <= np.mean(risks >= tau) <= 0.325
    assert spread.retune(100, catch_up=10) == pacer.tau  # never over fewer steps than the next ones
    assert BudgetPacer(0.9, 0.3).retune(100) == 0.9  # nothing seen yet: τ stays
    nan_first = BudgetPacer(0.9, 0.3, every=2)
    nan_first.observe(float("nan"), True)
    assert nan_first.observe(float("nan"), False) == 0.9 and nan_first.steps == 2


def test_served_router_paces_to_serve_pace_budget(tmp_path):
    """The Serve router deployment's own decide() and observe() (the ingress reports each step's outcome): with
    serve.pace_budget its τ follows the stream's LLM calls, also when only every other ask becomes a call (grace
    deferring, a spent session budget refusing); a router without a threshold cannot be paced (caught when the
    app is built)."""
    from r2v.config import load_config
    from r2v.errors import ConfigError
    from r2v.serve.app import RouterDeployment
    from r2v.serve.components import serving_pacer

    rng = np.random.default_rng(1)
    cfg = load_config("conf/quickstart.yaml", ["serve.router=entropy", "serve.threshold=0.5",
                                               "serve.pace_budget=0.25"])
    entropies = rng.exponential(1.0, 6000)
    assert np.mean(entropies > 0.5) > 0.55  # the fixed τ's rate on this stream
    infos = []
    for every_other in (False, True):
        dep = RouterDeployment.func_or_class(cfg, str(tmp_path))
        asks, calls = [], []
        for h in entropies:
            verdict = dep.decide(_feat(entropy=float(h)))
            call = verdict.escalate and not (every_other and sum(asks) % 2)  # every other ask is deferred
            dep.observe(verdict.risk, call)
            asks.append(verdict.escalate)
            calls.append(call)
        assert abs(np.mean(calls[2000:]) - 0.25) < 0.03
        if every_other:  # it asks for twice the budget so that the calls, not the asks, come to it
            assert abs(np.mean(asks[2000:]) - 0.5) < 0.06
        infos.append(dep.info())
    assert all(i["pace_budget"] == 0.25 and i["paced_steps"] == 6000 for i in infos)
    assert infos[0]["threshold"] > 1.0 and infos[1]["threshold"] < infos[0]["threshold"]
    assert RouterDeployment.func_or_class(load_config("conf/quickstart.yaml", ["serve.router=entropy"]),
                                          str(tmp_path)).pacer is None  # off by default
    with pytest.raises(ConfigError, match="no threshold to move"):
        serving_pacer(load_config("conf/quickstart.yaml", ["serve.pace_budget=0.2"]), make_router("llm_only"))
    with pytest.raises(ConfigError, match="pace_budget"):
        load_config("conf/quickstart.yaml", ["serve.pace_budget=2"])


def test_pre_execution_router_escalates_whole_episodes():
    rng = np.random.default_rng(0)
    n_ep, steps = 300, 5
    X = rng.normal(size=(n_ep * steps, len(FEATURE_NAMES))).astype(np.float32)
    hard = rng.random(n_ep) < 0.4
    first = np.arange(n_ep) * steps
    X[first, FEATURE_INDEX["goal_chars_log1p"]] = np.where(hard, 5.0, 3.0) + rng.normal(0, 0.3, n_ep)
    X[:, FEATURE_INDEX["step"]] = np.tile(np.arange(steps), n_ep)
    ep = np.repeat(np.arange(n_ep), steps)
    data = RouterData(X, np.repeat(hard, steps), np.zeros(n_ep * steps), ep, np.tile(np.arange(steps), n_ep))
    r = PreExecutionRouter().fit(data)
    assert auroc(r.predict(X[first]), hard) > 0.95
    rows = rows_from_matrix(X)
    # one episode: the decision at step 0 holds for every later step
    r.reset()
    decisions = [r.escalate(rows[i]) for i in range(steps)]
    assert len(set(decisions)) == 1
    scores = r.risks(rows, ep)
    assert np.all(scores.reshape(n_ep, steps) == scores.reshape(n_ep, steps)[:, :1])
    tau, rate = r.calibrate(rows, 0.3, ep)
    assert rate <= 0.3 and rate * n_ep == pytest.approx(round(rate * n_ep))  # whole episodes only
    clone = make_router("pre_execution", **json.loads(json.dumps(r.config())))
    np.testing.assert_allclose(clone.risks(rows, ep), r.risks(rows, ep))


def test_steer_em_recovers_components_and_risk_falls_with_confidence(tmp_path):
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(0.2, 0.05, 300), rng.normal(0.8, 0.05, 700)])
    means, std, weights = fit_gmm2(rng.permutation(x))
    assert means == pytest.approx([0.2, 0.8], abs=0.01) and std == pytest.approx(0.05, abs=0.005)
    assert weights == pytest.approx([0.3, 0.7], abs=0.02)

    rows = [_feat(proposal_prob=float(v)) for v in x]
    steer = make_router("steer")
    with pytest.raises(R2VError, match="not fitted"):
        steer.risk(rows[0])
    assert steer.prepare(rows) is steer  # EM on the confidences alone: no labels anywhere
    assert make_router("entropy").prepare(rows).threshold == 1.0  # the others need nothing
    grid = [_feat(proposal_prob=float(g)) for g in np.linspace(-0.5, 1.5, 401)]
    risk, post = steer.risks(grid), steer.posterior(grid)
    assert np.all(np.diff(risk) < 0) and np.all(np.diff(post) <= 0)  # strictly: budgets can rank every step
    assert post[0] > 0.999 and post[-1] < 1e-3
    assert steer.escalate(_feat(proposal_prob=0.25)) and not steer.escalate(_feat(proposal_prob=0.75))
    r0, r1 = steer.risk(_feat(proposal_prob=0.0)), steer.risk(_feat(proposal_prob=1.0))  # log-odds: linear
    assert 0.3 < -r0 / (r1 - r0) < 0.7  # posterior 0.5 falls between the two components

    tau, rate = steer.calibrate(rows, 0.2)  # budgeted like every thresholded router
    assert 0.2 - 1 / len(rows) <= rate <= 0.2
    clone = load_router(save_router(steer, tmp_path))
    np.testing.assert_allclose(clone.risks(rows), steer.risks(rows))
    assert clone.threshold == tau and clone.confidence == "proposal_prob"
    margin = make_router("steer", confidence="proposal_logprob_margin").fit(
        [_feat(proposal_logprob_margin=float(v)) for v in 5 * x])
    assert margin.risk(_feat(proposal_logprob_margin=0.0)) > 0.99
    with pytest.raises(R2VError, match="not a feature"):
        make_router("steer", confidence="vibes")

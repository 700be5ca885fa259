"""Evaluation metrics on hand-computed cases."""
from __future__ import annotations

import numpy as np
import pytest

from r2v.errors import R2VError
from r2v.eval.metrics import (SUMMARY_KEYS, auroc, brier, cost, cvar_failure, ece, success_with_ci, summarise_method,
                              worst_seed_success)


def test_success_with_ci():
    s = np.r_[np.ones(60), np.zeros(40)]
    mean, (lo, hi) = success_with_ci(s, n_boot=2000, seed=0)
    assert mean == pytest.approx(0.6)
    assert lo < 0.6 < hi and 0.08 < hi - lo < 0.3  # ≈ ±1.96·sqrt(.24/100) ≈ ±0.096
    assert success_with_ci(s, 500, seed=1) == success_with_ci(s, 500, seed=1)
    assert success_with_ci(np.ones(10), 100)[1] == [1.0, 1.0]


def test_worst_seed_and_cvar_failure():
    success = [1, 1, 0, 1, 0, 0, 1, 1]
    seed = [0, 0, 1, 1, 2, 2, 3, 3]  # per-seed success 1, .5, 0, 1 → failure 0, .5, 1, 0
    assert worst_seed_success(success, seed) == 0.0
    assert cvar_failure(success, seed, alpha=0.25) == pytest.approx(1.0)
    assert cvar_failure(success, seed, alpha=0.5) == pytest.approx(0.75)
    assert cvar_failure(success, seed, alpha=0.3) == pytest.approx(0.75)  # ⌈1.2⌉ = 2 seeds
    assert cvar_failure(success, seed, alpha=1.0) == pytest.approx(0.375)
    with pytest.raises(R2VError):
        worst_seed_success([1, 0], [0])


def test_brier_and_ece():
    y = np.r_[np.ones(50), np.zeros(50)]
    assert brier(np.full(100, 0.9), y) == pytest.approx(0.5 * 0.01 + 0.5 * 0.81)
    assert ece(np.full(100, 0.9), y) == pytest.approx(0.4)
    assert brier(y, y) == 0.0 and ece(y, y) == 0.0
    rng = np.random.default_rng(0)
    p = rng.random(200_000)
    assert ece(p, (rng.random(p.size) < p).astype(float)) < 0.01  # calibrated by construction


def test_auroc():
    assert auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)
    assert auroc([1, 2, 3], [0, 1, 1]) == 1.0
    assert auroc([0.5, 0.5], [0, 1]) == 0.5  # ties count half
    assert np.isnan(auroc([0.1, 0.2], [1, 1]))
    rng = np.random.default_rng(0)
    s, y = rng.random(500), rng.integers(0, 2, 500)
    sk = pytest.importorskip("sklearn.metrics")
    assert auroc(s, y) == pytest.approx(sk.roc_auc_score(y, s))


def test_cost():
    assert cost(10, 2, 0.05, 1.0) == pytest.approx(2.5)
    assert cost([3, 7], [1, 1], 0.1, 2.0) == pytest.approx(5.0)


def test_summarise_method():
    # 4 episodes, 2 seeds; episode a: 3 steps, 1 teacher call, success; b: 2 slm steps, fail;
    # c: 2 steps, both teacher, success; d: 1 slm step, fail.
    steps = {
        "episode_id": ["a", "a", "a", "b", "b", "c", "c", "d"],
        "perturbation_seed": [0, 0, 0, 0, 0, 1, 1, 1],
        "actor": ["slm", "teacher", "slm", "slm", "slm", "teacher", "teacher", "slm"],
        "episode_success": [True, True, True, False, False, True, True, False],
        "risk": [0.1, 0.8, 0.2, 0.6, 0.7, 0.9, 0.9, 0.4],
    }
    out = summarise_method(steps, c_slm=0.1, c_llm=1.0, n_boot=200)
    assert tuple(out) == SUMMARY_KEYS
    assert out["success"] == 0.5 and len(out["success_ci"]) == 2
    assert out["worst_seed_success"] == 0.5 and out["cvar_failure"] == 0.5
    assert out["llm_call_rate"] == pytest.approx(3 / 8)
    assert out["episode_call_share"] == pytest.approx(0.5)
    assert out["cost"] == pytest.approx((1.2 + 0.2 + 2.0 + 0.1) / 4)
    assert out["n_episodes"] == 4 and out["n_seeds"] == 2
    labels = np.array([0, 0, 0, 1, 1, 0, 0, 1])
    assert out["brier"] == pytest.approx(brier(steps["risk"], labels))
    assert out["ece"] == pytest.approx(ece(steps["risk"], labels))

    no_risk = summarise_method({k: v for k, v in steps.items() if k != "risk"}, n_boot=50)
    assert no_risk["ece"] is None and no_risk["brier"] is None
    entropy_scores = summarise_method({**steps, "risk": [2.0] * 8}, n_boot=50)  # not a probability
    assert entropy_scores["ece"] is None
    with pytest.raises(R2VError, match="actor"):
        summarise_method({k: v for k, v in steps.items() if k != "actor"})

"""Evaluation metrics on hand-computed cases."""
from __future__ import annotations

import numpy as np
import pytest

from r2v.errors import R2VError
from r2v.eval.metrics import (SUMMARY_KEYS, auroc, brier, calls_to_reach, cost, curve_auc, cvar_failure, ece,
                              frontier_bootstrap, frontier_summary, game_weights, router_curves, split_method,
                              success_at_calls, success_with_ci, summarise_method, worst_seed_success)


def test_success_with_ci():
    s = np.r_[np.ones(60), np.zeros(40)]
    mean, (lo, hi) = success_with_ci(s, n_boot=2000, seed=0)
    assert mean == pytest.approx(0.6)
    assert lo < 0.6 < hi and 0.08 < hi - lo < 0.3  # ≈ ±1.96·sqrt(.24/100) ≈ ±0.096
    assert success_with_ci(s, 500, seed=1) == success_with_ci(s, 500, seed=1)
    assert success_with_ci(np.ones(10), 100)[1] == [1.0, 1.0]


def test_success_ci_resamples_games():
    # 10 games x 8 seeds, outcomes perfectly correlated within a game (6 games always won, 4 always lost)
    game_success = np.r_[np.ones(6), np.zeros(4)]
    s, games = np.repeat(game_success, 8), np.repeat(np.arange(10), 8)
    mean, game_ci = success_with_ci(s, n_boot=4000, seed=0, games=games)
    _, episode_ci = success_with_ci(s, n_boot=4000, seed=0)
    assert mean == pytest.approx(0.6)
    assert game_ci[1] - game_ci[0] > 2 * (episode_ci[1] - episode_ci[0])  # 10 units, not 80
    # equal-size games: the cluster bootstrap is the bootstrap of the game means (same draws) ...
    assert game_ci == pytest.approx(success_with_ci(game_success, n_boot=4000, seed=0)[1])
    # ... whose resampled mean is Binomial(10, 0.6)/10: 2.5% and 97.5% quantiles 0.3 and 0.9
    assert game_ci == pytest.approx([0.3, 0.9])
    one_game = success_with_ci([1, 0, 1, 1], n_boot=500, games=["g"] * 4)
    assert one_game == (0.75, [0.75, 0.75])  # one game: nothing to resample
    with pytest.raises(R2VError, match="game"):
        success_with_ci([1, 0], games=["g"])
    w = game_weights(7, 50, seed=3)
    assert w.shape == (50, 7) and (w.sum(axis=1) == 7).all()


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
        "task_id": ["g1", "g1", "g1", "g1", "g1", "g2", "g2", "g2"],
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
    assert out["llm_calls_per_episode"] == pytest.approx(3 / 4) and out["steps_per_episode"] == pytest.approx(8 / 4)
    assert out["cost"] == pytest.approx((1.2 + 0.2 + 2.0 + 0.1) / 4)
    assert out["n_episodes"] == 4 and out["n_seeds"] == 2 and out["n_games"] == 2
    ep_success, ep_game = [1.0, 0.0, 1.0, 0.0], ["g1", "g1", "g2", "g2"]
    assert out["success_ci"] == success_with_ci(ep_success, 200, 0, games=ep_game)[1]  # by game, not episode
    labels = np.array([0, 0, 0, 1, 1, 0, 0, 1])
    assert out["brier"] == pytest.approx(brier(steps["risk"], labels))
    assert out["ece"] == pytest.approx(ece(steps["risk"], labels))

    assert out["redundant_call_share"] is None  # no actions or candidates recorded
    # the teacher's 3 calls: one took the SLM's own proposal (up to case and spaces), one overrode it, one had none
    cands = [[{"text": t}] for t in ["go east", "Take  Key", "go west", "look", "look", "go north", "", "look"]]
    cands[6] = []
    acted = {**steps, "candidates": cands,
             "action": ["go east", "take key", "go west", "look", "look", "go south", "open door", "look"]}
    assert summarise_method(acted, n_boot=10)["redundant_call_share"] == pytest.approx(1 / 2)
    assert summarise_method({**acted, "actor": ["slm"] * 8}, n_boot=10)["redundant_call_share"] is None
    no_risk = summarise_method({k: v for k, v in steps.items() if k != "risk"}, n_boot=50)
    assert no_risk["ece"] is None and no_risk["brier"] is None
    entropy_scores = summarise_method({**steps, "risk": [2.0] * 8}, n_boot=50)  # not a probability
    assert entropy_scores["ece"] is None
    with pytest.raises(R2VError, match="actor"):
        summarise_method({k: v for k, v in steps.items() if k != "actor"})
    with pytest.raises(R2VError, match="task_id"):
        summarise_method({k: v for k, v in steps.items() if k != "task_id"})


def test_split_method_and_router_curves():
    assert split_method("r2v@0.2") == ("r2v", 0.2) and split_method("llm_only") == ("llm_only", None)
    assert split_method("odd@name") == ("odd@name", None)
    names = ["r2v@0.4", "r2v", "slm_only", "r2v@0.1", "entropy@0.2", "llm_only"]
    assert router_curves(names) == {"r2v": ["r2v@0.1", "r2v@0.4"], "entropy": ["entropy@0.2"]}


def test_curve_auc_and_calls_to_reach():
    x, y = [0.2, 0.0, 0.4], [0.6, 0.2, 0.7]  # any order
    # stops at 0.4: bridged to the teacher (1.0, 0.9): success at 0.5 = 0.7 + 0.2·(0.1/0.6)
    area = 0.2 * (0.2 + 0.6) / 2 + 0.2 * (0.6 + 0.7) / 2 + 0.1 * (0.7 + 0.7 + 0.2 / 6) / 2
    assert curve_auc(x, y, 0.5, anchor=(1.0, 0.9)) == pytest.approx(area / 0.5)
    assert curve_auc(x, y, 0.5) is None  # not measured up to 0.5 and no teacher: no guess
    assert curve_auc([0.2, 0.4], [0.6, 0.7], 0.5, anchor=(1.0, 0.9)) is None  # no SLM-only point at 0
    assert curve_auc([0.0, 0.6], [0.2, 0.8], 0.5) == pytest.approx((0.2 + 0.7) / 2)  # interpolated at 0.5
    assert curve_auc([0.0, 0.3, 0.7], [0.4, 0.4, 0.4], 0.5) == pytest.approx(0.4)
    assert calls_to_reach(x, y, 0.65) == pytest.approx(0.3)
    assert calls_to_reach(x, y, 0.1) == 0.0
    assert calls_to_reach(x, y, 0.71) is None
    assert calls_to_reach([0.0, 0.1, 0.2], [0.2, 0.8, 0.5], 0.5) == pytest.approx(0.05)  # first crossing
    assert success_at_calls(x, y, 0.3) == pytest.approx(0.65)  # equal cost, between two measured points
    assert success_at_calls(x, y, 0.4) == pytest.approx(0.7) and success_at_calls(x, y, 0.0) == pytest.approx(0.2)
    assert success_at_calls(x, y, 0.41) is None and success_at_calls([], [], 0.1) is None  # never extended


def test_frontier_summary_from_points():
    points = {"slm_only": (0.0, 0.2), "llm_only": (1.0, 0.9), "r2v@0.2": (0.2, 0.6), "r2v@0.4": (0.4, 0.7),
              "random@0.2": (0.21, 0.3), "oracle_teacher": (0.1, 0.95), "r2v": (0.3, 0.9)}
    out = frontier_summary(points)
    assert set(out) == {"r2v", "random"}  # only `router@B` curves; `r2v` at its own τ is not on the curve
    r2v = out["r2v"]
    assert r2v["methods"] == ["r2v@0.2", "r2v@0.4"] and r2v["target"] == pytest.approx(0.88)
    assert r2v["auc"] == pytest.approx(curve_auc([0, 0.2, 0.4], [0.2, 0.6, 0.7], 0.5, anchor=(1.0, 0.9)))
    assert r2v["auc_bridged_from"] == 0.4 and r2v["calls_to_target"] is None
    assert frontier_summary(points, margin=0.25)["r2v"]["calls_to_target"] == pytest.approx(0.3)
    no_teacher = frontier_summary({k: v for k, v in points.items() if k != "llm_only"})["r2v"]
    assert no_teacher["auc"] is None and no_teacher["calls_to_target"] is None and no_teacher["target"] is None


def _eval_steps(won: dict[str, list[int]], calls: dict[str, int], seeds: int = 4, n_steps: int = 10):
    """Per-step records of every method: `won[m]` lists the games m wins (under every seed), each episode has
    n_steps steps of which calls[m] are the teacher's."""
    import pandas as pd

    rows = []
    for m, games_won in won.items():
        for g in range(10):
            for seed in range(seeds):
                for t in range(n_steps):
                    rows.append({"policy": f"routed-{m}", "task_id": f"g{g}", "episode_id": f"{m}-{g}-{seed}",
                                 "perturbation_seed": seed, "episode_success": g in games_won,
                                 "actor": "teacher" if t < calls[m] else "slm"})
    return pd.DataFrame(rows)


def test_frontier_bootstrap_is_paired_over_games():
    won = {"slm_only": [0, 1], "llm_only": list(range(9)), "r2v@0.2": list(range(6)), "r2v@0.4": list(range(9))}
    calls = {"slm_only": 0, "llm_only": 10, "r2v@0.2": 2, "r2v@0.4": 4}
    steps = _eval_steps(won, calls)
    out = frontier_bootstrap(steps, n_boot=400, seed=0)["r2v"]
    rows = {m: summarise_method(steps[steps["policy"] == f"routed-{m}"], n_boot=10) for m in won}
    point = frontier_summary({m: (r["llm_call_rate"], r["success"]) for m, r in rows.items()})["r2v"]
    assert out["auc"] == pytest.approx(point["auc"]) and out["auc"] == pytest.approx(
        (0.2 * 0.4 + 0.2 * 0.75 + 0.1 * 0.9) / 0.5)  # (0,.2) (.2,.6) (.4,.9), bridged flat to the teacher's .9
    assert out["calls_to_target"] == pytest.approx(0.2 + 0.2 * 0.28 / 0.3)  # teacher .9 − .02 = .88
    assert out["auc_ci"][0] < out["auc"] < out["auc_ci"][1]
    # r2v@0.4 wins exactly the teacher's games: in every paired resample it reaches teacher − 2 pts
    assert out["p_reached"] == 1.0
    assert 0.1 < out["calls_to_target_ci"][0] < out["calls_to_target"] < out["calls_to_target_ci"][1] <= 0.4
    assert out["n_games"] == 10 and out["n_boot"] == 400

    never = frontier_bootstrap(_eval_steps({**won, "r2v@0.4": list(range(7))}, calls), n_boot=200)["r2v"]
    assert never["calls_to_target"] is None and never["p_reached"] < 0.2 and never["calls_to_target_ci"][1] is None

    one_game = _eval_steps(won, calls)
    one_game = one_game[one_game["task_id"] == "g7"]  # r2v@0.2 loses it, r2v@0.4 and the teacher win it
    single = frontier_bootstrap(one_game, n_boot=100)["r2v"]
    assert single["auc_ci"] == [pytest.approx(single["auc"])] * 2 and single["n_games"] == 1
    with pytest.raises(R2VError, match="task_id"):
        frontier_bootstrap(steps.drop(columns="task_id"))


def test_ece_ci_resamples_games_and_brackets_the_estimate():
    from r2v.eval.metrics import ece, ece_with_ci

    rng = np.random.default_rng(0)
    games = np.repeat(np.arange(30), 20)
    p = rng.uniform(size=games.size)
    y = (rng.uniform(size=games.size) < p).astype(float)  # calibrated by construction
    est, (lo, hi) = ece_with_ci(p, y, games, n_boot=300, seed=1)
    assert est == ece(p, y) and lo <= est <= hi and hi - lo > 0
    one, (lo1, hi1) = ece_with_ci(p[:20], y[:20], games[:20], n_boot=50)
    assert lo1 == hi1 == pytest.approx(one)  # one game: every resample is that game

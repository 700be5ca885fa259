"""Evaluation metrics: success with a bootstrap CI, tail (worst-seed, CVaR) reliability, calibration, cost,
and the per-router budget frontier (AUC of success vs LLM calls/step, calls needed to reach the teacher).

Plain numpy. Success is always what the environment reported; a method's LLM calls are the steps the
teacher actually acted on. Confidence intervals resample *games* (task ids), not episodes: the episodes of one
game under different perturbation seeds share its difficulty, so treating them as independent would make the
intervals too narrow.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from r2v.errors import R2VError

SUMMARY_KEYS = ("success", "success_ci", "worst_seed_success", "cvar_failure", "llm_call_rate",
                "llm_calls_per_episode", "steps_per_episode", "episode_call_share", "redundant_call_share", "cost",
                "ece", "brier", "n_episodes", "n_games", "n_seeds")


def _arr(x: Any, dtype=np.float64) -> np.ndarray:
    return np.asarray(x, dtype=dtype).reshape(-1)


def game_weights(n_games: int, n_boot: int, seed: int = 0) -> np.ndarray:
    """(n_boot, n_games): how often each game is drawn in each bootstrap resample (with replacement).

    One matrix serves every quantity of the same resample, so that comparisons across methods are paired."""
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n_games, size=(max(1, n_boot), n_games))
    w = np.zeros(draws.shape, dtype=np.float64)
    np.add.at(w, (np.arange(draws.shape[0])[:, None], draws), 1.0)
    return w


def _quantiles(x: np.ndarray, level: float) -> list[float]:
    lo, hi = np.quantile(x, [(1 - level) / 2, 1 - (1 - level) / 2])
    return [float(lo), float(hi)]


def success_with_ci(successes: Any, n_boot: int = 1000, seed: int = 0, level: float = 0.95, *,
                    games: Any = None) -> tuple[float, list[float]]:
    """(mean success, [lo, hi]): percentile cluster bootstrap with the game as the unit.

    Each resample draws games with replacement and pools all episodes of each drawn game. `games` holds one game
    (task id) per episode; None makes every episode its own game (the plain episode bootstrap), which is only
    right when episodes are independent."""
    s = _arr(successes)
    if s.size == 0:
        return float("nan"), [float("nan"), float("nan")]
    g = np.arange(s.size) if games is None else np.asarray(games).reshape(-1)
    if g.size != s.size:
        raise R2VError(f"{s.size} outcomes but {g.size} game ids: pass one game (task id) per episode")
    _, inv = np.unique(g, return_inverse=True)
    sums, counts = np.bincount(inv, weights=s), np.bincount(inv).astype(np.float64)
    w = game_weights(sums.size, n_boot, seed)
    return float(s.mean()), _quantiles((w @ sums) / (w @ counts), level)


def _per_seed(values: Any, seed: Any) -> np.ndarray:
    v, g = _arr(values), np.asarray(seed).reshape(-1)
    if v.size != g.size:
        raise R2VError(f"{v.size} outcomes but {g.size} seeds: pass one perturbation seed per episode")
    groups, inv = np.unique(g, return_inverse=True)
    return np.bincount(inv, weights=v, minlength=groups.size) / np.bincount(inv, minlength=groups.size)


def worst_seed_success(success: Any, seed: Any) -> float:
    """Success rate of the worst perturbation seed."""
    per = _per_seed(success, seed)
    return float(per.min()) if per.size else float("nan")


def cvar_failure(success: Any, seed: Any, alpha: float = 0.2) -> float:
    """Mean failure rate of the worst ⌈α·#seeds⌉ perturbation seeds."""
    if not 0 < alpha <= 1:
        raise R2VError(f"alpha = {alpha} must be in (0, 1]")
    fail = 1.0 - _per_seed(success, seed)
    if fail.size == 0:
        return float("nan")
    k = max(1, min(fail.size, math.ceil(alpha * fail.size - 1e-9)))
    return float(np.sort(fail)[::-1][:k].mean())


def brier(p: Any, y: Any) -> float:
    p, y = _arr(p), _arr(y)
    return float(np.mean((p - y) ** 2)) if p.size else float("nan")


def ece(p: Any, y: Any, bins: int = 15) -> float:
    """Expected calibration error with equal-width bins: Σ_b (n_b/n)·|mean p_b − mean y_b|."""
    p, y = _arr(p), _arr(y)
    if p.size == 0:
        return float("nan")
    idx = np.clip((p * bins).astype(int), 0, bins - 1)
    n = np.bincount(idx, minlength=bins)
    gap = np.abs(np.bincount(idx, weights=p, minlength=bins) - np.bincount(idx, weights=y, minlength=bins))
    return float(gap.sum() / p.size) if n.sum() else float("nan")


def ece_with_ci(p: Any, y: Any, games: Any, n_boot: int = 1000, seed: int = 0, level: float = 0.95,
                bins: int = 15) -> tuple[float, list[float]]:
    """(ECE, [lo, hi]) with a percentile cluster bootstrap over games: each resample draws games with
    replacement and recomputes the ECE on all their steps (a game's steps are not independent)."""
    p, y = _arr(p), _arr(y)
    _, inv = np.unique(np.asarray(games).reshape(-1), return_inverse=True)
    if p.size == 0:
        return float("nan"), [float("nan"), float("nan")]
    idx = np.clip((p * bins).astype(int), 0, bins - 1)
    stats = []
    for w in game_weights(int(inv.max()) + 1, n_boot, seed):
        sw = w[inv]  # each step weighs as often as its game was drawn
        n = np.bincount(idx, weights=sw, minlength=bins)
        gap = np.abs(np.bincount(idx, weights=sw * p, minlength=bins) - np.bincount(idx, weights=sw * y, minlength=bins))
        stats.append(gap.sum() / n.sum())
    return ece(p, y, bins), _quantiles(np.asarray(stats), level)


def auroc(scores: Any, labels: Any) -> float:
    """Area under the ROC curve (Mann–Whitney, ties count half); NaN when only one class is present."""
    s, y = _arr(scores), _arr(labels)
    pos, neg = int((y == 1).sum()), int((y == 0).sum())
    if pos == 0 or neg == 0:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(s.size, dtype=np.float64)
    sorted_s = s[order]
    # average ranks over ties
    starts = np.r_[0, np.nonzero(np.diff(sorted_s))[0] + 1]
    ends = np.r_[starts[1:], s.size]
    for a, b in zip(starts, ends):
        ranks[order[a:b]] = (a + b + 1) / 2.0
    return float((ranks[y == 1].sum() - pos * (pos + 1) / 2) / (pos * neg))


def cost(n_slm_steps: Any, n_llm_steps: Any, c_slm: float, c_llm: float) -> float:
    """Total cost of the given step counts (scalars or arrays summed)."""
    return float(np.sum(n_slm_steps) * c_slm + np.sum(n_llm_steps) * c_llm)


# what `redundant_call_share` measures, in the words every table that shows it uses
REDUNDANT_CALLS = ("the share of LLM calls at which the teacher took the very action the SLM had proposed: the call "
                   "changed nothing at that step")


def redundant_call_share(steps: Any, teacher: np.ndarray) -> float | None:
    """Share of the LLM calls (`teacher` rows) whose executed action equals the SLM's proposal (the first
    candidate), over the calls where a proposal was recorded; None without any."""
    from r2v.router.features import normalise_action

    if not {"action", "candidates"} <= set(steps.columns) or not teacher.any():
        return None
    called = steps[teacher]
    proposal = called["candidates"].map(lambda c: c[0]["text"] if c is not None and len(c) else None)
    known = proposal.notna().to_numpy()
    if not known.any():
        return None
    same = [normalise_action(a) == normalise_action(p) for a, p in zip(called["action"][known], proposal[known])]
    return float(np.mean(same))


def summarise_method(steps: Any, *, c_slm: float = 0.05, c_llm: float = 1.0, n_boot: int = 1000, seed: int = 0,
                     alpha: float = 0.2) -> dict[str, Any]:
    """One method's row of the results table, from its per-step records (DataFrame or dict of arrays).

    Needs columns task_id, episode_id, perturbation_seed, episode_success and either `actor` (slm|teacher) or
    `escalated`. `success_ci` is the cluster bootstrap over games (task_id; see `success_with_ci`); `n_games`
    is the number of distinct games behind it. `risk` (optional, null for methods without one) is scored
    against `label` when given, else against the episode's realised failure; ece/brier stay None unless every
    risk is a probability. `cost` is the mean cost per episode; `llm_calls_per_episode` and `steps_per_episode`
    are its two parts (a router that lets the SLM wander spends fewer calls per step partly by playing more
    steps). `redundant_call_share` (needs `action` and `candidates`, the SLM's proposal first, as routed steps
    record them; else None): the share of LLM calls at which the teacher took the very action the SLM had
    proposed, so the call changed nothing: a router's wasted spend, for any teacher and without labels (the
    hindsight router's is 0 by construction)."""
    import pandas as pd

    df = steps if isinstance(steps, pd.DataFrame) else pd.DataFrame(steps)
    need = {"task_id", "episode_id", "perturbation_seed", "episode_success"}
    missing = need - set(df.columns)
    if missing:
        raise R2VError(f"summarise_method: step records lack columns {sorted(missing)}"
                       + (" (task_id is the game: the unit the success CI resamples)" if "task_id" in missing else ""))
    if "actor" in df.columns:
        teacher = (df["actor"] == "teacher").to_numpy()
    elif "escalated" in df.columns:
        teacher = df["escalated"].fillna(False).astype(bool).to_numpy()
    else:
        raise R2VError("summarise_method: step records need an `actor` or `escalated` column")
    if len(df) == 0:
        none = ("ece", "brier", "redundant_call_share")
        return {k: (None if k in none else float("nan")) for k in SUMMARY_KEYS} | {
            "success_ci": [float("nan"), float("nan")], "n_episodes": 0, "n_games": 0, "n_seeds": 0}
    df = df.assign(_teacher=teacher.astype(float))
    ep = df.groupby("episode_id", sort=True).agg(
        success=("episode_success", lambda s: float(s.fillna(False).astype(bool).any())),
        seed=("perturbation_seed", "first"), game=("task_id", "first"),
        calls=("_teacher", "sum"), steps=("_teacher", "size"))
    success, ci = success_with_ci(ep["success"].to_numpy(), n_boot, seed, games=ep["game"].to_numpy())
    per_ep_cost = (ep["steps"] - ep["calls"]) * c_slm + ep["calls"] * c_llm
    out: dict[str, Any] = {
        "success": success,
        "success_ci": ci,
        "worst_seed_success": worst_seed_success(ep["success"], ep["seed"]),
        "cvar_failure": cvar_failure(ep["success"], ep["seed"], alpha),
        "llm_call_rate": float(teacher.mean()),
        "llm_calls_per_episode": float(ep["calls"].mean()),
        "steps_per_episode": float(ep["steps"].mean()),
        "episode_call_share": float((ep["calls"] > 0).mean()),
        "redundant_call_share": redundant_call_share(df, teacher),
        "cost": float(per_ep_cost.mean()),
        "ece": None,
        "brier": None,
        "n_episodes": int(len(ep)),
        "n_games": int(ep["game"].nunique()),
        "n_seeds": int(ep["seed"].nunique()),
    }
    if "risk" in df.columns and df["risk"].notna().any():
        scored = df[df["risk"].notna()]
        if "label" in scored.columns:
            y = scored["label"].astype(float).to_numpy()
        else:
            y = 1.0 - scored["episode_id"].map(ep["success"]).to_numpy(dtype=float)
        p = scored["risk"].astype(float).to_numpy()
        if np.all((p >= 0) & (p <= 1)):  # only a probability can be calibrated (not e.g. an entropy score)
            out["ece"], out["brier"] = ece(p, y), brier(p, y)
    return out


# ---- the budget frontier: one curve per router, from its `router@B` methods --------------------------------------

def split_method(name: str) -> tuple[str, float | None]:
    """`r2v@0.2` -> ("r2v", 0.2); a name without a numeric `@budget` -> (name, None)."""
    base, sep, budget = name.partition("@")
    try:
        return (base, float(budget)) if sep else (name, None)
    except ValueError:
        return name, None


def router_curves(methods: Any) -> dict[str, list[str]]:
    """{router: its `router@B` method names, by budget} for every router evaluated at some budget."""
    curves: dict[str, list[tuple[float, str]]] = {}
    for name in methods:
        base, budget = split_method(name)
        if budget is not None:
            curves.setdefault(base, []).append((budget, name))
    return {base: [n for _, n in sorted(pts)] for base, pts in curves.items()}


def _sorted_curve(rates: Any, successes: Any) -> tuple[np.ndarray, np.ndarray]:
    x, y = _arr(rates), _arr(successes)
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    order = np.lexsort((y, x))
    return x[order], y[order]


def curve_auc(rates: Any, successes: Any, x_max: float = 0.5,
              anchor: tuple[float, float] | None = None) -> float | None:
    """Mean success over LLM calls/step in [0, x_max] (area under the piecewise-linear curve / x_max).

    The points must include rate 0 (the SLM-only point); points beyond x_max only serve to interpolate at x_max.
    A curve that stops short of x_max is bridged linearly to `anchor`, the teacher's (1.0, success): a router at
    τ = 0 is the teacher, so that point lies on every router's curve; this neither extends the last success flat
    nor invents a shape. Without an anchor such a curve gets None (not measured), never a guess."""
    x, y = _sorted_curve(rates, successes)
    if anchor is not None and x.size and x[-1] < x_max:
        x, y = np.r_[x, anchor[0]], np.r_[y, anchor[1]]
    if x.size == 0 or x[0] > 0 or x[-1] < x_max:
        return None
    inside = x < x_max
    xs = np.r_[x[inside], x_max]
    ys = np.r_[y[inside], np.interp(x_max, x, y)]
    return float(np.sum(np.diff(xs) * (ys[1:] + ys[:-1]) / 2) / x_max)


def calls_to_reach(rates: Any, successes: Any, target: float) -> float | None:
    """The fewest LLM calls/step at which the piecewise-linear curve through the measured points reaches
    `target` success (linear between points); None if no measured point or segment gets there."""
    x, y = _sorted_curve(rates, successes)
    if x.size == 0 or not np.isfinite(target):
        return None
    if y[0] >= target:
        return float(x[0])
    for i in range(x.size - 1):
        if y[i] < target <= y[i + 1]:
            return float(x[i] + (target - y[i]) / (y[i + 1] - y[i]) * (x[i + 1] - x[i]))
    return None


def success_at_calls(rates: Any, successes: Any, calls: float) -> float | None:
    """Success of the piecewise-linear curve through the measured points at `calls` LLM calls/step: routers
    compared at equal live cost when their budgets realised different rates. None outside the measured range
    (a curve is never extended)."""
    x, y = _sorted_curve(rates, successes)
    if x.size == 0 or not x[0] <= calls <= x[-1]:
        return None
    return float(np.interp(calls, x, y))


def frontier_summary(points: dict[str, tuple[float, float]], *, slm: str = "slm_only", teacher: str = "llm_only",
                     x_max: float = 0.5, margin: float = 0.02) -> dict[str, dict[str, Any]]:
    """Per router, from {method: (llm_call_rate, success)}: its curve is (0, SLM-only success) plus its `router@B`
    points (the teacher only bridges the AUC, see `curve_auc`). `auc`: mean success on [0, x_max];
    `auc_bridged_from`: the last measured rate when the curve was bridged to the teacher, else None;
    `calls_to_target`: LLM calls/step to reach teacher success − margin over the measured points (None: not reached).
    """
    slm_pt = points.get(slm)
    teach = points.get(teacher)
    target = teach[1] - margin if teach is not None else float("nan")
    anchor = (1.0, teach[1]) if teach is not None else None
    out = {}
    for base, names in router_curves(points).items():
        pts = [points[n] for n in names] + ([(0.0, slm_pt[1])] if slm_pt is not None else [])
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        last = max((x for x in xs if np.isfinite(x)), default=float("nan"))
        out[base] = {"methods": names, "auc": curve_auc(xs, ys, x_max, anchor),
                     "auc_bridged_from": float(last) if anchor is not None and last < x_max else None,
                     "calls_to_target": calls_to_reach(xs, ys, target),
                     "target": float(target) if teach is not None else None, "x_max": x_max}
    return out


def _method_column(df) -> Any:
    if "method" in df.columns:
        return df["method"]
    if "policy" in df.columns:  # eval shards name a method's episodes `routed-<method>`
        return df["policy"].astype(str).str.removeprefix("routed-")
    raise R2VError("frontier_bootstrap: step records need a `method` or `policy` column")


def frontier_bootstrap(steps: Any, *, slm: str = "slm_only", teacher: str = "llm_only", x_max: float = 0.5,
                       margin: float = 0.02, n_boot: int = 1000, seed: int = 0, level: float = 0.95
                       ) -> dict[str, dict[str, Any]]:
    """`frontier_summary` with CIs from a paired cluster bootstrap over games.

    `steps`: per-step records of every method (method or policy, task_id, episode_id, episode_success, actor).
    Each resample draws games once and re-computes every method's success and realised LLM-call rate from the
    same games, so a curve's points (and the teacher target) move together. Adds `auc_ci`, `calls_to_target_ci`
    (an upper end of None: in more than (1 − level)/2 of the resamples the target is never reached), `p_reached`
    (share of resamples reaching the target), `n_games` and `n_boot`."""
    import pandas as pd

    df = steps if isinstance(steps, pd.DataFrame) else pd.DataFrame(steps)
    need = {"task_id", "episode_id", "episode_success", "actor"} - set(df.columns)
    if need:
        raise R2VError(f"frontier_bootstrap: step records lack columns {sorted(need)}")
    df = df.assign(_method=_method_column(df).to_numpy(), _call=(df["actor"] == "teacher").to_numpy(float))
    ep = df.groupby(["_method", "episode_id"], sort=True).agg(
        success=("episode_success", lambda s: float(s.fillna(False).astype(bool).any())),
        game=("task_id", "first"), calls=("_call", "sum"), steps=("_call", "size")).reset_index()
    ep["episodes"] = 1.0
    sums = ep.groupby(["_method", "game"])[["success", "episodes", "calls", "steps"]].sum()
    methods = sorted(ep["_method"].unique())
    games = sorted(ep["game"].unique())
    mat = {c: sums[c].unstack("game").reindex(index=methods, columns=games).fillna(0.0).to_numpy().T
           for c in ("success", "episodes", "calls", "steps")}  # (games, methods)

    def summary(w: np.ndarray) -> dict[str, dict[str, Any]]:
        with np.errstate(invalid="ignore", divide="ignore"):
            succ = (w @ mat["success"]) / (w @ mat["episodes"])
            rate = (w @ mat["calls"]) / (w @ mat["steps"])
        return frontier_summary({m: (rate[i], succ[i]) for i, m in enumerate(methods)}, slm=slm, teacher=teacher,
                                x_max=x_max, margin=margin)

    out = summary(np.ones(len(games)))
    draws = [summary(w) for w in game_weights(len(games), n_boot, seed)]
    for base, row in out.items():
        auc = np.array([d[base]["auc"] for d in draws], dtype=np.float64)  # None -> nan
        row["auc_ci"] = (_quantiles(auc[np.isfinite(auc)], level)
                         if row["auc"] is not None and np.isfinite(auc).any() else None)
        calls = np.array([d[base]["calls_to_target"] for d in draws], dtype=np.float64)
        reached = np.isfinite(calls)
        row["p_reached"] = float(reached.mean()) if row["target"] is not None else None
        if row["target"] is not None and reached.any():
            lo, hi = np.quantile(np.where(reached, calls, np.inf), [(1 - level) / 2, 1 - (1 - level) / 2],
                                 method="inverted_cdf")  # an actual draw, so "never reached" (inf) stays inf
            row["calls_to_target_ci"] = [float(lo) if np.isfinite(lo) else None,
                                         float(hi) if np.isfinite(hi) else None]
        else:
            row["calls_to_target_ci"] = None
        row.update(n_games=len(games), n_boot=len(draws))
    return out


__all__ = ["ece_with_ci", "success_with_ci", "game_weights", "worst_seed_success", "cvar_failure", "brier", "ece", "auroc", "cost",
           "summarise_method", "split_method", "router_curves", "curve_auc", "calls_to_reach", "frontier_summary",
           "frontier_bootstrap", "SUMMARY_KEYS"]

"""Evaluation metrics: success with a bootstrap CI, tail (worst-seed, CVaR) reliability, calibration, cost.

Plain numpy. Success is always what the environment reported; a method's LLM calls are the steps the
teacher actually acted on.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from r2v.errors import R2VError

SUMMARY_KEYS = ("success", "success_ci", "worst_seed_success", "cvar_failure", "llm_call_rate",
                "episode_call_share", "cost", "ece", "brier", "n_episodes", "n_seeds")


def _arr(x: Any, dtype=np.float64) -> np.ndarray:
    return np.asarray(x, dtype=dtype).reshape(-1)


def success_with_ci(successes: Any, n_boot: int = 1000, seed: int = 0, level: float = 0.95
                    ) -> tuple[float, list[float]]:
    """(mean success, [lo, hi]) with a percentile bootstrap CI over episodes."""
    s = _arr(successes)
    if s.size == 0:
        return float("nan"), [float("nan"), float("nan")]
    rng = np.random.default_rng(seed)
    means = s[rng.integers(0, s.size, size=(max(1, n_boot), s.size))].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(s.mean()), [float(lo), float(hi)]


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


def summarise_method(steps: Any, *, c_slm: float = 0.05, c_llm: float = 1.0, n_boot: int = 1000, seed: int = 0,
                     alpha: float = 0.2) -> dict[str, Any]:
    """One method's row of the results table, from its per-step records (DataFrame or dict of arrays).

    Needs columns episode_id, perturbation_seed, episode_success and either `actor` (slm|teacher) or
    `escalated`; `risk` (optional, null for methods without one) is scored against `label` when given,
    else against the episode's realised failure; ece/brier stay None unless every risk is a probability.
    `cost` is the mean cost per episode."""
    import pandas as pd

    df = steps if isinstance(steps, pd.DataFrame) else pd.DataFrame(steps)
    need = {"episode_id", "perturbation_seed", "episode_success"}
    missing = need - set(df.columns)
    if missing:
        raise R2VError(f"summarise_method: step records lack columns {sorted(missing)}")
    if "actor" in df.columns:
        teacher = (df["actor"] == "teacher").to_numpy()
    elif "escalated" in df.columns:
        teacher = df["escalated"].fillna(False).astype(bool).to_numpy()
    else:
        raise R2VError("summarise_method: step records need an `actor` or `escalated` column")
    if len(df) == 0:
        return {k: (None if k in ("ece", "brier") else float("nan")) for k in SUMMARY_KEYS} | {
            "success_ci": [float("nan"), float("nan")], "n_episodes": 0, "n_seeds": 0}
    df = df.assign(_teacher=teacher.astype(float))
    ep = df.groupby("episode_id", sort=True).agg(
        success=("episode_success", lambda s: float(s.fillna(False).astype(bool).any())),
        seed=("perturbation_seed", "first"),
        calls=("_teacher", "sum"), steps=("_teacher", "size"))
    success, ci = success_with_ci(ep["success"].to_numpy(), n_boot, seed)
    per_ep_cost = (ep["steps"] - ep["calls"]) * c_slm + ep["calls"] * c_llm
    out: dict[str, Any] = {
        "success": success,
        "success_ci": ci,
        "worst_seed_success": worst_seed_success(ep["success"], ep["seed"]),
        "cvar_failure": cvar_failure(ep["success"], ep["seed"], alpha),
        "llm_call_rate": float(teacher.mean()),
        "episode_call_share": float((ep["calls"] > 0).mean()),
        "cost": float(per_ep_cost.mean()),
        "ece": None,
        "brier": None,
        "n_episodes": int(len(ep)),
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


__all__ = ["success_with_ci", "worst_seed_success", "cvar_failure", "brier", "ece", "auroc", "cost",
           "summarise_method", "SUMMARY_KEYS"]

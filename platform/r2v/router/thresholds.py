"""Escalation thresholds: a step escalates when its risk p ≥ τ.

Three ways to pick τ (`router.threshold`):
- bayes:  τ* = (c_LLM − c_SLM)/κ, escalate when the expected failure cost p·κ exceeds the extra LLM cost;
- budget: the τ whose escalation rate on validation is as close as possible to, and not above, a target
          LLM-call rate (what users ask for: "call the big model on at most 20% of steps");
- cvar:   the largest τ (fewest calls) whose realised CVaR_α of per-seed residual failure is ≤ ε.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from r2v.errors import R2VError


def _as_1d(x: Any, name: str) -> np.ndarray:
    arr = np.asarray(x, dtype=np.float64).reshape(-1)
    if arr.size == 0:
        raise R2VError(f"{name} is empty: threshold calibration needs validation rows (collect router rows "
                       f"for the val split, or use router.threshold=bayes)")
    if not np.all(np.isfinite(arr)):
        raise R2VError(f"{name} holds NaN or infinite values: check the features / risk model that produced them")
    return arr


def above(x: float) -> float:
    """The smallest float above x: a threshold that escalates nothing when x = max risk."""
    return float(np.nextafter(np.float64(x), np.inf))


def bayes_threshold(c_llm: float, c_slm: float, kappa: float) -> float:
    """τ* = (c_LLM − c_SLM)/κ, clipped to [0, 1]."""
    if kappa <= 0:
        raise R2VError(f"`router.kappa` = {kappa} must be > 0 (the cost of a failure in Bayes rule)")
    return float(min(1.0, max(0.0, (c_llm - c_slm) / kappa)))


def realised_rate(p: Any, tau: float) -> float:
    """Share of steps with p ≥ τ (the LLM-call rate a threshold gives)."""
    arr = np.asarray(p, dtype=np.float64).reshape(-1)
    return float((arr >= tau).mean()) if arr.size else 0.0


def budget_threshold(p_val: Any, budget: float) -> float:
    """The τ whose escalation rate on `p_val` is as close as possible to `budget` without exceeding it.

    Only distinct values of p can be thresholds that change the rate, so ties are escalated together or
    not at all; budget 0 gives τ just above max p, budget 1 gives τ = 0."""
    if not 0.0 <= budget <= 1.0:
        raise R2VError(f"budget = {budget} must be an LLM-call rate in [0, 1] (router.budget)")
    p = _as_1d(p_val, "validation risks")
    if budget >= 1.0:
        return 0.0
    allowed = math.floor(budget * p.size + 1e-9)
    values = np.unique(p)[::-1]  # distinct, descending
    counts = np.searchsorted(np.sort(p), values, side="left")  # #(p < v)
    counts = p.size - counts  # #(p ≥ v), increasing along `values`
    ok = np.nonzero(counts <= allowed)[0]
    if ok.size == 0:
        return above(values[0])
    return float(values[ok[-1]])


def calibrate(p_val: Any, budget: float) -> tuple[float, float]:
    """(τ, realised escalation rate on the same validation risks)."""
    tau = budget_threshold(p_val, budget)
    return tau, realised_rate(p_val, tau)


def realised_cvar(p: np.ndarray, y: np.ndarray, group: np.ndarray, tau: float, alpha: float) -> float:
    """CVaR_α over groups of the realised residual failure mean(y·1[p < τ])."""
    residual = y * (p < tau)
    groups, inverse = np.unique(group, return_inverse=True)
    per = np.bincount(inverse, weights=residual, minlength=groups.size) / np.bincount(inverse, minlength=groups.size)
    k = max(1, min(per.size, math.ceil(alpha * per.size - 1e-9)))
    return float(np.sort(per)[::-1][:k].mean())


def cvar_threshold(p_val: Any, y_val: Any, group_val: Any, alpha: float, epsilon: float) -> float:
    """The largest τ (fewest LLM calls) whose realised CVaR_α of per-seed residual failure is ≤ ε.

    Residual failure only grows with τ, so a binary search over the distinct risks finds it. τ = 0
    (escalate everything) always satisfies ε ≥ 0."""
    p = _as_1d(p_val, "validation risks")
    y = _as_1d(y_val, "validation labels")
    g = np.asarray(group_val).reshape(-1)
    if not (p.size == y.size == g.size):
        raise R2VError(f"cvar_threshold: {p.size} risks, {y.size} labels and {g.size} groups must be equal in length")
    if not 0 < alpha <= 1:
        raise R2VError(f"`router.alpha` = {alpha} must be in (0, 1]")
    if epsilon < 0:
        raise R2VError(f"`router.epsilon` = {epsilon} must be ≥ 0")
    candidates = np.concatenate([np.unique(p), [above(p.max())]])  # ascending
    lo, hi = 0, candidates.size - 1  # invariant: candidates[lo] feasible (or lo = 0)
    if realised_cvar(p, y, g, candidates[hi], alpha) <= epsilon:
        return float(candidates[hi])
    if realised_cvar(p, y, g, candidates[0], alpha) > epsilon:
        return 0.0
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if realised_cvar(p, y, g, candidates[mid], alpha) <= epsilon:
            lo = mid
        else:
            hi = mid
    return float(candidates[lo])


def select_threshold(kind: str, *, p_val: Any = None, y_val: Any = None, group_val: Any = None, budget: float = 0.3,
                     alpha: float = 0.2, epsilon: float = 0.3, c_llm: float = 1.0, c_slm: float = 0.05,
                     kappa: float = 2.0) -> tuple[float, dict[str, Any]]:
    """(τ, info) for `router.threshold` = kind; info records the realised validation rate when known."""
    if kind == "bayes":
        tau = bayes_threshold(c_llm, c_slm, kappa)
    elif kind == "budget":
        tau = budget_threshold(p_val, budget)
    elif kind == "cvar":
        tau = cvar_threshold(p_val, y_val, group_val, alpha, epsilon)
    else:
        raise R2VError(f"`router.threshold` = {kind!r} is not one of ['bayes', 'budget', 'cvar']")
    info: dict[str, Any] = {"kind": kind, "tau": tau}
    if p_val is not None and np.asarray(p_val).size:
        info["val_rate"] = realised_rate(p_val, tau)
    return tau, info


def apply_step_threshold(model: Any, p_steps: np.ndarray, cfg: Any) -> float:
    """Set a trained router's τ from its risks on every calibration step (`p_steps`, labelled or not: the steps a
    live agent sees; fit only sees the labelled ones, which over-represent the risky end of failed episodes).
    For threshold=budget, τ is re-calibrated there so the step-level LLM-call rate is ≤ budget, as `r2v
    calibrate` and the eval's budgeted methods set it; bayes and cvar keep fit's τ. Sets model.threshold /
    threshold_info (with the realised rate on those steps); used by `train-router` and every sweep trial."""
    if cfg.threshold == "budget":
        tau = budget_threshold(p_steps, cfg.budget)
        model.threshold = float(tau)
        model.threshold_info = {"kind": "budget", "budget": float(cfg.budget), "tau": float(tau),
                                "calibrated_on": "every calibration step"}
    model.threshold_info["val_rate"] = float(np.mean(p_steps >= model.threshold)) if len(p_steps) else 0.0
    return float(model.threshold)


__all__ = ["apply_step_threshold", "bayes_threshold", "budget_threshold", "cvar_threshold", "calibrate", "realised_rate", "realised_cvar",
           "select_threshold", "above"]

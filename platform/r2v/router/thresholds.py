"""Escalation thresholds: a step escalates when its risk p ≥ τ.

Three ways to pick τ (`router.threshold`):
- bayes:  τ* = (c_LLM − c_SLM)/κ, escalate when the expected failure cost p·κ exceeds the extra LLM cost;
- budget: the τ at which routed episodes on the calibration games escalate a target share of their steps
          (what users ask for: "call the big model on 20% of steps"). Escalating changes the episodes
          (they end sooner and avoid risky states), so the live rate of a τ is measured by routed rollouts:
          `live_budget_search` below; `budget_threshold` is its offline starting point;
- cvar:   the largest τ (fewest calls) whose realised CVaR_α of per-seed residual failure is ≤ ε.
"""
from __future__ import annotations

import math
from collections import deque
from typing import Any, Callable

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


def quantile_map(values: Any, source: Any, target: Any) -> np.ndarray:
    """`values` on the risk scale of `source` moved to the scale of `target` by matching quantiles: a value
    above a share q of `source` lands above the same share q of `target` (empirical CDFs, linear between
    points; past either end a unit-slope shift, so τ = ±inf and "just above every risk" keep their meaning).
    Two models calibrated on different games rank steps alike but disagree on the level; this is how one τ
    means the same escalation share for both (see `r2v.rollout.live_budget`)."""
    src = np.sort(_as_1d(source, "source risks"))
    dst = np.sort(_as_1d(target, "target risks"))
    x = np.asarray(values, dtype=np.float64)
    share = np.interp(x, src, np.linspace(0.0, 1.0, src.size))
    out = np.interp(share, np.linspace(0.0, 1.0, dst.size), dst)
    with np.errstate(invalid="ignore"):  # ±inf − finite is fine; inf − inf does not occur (src is finite)
        out = np.where(x > src[-1], dst[-1] + (x - src[-1]), np.where(x < src[0], dst[0] - (src[0] - x), out))
    return out


class BudgetPacer:
    """Holds a routed stream's LLM-call rate at `budget` by moving τ; the same controller in Serve and in eval.

    A τ set on the calibration games meets other tasks in deployment, and the rate moves with them (on the
    quickstart the τ that escalated 0.194 of the validation games' live steps escalated 0.137 of the test games').
    The pacer starts at the calibrated τ and records every routed step's risk and decision; each `retune` sets τ
    to `paced_threshold` of the last `memory` of them: the τ that, among the risks the stream met, escalates B of
    the next steps, plus what earlier steps under- or over-spent, spread over `catch_up` steps (at least the next
    retune's). A short catch-up swings τ: made up within one wave of the quickstart's eval, a first wave at 0.04
    for B = 0.1 sent τ from 0.80 to 0.16 and back to 0.77, and those swings cost success at the same calls. Serve
    spreads it over `memory` steps; eval over the rest of its stream, so the whole stream still averages B.
    No labels, only the router's own risks and decisions. Serve retunes every `every` routed steps, per router
    replica (`serve.pace_every`, `serve.pace_memory`); eval's paced routers (`r2v.eval.live.play_paced`) after
    each wave of episodes, played in a fixed order, so their numbers reproduce. A paced router may route the same
    state differently later in the stream, so Serve paces only on request (`serve.pace_budget`)."""

    def __init__(self, tau: float, budget: float, every: int | None = None, memory: int | None = None):
        if not 0.0 <= budget <= 1.0:
            raise R2VError(f"pacing budget {budget} must be an LLM-call rate in [0, 1] (serve.pace_budget)")
        if not math.isfinite(tau) or (every is not None and every < 1) or (memory is not None and memory < 1):
            raise R2VError(f"pacing needs a finite threshold, and `every` / `memory` >= 1 steps when set "
                           f"(serve.pace_every, serve.pace_memory); got τ = {tau}, every = {every}, memory = {memory}")
        self.tau, self.budget, self.every = float(tau), float(budget), every
        # (risk, LLM call, asked: risk ≥ the τ it met) of the last `memory` routed steps
        self.recent: deque = deque(maxlen=memory)
        self.steps = self.escalations = self._since = 0

    def observe(self, risk: float, escalated: bool) -> float:
        """Record one routed step (a NaN risk counts as a step, not as a risk) and whether it was an LLM call;
        returns the τ for the next, retuned once `every` steps have passed since the last retune."""
        self.steps += 1
        self.escalations += int(bool(escalated))
        self.recent.append((float(risk), bool(escalated), bool(float(risk) >= self.tau)))
        self._since += 1
        if self.every is not None and self._since >= self.every:
            self.retune(self.every, catch_up=self.recent.maxlen)  # Serve: made up over the memory's steps
        return self.tau

    def retune(self, next_steps: float, catch_up: float | None = None) -> float:
        """Set τ for the next `next_steps` steps from the recorded ones (unchanged while none had a risk); the
        recorded steps' surplus or deficit is made up over `catch_up` steps (`paced_threshold`; None: the next
        steps)."""
        self._since = 0
        risks = np.fromiter((r for r, _, _ in self.recent), np.float64, len(self.recent))
        if np.isfinite(risks).any():
            calls, asked = sum(e for _, e, _ in self.recent), sum(a for _, _, a in self.recent)
            self.tau = paced_threshold(risks[np.isfinite(risks)], calls, len(self.recent), self.budget, next_steps,
                                       conversion(calls, asked), catch_up)
        return self.tau

    @property
    def rate(self) -> float:
        """The stream's LLM-call rate so far."""
        return self.escalations / self.steps if self.steps else 0.0


def conversion(calls: float, asked: float) -> float:
    """The share of the router's asks (risk ≥ τ) that became LLM calls: 1 unless asks are deferred
    (`router.grace`) or refused (a spent per-episode budget). 1 when nothing was asked yet."""
    return calls / asked if asked > 0 else 1.0


def ask_share(budget: float, conv: float) -> float:
    """The share of steps to ask for so that `budget` of them become LLM calls, at conversion `conv`."""
    return min(1.0, max(0.0, budget / conv)) if conv > 0 else 1.0


def paced_threshold(risks: Any, escalations: int, steps: int, budget: float, next_steps: float,
                    conv: float = 1.0, catch_up: float | None = None) -> float:
    """`BudgetPacer`'s step: among the risks a routed stream met, the τ that escalates `budget` of the next steps
    plus the share that makes up what the earlier ones under- or over-spent (`escalations` of `steps`) over
    `catch_up` steps (None or fewer than `next_steps`: over the next `next_steps`, so the running rate is B by
    then), clipped to [0, 1]. τ asks for that share over the stream's `conversion` (`conv`), since only that part
    of the asks become calls. At the fixed point, the quantile of the risks met under routing that spends B, as in
    `live_budget_search`."""
    horizon = max(float(next_steps), float(catch_up or 0.0), 1.0)
    share = budget + (budget * steps - escalations) / horizon
    return budget_threshold(risks, ask_share(min(1.0, max(0.0, share)), conv))


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


def live_tolerance(budget: float) -> float:
    """How close to its budget a calibrated live rate must come: ±max(0.015, 10% of B) on calibration games,
    half of what the evaluation accepts on held-out games (±max(0.03, 20% of B))."""
    return max(0.015, 0.1 * budget)


def live_budget_search(p_offline: dict[str, Any], budgets: dict[str, float],
                       measure: Callable[[dict[str, float]], dict[str, tuple[float, Any]]], rounds: int = 4
                       ) -> dict[str, dict[str, Any]]:
    """For every name, the τ at which routed episodes escalate `budgets[name]` of their steps.

    The live rate of a threshold is only known by playing routed episodes: `measure({name: τ})` returns
    {name: (rate, risks of every step played)}, all names of a round in one batch. A fixed-point iteration:
    start at the offline quantile τ_0 = budget_threshold(p_offline, B), then τ_{k+1} = the B-quantile of
    the risks the routed episodes of τ_k met (at the fixed point exactly B of the live steps have risk ≥ τ;
    where only part of the asks become calls, `router.grace`, the quantile that spends B: `_propose`),
    accelerated by the secant through the last two probes.
    The live rate falls as τ grows, so probes on both sides of B bracket the answer; a proposal outside the
    bracket is replaced by its midpoint. A name stops once |rate − B| ≤ live_tolerance(B), when τ repeats,
    or after `rounds`. Returns {name: {budget, tau, rate (the closest probe's), probes: [(τ, rate), ...]}}."""
    for name, b in budgets.items():
        if not 0.0 <= b <= 1.0:
            raise R2VError(f"budget {b} for {name} must be an LLM-call rate in [0, 1]")
    probes: dict[str, list[tuple[float, float]]] = {n: [] for n in budgets}
    taus = {n: budget_threshold(p_offline[n], b) for n, b in budgets.items()}
    for _ in range(max(1, rounds)):
        if not taus:
            break
        measured = measure(taus)
        nxt = {}
        for n, tau in taus.items():
            B = budgets[n]
            rate, risks = measured[n]
            probes[n].append((float(tau), float(rate)))
            if abs(rate - B) <= live_tolerance(B) or len(np.asarray(risks)) == 0:
                continue
            proposal = _bracketed(_propose(probes[n], risks, B), probes[n], B)
            if proposal not in {t for t, _ in probes[n]}:
                nxt[n] = proposal
        taus = nxt
    out = {}
    for n, B in budgets.items():
        tau, rate = min(probes[n], key=lambda p: (abs(p[1] - B), p[1]))
        out[n] = {"budget": float(B), "tau": tau, "rate": rate, "probes": probes[n]}
    return out


def _propose(probes: list[tuple[float, float]], risks: Any, budget: float) -> float:
    """The next τ: the quantile of the risks the last probe met that asks for B of the steps over the share of
    asks that became calls there (`conversion`; 1 without grace or caps): the fixed-point step. From the second
    probe on, the secant through the last two probes (capped at twice the fixed-point step) when it moves further
    the same way (the fixed-point steps approach B from one side, slowly, because escalating lowers the risks met
    later)."""
    tau, rate = probes[-1]
    risks = np.asarray(risks, np.float64)
    fixed = budget_threshold(risks, ask_share(budget, conversion(rate, float(np.mean(risks >= tau)))))
    if len(probes) < 2:
        return fixed
    (t0, r0), (t1, r1) = probes[-2], probes[-1]
    if r1 == r0 or t1 == t0:
        return fixed
    secant = t1 + (budget - r1) * (t1 - t0) / (r1 - r0)
    if (secant - t1) * (fixed - t1) <= 0 or abs(secant - t1) <= abs(fixed - t1):
        return fixed
    return float(t1 + min(2.0, (secant - t1) / (fixed - t1)) * (fixed - t1))  # at most twice the fixed step


def _bracketed(proposal: float, probes: list[tuple[float, float]], budget: float) -> float:
    """`proposal`, or the bracket's midpoint when it falls outside (τ_low, τ_high): the thresholds known to
    escalate too much and too little."""
    low = max((t for t, r in probes if r > budget), default=-math.inf)
    high = min((t for t, r in probes if r < budget), default=math.inf)
    if low < proposal < high or not (math.isfinite(low) and math.isfinite(high)):
        return float(proposal)
    return float((low + high) / 2)


__all__ = ["BudgetPacer", "live_budget_search", "conversion", "ask_share", "live_tolerance", "quantile_map",
           "apply_step_threshold", "bayes_threshold", "budget_threshold", "cvar_threshold", "calibrate", "realised_rate",
           "realised_cvar", "select_threshold", "above"]

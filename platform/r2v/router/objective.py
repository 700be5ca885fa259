"""The router's training objective as pure functions on torch tensors (unit-testable, no model inside).

    loss = mean cost(p) + λ·(CVaR_α(per-seed residual failure) − ε) + w_B·Brier(p, y)

The cost term makes escalation expensive; the CVaR term makes the model escalate the failures of the worst
perturbation seeds (tail risk, not just the average); the Brier term keeps p a probability. λ = softplus(ρ)
is a Lagrange multiplier raised by dual ascent while the constraint CVaR ≤ ε is violated.

A seed's failure under routing is the (weighted) mean over its steps of y·(1 − p): the failure left when each
step escalates with probability p. ε bounds it in absolute terms, so it only binds below the unrouted value
(p = 0: the seed's failure rate). Every mean takes optional per-row weights (rows that stand for several
steps, e.g. a sample of an episode's steps), so all terms estimate per-step quantities.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

RHO_MIN, RHO_MAX = -20.0, 20.0  # softplus(-20) ≈ 2e-9: λ is projected to "zero" without leaving softplus


def tail_count(n: int, alpha: float) -> int:
    """How many of n values the α-tail holds: ⌈α·n⌉, at least 1 (CVaR of an empty tail is undefined)."""
    if n <= 0:
        return 0
    return max(1, min(n, math.ceil(alpha * n - 1e-9)))


def cvar(values: torch.Tensor, alpha: float) -> torch.Tensor:
    """CVaR_α of a loss vector: the mean of its worst ⌈α·n⌉ entries (differentiable through top-k)."""
    if not 0 < alpha <= 1:
        raise ValueError(f"alpha must be in (0, 1], got {alpha}")
    values = values.reshape(-1)
    if values.numel() == 0:
        return values.new_zeros(())
    k = tail_count(values.numel(), alpha)
    return torch.topk(values, k).values.mean()


def weighted_mean(values: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Σ w·v / Σ w (plain mean without weights)."""
    values = values.reshape(-1)
    if weight is None:
        return values.mean()
    weight = weight.reshape(-1).to(values.dtype)
    return (values * weight).sum() / weight.sum().clamp_min(1e-12)


def per_group_residual_failure(p: torch.Tensor, y: torch.Tensor, group: torch.Tensor,
                               weight: torch.Tensor | None = None) -> torch.Tensor:
    """Per group (perturbation seed): the weighted mean over its steps of y·(1 − p), the failure the router
    leaves un-escalated. Returned in ascending group-id order; groups absent from `group` are absent here."""
    p, y = p.reshape(-1), y.reshape(-1).to(p.dtype)
    w = torch.ones_like(p) if weight is None else weight.reshape(-1).to(p.dtype)
    _, inverse = torch.unique(group.reshape(-1), return_inverse=True)
    n_groups = int(inverse.max().item()) + 1 if inverse.numel() else 0
    sums = torch.zeros(n_groups, dtype=p.dtype, device=p.device).index_add(0, inverse, w * y * (1.0 - p))
    totals = torch.zeros(n_groups, dtype=p.dtype, device=p.device).index_add(0, inverse, w)
    return sums / totals.clamp_min(1e-12)


def expected_cost(p: torch.Tensor, cost_llm: float, cost_slm: float, weight: torch.Tensor | None = None
                  ) -> torch.Tensor:
    """Mean per-step cost when a step escalates with probability p."""
    return weighted_mean(p * cost_llm + (1.0 - p) * cost_slm, weight)


def brier(p: torch.Tensor, y: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    return weighted_mean((p - y.to(p.dtype)) ** 2, weight)


def router_loss(
    p: torch.Tensor,
    y: torch.Tensor,
    group: torch.Tensor,
    lam: torch.Tensor | float,
    *,
    alpha: float,
    epsilon: float,
    cost_llm: float,
    cost_slm: float,
    brier_weight: float,
    weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """(loss to descend, parts as floats). λ enters as a constant: the model descends, the dual ascends.
    `weight` (per row, optional) weights every mean: cost, per-seed residual failure and Brier."""
    lam_t = torch.as_tensor(lam, dtype=p.dtype, device=p.device).detach()
    c = expected_cost(p, cost_llm, cost_slm, weight)
    tail = cvar(per_group_residual_failure(p, y, group, weight), alpha)
    b = brier(p, y, weight)
    loss = c + lam_t * (tail - epsilon) + brier_weight * b
    parts = {"loss": float(loss.detach()), "cost": float(c.detach()), "cvar": float(tail.detach()),
             "violation": float(tail.detach()) - epsilon, "brier": float(b.detach()), "lambda": float(lam_t)}
    return loss, parts


def dual_update(rho: float, violation: float, lr: float) -> float:
    """Dual ascent on the CVaR constraint: ρ += lr·(CVaR − ε), projected to [RHO_MIN, RHO_MAX], so that
    λ = softplus(ρ) rises while the constraint is violated and decays towards 0 once it holds."""
    return float(min(RHO_MAX, max(RHO_MIN, rho + lr * violation)))


def multiplier(rho: float) -> float:
    """λ = softplus(ρ) ≥ 0."""
    return float(F.softplus(torch.tensor(rho, dtype=torch.float64)))


__all__ = ["cvar", "tail_count", "weighted_mean", "per_group_residual_failure", "expected_cost", "brier", "router_loss",
           "dual_update", "multiplier", "RHO_MIN", "RHO_MAX"]

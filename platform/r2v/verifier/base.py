"""The verifier contract: score candidate next actions from a state, each in [0, 1] (higher = better step).

Verifiers rank the SLM's candidates, build DPO pairs and feed router features, so they share one small
interface. `context_from_row` rebuilds a StepContext from a STEPS_V1 row: recorded history holds past
actions only (their observations are not stored), and the row's observation is the last action's output.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from r2v.envs.base import Observation, Task
from r2v.errors import R2VError
from r2v.experiment import Experiment
from r2v.policies.base import Decision, StepContext

if TYPE_CHECKING:
    from r2v.config import R2VConfig


@runtime_checkable
class Verifier(Protocol):
    def score(self, ctx: StepContext, candidates: list[str]) -> list[float]: ...


def make_verifier(cfg: "R2VConfig", tasks: dict[str, Task] | None = None) -> Verifier:
    """The configured verifier for `cfg.env.name`: `rule` (no training) or `learned` (from disk).
    `tasks` (task_id -> Task) lets the code verifier find a problem's tests when a context lacks them."""
    from r2v.verifier.rules import rule_verifier

    kind = cfg.verifier.kind
    if kind == "rule":
        return rule_verifier(cfg.env.name, tasks=tasks, limits=sandbox_limits(cfg))
    if kind == "learned":
        from r2v.verifier.learned import LearnedVerifier

        return LearnedVerifier.load(Experiment(cfg).model("verifier"), tasks=tasks, device=cfg.verifier.device,
                                    limits=sandbox_limits(cfg))
    raise R2VError(f"`verifier.kind` = {kind!r} is not one of ['learned', 'rule']")


def sandbox_limits(cfg: "R2VConfig"):
    """The env's sandbox limits, capped so that scoring one candidate stays quick."""
    from r2v.sandbox import SandboxLimits

    lim = SandboxLimits.from_config(cfg.env.sandbox)
    lim.cpu_seconds, lim.wall_seconds = min(lim.cpu_seconds, 5), min(lim.wall_seconds, 10.0)
    return lim


def annotate(verifier: Verifier, ctx: StepContext, decision: Decision) -> Decision:
    """Fill `verifier_score` of the decision's candidates in place (one batched call) and return it."""
    if decision.candidates:
        scores = verifier.score(ctx, [c.text for c in decision.candidates])
        for cand, s in zip(decision.candidates, scores):
            cand.verifier_score = float(s)
    return decision


def context_from_row(row: dict[str, Any], max_steps: int = 30, task: Task | None = None) -> StepContext:
    """A StepContext from a STEPS_V1 row (history observations are unknown: empty strings)."""
    admissible = row.get("admissible")
    history = row.get("history")
    goal = row.get("goal") or ""
    obs = Observation(
        goal=goal, text=row.get("observation") or "",
        admissible=None if admissible is None else [str(a) for a in admissible],
        truncated=bool(row.get("observation_truncated") or False),
    )
    task = task or Task(str(row.get("task_id", "")), str(row.get("env", "")), goal)
    info = {"tool_failed": bool(row.get("tool_failed") or False),
            "perturbations": list(row.get("perturbation") if row.get("perturbation") is not None else [])}
    return StepContext(task, obs, [(str(a), "") for a in (history if history is not None else [])],
                       int(row.get("step") or 0), max_steps, info)


def clip01(x: float) -> float:
    return 0.0 if x < 0 else 1.0 if x > 1 else float(x)


def auroc(labels: list[int] | Any, scores: list[float] | Any) -> float | None:
    """Area under the ROC curve (Mann-Whitney, ties count half); None when one class is missing."""
    import numpy as np

    y = np.asarray(labels, dtype=bool)
    s = np.asarray(scores, dtype=float)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s))
    sorted_s = s[order]
    i = 0
    while i < len(s):  # average ranks over ties
        j = i
        while j + 1 < len(s) and sorted_s[j + 1] == sorted_s[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


__all__ = ["Verifier", "make_verifier", "annotate", "context_from_row", "auroc", "clip01"]

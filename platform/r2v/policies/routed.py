"""The routed agent: SLM candidates → verifier → router → the teacher when risk ≥ τ and budget is left.

The teacher's action is executed for real at an escalated step; whether the episode succeeds is only ever
what the environment says. A teacher failure degrades to the SLM's proposal with `escalation_error` set.
"""
from __future__ import annotations

from r2v.envs.base import Env, Task
from r2v.policies.base import Decision, StepContext
from r2v.router.baselines import ORACLE_KEY, Router
from r2v.router.features import FeatureTracker, features_by_name


def propose(decision: Decision, select: str) -> Decision:
    """The SLM's proposal among its scored candidates: the verifier's best (ties: higher log-prob), or
    simply the most likely one."""
    if select == "verifier" and decision.candidates and decision.candidates[0].verifier_score is not None:
        best = max(decision.candidates, key=lambda c: (c.verifier_score or 0.0, c.logprob))
        decision.candidates.sort(key=lambda c: c is not best)  # proposal first, the rest keep their order
        decision.action = best.text
    return decision


class RoutedAgent:
    """One episode at a time: call `reset` at the start (run_episode does) and `observe` after each step."""

    def __init__(self, slm, verifier, router: Router, teacher, select: str = "verifier",
                 budget_per_episode: int | None = None, name: str | None = None):
        self.slm, self.verifier, self.router, self.teacher = slm, verifier, router, teacher
        self.select = select
        self.budget = budget_per_episode
        self.name = name or f"routed:{router.name}"
        self.tracker = FeatureTracker()
        self.calls = 0

    def reset(self, task: Task) -> None:
        self.tracker = FeatureTracker()
        self.router.reset()
        self.calls = 0

    def observe(self, action: str, info: dict) -> None:
        self.tracker.update(action, info)

    def decide(self, ctx: StepContext, env: Env) -> Decision:
        from r2v.verifier.base import annotate

        d = self.slm.act([ctx])[0]
        if self.verifier is not None:
            annotate(self.verifier, ctx, d)
        d = propose(d, self.select)
        d.features = self.tracker.features(ctx, d)
        feats = features_by_name(d.features)
        if self.router.name == "oracle":
            feats[ORACLE_KEY] = float(d.action != env.oracle_action())
        d.risk = float(self.router.risk(feats))
        budget_left = self.budget is None or self.calls < self.budget
        if self.teacher is None or not budget_left or not self.router.escalate(feats):
            return d
        reply = self.teacher.act(ctx, env)
        d.escalated = True
        d.teacher_tokens = reply.tokens
        if reply.action:  # only a teacher action spends budget (as in Serve sessions); a failed call does not
            self.calls += 1
            d.action, d.actor = reply.action, "teacher"
        else:
            d.escalation_error = reply.error or "teacher returned no action"
        return d

"""The routed step, written once: SLM candidates → verifier → proposal → features → router → budget → teacher.

`routed_step` is the only implementation. Eval's `RoutedAgent` runs it with the local objects (plain calls,
driven without an event loop by `run_sync`); the Serve ingress awaits it with deployment handles. What a
step means, for both:

- `risk` is computed once per step (`route`), and the escalation compares that same value with τ;
- `escalated` = the router asked for the teacher (risk ≥ τ, or > τ for strict routers) **and** the budget
  allowed it, so the teacher was called. It stays true when the call failed: then `actor` is `slm`, the SLM's
  proposal is executed and `escalation_error` says why;
- an LLM call (what spends budget, what costs c_LLM, what eval counts) is a step whose `actor` is `teacher`:
  a failed teacher call spends nothing;
- `budget_exhausted`: the router asked but no budget was left (the teacher was not called);
- `deferred`: the router asked, but the proposal is one the agent can take back on its own (a move, a look, a
  read-only command: `reversible_action`) and the episode still had grace (`router.grace`): the SLM's proposal is
  executed and the router judges the next step afresh. A wrong move then costs steps, not an LLM call, unless
  the SLM does not find its way back; an irreversible proposal is never deferred;
- `redundant`: an LLM call whose action is the SLM's own proposal. It changed nothing, so the risk that asked
  for it is still there: with `router.carry` = n the next n steps are `carried`, escalated whatever their risk
  (no grace: the SLM just had its try), until a call changes the action (`carry_after`). In a loop the router
  often flags the step the SLM gets right; the carried call lands on the step it gets wrong.

The teacher's action is executed for real at an escalated step; whether the episode succeeds is only ever
what the environment says.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Coroutine, Optional

from r2v.envs.base import Env, Task
from r2v.policies.base import Decision, StepContext
from r2v.router.baselines import HINDSIGHT_KEY, ORACLE_KEY, STEP_KEY, Router, step_key
from r2v.router.features import FeatureTracker, features_by_name, normalise_action
from r2v.verifier.rules import reversible_action


def propose(decision: Decision, select: str) -> Decision:
    """The SLM's proposal among its scored candidates: the verifier's best (ties: higher log-prob), or
    simply the most likely one."""
    if select == "verifier" and decision.candidates and decision.candidates[0].verifier_score is not None:
        best = max(decision.candidates, key=lambda c: (c.verifier_score or 0.0, c.logprob))
        decision.candidates.sort(key=lambda c: c is not best)  # proposal first, the rest keep their order
        decision.action = best.text
    return decision


@dataclass
class Route:
    """A router's verdict on one step."""

    risk: float
    threshold: float
    escalate: bool
    router: str


def route(router: Router, features: dict[str, float]) -> Route:
    """Score once and compare that score with τ (calling `risk` then `escalate` would draw a random router
    twice and record a risk that did not decide)."""
    risk = float(router.risk(features))
    thr = float(router.threshold)
    return Route(risk, thr, bool(risk > thr if router.strict else risk >= thr), router.name)


@dataclass
class StepCalls:
    """The routed step's components as async callables: local objects wrapped (RoutedAgent) or Serve
    deployment handles (the ingress). `verify` may return None (no scores: route on the SLM's alone);
    `teacher` None means there is none to escalate to."""

    slm: Callable[[StepContext], Awaitable[Decision]]
    verify: Optional[Callable[[StepContext, list[str]], Awaitable[Optional[list[float]]]]]
    route: Callable[[dict[str, float], str], Awaitable[Route]]  # (features, proposed action)
    teacher: Optional[Callable[[StepContext], Awaitable[Any]]]  # -> TeacherReply (action, tokens, error)


@dataclass
class RoutedStep:
    """One routed step: the Decision (the step record's fields) plus what only a server reports."""

    decision: Decision
    threshold: float
    router: str
    budget_exhausted: bool = False
    deferred: bool = False  # the router asked, the proposal was reversible and grace was left: no call
    carried: bool = False  # escalated because an earlier call changed nothing (`router.carry`), whatever the risk
    redundant: bool = False  # an LLM call whose action is the SLM's own proposal

    @property
    def llm_call(self) -> bool:
        """The teacher's action is the one executed: this step spends budget and costs c_LLM."""
        return self.decision.actor == "teacher"


async def routed_step(ctx: StepContext, calls: StepCalls, tracker: FeatureTracker, select: str,
                      budget_left: int | None, grace_left: int = 0, carried: bool = False) -> RoutedStep:
    """Decide one step (module docstring). `budget_left` None = unlimited; `grace_left`: deferrals the episode
    may still make; `carried`: an earlier call changed nothing, so this step escalates whatever its risk. The
    caller updates `tracker` with the executed action afterwards, counts `llm_call` against its budget and
    `deferred` against its grace, and carries on with `carry_after`."""
    d = await calls.slm(ctx)
    if calls.verify is not None and d.candidates:
        scores = await calls.verify(ctx, [c.text for c in d.candidates])
        for cand, s in zip(d.candidates, scores or ()):
            cand.verifier_score = float(s)
    d = propose(d, select)
    d.features = tracker.features(ctx, d)
    r = await calls.route(features_by_name(d.features), d.action)
    d.risk = r.risk
    step = RoutedStep(d, r.threshold, r.router, carried=carried)
    if not (r.escalate or carried) or calls.teacher is None:
        return step
    if grace_left > 0 and not carried and reversible_action(ctx.task.env, d.action):
        step.deferred = True
        return step
    if budget_left is not None and budget_left <= 0:
        step.budget_exhausted = True
        return step
    d.escalated = True
    try:
        reply = await calls.teacher(ctx)
        action, tokens, error = reply.action, int(reply.tokens or 0), reply.error
    except Exception as e:  # noqa: BLE001 - a failed teacher call degrades to the SLM's proposal
        action, tokens, error = None, 0, f"{type(e).__name__}: {str(e)[:200]}"
    d.teacher_tokens = tokens
    if action:
        step.redundant = normalise_action(action) == normalise_action(d.action)
        d.action, d.actor = action, "teacher"
    else:
        d.escalation_error = error or "teacher returned no action"
    return step


def run_sync(coro: Coroutine[Any, Any, Any]) -> Any:
    """Run a coroutine whose awaits all complete at once (wrapped plain calls) without an event loop: a
    routed step inside a rollout actor pays no loop per step and works under any running loop."""
    try:
        coro.send(None)
    except StopIteration as done:
        return done.value
    coro.close()
    raise RuntimeError("run_sync: the coroutine suspended; await it in an event loop instead")


def _call(fn: Callable[..., Any]) -> Callable[..., Awaitable[Any]]:
    async def call(*args: Any) -> Any:
        return fn(*args)

    return call


def grace_for(router: Router, grace: int) -> int:
    """The deferrals per episode a router gets: `grace` (`router.grace`) or the grace its τ was set with
    (`Router.grace`, when a budget was not spendable with `grace`), except for the fixed references (SLM alone,
    LLM alone, the oracles), whose rule is the whole method."""
    if router.fixed:
        return 0
    return int(grace if router.grace is None else router.grace)


def carry_for(router: Router, carry: int) -> int:
    """The steps a call that changed nothing carries its escalation to (`router.carry`); none for the fixed
    references, whose rule is the whole method."""
    return 0 if router.fixed else int(carry)


def carry_after(llm_call: bool, redundant: bool, carry: int, owed: int) -> int:
    """The escalations still owed after a step (`owed` before it): a call that changed the action settles the
    risk; a call that changed nothing owes the next `carry` steps one; a carried step uses one up."""
    if llm_call and not redundant:
        return 0
    if owed:
        return owed - 1
    return carry if llm_call else 0


class RoutedAgent:
    """One episode at a time: call `reset` at the start (run_episode does) and `observe` after each step.
    `lookahead` (r2v.rollout.episode.Lookahead) is only for the hindsight router; `grace` (`router.grace`)
    deferrals per episode (`grace_for`); `carry` (`router.carry`) steps a call that changed nothing escalates."""

    def __init__(self, slm, verifier, router: Router, teacher, select: str = "verifier",
                 budget_per_episode: int | None = None, name: str | None = None, lookahead=None, grace: int = 0,
                 carry: int = 0):
        self.slm, self.verifier, self.router, self.teacher = slm, verifier, router, teacher
        self.select = select
        self.budget = budget_per_episode
        self.grace = grace_for(router, grace)
        self.carry = carry_for(router, carry)
        self.deferrals = self.owed = 0
        self.name = name or f"routed:{router.name}"
        self.lookahead = lookahead
        if router.needs_lookahead and lookahead is None:
            raise ValueError(f"router {router.name!r} needs a Lookahead (a private env to play branches in)")
        self.tracker = FeatureTracker()
        self.calls = 0
        self.task: Task | None = None
        self.executed: list[str] = []

    def reset(self, task: Task) -> None:
        self.tracker = FeatureTracker()
        self.router.reset()
        self.calls = self.deferrals = self.owed = 0
        self.task, self.executed = task, []

    def observe(self, action: str, info: dict) -> None:
        self.tracker.update(action, info)
        self.executed.append(action)

    def decide(self, ctx: StepContext, env: Env | None) -> Decision:
        def route_local(feats: dict[str, float], action: str) -> Route:
            if self.router.needs_oracle_action:
                feats[ORACLE_KEY] = float(action != env.oracle_action())
            if self.router.needs_step_key:
                feats[STEP_KEY] = step_key(ctx.task.task_id, ctx.seed, ctx.step)
            if self.router.needs_lookahead:
                feats[HINDSIGHT_KEY] = float(not self.lookahead.wins_from(ctx.task, ctx.seed, self.executed)
                                             and self._teacher_would_change(ctx, env, action))
            return route(self.router, feats)

        calls = StepCalls(
            slm=_call(lambda c: self.slm.act([c])[0]),
            verify=_call(self.verifier.score) if self.verifier is not None else None,
            route=_call(route_local),
            teacher=_call(lambda c: self.teacher.act(c, env)) if self.teacher is not None else None,
        )
        budget_left = None if self.budget is None else self.budget - self.calls
        step = run_sync(routed_step(ctx, calls, self.tracker, self.select, budget_left, self.grace - self.deferrals,
                                    carried=self.owed > 0))
        self.calls += int(step.llm_call)
        self.deferrals += int(step.deferred)
        self.owed = carry_after(step.llm_call, step.redundant, self.carry, self.owed)
        return step.decision

    def _teacher_would_change(self, ctx: StepContext, env: Env | None, action: str) -> bool:
        """Whether the teacher would act differently from the SLM here (the hindsight router spends no call
        on a step the teacher would take the same way: it leads to the same state)."""
        if self.teacher is None:
            return True
        return self.teacher.act(ctx, env).action != action


__all__ = ["propose", "route", "Route", "StepCalls", "RoutedStep", "routed_step", "run_sync", "grace_for", "carry_for",
           "carry_after", "RoutedAgent"]

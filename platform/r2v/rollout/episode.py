"""One episode, as plain Python: agent decides, env acts, every step becomes a step record.

Success is only what the environment reports at the end of the episode; it is copied to every row of the
episode as `episode_success`. Used by rollout actors, live evaluation and tests alike.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from r2v.envs.base import Env, Task
from r2v.policies.base import Agent, StepContext


@dataclass
class EpisodeMeta:
    experiment: str
    split: str
    policy: str  # name recorded in the shard: teacher | slm | routed:<router>
    seed: int  # perturbation seed
    episode_index: int = 0

    def episode_id(self, task: Task) -> str:
        return f"{task.task_id}/{self.policy}/s{self.seed}/e{self.episode_index}"


def run_episode(env: Env, agent: Agent, task: Task, meta: EpisodeMeta, max_steps: int,
                history_steps: int = 8) -> list[dict[str, Any]]:
    obs = env.reset(task, seed=meta.seed)
    if hasattr(agent, "reset"):
        agent.reset(task)
    history: list[tuple[str, str]] = []
    rows: list[dict[str, Any]] = []
    last_info: dict[str, Any] = dict(getattr(env, "reset_info", None) or {})  # perturbations of the first obs
    success, done, step = False, False, 0
    episode_id = meta.episode_id(task)
    while not done and step < max_steps:
        ctx = StepContext(task, obs, list(history), step, max_steps, last_info, meta.seed)
        oracle = _safe_oracle(env)
        t0 = time.perf_counter()
        decision = agent.decide(ctx, env)
        latency_ms = (time.perf_counter() - t0) * 1e3
        row = {
            "experiment": meta.experiment, "env": env.name, "task_id": task.task_id, "split": meta.split,
            "episode_id": episode_id, "policy": meta.policy, "perturbation_seed": meta.seed,
            "perturbation": list(last_info.get("perturbations", [])), "step": step, "goal": ctx.goal,
            "observation": obs.text, "observation_truncated": bool(obs.truncated),
            "admissible": list(obs.admissible) if obs.admissible is not None else None,
            "history": [a for a, _ in history[-history_steps:]], "action": decision.action,
            "actor": decision.actor, "oracle_action": decision.teacher_action or oracle,
            "candidates": [c.as_row() for c in decision.candidates], "entropy": decision.entropy,
            "features": decision.features, "risk": decision.risk, "escalated": decision.escalated,
            "escalation_error": decision.escalation_error, "tool_failed": bool(last_info.get("tool_failed", False)),
            "latency_ms": latency_ms, "teacher_tokens": decision.teacher_tokens,
        }
        if not decision.action:  # the acting policy had nothing to offer (e.g. teacher down): stop honestly
            row.update(reward=0.0, done=True)
            rows.append(row)
            break
        result = env.step(decision.action)
        if hasattr(agent, "observe"):
            agent.observe(decision.action, result.info)
        row.update(reward=float(result.reward), done=bool(result.done))
        rows.append(row)
        history.append((decision.action, result.observation.text))
        obs, last_info, done, success = result.observation, result.info, result.done, result.success
        step += 1
    for r in rows:
        r["episode_success"] = bool(success)
    return rows


def _safe_oracle(env: Env) -> str | None:
    try:
        return env.oracle_action()
    except Exception:  # an oracle that cannot plan from here is a missing label, not a crash
        return None


class BranchAgent:
    """A counterfactual branch of a recorded episode: replay its first actions (`prefix`, under the same
    perturbation seed the env reproduces the same states), let the teacher take the next `teacher_steps`
    steps, then hand back to `base` until the episode ends. With teacher_steps=0 it is the "SLM
    continues" branch."""

    def __init__(self, base: Agent, teacher, prefix: list[str], teacher_steps: int):
        self.base, self.teacher = base, teacher
        self.prefix, self.teacher_steps = list(prefix), teacher_steps
        self.name = f"branch:{getattr(base, 'name', 'agent')}"

    def reset(self, task: Task) -> None:
        if hasattr(self.base, "reset"):
            self.base.reset(task)

    def observe(self, action: str, info: dict) -> None:
        if hasattr(self.base, "observe"):
            self.base.observe(action, info)

    def decide(self, ctx: StepContext, env: Env):
        from r2v.policies.base import Decision

        if ctx.step < len(self.prefix):
            return Decision(action=self.prefix[ctx.step], actor="replay")
        if ctx.step < len(self.prefix) + self.teacher_steps:
            reply = self.teacher.act(ctx, env)
            return Decision(action=reply.action or "", actor="teacher", escalated=True,
                            escalation_error=reply.error, teacher_tokens=reply.tokens)
        return self.base.decide(ctx, env)


class Lookahead:
    """The hindsight oracle's view of the future: does `agent` (the SLM acting alone), put in the live episode's
    current state, win? It plays a counterfactual branch in a private env (same task, same perturbation seed,
    the live episode's actions replayed: the env reproduces the state, as for branch labels), never touching
    the live env. Its last branch is reused while the live episode stays on that branch's path (its executed
    actions are a prefix of the branch's), so an episode costs one branch plus one per escalation: off the
    path, only where the teacher acted, is a new one played."""

    def __init__(self, env: Env, agent: Agent, max_steps: int, history_steps: int = 8):
        self.env, self.agent, self.max_steps, self.history_steps = env, agent, max_steps, history_steps
        self._branch: tuple[str, int, list[str]] | None = None  # (task_id, seed, the branch's actions)
        self._won = False
        self.branches = 0

    def wins_from(self, task: Task, seed: int, executed: list[str]) -> bool:
        """Whether the agent wins when it takes over after the actions `executed` (under `seed`)."""
        if self._branch is not None:
            task_id, branch_seed, path = self._branch
            if (task_id, branch_seed) == (task.task_id, seed) and len(executed) < len(path) \
                    and path[:len(executed)] == executed:
                return self._won
        rows = run_episode(self.env, BranchAgent(self.agent, None, executed, 0), task,
                           EpisodeMeta("lookahead", "", "lookahead", seed), self.max_steps, self.history_steps)
        self._branch = (task.task_id, seed, [r["action"] for r in rows])
        self._won = bool(rows and rows[-1]["episode_success"])
        self.branches += 1
        return self._won

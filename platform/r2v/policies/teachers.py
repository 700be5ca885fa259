"""Teachers: the stronger policy a step is escalated to. One interface, three kinds.

- `oracle`: the environment's own oracle from the current state (TextWorld's re-planned walkthrough, a
  task's reference solution). Free, always available: the quickstart's teacher.
- `openai`: any OpenAI-compatible chat endpoint (vLLM, a hosted API). Retries with backoff on 5xx, 429,
  timeouts and malformed replies; a failure after the retries is *reported* (`error`), never raised, so a
  rollout records a failed escalation and goes on with the SLM's action.
- `hf`: a local Hugging Face model directory, greedy.
"""
from __future__ import annotations

import os
import random
import threading
import time
from dataclasses import dataclass
from typing import Protocol

from r2v.config import R2VConfig, TeacherConfig
from r2v.envs.base import Env
from r2v.errors import ConfigError
from r2v.policies.base import Decision, StepContext
from r2v.policies.prompts import parse_action, render_prompt

SYSTEM_PROMPT = (
    "You are an expert agent acting in a text environment. Reply with exactly one action on one line "
    "(for code tasks: `write` on the first line followed by the program), nothing else."
)


@dataclass
class TeacherReply:
    action: str | None
    tokens: int = 0
    latency_ms: float = 0.0
    error: str | None = None


class Teacher(Protocol):
    kind: str

    def act(self, ctx: StepContext, env: Env) -> TeacherReply: ...


class OracleTeacher:
    kind = "oracle"

    def act(self, ctx: StepContext, env: Env) -> TeacherReply:
        t0 = time.perf_counter()
        action = env.oracle_action()
        ms = (time.perf_counter() - t0) * 1e3
        if action is None:
            return TeacherReply(None, latency_ms=ms, error=f"env `{env.name}` has no oracle action in this state")
        return TeacherReply(action, latency_ms=ms)


class OpenAITeacher:
    """Chat completions over HTTP with retries; `max_concurrency` caps in-flight calls per process."""

    kind = "openai"
    RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}

    def __init__(self, cfg: TeacherConfig, history_steps: int = 4):
        import httpx

        if not cfg.base_url or not cfg.model:
            raise ConfigError("teacher.kind=openai needs `teacher.base_url` and `teacher.model`")
        self.cfg = cfg
        self.history_steps = history_steps
        headers = {}
        key = os.environ.get(cfg.api_key_env)
        if key:
            headers["Authorization"] = f"Bearer {key}"
        self._client = httpx.Client(base_url=cfg.base_url.rstrip("/"), headers=headers, timeout=cfg.timeout_s)
        self._slots = threading.BoundedSemaphore(max(1, cfg.max_concurrency))
        self.total_tokens = 0
        self.calls = 0

    def messages(self, ctx: StepContext) -> list[dict]:
        user = render_prompt(ctx, self.history_steps)
        if ctx.observation.admissible:
            user = "Valid actions: " + "; ".join(ctx.observation.admissible) + "\n" + user
        return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]

    def act(self, ctx: StepContext, env: Env) -> TeacherReply:
        import httpx

        body = {"model": self.cfg.model, "messages": self.messages(ctx), "temperature": 0.0, "max_tokens": 512}
        t0 = time.perf_counter()
        error = "no attempt made"
        for attempt in range(self.cfg.max_retries + 1):
            if attempt:
                time.sleep(min(4.0, 0.2 * 2 ** (attempt - 1)) * (0.5 + random.random()))
            try:
                with self._slots:
                    resp = self._client.post("/chat/completions", json=body)
            except httpx.TimeoutException:
                error = f"timeout after {self.cfg.timeout_s}s"
                continue
            except httpx.HTTPError as e:
                error = f"{type(e).__name__}: {e}"
                continue
            if resp.status_code != 200:
                error = f"HTTP {resp.status_code}: {resp.text[:200]}"
                if resp.status_code in self.RETRY_STATUS:
                    continue
                break
            try:
                data = resp.json()
                content = data["choices"][0]["message"]["content"]
                action = parse_action(content or "")
                if not action:
                    raise ValueError("empty action")
            except (ValueError, KeyError, IndexError, TypeError) as e:
                error = f"malformed reply ({type(e).__name__}: {e}): {resp.text[:200]}"
                continue
            tokens = int((data.get("usage") or {}).get("total_tokens") or 0)
            self.total_tokens += tokens
            self.calls += 1
            return TeacherReply(action, tokens, (time.perf_counter() - t0) * 1e3)
        return TeacherReply(None, 0, (time.perf_counter() - t0) * 1e3, error=error)

    def close(self) -> None:
        self._client.close()


class TeacherAgent:
    """A teacher acting on every step (the `teacher` rollout policy, the `llm_only` baseline). A teacher
    failure yields an empty action with its error; the episode loop records it and ends the episode as
    not successful (the env never said otherwise) rather than inventing an action.

    With `epsilon` > 0 the teacher explores: at that share of steps (seeded by task, seed and step) a random
    other admissible action is executed instead (actor `explore`), while the row keeps the teacher's choice
    as `oracle_action`. Behavioral cloning on those rows teaches recovery from off-path states (DAgger-style)."""

    name = "teacher"

    def __init__(self, teacher: Teacher, epsilon: float = 0.0):
        self.teacher = teacher
        self.epsilon = epsilon

    def decide(self, ctx: StepContext, env: Env) -> Decision:
        from r2v.envs.base import stable_seed

        reply = self.teacher.act(ctx, env)
        decision = Decision(action=reply.action or "", actor="teacher", escalated=True,
                            escalation_error=reply.error, teacher_tokens=reply.tokens)
        rng = random.Random(stable_seed("explore", ctx.task.task_id, ctx.seed, ctx.step))
        others = [a for a in (ctx.observation.admissible or []) if a != reply.action]
        if reply.action and others and rng.random() < self.epsilon:
            decision.action, decision.actor, decision.escalated = rng.choice(others), "explore", False
        return decision


def make_teacher(cfg: R2VConfig) -> Teacher:
    kind = cfg.teacher.kind
    if kind == "oracle":
        return OracleTeacher()
    if kind == "openai":
        return OpenAITeacher(cfg.teacher, cfg.policy.history_steps)
    if kind == "hf":
        from r2v.policies.slm import HFTeacher

        return HFTeacher(cfg)
    raise ConfigError(f"`teacher.kind` = {kind!r} is not one of oracle, openai, hf")

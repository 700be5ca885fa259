"""Multi-turn sessions: per-session history, feature tracker, LLM-call budget and cost. Plain Python.

The Serve app runs one `SessionStore` in a single-replica deployment, so every ingress replica sees the
same sessions. A step `acquire`s the session (a concurrent step on it gets 409), decides, and `release`s
the updated state. Sessions expire `ttl_s` after their last use.
"""
from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field
from typing import Any

from r2v.router.features import FeatureTracker

BUSY_TIMEOUT_S = 120.0  # a step whose ingress died does not lock its session forever


@dataclass
class SessionState:
    id: str
    goal: str
    task_id: str | None
    max_steps: int
    budget: int
    step: int = 0
    history: list[tuple[str, str]] = field(default_factory=list)
    pending_action: str | None = None  # the last decided action; its observation comes with the next step
    tracker: FeatureTracker = field(default_factory=FeatureTracker)
    llm_calls: int = 0
    deferrals: int = 0  # router escalations this session let the SLM try first (`router.grace`)
    owed: int = 0  # escalations a call that changed nothing carries to the next steps (`router.carry`)
    teacher_tokens: int = 0
    teacher_errors: int = 0
    cost: float = 0.0  # router cost units: c_slm per step + c_llm per LLM call (router.cost_*)
    cost_usd: float = 0.0  # teacher tokens × teacher.cost_per_1k_tokens / 1000
    created: float = field(default_factory=time.time)
    last_seen: float = field(default_factory=time.monotonic)
    busy_since: float | None = None

    @property
    def budget_left(self) -> int:
        return max(0, self.budget - self.llm_calls)

    def summary(self) -> dict[str, Any]:
        return {"session_id": self.id, "step": self.step, "llm_calls": self.llm_calls, "deferrals": self.deferrals,
                "budget": self.budget, "budget_left": self.budget_left, "teacher_tokens": self.teacher_tokens,
                "teacher_errors": self.teacher_errors, "cost": round(self.cost, 6),
                "cost_usd": round(self.cost_usd, 6)}


class SessionError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


class SessionStore:
    def __init__(self, ttl_s: float, max_sessions: int):
        self.ttl_s, self.max_sessions = float(ttl_s), int(max_sessions)
        self.sessions: dict[str, SessionState] = {}

    def _expire(self) -> None:
        now = time.monotonic()
        dead = [k for k, s in self.sessions.items() if s.busy_since is None and now - s.last_seen > self.ttl_s]
        for k in dead:
            del self.sessions[k]

    def create(self, goal: str, task_id: str | None, max_steps: int, budget: int) -> dict[str, Any]:
        self._expire()
        if len(self.sessions) >= self.max_sessions:
            raise SessionError(429, f"too many open sessions ({self.max_sessions}, serve.max_sessions); "
                                    f"DELETE finished sessions or wait for them to expire")
        sid = secrets.token_urlsafe(16)
        self.sessions[sid] = SessionState(sid, goal, task_id, max_steps, budget)
        return {**self.sessions[sid].summary(), "expires_in_s": self.ttl_s}

    def _get(self, sid: str) -> SessionState:
        self._expire()
        s = self.sessions.get(sid)
        if s is None:
            raise SessionError(404, f"session {sid!r} is unknown or expired (sessions expire after "
                                    f"{self.ttl_s:g}s without a step); create a new one")
        return s

    def acquire(self, sid: str) -> SessionState:
        s = self._get(sid)
        now = time.monotonic()
        if s.busy_since is not None and now - s.busy_since < BUSY_TIMEOUT_S:
            raise SessionError(409, f"session {sid!r} is already taking a step; send steps one at a time")
        s.busy_since = now
        return s

    def release(self, state: SessionState | None, sid: str | None = None) -> None:
        """Store the updated state (None: unlock `sid` unchanged, after a failed step)."""
        key = state.id if state is not None else sid
        if key not in self.sessions:  # deleted while stepping
            return
        if state is not None:
            self.sessions[key] = state
        s = self.sessions[key]
        s.busy_since = None
        s.last_seen = time.monotonic()

    def delete(self, sid: str) -> dict[str, Any]:
        s = self._get(sid)
        del self.sessions[sid]
        return {**s.summary(), "deleted": True}

    def count(self) -> int:
        self._expire()
        return len(self.sessions)


__all__ = ["SessionState", "SessionStore", "SessionError"]

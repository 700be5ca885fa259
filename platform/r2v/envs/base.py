"""The text-environment contract every r2v environment implements.

Plain Python, no Ray: an env is reset on a task under a perturbation seed, stepped with text actions, and
can say what its oracle (the teacher) would do from the *current* state. Success is only ever what the
environment reports.
"""
from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable


@dataclass
class Task:
    """One unit of work: a TextWorld game, a HumanEval problem, a terminal task."""

    task_id: str
    env: str
    goal: str = ""
    payload: dict[str, Any] = field(default_factory=dict)  # env-specific: game path, prompt, task dir...


@dataclass
class Observation:
    """What the agent sees. `text` is exactly what is shown to the agent (after perturbations)."""

    goal: str
    text: str
    admissible: list[str] | None = None  # None where the env has no closed action set
    truncated: bool = False


@dataclass
class StepResult:
    observation: Observation
    reward: float
    done: bool
    success: bool  # as reported by the environment; False until it says otherwise
    # bookkeeping for step records and analysis (tool_failed, perturbations, ...); an agent, its router
    # features and its verifier see only `observation` (r2v.policies.observed)
    info: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class Env(Protocol):
    """`reset` → `step`* until done. `oracle_action` re-plans from the current state (None if no oracle)."""

    name: str

    def reset(self, task: Task, seed: int = 0) -> Observation: ...

    def step(self, action: str) -> StepResult: ...

    def oracle_action(self) -> str | None: ...

    def close(self) -> None: ...


def stable_seed(*parts: Any) -> int:
    """A seed that is the same on every machine and Python process (unlike `hash`)."""
    digest = hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little")


def split_tasks(task_ids: list[str], fractions: tuple[float, float, float], seed: int) -> dict[str, list[str]]:
    """Deterministic train/val/test split by task id: ids are ordered by a seeded hash and cut by the
    fractions, so every split gets its share even for a handful of tasks, on every machine."""
    if len(fractions) != 3 or min(fractions) < 0 or abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(f"split fractions must be three non-negative numbers summing to 1, got {fractions}")
    order = sorted(set(task_ids), key=lambda tid: stable_seed("split", seed, tid))
    n = len(order)
    n_val = round(fractions[1] * n)
    n_test = round(fractions[2] * n)
    n_train = n - n_val - n_test
    return {
        "train": sorted(order[:n_train]),
        "val": sorted(order[n_train : n_train + n_val]),
        "test": sorted(order[n_train + n_val :]),
    }

"""What an agent sees at a step and what it decides. Plain Python, shared by rollouts, eval and serve."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from r2v.envs.base import Env, Observation, Task


@dataclass
class StepContext:
    task: Task
    observation: Observation
    history: list[tuple[str, str]]  # (action, observation text) of earlier steps, oldest first
    step: int
    max_steps: int
    last_info: dict[str, Any] = field(default_factory=dict)
    seed: int = 0  # the episode's perturbation seed (seeds per-step randomness, e.g. teacher exploration)

    @property
    def goal(self) -> str:
        return self.observation.goal or self.task.goal


@dataclass
class Candidate:
    text: str
    logprob: float  # summed token log-prob under the SLM
    mean_logprob: float
    verifier_score: float | None = None

    def as_row(self) -> dict[str, Any]:
        return {"text": self.text, "logprob": self.logprob, "mean_logprob": self.mean_logprob,
                "verifier_score": self.verifier_score}


@dataclass
class Decision:
    action: str
    actor: str  # slm | teacher
    candidates: list[Candidate] = field(default_factory=list)
    entropy: float | None = None
    features: list[float] | None = None
    risk: float | None = None
    escalated: bool = False
    escalation_error: str | None = None
    teacher_tokens: int = 0
    teacher_action: str | None = None  # the teacher's choice where it was asked but did not act (SLM-state pair probes)


class Agent(Protocol):
    """Decides one step. `env` is passed for oracle teachers, which re-plan from the env's true state."""

    name: str

    def decide(self, ctx: StepContext, env: Env) -> Decision: ...

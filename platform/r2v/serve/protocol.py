"""The HTTP API's request bodies and how they become a StepContext. Plain Python (pydantic), no Ray.

`POST /v1/act` (stateless) body::

    {"goal": "find the key", "observation": "You are in a kitchen...",
     "admissible": ["go north", "take key"],          # optional: rank these (policy.mode=rank)
     "history": ["open door", {"action": "go east", "observation": "You are in a hall."}],
     "step": 2, "max_steps": 30,                        # optional; step defaults to len(history)
     "info": {"tool_failed": false}, "observation_truncated": false, "mode": "routed"}

History items are past actions (a string) or {action, observation} objects, oldest first. `mode`:
`routed` (SLM → verifier → router → teacher) or `slm` (the SLM's likeliest candidate alone).

`POST /v1/chat/completions` with model `r2v-routed` (or `r2v-slm`) reads the conversation as the agent's
context (`context_from_messages`):
- goal: the system message(s); without one, the first user message;
- observation: the last user message; a line `Valid actions: a; b; c` in it gives the admissible actions
  (the format r2v's own OpenAI teacher sends), as does an extra top-level `admissible` list;
- history: each earlier assistant message is a past action, paired with the user message that follows it.
"""
from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

from r2v.envs.base import Observation, Task
from r2v.policies.base import StepContext

MAX_TEXT = 100_000  # per field; the request-size limit is the real bound


class HistoryItem(BaseModel):
    model_config = ConfigDict(extra="forbid")
    action: str = Field(max_length=MAX_TEXT)
    observation: str = Field(default="", max_length=MAX_TEXT)


class StepInfo(BaseModel):
    model_config = ConfigDict(extra="allow")
    tool_failed: bool = False


class ActRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    goal: str = Field(default="", max_length=MAX_TEXT)
    observation: str = Field(max_length=MAX_TEXT)
    admissible: Optional[list[str]] = Field(default=None, max_length=1000)
    history: list[Union[str, HistoryItem]] = Field(default_factory=list)
    step: Optional[int] = Field(default=None, ge=0)
    max_steps: Optional[int] = Field(default=None, ge=1)
    task_id: Optional[str] = Field(default=None, max_length=512)
    info: StepInfo = Field(default_factory=StepInfo)
    observation_truncated: bool = False
    mode: Literal["routed", "slm"] = "routed"


class SessionCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    goal: str = Field(default="", max_length=MAX_TEXT)
    task_id: Optional[str] = Field(default=None, max_length=512)
    max_steps: Optional[int] = Field(default=None, ge=1)
    budget: Optional[int] = Field(default=None, ge=0)  # at most serve.session_budget


class SessionStep(BaseModel):
    """The observation after the previous action (or the first one), plus that action's step info."""

    model_config = ConfigDict(extra="forbid")
    observation: str = Field(max_length=MAX_TEXT)
    admissible: Optional[list[str]] = Field(default=None, max_length=1000)
    info: StepInfo = Field(default_factory=StepInfo)
    observation_truncated: bool = False
    mode: Literal["routed", "slm"] = "routed"


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: Union[str, list[dict[str, Any]], None] = None


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="allow")  # temperature, max_tokens, ...: accepted and ignored
    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    admissible: Optional[list[str]] = Field(default=None, max_length=1000)
    stream: bool = False
    n: int = 1


def history_pairs(items: list[Union[str, HistoryItem]]) -> list[tuple[str, str]]:
    return [(it, "") if isinstance(it, str) else (it.action, it.observation) for it in items]


def make_context(goal: str, observation: str, admissible: list[str] | None, history: list[tuple[str, str]],
                 step: int | None, max_steps: int, env_name: str, task_id: str | None = None,
                 info: dict[str, Any] | None = None, truncated: bool = False) -> StepContext:
    obs = Observation(goal=goal, text=observation, admissible=list(admissible) if admissible else None,
                      truncated=truncated)
    task = Task(task_id or "serve", env_name, goal)
    return StepContext(task, obs, history, len(history) if step is None else step, max_steps, dict(info or {}))


def context_from_act(req: ActRequest, env_name: str, default_max_steps: int) -> StepContext:
    return make_context(req.goal, req.observation, req.admissible, history_pairs(req.history), req.step,
                        req.max_steps or default_max_steps, env_name, req.task_id, req.info.model_dump(),
                        req.observation_truncated)


def message_text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "\n".join(str(p.get("text", "")) for p in content if isinstance(p, dict) and p.get("type", "text") == "text")


VALID_PREFIX = "valid actions:"


def split_valid_actions(text: str) -> tuple[str, list[str] | None]:
    """(text without a `Valid actions: a; b` line, the actions) — the teacher prompt's own format."""
    keep, actions = [], None
    for line in text.splitlines():
        if actions is None and line.strip().lower().startswith(VALID_PREFIX):
            actions = [a.strip() for a in line.strip()[len(VALID_PREFIX):].split(";") if a.strip()]
        else:
            keep.append(line)
    return "\n".join(keep).strip(), actions


def context_from_messages(req: ChatRequest, env_name: str, max_steps: int) -> StepContext:
    """The agent context a chat conversation encodes (module docstring). Raises ValueError when there is
    no user message."""
    msgs = [(m.role, message_text(m.content)) for m in req.messages]
    system = [t for r, t in msgs if r in ("system", "developer")]
    turns = [(r, t) for r, t in msgs if r in ("user", "assistant")]
    users = [i for i, (r, _) in enumerate(turns) if r == "user"]
    if not users:
        raise ValueError("the conversation needs at least one user message (the current observation)")
    last = users[-1]
    if system:
        goal = "\n".join(system)
        first = 0
    else:
        goal = turns[users[0]][1]
        first = users[0] + 1 if len(users) > 1 else users[0]
    history: list[tuple[str, str]] = []
    for i in range(first, last):
        role, text = turns[i]
        if role == "assistant":
            nxt = turns[i + 1][1] if i + 1 <= last and turns[i + 1][0] == "user" else ""
            history.append((text.strip(), split_valid_actions(nxt)[0]))
    observation, admissible = split_valid_actions(turns[last][1])
    if req.admissible:
        admissible = list(req.admissible)
    if not system and len(users) == 1:
        goal = split_valid_actions(goal)[0]
    return make_context(goal, observation, admissible, history, None, max_steps, env_name)


__all__ = ["ActRequest", "SessionCreate", "SessionStep", "ChatRequest", "ChatMessage", "HistoryItem",
           "context_from_act", "context_from_messages", "make_context", "history_pairs", "split_valid_actions"]

"""The one prompt template every policy (SLM, HTTP teacher, serve) renders a step with.

Short on purpose: the quickstart SLM has a few hundred tokens of context. The action is the completion
that follows `Action:`; training puts the loss on its tokens only. Rollouts record the goal, the past
actions and the observation of every step, so a recorded step renders to exactly the prompt the policy saw.
"""
from __future__ import annotations

from r2v.policies.base import StepContext

ACTION_MARKER = "\nAction:"


def _clip(text: str, limit: int) -> str:
    text = " ".join(text.split()) if limit < 400 else text.strip()
    return text if len(text) <= limit else text[: limit - 3] + "..."


def render_prompt(ctx: StepContext, history_steps: int = 4, obs_chars: int = 600) -> str:
    return format_prompt(ctx.goal, [a for a, _ in ctx.history], ctx.observation.text, history_steps, obs_chars)


def prompt_from_row(row: dict, history_steps: int = 4, obs_chars: int = 600) -> str:
    """The prompt of a recorded step (a row of the `steps` schema): the same text the policy saw."""
    history = row.get("history")
    return format_prompt(row.get("goal") or "", [] if history is None else list(history),
                         row.get("observation") or "", history_steps, obs_chars)


def format_prompt(goal: str, past_actions: list[str], observation: str, history_steps: int = 4,
                  obs_chars: int = 600) -> str:
    """Goal, the last `history_steps` actions, the current observation, then the action marker."""
    lines = [f"Goal: {_clip(goal, 1200)}"]
    recent = past_actions[-history_steps:] if history_steps > 0 else []
    if recent:
        lines.append("Recent: " + " | ".join(recent))
    lines.append(f"Observation: {_clip(observation, obs_chars)}")
    return "\n".join(lines) + ACTION_MARKER


def completion(action: str) -> str:
    """The text the policy is trained to produce after the prompt."""
    return " " + action.strip()


def parse_action(text: str) -> str:
    """An action from free text (SLM generation or an LLM reply): the first non-empty line, without
    quotes, backticks or an echoed `Action:` prefix. Multi-line actions (code) are kept whole when they
    start with a keyword line such as `write`."""
    text = text.strip().strip("`").strip()
    if text.lower().startswith("action:"):
        text = text[len("action:"):].strip()
    if text.split("\n", 1)[0].strip().lower() == "write":
        return text
    first = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    return first.strip("'\"`").strip()


def encode_pair(tokenizer, prompt: str, completion_text: str, max_tokens: int) -> tuple[list[int], int]:
    """Token ids of prompt + completion + eos and the number of prompt tokens. The prompt is cut from the
    left so the whole fits in `max_tokens` (the goal may be lost, the action never is). Training and
    scoring both use this, so a model is scored on exactly the token split it was trained on."""
    p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    c = tokenizer(completion_text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    c = c[:max_tokens - 1]
    keep = max(1, max_tokens - len(c))
    p = p[-keep:]
    return p + c, len(p)

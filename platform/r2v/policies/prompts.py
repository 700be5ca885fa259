"""The one prompt template every policy (SLM, HTTP teacher, serve) renders a step with.

Short on purpose: the quickstart SLM has a few hundred tokens of context. The action is the completion
that follows `Action:`; training puts the loss on its tokens only. Rollouts record the goal, the past
actions and the observation of every step, so a recorded step renders to exactly the prompt the policy saw.

The rendered text is the one stored form of a prompt (pairs, BC examples). `encode_pair`/`encode_prompt`
turn it into tokens for the model at hand: a tokenizer without a chat template gets the text as it is (cut
from the left to fit); one with a chat template (instruct models) gets system = rules + goal, user = recent
actions + observation, assistant = the action, and a prompt over budget loses the middle of its
observation, never the goal, the rules or the action.
"""
from __future__ import annotations

from r2v.policies.base import StepContext

ACTION_MARKER = "\nAction:"


SYSTEM_RULES = ("You are an agent acting in an interactive environment to reach the goal below. Each turn you "
                "see your recent actions and the latest observation. Reply with exactly one action (a single "
                "command) and nothing else.")
TRUNCATED = " [...] "
# With a chat template the prompt's budget leaves room for an action of this many tokens whatever the action,
# so every short action of a step follows the same prompt tokens (one shared prefix to score them from).
ACTION_TOKENS = 32


def _clip(text: str, limit: int) -> str:
    """`limit` characters at most (0 = no cut)."""
    text = " ".join(text.split()) if 0 < limit < 400 else text.strip()
    return text if limit <= 0 or len(text) <= limit else text[: limit - 3] + "..."


def prompt_chars(policy_cfg) -> dict[str, int]:
    """The character cuts of `policy` (observation_chars, goal_chars) as format_prompt keywords."""
    return {"obs_chars": int(policy_cfg.observation_chars), "goal_chars": int(policy_cfg.goal_chars)}


def render_prompt(ctx: StepContext, history_steps: int = 4, obs_chars: int = 600, goal_chars: int = 1200) -> str:
    return format_prompt(ctx.goal, [a for a, _ in ctx.history], ctx.observation.text, history_steps, obs_chars,
                         goal_chars)


def prompt_from_row(row: dict, history_steps: int = 4, obs_chars: int = 600, goal_chars: int = 1200) -> str:
    """The prompt of a recorded step (a row of the `steps` schema): the same text the policy saw."""
    history = row.get("history")
    return format_prompt(row.get("goal") or "", [] if history is None else list(history),
                         row.get("observation") or "", history_steps, obs_chars, goal_chars)


def format_prompt(goal: str, past_actions: list[str], observation: str, history_steps: int = 4,
                  obs_chars: int = 600, goal_chars: int = 1200) -> str:
    """Goal, the last `history_steps` actions, the current observation, then the action marker."""
    lines = [f"Goal: {_clip(goal, goal_chars)}"]
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


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def split_prompt(prompt: str) -> tuple[str, str]:
    """(goal, context) of a prompt rendered by `format_prompt`: context = the `Recent:`/`Observation:` lines,
    without the action marker. A goal that itself contains such a line is split there (harmless: that part
    then shows in the user message)."""
    body = prompt[: -len(ACTION_MARKER)] if prompt.endswith(ACTION_MARKER) else prompt
    if not body.startswith("Goal: "):
        return "", body
    cuts = [i for i in (body.find("\nRecent: "), body.find("\nObservation: ")) if i >= 0]
    end = min(cuts) if cuts else len(body)
    return body[len("Goal: "): end], body[end + 1:]


def chat_messages(goal: str, context: str) -> list[dict[str, str]]:
    """system = rules + goal, user = recent actions + observation (the assistant turn is the action)."""
    return [{"role": "system", "content": f"{SYSTEM_RULES}\n\nGoal: {goal}"}, {"role": "user", "content": context}]


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def cut_middle(tokenizer, text: str, keep_tokens: int) -> str:
    """`text` cut to about `keep_tokens` tokens by dropping its middle: the first third and the last two
    thirds of the budget are kept (the end of an observation is usually the newest output)."""
    ids = _ids(tokenizer, text)
    if len(ids) <= keep_tokens:
        return text
    keep = max(0, keep_tokens)
    head = keep // 3
    tail = keep - head
    return (tokenizer.decode(ids[:head]) + TRUNCATED + (tokenizer.decode(ids[-tail:]) if tail else "")).strip()


def _chat_ids(tokenizer, goal: str, context: str) -> list[int]:
    text = tokenizer.apply_chat_template(chat_messages(goal, context), add_generation_prompt=True, tokenize=False)
    return _ids(tokenizer, text)


def encode_prompt(tokenizer, prompt: str, budget: int) -> list[int]:
    """The prompt's token ids within `budget` tokens. No chat template: the rendered text cut from the left
    (as always). Chat template: the middle of the user message (history + observation) is cut until the
    whole fits; only if the goal alone is over budget is its middle cut too; the generation prompt stays."""
    budget = max(1, budget)
    if not has_chat_template(tokenizer):
        return _ids(tokenizer, prompt)[-budget:]
    goal, context = split_prompt(prompt)
    ids = _chat_ids(tokenizer, goal, context)
    for _ in range(6):  # re-tokenising a cut text can differ by a token or two: converge in a few rounds
        over = len(ids) - budget
        if over <= 0:
            return ids
        n_ctx = len(_ids(tokenizer, context))
        if n_ctx - over - 8 >= 16:  # cut the observation (8 tokens of slack for the marker and joins)
            context = cut_middle(tokenizer, context, n_ctx - over - 8)
        else:  # the goal alone is too long: keep 16 tokens of context and cut the goal as well
            context = cut_middle(tokenizer, context, 16)
            n_goal = len(_ids(tokenizer, goal))
            goal = cut_middle(tokenizer, goal, max(8, n_goal - over - 8))
        ids = _chat_ids(tokenizer, goal, context)
    return ids[-budget:]  # degenerate budgets only: keep the end (the generation prompt)


def encode_pair(tokenizer, prompt: str, completion_text: str, max_tokens: int) -> tuple[list[int], int]:
    """Token ids of prompt + completion + eos and the number of prompt tokens, within `max_tokens` (the
    action is never cut; the prompt is, see `encode_prompt`). With a chat template the completion is the
    assistant turn: the action's tokens, then eos (the template's end-of-turn token). Training and scoring
    both use this, so a model is scored on exactly the token split it was trained on."""
    return encode_pairs(tokenizer, prompt, [completion_text], max_tokens)[0]


def encode_pairs(tokenizer, prompt: str, completions: list[str], max_tokens: int) -> list[tuple[list[int], int]]:
    """`encode_pair` of each completion after one prompt, encoding the prompt once per distinct budget."""
    chat = has_chat_template(tokenizer)
    reserve = min(ACTION_TOKENS, max_tokens // 4) if chat else 0
    prompts: dict[int, list[int]] = {}
    out = []
    for text in completions:
        c = (_ids(tokenizer, text.strip() if chat else text) + [tokenizer.eos_token_id])[: max_tokens - 1]
        budget = max(1, max_tokens - max(len(c), reserve))
        if budget not in prompts:
            prompts[budget] = encode_prompt(tokenizer, prompt, budget)
        out.append((prompts[budget] + c, len(prompts[budget])))
    return out

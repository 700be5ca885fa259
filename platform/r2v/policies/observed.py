"""What an agent can tell about its last steps from what it was shown, and nothing else.

A deployed agent sees observation texts and its own actions; it never sees the env's or the perturbation
wrapper's bookkeeping (`info["tool_failed"]` is also True for a *silent* stale output). Router features and
rule verifiers read tool trouble only through `observed_step`, so they compute the same values at
deployment as on perturbed training rollouts.
"""
from __future__ import annotations

import re

# Signs of a failed tool call that are printed in the observation: the perturbation wrapper's errors
# ("Error: ...", "[output interrupted]"), the terminal env's status line, the code env's harness messages.
TOOL_ERROR = re.compile(
    "|".join([
        r"^\s*(?:error|fatal)\b",  # a line that starts with an error
        r"\[exit code -?(?!0\])\d+\]",  # terminal: non-zero exit status
        r"\[timed out after\b|\btimed out\b",
        r"\[output interrupted\]",
        r"traceback \(most recent call last\)",
        r"\bexited \(code [1-9]|\bwas killed \(signal|\bsandbox failed\b|\(infinite loop or too slow\)",
    ]),
    re.IGNORECASE | re.MULTILINE,
)


def shows_tool_error(text: str | None) -> bool:
    """The observation itself says a tool call failed (error line, non-zero exit code, timeout, cut output)."""
    return bool(text) and TOOL_ERROR.search(text) is not None


def _norm(action: str | None) -> str:
    return " ".join(str(action or "").lower().split())


def observed_step(action: str, shown: str | None, before: str | None, before_action: str | None) -> dict[str, bool]:
    """The agent's view of one executed step: `action` produced `shown`; `before` is the text it saw just
    before (None when unknown) and `before_action` the action that produced `before` (None at the start).

    - tool_error: the shown text reports a failure.
    - repeated: the shown text is identical to the previous one although the action changed, which is
      all a stale tool output looks like from the agent's side (an unknown text counts as not repeated).
    Takes no `info` dict on purpose: every input is something the agent was shown or did."""
    repeated = bool(shown) and bool(before) and shown == before and _norm(action) != _norm(before_action)
    return {"tool_error": shows_tool_error(shown), "repeated": repeated}


__all__ = ["TOOL_ERROR", "shows_tool_error", "observed_step"]

"""Step features the router reads: a versioned, ordered list of floats per SLM proposal.

The order is the contract between rollouts (which write `features` + `feature_spec` into router rows), the
risk model (whose checkpoint stores the spec it was trained on) and serving. Change a feature → bump
FEATURE_VERSION, so an old checkpoint refuses new rows instead of silently mis-reading them.
Every input is something the agent saw or did: the step context's texts, the SLM's candidates and the
executed actions. Never the env's step `info` (the perturbation wrapper's `tool_failed` is True for silent
stale outputs too): look-back signals come from `r2v.policies.observed.observed_step` alone.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

from r2v.errors import R2VError
from r2v.policies.base import Decision, StepContext
from r2v.policies.observed import observed_step

FEATURE_VERSION = "r2v-features@2"

FEATURE_NAMES: tuple[str, ...] = (
    "entropy",  # policy entropy over actions (rank) or first token (generate)
    "verifier_best",
    "verifier_worst",
    "verifier_mean",
    "verifier_std",
    "verifier_spread",  # best − worst
    "logprob_best",  # summed log-prob of the most likely candidate
    "logprob_mean",
    "logprob_std",
    "logprob_margin",  # top-1 minus top-2 summed log-prob; 0 with one candidate (PITFALLS: strongest signal)
    "mean_logprob_best",  # per-token log-prob: comparable across action lengths
    "mean_logprob_margin",
    "top_prob",  # softmax mass of the most likely candidate among the candidates
    "candidate_agreement",  # share of candidates equal (normalised) to the proposal; 1/K when all differ
    "verifier_policy_agree",  # 1 when the verifier's best is also the most likely candidate
    "n_candidates",
    "step",
    "horizon_frac",  # step / max_steps
    "context_chars_log1p",  # log(1 + chars of observation + history)
    "goal_chars_log1p",
    "recent_tool_error",  # either of the last 2 executed steps showed a tool error (observed_step)
    "observation_truncated",
    "verifier_trend",  # best verifier score now − mean best of the last 3 steps (0 at the first step)
    "repeated_action_count",  # times the proposed action was already taken in this episode
    # the decision itself: the proposal the router accepts or overrides (after `propose`)
    "verifier_proposal",  # verifier score of the proposed action
    "verifier_proposal_gap",  # best candidate's verifier score − the proposal's (0 when it is the best)
    "proposal_prob",  # softmax mass of the proposal's text among the candidates (STEER's step confidence)
    "proposal_logprob_margin",  # proposal's log-prob − the best other candidate's; 0 without another text
    "observation_repeated",  # the last action's output repeated the one before, though the action changed
)
FEATURE_INDEX = {name: i for i, name in enumerate(FEATURE_NAMES)}
NEUTRAL_VERIFIER = 0.5  # a candidate the verifier did not score is neither good nor bad


def normalise_action(text: str) -> str:
    return " ".join(str(text).lower().split())


def _mean_std(xs: Sequence[float]) -> tuple[float, float]:
    m = sum(xs) / len(xs)
    return m, math.sqrt(sum((x - m) ** 2 for x in xs) / len(xs))


def _finite(x: Any, default: float = 0.0) -> float:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return default
    return v if math.isfinite(v) else default


def _entropy(logprobs: Sequence[float]) -> float:
    m = max(logprobs)
    ws = [math.exp(x - m) for x in logprobs]
    z = sum(ws)
    return -sum(w / z * math.log(w / z) for w in ws if w > 0)


class FeatureTracker:
    """Per-episode state for the features that look back (tool errors, verifier trend, repeats).

    Call `features(ctx, decision)` on the SLM's proposal before acting, then `update(action, info)` with
    the action actually executed (the SLM's or the teacher's). `info` is accepted for the callers' sake and
    ignored: what a step did is read from the texts the agent was shown (`observed_step`)."""

    def __init__(self) -> None:
        self.actions: list[str] = []
        self.best_verifier: list[float] = []
        self.first_observation: str | None = None
        self._pending_best: float | None = None

    def observed(self, ctx: StepContext, last: int = 2) -> list[dict[str, bool]]:
        """`observed_step` of the last `last` executed steps, built from the context's texts and actions:
        history[j] = (action j, what it showed); the newest text is the current observation."""
        hist = ctx.history
        n = len(hist)
        if n == 0:
            return []
        shown = [o or None for _, o in hist]
        shown[-1] = ctx.observation.text
        first = self.first_observation if ctx.step == n else None  # a trimmed history has lost the start
        out = []
        for j in range(max(0, n - last), n):
            before, before_action = (shown[j - 1], hist[j - 1][0]) if j else (first, None)
            out.append(observed_step(hist[j][0], shown[j], before, before_action))
        return out

    def features(self, ctx: StepContext, decision: Decision) -> list[float]:
        cands = list(decision.candidates)
        if cands:
            lps = [_finite(c.logprob, -1e3) for c in cands]
            mlps = [_finite(c.mean_logprob, -1e3) for c in cands]
            vs = [NEUTRAL_VERIFIER if c.verifier_score is None else _finite(c.verifier_score, NEUTRAL_VERIFIER)
                  for c in cands]
            texts = [normalise_action(c.text) for c in cands]
        else:  # a proposal without candidates (e.g. a scripted policy): one certain candidate
            lps, mlps, vs, texts = [0.0], [0.0], [NEUTRAL_VERIFIER], [normalise_action(decision.action)]
        order = sorted(range(len(lps)), key=lambda i: lps[i], reverse=True)
        top = order[0]
        lp_sorted = [lps[i] for i in order]
        mlp_sorted = sorted(mlps, reverse=True)
        lp_mean, lp_std = _mean_std(lps)
        v_mean, v_std = _mean_std(vs)
        v_best, v_worst = max(vs), min(vs)
        m = lp_sorted[0]
        probs = [math.exp(x - m) for x in lps]
        z = sum(probs)
        proposal = normalise_action(decision.action)
        agreement = sum(t == proposal for t in texts) / len(texts)
        v_top = max(range(len(vs)), key=lambda i: (vs[i], lps[i]))
        # the proposal's own candidate (the first with its text; `propose` puts it first) and its rivals
        mine = [i for i, t in enumerate(texts) if t == proposal]
        rivals = [lps[i] for i, t in enumerate(texts) if t != proposal]
        p_idx = mine[0] if mine else None
        v_prop = vs[p_idx] if p_idx is not None else NEUTRAL_VERIFIER
        entropy = _finite(decision.entropy, float("nan"))
        if not math.isfinite(entropy):
            entropy = _entropy(lps)

        if ctx.step == 0 and not ctx.history:
            self.first_observation = ctx.observation.text
        past = self.actions if len(self.actions) >= len(ctx.history) else [a for a, _ in ctx.history]
        seen = self.observed(ctx)
        prev_best = self.best_verifier[-3:]
        context_chars = len(ctx.observation.text or "") + sum(len(a) + len(o) for a, o in ctx.history)
        max_steps = max(1, int(ctx.max_steps or 1))
        self._pending_best = v_best

        values = {
            "entropy": entropy,
            "verifier_best": v_best,
            "verifier_worst": v_worst,
            "verifier_mean": v_mean,
            "verifier_std": v_std,
            "verifier_spread": v_best - v_worst,
            "logprob_best": lp_sorted[0],
            "logprob_mean": lp_mean,
            "logprob_std": lp_std,
            "logprob_margin": lp_sorted[0] - lp_sorted[1] if len(lp_sorted) > 1 else 0.0,
            "mean_logprob_best": mlp_sorted[0],
            "mean_logprob_margin": mlp_sorted[0] - mlp_sorted[1] if len(mlp_sorted) > 1 else 0.0,
            "top_prob": 1.0 / z,
            "candidate_agreement": agreement,
            "verifier_policy_agree": float(v_top == top or texts[v_top] == texts[top]),
            "n_candidates": float(len(lps)),
            "step": float(ctx.step),
            "horizon_frac": float(ctx.step) / max_steps,
            "context_chars_log1p": math.log1p(context_chars),
            "goal_chars_log1p": math.log1p(len(ctx.goal or "")),
            "recent_tool_error": float(any(s["tool_error"] for s in seen)),
            "observation_truncated": float(bool(ctx.observation.truncated)),
            "verifier_trend": v_best - sum(prev_best) / len(prev_best) if prev_best else 0.0,
            "repeated_action_count": float(sum(normalise_action(a) == proposal for a in past)),
            "verifier_proposal": v_prop,
            "verifier_proposal_gap": v_best - v_prop,
            "proposal_prob": sum(probs[i] for i in mine) / z,
            "proposal_logprob_margin": lps[p_idx] - max(rivals) if p_idx is not None and rivals else 0.0,
            "observation_repeated": float(bool(seen) and seen[-1]["repeated"]),
        }
        return [_finite(values[name]) for name in FEATURE_NAMES]

    def update(self, action: str, info: dict[str, Any] | None = None) -> None:
        """Record the executed step (call once per env step, after `features`). `info` is not read."""
        self.actions.append(action)
        if self._pending_best is not None:
            self.best_verifier.append(self._pending_best)
        self._pending_best = None

    def trim(self, limit: int) -> None:
        """Keep the last `limit` steps (a long serving session keeps a bounded history)."""
        self.actions, self.best_verifier = self.actions[-limit:], self.best_verifier[-limit:]


def features_by_name(vec: Sequence[float]) -> dict[str, float]:
    """{name: value} for a vector in FEATURE_NAMES order."""
    if len(vec) != len(FEATURE_NAMES):
        raise R2VError(f"feature vector has {len(vec)} values but {FEATURE_VERSION} defines {len(FEATURE_NAMES)}: "
                       f"the router rows were written by another version of r2v's features; re-run "
                       f"`r2v collect-router` (then `r2v train-router`)")
    return {name: float(v) for name, v in zip(FEATURE_NAMES, vec)}


def check_feature_rows(df: Any, source: str = "router rows") -> None:
    """Stop, naming the fix, when logged rows hold another feature spec's vectors (other names or length):
    reading them by position would silently feed one feature's values to another."""
    specs = set(df["feature_spec"].dropna().unique()) if "feature_spec" in df.columns else set()
    sizes = {len(v) for v in df["features"] if v is not None} if "features" in df.columns else set()
    if specs - {FEATURE_VERSION} or sizes - {len(FEATURE_NAMES)}:
        raise R2VError(f"{source}: rows were written with feature spec {sorted(specs)} ({sorted(sizes)} values) but "
                       f"this r2v computes {FEATURE_VERSION} ({len(FEATURE_NAMES)} values); re-run "
                       f"`r2v collect-router` (then `r2v train-router`) to rebuild them")


def vector_from_dict(features: dict[str, float], names: Sequence[str] = FEATURE_NAMES) -> list[float]:
    """The inverse of `features_by_name`; extra keys (e.g. oracle flags) are ignored."""
    missing = [n for n in names if n not in features]
    if missing:
        raise R2VError(f"features dict lacks {missing[:5]}{'...' if len(missing) > 5 else ''}: build it with "
                       f"FeatureTracker.features + features_by_name ({FEATURE_VERSION}); a router saved with other "
                       f"feature names needs `r2v train-router` again")
    return [float(features[n]) for n in names]


__all__ = ["FEATURE_VERSION", "FEATURE_NAMES", "FEATURE_INDEX", "FeatureTracker", "features_by_name",
           "check_feature_rows", "vector_from_dict", "normalise_action"]

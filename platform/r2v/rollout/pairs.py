"""`build-pairs`: preference pairs from the BC policy at teacher states and its own states, under perturbations.

For every train and val task and every seed in `dpo.perturbation_seeds`, a probe episode asks the BC policy for
its K candidates at each state, the verifier scores them and the teacher says what it would do; whose action is
executed is `dpo.pair_states`: the teacher's (`teacher`: the teacher's states), the SLM's own (`slm`: the states
the SLM reaches itself, DAgger-style, where its compounding mistakes are), or one episode of each (`both`). These
probe episodes are ordinary step shards (`rollouts/pair-probes/`). At each probed state (`dpo.chosen`):

* chosen = the teacher's action there (`teacher`, the paper's rule: the teacher acted at every probed state),
  else the verifier's best candidate (`verifier`, or where no teacher action is recorded);
* rejected = the SLM's own preferred wrong candidates, most likely first (hard negatives), up to
  `dpo.negatives` per state: the candidates whose text is not the chosen one (with the verifier as judge:
  also scored at least `dpo.pair_margin` below it).

A pair's consistency peer is the *same underlying state* under another perturbation seed: same task and
same actions executed so far (an action whose tool call failed never reached the env, so it is not part of
the prefix). A step index is not a state: after a failed call the teacher repeats its action, so step t of
two seeds can be different places in the game. A state both probes reach under one seed with the same prompt
(the first step, a shared opening) gives its pairs once. Pairs from val games (`split` = val) validate
train-dpo and are never trained on.
"""
from __future__ import annotations

from typing import Any

from r2v.config import R2VConfig
from r2v.data import ShardStore
from r2v.envs.base import Env
from r2v.experiment import Experiment, is_model_dir
from r2v.policies.base import Decision, StepContext
from r2v.policies.prompts import prompt_chars, prompt_from_row


class PairProbeAgent:
    """Records the SLM's verifier-scored candidates and the teacher's action at each state; the teacher's action is
    executed (`states=teacher`: the teacher's states) or the SLM's own (`slm`: the states the SLM reaches itself,
    DAgger-style, where its compounding mistakes are)."""

    name = "pair-probe"

    def __init__(self, slm, verifier, teacher, states: str = "teacher"):
        self.slm, self.verifier, self.teacher, self.states = slm, verifier, teacher, states

    def decide(self, ctx: StepContext, env: Env) -> Decision:
        from r2v.verifier.base import annotate

        probe = annotate(self.verifier, ctx, self.slm.act([ctx])[0])
        reply = self.teacher.act(ctx, env)
        own = self.states == "slm"
        return Decision(action=probe.action if own else reply.action or "", actor="slm" if own else "teacher",
                        candidates=probe.candidates, entropy=probe.entropy, escalation_error=reply.error,
                        teacher_tokens=reply.tokens, teacher_action=reply.action if own else None)


PROBES = {"teacher": "pair-probe", "slm": "pair-probe-slm"}  # whose actions a probe executes -> its policy name


def probe_policies(pair_states: str) -> dict[str, str]:
    """{probe policy name: whose actions it executes} for `dpo.pair_states` (teacher | slm | both)."""
    return {PROBES[s]: s for s in (PROBES if pair_states == "both" else [pair_states])}


class PairProbeFactory:
    def __init__(self, model_dir: str, server, states: str = "teacher"):
        self.model_dir, self.server, self.states = model_dir, server, states

    def __call__(self, cfg: R2VConfig) -> PairProbeAgent:
        from r2v.policies.slm import slm_in_worker
        from r2v.policies.teachers import make_teacher
        from r2v.verifier import make_verifier

        return PairProbeAgent(slm_in_worker(self.server, self.model_dir, cfg), make_verifier(cfg), make_teacher(cfg),
                              self.states)


def teacher_action(row: dict[str, Any]) -> str | None:
    """The teacher's action at a probed state: what it did there (probe episodes let the teacher act), else
    the env's reference action recorded with the step; None when there is neither."""
    for text in (row.get("action") if row.get("actor") == "teacher" else None, row.get("oracle_action")):
        if isinstance(text, str) and text.strip():
            return text.strip()
    return None


def preferences(row: dict[str, Any], chosen_rule: str, negatives: int, margin: float
                ) -> tuple[str, str, float | None, list[dict[str, Any]]] | None:
    """(chosen text, its source, its verifier score, rejected candidates) at one probed state, or None."""
    raw = row.get("candidates")
    cands = [c for c in ([] if raw is None else list(raw)) if (c["text"] or "").strip()]
    teacher = teacher_action(row) if chosen_rule == "teacher" else None
    if teacher is not None:
        score = next((c["verifier_score"] for c in cands if c["text"].strip() == teacher), None)
        wrong = [c for c in cands if c["text"].strip() != teacher]
        chosen, source = teacher, "teacher"
    else:
        scored = [c for c in cands if c["verifier_score"] is not None]
        if len(scored) < 2:
            return None
        best = max(scored, key=lambda c: (c["verifier_score"], c["logprob"]))
        wrong = [c for c in scored if c["text"] != best["text"] and best["verifier_score"] - c["verifier_score"] >= margin]
        chosen, source, score = best["text"], "verifier", best["verifier_score"]
    rejected, seen = [], {chosen.strip()}
    for c in sorted(wrong, key=lambda c: -c["logprob"]):  # the SLM's most likely wrong answers first
        if c["text"].strip() not in seen and len(rejected) < negatives:
            seen.add(c["text"].strip())
            rejected.append(c)
    return (chosen, source, score, rejected) if rejected else None


FAILED_CALL = "tool_flakiness/failure"  # shown on the next step: the action never reached the env


def state_keys(probes) -> dict[tuple[str, int], tuple[str, tuple[str, ...]]]:
    """(episode_id, step) -> (task_id, actions the env executed before the step): the state of a probe row."""
    keys = {}
    for episode_id, ep in probes.groupby("episode_id", sort=False):
        ep = ep.sort_values("step")
        shown = list(ep["perturbation"]) if "perturbation" in ep else [None] * len(ep)
        prefix: list[str] = []
        for i, (task_id, step, action) in enumerate(zip(ep["task_id"], ep["step"], ep["action"])):
            keys[(episode_id, int(step))] = (task_id, tuple(prefix))
            failed = i + 1 < len(ep) and shown[i + 1] is not None and FAILED_CALL in list(shown[i + 1])
            if not failed:
                prefix.append(str(action))
    return keys


def pairs_from_probes(cfg: R2VConfig, probes) -> list[dict[str, Any]]:
    """Pair rows (PAIRS_V2) from probe step rows; a row's peer is the same state (task + executed actions) as
    first reached under the next seed that reached it."""
    hist, d = cfg.policy.history_steps, cfg.dpo
    chars = prompt_chars(cfg.policy)
    keys = state_keys(probes)
    by_state: dict[tuple[str, tuple[str, ...]], list[dict]] = {}
    for row in probes.to_dict("records"):
        by_state.setdefault(keys[(row["episode_id"], int(row["step"]))], []).append(row)
    pairs, paired = [], set()
    for _, rows in sorted(by_state.items()):
        rows.sort(key=lambda r: (int(r["perturbation_seed"]), int(r["step"]), str(r.get("policy"))))
        first: dict[int, dict] = {}
        for r in rows:
            first.setdefault(int(r["perturbation_seed"]), r)
        order = sorted(first)
        for row in rows:
            prefs = preferences(row, d.chosen, d.negatives, d.pair_margin)
            if prefs is None:
                continue
            seed, prompt = int(row["perturbation_seed"]), prompt_from_row(row, hist, **chars)
            if (row["task_id"], seed, prompt) in paired:
                continue
            paired.add((row["task_id"], seed, prompt))
            chosen, source, score, rejected = prefs
            peer = first[order[(order.index(seed) + 1) % len(order)]] if len(order) > 1 else None
            for rej in rejected:
                pairs.append({
                    "experiment": cfg.experiment, "env": row["env"], "task_id": row["task_id"],
                    "episode_id": row["episode_id"], "step": int(row["step"]), "perturbation_seed": seed,
                    "split": row.get("split"), "prompt": prompt, "chosen": chosen,
                    "chosen_source": source, "rejected": rej["text"], "chosen_score": score,
                    "rejected_score": rej["verifier_score"],
                    "peer_prompt": prompt_from_row(peer, hist, **chars) if peer is not None else None,
                    "peer_seed": int(peer["perturbation_seed"]) if peer is not None else None,
                })
    return pairs


def run_build_pairs(cfg: R2VConfig) -> dict[str, Any]:
    from r2v.policies.slm import collection_slm
    from r2v.ray_utils import init_ray
    from r2v.rollout.engine import collect, of_units, plan_units
    from r2v.rollout.stage import collection_inputs, tasks_by_split

    init_ray(cfg)
    exp = Experiment(cfg)
    bc_dir = exp.model("bc")  # pairs probe the BC policy (DPO's reference), else what is deployed
    model_dir = str(bc_dir) if is_model_dir(bc_dir) else str(exp.deployed_policy_dir())
    tasks, kinds = tasks_by_split(cfg, ["train", "val"]), probe_policies(cfg.dpo.pair_states)
    units = [u for policy in kinds for u in plan_units(tasks, list(cfg.dpo.perturbation_seeds), 1, policy)]
    with collection_slm(cfg, model_dir) as server:
        inputs = collection_inputs(cfg, ("env", "policy", "verifier", "teacher"), (model_dir,))
        factories = {policy: PairProbeFactory(model_dir, server, states) for policy, states in kinds.items()}
        summary = collect(cfg, units, factories, exp.pair_probes, inputs=inputs)
    probes = of_units(ShardStore(exp.pair_probes, "steps").read_pandas(), units)
    pairs = pairs_from_probes(cfg, probes)
    store = ShardStore(exp.pairs, "pairs")
    for old in store.files():
        old.unlink()  # pairs are derived whole from the probes: rebuild, never mix generations
    if pairs:
        store.write("pairs", pairs)
    with_peer = sum(p["peer_prompt"] is not None for p in pairs)
    return {"model": model_dir, "probe_episodes": summary["episodes_requested"], "probe_steps": len(probes),
            "pairs": len(pairs), "val_pairs": sum(p["split"] == "val" for p in pairs), "pairs_with_peer": with_peer,
            "teacher_chosen": sum(p["chosen_source"] == "teacher" for p in pairs),
            "slm_state_pairs": sum(f"/{PROBES['slm']}/" in p["episode_id"] for p in pairs)}

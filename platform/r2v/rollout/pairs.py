"""`build-pairs`: verifier-ranked preference pairs from the BC policy, on teacher states under perturbations.

For every train task and every seed in `dpo.perturbation_seeds`, the teacher plays the episode (so the
states are the teacher's, under that seed's perturbations) while a probe asks the BC policy for its K
candidates at each state and the verifier scores them; these probe episodes are ordinary step shards
(`rollouts/pair-probes/`). A pair is (best-scored candidate, lowest-scored candidate with different text),
kept when the score gap is at least `dpo.pair_margin`. Its consistency peer is the same task and step under
another perturbation seed (the prompt the policy should answer the same way).
"""
from __future__ import annotations

from typing import Any

from r2v.config import R2VConfig
from r2v.data import ShardStore
from r2v.envs.base import Env
from r2v.experiment import Experiment, is_model_dir
from r2v.policies.base import Decision, StepContext
from r2v.policies.prompts import prompt_from_row


class PairProbeAgent:
    """Acts like the teacher; records the SLM's verifier-scored candidates at each teacher state."""

    name = "pair-probe"

    def __init__(self, slm, verifier, teacher):
        self.slm, self.verifier, self.teacher = slm, verifier, teacher

    def decide(self, ctx: StepContext, env: Env) -> Decision:
        from r2v.verifier.base import annotate

        probe = annotate(self.verifier, ctx, self.slm.act([ctx])[0])
        reply = self.teacher.act(ctx, env)
        return Decision(action=reply.action or "", actor="teacher", candidates=probe.candidates,
                        entropy=probe.entropy, escalation_error=reply.error, teacher_tokens=reply.tokens)


class PairProbeFactory:
    def __init__(self, model_dir: str, server):
        self.model_dir, self.server = model_dir, server

    def __call__(self, cfg: R2VConfig) -> PairProbeAgent:
        from r2v.policies.slm import RemoteSLM
        from r2v.policies.teachers import make_teacher
        from r2v.verifier import make_verifier

        return PairProbeAgent(RemoteSLM(self.server), make_verifier(cfg), make_teacher(cfg))


def pairs_from_probes(cfg: R2VConfig, probes) -> list[dict[str, Any]]:
    """Pair rows (PAIRS_V1) from probe step rows; a peer is the same (task, step) under the next seed."""
    hist = cfg.policy.history_steps
    by_state: dict[tuple[str, int], dict[int, dict]] = {}
    for row in probes.to_dict("records"):
        by_state.setdefault((row["task_id"], int(row["step"])), {})[int(row["perturbation_seed"])] = row
    pairs = []
    for (task_id, step), seeds in sorted(by_state.items()):
        order = sorted(seeds)
        for i, seed in enumerate(order):
            row = seeds[seed]
            raw = row["candidates"]
            cands = [c for c in ([] if raw is None else list(raw)) if c["verifier_score"] is not None]
            if len(cands) < 2:
                continue
            best = max(cands, key=lambda c: (c["verifier_score"], c["logprob"]))
            others = [c for c in cands if c["text"] != best["text"]]
            if not others:
                continue
            worst = min(others, key=lambda c: (c["verifier_score"], -c["logprob"]))
            if best["verifier_score"] - worst["verifier_score"] < cfg.dpo.pair_margin:
                continue
            peer = seeds[order[(i + 1) % len(order)]] if len(order) > 1 else None
            pairs.append({
                "experiment": cfg.experiment, "env": row["env"], "task_id": task_id, "episode_id": row["episode_id"],
                "step": step, "perturbation_seed": seed, "prompt": prompt_from_row(row, hist),
                "chosen": best["text"], "rejected": worst["text"],
                "chosen_score": best["verifier_score"], "rejected_score": worst["verifier_score"],
                "peer_prompt": prompt_from_row(peer, hist) if peer is not None else None,
                "peer_seed": int(peer["perturbation_seed"]) if peer is not None else None,
            })
    return pairs


def run_build_pairs(cfg: R2VConfig) -> dict[str, Any]:
    import ray

    from r2v.policies.slm import start_slm_server
    from r2v.ray_utils import init_ray
    from r2v.rollout.engine import collect, plan_units
    from r2v.rollout.stage import collection_inputs, tasks_by_split

    init_ray(cfg)
    exp = Experiment(cfg)
    bc_dir = exp.model("bc")  # pairs probe the BC policy (DPO's reference), else what is deployed
    model_dir = str(bc_dir) if is_model_dir(bc_dir) else str(exp.deployed_policy_dir())
    units = plan_units(tasks_by_split(cfg, ["train"]), list(cfg.dpo.perturbation_seeds), 1, "pair-probe")
    server = start_slm_server(cfg, model_dir, cfg.collect.num_workers)
    try:
        inputs = collection_inputs(cfg, ("env", "policy", "verifier", "teacher"), (model_dir,))
        summary = collect(cfg, units, PairProbeFactory(model_dir, server), exp.pair_probes, inputs=inputs)
    finally:
        ray.kill(server)
    probes = ShardStore(exp.pair_probes, "steps").read_pandas()
    pairs = pairs_from_probes(cfg, probes)
    store = ShardStore(exp.pairs, "pairs")
    for old in store.files():
        old.unlink()  # pairs are derived whole from the probes: rebuild, never mix generations
    if pairs:
        store.write("pairs", pairs)
    with_peer = sum(p["peer_prompt"] is not None for p in pairs)
    return {"model": model_dir, "probe_episodes": summary["episodes_requested"], "probe_steps": len(probes),
            "pairs": len(pairs), "pairs_with_peer": with_peer}

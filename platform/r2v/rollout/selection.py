"""`select-policy`: which trained SLM (BC or DPO) the router, eval and Serve use, chosen by live play.

DPO can leave the policy worse than its BC reference on unseen games (docs/architecture.md, "DPO, measured"),
so the pipeline does not assume the later stage is the better one. Each candidate plays every *validation*
game alone (router `slm_only`, no teacher, proposal = `policy.select`), clean under `selection.clean_seeds`
and under the configured perturbations under `selection.seeds`, both conditions on one pool of env workers
per candidate. BC (the simpler model, DPO's own reference) is deployed unless DPO delivers what the paper claims
for it, robustness: its perturbed episodes win more often by at least `selection.min_gain`, while its clean ones
lose at most `selection.max_clean_loss` (issue #15's bar; success as the environment reports it). A gain within
the noise of a few dozen games is no reason to deploy the extra stage. Test games are never played here. The
decision and both candidates' numbers go to `models/selected.json` (`Experiment.selection_file`), which
`r2v.experiment.deployed_policy_dir` reads.

`play_slm_alone` is also what `bench.slm_quality` measures with.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from r2v.config import R2VConfig
from r2v.envs.base import Task
from r2v.errors import R2VError
from r2v.experiment import Experiment, is_model_dir

CANDIDATES = ("bc", "dpo")  # in order of preference on a tie: the simpler model first
PERTURBATIONS = ("tool_flakiness", "partial_observability", "prompt_injection", "distractors")
EPISODE_COLUMNS = ["task_id", "perturbation_seed", "episode_id", "episode_success"]
N_BOOT = 1000  # resamples of the CIs shown beside the decision (the decision itself uses no CI)


def condition_config(cfg: R2VConfig, condition: str) -> R2VConfig:
    """`cfg` for one play condition: `perturbed` as configured, `clean` with every perturbation rate 0."""
    if condition == "perturbed":
        return cfg
    if condition != "clean":
        raise R2VError(f"unknown play condition {condition!r}: clean or perturbed")
    clean = copy.deepcopy(cfg)
    for name in PERTURBATIONS:
        setattr(clean.env.perturbations, name, 0.0)
    return clean


def play_slm_alone(cfg: R2VConfig, model_dir: str | Path, tasks: dict[str, list[Task]], plays: dict[str, list[int]],
                   out_dir: str | Path, progress: bool = False):
    """Play every task under every seed of each condition of `plays` ({clean | perturbed: seeds}) with the SLM
    at `model_dir` acting alone, all on one pool of env workers (the SLM where `ray.slm_server` puts it); one row
    per episode (condition, task_id, perturbation_seed, episode_id, episode_success). Episodes are shards under
    `out_dir` tied to the model and config, so a re-run resumes and a retrained model starts afresh."""
    from r2v.data import ShardStore
    from r2v.policies.slm import collection_slm
    from r2v.ray_utils import init_ray
    from r2v.rollout.engine import collect, of_units, plan_units
    from r2v.rollout.router_rows import RoutedAgentFactory
    from r2v.rollout.stage import collection_inputs
    from r2v.router.baselines import make_router

    init_ray(cfg)
    model_dir = str(model_dir)
    with collection_slm(cfg, model_dir) as server:
        factories, units = {}, []
        for condition, seeds in plays.items():
            policy = f"slm-{condition}"
            factories[policy] = RoutedAgentFactory(model_dir, server, make_router("slm_only"), with_teacher=False,
                                                   name="slm", env_cfg=condition_config(cfg, condition).env)
            units += plan_units(tasks, list(seeds), 1, policy)
        collect(cfg, units, factories, out_dir, progress=progress,
                inputs=collection_inputs(cfg, ("env", "policy", "verifier", "model"), (model_dir,)))
    steps = of_units(ShardStore(out_dir, "steps").read_pandas(columns=["policy", *EPISODE_COLUMNS]), units)
    episodes = steps.groupby("episode_id", as_index=False).first()  # only what was asked
    return episodes.assign(condition=episodes.pop("policy").str.removeprefix("slm-"))


def outcome(episodes, n_boot: int = N_BOOT, seed: int = 0) -> dict[str, Any]:
    """Wins, episodes, success and its 95% CI by cluster bootstrap over games, of one set of episodes."""
    from r2v.eval.metrics import success_with_ci

    wins = int(episodes["episode_success"].astype(bool).sum())
    n = int(len(episodes))
    if n == 0:
        return {"wins": 0, "episodes": 0, "games": 0, "success": None, "success_ci": None}
    success, ci = success_with_ci(episodes["episode_success"].astype(float).to_numpy(), n_boot, seed,
                                  games=episodes["task_id"].to_numpy())
    return {"wins": wins, "episodes": n, "games": int(episodes["task_id"].nunique()), "success": success,
            "success_ci": ci}


def choose(results: dict[str, dict[str, Any]], min_gain: float = 0.0, max_clean_loss: float = 1.0) -> str:
    """The first of CANDIDATES present (BC) unless a later one beats it on perturbed episodes by at least
    `min_gain` and loses at most `max_clean_loss` on clean ones; among those that do, the best on perturbed
    episodes, a tie going to the earlier. A candidate played in one condition only is compared on all of its
    episodes."""
    if not results:
        raise R2VError("select-policy: no candidate to choose from")
    order = [c for c in CANDIDATES if c in results] + sorted(set(results) - set(CANDIDATES))

    def rate(r: dict[str, Any] | None) -> float | None:
        return r["wins"] / r["episodes"] if r and r.get("episodes") else None

    by_condition = all(rate(results[c].get("perturbed")) is not None for c in order)
    robust = {c: rate(results[c]["perturbed"] if by_condition else results[c]) for c in order}
    clean = {c: rate(results[c].get("clean")) for c in order}
    base = order[0]

    def clean_ok(c: str) -> bool:
        return clean[c] is None or clean[base] is None or clean[base] - clean[c] <= max_clean_loss + 1e-9

    # 1e-9: success rates are ratios of episode counts, so a gain of exactly min_gain must not hang on rounding
    eligible = [base] + [c for c in order[1:] if robust[c] > robust[base]
                         and robust[c] - robust[base] >= min_gain - 1e-9 and clean_ok(c)]
    return max(eligible, key=lambda c: (robust[c], -order.index(c)))


def run_select_policy(cfg: R2VConfig) -> dict[str, Any]:
    """Pipeline stage `select-policy`: models/bc and models/dpo play the validation games -> models/selected.json."""
    from r2v.data.shards import fingerprint_dir
    from r2v.rollout.stage import tasks_by_split

    exp = Experiment(cfg)
    candidates = [c for c in CANDIDATES if is_model_dir(exp.model(c))]
    if not candidates:
        raise R2VError(f"no trained SLM under {exp.models_dir} (bc, dpo): run `r2v train-bc` first")
    tasks = tasks_by_split(cfg, ["val"])
    if not tasks["val"]:
        raise R2VError(f"{exp.splits_file} has no validation games to select the SLM on: give `env.split_fractions` "
                       "a non-zero val share and re-run `r2v tasks`")
    plays = {c: seeds for c, seeds in (("clean", list(cfg.selection.clean_seeds)),
                                        ("perturbed", list(cfg.selection.seeds))) if seeds}
    results: dict[str, dict[str, Any]] = {}
    for stage in candidates:
        episodes = play_slm_alone(cfg, exp.model(stage), tasks, plays, exp.selection_rollouts(stage))
        per = {c: outcome(episodes[episodes["condition"] == c], seed=cfg.seed) for c in plays}
        results[stage] = {**outcome(episodes, seed=cfg.seed), **per, "model_dir": str(exp.model(stage)),
                          "fingerprint": fingerprint_dir(exp.model(stage))}
    sel = cfg.selection
    selected = choose(results, sel.min_gain, sel.max_clean_loss)
    doc = {"selected": selected, "model_dir": str(exp.model(selected)), "split": "val",
           "games": len(tasks["val"]), "seeds": plays.get("perturbed", []), "clean_seeds": plays.get("clean", []),
           "rule": (f"validation games, SLM alone: dpo is deployed only if its perturbed success beats bc's by at "
                    f"least {sel.min_gain:g} and its clean success is at most {sel.max_clean_loss:g} below"),
           "min_gain": sel.min_gain, "max_clean_loss": sel.max_clean_loss, "candidates": results}
    path = exp.selection_file
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=2))
    tmp.replace(path)
    summary: dict[str, Any] = {"selected": selected, "val_games": len(tasks["val"])}
    for stage, r in results.items():
        summary[f"{stage}_success"] = r["success"]
        for condition in plays:
            if condition in r:
                summary[f"{stage}_{condition}_success"] = r[condition]["success"]
        summary[f"{stage}_episodes"] = r["episodes"]
    return summary


__all__ = ["run_select_policy", "play_slm_alone", "choose", "outcome", "condition_config", "CANDIDATES"]

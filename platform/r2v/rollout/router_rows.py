"""`collect-router`: the frozen SLM's residual failures, turned into router training rows.

1. The SLM (never escalating) plays every val/test task (and train tasks when the router is fitted there)
   under each of `router.rollout_seeds`; every step records its router features.
2. Every step gets three labels, each under a stated definition (`router.label` picks the one fitted):
   - `episode_failed` (episode): the SLM episode failed; broadcast to all of its steps.
   - `step_label` (step, the paper's step label): the SLM's action differs from the reference action the
     environment exposes at that state (TextWorld's re-planned walkthrough); null where there is none.
   - `critical_label` (critical): the step label within an episode the SLM goes on to lose: a departure from
     the reference that the outcome says mattered (harmless detours of won episodes are 0). It is the
     hindsight router's rule (escalate where the SLM loses from here and the teacher would act otherwise)
     read off the SLM's own episodes.
   - `branch_label` (branch, counterfactual): on a seeded sample of `router.branch_steps_per_episode` steps
     of *every* episode, 1 iff the teacher taking this step and the next `router.branch_teacher_steps` - 1
     wins where the SLM from here loses. Steps of a successful SLM episode need no branch (the SLM already
     wins from there: 0); sampled steps of failed episodes are replayed under the same seed with the teacher
     acting. Each sampled row carries `label_weight` = episode length / sampled steps, so the weighted rows
     stand for every step of every episode (sampling only failed episodes, or all steps of successful ones,
     would let time features such as `step` separate the classes without knowing risk). In `rank` mode the
     SLM branch is the recorded episode (deterministic given the seed); in `generate` mode it is re-run.
3. One `router_rows` shard per split. Everything is a shard keyed by its unit (branches of each m in their
   own folder), so an interrupted stage resumes where it stopped.
"""
from __future__ import annotations

import random
from typing import Any

from r2v.config import R2VConfig
from r2v.data import ShardStore
from r2v.envs.base import stable_seed
from r2v.router.features import FEATURE_VERSION
from r2v.rollout.engine import Unit, collect, of_units, plan_units
from r2v.experiment import Experiment
from r2v.rollout.stage import collection_inputs, tasks_by_split

SPLITS = ["train", "val", "test"]


class RoutedAgentFactory:
    """Builds a RoutedAgent inside an env worker (SLM: the collection's server or its own copy; verifier, router,
    teacher), so one picklable object describes a policy to any number of workers."""

    def __init__(self, model_dir: str, server, router, with_teacher: bool = True,
                 budget_per_episode: int | None = None, name: str | None = None, env_cfg=None):
        self.model_dir, self.server, self.router = model_dir, server, router
        self.with_teacher, self.budget, self.name = with_teacher, budget_per_episode, name
        self.env_cfg = env_cfg  # play in this env variant instead of the worker's (EnvWorker.env_for)

    def __call__(self, cfg: R2VConfig):
        from r2v.policies.routed import RoutedAgent
        from r2v.policies.slm import slm_in_worker
        from r2v.policies.teachers import make_teacher
        from r2v.verifier import make_verifier

        slm = slm_in_worker(self.server, self.model_dir, cfg)
        teacher = make_teacher(cfg) if self.with_teacher else None
        verifier = make_verifier(cfg)
        lookahead = None
        if self.router.needs_lookahead:  # the hindsight oracle: the SLM alone, played on in a private env
            from r2v.envs.registry import make_env
            from r2v.router.baselines import make_router
            from r2v.rollout.episode import Lookahead

            alone = RoutedAgent(slm, verifier, make_router("slm_only"), None, cfg.policy.select, name="slm")
            env_cfg = self.env_cfg or cfg.env
            lookahead = Lookahead(make_env(env_cfg), alone, env_cfg.max_steps, cfg.policy.history_steps)
        return RoutedAgent(slm, verifier, self.router, teacher, cfg.policy.select, self.budget, self.name, lookahead,
                           grace=cfg.router.grace, carry=cfg.router.carry)


def branch_picks(cfg: R2VConfig, episode_id: str, length: int) -> list[int]:
    """The steps of an episode that get a branch label: a seeded sample of `router.branch_steps_per_episode`
    (all of them when the episode is that short)."""
    n = min(cfg.router.branch_steps_per_episode, length)
    return sorted(random.Random(stable_seed("branch", episode_id)).sample(range(length), n))


def branch_units(cfg: R2VConfig, steps_df, tasks_by_id) -> list[Unit]:
    """Teacher branches at the sampled steps of every failed SLM episode (successful ones need none)."""
    units = []
    regenerate_slm = cfg.policy.mode != "rank"
    for episode_id, ep in steps_df.groupby("episode_id", sort=True):
        if bool(ep["episode_success"].iloc[0]):
            continue
        actions = list(ep.sort_values("step")["action"])
        first = ep.iloc[0]
        task = tasks_by_id[first["task_id"]]
        for t in branch_picks(cfg, episode_id, len(actions)):
            units.append(Unit(task, first["split"], int(first["perturbation_seed"]), 0, "branch",
                              prefix=tuple(actions[:t]), teacher_steps=cfg.router.branch_teacher_steps))
            if regenerate_slm:
                units.append(Unit(task, first["split"], int(first["perturbation_seed"]), 0, "slm-branch",
                                  prefix=tuple(actions[:t]), teacher_steps=0))
    return units


def label_rows(cfg: R2VConfig, steps_df, branches_df) -> list[dict[str, Any]]:
    """Router rows (ROUTER_ROWS_V3) for every SLM step, with its episode, step, critical and branch labels."""
    outcome: dict[tuple, bool] = {}
    slm_outcome: dict[tuple, bool] = {}
    for _, b in branches_df.groupby("episode_id"):
        first = b.iloc[0]
        policy, at = first["policy"].split("@")
        key = (first["task_id"], int(first["perturbation_seed"]), int(at))
        (outcome if policy == "branch" else slm_outcome)[key] = bool(first["episode_success"])
    lengths = steps_df.groupby("episode_id")["step"].size()
    picked = {(e, t) for e, n in lengths.items() for t in branch_picks(cfg, e, int(n))}
    rows = []
    for r in steps_df.itertuples(index=False):
        key = (r.task_id, int(r.perturbation_seed), int(r.step))
        slm_success = bool(r.episode_success) if key not in slm_outcome else slm_outcome[key]
        teacher_success = outcome.get(key)
        label, weight = None, None
        if (r.episode_id, int(r.step)) in picked:
            n = int(lengths[r.episode_id])
            weight = n / min(n, cfg.router.branch_steps_per_episode)
            if bool(r.episode_success):
                label = False  # the SLM wins from here: the teacher cannot do better
            elif teacher_success is not None:
                label = bool(teacher_success and not slm_success)
        reference = getattr(r, "oracle_action", None)
        step_label = None if reference is None or reference != reference else bool(r.action != reference)
        rows.append({
            "experiment": cfg.experiment, "env": r.env, "task_id": r.task_id, "split": r.split,
            "episode_id": r.episode_id, "perturbation_seed": int(r.perturbation_seed), "step": int(r.step),
            "features": list(r.features), "feature_spec": FEATURE_VERSION,
            "episode_failed": not bool(r.episode_success), "branch_label": label,
            "slm_branch_success": slm_success if label is not None else None,
            "teacher_branch_success": teacher_success,
            "step_label": step_label,
            "critical_label": None if step_label is None else bool(step_label and not r.episode_success),
            "label_weight": weight if label is not None else None,
        })
    return rows


def run_collect_router(cfg: R2VConfig) -> dict[str, Any]:
    from r2v.envs.registry import load_tasks
    from r2v.policies.slm import collection_slm
    from r2v.ray_utils import init_ray
    from r2v.router.baselines import make_router

    init_ray(cfg)
    exp = Experiment(cfg)
    model_dir = str(exp.deployed_policy_dir())
    splits = [s for s in SPLITS if s in {cfg.router.fit_split, "val", "test"}]  # train rows only when fitted on
    tasks = tasks_by_split(cfg, splits)
    with collection_slm(cfg, model_dir) as server:
        factory = RoutedAgentFactory(model_dir, server, make_router("slm_only"), with_teacher=False, name="slm")
        units = plan_units(tasks, list(cfg.router.rollout_seeds), 1, "slm")
        inputs = collection_inputs(cfg, ("env", "policy", "verifier"), (model_dir,), features=FEATURE_VERSION)
        slm_summary = collect(cfg, units, factory, exp.slm_router_rollouts, inputs=inputs)
        steps_df = of_units(ShardStore(exp.slm_router_rollouts, "steps").read_pandas(), units)
        by_id = {t.task_id: t for t in load_tasks(cfg.env)}
        branches = branch_units(cfg, steps_df, by_id)
        inputs = collection_inputs(cfg, ("env", "policy", "verifier", "teacher"), (model_dir,))
        branch_summary = (collect(cfg, branches, factory, exp.branches, inputs=inputs) if branches
                          else {"episodes_run": 0})
    branches_df = ShardStore(exp.branches, "steps").read_pandas()
    store = ShardStore(exp.router_rows, "router_rows")
    summary: dict[str, Any] = {"model": model_dir, "slm_episodes": slm_summary["episodes_requested"],
                               "branch_episodes": len(branches), "wall_slm_s": slm_summary.get("wall_s", 0.0),
                               "wall_branch_s": branch_summary.get("wall_s", 0.0)}
    rows = label_rows(cfg, steps_df, branches_df)
    for split in splits:
        split_rows = [r for r in rows if r["split"] == split]
        store.write(f"split={split}", split_rows)
        ep = steps_df[steps_df["split"] == split].groupby("episode_id")["episode_success"].first()
        labelled = [r["branch_label"] for r in split_rows if r["branch_label"] is not None]
        summary[f"{split}_slm_success"] = float(ep.mean()) if len(ep) else float("nan")
        summary[f"{split}_rows"] = len(split_rows)
        summary[f"{split}_branch_positive_rate"] = sum(labelled) / max(1, len(labelled))
    return summary

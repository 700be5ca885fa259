"""`collect-router`: the frozen SLM's residual failures, turned into router training rows.

1. The SLM (with the verifier picking among its candidates, never escalating) plays every train/val/test
   task under each of `router.rollout_seeds`; every step records its router features.
2. Counterfactual branches: at up to `router.branch_steps_per_episode` sampled steps of each *failed* SLM
   episode, the episode is replayed to that step under the same seed, the teacher takes that step and the
   next `router.branch_teacher_steps` - 1 (m = 1: just this step), and the SLM continues. Label 1 where the teacher branch succeeds and the SLM branch failed. The SLM branch is
   the recorded episode itself: rank-mode SLM and verifier are deterministic given the seed, so replaying
   it would reproduce it (in `generate` mode it is re-run as a branch with zero teacher steps). Steps of
   successful SLM episodes are label 0 (the SLM already succeeds from there).
3. One `router_rows` shard per split, with both labels: `episode_failed` and `branch_label`.
Everything is a shard keyed by its unit (branches of each m in their own folder), so an interrupted stage
resumes where it stopped.
"""
from __future__ import annotations

import random
from typing import Any

from r2v.config import R2VConfig
from r2v.data import ShardStore
from r2v.envs.base import stable_seed
from r2v.router.features import FEATURE_VERSION
from r2v.rollout.engine import Unit, collect, plan_units
from r2v.rollout.stage import collection_inputs, latest_policy_dir, tasks_by_split

SPLITS = ["train", "val", "test"]


class RoutedAgentFactory:
    """Builds a RoutedAgent inside an env worker (SLM over the shared model actor, verifier, router,
    teacher), so one picklable object describes a policy to any number of workers."""

    def __init__(self, model_dir: str, server, router, with_teacher: bool = True,
                 budget_per_episode: int | None = None, name: str | None = None):
        self.model_dir, self.server, self.router = model_dir, server, router
        self.with_teacher, self.budget, self.name = with_teacher, budget_per_episode, name

    def __call__(self, cfg: R2VConfig):
        from r2v.policies.routed import RoutedAgent
        from r2v.policies.slm import RemoteSLM, SLMPolicy
        from r2v.policies.teachers import make_teacher
        from r2v.verifier import make_verifier

        slm = RemoteSLM(self.server) if self.server is not None else SLMPolicy(self.model_dir, cfg.model, cfg.policy)
        teacher = make_teacher(cfg) if self.with_teacher else None
        return RoutedAgent(slm, make_verifier(cfg), self.router, teacher, cfg.policy.select, self.budget, self.name)


def slm_rollout_dir(cfg: R2VConfig):
    return cfg.experiment_dir / "rollouts" / "slm-router"


def branch_dir(cfg: R2VConfig):
    return cfg.experiment_dir / "rollouts" / f"branches-m{cfg.router.branch_teacher_steps}"


def router_rows_dir(cfg: R2VConfig):
    return cfg.experiment_dir / "router"


def branch_units(cfg: R2VConfig, steps_df, tasks_by_id) -> list[Unit]:
    """Teacher branches at sampled steps of every failed SLM episode (seeded by the episode id)."""
    units = []
    regenerate_slm = cfg.policy.mode != "rank"
    for episode_id, ep in steps_df.groupby("episode_id", sort=True):
        ep = ep.sort_values("step")
        if bool(ep["episode_success"].iloc[0]):
            continue
        actions = list(ep["action"])
        n = min(cfg.router.branch_steps_per_episode, len(actions))
        picks = sorted(random.Random(stable_seed("branch", episode_id)).sample(range(len(actions)), n))
        first = ep.iloc[0]
        task = tasks_by_id[first["task_id"]]
        for t in picks:
            units.append(Unit(task, first["split"], int(first["perturbation_seed"]), 0, "branch",
                              prefix=tuple(actions[:t]), teacher_steps=cfg.router.branch_teacher_steps))
            if regenerate_slm:
                units.append(Unit(task, first["split"], int(first["perturbation_seed"]), 0, "slm-branch",
                                  prefix=tuple(actions[:t]), teacher_steps=0))
    return units


def label_rows(cfg: R2VConfig, steps_df, branches_df) -> list[dict[str, Any]]:
    """Router rows (ROUTER_ROWS_V1) for every SLM step, with episode and branch labels."""
    outcome: dict[tuple, bool] = {}
    slm_outcome: dict[tuple, bool] = {}
    for _, b in branches_df.groupby("episode_id"):
        first = b.iloc[0]
        policy, at = first["policy"].split("@")
        key = (first["task_id"], int(first["perturbation_seed"]), int(at))
        (outcome if policy == "branch" else slm_outcome)[key] = bool(first["episode_success"])
    rows = []
    for r in steps_df.itertuples(index=False):
        key = (r.task_id, int(r.perturbation_seed), int(r.step))
        slm_success = bool(r.episode_success) if key not in slm_outcome else slm_outcome[key]
        teacher_success = outcome.get(key)
        if bool(r.episode_success):
            label = False
        elif teacher_success is not None:
            label = bool(teacher_success and not slm_success)
        else:
            label = None
        rows.append({
            "experiment": cfg.experiment, "env": r.env, "task_id": r.task_id, "split": r.split,
            "episode_id": r.episode_id, "perturbation_seed": int(r.perturbation_seed), "step": int(r.step),
            "features": list(r.features), "feature_spec": FEATURE_VERSION,
            "episode_failed": not bool(r.episode_success), "branch_label": label,
            "slm_branch_success": slm_success if label is not None else None,
            "teacher_branch_success": teacher_success,
        })
    return rows


def run_collect_router(cfg: R2VConfig) -> dict[str, Any]:
    import ray

    from r2v.envs.registry import load_tasks
    from r2v.policies.slm import start_slm_server
    from r2v.ray_utils import init_ray
    from r2v.router.baselines import make_router

    init_ray(cfg)
    model_dir = latest_policy_dir(cfg)
    splits = [s for s in SPLITS if s in {cfg.router.fit_split, "val", "test"}]  # train rows only when fitted on
    tasks = tasks_by_split(cfg, splits)
    server = start_slm_server(cfg, model_dir, cfg.collect.num_workers)
    factory = RoutedAgentFactory(model_dir, server, make_router("slm_only"), with_teacher=False, name="slm")
    try:
        units = plan_units(tasks, list(cfg.router.rollout_seeds), 1, "slm")
        inputs = collection_inputs(cfg, ("env", "policy", "verifier"), (model_dir,))
        slm_summary = collect(cfg, units, factory, slm_rollout_dir(cfg), inputs=inputs)
        steps_df = ShardStore(slm_rollout_dir(cfg), "steps").read_pandas()
        by_id = {t.task_id: t for t in load_tasks(cfg.env)}
        branches = branch_units(cfg, steps_df, by_id)
        inputs = collection_inputs(cfg, ("env", "policy", "verifier", "teacher"), (model_dir,))
        branch_summary = (collect(cfg, branches, factory, branch_dir(cfg), inputs=inputs) if branches
                          else {"episodes_run": 0})
    finally:
        ray.kill(server)
    branches_df = ShardStore(branch_dir(cfg), "steps").read_pandas()
    store = ShardStore(router_rows_dir(cfg), "router_rows")
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

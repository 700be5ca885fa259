"""Pipeline stages that collect rollouts: `collect-teacher` and the generic `r2v collect`."""
from __future__ import annotations

from typing import Any

from r2v.config import R2VConfig
from r2v.envs.base import Task
from r2v.envs.registry import load_tasks
from r2v.envs.stage import read_splits
from r2v.errors import R2VError
from r2v.rollout.engine import collect, plan_units


def teacher_agent(cfg: R2VConfig):
    from r2v.policies.teachers import TeacherAgent, make_teacher

    return TeacherAgent(make_teacher(cfg))


def tasks_by_split(cfg: R2VConfig, splits: list[str]) -> dict[str, list[Task]]:
    """The tasks of the given splits, as fixed by the `tasks` stage."""
    ids = read_splits(cfg)
    by_id = {t.task_id: t for t in load_tasks(cfg.env)}
    out = {}
    for split in splits:
        missing = [t for t in ids[split] if t not in by_id]
        if missing:
            raise R2VError(f"tasks {missing[:3]} of split `{split}` are gone from env `{cfg.env.name}`; "
                           "re-run `r2v tasks` (or `r2v run --from tasks`)")
        out[split] = [by_id[t] for t in ids[split]]
    return out


def rollout_dir(cfg: R2VConfig, policy: str):
    return cfg.experiment_dir / "rollouts" / policy


AGENTS = {"teacher": teacher_agent}


def run_collect(cfg: R2VConfig, policy: str | None = None, splits: list[str] | None = None) -> dict[str, Any]:
    policy = policy or cfg.collect.policy
    if policy not in AGENTS:
        raise R2VError(f"`collect.policy={policy}` is not built yet; available: {sorted(AGENTS)}")
    tasks = tasks_by_split(cfg, splits or [cfg.collect.split])
    units = plan_units(tasks, list(cfg.collect.perturbation_seeds), cfg.collect.episodes_per_task, policy)
    return collect(cfg, units, AGENTS[policy], rollout_dir(cfg, policy))


def run_collect_teacher(cfg: R2VConfig) -> dict[str, Any]:
    """Teacher trajectories on the train and val tasks (val keeps BC's held-out loss honest)."""
    return run_collect(cfg, "teacher", ["train", "val"])

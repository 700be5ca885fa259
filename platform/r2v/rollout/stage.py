"""Pipeline stages that collect rollouts: `collect-teacher` and the generic `r2v collect`."""
from __future__ import annotations

from typing import Any

from r2v.config import R2VConfig
from r2v.envs.base import Task
from r2v.envs.registry import load_tasks
from r2v.envs.stage import read_splits
from r2v.errors import R2VError
from r2v.experiment import Experiment
from r2v.rollout.engine import collect, plan_units


def teacher_agent(cfg: R2VConfig):
    from r2v.policies.teachers import TeacherAgent, make_teacher

    return TeacherAgent(make_teacher(cfg), cfg.collect.teacher_epsilon)


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


def collection_inputs(cfg: R2VConfig, sections: tuple[str, ...], models: tuple[str, ...] = (),
                      **extra: Any) -> dict[str, Any]:
    """What a collection's episodes depend on: the config sections that shape them and the models that
    play them (see `prepare_dir`)."""
    from r2v.config import config_hash
    from r2v.data.shards import fingerprint_dir

    return {"config": config_hash(cfg, *sections), "models": {m: fingerprint_dir(m) for m in models},
            "history_steps": cfg.policy.history_steps, **extra}


def routed_inputs(cfg: R2VConfig, model_dir: str) -> dict[str, Any]:
    """What routed episodes depend on besides their router and τ (both in the policy name): the SLM that plays,
    the env, the verifier, the teacher, and the grace and carry every thresholded router gets (`router.grace`,
    `router.carry`; carry only when set, so episodes played before it existed stay valid)."""
    carry = {"carry": cfg.router.carry} if cfg.router.carry else {}
    return collection_inputs(cfg, ("env", "policy", "verifier", "teacher"), (model_dir,), grace=cfg.router.grace,
                             **carry)


def run_collect(cfg: R2VConfig, policy: str | None = None, splits: list[str] | None = None,
                seeds: list[int] | None = None, model_dir: str | None = None) -> dict[str, Any]:
    """Collect `policy` episodes (teacher | slm) on the given splits under the given perturbation seeds.
    The SLM runs where `ray.slm_server` puts it (`collection_slm`)."""
    from r2v.ray_utils import init_ray

    policy = policy or cfg.collect.policy
    tasks = tasks_by_split(cfg, splits or [cfg.collect.split])
    seeds = list(seeds if seeds is not None else cfg.collect.perturbation_seeds)
    units = plan_units(tasks, seeds, cfg.collect.episodes_per_task, policy)
    if policy == "teacher":
        inputs = collection_inputs(cfg, ("env", "teacher"), epsilon=cfg.collect.teacher_epsilon)
        return collect(cfg, units, teacher_agent, Experiment(cfg).rollouts(policy), inputs=inputs)
    if policy == "slm":
        from r2v.policies.slm import SLMAgentFactory, collection_slm

        init_ray(cfg)
        path = model_dir or str(Experiment(cfg).deployed_policy_dir())
        with collection_slm(cfg, path) as server:
            summary = collect(cfg, units, SLMAgentFactory(path, server), Experiment(cfg).rollouts(policy),
                              inputs=collection_inputs(cfg, ("env", "policy", "model"), (path,)))
        return {**summary, "model": path}
    raise R2VError(f"`collect.policy={policy}` is not available here; use teacher or slm (routed runs in `r2v eval`)")


def run_collect_teacher(cfg: R2VConfig) -> dict[str, Any]:
    """Teacher trajectories on the train and val tasks (val keeps BC's held-out loss honest)."""
    return run_collect(cfg, "teacher", ["train", "val"])

"""Parallel collection on Ray: env-worker actors play episodes and write one shard per episode.

A unit of work is (task, perturbation seed, episode index) under one policy; its shard key is the unit, so a
re-run skips completed units and a retried unit overwrites its own shard atomically: every requested
episode ends up in the shards exactly once, even when an actor dies mid-episode (it restarts, Ray retries
the call). The driver keeps every worker busy and shows episodes done / total and steps/s.
"""
from __future__ import annotations

import os
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from r2v.config import R2VConfig
from r2v.data import ShardStore, shard_key
from r2v.data.shards import prepare_dir
from r2v.envs.base import Task
from r2v.errors import R2VError


@dataclass(frozen=True)
class Unit:
    task: Task
    split: str
    seed: int
    episode_index: int
    policy: str
    prefix: tuple[str, ...] | None = None  # a branch: replay these actions, then the teacher acts
    teacher_steps: int = 1

    @property
    def key(self) -> str:
        parts = dict(task=self.task.task_id, seed=self.seed, policy=self.policy, ep=self.episode_index)
        if self.prefix is not None:
            parts["branch"] = len(self.prefix)
        return shard_key(**parts)


AgentFactory = Callable[[R2VConfig], Any]  # builds the Agent inside the worker process
ANY_POLICY = "*"


class EnvWorker:
    """Owns one environment and the agents of the units it plays (built once per policy, in the worker);
    plays units and writes their shards."""

    def __init__(self, cfg: R2VConfig, factories: dict[str, AgentFactory], out_dir: str):
        from r2v.envs.registry import make_env

        self.cfg = cfg
        self.env = make_env(cfg.env)
        self.factories = factories
        self.agents: dict[str, Any] = {}
        self.variants: dict[str, Any] = {}  # repr(env config) -> env, for factories that name their own
        self.store = ShardStore(out_dir, "steps")

    def ready(self) -> bool:
        """Returns once the constructor (env start-up) is done: collection time excludes start-up."""
        return True

    def agent_for(self, policy: str):
        if policy not in self.agents:
            self.agents[policy] = self._factory(policy)(self.cfg)
        return self.agents[policy]

    def env_cfg_for(self, policy: str):
        """The env config a policy plays under: the worker's, or the variant its factory names (`env_cfg`, e.g.
        select-policy's clean condition, eval's benchmark tasks with their own step limit)."""
        return getattr(self._factory(policy), "env_cfg", None) or self.cfg.env

    def env_for(self, policy: str):
        """The env a policy plays in (`env_cfg_for`), built once per variant, so one pool of workers plays
        several conditions."""
        env_cfg = self.env_cfg_for(policy)
        if env_cfg is self.cfg.env:
            return self.env
        from r2v.envs.registry import make_env

        key = repr(env_cfg)
        if key not in self.variants:
            self.variants[key] = make_env(env_cfg)
        return self.variants[key]

    def _factory(self, policy: str) -> AgentFactory:
        return self.factories.get(policy) or self.factories[ANY_POLICY]

    def run(self, unit: Unit) -> dict[str, Any]:
        from r2v.rollout.episode import EpisodeMeta, run_episode

        policy = unit.policy if unit.prefix is None else f"{unit.policy}@{len(unit.prefix)}"
        meta = EpisodeMeta(self.cfg.experiment, unit.split, policy, unit.seed, unit.episode_index)
        agent = self.agent_for(unit.policy)
        if unit.prefix is not None:
            from r2v.policies.teachers import make_teacher
            from r2v.rollout.episode import BranchAgent

            self.teacher = getattr(self, "teacher", None) or make_teacher(self.cfg)
            agent = BranchAgent(agent, self.teacher, list(unit.prefix), unit.teacher_steps)
        rows = run_episode(self.env_for(unit.policy), agent, unit.task, meta,
                           self.env_cfg_for(unit.policy).max_steps, self.cfg.policy.history_steps)
        self.store.write(unit.key, rows)
        return {"key": unit.key, "steps": len(rows), "success": bool(rows and rows[-1]["episode_success"]),
                "pid": os.getpid(), "node": _node_id()}

    def pid(self) -> int:
        return os.getpid()


def _node_id() -> str:
    import ray

    return ray.get_runtime_context().get_node_id()


def plan_units(tasks: dict[str, list[Task]], seeds: list[int], episodes_per_task: int, policy: str) -> list[Unit]:
    return [
        Unit(task, split, seed, e, policy)
        for split, split_tasks in tasks.items()
        for task in split_tasks
        for seed in seeds
        for e in range(episodes_per_task)
    ]


def of_units(df, units: list[Unit]):
    """The step rows of `df` that belong to `units` (task, seed, policy): a collection folder keeps the episodes
    of tasks, seeds or policies configured before (shards are never deleted), which must not leak into what is
    built from this run. Branch units are not matched (their rows' policy carries the branch step)."""
    return of_episodes(df, [(u.task.task_id, u.seed, u.policy) for u in units])


def of_episodes(df, episodes) -> Any:
    """The step rows of `df` whose (task_id, perturbation_seed, policy) is one of `episodes`."""
    keys = {(t, int(s), p) for t, s, p in episodes}
    return df[[(t, int(s), p) in keys for t, s, p in zip(df["task_id"], df["perturbation_seed"], df["policy"])]]


def fit_workers(requested: int, cpus_each: float, units: int) -> int:
    """Workers that can all be scheduled now: an actor left pending for want of CPUs would hold its
    episode forever."""
    import ray

    want = min(requested, units)
    deadline = time.time() + 10.0  # actors of a previous collection may still be releasing their CPUs
    while True:
        free = ray.available_resources().get("CPU", 0.0)
        fit = int(free // cpus_each) if cpus_each > 0 else requested
        if fit >= want or time.time() > deadline:
            break
        time.sleep(0.25)
    n = max(1, min(want, fit))
    if n < want:
        print(f"[collect] {free:g} free CPUs fit {n} of the {requested} requested env workers "
              f"(collect.cpus_per_worker={cpus_each:g})")
    return n


def collect(cfg: R2VConfig, units: list[Unit], agents: AgentFactory | dict[str, AgentFactory], out_dir: str | Path,
            progress: bool = True, on_started: Callable[[list], None] | None = None,
            inputs: dict[str, Any] | None = None) -> dict[str, Any]:
    """Play every unit whose shard is missing, on `collect.num_workers` env-worker actors. `agents` is one
    factory for every unit, or {policy: factory} (with "*" as the fallback) to play several policies on
    one pool of workers. `inputs` (model fingerprints, config hashes) ties the shards to what made them:
    shards of other inputs are set aside, never skipped over as if done."""
    factories = agents if isinstance(agents, dict) else {ANY_POLICY: agents}
    if inputs is not None:
        prepare_dir(out_dir, inputs)
    import ray
    from tqdm.auto import tqdm

    from r2v.ray_utils import init_ray

    init_ray(cfg)
    store = ShardStore(out_dir, "steps")
    store.remove_stale_temp()
    done_keys = store.completed_keys()
    todo = deque(u for u in units if u.key not in done_keys)
    summary = {"episodes_requested": len(units), "episodes_skipped": len(units) - len(todo),
               "episodes_run": 0, "steps": 0, "successes": 0}
    if not todo:
        return {**summary, "wall_s": 0.0, "steps_per_s": 0.0}

    actor_cls = ray.remote(EnvWorker).options(
        num_cpus=cfg.collect.cpus_per_worker,
        max_restarts=cfg.collect.max_restarts,
        max_task_retries=cfg.collect.max_task_retries,
    )
    n_workers = fit_workers(cfg.collect.num_workers, cfg.collect.cpus_per_worker, len(todo))
    workers = [actor_cls.remote(cfg, factories, str(out_dir)) for _ in range(n_workers)]
    ray.get([w.ready.remote() for w in workers])
    if on_started:
        on_started(workers)
    attempts: dict[str, int] = {}
    pids: dict[int, set[int]] = {}  # worker index -> processes that ran its units (restarts add one)
    nodes: dict[int, set[str]] = {}  # worker index -> Ray nodes it ran on (a restart may move it)
    inflight: dict[Any, tuple[Any, Unit]] = {}
    t0 = time.time()
    label = units[0].policy if len(factories) == 1 else f"{len(factories)} policies"
    bar = tqdm(total=len(todo), desc=f"collect[{label}]", unit="ep", disable=not progress)

    def submit(worker) -> None:
        if todo:
            unit = todo.popleft()
            inflight[worker.run.remote(unit)] = (worker, unit)

    for w in workers:
        submit(w)
    try:
        while inflight:
            ready, _ = ray.wait(list(inflight), num_returns=1)
            ref = ready[0]
            worker, unit = inflight.pop(ref)
            try:
                res = ray.get(ref)
            except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError) as e:
                attempts[unit.key] = attempts.get(unit.key, 0) + 1
                if attempts[unit.key] > cfg.collect.max_task_retries + 1:
                    raise R2VError(f"episode {unit.key} failed {attempts[unit.key]} times; last error: {e}") from e
                todo.append(unit)  # the actor restarts (max_restarts); the unit goes back in the queue
                submit(worker)
                continue
            summary["episodes_run"] += 1
            summary["steps"] += res["steps"]
            summary["successes"] += int(res["success"])
            pids.setdefault(workers.index(worker), set()).add(res["pid"])
            nodes.setdefault(workers.index(worker), set()).add(res["node"])
            bar.update(1)
            bar.set_postfix(steps_per_s=f"{summary['steps'] / max(1e-9, time.time() - t0):.1f}",
                            success=f"{summary['successes'] / summary['episodes_run']:.2f}")
            submit(worker)
    finally:
        bar.close()
        for w in workers:
            ray.kill(w, no_restart=True)
    wall = time.time() - t0
    return {**summary, "worker_pids": {i: sorted(p) for i, p in pids.items()},
            "worker_nodes": {i: sorted(n) for i, n in nodes.items()}, "wall_s": wall, "steps_per_s": summary["steps"] / max(wall, 1e-9),
            "success_rate": summary["successes"] / max(1, summary["episodes_run"])}

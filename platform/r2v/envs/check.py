"""`r2v envs check`: play a few episodes with the oracle or a random policy and summarise them.

A quick health check of an env and its perturbations before spending hours on collection: the oracle
should almost always win (also when perturbed), a random policy clearly less often.
"""
from __future__ import annotations

import random
import time
from collections import Counter
from typing import TYPE_CHECKING, Any

from r2v.envs.base import stable_seed
from r2v.envs.registry import load_tasks, make_env, task_splits
from r2v.errors import R2VError

if TYPE_CHECKING:
    from r2v.config import R2VConfig

POLICIES = ("oracle", "random")


def check_env(
    cfg: "R2VConfig", policy: str, episodes: int, perturbed: bool = True, split: str | None = None
) -> dict[str, Any]:
    """Play `episodes` episodes, cycling over the tasks (perturbation seed = 0, 1, ... per pass)."""
    if policy not in POLICIES:
        raise R2VError(f"--policy {policy!r} is not one of {list(POLICIES)}")
    if episodes < 1:
        raise R2VError(f"--episodes must be >= 1, got {episodes}")
    if split is None:
        tasks = load_tasks(cfg.env)
    else:
        splits = task_splits(cfg.env)
        if split not in splits:
            raise R2VError(f"--split {split!r} is not one of {sorted(splits)}")
        tasks = splits[split]
    if not tasks:
        raise R2VError(f"env {cfg.env.name!r} has no tasks" + (f" in split {split!r}" if split else "")
                       + "; check the env section of the config (levels, games, dataset path)")
    env = make_env(cfg.env, perturbed=perturbed)
    start = time.perf_counter()
    wins, steps, tool_failures, invalid = 0, 0, 0, 0
    outcomes: list[tuple[str, bool]] = []  # (task id, won) per episode: CIs by game need the game of each
    counts: Counter[str] = Counter()
    cap = cfg.env.max_steps + 5  # an env must end episodes itself; this only stops a broken one
    try:
        for i in range(episodes):
            task, seed = tasks[i % len(tasks)], i // len(tasks)
            rng = random.Random(stable_seed("check", task.task_id, seed))
            obs = env.reset(task, seed)
            counts.update(getattr(env, "reset_info", {}).get("perturbations", []))
            for n in range(1, cap + 1):
                if policy == "oracle":
                    action = env.oracle_action()
                    if action is None:
                        raise R2VError(f"env {env.name!r} has no oracle action for task {task.task_id}")
                else:
                    action = rng.choice(obs.admissible) if obs.admissible else env.sample_action(rng)
                result = env.step(action)
                obs = result.observation
                counts.update(result.info.get("perturbations", []))
                tool_failures += bool(result.info.get("tool_failed"))
                invalid += bool(result.info.get("invalid_action"))
                if result.done:
                    break
            else:
                raise R2VError(f"env {env.name!r} did not end task {task.task_id} within {cap} steps "
                               f"(env.max_steps = {cfg.env.max_steps})")
            wins += bool(result.success)
            outcomes.append((task.task_id, bool(result.success)))
            steps += n
    finally:
        env.close()
    wall = time.perf_counter() - start
    return {
        "env": cfg.env.name,
        "policy": policy,
        "perturbed": perturbed,
        "split": split,
        "episodes": episodes,
        "tasks": len(tasks),
        "success_rate": wins / episodes,
        "episode_task": [t for t, _ in outcomes],
        "episode_success": [w for _, w in outcomes],
        "mean_steps": steps / episodes,
        "tool_failures": tool_failures,
        "invalid_actions": invalid,
        "perturbations": dict(sorted(counts.items())),
        "wall_s": round(wall, 3),
        "ms_per_step": round(1000 * wall / max(steps, 1), 2),
    }

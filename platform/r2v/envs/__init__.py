"""Environments: a small text-env contract (base.py), a registry, perturbation wrappers."""
from r2v.envs.base import Env, Observation, StepResult, Task, split_tasks, stable_seed
from r2v.envs.registry import env_class, load_tasks, make_env, register_env, task_splits

__all__ = [
    "Env", "Observation", "StepResult", "Task", "split_tasks", "stable_seed",
    "env_class", "load_tasks", "make_env", "register_env", "task_splits",
]

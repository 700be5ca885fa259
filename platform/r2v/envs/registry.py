"""Name -> environment class. Modules are imported lazily: `textworld` is heavy and the code/terminal
envs need bubblewrap, so nothing is loaded until a run asks for that env."""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from r2v.envs.base import Env, Task, split_tasks
from r2v.errors import ConfigError

if TYPE_CHECKING:
    from r2v.config import EnvConfig

ENV_MODULES = {
    "textworld": "r2v.envs.textworld_env",
    "code": "r2v.envs.code",
    "terminal": "r2v.envs.terminal",
}
_ENVS: dict[str, type] = {}


def register_env(name: str):
    """Class decorator: the class has `from_config(env_cfg)` and `load_tasks(env_cfg)` classmethods."""

    def deco(cls):
        cls.name = name
        _ENVS[name] = cls
        return cls

    return deco


def env_class(name: str) -> type:
    if name not in _ENVS:
        if name not in ENV_MODULES:
            raise ConfigError(f"unknown env {name!r}; registered: {sorted(ENV_MODULES)}")
        importlib.import_module(ENV_MODULES[name])
    return _ENVS[name]


def make_env(cfg: "EnvConfig", perturbed: bool = True) -> Env:
    """The configured env, wrapped with the configured perturbations (all rates 0 = unwrapped)."""
    env = env_class(cfg.name).from_config(cfg)
    if perturbed:
        from r2v.envs.perturbations import wrap_with_perturbations

        env = wrap_with_perturbations(env, cfg.perturbations)
    return env


def load_tasks(cfg: "EnvConfig") -> list[Task]:
    return env_class(cfg.name).load_tasks(cfg)


def task_splits(cfg: "EnvConfig") -> dict[str, list[Task]]:
    tasks = load_tasks(cfg)
    by_id = {t.task_id: t for t in tasks}
    ids = split_tasks(list(by_id), tuple(cfg.split_fractions), cfg.split_seed)
    return {split: [by_id[t] for t in tids] for split, tids in ids.items()}

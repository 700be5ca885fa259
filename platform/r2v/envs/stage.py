"""Pipeline stage `tasks`: materialise the env's tasks (TextWorld games are generated and cached) and
fix the train/val/test split every later stage reads."""
from __future__ import annotations

import json
from typing import Any

from r2v.config import R2VConfig
from r2v.envs.registry import task_splits
from r2v.experiment import Experiment


def run_tasks(cfg: R2VConfig) -> dict[str, Any]:
    if cfg.env.name == "textworld":
        from r2v.ray_utils import init_ray

        init_ray(cfg)  # games are generated in parallel Ray tasks
    splits = task_splits(cfg.env)
    path = Experiment(cfg).splits_file
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"env": cfg.env.name, "splits": {k: [t.task_id for t in v] for k, v in splits.items()}}
    path.write_text(json.dumps(doc, indent=2))
    return {f"n_{k}": len(v) for k, v in splits.items()}


def read_splits(cfg: R2VConfig) -> dict[str, list[str]]:
    path = Experiment(cfg).splits_file
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run `r2v tasks --config ...` (the pipeline's first stage)")
    return json.loads(path.read_text())["splits"]

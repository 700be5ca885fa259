"""The stage graph: which stage consumes which artifacts, and how a pipeline run resumes.

Every stage is a plain function `fn(cfg) -> dict` (a summary with its artifacts and numbers) living in its
component package; the CLI and jobs/ only parse config and call `run_stage`. A finished stage leaves a
marker `runs/<exp>/.stages/<stage>.json` holding the hash of the config sections it reads: a re-run skips
it while that hash is unchanged, `--from STAGE` forces it and everything after it.
"""
from __future__ import annotations

import importlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from r2v.config import R2VConfig, config_hash
from r2v.errors import R2VError, StageNotBuilt


@dataclass(frozen=True)
class Stage:
    name: str
    target: str | None  # "module:function"; None = not built yet
    reads: tuple[str, ...]  # config sections whose change invalidates the stage
    consumes: str
    produces: str
    issue: int  # where the work is tracked while not built

    def function(self) -> Callable[[R2VConfig], dict[str, Any]]:
        if self.target is None:
            raise StageNotBuilt(f"stage `{self.name}` is not built yet (tracked in issue #{self.issue})")
        module, fn = self.target.split(":")
        return getattr(importlib.import_module(module), fn)


COMMON = ("experiment", "seed", "env")
STAGES: tuple[Stage, ...] = (
    Stage("tasks", "r2v.envs.stage:run_tasks", COMMON, "conf", "tasks/splits.json (+ generated games)", 3),
    Stage("collect-teacher", "r2v.rollout.stage:run_collect_teacher", COMMON + ("teacher", "collect"), "tasks", "rollouts/teacher/*.parquet", 4),
    Stage("init-model", "r2v.policies.init_model:run_init_model", COMMON + ("model",), "rollouts/teacher", "models/init/", 4),
    Stage("train-bc", "r2v.train.bc:run_train_bc", COMMON + ("model", "policy", "bc"), "rollouts/teacher, models/init", "models/bc/", 5),
    Stage("build-pairs", "r2v.rollout.pairs:run_build_pairs", COMMON + ("policy", "verifier", "dpo"), "models/bc", "pairs/*.parquet", 5),
    Stage("train-dpo", "r2v.train.dpo:run_train_dpo", COMMON + ("policy", "dpo"), "pairs, models/bc", "models/dpo/", 5),
    Stage("train-verifier", "r2v.verifier.learned:run_train_verifier", COMMON + ("verifier",), "rollouts", "models/verifier/", 9),
    Stage("collect-router", "r2v.rollout.router_rows:run_collect_router", COMMON + ("policy", "router"), "models/dpo", "router/*.parquet", 9),
    Stage("train-router", "r2v.router.stage:run_train_router", COMMON + ("router",), "router rows", "models/router/", 9),
    Stage("sweep", "r2v.tune.sweep:run_sweep", COMMON + ("router", "sweep"), "router rows", "sweep/frontier.parquet, best-*.yaml", 6),
    Stage("eval", "r2v.eval.live:run_eval", COMMON + ("router", "eval", "teacher"), "models/*", "eval/*.parquet", 9),
    Stage("report", "r2v.eval.report:run_report", COMMON + ("eval",), "eval", "report/results.json, *.md, *.png", 9),
)
STAGE_NAMES = tuple(s.name for s in STAGES)


def get_stage(name: str) -> Stage:
    for s in STAGES:
        if s.name == name:
            return s
    raise R2VError(f"unknown stage {name!r}; stages: {', '.join(STAGE_NAMES)}")


def marker_path(cfg: R2VConfig, stage: str) -> Path:
    return cfg.experiment_dir / ".stages" / f"{stage}.json"


def is_complete(cfg: R2VConfig, stage: Stage) -> bool:
    path = marker_path(cfg, stage.name)
    if not path.is_file():
        return False
    try:
        return json.loads(path.read_text()).get("config_hash") == config_hash(cfg, *stage.reads)
    except json.JSONDecodeError:
        return False


def run_stage(cfg: R2VConfig, name: str, tracker=None) -> dict[str, Any]:
    """Run one stage (no skip logic: asking for a stage by name means run it) and leave its marker."""
    stage = get_stage(name)
    fn = stage.function()
    from r2v.tracking import Tracker

    tracker = tracker or Tracker(cfg)
    t0 = time.time()
    with tracker.stage_run(stage.name):
        summary = fn(cfg) or {}
        wall = time.time() - t0
        tracker.log_metrics({f"{k}": v for k, v in summary.items() if isinstance(v, (int, float))})
        tracker.log_metrics({"wall_s": wall})
    path = marker_path(cfg, stage.name)
    path.parent.mkdir(parents=True, exist_ok=True)
    marker = {"stage": stage.name, "config_hash": config_hash(cfg, *stage.reads), "wall_s": wall,
              "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"), "summary": summary}
    path.write_text(json.dumps(marker, indent=2, default=str))
    return {**summary, "wall_s": wall}


def run_pipeline(cfg: R2VConfig, from_stage: str | None = None, until: str | None = None,
                 echo: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Run the stage graph in order, skipping completed stages; returns one status row per stage."""
    from r2v.tracking import Tracker

    names = list(STAGE_NAMES)
    start = names.index(get_stage(from_stage).name) if from_stage else 0
    stop = names.index(get_stage(until).name) if until else len(names) - 1
    rows: list[dict[str, Any]] = []
    tracker = Tracker(cfg)
    with tracker.pipeline_run(f"pipeline:{cfg.experiment}"):
        for i, stage in enumerate(STAGES):
            if i > stop:
                break
            if stage.target is None:
                echo(f"[{i + 1:2d}/{len(STAGES)}] {stage.name:<16} not built yet (issue #{stage.issue})")
                rows.append({"stage": stage.name, "status": "not built", "wall_s": 0.0})
                continue
            forced = from_stage is not None and i >= start
            if not forced and is_complete(cfg, stage):
                echo(f"[{i + 1:2d}/{len(STAGES)}] {stage.name:<16} done earlier, skipped")
                rows.append({"stage": stage.name, "status": "skipped", "wall_s": 0.0})
                continue
            echo(f"[{i + 1:2d}/{len(STAGES)}] {stage.name:<16} running ...")
            result = run_stage(cfg, stage.name, tracker)
            echo(f"[{i + 1:2d}/{len(STAGES)}] {stage.name:<16} done in {result['wall_s']:.1f}s")
            rows.append({"stage": stage.name, "status": "ran", "wall_s": result["wall_s"], "summary": result})
    return rows

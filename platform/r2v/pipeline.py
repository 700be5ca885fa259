"""The stage graph: which stage consumes which stage's products, and how a pipeline run resumes.

Every stage is a plain function `fn(cfg) -> dict` (a summary with its artifacts and numbers) living in its
component package; the CLI and jobs/ only parse config and call `run_stage`. A finished stage leaves a
marker `runs/<exp>/.stages/<stage>.json` holding a hash per config section it reads and the digest of each
upstream stage's marker as it was when the stage ran. A stage is up to date while both are unchanged; since a
marker's digest covers its own upstream digests, a change anywhere re-runs everything downstream of it (a
Merkle chain). `plan` says run or skip and why (`r2v run --dry-run` prints it, like `make -n`); `--from STAGE`
forces that stage and all later ones. A marker written before markers had provenance is treated as stale.
"""
from __future__ import annotations

import hashlib
import importlib
import json
import time
import uuid
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from r2v.config import R2VConfig, to_dict
from r2v.errors import R2VError
from r2v.experiment import Experiment


@dataclass(frozen=True)
class Stage:
    name: str
    target: str  # "module:function"
    reads: tuple[str, ...]  # config sections (or dotted keys) whose change invalidates the stage
    upstream: tuple[str, ...]  # stages whose products it reads: a re-run of any of them invalidates it
    products: str  # what it writes under runs/<exp>/ (documentation)

    def function(self) -> Callable[[R2VConfig], dict[str, Any]]:
        module, fn = self.target.split(":")
        return getattr(importlib.import_module(module), fn)


COMMON = ("experiment", "seed", "env")
STAGES: tuple[Stage, ...] = (
    Stage("tasks", "r2v.envs.stage:run_tasks", COMMON, (), "tasks/splits.json (+ generated games)"),
    Stage("collect-teacher", "r2v.rollout.stage:run_collect_teacher", COMMON + ("teacher", "collect"),
          ("tasks",), "rollouts/teacher/*.parquet"),
    Stage("init-model", "r2v.policies.init_model:run_init_model", COMMON + ("model",),
          ("collect-teacher",), "models/init/ (tokenizer trained on teacher text)"),
    Stage("train-bc", "r2v.train.bc:run_train_bc", COMMON + ("model", "policy", "bc"),
          ("collect-teacher", "init-model"), "models/bc/"),
    Stage("build-pairs", "r2v.rollout.pairs:run_build_pairs", COMMON + ("policy", "verifier", "dpo"),
          ("tasks", "train-bc"), "rollouts/pair-probes/, pairs/*.parquet"),
    Stage("train-dpo", "r2v.train.dpo:run_train_dpo", COMMON + ("policy", "dpo"),
          ("build-pairs", "train-bc"), "models/dpo/"),
    Stage("train-verifier", "r2v.verifier.learned:run_train_verifier", COMMON + ("verifier",),
          ("collect-teacher", "build-pairs"), "models/verifier/"),
    # which SLM (bc | dpo) every later stage plays and Serve deploys: a changed decision re-runs all of them
    Stage("select-policy", "r2v.rollout.selection:run_select_policy",
          COMMON + ("model", "policy", "verifier", "selection"), ("tasks", "train-bc", "train-dpo", "train-verifier"),
          "rollouts/select-*/ (validation episodes), models/selected.json"),
    Stage("collect-router", "r2v.rollout.router_rows:run_collect_router", COMMON + ("policy", "verifier", "teacher", "router"),
          ("tasks", "train-bc", "train-dpo", "train-verifier", "select-policy"),
          "rollouts/slm-router/, branches, router/*.parquet"),
    # eval.budgets: router.choose_budget picks the default budget among them
    Stage("train-router", "r2v.router.stage:run_train_router",
          COMMON + ("policy", "verifier", "teacher", "router", "eval.budgets"),
          ("collect-router", "select-policy"), "models/router/, rollouts/budget-calibration/ (routed probes that set τ)"),
    Stage("sweep", "r2v.tune.sweep:run_sweep", COMMON + ("policy", "verifier", "teacher", "router", "sweep"),
          ("collect-router", "train-bc", "train-dpo", "select-policy"), "sweep/frontier.parquet, best-*.yaml (τ set live)"),
    Stage("eval", "r2v.eval.live:run_eval", COMMON + ("router", "eval", "teacher"),
          ("tasks", "train-bc", "train-dpo", "train-verifier", "select-policy", "collect-router", "train-router"),
          "eval/episodes/, eval/summary.json"),
    Stage("report", "r2v.eval.report:run_report", COMMON + ("eval",),
          ("select-policy", "eval", "sweep", "collect-router", "train-router"), "report/results.json, *.md, *.png"),
)
STAGE_NAMES = tuple(s.name for s in STAGES)

# Stages whose products are deterministic files: a run is identified by their bytes, so re-running such a
# stage by hand (`r2v tasks`, `--from init-model`) and getting the same bytes leaves downstream up to date
# (select-policy plays episodes, but its product is the decision and its counts).
# Every other stage (episode shards carry latencies) is identified by its run id: any re-run invalidates
# what was built from it.
CONTENT_ADDRESSED: dict[str, Callable[[Experiment], list[Path]]] = {
    "tasks": lambda e: [e.splits_file],
    "init-model": lambda e: [e.model("init")],
    "train-bc": lambda e: [e.model("bc")],
    "train-dpo": lambda e: [e.model("dpo")],
    "train-verifier": lambda e: [e.model("verifier")],
    "select-policy": lambda e: [e.selection_file],
}


def get_stage(name: str) -> Stage:
    for s in STAGES:
        if s.name == name:
            return s
    raise R2VError(f"unknown stage {name!r}; stages: {', '.join(STAGE_NAMES)}")


def marker_path(cfg: R2VConfig, stage: str) -> Path:
    return Experiment(cfg).marker(stage)


def read_marker(cfg: R2VConfig, stage: str) -> dict[str, Any] | None:
    """The stage's marker; None when it never finished, {} when the file is unreadable."""
    path = marker_path(cfg, stage)
    if not path.is_file():
        return None
    try:
        marker = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return marker if isinstance(marker, dict) else {}


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def section_hashes(cfg: R2VConfig) -> dict[str, str]:
    """A hash per top-level config section, and per dotted key a stage reads alone (`eval.budgets`); one
    `to_dict`, the slow part, for all of them."""
    tree = to_dict(cfg)
    hashes = {name: _digest(value) for name, value in tree.items()}
    for key in {r for stage in STAGES for r in stage.reads if "." in r}:
        node = tree
        for part in key.split("."):
            node = node[part]
        hashes[key] = _digest(node)
    return hashes


def content_digest(paths: list[Path]) -> str:
    """sha256 over the bytes of every file under `paths` (names relative to each path, sorted)."""
    h = hashlib.sha256()
    for top in paths:
        if top.is_dir():
            files = [(str(f.relative_to(top)), f) for f in sorted(top.rglob("*")) if f.is_file()]
        else:
            files = [(top.name, top)] if top.is_file() else []
        for name, f in files:
            h.update(f"{name}\0".encode())
            with f.open("rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
    return h.hexdigest()[:16]


def marker_digest(marker: dict[str, Any] | None) -> str | None:
    """Identity of one finished run of a stage: its config, its upstream digests, and either the digest
    of its products (`CONTENT_ADDRESSED` stages) or its run id (a re-run invalidates downstream)."""
    if not marker:
        return None
    identity = "products" if marker.get("products") else "run_id"
    return _digest({k: marker.get(k) for k in ("sections", "upstream", identity)})


def stale_reason(cfg: R2VConfig, stage: Stage, hashes: dict[str, str], rerun: Collection[str] = ()) -> str | None:
    """Why `stage` must run, or None when its marker is up to date. `hashes`: `section_hashes(cfg)`;
    `rerun`: upstream stages that will run."""
    marker = read_marker(cfg, stage.name)
    if marker is None:
        return "no marker (never ran)"
    if not marker:
        return f"marker unreadable ({marker_path(cfg, stage.name)})"
    if "sections" not in marker or "upstream" not in marker:
        return "marker predates provenance (written by an older r2v)"
    changed = [s for s in stage.reads if marker["sections"].get(s) != hashes.get(s)]
    if changed:
        return f"config section{'s' * (len(changed) > 1)} {', '.join(changed)} changed"
    for up in stage.upstream:
        if up in rerun:
            return f"upstream {up} will re-run"
    for up in stage.upstream:
        if marker["upstream"].get(up) != marker_digest(read_marker(cfg, up)):
            return f"upstream {up} changed since this stage ran"
    return None


@dataclass(frozen=True)
class Decision:
    stage: str
    action: str  # run | skip
    reason: str


def plan(cfg: R2VConfig, from_stage: str | None = None, until: str | None = None) -> list[Decision]:
    """Run or skip, with the reason, for each stage up to `until`; reads markers only (no Ray, nothing runs)."""
    start = STAGE_NAMES.index(get_stage(from_stage).name) if from_stage else len(STAGES)
    stop = STAGE_NAMES.index(get_stage(until).name) if until else len(STAGES) - 1
    decisions, rerun, hashes = [], set(), section_hashes(cfg)
    for i, stage in enumerate(STAGES[: stop + 1]):
        reason = "forced by --from" if i >= start else stale_reason(cfg, stage, hashes, rerun)
        if reason:
            rerun.add(stage.name)
        decisions.append(Decision(stage.name, "run" if reason else "skip", reason or "up to date"))
    return decisions


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
    hashes = section_hashes(cfg)
    sections = {s: hashes[s] for s in stage.reads}
    products = CONTENT_ADDRESSED.get(stage.name)
    marker = {"stage": stage.name, "config_hash": _digest(sections), "sections": sections,
              "upstream": {up: marker_digest(read_marker(cfg, up)) for up in stage.upstream},
              "run_id": uuid.uuid4().hex, "products": content_digest(products(Experiment(cfg))) if products else None,
              "wall_s": wall, "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"), "summary": summary}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(marker, indent=2, default=str))
    tmp.replace(path)
    return {**summary, "wall_s": wall}


def brief(summary: dict[str, Any], n: int = 6) -> str:
    """A stage's first few numbers for its progress line (the marker and MLflow keep them all)."""
    nums = [(k, v) for k, v in summary.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "wall_s"][:n]
    return "  ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in nums)


def run_pipeline(cfg: R2VConfig, from_stage: str | None = None, until: str | None = None,
                 echo: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Run the stages `plan` marks `run`, in order; returns one status row per stage."""
    from r2v.tracking import Tracker

    decisions = plan(cfg, from_stage, until)
    rows: list[dict[str, Any]] = []
    tracker = Tracker(cfg)
    with tracker.pipeline_run(f"pipeline:{cfg.experiment}"):
        for i, d in enumerate(decisions):
            tag = f"[{i + 1:2d}/{len(STAGES)}] {d.stage:<16}"
            if d.action == "skip":
                echo(f"{tag} skipped ({d.reason})")
                rows.append({"stage": d.stage, "status": "skipped", "reason": d.reason, "wall_s": 0.0})
                continue
            echo(f"{tag} running ({d.reason}) ...")
            result = run_stage(cfg, d.stage, tracker)
            echo(f"{tag} done in {result['wall_s']:.1f}s  {brief(result)}".rstrip())
            rows.append({"stage": d.stage, "status": "ran", "reason": d.reason, "wall_s": result["wall_s"],
                         "summary": result})
    return rows

"""Router recipes, live on validation games: which features and model the deployed router reads, with what grace.

    python -m bench.router_recipes [--exp quickstart] [--config conf/<exp>.yaml] [--runs-dir runs]
                                   [--recipe NAME KEY=VALUE ...] ...

A recipe is a name and a few `router.*` overrides on the experiment's preset. Each one is trained exactly as
`r2v train-router` trains the preset (same fit and calibration rows, cross-fitting, CVaR objective, τ set by
routed episodes on the validation games, and with `router.choose_budget` the search over `eval.budgets`), in a
scratch copy of the finished run (`<runs-dir>/_recipes/<exp>-<recipe>/`: its router rows, models and tasks;
the run itself is untouched, and a re-run resumes each recipe's routed probes). What it reports is what those
probes measured on the validation games: success @ live LLM calls/step at each budget. Test games are never
played: this is the comparison a preset's router choice is made on (then `bench.router_matrix` shows it on the
test games). Recipes whose router config equals the preset's are the preset. Writes runs/bench/router_recipes.json
(another experiment: router_recipes_<exp>.json, so the quickstart's table is not overwritten).
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

from bench import MISSING_INPUT, write_result

CONFIDENCE = "[proposal_prob,proposal_logprob_margin,mean_logprob_best,entropy]"
DECISION = "[verifier_proposal,verifier_proposal_gap,proposal_prob,proposal_logprob_margin]"
RECIPES: dict[str, list[str]] = {
    "mlp, all features": ["router.features=[]", "router.hidden_sizes=[128,64]"],
    "logistic, all features": ["router.features=[]", "router.hidden_sizes=[]"],
    "logistic, SLM confidence": [f"router.features={CONFIDENCE}", "router.hidden_sizes=[]"],
    "logistic, proposal's verifier score + confidence": [f"router.features={DECISION}", "router.hidden_sizes=[]"],
    # router.grace: escalations per episode at a proposal the agent can take back that let the SLM try first
    **{f"mlp, all features, grace {g}": ["router.features=[]", "router.hidden_sizes=[128,64]", f"router.grace={g}"]
       for g in (0, 1, 2, 3, 4)},
    # router.carry: steps a call that changed nothing (the teacher took the SLM's own proposal) carries on to
    "mlp, all features, grace 3, no carry": ["router.features=[]", "router.hidden_sizes=[128,64]", "router.grace=3",
                                             "router.carry=0"],
}
COPIED = ("router", "models", "tasks")  # what train-router reads of a finished run


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def router_config(config: str, overrides: list[str]) -> dict[str, Any]:
    from dataclasses import asdict

    from r2v.config import load_config

    return asdict(load_config(config, overrides).router)


def scratch_copy(run: Path, scratch: Path) -> None:
    """The run's router rows, models and tasks into `scratch` (replaced: a retrained SLM must not leave files of
    the old one); the scratch's own routed probes stay, and are set aside by their inputs' fingerprint if stale."""
    for name in COPIED:
        if (scratch / name).exists():
            shutil.rmtree(scratch / name)
        shutil.copytree(run / name, scratch / name)


def points(meta: dict[str, Any]) -> list[dict[str, Any]]:
    """(budget, live calls/step, success) of each budget the live search settled, from router.json."""
    info = meta.get("threshold_info") or {}
    choice = info.get("budget_choice") or {}
    if choice.get("candidates"):
        return [{k: c[k] for k in ("budget", "rate", "success", "grace") if k in c} for c in choice["candidates"]]
    if info.get("live_rate") is None:
        return []
    return [{"budget": info.get("budget"), "rate": info["live_rate"], "success": info.get("val_success")}]


def points_line(pts: list[dict[str, Any]]) -> str:
    """The points on one console line: success@calls/step per budget."""
    return "  ".join(f"{p['success']:.3f}@{p['rate']:.3f}" for p in pts)


def train_recipe(args, name: str, overrides: list[str], prepare: Callable[[Path], None] | None = None
                 ) -> dict[str, Any]:
    """Train one recipe in its scratch copy of the run; `prepare(copy)` may change the copy's rows first."""
    exp = f"{args.exp}-{slug(name)}"
    scratch_root = Path(args.runs_dir) / "_recipes"
    scratch = scratch_root / exp
    scratch.mkdir(parents=True, exist_ok=True)
    scratch_copy(Path(args.runs_dir) / args.exp, scratch)
    if prepare is not None:
        prepare(scratch)
    cmd = [sys.executable, "-m", "r2v.cli", "train-router", "--config", args.config, f"runs_dir={scratch_root}",
           f"experiment={exp}", *overrides]
    print(f"[router_recipes] {name}: {' '.join(overrides) or 'the preset router config'}", flush=True)
    log = scratch / "train-router.log"
    with log.open("w") as fh:
        rc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT).returncode
    if rc:
        tail = log.read_text(errors="replace")[-1500:]
        return {"recipe": name, "overrides": overrides, "status": f"failed (exit {rc}; {log})", "log_tail": tail}
    meta = json.loads((scratch / "models" / "router" / "router.json").read_text())
    info = meta.get("threshold_info") or {}
    return {"recipe": name, "overrides": overrides, "status": "ok", "architecture": meta.get("architecture"),
            "inputs": len(meta["inputs"]),
            "calibrated_on": info.get("calibrated_on"), "points": points(meta),
            "chosen_budget": (info.get("budget_choice") or {}).get("chosen")}


def parse_recipes(given: list[list[str]] | None) -> dict[str, list[str]]:
    if not given:
        return dict(RECIPES)
    out = {}
    for name, *overrides in given:
        bad = [o for o in overrides if not o.startswith("router.") or "=" not in o]
        if bad:
            raise SystemExit(f"--recipe {name!r}: {bad} are not `router.KEY=VALUE` overrides")
        out[name] = overrides
    return out


def run_parser(doc: str) -> argparse.ArgumentParser:
    """The arguments of a bench that trains routers in scratch copies of a finished run."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--exp", default="quickstart")
    ap.add_argument("--config", default=None, help="the experiment's preset (default conf/<exp>.yaml)")
    ap.add_argument("--runs-dir", default="runs")
    return ap


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = run_parser(__doc__)
    ap.add_argument("--recipe", nargs="+", action="append", metavar=("NAME", "KEY=VALUE"),
                    help="a recipe: a name, then router.* overrides (repeatable; default: the built-in list)")
    ap.add_argument("--out", default=None, help="default runs/bench/router_recipes[_<exp>].json")
    args = ap.parse_args(argv)
    args.config = args.config or f"conf/{args.exp}.yaml"
    args.out = args.out or f"runs/bench/router_recipes{'' if args.exp == 'quickstart' else '_' + args.exp}.json"
    run = Path(args.runs_dir) / args.exp
    missing = [n for n in COPIED if not (run / n).is_dir()]
    if missing:
        print(f"{run}: no {', '.join(missing)}: run the pipeline first "
              f"(.venv/bin/r2v run --config {args.config} --until train-router)")
        return {"status": "missing"}
    preset = router_config(args.config, [f"experiment={args.exp}"])
    recipes = {"preset": []}
    for name, overrides in parse_recipes(args.recipe).items():
        if router_config(args.config, [f"experiment={args.exp}", *overrides]) == preset:
            print(f"[router_recipes] {name}: the preset's own router config, measured as `preset`")
            continue
        recipes[name] = overrides
    rows = [train_recipe(args, name, overrides) for name, overrides in recipes.items()]

    print(f"\nRouter recipes on the validation games ({args.exp}): success @ live LLM calls/step per budget")
    for r in rows:
        pts = points_line(r.get("points", []))
        print(f"{r['recipe']:<50}{r.get('architecture') or r['status']}\n    {pts}")
    result = {"status": "ok", "experiment": args.exp, "config": args.config,
              "preset_router": {k: preset[k] for k in ("label", "features", "hidden_sizes", "budget", "grace", "carry")},
              "rows": rows}
    return write_result(args.out, result)


if __name__ == "__main__":
    sys.exit(0 if main(sys.argv[1:]).get("status") == "ok" else MISSING_INPUT)

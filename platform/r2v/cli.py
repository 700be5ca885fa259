"""`r2v`: one command per pipeline stage, plus `run` (the whole graph), `config show` and `envs check`.

Every stage command is `r2v <stage> --config FILE [key=value ...]` and calls the same library function as
`jobs/<stage>.py` under `ray job submit`. User errors print one line and exit non-zero, no traceback.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from r2v.errors import R2VError

# Commands that are not stages of the pipeline graph: (library target, help).
EXTRA_COMMANDS: dict[str, tuple[str, str]] = {
    "collect": ("r2v.rollout.stage:run_collect",
                "collect rollouts with collect.policy=teacher|slm|routed into Parquet shards"),
    "calibrate": ("r2v.router.stage:run_calibrate",
                  "map a target LLM-call budget to a router threshold; print the realised rate"),
    "serve": ("r2v.serve.app:run_serve", "deploy the routed agent as a Ray Serve app (HTTP, OpenAI-compatible)"),
    "submit": ("r2v.submit:run_submit", "submit the pipeline (or one stage) as a Ray job to a cluster"),
}
STAGE_HELP = {
    "tasks": "generate/load the env's tasks and fix the train/val/test split",
    "collect-teacher": "teacher rollouts under perturbation seeds -> rollouts/teacher/*.parquet",
    "init-model": "build the tiny quickstart SLM (tokenizer + model) as an HF directory",
    "train-bc": "behavioral cloning on teacher steps (Ray Train + DeepSpeed)",
    "build-pairs": "verifier-ranked preference pairs from the BC policy under perturbations",
    "train-dpo": "DPO + consistency (JSD) regularisation (Ray Train + DeepSpeed, TRL)",
    "train-verifier": "train the learned process verifier",
    "select-policy": "play BC and DPO alone on the validation games; deploy DPO only if it wins clearly more",
    "collect-router": "SLM rollouts under many seeds + counterfactual branches -> router rows",
    "train-router": "train the calibrated CVaR router (dual ascent, temperature scaling)",
    "sweep": "Ray Tune sweep over router hyper-parameters and budgets -> Pareto frontier",
    "eval": "live evaluation of R2V and baselines on held-out tasks",
    "report": "results.json, markdown table and plots",
}


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", help="YAML config (e.g. conf/quickstart.yaml); conf/base.yaml is always applied")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides, e.g. env.max_steps=20")


def _add_verbose(p: argparse.ArgumentParser) -> None:
    p.add_argument("--verbose", "-v", action="store_true",
                   help="show Ray's, Tune's and the workers' own logs here (default: in runs/<exp>/logs/)")


def build_parser() -> argparse.ArgumentParser:
    from r2v.pipeline import STAGES

    parser = argparse.ArgumentParser(
        prog="r2v",
        description="r2v: train an SLM agent and a calibrated router that escalates risky steps to a teacher LLM.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("run", help="run the whole pipeline (skips stages whose config and upstream are unchanged)")
    _add_config_args(p)
    _add_verbose(p)
    p.add_argument("--from", dest="from_stage", metavar="STAGE", help="re-run from this stage on")
    p.add_argument("--until", metavar="STAGE", help="stop after this stage")
    p.add_argument("--dry-run", "-n", action="store_true",
                   help="print which stages would run or be skipped, and why; run nothing (like make -n)")
    p.add_argument("--json", action="store_true", help="with --dry-run: print the plan as JSON")

    p = sub.add_parser("config", help="inspect configuration")
    csub = p.add_subparsers(dest="config_command", required=True)
    show = csub.add_parser("show", help="print the resolved config")
    _add_config_args(show)

    p = sub.add_parser("envs", help="environment utilities")
    esub = p.add_subparsers(dest="envs_command", required=True)
    chk = esub.add_parser("check", help="play episodes with the oracle or a random policy and summarise")
    _add_config_args(chk)
    chk.add_argument("--env", help="env name (textworld|code|terminal); overrides env.name")
    chk.add_argument("--policy", default="oracle", choices=["oracle", "random"])
    chk.add_argument("--episodes", type=int, default=20)
    chk.add_argument("--clean", action="store_true", help="disable perturbations")
    chk.add_argument("--split", default=None, help="train|val|test (default: all tasks)")
    chk.add_argument("--json", action="store_true", help="print the summary as JSON")

    for stage in STAGES:
        p = sub.add_parser(stage.name, help=STAGE_HELP.get(stage.name, ""))
        _add_config_args(p)
        _add_verbose(p)
    for name, (_, help_) in EXTRA_COMMANDS.items():
        p = sub.add_parser(name, help=help_)
        _add_config_args(p)
        _add_verbose(p)
        if name == "calibrate":
            p.add_argument("--budget", type=float, help="target LLM calls per step (default: router.budget, or the "
                           "one train-router chose with router.choose_budget)")
            p.add_argument("--write", action="store_true", help="store the threshold in models/router")
        if name == "submit":
            p.add_argument("--address", help="Ray dashboard address, e.g. http://head:8265 (default: RAY_ADDRESS)")
            p.add_argument("--stage", default="run", help="a stage name, or `run` for the pipeline (default)")
            p.add_argument("--no-wait", action="store_true", help="return after submitting")
    return parser


def _load(args):
    from r2v.config import load_config

    return load_config(args.config, args.overrides)


def _load_for_run(args):
    """The config, with library logs routed to runs/<exp>/logs/ unless --verbose (said once, up front)."""
    from r2v.ray_utils import quiet_logs

    cfg = _load(args)
    if not args.verbose:
        print(f"r2v: Ray/Tune logs go to {quiet_logs(cfg)}/ (--verbose shows them here)", flush=True)
    return cfg


def _print_plan(decisions, as_json: bool) -> None:
    if as_json:
        print(json.dumps([{"stage": d.stage, "action": d.action, "reason": d.reason} for d in decisions], indent=2))
        return
    for d in decisions:
        print(f"{d.stage:<16} {d.action:<5} {d.reason}")


def _print_table(rows: list[dict]) -> None:
    total = sum(r["wall_s"] for r in rows)
    print("\nstage            status      wall")
    for r in rows:
        print(f"{r['stage']:<16} {r['status']:<10} {r['wall_s']:7.1f}s")
    print(f"{'total':<27} {total:7.1f}s")


def dispatch(args) -> int:
    from r2v.pipeline import STAGE_NAMES, plan, run_pipeline, run_stage

    if args.command == "config":
        from r2v.config import to_yaml

        print(to_yaml(_load(args)), end="")
        return 0
    if args.command == "envs":
        from r2v.envs.check import check_env

        overrides = list(args.overrides) + ([f"env.name={args.env}"] if args.env else [])
        from r2v.config import load_config

        cfg = load_config(args.config, overrides)
        summary = check_env(cfg, policy=args.policy, episodes=args.episodes, perturbed=not args.clean, split=args.split)
        if args.json:
            print(json.dumps(summary, indent=2))
        else:
            for k, v in summary.items():
                if not k.startswith("episode_"):  # per-episode lists: --json has them
                    print(f"{k:>22}: {v}")
        return 0
    if args.command == "run":
        if args.dry_run:  # reads markers only: no Ray, no MLflow
            _print_plan(plan(_load(args), from_stage=args.from_stage, until=args.until), args.json)
            return 0
        if args.json:
            raise R2VError("--json goes with --dry-run (a real run prints its progress and a table)")
        rows = run_pipeline(_load_for_run(args), from_stage=args.from_stage, until=args.until)
        _print_table(rows)
        return 0
    if args.command in STAGE_NAMES:
        summary = run_stage(_load_for_run(args), args.command)
        print(json.dumps(summary, indent=2, default=str))
        return 0
    target, _ = EXTRA_COMMANDS[args.command]
    import importlib

    module, fn = target.split(":")
    kwargs = {}
    if args.command == "calibrate":
        kwargs = {"budget": args.budget, "write": args.write}
    if args.command == "submit":
        kwargs = {"config_path": args.config, "overrides": list(args.overrides), "address": args.address,
                  "stage": args.stage, "wait": not args.no_wait}
    summary = getattr(importlib.import_module(module), fn)(_load_for_run(args), **kwargs)
    print(json.dumps(summary, indent=2, default=str))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return dispatch(args)
    except R2VError as e:
        print(f"r2v: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("r2v: interrupted; completed shards and stages are kept, re-run to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

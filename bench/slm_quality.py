"""SLM quality by training stage: untrained vs BC vs DPO vs random admissible actions, on held-out games.

    python -m bench.slm_quality [--config conf/quickstart.yaml] [--split test] [--seeds 8]

Needs a finished quickstart run (models/init, models/bc, models/dpo under runs/<experiment>/). Every
episode is played live (the SLM acting alone, proposal = policy.select) clean and under the configured
perturbations; success is what the game reports. Writes runs/bench/slm_quality.json.
"""
from __future__ import annotations

import argparse
import copy
import json
import tempfile
from pathlib import Path


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="conf/quickstart.yaml")
    ap.add_argument("--split", default="test")
    ap.add_argument("--seeds", type=int, default=8)
    ap.add_argument("--out", default="runs/bench/slm_quality.json")
    ap.add_argument("overrides", nargs="*", help="config overrides, e.g. policy.rank_temperature=1.0")
    args = ap.parse_args(argv)

    import ray

    from r2v.config import load_config
    from r2v.data import ShardStore
    from r2v.envs.check import check_env
    from r2v.experiment import Experiment
    from r2v.policies.slm import start_slm_server
    from r2v.ray_utils import init_ray
    from r2v.rollout.engine import collect, plan_units
    from r2v.rollout.router_rows import RoutedAgentFactory
    from r2v.rollout.stage import tasks_by_split
    from r2v.router.baselines import make_router

    base = load_config(args.config, ["tracking.enabled=false", *args.overrides])
    init_ray(base)
    tmp = Path(tempfile.mkdtemp(prefix="r2v-slmq-"))
    seeds = list(range(args.seeds))
    rows = []
    for perturbed in (False, True):
        cfg = copy.deepcopy(base)
        if not perturbed:
            for fam in ("tool_flakiness", "partial_observability", "prompt_injection", "distractors"):
                setattr(cfg.env.perturbations, fam, 0.0)
        tasks = tasks_by_split(cfg, [args.split])
        for stage in ("init", "bc", "dpo"):
            model_dir = Experiment(cfg).model(stage)
            if not (model_dir / "config.json").is_file():
                print(f"[slm_quality] {model_dir} missing: run `make demo` first; skipped")
                continue
            server = start_slm_server(cfg, str(model_dir), cfg.collect.num_workers)
            factory = RoutedAgentFactory(str(model_dir), server, make_router("slm_only"), with_teacher=False)
            out = tmp / f"{stage}-{perturbed}"
            try:
                collect(cfg, plan_units(tasks, seeds, 1, "slm"), factory, out, progress=False)
            finally:
                ray.kill(server)
            ep = ShardStore(out, "steps").read_pandas().groupby("episode_id")["episode_success"].first()
            rows.append({"policy": f"slm:{stage}", "perturbed": perturbed, "episodes": int(len(ep)),
                         "success": round(float(ep.mean()), 3)})
        n = len(tasks[args.split]) * len(seeds)
        rnd = check_env(cfg, "random", n, perturbed=perturbed, split=args.split)
        rows.append({"policy": "random", "perturbed": perturbed, "episodes": rnd["episodes"],
                     "success": round(rnd["success_rate"], 3)})
    print(f"{'policy':<10}{'perturbed':>10}{'episodes':>10}{'success':>9}")
    for r in rows:
        print(f"{r['policy']:<10}{str(r['perturbed']):>10}{r['episodes']:>10}{r['success']:>9.3f}")
    result = {"split": args.split, "seeds": args.seeds, "config": args.config, "overrides": args.overrides,
              "rows": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()

"""SLM quality by training stage: untrained vs BC vs DPO vs random admissible actions, on held-out games.

    python -m bench.slm_quality [--config conf/quickstart.yaml] [--split val] [--seeds 4] [--clean-seeds 1]
                                [--models init,bc,dpo] [key=value ...]

Needs a finished quickstart run (models/init, models/bc, models/dpo under runs/<experiment>/). Every
episode is played live by `r2v.rollout.selection.play_slm_alone` (the SLM acting alone, proposal =
policy.select; the same function select-policy uses), clean and under the configured perturbations; success is
what the game reports, with a 95% CI by cluster bootstrap over games (r2v.eval.metrics). The default split is
`val` (the games model choices are made on); use `--split test` only for a final table. `--models` also takes
`name=path` for extra model directories (e.g. DPO ablations). Clean play of TextWorld games in rank mode is
deterministic per game, so clean episodes use `--clean-seeds` (default 1: more seeds repeat the same episodes).
Writes runs/bench/slm_quality.json.
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="conf/quickstart.yaml")
    ap.add_argument("--split", default="val", choices=["train", "val", "test"])
    ap.add_argument("--seeds", type=int, default=4, help="perturbation seeds of the perturbed episodes")
    ap.add_argument("--clean-seeds", type=int, default=1, help="seeds of the clean episodes")
    ap.add_argument("--models", default="init,bc,dpo",
                    help="comma-separated: a stage under runs/<exp>/models, or name=path to a model directory")
    ap.add_argument("--out", default="runs/bench/slm_quality.json")
    ap.add_argument("overrides", nargs="*", help="config overrides, e.g. policy.rank_temperature=1.0")
    args = ap.parse_args(argv)

    from r2v.config import load_config
    from r2v.envs.check import check_env
    from r2v.eval.metrics import success_with_ci
    from r2v.experiment import Experiment, is_model_dir
    from r2v.ray_utils import init_ray
    from r2v.rollout.selection import condition_config, outcome, play_slm_alone
    from r2v.rollout.stage import tasks_by_split

    base = load_config(args.config, ["tracking.enabled=false", *args.overrides])
    init_ray(base)
    tmp = Path(tempfile.mkdtemp(prefix="r2v-slmq-"))
    seeds = {c: s for c, s in (("clean", list(range(args.clean_seeds))), ("perturbed", list(range(args.seeds)))) if s}
    models = {}
    for item in args.models.split(","):
        name, _, path = item.partition("=")
        models[name] = Path(path) if path else Experiment(base).model(name)
    rows = []
    tasks = tasks_by_split(base, [args.split])
    for name, model_dir in models.items():
        if not is_model_dir(model_dir):
            print(f"[slm_quality] {model_dir} missing: run `make demo` first; skipped")
            continue
        episodes = play_slm_alone(base, model_dir, tasks, seeds, tmp / name)  # clean and perturbed, one pool
        for condition in seeds:
            r = outcome(episodes[episodes["condition"] == condition], base.eval.bootstrap_samples, base.seed)
            rows.append({"policy": f"slm:{name}", "perturbed": condition == "perturbed", "episodes": r["episodes"],
                         "games": r["games"], "success": round(r["success"], 3),
                         "success_ci": [round(x, 3) for x in r["success_ci"]]})
    for condition in seeds:
        cfg = condition_config(base, condition)
        n = len(tasks[args.split]) * len(seeds[condition])  # check_env cycles over the games, seed = pass index
        rnd = check_env(cfg, "random", n, perturbed=condition == "perturbed", split=args.split)
        _, ci = success_with_ci(rnd["episode_success"], cfg.eval.bootstrap_samples, cfg.seed, games=rnd["episode_task"])
        rows.append({"policy": "random", "perturbed": condition == "perturbed", "episodes": rnd["episodes"],
                     "games": rnd["tasks"], "success": round(rnd["success_rate"], 3),
                     "success_ci": [round(x, 3) for x in ci]})
    print(f"{'policy':<14}{'perturbed':>10}{'episodes':>9}{'games':>6}{'success':>9}  95% CI by game")
    for r in rows:
        print(f"{r['policy']:<14}{str(r['perturbed']):>10}{r['episodes']:>9}{r['games']:>6}{r['success']:>9.3f}"
              f"  [{r['success_ci'][0]:.2f}, {r['success_ci'][1]:.2f}]")
    result = {"split": args.split, "seeds": seeds, "config": args.config, "overrides": args.overrides,
              "models": {k: str(v) for k, v in models.items()}, "rows": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()

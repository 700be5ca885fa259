"""SLM quality by training stage: untrained vs BC vs DPO vs random admissible actions, on held-out games.

    python -m bench.slm_quality [--config conf/quickstart.yaml] [--split val] [--seeds 4] [--clean-seeds 1]
                                [--models init,bc,dpo] [--ablate all|none|bc,consistency,dpo] [key=value ...]

Needs a finished quickstart run (models/init, models/bc, models/dpo under runs/<experiment>/). Every
episode is played live by `r2v.rollout.selection.play_slm_alone` (the SLM acting alone, proposal =
policy.select; the same function select-policy uses), clean and under the configured perturbations; success is
what the game reports, with a 95% CI by cluster bootstrap over games (r2v.eval.metrics). The default split is
`val` (the games model choices are made on); use `--split test` only for a final table. `--models` also takes
`name=path` for extra model directories. `--ablate` (default: every DPO term whose weight is > 0) trains, with
the run's own train-dpo recipe, pairs and BC model, one DPO model per term with that term's weight set to 0
(`dpo_weight`: the preference term, `bc_weight`: NLL of the chosen action, `consistency_weight`: the JSD between
perturbation seeds) into runs/bench/dpo_ablation/no_<term>/ and plays it like the others, so the table says
which term helps or hurts (a finished training run is reused, not repeated). Clean play of TextWorld games in
rank mode is deterministic per game, so clean episodes use `--clean-seeds` (default 1: more seeds repeat the same
episodes). Writes runs/bench/slm_quality.json.
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
    ap.add_argument("--split", default="val", choices=["train", "val", "test"])
    ap.add_argument("--seeds", type=int, default=4, help="perturbation seeds of the perturbed episodes")
    ap.add_argument("--clean-seeds", type=int, default=1, help="seeds of the clean episodes")
    ap.add_argument("--models", default="init,bc,dpo",
                    help="comma-separated: a stage under runs/<exp>/models, or name=path to a model directory")
    ap.add_argument("--ablate", default="all", help="DPO terms to train without (dpo, bc, consistency), `all` (every "
                    "term with a weight > 0) or `none`")
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
    models |= ablations(base, args.ablate)
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


ABLATION_DIR = Path("runs/bench/dpo_ablation")
TERMS = {"dpo": "dpo_weight", "bc": "bc_weight", "consistency": "consistency_weight"}


def ablations(base, which: str) -> dict[str, Path]:
    """{dpo-no_<term>: model dir} for each ablated DPO term, trained here unless a finished run is reused."""
    from r2v.errors import R2VError
    from r2v.experiment import Experiment
    from r2v.train.dpo import train_dpo

    if which == "none":
        return {}
    terms = [t for t, w in TERMS.items() if getattr(base.dpo, w) > 0] if which == "all" else which.split(",")
    bad = sorted(set(terms) - set(TERMS))
    if bad:
        raise SystemExit(f"--ablate: unknown DPO term(s) {bad}; known: {', '.join(TERMS)} (or all, none)")
    if not Experiment(base).model("bc").is_dir():
        print(f"[slm_quality] {Experiment(base).model('bc')} missing: run `make demo` first; no ablation")
        return {}
    out = {}
    for term in terms:
        if sum(getattr(base.dpo, w) > 0 for t, w in TERMS.items() if t != term) == 0:
            print(f"[slm_quality] dpo without {term} has no term left; skipped")
            continue
        cfg = copy.deepcopy(base)
        setattr(cfg.dpo, TERMS[term], 0.0)
        name, out_dir = f"dpo-no_{term}", ABLATION_DIR / f"no_{term}"
        try:
            summary = train_dpo(cfg, out_dir)
        except R2VError as e:
            raise SystemExit(f"--ablate {term}: {e}") from None
        how = f"reused {summary['reused_checkpoint']}" if summary.get("reused_checkpoint") else "trained"
        print(f"[slm_quality] {name}: {how} -> {out_dir}")
        out[name] = out_dir
    return out


if __name__ == "__main__":
    main()

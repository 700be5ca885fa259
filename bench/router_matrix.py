"""Every router at every matched live budget, on the quickstart's own models and held-out games.

    python -m bench.router_matrix [--config conf/quickstart.yaml] [--exp quickstart --runs-dir runs]

The demo evaluates R2V (fixed τ and paced) and random at each budget of `eval.budgets`; this bench adds
entropy, the verifier's score of the best candidate (`verifier`) and of the proposed action (`verifier_action`),
the heuristic rule's score, the pre-execution router and the training-free STEER-style router
(`eval.budget_methods` = all of them), each set by routed episodes on the calibration games to escalate the
budget's share of live steps, then played on the test games (`eval.paced_methods` are also played paced, as in
the demo). Episodes are cached per routing (router, τ) in runs/<exp>/eval/episodes, so the
demo's routings are not played again. The summary goes to runs/bench/router_matrix_summary.json (the demo's
eval/summary.json is left as it is) and the per-router frontier numbers (area under success vs calls/step on
[0, 0.5], calls/step to reach the teacher − 2 points) to runs/bench/router_matrix.json.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from bench import MISSING_INPUT, write_result

ALL_ROUTERS = ["r2v", "entropy", "random", "verifier", "verifier_action", "heuristic", "pre_execution", "steer"]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="conf/quickstart.yaml")
    ap.add_argument("--exp", default="quickstart")
    ap.add_argument("--runs-dir", default="runs")
    ap.add_argument("--out", default="runs/bench/router_matrix.json")
    args = ap.parse_args(argv)

    from r2v.config import load_config
    from r2v.eval.live import PACED, run_eval
    from r2v.eval.metrics import REDUNDANT_CALLS
    from r2v.data import ShardStore
    from r2v.eval.report import STEP_COLUMNS, frontier_of
    from r2v.experiment import Experiment

    cfg = load_config(args.config, [f"runs_dir={args.runs_dir}", f"experiment={args.exp}",
                                    f"eval.budget_methods=[{','.join(ALL_ROUTERS)}]"])
    if not (Experiment(cfg).model("router") / "router.json").is_file():
        print(f"no trained router in {Experiment(cfg).model('router')}: run `make demo` first")
        return {"status": "missing"}
    out = Path(args.out)
    summary_path = out.with_name("router_matrix_summary.json")
    run_eval(cfg, summary_path=summary_path)
    results = json.loads(summary_path.read_text())
    steps = ShardStore(Experiment(cfg).eval_episodes, "steps").read_pandas(columns=STEP_COLUMNS)
    frontier = frontier_of(results, steps, n_boot=cfg.eval.bootstrap_samples, seed=cfg.seed)
    print(f"\nEvery router at matched live budgets ({args.exp}, test games x {len(cfg.eval.perturbation_seeds)} seeds)")
    routers = [ALL_ROUTERS[0], *(f"{b}{PACED}" for b in cfg.eval.paced_methods), *ALL_ROUTERS[1:]]
    print(f"{'router':<15}" + "".join(f"{'@' + format(b, 'g'):>22}" for b in cfg.eval.budgets))
    for base in routers:
        cells = []
        for b in cfg.eval.budgets:
            r = results.get(f"{base}@{b:g}")
            cells.append(f"{r['success']:.3f} @ {r['llm_call_rate']:.3f}" if r else "–")
        print(f"{base:<15}" + "".join(f"{c:>22}" for c in cells))
    print(f"\nRedundant calls per budget: {REDUNDANT_CALLS}")
    for base in routers:
        shares = [(results.get(f"{base}@{b:g}") or {}).get("redundant_call_share") for b in cfg.eval.budgets]
        print(f"{base:<15}" + "".join(f"{'–' if v is None else format(v, '.2f'):>22}" for v in shares))
    print(f"\n{'router':<15}{'AUC [0, 0.5]':>14}{'calls to teacher-2pt':>22}")
    for base, row in frontier.items():
        to = row.get("calls_to_target")
        print(f"{base:<15}{row.get('auc') or float('nan'):>14.3f}{(f'{to:.3f}' if to is not None else 'not reached'):>22}")
    result = {"status": "ok", "experiment": args.exp, "budgets": list(cfg.eval.budgets), "routers": routers,
              "results": results, "frontier": frontier}
    return write_result(out, result)


if __name__ == "__main__":
    sys.exit(0 if main(sys.argv[1:]).get("status") == "ok" else MISSING_INPUT)

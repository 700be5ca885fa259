"""Routing quality: R2V vs the heuristic routers vs the references (SLM only, LLM only, oracle_teacher), live.

    python -m bench.routing_quality [--exp quickstart --runs-dir runs]

Reads the live evaluation's runs/<exp>/report/results.json (one object per method: success, success_ci,
llm_call_rate = teacher calls per step, episode_call_share, cost, ...; written by `r2v report`) and, when
present, the sweep's runs/<exp>/sweep/frontier.parquet. Prints:

1. every method's env-reported success [95% bootstrap CI], LLM calls per step, share of episodes with a
   call and cost per episode;
2. LLM-call rate at matched success: among the heuristic routers (random, entropy, heuristic, verifier,
   pre_execution) whose success is >= R2V's, the one with the fewest calls per step, and R2V's rate relative
   to it (< 1: R2V needs fewer teacher calls for at least the same success). Also the heuristic frontier
   interpolated at R2V's success (mixing two routers per episode reaches any point between them; SLM-only and
   LLM-only anchor the ends), and the best heuristic success at <= R2V's call rate (matched cost);
3. the sweep's Pareto front (validation OFFLINE estimates; live rows when the sweep re-evaluated points live).

Nothing is re-run: produce the inputs with the quickstart (`make demo`). Point estimates only; read the CIs
before calling a difference real. Writes runs/bench/routing_quality.json.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

from bench import MISSING_INPUT, write_result

HOW_TO = "make demo   (or: .venv/bin/r2v run --config conf/quickstart.yaml; then r2v eval + r2v report)"
HEURISTICS = ("random", "entropy", "heuristic", "verifier", "pre_execution", "steer")
REFERENCES = ("slm_only", "llm_only", "oracle_teacher", "hindsight")


def kind_of(name: str) -> str:
    if "@" in name:  # eval.budgets: the same router with τ set to a budget
        return kind_of(name.split("@")[0]) + " at a budget"
    if name == "r2v":
        return "R2V"
    if name == "r2v_paced":  # eval.paced_methods: τ moved between waves of test episodes toward the budget
        return "R2V paced"
    if name in HEURISTICS:
        return "heuristic router"
    if name == "oracle_teacher":
        return "oracle teacher (upper bound)"
    if name == "hindsight":
        return "hindsight oracle (upper bound)"
    if name in REFERENCES:
        return "reference"
    return "other"


def _num(v: Any) -> float:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return float("nan")
    return f


def frontier_rate_at(points: list[tuple[float, float]], target: float) -> float | None:
    """Lowest call rate reaching success `target` on the upper-left convex hull of (rate, success) points,
    mixing two neighbouring points linearly. None when no point reaches `target`."""
    pts = sorted({(r, s) for r, s in points if math.isfinite(r) and math.isfinite(s)})
    if not pts or max(s for _, s in pts) < target:
        return None
    # upper hull over increasing rate (the best success reachable at each rate by mixing)
    hull: list[tuple[float, float]] = []
    for p in pts:
        while len(hull) >= 2:
            (x1, y1), (x2, y2) = hull[-2], hull[-1]
            if (x2 - x1) * (p[1] - y1) - (y2 - y1) * (p[0] - x1) >= 0:  # hull[-1] lies on/below the chord
                hull.pop()
            else:
                break
        hull.append(p)
    best = None
    for (x1, y1), (x2, y2) in zip(hull, hull[1:] + [hull[-1]]):
        if y1 >= target:
            cand = x1
        elif y2 >= target and y2 > y1:
            cand = x1 + (target - y1) * (x2 - x1) / (y2 - y1)
        else:
            continue
        best = cand if best is None else min(best, cand)
    return best


def matched_success(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    if "r2v" not in results:
        return {"note": "no `r2v` method in results.json"}
    s0, r0 = _num(results["r2v"].get("success")), _num(results["r2v"].get("llm_call_rate"))
    heur = {n: results[n] for n in HEURISTICS if n in results}
    at_least = {n: r for n, r in heur.items() if _num(r.get("success")) >= s0 - 1e-12}
    out: dict[str, Any] = {"r2v_success": s0, "r2v_llm_call_rate": r0}
    if at_least:
        name = min(at_least, key=lambda n: (_num(at_least[n].get("llm_call_rate")), -_num(at_least[n].get("success"))))
        rate = _num(at_least[name].get("llm_call_rate"))
        out["best_heuristic_at_ge_success"] = {"method": name, "success": _num(at_least[name].get("success")),
                                               "llm_call_rate": rate}
        out["r2v_rate_relative"] = r0 / rate if rate > 0 else None
    else:
        out["best_heuristic_at_ge_success"] = None
        out["note"] = "no heuristic router reaches R2V's success"
    anchors = [(_num(r.get("llm_call_rate")), _num(r.get("success"))) for n, r in results.items()
               if n in HEURISTICS or n in ("slm_only", "llm_only")]
    interp = frontier_rate_at(anchors, s0)
    out["heuristic_frontier_rate_at_r2v_success"] = interp
    out["r2v_rate_relative_to_frontier"] = (r0 / interp) if interp else None
    cheaper = {n: r for n, r in heur.items() if _num(r.get("llm_call_rate")) <= r0 + 1e-12}
    if cheaper:
        name = max(cheaper, key=lambda n: (_num(cheaper[n].get("success")), -_num(cheaper[n].get("llm_call_rate"))))
        out["best_heuristic_at_le_rate"] = {"method": name, "success": _num(cheaper[name].get("success")),
                                            "llm_call_rate": _num(cheaper[name].get("llm_call_rate"))}
    else:
        out["best_heuristic_at_le_rate"] = None
    for ref in ("oracle_teacher", "hindsight"):
        if ref in results:
            out[ref] = {"success": _num(results[ref].get("success")),
                        "llm_call_rate": _num(results[ref].get("llm_call_rate"))}
    return out


def frontier_summary(path: Path, limit: int = 12) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    import pandas as pd

    f = pd.read_parquet(path)
    out: dict[str, Any] = {"path": str(path), "rows": int(len(f)),
                           "sources": {str(k): int(v) for k, v in f["source"].value_counts().items()}}
    cols = [c for c in ("source", "trial_id", "operating_point", "threshold", "tau", "success", "llm_call_rate",
                        "live_success_ci_lo", "live_success_ci_hi") if c in f.columns]
    pts = f[f["pareto"]] if "pareto" in f.columns else f
    pts = pts.sort_values(["source", "llm_call_rate", "success"]).drop_duplicates(["source", "llm_call_rate", "success"])
    out["pareto"] = json.loads(pts[cols].head(limit * 2).to_json(orient="records"))
    out["estimator"] = str(f["estimator"].iloc[0]) if "estimator" in f.columns and len(f) else None
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--exp", default="quickstart")
    ap.add_argument("--runs-dir", default="runs")
    ap.add_argument("--out", default="runs/bench/routing_quality.json")
    args = ap.parse_args(argv)

    exp = Path(args.runs_dir) / args.exp
    res_path = exp / "report" / "results.json"
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if not res_path.is_file():
        note = f"no live evaluation at {res_path}: run the quickstart first: {HOW_TO}"
        print(note)  # no JSON written: the last good one (if any) stays for bench.all and docs/results.md
        return {"status": "missing", "experiment": args.exp, "note": note}
    results = json.loads(res_path.read_text())
    results.pop("frontier", None)  # per-router curve summaries, not a method
    results.pop("slm_selection", None)  # select-policy's BC/DPO decision, not a method
    benchmark = results.pop("benchmark", None)  # the real benchmark tasks (eval.benchmark), reported apart
    import datetime as dt

    mtime = dt.datetime.fromtimestamp(res_path.stat().st_mtime, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    summary_path = exp / "eval" / "summary.json"
    stale = summary_path.is_file() and summary_path.stat().st_mtime > res_path.stat().st_mtime + 1
    rows = []
    for name, r in results.items():
        ci = r.get("success_ci") or [None, None]
        rows.append({"method": name, "kind": kind_of(name), "success": _num(r.get("success")),
                     "success_ci": [_num(ci[0]), _num(ci[1])], "llm_call_rate": _num(r.get("llm_call_rate")),
                     "llm_calls_per_episode": _num(r.get("llm_calls_per_episode")),
                     "steps_per_episode": _num(r.get("steps_per_episode")),
                     "episode_call_share": _num(r.get("episode_call_share")),
                     "redundant_call_share": _num(r.get("redundant_call_share")), "cost": _num(r.get("cost")),
                     "n_episodes": r.get("n_episodes"), "n_seeds": r.get("n_seeds")})
    order = {"R2V": 0, "R2V at a budget": 1, "R2V paced at a budget": 1, "heuristic router": 2, "heuristic router at a budget": 3,
             "reference": 4, "oracle teacher (upper bound)": 5}
    rows.sort(key=lambda x: (order.get(x["kind"], 6), x["llm_call_rate"] if math.isfinite(x["llm_call_rate"]) else 9))
    matched = matched_success(results)
    frontier = frontier_summary(exp / "sweep" / "frontier.parquet")
    result = {"status": "ok", "experiment": args.exp, "results_json": str(res_path), "results_mtime": mtime,
              "results_older_than_eval": bool(stale), "rows": rows, "matched": matched, "sweep_frontier": frontier,
              "benchmark": benchmark}

    n_ep = {r["n_episodes"] for r in rows}
    print(f"\nRouting quality, live on held-out tasks ({res_path}, {mtime}; episodes per method: "
          f"{'/'.join(str(n) for n in sorted(n_ep, key=str))})")
    if stale:
        print("WARNING: eval/summary.json is newer than report/results.json: re-run `r2v report`")
    print(f"{'method':<15}{'kind':<22}{'success [95% CI]':>22}{'LLM calls/step':>16}{'calls/ep':>10}{'steps/ep':>10}"
          f"{'eps w/ call':>13}{'redundant':>11}{'cost/ep':>9}")
    for r in rows:
        lo, hi = r["success_ci"]
        print(f"{r['method']:<15}{r['kind']:<22}{r['success']:>8.3f} [{lo:.2f}, {hi:.2f}]"
              f"{r['llm_call_rate']:>16.3f}{r['llm_calls_per_episode']:>10.2f}{r['steps_per_episode']:>10.2f}"
              f"{r['episode_call_share']:>13.3f}{r['redundant_call_share']:>11.2f}{r['cost']:>9.2f}")
    m = matched
    if "r2v_success" in m:
        print(f"\nAt matched success (R2V: success {m['r2v_success']:.3f}, {m['r2v_llm_call_rate']:.3f} LLM calls/step):")
        b = m.get("best_heuristic_at_ge_success")
        if b:
            rel = m.get("r2v_rate_relative")
            print(f"  fewest calls among heuristic routers with success >= R2V's: {b['method']} "
                  f"({b['success']:.3f} success, {b['llm_call_rate']:.3f} calls/step) -> R2V uses "
                  + (f"{rel:.2f}x its calls" if rel is not None else "n/a (that router makes no calls)"))
        else:
            print("  no heuristic router reaches R2V's success")
        fr = m.get("heuristic_frontier_rate_at_r2v_success")
        if fr is not None:
            rel = m.get("r2v_rate_relative_to_frontier")
            print(f"  heuristic frontier (mixing routers, SLM/LLM-only anchors) at R2V's success: {fr:.3f} calls/step"
                  + (f" -> R2V uses {rel:.2f}x" if rel is not None else ""))
        c = m.get("best_heuristic_at_le_rate")
        if c:
            print(f"  at <= R2V's call rate (matched cost), best heuristic success: {c['method']} {c['success']:.3f} "
                  f"({c['llm_call_rate']:.3f} calls/step)")
        if "oracle" in m:
            print(f"  oracle router: success {m['oracle']['success']:.3f} at {m['oracle']['llm_call_rate']:.3f} calls/step")
    if frontier:
        print(f"\nSweep Pareto front ({frontier['path']}, {frontier['rows']} rows: {frontier['sources']}; "
              f"validation rows are {frontier['estimator']})")
        print(f"{'source':<12}{'trial':<10}{'point':<13}{'threshold':<10}{'tau':>8}{'success':>9}{'calls/step':>12}")
        for p in frontier["pareto"]:
            print(f"{p.get('source', ''):<12}{str(p.get('trial_id', '')):<10}{str(p.get('operating_point', '')):<13}"
                  f"{str(p.get('threshold', '')):<10}{_num(p.get('tau')):>8.3f}{_num(p.get('success')):>9.3f}"
                  f"{_num(p.get('llm_call_rate')):>12.3f}")
    else:
        print(f"\n(no sweep frontier at {exp / 'sweep' / 'frontier.parquet'}: run `r2v sweep`)")
    return write_result(out, result)


if __name__ == "__main__":
    sys.exit(0 if main(sys.argv[1:]).get("status") == "ok" else MISSING_INPUT)

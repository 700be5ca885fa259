"""`report`: results.json, markdown tables and two plots from the live evaluation; logged to MLflow.

`frontier.png`: success vs realised live LLM calls/step. Each router evaluated at `eval.budgets` (`r2v@0.2`,
`entropy@0.2`, ...) is one curve from the SLM-only point (0, success) through its budget points, with a band of
its per-point 95% CI (cluster bootstrap over games); the teacher, SLM-only, oracle-teacher router and the other
methods are reference markers, the teacher also a horizontal line. When a sweep has run, its validation frontier is
drawn too, labelled as a validation estimate.
`results.md`: the per-method table, a matched-budget table (budgets x routers) and a per-router frontier table
(AUC of success on [0, 0.5] calls/step, calls/step to reach the teacher − 2 points, ECE/Brier where measured).
`results.json`: every method row, plus `frontier`: those per-router summaries with paired-bootstrap CIs.
`reliability.png`: R2V's predicted risk vs the observed rate on held-out test router rows.
`slm_selection` (results.json) and "Deployed SLM" (results.md): select-policy's validation numbers for BC and DPO
and which of them every routed method above played (models/selected.json).
`benchmark` (results.json) and "Real benchmark tasks" (results.md): with `eval.benchmark.enabled`, the same
routers on the env's real benchmark tasks (eval/benchmark.json), kept apart from the held-out procedural instances.
"""
from __future__ import annotations

import json
from typing import Any

import numpy as np

from r2v.config import R2VConfig
from r2v.eval.metrics import (REDUNDANT_CALLS, SUMMARY_KEYS, frontier_bootstrap, frontier_summary, router_curves,
                              split_method)
from r2v.experiment import Experiment, read_selection

# a budgeted method's target and the rate its τ gave on the calibration games, beside the realised test rate
RESULT_KEYS = SUMMARY_KEYS + ("budget", "calibration_call_rate", "threshold", "grace")
ROUTER_ORDER = ("r2v", "r2v_paced", "entropy", "random", "verifier", "verifier_action", "heuristic", "pre_execution",
                "steer")
TEACHER, SLM = "llm_only", "slm_only"
AUC_MAX, TEACHER_MARGIN = 0.5, 0.02  # AUC over calls/step in [0, 0.5]; "teacher quality" = teacher − 2 points
STEP_COLUMNS = ["policy", "task_id", "perturbation_seed", "episode_id", "episode_success", "actor"]


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _ci(ci: Any, digits: int = 2) -> str:
    return f"[{_fmt(ci[0], digits)}, {_fmt(ci[1], digits)}]" if ci else "[–]"


def _routers(names) -> list[str]:
    """Routers in the report's fixed order, unknown ones after."""
    return sorted(names, key=lambda b: (ROUTER_ORDER.index(b) if b in ROUTER_ORDER else len(ROUTER_ORDER), b))


def markdown_table(results: dict[str, dict[str, Any]]) -> str:
    head = ("| method | success [95% CI by game] | worst-seed | CVaR₀.₂ fail | LLM calls/step | LLM calls/ep "
            "| steps/ep | episodes w/ call | redundant calls | cost/ep | ECE | Brier | episodes | games | seeds |")
    lines = [head, "|" + "---|" * 15]
    for name, r in results.items():
        lines.append(
            f"| {name} | {_fmt(r['success'])} {_ci(r['success_ci'])} | {_fmt(r['worst_seed_success'])} "
            f"| {_fmt(r['cvar_failure'])} | {_fmt(r['llm_call_rate'])} | {_fmt(r.get('llm_calls_per_episode'), 2)} "
            f"| {_fmt(r.get('steps_per_episode'), 2)} | {_fmt(r['episode_call_share'])} "
            f"| {_fmt(r.get('redundant_call_share'), 2)} | {_fmt(r['cost'], 2)} | {_fmt(r.get('ece'))} "
            f"| {_fmt(r.get('brier'))} | {r['n_episodes']} | {_fmt(r.get('n_games'))} | {r['n_seeds']} |")
    return "\n".join(lines) + f"\n\n_redundant calls_: {REDUNDANT_CALLS}.\n"


def budget_table(results: dict[str, dict[str, Any]]) -> str:
    """Budgets x routers: `success [95% CI] @ realised LLM calls/step (the rate τ gave on the calibration games)`:
    τ is set by routed episodes on validation games; the test games' rate can differ. "no grace": a budget that
    `router.grace` kept from being spent, played without it (r2v.rollout.live_budget.search_spending_grace)."""
    curves = router_curves(results)
    if not curves:
        return "_no `router@budget` methods were evaluated (set `eval.budgets`)_\n"
    routers = _routers(curves)
    budgets = sorted({split_method(n)[1] for names in curves.values() for n in names})
    graced = any(r.get("grace") for r in results.values())  # then a budget played without grace says so
    lines = ["| budget | " + " | ".join(routers) + " |", "|" + "---|" * (len(routers) + 1)]
    for b in budgets:
        cells = []
        for base in routers:
            r = next((results[n] for n in curves[base] if split_method(n)[1] == b), None)
            cal = r.get("calibration_call_rate") if r else None
            cells.append("–" if r is None else
                         f"{_fmt(r['success'])} {_ci(r['success_ci'])} @ {_fmt(r['llm_call_rate'])}"
                         + (f" (cal. {_fmt(cal)}{', no grace' if graced and r.get('grace') == 0 else ''})"
                            if cal is not None else ""))
        lines.append(f"| {b:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def method_steps(results: dict[str, dict[str, Any]], steps) -> Any:
    """The step records of every method in `results`, labelled with a `method` column, or None when some method's
    episodes are not there (then no paired bootstrap: its CIs would silently leave that method out).

    A method's episodes are its row's `episodes` (task, seed, policy: a paced router's waves route at different τ),
    else those of its `policy` (eval shares one routing between methods that route identically, e.g. `r2v` and
    `r2v@<router.budget>`), else of `routed-<method>` (older evals)."""
    import pandas as pd

    from r2v.rollout.engine import of_episodes

    if steps is None or not len(steps):
        return None
    parts = []
    for name, r in results.items():
        part = (of_episodes(steps, r["episodes"]) if r.get("episodes")
                else steps[steps["policy"] == (r.get("policy") or f"routed-{name}")])
        if part.empty:
            print(f"[report] no episodes of `{name}` among the eval's step records: frontier CIs omitted")
            return None
        parts.append(part.assign(method=name))
    return pd.concat(parts, ignore_index=True)


def frontier_of(results: dict[str, dict[str, Any]], steps=None, *, n_boot: int = 1000, seed: int = 0
                ) -> dict[str, dict[str, Any]]:
    """Per-router frontier summaries (see `r2v.eval.metrics.frontier_summary`), with paired cluster-bootstrap CIs
    when the per-step records of every method are given (`method_steps`), point estimates otherwise.
    ECE/Brier are the router's own row's (measured on held-out router rows), where present."""
    kw = dict(slm=SLM, teacher=TEACHER, x_max=AUC_MAX, margin=TEACHER_MARGIN)
    labelled = method_steps(results, steps) if router_curves(results) else None
    if labelled is not None:
        front = frontier_bootstrap(labelled, n_boot=n_boot, seed=seed, **kw)
    else:
        front = frontier_summary({m: (r["llm_call_rate"], r["success"]) for m, r in results.items()}, **kw)
        for row in front.values():
            row.update(auc_ci=None, calls_to_target_ci=None, p_reached=None)
    for base, row in front.items():
        row["ece"] = results.get(base, {}).get("ece")
        row["brier"] = results.get(base, {}).get("brier")
    return {base: front[base] for base in _routers(front)}


def frontier_table(front: dict[str, dict[str, Any]]) -> str:
    if not front:
        return "_no router frontier: no `router@budget` methods were evaluated_\n"
    lines = ["| router | budgets | AUC on [0, 0.5] calls/step [95% CI] | calls/step to teacher − 2 pts [95% CI] "
             "| resamples reaching it | ECE | Brier |", "|" + "---|" * 7]
    notes = []
    for base, f in front.items():
        auc = _fmt(f["auc"])
        if f["auc"] is not None and f["auc_bridged_from"] is not None:
            auc += "†"
            notes.append(f"{base} measured up to {f['auc_bridged_from']:.3f} calls/step")
        budgets = ", ".join(f"{split_method(n)[1]:g}" for n in f["methods"])
        calls = "not reached" if f["calls_to_target"] is None else _fmt(f["calls_to_target"])
        lines.append(f"| {base} | {budgets} | {auc} {_ci(f['auc_ci'])} | {calls} {_ci(f['calls_to_target_ci'])} "
                     f"| {_fmt(f['p_reached'], 2)} | {_fmt(f['ece'])} | {_fmt(f['brier'])} |")
    text = "\n".join(lines) + "\n"
    target = next((f["target"] for f in front.values() if f["target"] is not None), None)
    text += (f"\nEach curve: (0, SLM-only success), then the router's budget points at their realised live rates, "
             f"linear in between; teacher − 2 pts = {_fmt(target)}. CIs: paired bootstrap over games (all points "
             "of a curve and the teacher resampled together); an upper end `–` means not reached in over 2.5% of "
             "resamples.\n")
    if notes:
        text += ("\n† curve stops short of 0.5 calls/step (" + "; ".join(notes) + "): bridged linearly to the "
                 "teacher's (1.0, success), the point every router reaches at τ = 0.\n")
    return text


def plot_frontier(results: dict[str, dict[str, Any]], path, sweep_frontier=None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.2, 4.8))
    if sweep_frontier is not None and len(sweep_frontier):
        f = sweep_frontier
        if "source" in f.columns:
            f = f[f["source"] == "validation"]
        if "pareto" in f.columns:
            f = f[f["pareto"].astype(bool)]
        f = f.sort_values("llm_call_rate")
        ax.plot(f["llm_call_rate"], f["success"], "--", color="0.6", label="R2V sweep (validation estimate)")
    curves, slm = router_curves(results), results.get(SLM)
    colors: dict[str, Any] = {}
    for base in _routers(curves):
        rows = [results[n] for n in curves[base]] + ([slm] if slm else [])
        pts = sorted((0.0 if r is slm else r["llm_call_rate"], r["success"], *r["success_ci"]) for r in rows)
        x, y, lo, hi = (np.asarray(v, dtype=float) for v in zip(*pts))
        own = base.startswith("r2v")
        line, = ax.plot(x, y, "-" if own else "--", marker="o", markersize=4, lw=2.2 if own else 1.3,
                        label=f"{base} @ budgets")
        colors[base] = line.get_color()
        ax.fill_between(x, lo, hi, color=colors[base], alpha=0.15, lw=0)
    if TEACHER in results:
        t = results[TEACHER]
        ax.axhline(t["success"], color="k", ls=":", lw=1)
        ax.axhspan(t["success_ci"][0], t["success_ci"][1], color="k", alpha=0.05, lw=0)
    refs = {TEACHER: dict(marker="s", color="k", label="teacher (llm_only)"),
            SLM: dict(marker="v", color="0.35", label="SLM only"),
            "oracle_teacher": dict(marker="D", color="goldenrod", label="oracle-teacher router"),
            "hindsight": dict(marker="P", color="purple", label="hindsight oracle")}
    for name, r in results.items():
        if split_method(name)[1] is not None or not np.isfinite(r.get("success", np.nan)):
            continue
        style = refs.get(name) or dict(marker="*" if name == "r2v" else "x", markersize=11 if name == "r2v" else 7,
                                       color=colors.get(name), label=f"{name} (own τ)")
        err = [[max(0.0, r["success"] - r["success_ci"][0])], [max(0.0, r["success_ci"][1] - r["success"])]]
        ax.errorbar([r["llm_call_rate"]], [r["success"]], yerr=err, capsize=3, linestyle="", **style)
    ax.axvline(AUC_MAX, color="0.7", lw=0.8, ls="-.")
    ax.set_xlabel("LLM calls per step (realised, live)")
    ax.set_ylabel("episode success (live, env-reported)")
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title("Success vs LLM calls/step, held-out tasks (bands: 95% CI over games)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_reliability(p: np.ndarray, y: np.ndarray, path, bins: int = 10) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    edges = np.linspace(0, 1, bins + 1)
    idx = np.clip(np.digitize(p, edges) - 1, 0, bins - 1)
    xs, ys, ns = [], [], []
    for b in range(bins):
        m = idx == b
        if m.any():
            xs.append(p[m].mean())
            ys.append(y[m].mean())
            ns.append(int(m.sum()))
    fig, ax = plt.subplots(figsize=(4.6, 4.4))
    ax.plot([0, 1], [0, 1], ":", color="0.5")
    ax.scatter(xs, ys, s=[10 + 3 * n ** 0.5 for n in ns], color="crimson")
    ax.plot(xs, ys, color="crimson")
    ax.set_xlabel("predicted risk (R2V router)")
    ax.set_ylabel("observed label rate")
    ax.set_title("Reliability on held-out test steps")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def selection_table(selection: dict[str, Any]) -> str:
    """select-policy's decision: each candidate's validation success per condition and pooled, and the choice."""
    conditions = [c for c in ("clean", "perturbed") if any(c in r for r in selection["candidates"].values())]
    head = "| SLM | " + " | ".join(f"{c} success [95% CI by game] (episodes)" for c in conditions)
    lines = [head + " | pooled success (wins/episodes) | deployed |", "|" + "---|" * (len(conditions) + 3)]
    for name, r in selection["candidates"].items():
        cells = [f"{_fmt(r[c]['success'])} {_ci(r[c]['success_ci'])} ({r[c]['episodes']})" if c in r else "–"
                 for c in conditions]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {_fmt(r['success'])} ({r['wins']}/{r['episodes']}) "
                     f"| {'**yes**' if name == selection['selected'] else 'no'} |")
    return (f"{selection.get('games', '–')} validation games, SLM alone, live; rule: {selection.get('rule', '')}\n\n"
            + "\n".join(lines) + "\n")


def read_budget_choice(router_dir) -> dict[str, Any] | None:
    """How train-router chose the default budget (router.json's threshold_info); None without that choice."""
    meta = router_dir / "router.json"
    if not meta.is_file():
        return None
    return json.loads(meta.read_text()).get("threshold_info", {}).get("budget_choice")


def budget_choice_section(choice: dict[str, Any] | None) -> str:
    """train-router's choice of the default budget on the val games (router.choose_budget), as results.md shows it."""
    if not choice:
        return ""
    lines = ["| budget | τ | val calls/step | val success | default |", "|---|---|---|---|---|"]
    for c in sorted(choice["candidates"], key=lambda c: c["budget"]):
        no_grace = " (no grace)" if c.get("grace") == 0 else ""
        lines.append(f"| {c['budget']:g} | {c['tau']:.4g} | {_fmt(c['rate'])}{no_grace} | {_fmt(c['success'])} "
                     f"| {'**yes**' if c['budget'] == choice['chosen'] else ''} |")
    chosen = "none reached it: router.budget kept" if choice["chosen"] is None else f"{choice['chosen']:g}"
    return ("\n## Default budget (train-router, on the val games)\n\n"
            f"rule: {choice['rule']} (the teacher's success on the same val games and seeds: "
            f"{_fmt(choice['teacher_success'])}); chosen: {chosen}. The `r2v` row above is this budget's τ on the "
            "test games.\n\n" + "\n".join(lines) + "\n")


def pacing_section(results: dict[str, dict[str, Any]]) -> str:
    """How each paced router (`eval.paced_methods`) moved τ wave by wave on the test stream, beside its fixed self."""
    from r2v.eval.live import PACED

    paced = {n: r for n, r in results.items() if r.get("pacing")}
    if not paced:
        return ""
    lines = ["| method | target | realised (fixed τ) | realised (paced) | τ per wave | calls/step per wave |",
             "|---|---|---|---|---|---|"]
    for name, r in sorted(paced.items(), key=lambda kv: split_method(kv[0])[1]):
        base, budget = split_method(name)
        fixed = results.get(f"{base.removesuffix(PACED)}@{budget:g}", {})
        lines.append(f"| {name} | {budget:g} | {_fmt(fixed.get('llm_call_rate'))} | {_fmt(r['llm_call_rate'])} "
                     f"| {' → '.join(f'{t:.3f}' for t in r['pacing']['taus'])} "
                     f"| {' / '.join(f'{x:.2f}' for x in r['pacing']['wave_rates'])} |")
    wave = next(iter(paced.values()))["pacing"]["wave_episodes"]
    return ("\n## Paced routers (eval.paced_methods)\n\nThe test episodes in one seeded order, in waves of "
            f"{wave}: the first at the τ calibrated on the val games, each next at the τ that spends the target "
            "plus what the waves so far under- or over-spent, spread over the rest of the stream (`BudgetPacer`, "
            "from the risks the router met and the calls it made, no labels: what Serve runs with "
            "`serve.pace_budget`).\n\n" + "\n".join(lines) + "\n")


def benchmark_section(bench: dict[str, Any]) -> str:
    """results.md's table of the real benchmark tasks (eval/benchmark.json): its own tasks, its own CIs."""
    seeds = ", ".join(str(s) for s in bench["perturbation_seeds"])
    return (f"\n## Real benchmark tasks\n\n{bench['tasks']}: {bench['n_tasks']} tasks x perturbation seeds [{seeds}], "
            "played live by the SLM and router trained on the procedural instances (each router at the τ set on "
            "the calibration instances); not pooled with the table above.\n\n" + markdown_table(bench["methods"]))


def write_results(results: dict[str, dict[str, Any]], out, title: str, *, steps=None, sweep_frontier=None,
                  n_boot: int = 1000, seed: int = 0, selection: dict[str, Any] | None = None,
                  benchmark: dict[str, Any] | None = None, budget_choice: dict[str, Any] | None = None
                  ) -> dict[str, dict[str, Any]]:
    """results.json, results.md and frontier.png under `out`; returns the per-router frontier summaries.
    `steps`: the eval's per-step records (for the frontier's paired bootstrap CIs); None = point estimates.
    `selection`: select-policy's decision (models/selected.json), reported beside the methods.
    `benchmark`: the eval's summary on the real benchmark tasks (eval/benchmark.json), reported apart.
    `budget_choice`: how train-router chose the default budget on the val games (router.choose_budget)."""
    front = frontier_of(results, steps, n_boot=n_boot, seed=seed)
    doc: dict[str, Any] = {name: {k: r.get(k) for k in RESULT_KEYS}
                           | {"extra": {k: v for k, v in r.items() if k not in RESULT_KEYS}}
                           for name, r in results.items()}
    doc["frontier"] = front
    if selection is not None:
        doc["slm_selection"] = selection
    if budget_choice:
        doc["budget_choice"] = budget_choice
    if benchmark is not None:
        doc["benchmark"] = benchmark | {"methods": {name: {k: r.get(k) for k in SUMMARY_KEYS}
                                                    for name, r in benchmark["methods"].items()}}
    (out / "results.json").write_text(json.dumps(doc, indent=2, default=float))
    (out / "results.md").write_text(
        f"# {title}\n\n" + markdown_table(results)
        + "\n## Matched LLM-call budgets\n\nsuccess [95% CI by game] @ realised live LLM calls/step on the test games "
          "(the rate the same τ gave on the calibration games)\n\n"
        + budget_table(results) + pacing_section(results) + "\n## Frontier per router\n\n" + frontier_table(front)
        + budget_choice_section(budget_choice)
        + ("" if selection is None else "\n## Deployed SLM (select-policy)\n\n" + selection_table(selection))
        + ("" if benchmark is None else benchmark_section(benchmark)))
    plot_frontier(results, out / "frontier.png", sweep_frontier)
    return front


def run_report(cfg: R2VConfig) -> dict[str, Any]:
    import pandas as pd

    from r2v.eval.live import feature_rows, read_benchmark, read_eval
    from r2v.router.model import LABEL_COLUMNS
    from r2v.router.baselines import make_router
    from r2v.router.stage import read_router_rows

    exp = Experiment(cfg)
    results = read_eval(cfg)
    out = exp.report_dir
    out.mkdir(parents=True, exist_ok=True)
    sweep_path = exp.sweep_dir / "frontier.parquet"
    frontier = pd.read_parquet(sweep_path) if sweep_path.is_file() else None
    steps = None
    if router_curves(results) and exp.eval_episodes.is_dir():  # the per-episode data of the paired bootstrap
        from r2v.data import ShardStore

        steps = ShardStore(exp.eval_episodes, "steps").read_pandas(columns=STEP_COLUMNS)
    write_results(results, out, f"{cfg.experiment}: live evaluation on `{cfg.eval.split}` ({cfg.env.name})",
                  steps=steps, sweep_frontier=frontier, n_boot=cfg.eval.bootstrap_samples, seed=cfg.seed,
                  selection=read_selection(exp.models_dir), benchmark=read_benchmark(cfg),
                  budget_choice=read_budget_choice(exp.model("router")))
    rows = read_router_rows(cfg)
    label = LABEL_COLUMNS[cfg.router.label]
    test = rows[(rows["split"] == "test") & rows[label].notna()]
    if len(test):
        p = make_router("r2v", model_dir=str(exp.model("router"))).risks(feature_rows(test))
        plot_reliability(p, test[label].astype(float).to_numpy(), out / "reliability.png")
    try:
        import mlflow

        if mlflow.active_run():
            mlflow.log_artifacts(str(out), "report")
    except Exception as e:  # tracking must never lose the report itself
        print(f"[report] MLflow logging failed: {e}")
    print(markdown_table(results))
    return {"report_dir": str(out), "methods": len(results)}

"""`report`: results.json, a markdown table and two plots from the live evaluation; logged to MLflow.

`frontier.png`: success vs LLM-call rate for every method (95% bootstrap CI bars), measured live; the methods
of `eval.budgets` (`r2v@0.2`, `entropy@0.2`, ...) as one line per router. When a sweep has run, its validation
frontier is drawn too, labelled as a validation estimate.
`reliability.png`: R2V's predicted risk vs the observed rate on held-out test router rows.
"""
from __future__ import annotations

import json
from typing import Any

import numpy as np

from r2v.config import R2VConfig

RESULT_KEYS = ("success", "success_ci", "worst_seed_success", "cvar_failure", "llm_call_rate",
               "episode_call_share", "cost", "ece", "brier", "n_episodes", "n_seeds")


def report_dir(cfg: R2VConfig):
    return cfg.experiment_dir / "report"


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def markdown_table(results: dict[str, dict[str, Any]]) -> str:
    head = ("| method | success [95% CI] | worst-seed | CVaR₀.₂ fail | LLM calls/step | episodes w/ call "
            "| cost/ep | ECE | Brier | episodes | seeds |")
    lines = [head, "|" + "---|" * 11]
    for name, r in results.items():
        lo, hi = r["success_ci"]
        lines.append(
            f"| {name} | {_fmt(r['success'])} [{_fmt(lo, 2)}, {_fmt(hi, 2)}] | {_fmt(r['worst_seed_success'])} "
            f"| {_fmt(r['cvar_failure'])} | {_fmt(r['llm_call_rate'])} | {_fmt(r['episode_call_share'])} "
            f"| {_fmt(r['cost'], 2)} | {_fmt(r['ece'])} | {_fmt(r['brier'])} | {r['n_episodes']} | {r['n_seeds']} |")
    return "\n".join(lines) + "\n"


def plot_frontier(results: dict[str, dict[str, Any]], path, sweep_frontier=None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    if sweep_frontier is not None and len(sweep_frontier):
        f = sweep_frontier
        if "source" in f.columns:
            f = f[f["source"] == "validation"]
        if "pareto" in f.columns:
            f = f[f["pareto"].astype(bool)]
        f = f.sort_values("llm_call_rate")
        ax.plot(f["llm_call_rate"], f["success"], "--", color="0.6", label="R2V sweep (validation estimate)")
    curves: dict[str, list[tuple[float, float]]] = {}  # `eval.budgets` points (`r2v@0.2`, ...): one line per base
    colors: dict[str, Any] = {}
    for name, r in results.items():
        if "@" in name:
            curves.setdefault(name.split("@")[0], []).append((r["llm_call_rate"], r["success"]))
            continue
        lo, hi = r["success_ci"]
        err = [[max(0.0, r["success"] - lo)], [max(0.0, hi - r["success"])]]
        style = dict(marker="*", markersize=14, color="crimson") if name == "r2v" else dict(marker="o")
        bars = ax.errorbar([r["llm_call_rate"]], [r["success"]], yerr=err, capsize=3, label=name, linestyle="",
                           **style)
        colors[name] = bars[0].get_color()
    for base, pts in curves.items():
        xs, ys = zip(*sorted(pts))
        ax.plot(xs, ys, "-" if base == "r2v" else ":", marker=".", color=colors.get(base), alpha=0.8,
                label=f"{base}, τ per budget (live)")
    ax.set_xlabel("LLM calls per step (live)")
    ax.set_ylabel("episode success (live, env-reported)")
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title("Success vs LLM-call rate, held-out tasks")
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


def run_report(cfg: R2VConfig) -> dict[str, Any]:
    import pandas as pd

    from r2v.eval.live import feature_rows, read_eval
    from r2v.router.baselines import make_router
    from r2v.router.stage import read_router_rows, router_dir

    results = read_eval(cfg)
    out = report_dir(cfg)
    out.mkdir(parents=True, exist_ok=True)
    doc = {name: {k: r.get(k) for k in RESULT_KEYS} | {"extra": {k: v for k, v in r.items() if k not in RESULT_KEYS}}
           for name, r in results.items()}
    (out / "results.json").write_text(json.dumps(doc, indent=2, default=float))
    (out / "results.md").write_text(
        f"# {cfg.experiment}: live evaluation on `{cfg.eval.split}` ({cfg.env.name})\n\n" + markdown_table(results))
    sweep_path = cfg.experiment_dir / "sweep" / "frontier.parquet"
    frontier = pd.read_parquet(sweep_path) if sweep_path.is_file() else None
    plot_frontier(results, out / "frontier.png", frontier)
    rows = read_router_rows(cfg)
    label = "branch_label" if cfg.router.label == "branch" else "episode_failed"
    test = rows[(rows["split"] == "test") & rows[label].notna()]
    if len(test):
        p = make_router("r2v", model_dir=str(router_dir(cfg))).risks(feature_rows(test))
        plot_reliability(p, test[label].astype(float).to_numpy(), out / "reliability.png")
    try:
        import mlflow

        if mlflow.active_run():
            mlflow.log_artifacts(str(out), "report")
    except Exception as e:  # tracking must never lose the report itself
        print(f"[report] MLflow logging failed: {e}")
    print(markdown_table(results))
    return {"report_dir": str(out), "methods": len(results)}

"""`eval`: every method plays the held-out tasks live, under every evaluation seed.

At an escalated step the teacher's action is executed in the environment; success is what the env reports
at the end of the episode, nothing else. Thresholded baselines are calibrated on validation router rows to
the same LLM-call budget as R2V (`router.budget`), so the comparison is at matched cost; `random` uses R2V's
realised validation rate. Calibration (ECE, Brier) is measured on held-out test router rows against the
label each router predicts.
"""
from __future__ import annotations

import json
from typing import Any

from r2v.config import R2VConfig
from r2v.data import ShardStore
from r2v.errors import R2VError
from r2v.router.baselines import Router


def eval_dir(cfg: R2VConfig):
    return cfg.experiment_dir / "eval"


def episodes_dir(cfg: R2VConfig):
    return eval_dir(cfg) / "episodes"


def feature_rows(df) -> list[dict[str, float]]:
    from r2v.router.features import features_by_name

    return [features_by_name(list(v)) for v in df["features"]]


BUDGETED = ("r2v", "entropy", "random")  # the methods `eval.budgets` re-evaluates at each budget


def budget_method(base: str, budget: float) -> str:
    """The method name of `base` with its threshold set to an LLM-call budget, e.g. `r2v@0.2`."""
    return f"{base}@{budget:g}"


def r2v_router(cfg: R2VConfig):
    from r2v.router.baselines import make_router
    from r2v.router.stage import router_dir

    return make_router("r2v", model_dir=str(router_dir(cfg)))


def build_routers(cfg: R2VConfig) -> tuple[dict[str, Router], dict[str, Any]]:
    """Every method of `eval.methods`, thresholds fixed on validation rows. Returns (routers, notes)."""
    from r2v.router.baselines import load_router, make_router
    from r2v.router.stage import read_router_rows, router_dir, router_part

    rows = read_router_rows(cfg)
    val = router_part(cfg, rows, "calibration")
    val_feats, val_eps = feature_rows(val), list(val["episode_id"])
    routers: dict[str, Router] = {}
    notes: dict[str, Any] = {}
    r2v = r2v_router(cfg)
    r2v_rate = float(r2v.rate(r2v.risks(val_feats))) if val_feats else cfg.router.budget
    for name in cfg.eval.methods:
        if name == "r2v":
            router = r2v
        elif name == "pre_execution":
            router = load_router(router_dir(cfg) / "pre_execution")
        else:
            router = make_router(name)
        if name == "random":
            router.calibrate([], r2v_rate)
        elif name in ("entropy", "pre_execution") and val_feats:
            router.calibrate(val_feats, cfg.router.budget, episode_ids=val_eps)
        offline = val_feats and name != "oracle"  # the oracle needs the live env's oracle action
        notes[name] = {"threshold": float(router.threshold),
                       "val_call_rate": float(router.rate(router.risks(val_feats, val_eps))) if offline else None}
        routers[name] = router
    for budget in cfg.eval.budgets:  # the budget-matched frontier, live
        for base in BUDGETED:
            if base not in cfg.eval.methods or (base != "random" and not val_feats):
                continue  # (τ needs calibration steps)
            router = r2v_router(cfg) if base == "r2v" else make_router(base)
            _, rate = router.calibrate([] if base == "random" else val_feats, budget, episode_ids=val_eps)
            name = budget_method(base, budget)
            notes[name] = {"threshold": float(router.threshold), "val_call_rate": float(rate) if val_feats else None}
            routers[name] = router
    return routers, notes


def offline_calibration(cfg: R2VConfig, routers: dict[str, Router]) -> dict[str, dict[str, float]]:
    """ECE/Brier of probabilistic routers on held-out test router rows, against the label they predict."""
    from r2v.eval.metrics import auroc, brier, ece
    from r2v.router.stage import read_router_rows

    rows = read_router_rows(cfg)
    test = rows[rows["split"] == "test"]
    out = {}
    for name, label_col in (("r2v", "branch_label" if cfg.router.label == "branch" else "episode_failed"),
                            ("pre_execution", "episode_failed")):
        if name not in routers:
            continue
        part = test[test[label_col].notna()]
        if part.empty:
            continue
        p = routers[name].risks(feature_rows(part), list(part["episode_id"]))
        y = part[label_col].astype(float).to_numpy()
        out[name] = {"ece": float(ece(p, y)), "brier": float(brier(p, y)), "n_calibration_rows": int(len(y)),
                     "auroc": float(auroc(p, y)) if 0 < y.mean() < 1 else None, "label": label_col}
    return out


def run_eval(cfg: R2VConfig) -> dict[str, Any]:
    import ray

    from r2v.eval.metrics import summarise_method
    from r2v.policies.slm import start_slm_server
    from r2v.ray_utils import init_ray
    from r2v.rollout.engine import collect, plan_units
    from r2v.rollout.router_rows import RoutedAgentFactory
    from r2v.rollout.stage import collection_inputs, latest_policy_dir, tasks_by_split
    from r2v.router.stage import router_dir

    init_ray(cfg)
    routers, notes = build_routers(cfg)
    tasks = tasks_by_split(cfg, [cfg.eval.split])
    if not tasks[cfg.eval.split]:
        raise R2VError(f"split `{cfg.eval.split}` has no tasks; add tasks or change env.split_fractions")
    model_dir = latest_policy_dir(cfg)
    server = start_slm_server(cfg, model_dir, cfg.collect.num_workers)
    factories, units = {}, []
    for name, router in routers.items():
        policy = f"routed-{name}"
        factories[policy] = RoutedAgentFactory(model_dir, server, router, with_teacher=True, name=policy)
        units += plan_units(tasks, list(cfg.eval.perturbation_seeds), 1, policy)
    print(f"[eval] {len(routers)} methods x {len(units) // max(1, len(routers))} live episodes each")
    try:
        inputs = collection_inputs(cfg, ("env", "policy", "verifier", "teacher", "router", "eval"),
                                   (model_dir, str(router_dir(cfg))))
        collect(cfg, units, factories, episodes_dir(cfg), inputs=inputs)
    finally:
        ray.kill(server)
    df = ShardStore(episodes_dir(cfg), "steps").read_pandas()
    results: dict[str, Any] = {}
    for name in routers:
        part = df[df["policy"] == f"routed-{name}"]
        row = summarise_method(part, c_slm=cfg.router.cost_slm, c_llm=cfg.router.cost_llm,
                               n_boot=cfg.eval.bootstrap_samples, seed=cfg.seed)
        row.update({"ece": None, "brier": None, "threshold": notes[name]["threshold"],
                    "val_call_rate": notes[name]["val_call_rate"],
                    "escalation_errors": int(part["escalation_error"].notna().sum())})
        results[name] = row
    for name, cal in offline_calibration(cfg, routers).items():
        results[name].update(cal)
    path = eval_dir(cfg) / "summary.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2, default=float))
    return {f"{m}_success": r["success"] for m, r in results.items()} | {
        f"{m}_llm_call_rate": r["llm_call_rate"] for m, r in results.items()}


def read_eval(cfg: R2VConfig) -> dict[str, Any]:
    path = eval_dir(cfg) / "summary.json"
    if not path.is_file():
        raise R2VError(f"{path} is missing: run `r2v eval` first")
    return json.loads(path.read_text())



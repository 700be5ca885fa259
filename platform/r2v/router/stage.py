"""`train-router`: fit the calibrated risk model on router rows (train split), select on val, save.

Also fits the `pre_execution` baseline (it needs training too) so that `eval` only loads models.
"""
from __future__ import annotations

import shutil
from typing import Any

import numpy as np

from r2v.config import R2VConfig
from r2v.data import ShardStore
from r2v.errors import R2VError
from r2v.experiment import Experiment
from r2v.router.baselines import TWIN_DIR


def read_router_rows(cfg: R2VConfig):
    rows_dir = Experiment(cfg).router_rows
    df = ShardStore(rows_dir, "router_rows").read_pandas()
    if df.empty:
        raise R2VError(f"no router rows under {rows_dir}: run `r2v collect-router` first")
    return df


def router_part(cfg: R2VConfig, df, part: str):
    """The router rows of `part`: `fit` (the router's training data) or `calibration` (best epoch,
    temperature, thresholds, baseline budgets). By default fit = the train split, calibration = val. With
    `router.fit_split=val` the router never sees the tasks the SLM was trained on (whose failure profile
    differs from unseen tasks): val *tasks* are divided, by a seeded hash, into a fit share
    (`router.fit_fraction`) and a calibration rest."""
    from r2v.envs.base import split_tasks

    if part not in ("fit", "calibration"):
        raise ValueError(f"router part {part!r} is not fit or calibration")
    if cfg.router.fit_split != "val":
        return df[df["split"] == (cfg.router.fit_split if part == "fit" else "val")]
    val = df[df["split"] == "val"]
    f = cfg.router.fit_fraction
    halves = split_tasks(sorted(set(val["task_id"])), (f, 1.0 - f, 0.0), cfg.seed)
    return val[val["task_id"].isin(halves["train" if part == "fit" else "val"])]


def split_data(cfg: R2VConfig, df, part: str, label: str | None = None):
    """RouterData of `part` (fit | calibration, see router_part) for `label` (default router.label)."""
    from r2v.router.model import RouterData

    return RouterData.from_frame(router_part(cfg, df, part), label or cfg.router.label,
                                 source=f"router rows ({part})")


def run_train_router(cfg: R2VConfig) -> dict[str, Any]:
    from r2v.eval.metrics import auroc, brier, ece
    from r2v.router.baselines import make_router, save_router
    from r2v.router.model import RiskModel
    from r2v.router.thresholds import apply_step_threshold

    df = read_router_rows(cfg)
    train, val = split_data(cfg, df, "fit"), split_data(cfg, df, "calibration")
    model = RiskModel(train.X.shape[1], cfg.router)
    history = model.fit(train, val, cfg.router, seed=cfg.seed)
    from r2v.tracking import Tracker

    Tracker(cfg).log_history(history)  # λ, the CVaR violation and the Brier per epoch, as MLflow curves
    out = Experiment(cfg).model("router")
    twin = None
    if cfg.router.cross_fit:  # the same recipe on the swapped halves: it routes the fit games while τ is set
        twin = RiskModel(val.X.shape[1], cfg.router)
        twin.fit(val, train, cfg.router, seed=cfg.seed)
    pre = make_router("pre_execution").fit(split_data(cfg, df, "fit", "episode"))
    save_router(pre, out / "pre_execution")
    p_steps = model.predict(step_features(router_part(cfg, df, "calibration")))
    apply_step_threshold(model, p_steps, cfg.router)
    if cfg.router.threshold == "budget":
        set_live_threshold(cfg, model, cfg.router.budget, p_steps, twin, choose=cfg.router.choose_budget)
    p_val = model.predict(val.X)
    summary = {"train_rows": len(train), "val_rows": len(val), "train_positive_rate": float(train.y.mean()),
               "threshold": float(model.threshold), "temperature": float(model.temperature),
               "val_escalation_rate": float(np.mean(p_val >= model.threshold)),
               "val_brier": float(brier(p_val, val.y)), "val_ece": float(ece(p_val, val.y)),
               "epochs": len(history) - 1}
    if "live_rate" in model.threshold_info:
        info = model.threshold_info
        summary |= {"budget": info["budget"], "calibration_call_rate": info["live_rate"],
                    "calibration_success": info["val_success"]}
        if "budget_choice" in info:
            summary["teacher_calibration_success"] = info["budget_choice"]["teacher_success"]
    save_risk_model(model, twin, out)
    if 0 < val.y.mean() < 1:
        summary["val_auroc"] = float(auroc(p_val, val.y))
    return summary


def save_risk_model(model, twin, directory) -> None:
    """The risk model, and its cross-fitted twin in `twin/` at the τ it routed the fit games with (the same
    quantile, `TwinScale`; none: an older run's twin is removed, so it can never set this model's τ)."""
    model.save(directory)
    if twin is not None:
        twin.threshold = model.threshold_info.get("twin_tau", model.threshold)
        twin.save(directory / TWIN_DIR)
    elif (directory / TWIN_DIR).exists():
        shutil.rmtree(directory / TWIN_DIR)


def step_features(part) -> np.ndarray:
    """The feature matrix of router rows (every step, labelled or not)."""
    return np.stack([np.asarray(v, dtype=np.float32) for v in part["features"]])


def live_searches(cfg: R2VConfig, model, budgets: dict[str, float], p_steps: np.ndarray, twin=None
                  ) -> dict[str, dict[str, Any]]:
    """One batched live budget search (r2v.rollout.live_budget) of the risk model per named budget: routed
    episodes on the calibration games (with a cross-fitted `twin`: on all val games)."""
    from r2v.rollout.live_budget import calibrate_live
    from r2v.router.baselines import make_router

    routers = {name: make_router("r2v", model=model, twin=twin) for name in budgets}
    return calibrate_live(cfg, routers, budgets, {name: p_steps for name in budgets})


def chosen_budget(found: dict[str, dict[str, Any]], teacher_success: float, gap: float) -> dict[str, Any] | None:
    """The search record of the smallest budget whose routed val episodes win ≥ the teacher's − `gap`
    (None: no budget does)."""
    reached = [rec for rec in found.values() if rec["success"] >= teacher_success - gap - 1e-9]
    return min(reached, key=lambda rec: rec["budget"], default=None)


def set_live_threshold(cfg: R2VConfig, model, budget: float, p_steps: np.ndarray, twin=None,
                       choose: bool = False) -> dict[str, Any]:
    """Set a trained risk model's τ so that its routed episodes on the val games escalate `budget` of their
    steps; records the search in model.threshold_info. `choose` (router.choose_budget) first searches every
    one of `eval.budgets` and the teacher on the same games (budget 1: every step escalated), and takes the
    smallest budget that comes within `router.budget_gap` of the teacher's success (none: `budget`)."""
    from r2v.eval.live import budget_method

    choice, rec = None, None
    if choose:
        names = {budget_method("r2v", b): float(b) for b in cfg.eval.budgets}
        found = live_searches(cfg, model, names | {"teacher": 1.0}, p_steps, twin)
        teacher = found.pop("teacher")["success"]
        rec = chosen_budget(found, teacher, cfg.router.budget_gap)
        choice = {"rule": f"smallest of eval.budgets with val success >= teacher - {cfg.router.budget_gap:g}",
                  "teacher_success": teacher, "chosen": None if rec is None else rec["budget"],
                  "candidates": [{k: r[k] for k in ("budget", "tau", "rate", "success", "grace") if k in r}
                                 for r in found.values()]}
        if rec is None:
            print(f"[train-router] no budget of {sorted(names.values())} reaches the teacher's val success "
                  f"{teacher:.3f} - {cfg.router.budget_gap:g}: keeping router.budget={budget:g}")
    if rec is None:
        rec = live_searches(cfg, model, {"r2v": budget}, p_steps, twin)["r2v"]
    model.threshold = rec["tau"]
    model.threshold_info = {"kind": "budget", "budget": rec["budget"], "tau": rec["tau"], "live_rate": rec["rate"],
                            "val_success": rec["success"], "offline_rate": float(np.mean(p_steps >= rec["tau"])),
                            "probes": rec["probes"], "calibrated_on": rec["calibrated_on"]}
    for key in ("twin_tau", "grace"):
        if key in rec:
            model.threshold_info[key] = rec[key]
    if choice is not None:
        model.threshold_info["budget_choice"] = choice
    return model.threshold_info


def default_budget(cfg: R2VConfig, model=None) -> float:
    """The live budget the deployed router was set to: `router.budget`, or with router.choose_budget the one
    train-router chose on the val games (stored with the model; `model` saves loading it again)."""
    if not cfg.router.choose_budget:
        return float(cfg.router.budget)
    if model is None:
        from r2v.router.model import RiskModel

        model = RiskModel.load(Experiment(cfg).model("router"))
    return float(model.threshold_info.get("budget", cfg.router.budget))


def run_calibrate(cfg: R2VConfig, budget: float | None = None, write: bool = False) -> dict[str, Any]:
    """Map a target LLM-call budget (the share of live routed steps the teacher acts on) to the trained
    router's threshold by routed episodes on the calibration games; prints the rate they realised and what they
    won there (`calibration_success`). `write` stores the threshold in models/router so eval and serve use it."""
    from r2v.router.model import RiskModel

    saved = Experiment(cfg).model("router")
    model = RiskModel.load(saved)
    budget = default_budget(cfg, model) if budget is None else budget
    if not 0 <= budget <= 1:
        raise R2VError(f"--budget {budget} must be a share of steps in [0, 1]")
    twin = RiskModel.load(saved / TWIN_DIR) if (saved / TWIN_DIR).is_dir() else None
    cal = router_part(cfg, read_router_rows(cfg), "calibration")
    if cal.empty:
        raise R2VError("no calibration router rows: run `r2v collect-router` with val tasks in the split")
    info = set_live_threshold(cfg, model, budget, model.predict(step_features(cal)), twin)
    out = {"budget": budget, "threshold": info["tau"], "calibration_call_rate": info["live_rate"],
           "calibration_success": info["val_success"], "calibrated_on": info["calibrated_on"],
           "probes": info["probes"]}
    if "grace" in info:  # the budget was only spendable without router.grace (live_budget.search_spending_grace)
        out["grace"] = info["grace"]
    if write:
        save_risk_model(model, twin, saved)
        out["written_to"] = str(saved)
    return out

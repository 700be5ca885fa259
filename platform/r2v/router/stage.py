"""`train-router`: fit the calibrated risk model on router rows (train split), select on val, save.

Also fits the `pre_execution` baseline (it needs training too) so that `eval` only loads models.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from r2v.config import R2VConfig
from r2v.data import ShardStore
from r2v.errors import R2VError


def router_dir(cfg: R2VConfig):
    return cfg.experiment_dir / "models" / "router"


def read_router_rows(cfg: R2VConfig):
    from r2v.rollout.router_rows import router_rows_dir

    df = ShardStore(router_rows_dir(cfg), "router_rows").read_pandas()
    if df.empty:
        raise R2VError(f"no router rows under {router_rows_dir(cfg)}: run `r2v collect-router` first")
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
    out = router_dir(cfg)
    pre = make_router("pre_execution").fit(split_data(cfg, df, "fit", "episode"))
    save_router(pre, out / "pre_execution")
    apply_step_threshold(model, model.predict(step_features(router_part(cfg, df, "calibration"))), cfg.router)
    p_val = model.predict(val.X)
    summary = {"train_rows": len(train), "val_rows": len(val), "train_positive_rate": float(train.y.mean()),
               "threshold": float(model.threshold), "temperature": float(model.temperature),
               "val_escalation_rate": float(np.mean(p_val >= model.threshold)),
               "val_brier": float(brier(p_val, val.y)), "val_ece": float(ece(p_val, val.y)),
               "epochs": len(history) - 1}
    model.save(out)
    if 0 < val.y.mean() < 1:
        summary["val_auroc"] = float(auroc(p_val, val.y))
    return summary


def step_features(part) -> np.ndarray:
    """The feature matrix of router rows (every step, labelled or not)."""
    return np.stack([np.asarray(v, dtype=np.float32) for v in part["features"]])


def run_calibrate(cfg: R2VConfig, budget: float | None = None, write: bool = False) -> dict[str, Any]:
    """Map a target LLM-call budget (share of steps escalated) to the trained router's threshold on the
    validation rows, and report the rate that threshold realises on held-out test rows. `write` stores
    the threshold in models/router so eval and serve use it."""
    from r2v.router.model import RiskModel
    from r2v.router.thresholds import calibrate, realised_rate

    budget = cfg.router.budget if budget is None else budget
    if not 0 <= budget <= 1:
        raise R2VError(f"--budget {budget} must be a share of steps in [0, 1]")
    model = RiskModel.load(router_dir(cfg))
    df = read_router_rows(cfg)
    parts = {"val": router_part(cfg, df, "calibration"), "test": df[df["split"] == "test"]}
    feats = {k: step_features(part) for k, part in parts.items() if len(part)}
    if "val" not in feats:
        raise R2VError("no calibration router rows: run `r2v collect-router` with val tasks in the split")
    tau, val_rate = calibrate(model.predict(feats["val"]), budget)
    out = {"budget": budget, "threshold": float(tau), "val_call_rate": float(val_rate),
           "val_steps": int(len(feats["val"]))}
    if "test" in feats:
        out["test_call_rate"] = float(realised_rate(model.predict(feats["test"]), tau))
        out["test_steps"] = int(len(feats["test"]))
    if write:
        model.threshold, model.threshold_info = float(tau), {"kind": "budget", "budget": budget, "tau": float(tau),
                                                             "calibrated_on": "every calibration step",
                                                             "val_rate": float(val_rate)}
        model.save(router_dir(cfg))
        out["written_to"] = str(router_dir(cfg))
    return out

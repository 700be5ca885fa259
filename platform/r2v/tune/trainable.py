"""One sweep trial: train a router epoch by epoch, report per-epoch validation metrics to Tune.

`EpochTrainer` is the `RouterTrainer` that `RiskModel.fit` runs (same objective, batches, RNG use, dual
ascent, best-validation-Brier epoch kept, then calibration and threshold), one epoch per `step()`, so
that ASHA can stop a trial between epochs and Tune can checkpoint and resume it mid-training. A test
checks that running every epoch gives the same model as `RiskModel.fit`.

Each report carries the calibrated best-so-far model ("snapshot") as a checkpoint (`router/`, loadable
with `RiskModel.load`) plus the training state (`train_state.pt`).
"""
from __future__ import annotations

import dataclasses
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from r2v.config import RouterConfig
from r2v.router.model import RiskModel, RouterData, RouterTrainer
from r2v.router.thresholds import apply_step_threshold, budget_threshold
from r2v.tune.estimator import ValEpisodes

STATE_FILE = "train_state.pt"
MODEL_SUBDIR = "router"

# The hyper-parameters a trial samples (Tune param names) and how they map onto RouterConfig.
TRIAL_PARAMS = ("alpha", "epsilon", "cost_ratio", "brier_weight", "label", "dual_lr", "calibration", "threshold",
                "budget")


def router_config(base: RouterConfig, params: dict[str, Any], epochs: int) -> RouterConfig:
    """RouterConfig of a trial: `base` with the sampled values; c_SLM = c_LLM / cost_ratio."""
    over = {k: params[k] for k in ("alpha", "epsilon", "brier_weight", "label", "dual_lr", "calibration",
                                   "threshold", "budget") if k in params}
    for k in ("alpha", "epsilon", "brier_weight", "dual_lr", "budget"):
        if k in over:
            over[k] = float(over[k])
    if "cost_ratio" in params:
        over["cost_slm"] = float(base.cost_llm) / float(params["cost_ratio"])
    return dataclasses.replace(base, epochs=int(epochs), **over)


def overrides(rcfg: RouterConfig) -> dict[str, Any]:
    """The router.* keys a sweep point sets (what a best-<budget>.yaml holds)."""
    return {k: getattr(rcfg, k) for k in ("label", "alpha", "epsilon", "cost_llm", "cost_slm", "brier_weight",
                                          "dual_lr", "calibration", "threshold", "budget", "epochs")}


# ----------------------------------------------------------------------------------------- training
class EpochTrainer(RouterTrainer):
    """RiskModel.fit, one epoch per step(), with a picklable state (`state`/`load_state`) for checkpoints:
    the same RouterTrainer that fit runs, on a model of its own."""

    def __init__(self, n_features: int, cfg: RouterConfig, train: RouterData, val: RouterData, seed: int = 0):
        super().__init__(RiskModel(n_features, cfg), train, val, cfg, seed)

    def snapshot(self) -> RiskModel:
        """A separate, calibrated RiskModel with the best weights so far (what fit returns at the end);
        training state, including the global torch RNG, is untouched."""
        with torch.random.fork_rng(devices=[]):
            snap = RiskModel(self.model.n_features, self.cfg, device=self.model.device)
        return self.finish(snap)


# ----------------------------------------------------------------------------------------- scoring
def score(model: RiskModel, cfg: RouterConfig, steps: ValEpisodes, budgets: list[float]) -> dict[str, float]:
    """Validation metrics of a calibrated model (offline estimate, see r2v.tune.estimator)."""
    p = model.predict(steps.X)
    tau = apply_step_threshold(model, p, cfg)
    own = steps.estimate_at(p, tau)
    out = {"val_success_offline": own["success"], "val_llm_call_rate": own["llm_call_rate"],
           "val_branch_hit_rate": own["branch_hit_rate"], "tau": tau, "temperature": float(model.temperature)}
    at_budget = []
    for b in budgets:
        est = steps.estimate_at(p, budget_threshold(p, b))
        out[f"val_success_offline_b{b:g}"] = est["success"]
        at_budget.append(est["success"])
    out["val_budget_success_offline"] = float(np.mean(at_budget)) if at_budget else own["success"]
    return out


# ----------------------------------------------------------------------------------------- the trial
@dataclass
class SweepData:
    """What every trial reads: router data per label (train/val) and all validation steps for scoring."""

    train: dict[str, RouterData]
    val: dict[str, RouterData]
    steps: ValEpisodes
    base: RouterConfig
    budgets: list[float]
    epochs: int
    seed: int = 0


def sweep_trial(config: dict[str, Any], data: SweepData) -> None:
    """Tune function trainable: resumes from its last checkpoint, reports and checkpoints every epoch."""
    from ray import tune

    torch.set_num_threads(1)
    rcfg = router_config(data.base, config, data.epochs)
    train, val = data.train[rcfg.label], data.val[rcfg.label]
    trainer = EpochTrainer(train.X.shape[1], rcfg, train, val, data.seed)
    metrics: dict[str, float] | None = None
    ckpt = tune.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            trainer.load_state(torch.load(Path(d) / STATE_FILE, weights_only=False))
    while trainer.epoch < data.epochs:
        record = trainer.step()
        if record["improved"] or metrics is None:
            snap = trainer.snapshot()
            metrics = score(snap, rcfg, data.steps, data.budgets)
        report = {**metrics, "epoch": record["epoch"], "val_brier": record["val_brier"],
                  "lambda_end": record["lambda_end"], "best_epoch": trainer.best[1],
                  "val_slm_success": data.steps.slm_success}
        with tempfile.TemporaryDirectory() as d:
            snap.save(Path(d) / MODEL_SUBDIR)
            torch.save(trainer.state(), Path(d) / STATE_FILE)
            tune.report(report, checkpoint=tune.Checkpoint.from_directory(d))


__all__ = ["EpochTrainer", "SweepData", "sweep_trial", "router_config", "overrides", "score",
           "TRIAL_PARAMS", "STATE_FILE", "MODEL_SUBDIR"]

"""One sweep trial: train a router epoch by epoch, report per-epoch validation metrics to Tune.

`EpochTrainer` runs exactly the optimisation of `RiskModel.fit` (same objective, batches, RNG use, dual
ascent, best-validation-Brier epoch kept, then calibration and threshold), one epoch per `step()`, so
that ASHA can stop a trial between epochs and Tune can checkpoint and resume it mid-training. A test
checks that running every epoch gives the same model as `RiskModel.fit`.

Each report carries the calibrated best-so-far model ("snapshot") as a checkpoint (`router/`, loadable
with `RiskModel.load`) plus the training state (`train_state.pt`).
"""
from __future__ import annotations

import copy
import dataclasses
import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from r2v.config import RouterConfig
from r2v.router.model import RiskModel, RiskNet, RouterData, fit_platt, fit_temperature, nll
from r2v.router.objective import dual_update, multiplier, router_loss
from r2v.router.thresholds import apply_step_threshold, budget_threshold, select_threshold
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
class EpochTrainer:
    """RiskModel.fit, one epoch per step(), with a picklable state for checkpoints."""

    def __init__(self, n_features: int, cfg: RouterConfig, train: RouterData, val: RouterData, seed: int = 0):
        self.cfg, self.train, self.val, self.seed = cfg, train, val, seed
        self.model = RiskModel(n_features, cfg)
        m = self.model
        torch.manual_seed(seed)
        self.gen = torch.Generator().manual_seed(seed)
        m.net = RiskNet(n_features, list(cfg.hidden_sizes), cfg.dropout).to(m.device)
        m.mean = train.X.mean(axis=0).astype(np.float32)
        std = train.X.std(axis=0)
        m.std = np.where(std > 1e-6, std, 1.0).astype(np.float32)
        # copies: arrays shared through Ray's object store are read-only
        self.Xt, self.yt = m._tensor(train.X), torch.from_numpy(np.array(train.y)).to(m.device)
        self.gt = torch.from_numpy(np.array(train.group)).to(m.device)
        self.opt = torch.optim.AdamW(m.net.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
        self.n = len(train)
        self.bs = max(2, min(self.n, int(cfg.batch_size)))
        self.rho = 0.0
        self.best: tuple[float, int, dict] = (math.inf, -1, copy.deepcopy(m.net.state_dict()))
        self.history: list[dict[str, Any]] = []
        self.epoch = 0

    def step(self) -> dict[str, Any]:
        """Train one epoch; returns its record (as RiskModel.fit's history) plus `improved`."""
        m, cfg = self.model, self.cfg
        m.net.train()
        perm = torch.randperm(self.n, generator=self.gen).to(m.device)
        sums: dict[str, float] = {}
        batches = 0
        for start in range(0, self.n, self.bs):
            idx = perm[start:start + self.bs]
            if idx.numel() < 2:
                continue
            p = torch.sigmoid(m.net(self.Xt[idx]))
            loss, parts = router_loss(p, self.yt[idx], self.gt[idx], multiplier(self.rho), alpha=cfg.alpha,
                                      epsilon=cfg.epsilon, cost_llm=cfg.cost_llm, cost_slm=cfg.cost_slm,
                                      brier_weight=cfg.brier_weight)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            self.rho = dual_update(self.rho, parts["violation"], cfg.dual_lr)
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + v
            batches += 1
        val_p = 1.0 / (1.0 + np.exp(-m.logits(self.val.X)))
        val_brier = float(np.mean((val_p - self.val.y) ** 2))
        record = {"epoch": self.epoch, **{f"train_{k}": v / max(1, batches) for k, v in sums.items()},
                  "lambda_end": multiplier(self.rho), "val_brier": val_brier}
        self.history.append(record)
        improved = val_brier < self.best[0]
        if improved:
            self.best = (val_brier, self.epoch, copy.deepcopy(m.net.state_dict()))
        self.epoch += 1
        return {**record, "improved": improved}

    def snapshot(self) -> RiskModel:
        """A separate, calibrated RiskModel with the best weights so far (what fit returns at the end);
        training state, including the global torch RNG, is untouched."""
        cfg, val = self.cfg, self.val
        with torch.random.fork_rng(devices=[]):
            snap = RiskModel(self.model.n_features, cfg, device=self.model.device)
        snap.net.load_state_dict(self.best[2])
        snap.mean, snap.std = self.model.mean.copy(), self.model.std.copy()
        val_logits = snap.logits(val.X)
        nll_before = nll(val_logits, val.y)
        if cfg.calibration == "platt":
            snap.temperature, snap.bias = fit_platt(val_logits, val.y)
        else:
            snap.temperature, snap.bias = fit_temperature(val_logits, val.y), 0.0
        p_val = snap.predict(val.X)
        snap.threshold, snap.threshold_info = select_threshold(
            cfg.threshold, p_val=p_val, y_val=val.y, group_val=val.group, budget=cfg.budget, alpha=cfg.alpha,
            epsilon=cfg.epsilon, c_llm=cfg.cost_llm, c_slm=cfg.cost_slm, kappa=cfg.kappa)
        snap.history = [dict(h) for h in self.history] + [{
            "best_epoch": self.best[1], "best_val_brier": self.best[0], "temperature": snap.temperature,
            "bias": snap.bias, "val_nll_before_ts": nll_before,
            "val_nll_after_ts": nll(val_logits / snap.temperature + snap.bias, val.y),
            "val_brier_calibrated": float(np.mean((p_val - val.y) ** 2)), "threshold": snap.threshold,
            **{f"threshold_{k}": v for k, v in snap.threshold_info.items() if k != "tau"}}]
        return snap

    # -- checkpoints
    def state(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "net": self.model.net.state_dict(), "opt": self.opt.state_dict(),
                "rho": self.rho, "best": self.best, "history": self.history,
                "torch_rng": torch.get_rng_state(), "gen": self.gen.get_state()}

    def load_state(self, state: dict[str, Any]) -> None:
        self.epoch = int(state["epoch"])
        self.model.net.load_state_dict(state["net"])
        self.opt.load_state_dict(state["opt"])
        self.rho = float(state["rho"])
        self.best = state["best"]
        self.history = list(state["history"])
        torch.set_rng_state(state["torch_rng"])
        self.gen.set_state(state["gen"])


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


def sweep_trial(config: dict[str, Any], data: SweepData, hooks: dict[str, Any] | None = None) -> None:
    """Tune function trainable. `hooks` is for tests only: {"trace_dir": records each (re)start,
    "fail_marker": a file whose presence makes ONE trial raise once at epoch `fail_epoch`}."""
    from ray import tune

    torch.set_num_threads(1)
    hooks = hooks or {}
    rcfg = router_config(data.base, config, data.epochs)
    train, val = data.train[rcfg.label], data.val[rcfg.label]
    trainer = EpochTrainer(train.X.shape[1], rcfg, train, val, data.seed)
    metrics: dict[str, float] | None = None
    ckpt = tune.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            trainer.load_state(torch.load(Path(d) / STATE_FILE, weights_only=False))
    trial_id = tune.get_context().get_trial_id()
    if hooks.get("trace_dir"):
        Path(hooks["trace_dir"]).mkdir(parents=True, exist_ok=True)
        (Path(hooks["trace_dir"]) / f"{trial_id}-from{trainer.epoch}-{time.time_ns()}").touch()
    while trainer.epoch < data.epochs:
        if (hooks.get("fail_marker") and trainer.epoch == int(hooks.get("fail_epoch", 2))
                and _claim(hooks["fail_marker"])):
            raise RuntimeError(f"simulated interruption of trial {trial_id} at epoch {trainer.epoch} (test hook)")
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


def _claim(marker: str) -> bool:
    """True for exactly one caller while `marker` exists (unlink is atomic)."""
    try:
        os.unlink(marker)
        return True
    except FileNotFoundError:
        return False


__all__ = ["EpochTrainer", "SweepData", "sweep_trial", "router_config", "overrides", "score",
           "TRIAL_PARAMS", "STATE_FILE", "MODEL_SUBDIR"]

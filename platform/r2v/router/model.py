"""The calibrated risk model: p_t = P(the SLM episode fails from here | step features).

An MLP trained with the router objective (cost + λ·(CVaR − ε) + Brier, λ by dual ascent; objective.py) in
minibatches sized to the data (RouterTrainer), the epoch with the best calibration Brier kept, then a
temperature (or Platt scaling) fitted on the calibration rows so that p is a probability a threshold can be
reasoned about. Rows may carry weights (a sampled label's rows stand for several steps); every mean is
weighted. `LogisticRiskModel` is the same with no hidden layer, the linear baseline. Inputs are z-scored with
*training* statistics, which travel with the checkpoint together with the feature spec.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from r2v.config import RouterConfig, resolve_device
from r2v.errors import R2VError
from r2v.router.features import FEATURE_NAMES, FEATURE_VERSION
from r2v.router.objective import cvar, dual_update, multiplier, per_group_residual_failure, router_loss
from r2v.router.thresholds import select_threshold

WEIGHTS_FILE = "router.pt"
META_FILE = "router.json"
T_MIN, T_MAX = 0.05, 20.0
# router.label → the router-row column holding it (1 = the SLM fails from here); the label vocabulary
LABEL_COLUMNS = {"episode": "episode_failed", "branch": "branch_label", "step": "step_label",
                 "critical": "critical_label"}
# labels whose rows are a sample of each episode's steps → the column of per-row weights (steps per row)
WEIGHT_COLUMNS = {"branch": "label_weight"}


# ----------------------------------------------------------------------------------------- data
@dataclass
class RouterData:
    """Router training rows as arrays: X (n×d), y (n, 1 = failure), group (n, perturbation seed),
    episode (n, episode ids; CVaR and pre-execution baselines group by them), step (n), weight (n, ≥ 0,
    default 1: how many steps a row stands for when the labelled rows are a sample of an episode's steps)."""

    X: np.ndarray
    y: np.ndarray
    group: np.ndarray
    episode: np.ndarray
    step: np.ndarray | None = None
    episode_failed: np.ndarray | None = None  # label (a) even when y is the branch label (pre_execution)
    source: str = "router rows"
    weight: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.X = np.asarray(self.X, dtype=np.float32)
        if self.X.ndim != 2:
            raise R2VError(f"{self.source}: features must be an n×d matrix, got shape {self.X.shape}")
        n = self.X.shape[0]
        self.y = np.asarray(self.y, dtype=np.float32).reshape(-1)
        self.group = np.asarray(self.group).reshape(-1).astype(np.int64)
        self.episode = np.asarray(self.episode).reshape(-1)
        self.step = np.arange(n) if self.step is None else np.asarray(self.step).reshape(-1)
        if self.episode_failed is not None:
            self.episode_failed = np.asarray(self.episode_failed, dtype=np.float32).reshape(-1)
        self.weight = (np.ones(n, dtype=np.float32) if self.weight is None
                       else np.asarray(self.weight, dtype=np.float32).reshape(-1))
        names = ("y", "group", "episode", "step", "weight") + (
            ("episode_failed",) if self.episode_failed is not None else ())
        for name in names:
            if getattr(self, name).shape[0] != n:
                raise R2VError(f"{self.source}: `{name}` has {getattr(self, name).shape[0]} entries for {n} rows")
        if not np.all(np.isfinite(self.X)):
            raise R2VError(f"{self.source}: features hold NaN or infinite values; re-collect the rows")
        if n and not np.all((self.y == 0) | (self.y == 1)):
            raise R2VError(f"{self.source}: labels must be 0/1 (1 = the SLM fails), got {np.unique(self.y)[:5]}")
        if n and (not np.all(np.isfinite(self.weight)) or self.weight.min() < 0 or self.weight.sum() <= 0):
            raise R2VError(f"{self.source}: row weights must be finite, ≥ 0 and not all 0")

    def __len__(self) -> int:
        return int(self.X.shape[0])

    def subset(self, mask: np.ndarray) -> "RouterData":
        ef = None if self.episode_failed is None else self.episode_failed[mask]
        return RouterData(self.X[mask], self.y[mask], self.group[mask], self.episode[mask], self.step[mask], ef,
                          self.source, self.weight[mask])

    @classmethod
    def from_frame(cls, df: Any, label: str = "branch", feature_spec: str = FEATURE_VERSION,
                   source: str = "router rows") -> "RouterData":
        """From a DataFrame of router rows, keeping the rows whose label column (LABEL_COLUMNS[label]) is not
        null: episode → `episode_failed` (every step), step → `step_label` (steps with a reference action),
        critical → `critical_label` (the same steps), branch → `branch_label` (the sampled, branched steps). Rows of a sampled label carry `label_weight`
        (WEIGHT_COLUMNS), read as RouterData.weight; the other labels are on every step and weigh 1."""
        if label not in LABEL_COLUMNS:
            raise R2VError(f"`router.label` = {label!r} is not one of {sorted(LABEL_COLUMNS)}")
        if "feature_spec" in df.columns:
            specs = set(df["feature_spec"].dropna().unique())
            if specs - {feature_spec}:
                raise R2VError(f"{source}: rows were written with feature spec {sorted(specs)} but this r2v uses "
                               f"{feature_spec}; re-run `r2v collect-router` to rebuild them")
        col = LABEL_COLUMNS[label]
        if col not in df.columns:
            raise R2VError(f"{source}: no `{col}` column for router.label={label}; re-collect the router rows "
                           f"(`r2v collect-router`) with this r2v")
        df = df[df[col].notna()]
        if len(df) == 0:
            raise R2VError(f"{source}: no rows carry `{col}`; for router.label=branch collect branches "
                           f"(router.branch_steps_per_episode > 0), or use router.label=episode")
        weight = None
        wcol = WEIGHT_COLUMNS.get(label)
        if wcol in df.columns:
            if df[wcol].isna().any():
                raise R2VError(f"{source}: {int(df[wcol].isna().sum())} rows with `{col}` have no `{wcol}`; "
                               f"re-collect the router rows")
            weight = df[wcol].astype(float).to_numpy()
        X = np.stack([np.asarray(v, dtype=np.float32) for v in df["features"]])
        ef = df["episode_failed"].astype(float).to_numpy() if "episode_failed" in df.columns else None
        return cls(X, df[col].astype(float).to_numpy(), df["perturbation_seed"].to_numpy(),
                   df["episode_id"].to_numpy(), df["step"].to_numpy(), ef, source, weight)


# ----------------------------------------------------------------------------------------- network
class RiskNet(nn.Module):
    """MLP d → hidden… → 1 logit, each hidden block Linear → BatchNorm → GELU → Dropout."""

    def __init__(self, n_features: int, hidden_sizes: Sequence[int] = (128, 64), dropout: float = 0.2):
        super().__init__()
        layers: list[nn.Module] = []
        width = n_features
        for h in hidden_sizes:
            layers += [nn.Linear(width, h), nn.BatchNorm1d(h), nn.GELU(), nn.Dropout(dropout)]
            width = h
        layers.append(nn.Linear(width, 1))
        self.body = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x).squeeze(-1)


# ----------------------------------------------------------------------------------------- calibration
def nll(logits: np.ndarray, y: np.ndarray, temperature: float = 1.0, weight: np.ndarray | None = None) -> float:
    """(Weighted) mean binary cross-entropy of σ(logit / T) against y, computed stably."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    y = np.asarray(y, dtype=np.float64)
    return float(np.average(np.logaddexp(0.0, z) - y * z, weights=weight))


def weighted_brier(p: np.ndarray, y: np.ndarray, weight: np.ndarray | None = None) -> float:
    return float(np.average((np.asarray(p, dtype=np.float64) - y) ** 2, weights=weight))


def fit_platt(logits: np.ndarray, y: np.ndarray, weight: np.ndarray | None = None) -> tuple[float, float]:
    """(T, b) minimising validation NLL of σ(logit / T + b): temperature plus a bias, for when the
    objective's cost term has shifted the logits (temperature alone cannot undo a shift)."""
    logits, y = np.asarray(logits, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if logits.size == 0 or np.all(y == y.flat[0]):
        return 1.0, 0.0
    z, t = torch.from_numpy(logits), torch.from_numpy(y)
    w = None if weight is None else torch.from_numpy(np.asarray(weight, dtype=np.float64))
    beta = torch.tensor(1.0 / fit_temperature(logits, y, weight=weight), dtype=torch.float64, requires_grad=True)
    bias = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([beta, bias], lr=0.5, max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(z * beta + bias, t, weight=w)
        loss.backward()
        return loss

    opt.step(closure)
    b = float(beta.detach()) if math.isfinite(float(beta.detach())) else 1.0
    temperature = float(min(T_MAX, max(T_MIN, 1.0 / b))) if b > 0 else T_MAX
    return temperature, float(bias.detach())


def fit_temperature(logits: np.ndarray, y: np.ndarray, t_min: float = T_MIN, t_max: float = T_MAX,
                    weight: np.ndarray | None = None) -> float:
    """The T ∈ [t_min, t_max] minimising validation NLL of σ(logit / T).

    NLL is convex in β = 1/T, so a coarse log-spaced grid followed by golden-section search in the
    bracket around the best grid point finds the optimum without gradients."""
    logits, y = np.asarray(logits, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if logits.size == 0 or np.all(y == y.flat[0]):
        return 1.0  # one class only: no evidence about the scale, keep the network's own
    betas = np.geomspace(1.0 / t_max, 1.0 / t_min, 41)
    losses = [nll(logits * b, y, weight=weight) for b in betas]
    i = int(np.argmin(losses))
    lo, hi = betas[max(0, i - 1)], betas[min(len(betas) - 1, i + 1)]
    phi = (math.sqrt(5) - 1) / 2
    a, b = lo + (1 - phi) * (hi - lo), lo + phi * (hi - lo)
    fa, fb = nll(logits * a, y, weight=weight), nll(logits * b, y, weight=weight)
    for _ in range(60):
        if fa <= fb:
            hi, b, fb = b, a, fa
            a = lo + (1 - phi) * (hi - lo)
            fa = nll(logits * a, y, weight=weight)
        else:
            lo, a, fa = a, b, fb
            b = lo + phi * (hi - lo)
            fb = nll(logits * b, y, weight=weight)
    beta = (lo + hi) / 2
    if nll(logits * beta, y, weight=weight) > losses[i]:  # never worse than the grid
        beta = betas[i]
    return float(min(t_max, max(t_min, 1.0 / beta)))


# ----------------------------------------------------------------------------------------- model
def model_inputs(cfg: RouterConfig, names: Sequence[str]) -> tuple[tuple[str, ...], np.ndarray | None]:
    """(the feature names the network reads, their columns in `names` or None for all): `router.features`, or all
    of `names`."""
    chosen = tuple(cfg.features or names)
    unknown = [f for f in chosen if f not in names]
    if unknown or len(set(chosen)) != len(chosen):
        raise R2VError(f"`router.features` = {list(chosen)}: {'unknown ' + str(unknown) if unknown else 'repeats a name'}"
                       f"; pick distinct names of {FEATURE_VERSION}: {list(names)} (or [] for all)")
    if chosen == tuple(names):  # all of them, in order: read X as it is (a column copy sums in another order)
        return chosen, None
    return chosen, np.asarray([list(names).index(f) for f in chosen], dtype=np.int64)


class RiskModel:
    """Calibrated P(failure | features). `fit` on RouterData, `predict(X)`, `save(dir)` / `load(dir)`."""

    def __init__(self, n_features: int = len(FEATURE_NAMES), cfg: RouterConfig | None = None,
                 feature_spec: str = FEATURE_VERSION, feature_names: Sequence[str] = FEATURE_NAMES,
                 device: str | torch.device | None = None):
        self.cfg = cfg or RouterConfig()
        self.feature_spec = feature_spec
        self.feature_names = tuple(feature_names)
        if len(self.feature_names) != n_features:
            raise R2VError(f"RiskModel: {n_features} inputs but feature spec {feature_spec} names "
                           f"{len(self.feature_names)} features")
        self.n_features = n_features
        self.inputs, self.columns = model_inputs(self.cfg, self.feature_names)
        spec = device if device is not None else getattr(self.cfg, "device", "auto")
        self.device = torch.device(spec if isinstance(spec, torch.device) else resolve_device(spec, "router.device"))
        self.net = self.new_net()
        self.mean = np.zeros(len(self.inputs), dtype=np.float32)
        self.std = np.ones(len(self.inputs), dtype=np.float32)
        self.temperature = 1.0
        self.bias = 0.0  # non-zero only with router.calibration=platt
        self.threshold = 0.5
        self.threshold_info: dict[str, Any] = {}
        self.history: list[dict[str, Any]] = []

    def new_net(self) -> RiskNet:
        return RiskNet(len(self.inputs), list(self.cfg.hidden_sizes), self.cfg.dropout).to(self.device)

    def read(self, X: np.ndarray) -> np.ndarray:
        """The columns of full feature vectors (n × n_features) the network reads (`router.features`)."""
        return X if self.columns is None else X[:, self.columns]

    # -- inference
    def _check(self, X: Any) -> np.ndarray:
        X = np.asarray(X, dtype=np.float32)
        if X.ndim == 1:
            X = X[None, :]
        if X.ndim != 2 or X.shape[1] != self.n_features:
            raise R2VError(f"risk model expects rows of {self.n_features} features ({self.feature_spec}), "
                           f"got shape {X.shape}")
        return X

    def _tensor(self, X: np.ndarray) -> torch.Tensor:
        return torch.from_numpy((self.read(X) - self.mean) / self.std).to(self.device)

    def logits(self, X: Any) -> np.ndarray:
        """Raw (un-tempered) logits, in eval mode."""
        X = self._check(X)
        self.net.eval()
        with torch.no_grad():
            out = self.net(self._tensor(X)) if len(X) else torch.zeros(0)
        return out.float().cpu().numpy().astype(np.float64)

    def predict(self, X: Any) -> np.ndarray:
        """Calibrated p = σ(logit / T + b) (b = 0 for plain temperature scaling)."""
        return 1.0 / (1.0 + np.exp(-(self.logits(X) / self.temperature + self.bias)))

    # -- training
    def fit(self, train: RouterData, val: RouterData, cfg: RouterConfig | None = None, seed: int = 0
            ) -> list[dict[str, Any]]:
        """Train with the CVaR-constrained objective (RouterTrainer), keep the epoch with the best calibration
        Brier, calibrate it, pick τ. Returns one record per epoch (λ, violation, Brier, …), then a summary
        record (best epoch, T, NLL before/after, τ, batch size, optimiser steps, epochs the constraint bound)."""
        trainer = RouterTrainer(self, train, val, cfg or self.cfg, seed)
        while trainer.epoch < int(trainer.cfg.epochs):
            trainer.step()
        trainer.finish(self)
        return self.history

    @property
    def architecture(self) -> str:
        """`logistic` (no hidden layer) or `mlp-128x64`, plus `on <features>` when it reads a subset: names the model
        in reports."""
        sizes = list(self.cfg.hidden_sizes)
        name = "logistic" if not sizes else "mlp-" + "x".join(str(h) for h in sizes)
        return name if self.columns is None else f"{name} on {', '.join(self.inputs)}"

    # -- persistence
    def save(self, directory: str | Path) -> Path:
        """Write router.pt (weights) and router.json (spec, normalisation, temperature, threshold, config)."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu() for k, v in self.net.state_dict().items()}
        tmp = d / (WEIGHTS_FILE + ".tmp")
        torch.save(state, tmp)
        os.replace(tmp, d / WEIGHTS_FILE)
        meta = {
            "feature_spec": self.feature_spec, "feature_names": list(self.feature_names),
            "architecture": self.architecture, "inputs": list(self.inputs),
            "n_features": self.n_features, "mean": self.mean.tolist(), "std": self.std.tolist(),
            "temperature": self.temperature, "bias": self.bias, "threshold": self.threshold,
            "threshold_info": self.threshold_info,
            "config": asdict(self.cfg), "history": self.history,
        }
        tmp = d / (META_FILE + ".tmp")
        tmp.write_text(json.dumps(meta, indent=1, default=_json_default))
        os.replace(tmp, d / META_FILE)
        return d

    @classmethod
    def load(cls, directory: str | Path, expected_spec: str = FEATURE_VERSION,
             device: str | torch.device | None = None) -> "RiskModel":
        d = Path(directory)
        meta_path, weights_path = d / META_FILE, d / WEIGHTS_FILE
        if not meta_path.is_file() or not weights_path.is_file():
            raise R2VError(f"{d}: not a router checkpoint (needs {META_FILE} and {WEIGHTS_FILE}); "
                           f"run `r2v train-router`")
        try:
            meta = json.loads(meta_path.read_text())
        except json.JSONDecodeError as e:
            raise R2VError(f"{meta_path}: corrupt router metadata ({e}); re-run `r2v train-router`") from None
        if meta.get("feature_spec") != expected_spec:
            raise R2VError(f"{d}: router was trained on feature spec {meta.get('feature_spec')!r} but this r2v "
                           f"computes {expected_spec!r}; retrain the router (`r2v train-router`) on rows of this spec")
        known = set(RouterConfig.__dataclass_fields__)
        cfg = RouterConfig(**{k: v for k, v in meta.get("config", {}).items() if k in known})
        model = cls(int(meta["n_features"]), cfg, meta["feature_spec"], meta["feature_names"], device=device)
        state = torch.load(weights_path, map_location=model.device, weights_only=True)
        model.net.load_state_dict(state)
        model.mean = np.asarray(meta["mean"], dtype=np.float32)
        model.std = np.asarray(meta["std"], dtype=np.float32)
        model.temperature = float(meta["temperature"])
        model.bias = float(meta.get("bias", 0.0))
        model.threshold = float(meta["threshold"])
        model.threshold_info = meta.get("threshold_info", {})
        model.history = meta.get("history", [])
        return model


# ----------------------------------------------------------------------------------------- training
MIN_BATCHES = 8  # optimiser steps per epoch at least: 242 fit rows at batch 256 were one step per epoch
MIN_BATCH_ROWS = 16  # BatchNorm and the per-seed CVaR need rows of several seeds in every batch


def batch_size(n: int, cap: int) -> int:
    """Rows per optimiser step. `router.batch_size` caps it (large data); small data is cut into at least
    MIN_BATCHES batches of at least MIN_BATCH_ROWS rows, so that `router.epochs` epochs make hundreds of
    optimiser steps and as many dual-ascent updates of λ."""
    return max(2, min(n, int(cap), max(MIN_BATCH_ROWS, math.ceil(n / MIN_BATCHES))))


class RouterTrainer:
    """RiskModel.fit's optimisation, one epoch per `step()`: minibatch descent on the router objective (over
    the fit rows) with λ fixed, then dual ascent on λ; the epoch with the best (weighted) calibration Brier is
    kept and `finish` calibrates it. The sweep (r2v.tune.trainable) reports and checkpoints between epochs.

    The dual step, once per epoch, uses the constraint's value on the calibration rows (eval mode): the CVaR
    of their weighted per-seed residual failure. Not a batch's: a batch holds a few rows per seed, and the
    worst of a few noisy means overstates the tail, so λ would rise on noise. Not the fit rows': an MLP
    memorises a few hundred fit rows, their CVaR falls towards 0 while the held-out one rises, and λ would
    decay while the router misses more tail failures. (Measured on quickstart-sized synthetic rows, 242 fit
    rows, 8 seeds: batch CVaR 0.29 vs 0.19 on all rows; over 60 epochs fit-row CVaR 0.17 → 0.02 while the
    held-out CVaR went 0.13 → 0.19.) The step counts as one step of `router.dual_lr` per optimiser step of
    the epoch, so λ moves as fast as with per-batch updates."""

    def __init__(self, model: RiskModel, train: RouterData, val: RouterData, cfg: RouterConfig, seed: int = 0):
        for name, data in (("train", train), ("validation", val)):
            if len(data) == 0:
                raise R2VError(f"router {name} data is empty: collect router rows for the "
                               f"{'train' if name == 'train' else 'val'} split first")
            if data.X.shape[1] != model.n_features:
                raise R2VError(f"{data.source}: rows have {data.X.shape[1]} features, {model.feature_spec} has "
                               f"{model.n_features}; re-collect the router rows")
        if cfg.calibration not in ("temperature", "platt"):
            raise R2VError(f"`router.calibration` = {cfg.calibration!r} is not one of ['platt', 'temperature']")
        self.model, self.cfg, self.train, self.val = model, cfg, train, val
        model.cfg = cfg
        torch.manual_seed(seed)
        self.gen = torch.Generator().manual_seed(seed)
        model.inputs, model.columns = model_inputs(cfg, model.feature_names)
        model.net = model.new_net()
        read = model.read(train.X)
        model.mean = read.mean(axis=0).astype(np.float32)
        std = read.std(axis=0)
        model.std = np.where(std > 1e-6, std, 1.0).astype(np.float32)
        # copies: arrays shared through Ray's object store are read-only
        self.X = model._tensor(train.X)
        self.y, self.g, self.w = (torch.from_numpy(np.array(a)).to(model.device)
                                  for a in (train.y, train.group, train.weight))
        self.opt = torch.optim.AdamW(model.net.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
        self.n = len(train)
        self.bs = batch_size(self.n, cfg.batch_size)
        self.rho = 0.0
        self.steps = 0
        self.best: tuple[float, int, dict] = (math.inf, -1, copy.deepcopy(model.net.state_dict()))
        self.history: list[dict[str, Any]] = []
        self.epoch = 0

    def step(self) -> dict[str, Any]:
        """Train one epoch. Its record: batch means of the loss parts (`train_*`, λ as used), the CVaR of the
        per-seed residual failure in eval mode on the fit and on the calibration rows (`fit_cvar`, `cal_cvar`;
        `violation` = cal_cvar − ε, > 0: the constraint binds), λ after the dual step (`lambda_end`), the
        calibration-row Brier (`val_brier`) and the optimiser steps so far; plus `improved`."""
        m, cfg = self.model, self.cfg
        m.net.train()
        perm = torch.randperm(self.n, generator=self.gen).to(m.device)
        sums: dict[str, float] = {}
        batches = 0
        for idx in torch.tensor_split(perm, math.ceil(self.n / self.bs)):
            if idx.numel() < 2:  # BatchNorm needs two rows
                continue
            p = torch.sigmoid(m.net(self.X[idx]))
            loss, parts = router_loss(p, self.y[idx], self.g[idx], multiplier(self.rho), weight=self.w[idx],
                                      alpha=cfg.alpha, epsilon=cfg.epsilon, cost_llm=cfg.cost_llm,
                                      cost_slm=cfg.cost_slm, brier_weight=cfg.brier_weight)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            self.steps += 1
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + v
            batches += 1
        fit_cvar = self.residual_cvar(1.0 / (1.0 + np.exp(-m.logits(self.train.X))))
        val_p = 1.0 / (1.0 + np.exp(-m.logits(self.val.X)))
        cal_cvar = self.residual_cvar(val_p, self.val)
        self.rho = dual_update(self.rho, cal_cvar - cfg.epsilon, cfg.dual_lr * batches)  # ascent on λ
        val_brier = weighted_brier(val_p, self.val.y, self.val.weight)
        record = {"epoch": self.epoch, **{f"train_{k}": v / max(1, batches) for k, v in sums.items()},
                  "lambda_end": multiplier(self.rho), "fit_cvar": fit_cvar, "cal_cvar": cal_cvar,
                  "violation": cal_cvar - cfg.epsilon, "val_brier": val_brier, "steps": self.steps}
        self.history.append(record)
        improved = val_brier < self.best[0]
        if improved:
            self.best = (val_brier, self.epoch, copy.deepcopy(m.net.state_dict()))
        self.epoch += 1
        return {**record, "improved": improved}

    def residual_cvar(self, p: np.ndarray, data: RouterData | None = None) -> float:
        """CVaR_α over the seeds of `data` (default: the fit rows) of their weighted per-seed failure under
        routing, mean y·(1 − p)."""
        d = self.train if data is None else data
        t = lambda a: torch.from_numpy(np.asarray(a, dtype=np.float64))  # noqa: E731
        per_seed = per_group_residual_failure(t(p), t(d.y), torch.from_numpy(np.array(d.group)), t(d.weight))
        return float(cvar(per_seed, self.cfg.alpha))

    def finish(self, target: RiskModel) -> RiskModel:
        """Put the best epoch's weights into `target`, fit its temperature (or Platt) and threshold on the
        calibration rows, and give it the history plus a summary record."""
        cfg, val = self.cfg, self.val
        target.cfg = cfg  # built from the same cfg as self.model: the same inputs and network shape
        target.net.load_state_dict(self.best[2])
        target.mean, target.std = self.model.mean.copy(), self.model.std.copy()
        val_logits = target.logits(val.X)
        nll_before = nll(val_logits, val.y, weight=val.weight)
        if cfg.calibration == "platt":
            target.temperature, target.bias = fit_platt(val_logits, val.y, val.weight)
        else:
            target.temperature, target.bias = fit_temperature(val_logits, val.y, weight=val.weight), 0.0
        p_val = target.predict(val.X)
        target.threshold, target.threshold_info = select_threshold(
            cfg.threshold, p_val=p_val, y_val=val.y, group_val=val.group, budget=cfg.budget, alpha=cfg.alpha,
            epsilon=cfg.epsilon, c_llm=cfg.cost_llm, c_slm=cfg.cost_slm, kappa=cfg.kappa)
        target.history = [dict(h) for h in self.history] + [{
            "best_epoch": self.best[1], "best_val_brier": self.best[0], "temperature": target.temperature,
            "bias": target.bias, "val_nll_before_ts": nll_before,
            "val_nll_after_ts": nll(val_logits / target.temperature + target.bias, val.y, weight=val.weight),
            "val_brier_calibrated": weighted_brier(p_val, val.y, val.weight), "threshold": target.threshold,
            **{f"threshold_{k}": v for k, v in target.threshold_info.items() if k != "tau"},
            "architecture": target.architecture, "batch_size": self.bs, "optimiser_steps": self.steps,
            "epsilon": cfg.epsilon, "fit_cvar_unrouted": self.residual_cvar(np.zeros(len(self.train))),
            "cal_cvar_unrouted": self.residual_cvar(np.zeros(len(val)), val),
            "epochs_constraint_violated": sum(h["violation"] > 0 for h in self.history)}]
        return target

    # -- checkpoints (the sweep's trials resume from them)
    def state(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "net": self.model.net.state_dict(), "opt": self.opt.state_dict(),
                "rho": self.rho, "steps": self.steps, "best": self.best, "history": self.history,
                "torch_rng": torch.get_rng_state(), "gen": self.gen.get_state()}

    def load_state(self, state: dict[str, Any]) -> None:
        self.epoch = int(state["epoch"])
        self.model.net.load_state_dict(state["net"])
        self.opt.load_state_dict(state["opt"])
        self.rho = float(state["rho"])
        self.steps = int(state.get("steps", 0))
        self.best = state["best"]
        self.history = list(state["history"])
        torch.set_rng_state(state["torch_rng"])
        self.gen.set_state(state["gen"])


LOGISTIC_LR_SCALE = 10.0


def logistic_config(cfg: RouterConfig | None = None) -> RouterConfig:
    """`cfg` with no hidden layer (and so no BatchNorm or dropout): the logistic-regression router. Its
    learning rate is LOGISTIC_LR_SCALE × router.learning_rate: without BatchNorm to rescale its steps, a linear
    model at the MLP's rate is still under-fitted after hundreds of steps (measured on the synthetic test
    data: AUROC 0.70 at 1e-3, 0.82 at 1e-2). Applied once: a config already linear is kept."""
    cfg = cfg or RouterConfig()
    if not list(cfg.hidden_sizes):
        return cfg
    return dataclasses.replace(cfg, hidden_sizes=[], dropout=0.0, learning_rate=cfg.learning_rate * LOGISTIC_LR_SCALE)


class LogisticRiskModel(RiskModel):
    """Baseline router: logistic regression σ(w·z(x) + b) on the same z-scored features, fitted with the same
    objective, batches, best-epoch choice and calibration as the MLP, so that MLP vs logistic in one table
    measures what the hidden layers add. It saves as a RiskModel with `hidden_sizes: []`, which
    RiskModel.load reads back."""

    def __init__(self, n_features: int = len(FEATURE_NAMES), cfg: RouterConfig | None = None,
                 feature_spec: str = FEATURE_VERSION, feature_names: Sequence[str] = FEATURE_NAMES,
                 device: str | torch.device | None = None):
        super().__init__(n_features, logistic_config(cfg), feature_spec, feature_names, device)

    def fit(self, train: RouterData, val: RouterData, cfg: RouterConfig | None = None, seed: int = 0
            ) -> list[dict[str, Any]]:
        return super().fit(train, val, logistic_config(cfg or self.cfg), seed)


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


__all__ = ["RiskModel", "LogisticRiskModel", "RiskNet", "RouterData", "RouterTrainer", "batch_size",
           "logistic_config", "fit_temperature", "fit_platt", "nll", "weighted_brier", "LABEL_COLUMNS",
           "WEIGHT_COLUMNS", "WEIGHTS_FILE", "META_FILE"]

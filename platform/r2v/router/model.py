"""The calibrated risk model: p_t = P(the SLM episode fails from here | step features).

An MLP trained with the router objective (cost + λ·(CVaR − ε) + Brier, λ by dual ascent; objective.py),
the checkpoint with the best validation Brier kept, then one temperature fitted on validation so that p
is a probability a threshold can be reasoned about. Inputs are z-scored with *training* statistics, which
travel with the checkpoint together with the feature spec the model was trained on.
"""
from __future__ import annotations

import copy
import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from r2v.config import RouterConfig
from r2v.errors import R2VError
from r2v.router.features import FEATURE_NAMES, FEATURE_VERSION
from r2v.router.objective import dual_update, multiplier, router_loss
from r2v.router.thresholds import select_threshold

WEIGHTS_FILE = "router.pt"
META_FILE = "router.json"
T_MIN, T_MAX = 0.05, 20.0


def resolve_device(spec: str = "auto") -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec.startswith("cuda") and not torch.cuda.is_available():
        raise R2VError(f"`router.device` = {spec!r} but no CUDA device is visible; use router.device=auto or cpu")
    return torch.device(spec)


# ----------------------------------------------------------------------------------------- data
@dataclass
class RouterData:
    """Router training rows as arrays: X (n×d), y (n, 1 = failure), group (n, perturbation seed),
    episode (n, episode ids; CVaR and pre-execution baselines group by them), step (n)."""

    X: np.ndarray
    y: np.ndarray
    group: np.ndarray
    episode: np.ndarray
    step: np.ndarray | None = None
    episode_failed: np.ndarray | None = None  # label (a) even when y is the branch label (pre_execution)
    source: str = "router rows"

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
        names = ("y", "group", "episode", "step") + (("episode_failed",) if self.episode_failed is not None else ())
        for name in names:
            if getattr(self, name).shape[0] != n:
                raise R2VError(f"{self.source}: `{name}` has {getattr(self, name).shape[0]} entries for {n} rows")
        if not np.all(np.isfinite(self.X)):
            raise R2VError(f"{self.source}: features hold NaN or infinite values; re-collect the rows")
        if n and not np.all((self.y == 0) | (self.y == 1)):
            raise R2VError(f"{self.source}: labels must be 0/1 (1 = the SLM fails), got {np.unique(self.y)[:5]}")

    def __len__(self) -> int:
        return int(self.X.shape[0])

    def subset(self, mask: np.ndarray) -> "RouterData":
        ef = None if self.episode_failed is None else self.episode_failed[mask]
        return RouterData(self.X[mask], self.y[mask], self.group[mask], self.episode[mask], self.step[mask], ef,
                          self.source)

    @classmethod
    def from_frame(cls, df: Any, label: str = "branch", feature_spec: str = FEATURE_VERSION,
                   source: str = "router rows") -> "RouterData":
        """From a DataFrame of ROUTER_ROWS_V1 rows. label=episode uses `episode_failed`; label=branch uses
        `branch_label` and keeps only the rows that were branched (the others have no branch label)."""
        if label not in ("episode", "branch"):
            raise R2VError(f"`router.label` = {label!r} is not one of ['branch', 'episode']")
        if "feature_spec" in df.columns:
            specs = set(df["feature_spec"].dropna().unique())
            if specs - {feature_spec}:
                raise R2VError(f"{source}: rows were written with feature spec {sorted(specs)} but this r2v uses "
                               f"{feature_spec}; re-collect the router rows with this version")
        col = "episode_failed" if label == "episode" else "branch_label"
        if col not in df.columns:
            raise R2VError(f"{source}: no `{col}` column for router.label={label}")
        df = df[df[col].notna()]
        if len(df) == 0:
            raise R2VError(f"{source}: no rows carry `{col}`; for router.label=branch collect branches "
                           f"(router.branch_steps_per_episode > 0) or use router.label=episode")
        X = np.stack([np.asarray(v, dtype=np.float32) for v in df["features"]]) if len(df) else np.zeros((0, 0))
        ef = df["episode_failed"].astype(float).to_numpy() if "episode_failed" in df.columns else None
        return cls(X, df[col].astype(float).to_numpy(), df["perturbation_seed"].to_numpy(),
                   df["episode_id"].to_numpy(), df["step"].to_numpy(), ef, source)


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
def nll(logits: np.ndarray, y: np.ndarray, temperature: float = 1.0) -> float:
    """Mean binary cross-entropy of σ(logit / T) against y, computed stably."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    y = np.asarray(y, dtype=np.float64)
    return float(np.mean(np.logaddexp(0.0, z) - y * z))


def fit_platt(logits: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(T, b) minimising validation NLL of σ(logit / T + b): temperature plus a bias, for when the
    objective's cost term has shifted the logits (temperature alone cannot undo a shift)."""
    logits, y = np.asarray(logits, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if logits.size == 0 or np.all(y == y.flat[0]):
        return 1.0, 0.0
    z, t = torch.from_numpy(logits), torch.from_numpy(y)
    beta = torch.tensor(1.0 / fit_temperature(logits, y), dtype=torch.float64, requires_grad=True)
    bias = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([beta, bias], lr=0.5, max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(z * beta + bias, t)
        loss.backward()
        return loss

    opt.step(closure)
    b = float(beta.detach()) if math.isfinite(float(beta.detach())) else 1.0
    temperature = float(min(T_MAX, max(T_MIN, 1.0 / b))) if b > 0 else T_MAX
    return temperature, float(bias.detach())


def fit_temperature(logits: np.ndarray, y: np.ndarray, t_min: float = T_MIN, t_max: float = T_MAX) -> float:
    """The T ∈ [t_min, t_max] minimising validation NLL of σ(logit / T).

    NLL is convex in β = 1/T, so a coarse log-spaced grid followed by golden-section search in the
    bracket around the best grid point finds the optimum without gradients."""
    logits, y = np.asarray(logits, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if logits.size == 0 or np.all(y == y.flat[0]):
        return 1.0  # one class only: no evidence about the scale, keep the network's own
    betas = np.geomspace(1.0 / t_max, 1.0 / t_min, 41)
    losses = [nll(logits * b, y) for b in betas]
    i = int(np.argmin(losses))
    lo, hi = betas[max(0, i - 1)], betas[min(len(betas) - 1, i + 1)]
    phi = (math.sqrt(5) - 1) / 2
    a, b = lo + (1 - phi) * (hi - lo), lo + phi * (hi - lo)
    fa, fb = nll(logits * a, y), nll(logits * b, y)
    for _ in range(60):
        if fa <= fb:
            hi, b, fb = b, a, fa
            a = lo + (1 - phi) * (hi - lo)
            fa = nll(logits * a, y)
        else:
            lo, a, fa = a, b, fb
            b = lo + phi * (hi - lo)
            fb = nll(logits * b, y)
    beta = (lo + hi) / 2
    if nll(logits * beta, y) > losses[i]:  # never worse than the grid
        beta = betas[i]
    return float(min(t_max, max(t_min, 1.0 / beta)))


# ----------------------------------------------------------------------------------------- model
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
        self.device = torch.device(device) if device is not None else resolve_device(
            getattr(self.cfg, "device", "auto"))
        self.net = RiskNet(n_features, list(self.cfg.hidden_sizes), self.cfg.dropout).to(self.device)
        self.mean = np.zeros(n_features, dtype=np.float32)
        self.std = np.ones(n_features, dtype=np.float32)
        self.temperature = 1.0
        self.bias = 0.0  # non-zero only with router.calibration=platt
        self.threshold = 0.5
        self.threshold_info: dict[str, Any] = {}
        self.history: list[dict[str, Any]] = []

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
        return torch.from_numpy((X - self.mean) / self.std).to(self.device)

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
        """Train with the CVaR-constrained objective, keep the best-val-Brier epoch, fit T, pick τ.
        Returns one record per epoch, then a summary record (best epoch, T, NLL before/after, τ)."""
        cfg = cfg or self.cfg
        self.cfg = cfg
        for name, data in (("train", train), ("validation", val)):
            if len(data) == 0:
                raise R2VError(f"router {name} data is empty: collect router rows for the "
                               f"{'train' if name == 'train' else 'val'} split first")
            if data.X.shape[1] != self.n_features:
                raise R2VError(f"{data.source}: rows have {data.X.shape[1]} features, {self.feature_spec} has "
                               f"{self.n_features}; re-collect the router rows")
        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed)
        self.net = RiskNet(self.n_features, list(cfg.hidden_sizes), cfg.dropout).to(self.device)
        self.mean = train.X.mean(axis=0).astype(np.float32)
        std = train.X.std(axis=0)
        self.std = np.where(std > 1e-6, std, 1.0).astype(np.float32)

        Xt, yt = self._tensor(train.X), torch.from_numpy(train.y).to(self.device)
        gt = torch.from_numpy(train.group).to(self.device)
        opt = torch.optim.AdamW(self.net.parameters(), lr=cfg.learning_rate,
                                weight_decay=getattr(cfg, "weight_decay", 0.0))
        n = len(train)
        bs = max(2, min(n, int(getattr(cfg, "batch_size", 512))))
        rho = 0.0
        best = (math.inf, -1, copy.deepcopy(self.net.state_dict()))
        self.history = []
        for epoch in range(int(cfg.epochs)):
            self.net.train()
            perm = torch.randperm(n, generator=gen).to(self.device)
            sums: dict[str, float] = {}
            batches = 0
            for start in range(0, n, bs):
                idx = perm[start:start + bs]
                if idx.numel() < 2:  # BatchNorm needs two rows
                    continue
                p = torch.sigmoid(self.net(Xt[idx]))
                loss, parts = router_loss(p, yt[idx], gt[idx], multiplier(rho), alpha=cfg.alpha, epsilon=cfg.epsilon,
                                          cost_llm=cfg.cost_llm, cost_slm=cfg.cost_slm, brier_weight=cfg.brier_weight)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                rho = dual_update(rho, parts["violation"], cfg.dual_lr)
                for k, v in parts.items():
                    sums[k] = sums.get(k, 0.0) + v
                batches += 1
            val_p = 1.0 / (1.0 + np.exp(-self.logits(val.X)))
            val_brier = float(np.mean((val_p - val.y) ** 2))
            record = {"epoch": epoch, **{f"train_{k}": v / max(1, batches) for k, v in sums.items()},
                      "lambda_end": multiplier(rho), "val_brier": val_brier}
            self.history.append(record)
            if val_brier < best[0]:
                best = (val_brier, epoch, copy.deepcopy(self.net.state_dict()))
        self.net.load_state_dict(best[2])
        val_logits = self.logits(val.X)
        nll_before = nll(val_logits, val.y)
        calibration = getattr(cfg, "calibration", "temperature")
        if calibration == "temperature":
            self.temperature, self.bias = fit_temperature(val_logits, val.y), 0.0
        elif calibration == "platt":
            self.temperature, self.bias = fit_platt(val_logits, val.y)
        else:
            raise R2VError(f"`router.calibration` = {calibration!r} is not one of ['platt', 'temperature']")
        p_val = self.predict(val.X)
        self.threshold, self.threshold_info = select_threshold(
            cfg.threshold, p_val=p_val, y_val=val.y, group_val=val.group, budget=cfg.budget, alpha=cfg.alpha,
            epsilon=cfg.epsilon, c_llm=cfg.cost_llm, c_slm=cfg.cost_slm, kappa=cfg.kappa)
        self.history.append({"best_epoch": best[1], "best_val_brier": best[0], "temperature": self.temperature,
                             "bias": self.bias, "val_nll_before_ts": nll_before,
                             "val_nll_after_ts": nll(val_logits / self.temperature + self.bias, val.y),
                             "val_brier_calibrated": float(np.mean((p_val - val.y) ** 2)),
                             "threshold": self.threshold, **{f"threshold_{k}": v for k, v in self.threshold_info.items()
                                                             if k != "tau"}})
        return self.history

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


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


__all__ = ["RiskModel", "RiskNet", "RouterData", "fit_temperature", "fit_platt", "nll", "resolve_device",
           "WEIGHTS_FILE", "META_FILE"]

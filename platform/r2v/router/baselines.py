"""Routers behind one interface and a name registry (RouteLLM's shape): each scores a step with
`risk(features) -> float`, higher = more reason to call the LLM, and escalates when risk ≥ threshold.

`features` is `features_by_name(vec)` of the SLM's proposal (FEATURE_NAMES), plus, for the two hindsight
references, what only the live env can tell: `slm_disagrees_with_oracle` (oracle_teacher) and
`slm_loses_from_here` (hindsight). Thresholded routers can be calibrated to a target LLM-call rate on
validation rows with the same `budget_threshold` as r2v, so methods are compared at matched budgets.
"""
from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from r2v.errors import R2VError
from r2v.router.features import FEATURE_NAMES, FEATURE_VERSION, vector_from_dict
from r2v.router.thresholds import budget_threshold, realised_rate

ORACLE_KEY = "slm_disagrees_with_oracle"
TWIN_DIR = "twin"  # models/router/twin: the cross-fitted twin of the risk model (router.cross_fit)
HINDSIGHT_KEY = "slm_loses_from_here"
STEP_KEY = "step_key"  # a number naming the step (task, perturbation seed, step): per-step draws that do not
# depend on which worker plays which episode, or in which order


def step_key(task_id: str, seed: int, step: int) -> float:
    """STEP_KEY's value: 32 bits of a hash of the step's identity (exact as a float)."""
    return float(int(hashlib.sha256(f"{task_id}/{seed}/{step}".encode()).hexdigest()[:8], 16))


class Router:
    """A scoring rule plus a threshold. `strict` rules escalate on risk > threshold (e.g. H > h); a
    threshold calibrated to a budget always uses ≥, like r2v. `fixed` routers have no threshold to tune."""

    name = "router"
    fixed = False
    needs_oracle_action = False  # True: the caller must add features[ORACLE_KEY] from the live env
    needs_lookahead = False  # True: the caller must add features[HINDSIGHT_KEY] from a counterfactual branch
    needs_step_key = False  # True: the caller adds features[STEP_KEY] where it knows the step (rollouts)
    learned = False  # True: fitted on the router's fit tasks, so its rate there is in-sample (see live_budget)
    twin: "Router | None" = None  # a learned router's cross-fitted twin: fitted on the calibration tasks instead
    # deferrals per episode this router's τ was set with, when not `router.grace`: a live budget search plays a
    # budget that grace keeps from being spent without grace (r2v.rollout.live_budget.calibrate_live)
    grace: int | None = None

    def __init__(self, threshold: float = 0.5, strict: bool = False):
        self.threshold = float(threshold)
        self.strict = strict

    def risk(self, features: dict[str, float]) -> float:
        raise NotImplementedError

    def escalate(self, features: dict[str, float]) -> bool:
        r = self.risk(features)
        return bool(r > self.threshold) if self.strict else bool(r >= self.threshold)

    def reset(self) -> None:
        """A new episode starts (routers with per-episode state override this)."""

    def prepare(self, rows: Sequence[dict[str, float]]) -> "Router":
        """Learn what the rule needs from unlabelled calibration steps before routing (steer fits its
        mixture here); the other routers need nothing. Returns the router."""
        return self

    def risks(self, rows: Sequence[dict[str, float]], episode_ids: Sequence[Any] | None = None) -> np.ndarray:
        """Risk of many logged steps at once (offline: calibration, sweeps)."""
        return np.array([self.risk(r) for r in rows], dtype=np.float64)

    def calibrate(self, rows: Sequence[dict[str, float]], budget: float,
                  episode_ids: Sequence[Any] | None = None) -> tuple[float, float]:
        """Set the threshold whose LLM-call rate on `rows` is closest to `budget` without exceeding it;
        returns (threshold, realised rate on rows). Fixed routers keep theirs and report their rate."""
        scores = self.risks(rows, episode_ids)
        if not self.fixed:
            self.threshold = budget_threshold(scores, budget)
            self.strict = False
        return self.threshold, self.rate(scores)

    def rate(self, scores: np.ndarray) -> float:
        """LLM-call rate this router's threshold gives on precomputed scores."""
        if self.strict:
            return float((np.asarray(scores) > self.threshold).mean()) if len(scores) else 0.0
        return realised_rate(scores, self.threshold)

    def config(self) -> dict[str, Any]:
        """JSON-able kwargs that rebuild this router with `make_router(name, **config)`."""
        return {"threshold": self.threshold, "strict": self.strict}


ROUTERS: dict[str, type[Router]] = {}


def register(name: str) -> Callable[[type[Router]], type[Router]]:
    def wrap(cls: type[Router]) -> type[Router]:
        cls.name = name
        ROUTERS[name] = cls
        return cls

    return wrap


def make_router(name: str, **kw: Any) -> Router:
    if name not in ROUTERS:
        raise R2VError(f"unknown router {name!r} (router.kind / eval.methods); known: {sorted(ROUTERS)}")
    try:
        return ROUTERS[name](**kw)
    except TypeError as e:
        raise R2VError(f"router {name!r}: bad arguments {sorted(kw)}: {e}") from None


def _get(features: dict[str, float], key: str) -> float:
    if key not in features:
        raise R2VError(f"router features lack {key!r}: build them with FeatureTracker + features_by_name "
                       f"({FEATURE_VERSION})")
    return float(features[key])


# ----------------------------------------------------------------------------------------- baselines
@register("slm_only")
class SLMOnlyRouter(Router):
    """Never escalates."""

    fixed = True

    def __init__(self):
        super().__init__(threshold=math.inf)

    def risk(self, features: dict[str, float]) -> float:
        return 0.0

    def config(self) -> dict[str, Any]:
        return {}


@register("llm_only")
class LLMOnlyRouter(Router):
    """Always escalates."""

    fixed = True

    def __init__(self):
        super().__init__(threshold=0.0)

    def risk(self, features: dict[str, float]) -> float:
        return 1.0

    def config(self) -> dict[str, Any]:
        return {}


@register("random")
class RandomRouter(Router):
    """Escalates each step with probability `budget` (seeded): the matched-budget floor. In rollouts the draw is
    a function of the router's seed and the step (STEP_KEY), so an episode routes the same whichever worker plays
    it; without a key (Serve) it comes from the router's own stream."""

    needs_step_key = True

    def __init__(self, budget: float = 0.3, seed: int = 0):
        if not 0 <= budget <= 1:
            raise R2VError(f"random router: budget = {budget} must be in [0, 1]")
        super().__init__(threshold=1.0 - budget)
        self.budget, self.seed = float(budget), int(seed)
        self.rng = np.random.default_rng(self.seed)

    def risk(self, features: dict[str, float]) -> float:
        key = features.get(STEP_KEY)  # uniform in [0, 1): P(u ≥ 1 − budget) = budget
        return float(self.rng.random() if key is None else np.random.default_rng([self.seed, int(key)]).random())

    def calibrate(self, rows, budget, episode_ids=None):
        """The budget *is* the parameter: no validation scores needed."""
        self.budget, self.threshold, self.strict = float(budget), 1.0 - float(budget), False
        return self.threshold, self.budget

    def config(self) -> dict[str, Any]:
        return {"budget": self.budget, "seed": self.seed}


@register("entropy")
class EntropyRouter(Router):
    """Escalates when the policy entropy H > h."""

    def __init__(self, threshold: float = 1.0, strict: bool = True):
        super().__init__(threshold, strict)

    def risk(self, features: dict[str, float]) -> float:
        return _get(features, "entropy")


@register("heuristic")
class HeuristicRouter(Router):
    """Escalates when H > h_max or V_mean < v_min; one score max(H − h_max, v_min − V_mean) > 0, so a
    calibrated threshold moves both margins together."""

    def __init__(self, h_max: float = 2.5, v_min: float = 0.4, threshold: float = 0.0, strict: bool = True):
        super().__init__(threshold, strict)
        self.h_max, self.v_min = float(h_max), float(v_min)

    def risk(self, features: dict[str, float]) -> float:
        return max(_get(features, "entropy") - self.h_max, self.v_min - _get(features, "verifier_mean"))

    def config(self) -> dict[str, Any]:
        return {**super().config(), "h_max": self.h_max, "v_min": self.v_min}


@register("verifier")
class VerifierRouter(Router):
    """Escalates when the best candidate's verifier score V_best < 0.5 (risk = 1 − V_best > 0.5)."""

    def __init__(self, threshold: float = 0.5, strict: bool = True):
        super().__init__(threshold, strict)

    def risk(self, features: dict[str, float]) -> float:
        return 1.0 - _get(features, "verifier_best")


@register("verifier_action")
class VerifierActionRouter(Router):
    """Escalates when the verifier scores the action about to be executed (the SLM's proposal) below 0.5:
    risk = 1 − V(proposal). `verifier` asks whether *any* candidate looks good, so it stays quiet while the
    SLM proposes a bad action beside a good one; this one reads the decision itself (the single feature
    closest to what R2V learns)."""

    def __init__(self, threshold: float = 0.5, strict: bool = True):
        super().__init__(threshold, strict)

    def risk(self, features: dict[str, float]) -> float:
        return 1.0 - _get(features, "verifier_proposal")


@register("oracle_teacher")
class OracleTeacherRouter(Router):
    """Hindsight reference that only means something with `teacher.kind: oracle`: escalates exactly when
    the SLM's proposal differs from the env oracle's action, which is then the teacher's own action, so it
    never escalates a step the teacher would not change (the caller sets features['slm_disagrees_with_oracle']).
    With any other teacher it measures agreement with the env's oracle, not the teacher's value."""

    fixed = True
    needs_oracle_action = True  # the routed agent must fill ORACLE_KEY from the live env; no offline rows have it

    def __init__(self):
        super().__init__(threshold=1.0)

    def risk(self, features: dict[str, float]) -> float:
        if ORACLE_KEY not in features:
            raise R2VError(f"oracle_teacher router needs features[{ORACLE_KEY!r}] (1.0 when the SLM's action differs "
                           f"from env.oracle_action()); the routed agent must set it")
        return float(features[ORACLE_KEY])

    def config(self) -> dict[str, Any]:
        return {}


@register("hindsight")
class HindsightRouter(Router):
    """The hindsight oracle, valid for any teacher: escalates exactly at the steps where the SLM, left alone
    from here (its proposal executed, then the SLM to the end, same perturbation seed), would lose the
    episode, which the counterfactual branch shows (r2v.rollout.episode.Lookahead), and the teacher would act
    differently (else the call leads to the same state). The caller sets features['slm_loses_from_here'] to
    both together. It is the router's own target known in hindsight: no call is spent where the SLM would win
    anyway or where the teacher would do the same. Greedy (a step it would lose from goes to the teacher now,
    not later), so not the fewest calls over all plans; it never reads the env's oracle, so it means the same
    with any teacher. Live evaluation only."""

    fixed = True
    needs_lookahead = True

    def __init__(self):
        super().__init__(threshold=1.0)

    def risk(self, features: dict[str, float]) -> float:
        if HINDSIGHT_KEY not in features:
            raise R2VError(f"hindsight router needs features[{HINDSIGHT_KEY!r}] (1.0 when the SLM alone loses from "
                           "this state), which only a live episode with a Lookahead has (eval.methods); logged "
                           "router rows cannot score it")
        return float(features[HINDSIGHT_KEY])

    def config(self) -> dict[str, Any]:
        return {}


@register("steer")
class SteerRouter(Router):
    """Training-free step router in the style of STEER (arXiv 2511.06190). The SLM's own step confidence
    (default `proposal_prob`: the softmax mass of its proposal among its candidates) is modelled, without
    labels, as a two-component 1-D Gaussian mixture fitted by EM on calibration steps (`prepare`/`fit`);
    risk = the posterior of the low-confidence component, as log-odds (threshold 0 = posterior 0.5;
    `posterior` gives the probability, which rounds to 1.0 for clearly unsure steps and would leave a budget
    nothing to rank). One shared variance makes the log-odds linear in the confidence, so risk falls strictly
    as confidence rises (separate variances turn the posterior back up in the wider component's tail).
    `calibrate` re-fits on the calibration rows, then sets τ to the budget like every other router."""

    def __init__(self, confidence: str = "proposal_prob", means: Sequence[float] | None = None,
                 std: float | None = None, weights: Sequence[float] | None = None, threshold: float = 0.0,
                 strict: bool = False):
        super().__init__(threshold, strict)
        if confidence not in FEATURE_NAMES:
            raise R2VError(f"steer router: confidence {confidence!r} is not a feature; pick one of {FEATURE_NAMES}")
        self.confidence = confidence
        self.means = None if means is None else [float(m) for m in means]
        self.std = None if std is None else float(std)
        self.weights = None if weights is None else [float(w) for w in weights]

    def prepare(self, rows: Sequence[dict[str, float]]) -> "SteerRouter":
        return self.fit(rows)

    def fit(self, rows: Sequence[dict[str, float]], max_iter: int = 500, tol: float = 1e-8) -> "SteerRouter":
        """EM on the rows' confidences (no labels); the threshold is left as it is."""
        x = np.asarray([_get(r, self.confidence) for r in rows], dtype=np.float64)
        if len(x) < 2:
            raise R2VError(f"steer router: {len(x)} calibration steps; EM needs at least 2 (collect router rows)")
        means, self.std, weights = fit_gmm2(x, max_iter, tol)
        self.means, self.weights = means.tolist(), weights.tolist()
        return self

    def risks(self, rows, episode_ids=None) -> np.ndarray:
        if self.means is None:
            raise R2VError("steer router is not fitted: `prepare` (or `calibrate`) it on calibration router rows "
                           "first")
        x = np.asarray([_get(r, self.confidence) for r in rows], dtype=np.float64)
        return gmm2_low_logodds(x, self.means, self.std, self.weights)

    def risk(self, features: dict[str, float]) -> float:
        return float(self.risks([features])[0])

    def posterior(self, rows: Sequence[dict[str, float]]) -> np.ndarray:
        """P(low-confidence component | confidence) of each row."""
        return 1.0 / (1.0 + np.exp(-self.risks(rows)))

    def calibrate(self, rows, budget, episode_ids=None):
        self.fit(rows)
        return super().calibrate(rows, budget, episode_ids)

    def config(self) -> dict[str, Any]:
        return {**super().config(), "confidence": self.confidence, "means": self.means, "std": self.std,
                "weights": self.weights}


def fit_gmm2(x: np.ndarray, max_iter: int = 500, tol: float = 1e-8) -> tuple[np.ndarray, float, np.ndarray]:
    """(means sorted low → high, shared std, weights) of a 2-component 1-D Gaussian mixture with one shared
    variance, by EM from the quartiles. The variance has a floor so that identical values cannot collapse it."""
    x = np.asarray(x, dtype=np.float64).reshape(-1)
    floor = max(1e-6, 1e-3 * float(x.std()))
    mu = np.quantile(x, [0.25, 0.75])
    var = max(float(x.var()), floor ** 2)
    w = np.array([0.5, 0.5])
    prev = -np.inf
    for _ in range(max_iter):
        # E step in log space: log w_k + log N(x | mu_k, var)
        logp = np.log(w)[None, :] - 0.5 * (x[:, None] - mu[None, :]) ** 2 / var - 0.5 * np.log(2 * np.pi * var)
        norm = np.logaddexp(logp[:, 0], logp[:, 1])
        r = np.exp(logp - norm[:, None])
        ll = float(norm.mean())
        # M step
        nk = r.sum(axis=0) + 1e-12
        w = np.clip(nk / len(x), 1e-6, 1.0)
        w = w / w.sum()
        mu = (r * x[:, None]).sum(axis=0) / nk
        var = max(float((r * (x[:, None] - mu[None, :]) ** 2).sum() / len(x)), floor ** 2)
        if ll - prev < tol:
            break
        prev = ll
    order = np.argsort(mu)
    return mu[order], float(np.sqrt(var)), w[order]


def gmm2_low_logodds(x: np.ndarray, means: Sequence[float], std: float, weights: Sequence[float]) -> np.ndarray:
    """log P(low | x) − log P(high | x) for a shared-variance 2-component mixture: linear in x."""
    x = np.asarray(x, dtype=np.float64)
    m0, m1 = float(means[0]), float(means[1])
    return np.log(weights[0]) - np.log(weights[1]) + ((x - m1) ** 2 - (x - m0) ** 2) / (2.0 * std ** 2)


@register("r2v")
class R2VRouter(Router):
    """The calibrated risk model: risk = p; threshold = the model's own (from router.threshold) unless given.
    A model dir with a `twin/` (router.cross_fit) also loads the cross-fitted twin, used only to set τ."""

    learned = True

    def __init__(self, model: Any = None, model_dir: str | None = None, threshold: float | None = None,
                 device: str | None = None, twin: Any = None):
        from r2v.router.model import RiskModel

        if model is None:
            if model_dir is None:
                raise R2VError("r2v router needs a trained model: pass model= or model_dir= (models/router/)")
            model = RiskModel.load(model_dir, device=device)
            if twin is None and (Path(model_dir) / TWIN_DIR).is_dir():
                twin = RiskModel.load(Path(model_dir) / TWIN_DIR, device=device)
        self.model, self.model_dir = model, (str(model_dir) if model_dir is not None else None)
        super().__init__(model.threshold if threshold is None else threshold, strict=False)
        if threshold is None:  # its stored τ, with the grace that τ was set with (None: `router.grace`)
            self.grace = model.threshold_info.get("grace")
        if twin is not None:
            self.twin = R2VRouter(model=twin)  # at its own τ: the same quantile as this one's (live_budget)

    def risk(self, features: dict[str, float]) -> float:
        return float(self.model.predict(np.asarray([vector_from_dict(features, self.model.feature_names)]))[0])

    def risks(self, rows, episode_ids=None) -> np.ndarray:
        if len(rows) == 0:
            return np.zeros(0)
        return self.model.predict(np.asarray([vector_from_dict(r, self.model.feature_names) for r in rows]))

    def config(self) -> dict[str, Any]:
        return {"model_dir": self.model_dir, "threshold": self.threshold}


@register("pre_execution")
class PreExecutionRouter(Router):
    """Decides once per task, before acting: a logistic model on the first step's features predicts
    episode failure; when p ≥ threshold the WHOLE episode goes to the LLM (every step escalates)."""

    learned = True

    def __init__(self, weights: Sequence[float] | None = None, bias: float = 0.0, mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None, threshold: float = 0.5,
                 feature_names: Sequence[str] = FEATURE_NAMES):
        super().__init__(threshold, strict=False)
        self.feature_names = tuple(feature_names)
        d = len(self.feature_names)
        self.weights = np.zeros(d) if weights is None else np.asarray(weights, dtype=np.float64)
        self.bias = float(bias)
        self.mean = np.zeros(d) if mean is None else np.asarray(mean, dtype=np.float64)
        self.std = np.ones(d) if std is None else np.asarray(std, dtype=np.float64)
        self._episode_risk: float | None = None

    # -- model
    def predict(self, X: np.ndarray) -> np.ndarray:
        z = ((np.asarray(X, dtype=np.float64) - self.mean) / self.std) @ self.weights + self.bias
        return 1.0 / (1.0 + np.exp(-z))

    def fit(self, data: Any, l2: float = 1e-2) -> "PreExecutionRouter":
        """Fit on RouterData: one row per episode (its earliest step), label = episode failure."""
        X, y = first_step_rows(data)
        if len(X) == 0:
            raise R2VError("pre_execution router: no training episodes; collect SLM router rows for the train split")
        self.mean = X.mean(axis=0)
        std = X.std(axis=0)
        self.std = np.where(std > 1e-6, std, 1.0)
        Z = torch.from_numpy((X - self.mean) / self.std)
        t = torch.from_numpy(y)
        w = torch.zeros(X.shape[1], dtype=torch.float64, requires_grad=True)
        b = torch.zeros((), dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS([w, b], lr=0.5, max_iter=300, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = torch.nn.functional.binary_cross_entropy_with_logits(Z @ w + b, t) + l2 * (w ** 2).sum()
            loss.backward()
            return loss

        opt.step(closure)
        self.weights, self.bias = w.detach().numpy().copy(), float(b.detach())
        return self

    # -- routing
    def reset(self) -> None:
        self._episode_risk = None

    def risk(self, features: dict[str, float]) -> float:
        if self._episode_risk is None or features.get("step", None) == 0:
            x = np.asarray([vector_from_dict(features, self.feature_names)])
            self._episode_risk = float(self.predict(x)[0])
        return self._episode_risk

    def risks(self, rows, episode_ids=None) -> np.ndarray:
        """Each row gets its episode's first-step score (rows are their own episode without ids)."""
        if len(rows) == 0:
            return np.zeros(0)
        p = self.predict(np.asarray([vector_from_dict(r, self.feature_names) for r in rows]))
        if episode_ids is None:
            return p
        ids = np.asarray(episode_ids)
        steps = np.asarray([r.get("step", 0.0) for r in rows])
        out = np.empty_like(p)
        for e in np.unique(ids):
            idx = np.nonzero(ids == e)[0]
            out[idx] = p[idx[np.argmin(steps[idx])]]
        return out

    def config(self) -> dict[str, Any]:
        return {"weights": self.weights.tolist(), "bias": self.bias, "mean": self.mean.tolist(),
                "std": self.std.tolist(), "threshold": self.threshold, "feature_names": list(self.feature_names)}


def first_step_rows(data: Any) -> tuple[np.ndarray, np.ndarray]:
    """(X of each episode's earliest step, episode-failure label) from RouterData."""
    label = data.episode_failed if data.episode_failed is not None else data.y
    X, y = [], []
    for e in np.unique(data.episode):
        idx = np.nonzero(data.episode == e)[0]
        X.append(data.X[idx[np.argmin(data.step[idx])]])
        y.append(float(np.max(label[idx])))
    return np.asarray(X, dtype=np.float64).reshape(-1, data.X.shape[1]), np.asarray(y, dtype=np.float64)


def rows_from_matrix(X: np.ndarray, names: Sequence[str] = FEATURE_NAMES) -> list[dict[str, float]]:
    """Feature dicts from an n×d matrix (logged router rows → Router.risks / calibrate)."""
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2 or X.shape[1] != len(names):
        raise R2VError(f"expected an n×{len(names)} feature matrix ({FEATURE_VERSION}), got shape {X.shape}")
    return [dict(zip(names, map(float, row))) for row in X]


def save_router(router: Router, directory: str | Path) -> Path:
    """baseline.json with the name and config: `load_router` rebuilds it (r2v: also its model dir)."""
    import json

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    (d / "baseline.json").write_text(json.dumps({"name": router.name, "config": router.config()}, indent=1))
    return d


def load_router(directory: str | Path) -> Router:
    import json

    path = Path(directory) / "baseline.json"
    if not path.is_file():
        raise R2VError(f"{path}: no saved router here; save one with r2v.router.baselines.save_router")
    meta = json.loads(path.read_text())
    return make_router(meta["name"], **meta["config"])


__all__ = ["Router", "ROUTERS", "register", "make_router", "SLMOnlyRouter", "LLMOnlyRouter", "RandomRouter",
           "EntropyRouter", "HeuristicRouter", "VerifierRouter", "OracleTeacherRouter", "SteerRouter", "R2VRouter",
           "PreExecutionRouter", "fit_gmm2", "gmm2_low_logodds", "first_step_rows", "rows_from_matrix",
           "save_router", "load_router", "ORACLE_KEY", "TWIN_DIR"]

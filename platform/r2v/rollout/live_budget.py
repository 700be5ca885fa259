"""A budget is live LLM calls per step: routed episodes on the calibration games set each router's τ.

`router.budget = B` (and `r2v calibrate --budget B`, `eval.budgets`) means "escalate B of the steps the
routed agent plays", not "B of the steps an SLM-only agent would play": escalating ends episodes sooner and
keeps them off the risky paths, so the same τ escalates far fewer live steps (0.3 → ~0.1 on the quickstart).
Each round of `live_budget_search` plays every router still searching on the calibration games under
`router.budget_seeds`, all in one collection; probes are shards keyed by the router's identity and τ, so an
interrupted or repeated calibration (train-router, calibrate, eval) reuses them.

Which val games a router plays (`assign_games`): a router that learned nothing from labels plays all of
them; a learned one (r2v, pre_execution) only the calibration games, since its rate on the games it was fitted
on is in-sample, unless it has a cross-fitted twin (`router.cross_fit`): then the twin, fitted on the
calibration games, routes the fit games, and the rate pools all val games. The game is the unit of the rate's
noise, so twice the games at half the seeds is the same cost for a steadier τ.

With `router.grace`, the deferred moves stay the SLM's even at τ → 0, so a generous budget may not be spendable;
the search then plays that budget again without grace and keeps whichever comes closer (`search_spending_grace`).

The twin does not route at the same τ but at the same *quantile* (`TwinScale`): each model is calibrated
(`router.calibration`) on the other half's games, whose failure rates differ, so the two agree on which steps are
risky and disagree on how risky. In the quickstart the twin escalated half the steps the main model did at one τ, the
pooled rate under-stated the main model's by ~0.05-0.1, and the test rate (main model only) overshot every
budget; matched by quantile, the search measures the rate the deployed model will have.
"""
from __future__ import annotations

import copy
import hashlib
import json
from typing import Any

import numpy as np

from r2v.config import R2VConfig
from r2v.data import ShardStore
from r2v.errors import R2VError
from r2v.experiment import Experiment
from r2v.router.baselines import Router
from r2v.policies.routed import grace_for
from r2v.router.thresholds import live_budget_search, live_tolerance, quantile_map


def probes_dir(cfg: R2VConfig):
    return Experiment(cfg).rollouts("budget-calibration")


def router_identity(router: Router) -> str:
    """What a router's decisions depend on besides τ: its weights (r2v) or its settings (baselines)."""
    h = hashlib.sha256(router.name.encode())
    model = getattr(router, "model", None)
    if model is not None:
        for tensor in model.net.state_dict().values():
            h.update(tensor.detach().cpu().numpy().tobytes())
        h.update(np.asarray([model.temperature, model.bias], dtype=np.float64).tobytes())
        h.update(np.asarray(model.mean).tobytes() + np.asarray(model.std).tobytes())
    else:
        h.update(json.dumps({k: v for k, v in router.config().items() if k not in ("threshold", "strict", "budget")},
                            sort_keys=True, default=str).encode())
    return h.hexdigest()[:10]


def routing_name(router: Router, tau: float) -> str:
    """The policy name of routed episodes: router, identity, τ (and a grace other than `router.grace`), so
    episodes that route identically are shared and a changed router, τ or grace never reuses another's episodes."""
    grace = "" if router.grace is None else f"~grace{router.grace}"
    return f"{router.name}#{router_identity(router)}~{tau:.10g}{grace}"


class TwinScale:
    """The cross-fitted twin's risk scale against the main model's, from the SLM-only steps each never fitted
    on (the main model's: the calibration games; the twin's: the fit games). `to_twin(τ)` is the twin's τ that
    escalates the same share of its held-out steps as τ does of the main model's; `to_main` maps the risks the
    twin met back, so one search over the main model's τ sees one scale."""

    def __init__(self, main_risks: np.ndarray, twin_risks: np.ndarray):
        self.main, self.twin = np.asarray(main_risks, np.float64), np.asarray(twin_risks, np.float64)

    @classmethod
    def of(cls, cfg: R2VConfig, router: Router, rows) -> "TwinScale":
        from r2v.eval.live import feature_rows
        from r2v.router.stage import router_part

        return cls(router.risks(feature_rows(router_part(cfg, rows, "calibration"))),
                   router.twin.risks(feature_rows(router_part(cfg, rows, "fit"))))

    def to_twin(self, tau: float) -> float:
        return float(quantile_map(tau, self.main, self.twin))

    def to_main(self, risks: np.ndarray) -> np.ndarray:
        return quantile_map(risks, self.twin, self.main)


def calibration_games(cfg: R2VConfig, rows) -> tuple[list, list]:
    """The val games τ is set on: (calibration games, fit games; the latter only with router.fit_split=val).
    Never the test games. Who routes which is `assign_games` (module docstring)."""
    from r2v.envs.registry import load_tasks
    from r2v.router.stage import router_part

    by_id = {t.task_id: t for t in load_tasks(cfg.env)}
    cal = sorted(set(router_part(cfg, rows, "calibration")["task_id"]))
    fit = sorted(set(router_part(cfg, rows, "fit")["task_id"]) - set(cal)) if cfg.router.fit_split == "val" else []
    if not cal:
        raise R2VError("no calibration games: collect router rows for the val split (`r2v collect-router`)")
    missing = [i for i in cal + fit if i not in by_id]
    if missing:
        raise R2VError(f"the router rows name {len(missing)} val games the env does not load (e.g. {missing[0]!r}): "
                       f"τ is set by playing them. Re-run `r2v collect-router` for this env, or set "
                       f"sweep.live_threshold=false / router.threshold=bayes to keep τ offline")
    return [by_id[i] for i in cal], [by_id[i] for i in fit]


def assign_games(router: Router, calibration: list, fit: list) -> list[tuple[Router, list]]:
    """Which router plays which val games while τ is set: no game is routed by a model fitted on it."""
    if not router.learned:
        return [(router, calibration + fit)]
    return [(router, calibration)] + ([(router.twin, fit)] if router.twin is not None and fit else [])


def routed_folds(router: Router, tau: float, folds: list[tuple[Router, list]], scale: TwinScale | None
                 ) -> list[tuple[Router, list, bool]]:
    """Copies of the routers of `folds` (`assign_games`) set to the main model's `tau`, the twin to the same
    quantile (`scale`): (router at its τ, its games, whether it is the twin)."""
    out = []
    for fold_router, tasks in folds:
        is_twin = fold_router is router.twin
        routed = copy.deepcopy(fold_router)
        routed.threshold, routed.strict = (scale.to_twin(tau) if is_twin else float(tau)), False
        out.append((routed, tasks, is_twin))
    return out


def set_grace(router: Router, grace: int | None) -> None:
    """The grace a router (and its cross-fitted twin) routes with; None: `router.grace`."""
    router.grace = grace
    if router.twin is not None:
        router.twin.grace = grace


def search_spending_grace(p_offline: dict[str, Any], budgets: dict[str, float], measure, routers: dict[str, Router],
                         grace: int, rounds: int) -> dict[str, dict[str, Any]]:
    """`live_budget_search` with every router at `grace` (`router.grace`); then each budget that grace kept from
    being spent (at τ → 0 the deferred moves are still the SLM's, so the live rate tops out below B: 0.47 at
    B = 0.6 with grace 3 on the quickstart) is searched again without grace, and played so when that comes closer
    to B (its record then says `grace: 0`, and its router is set to it): the budget is the contract, grace only
    a way to spend it better. `measure` must read each router's grace (`grace_for`)."""
    for name in budgets:
        set_grace(routers[name], None)
    found = live_budget_search(p_offline, budgets, measure, rounds=rounds)
    short = {n: b for n, b in budgets.items()
             if found[n]["rate"] < b - live_tolerance(b) and grace_for(routers[n], grace) > 0}
    if not short:
        return found
    for name in short:
        set_grace(routers[name], 0)
    for name, rec in live_budget_search(p_offline, short, measure, rounds=rounds).items():
        if abs(rec["rate"] - rec["budget"]) < abs(found[name]["rate"] - rec["budget"]):
            found[name] = rec | {"grace": 0}
        else:
            set_grace(routers[name], None)
    return found


def calibrate_live(cfg: R2VConfig, routers: dict[str, Router], budgets: dict[str, float],
                   p_offline: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Set each router's threshold so that its routed episodes on the calibration games escalate
    `budgets[name]` of their steps; returns the search record per name (τ, calibration-game rate and episode
    success at τ, probes; `grace`: 0 where the budget was only spendable without `router.grace`, and then the
    router is set to it too).
    `p_offline` holds each router's risks on the SLM-only calibration steps (the search's starting point)."""
    from r2v.policies.slm import collection_slm
    from r2v.ray_utils import init_ray
    from r2v.rollout.engine import collect, of_units, plan_units
    from r2v.rollout.router_rows import RoutedAgentFactory
    from r2v.rollout.stage import routed_inputs
    from r2v.router.stage import read_router_rows

    if not budgets:
        return {}
    init_ray(cfg)
    rows = read_router_rows(cfg)
    cal, fit = calibration_games(cfg, rows)
    folds = {name: assign_games(routers[name], cal, fit) for name in budgets}
    scales = {name: TwinScale.of(cfg, routers[name], rows) for name in budgets if len(folds[name]) > 1}
    seeds = list(cfg.router.budget_seeds)
    model_dir = str(Experiment(cfg).deployed_policy_dir())
    out_dir = probes_dir(cfg)
    inputs = routed_inputs(cfg, model_dir)

    success: dict[tuple, float] = {}  # (name, τ, grace) -> the probe's episode success on the val games

    def measure(taus: dict[str, float]) -> dict[str, tuple[float, np.ndarray]]:  # runs inside `with ... as server`
        policies: dict[str, dict[str, bool]] = {}  # name -> {policy: routed by the twin}
        factories, units = {}, []
        for name, tau in taus.items():
            policies[name] = {}
            for router, fold_tasks, is_twin in routed_folds(routers[name], tau, folds[name], scales.get(name)):
                policy = routing_name(router, router.threshold)
                policies[name][policy] = is_twin
                factories[policy] = RoutedAgentFactory(model_dir, server, router, with_teacher=True, name=policy)
                units += plan_units({"val": fold_tasks}, seeds, 1, policy)
        print(f"[budget] {len(taus)} routers, {len(units)} routed episodes on calibration games")
        collect(cfg, units, factories, out_dir, inputs=inputs)
        columns = ["task_id", "perturbation_seed", "policy", "actor", "risk", "episode_success"]
        df = of_units(ShardStore(out_dir, "steps").read_pandas(columns), units)  # not other seeds' probes
        out = {}
        for name, names in policies.items():
            part = df[df["policy"].isin(list(names))]
            episodes = part.groupby(["task_id", "perturbation_seed", "policy"])["episode_success"].first()
            key = (name, float(taus[name]), routers[name].grace)
            success[key] = float(episodes.mean()) if len(episodes) else float("nan")
            risks = [scales[name].to_main(p["risk"].dropna().to_numpy(np.float64)) if policies[name][policy]
                     else p["risk"].dropna().to_numpy(np.float64) for policy, p in part.groupby("policy")]
            out[name] = (float((part["actor"] == "teacher").mean()) if len(part) else 0.0,
                         np.concatenate(risks) if risks else np.zeros(0))
        return out

    with collection_slm(cfg, model_dir) as server:
        found = search_spending_grace(p_offline, budgets, measure, routers, cfg.router.grace, cfg.router.budget_rounds)
    for name, rec in found.items():
        rec["success"] = success[(name, rec["tau"], rec.get("grace"))]
        routers[name].threshold, routers[name].strict = rec["tau"], False
        if name in scales:
            rec["twin_tau"] = scales[name].to_twin(rec["tau"])
            routers[name].twin.threshold, routers[name].twin.strict = rec["twin_tau"], False
        n_games = sum(len(t) for _, t in folds[name])
        twin = " (half routed by its cross-fitted twin at the same quantile)" if name in scales else ""
        rec.update(calibrated_on=f"routed episodes on {n_games} val games{twin} x {len(seeds)} seeds "
                                 f"({n_games * len(seeds)} per probe)")
    return found

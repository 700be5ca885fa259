"""A budget is live LLM calls per step: routed episodes on the calibration games set each router's τ.

`router.budget = B` (and `r2v calibrate --budget B`, `eval.budgets`) means "escalate B of the steps the
routed agent plays", not "B of the steps an SLM-only agent would play": escalating ends episodes sooner and
keeps them off the risky paths, so the same τ escalates far fewer live steps (0.3 → ~0.1 on the quickstart).
Each round of `live_budget_search` plays every router still searching on the calibration games under
`router.budget_seeds`, all in one collection; probes are shards keyed by the router's identity and τ, so an
interrupted or repeated calibration (train-router, calibrate, eval) reuses them.
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
    """The policy name of routed episodes: router, identity and τ, so episodes that route identically are shared
    and a changed router or τ never reuses another's episodes."""
    return f"{router.name}#{router_identity(router)}~{tau:.10g}"


def calibration_tasks(cfg: R2VConfig) -> list:
    """The games τ is calibrated on: the router's calibration games (never the test games)."""
    from r2v.envs.registry import load_tasks
    from r2v.router.stage import read_router_rows, router_part

    ids = set(router_part(cfg, read_router_rows(cfg), "calibration")["task_id"])
    tasks = [t for t in load_tasks(cfg.env) if t.task_id in ids]
    if not tasks:
        raise R2VError("no calibration games: collect router rows for the val split (`r2v collect-router`)")
    return tasks


def calibrate_live(cfg: R2VConfig, routers: dict[str, Router], budgets: dict[str, float],
                   p_offline: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Set each router's threshold so that its routed episodes on the calibration games escalate
    `budgets[name]` of their steps; returns the search record per name (τ, calibration-game rate, probes).
    `p_offline` holds each router's risks on the SLM-only calibration steps (the search's starting point)."""
    import ray

    from r2v.policies.slm import start_slm_server
    from r2v.ray_utils import init_ray
    from r2v.rollout.engine import collect, plan_units
    from r2v.rollout.router_rows import RoutedAgentFactory
    from r2v.rollout.stage import collection_inputs
    from r2v.router.thresholds import live_budget_search

    if not budgets:
        return {}
    init_ray(cfg)
    tasks = {"val": calibration_tasks(cfg)}
    seeds = list(cfg.router.budget_seeds)
    model_dir = str(Experiment(cfg).deployed_policy_dir())
    out_dir = probes_dir(cfg)
    inputs = collection_inputs(cfg, ("env", "policy", "verifier", "teacher"), (model_dir,))
    server = start_slm_server(cfg, model_dir, cfg.collect.num_workers)

    def measure(taus: dict[str, float]) -> dict[str, tuple[float, np.ndarray]]:
        policies, factories, units = {}, {}, []
        for name, tau in taus.items():
            router = copy.deepcopy(routers[name])
            router.threshold, router.strict = float(tau), False
            policy = policies[name] = routing_name(routers[name], tau)
            factories[policy] = RoutedAgentFactory(model_dir, server, router, with_teacher=True, name=policy)
            units += plan_units(tasks, seeds, 1, policy)
        print(f"[budget] {len(taus)} routers x {len(units) // len(taus)} routed episodes on calibration games")
        collect(cfg, units, factories, out_dir, inputs=inputs)
        df = ShardStore(out_dir, "steps").read_pandas(["policy", "actor", "risk"])
        out = {}
        for name, policy in policies.items():
            part = df[df["policy"] == policy]
            out[name] = (float((part["actor"] == "teacher").mean()) if len(part) else 0.0,
                         part["risk"].dropna().to_numpy(dtype=np.float64))
        return out

    try:
        found = live_budget_search(p_offline, budgets, measure, rounds=cfg.router.budget_rounds)
    finally:
        ray.kill(server)
    n_games, n_eps = len(tasks["val"]), len(tasks["val"]) * len(seeds)
    for name, rec in found.items():
        routers[name].threshold, routers[name].strict = rec["tau"], False
        rec.update(calibrated_on=f"routed episodes on {n_games} calibration games x {len(seeds)} seeds "
                                 f"({n_eps} per probe)")
    return found

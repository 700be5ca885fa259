"""What the Serve deployments load: the SLM directory, the router and its threshold, the verifier, the
teacher. Plain Python (no Ray), so each choice is unit-testable and fails with a message at build time."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from r2v.config import R2VConfig, resolve_device
from r2v.errors import ConfigError, R2VError
from r2v.experiment import deployed_policy_dir, is_model_dir

UNSERVABLE_ROUTERS = {"oracle_teacher": "the oracle_teacher router needs a live env's oracle action, which a "
                                        "served agent has not",
                      "hindsight": "the hindsight router plays the SLM on from each state in a copy of the live env, "
                                   "which a served agent has not"}


def slm_path(cfg: R2VConfig, models_dir: str | Path) -> str:
    """`serve.slm_path`, else the deployed SLM under models_dir (r2v.experiment: select-policy's choice, else dpo,
    else bc), else `model.path`."""
    if cfg.serve.slm_path:
        path = Path(cfg.serve.slm_path)
    else:
        path = deployed_policy_dir(models_dir) or Path(cfg.model.path)
    if not is_model_dir(path):
        raise ConfigError(f"no SLM to serve at {path} (no config.json): train one (r2v train-bc / train-dpo), "
                          f"point serve.models_dir at runs/<exp>/models, or set serve.slm_path")
    return str(path)


def read_threshold_file(path: str | Path) -> float:
    """The threshold in a sweep's best-<budget>.yaml: `threshold`, `tau`, `serve.threshold` or a numeric
    `router.threshold`, first found."""
    from omegaconf import OmegaConf

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"serve.threshold_file = {p}: no such file (run `r2v sweep`, or drop the setting)")
    try:
        data = OmegaConf.to_container(OmegaConf.load(p), resolve=True)
    except Exception as e:
        raise ConfigError(f"serve.threshold_file = {p}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"serve.threshold_file = {p}: expected a mapping")
    for keys in (("sweep_result", "threshold"), ("threshold",), ("tau",), ("serve", "threshold"),
                 ("router", "threshold")):
        node: Any = data
        for k in keys:
            node = node.get(k) if isinstance(node, dict) else None
        if isinstance(node, (int, float)) and not isinstance(node, bool):
            return float(node)
    raise ConfigError(f"serve.threshold_file = {p}: no numeric `threshold` (or sweep_result.threshold, tau, "
                      f"serve.threshold, router.threshold) in it")


def sweep_result(path: str | Path) -> dict[str, Any] | None:
    """`r2v.tune.sweep.load_best(path)` when the file is an r2v sweep result (it has `sweep_result:`), else None."""
    from omegaconf import OmegaConf

    try:
        doc = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    except Exception:  # noqa: BLE001 - read_threshold_file reports unreadable files
        return None
    if not isinstance(doc, dict) or "sweep_result" not in doc:
        return None
    from r2v.tune.sweep import load_best

    try:
        return load_best(path)
    except R2VError as e:
        raise ConfigError(f"serve.threshold_file: {e}") from None


def load_serving_router(cfg: R2VConfig, models_dir: str | Path):
    """(router, description). `serve.router` (default `router.kind`); r2v loads models_dir/router and falls
    back to `serve.fallback_router` when it is missing. Threshold: serve.threshold > serve.threshold_file >
    the router's own."""
    from r2v.router.baselines import load_router, make_router
    from r2v.router.model import META_FILE

    name = cfg.serve.router or cfg.router.kind
    router_dir = Path(models_dir) / "router"
    device = resolve_device(cfg.router.device, "router.device")  # here, in the process that loads it
    source = "config"
    if name in UNSERVABLE_ROUTERS:
        raise ConfigError(f"serve.router = {name!r} cannot be served: {UNSERVABLE_ROUTERS[name]}")
    best = sweep_result(cfg.serve.threshold_file) if cfg.serve.threshold_file else None
    if best is not None and name != "r2v":
        raise ConfigError(f"serve.threshold_file = {cfg.serve.threshold_file} is an r2v sweep result (an r2v "
                          f"router's τ) but the served router is {name!r}; serve router r2v or drop the file")
    if best is not None:  # the sweep's router, its τ baked in (r2v.tune.sweep.load_best)
        router = make_router("r2v", model_dir=best["model_dir"], device=device)
        source = f"{cfg.serve.threshold_file} ({best['model_dir']})"
    elif name == "r2v":
        if (router_dir / META_FILE).is_file():
            router = make_router("r2v", model_dir=str(router_dir), device=device)
            source = str(router_dir)
        else:
            name = cfg.serve.fallback_router
            if name in ("r2v", *UNSERVABLE_ROUTERS):
                raise ConfigError(f"serve.fallback_router = {name!r}: name a baseline that needs no checkpoint")
            print(f"[serve] no router checkpoint at {router_dir}; serving the `{name}` baseline "
                  f"(serve.fallback_router)")
            router = make_router(name)
            source = "fallback"
    elif name == "pre_execution" and (router_dir / "pre_execution" / "baseline.json").is_file():
        router = load_router(router_dir / "pre_execution")
        source = str(router_dir / "pre_execution")
    else:
        router = make_router(name)
    if cfg.serve.threshold is not None:
        router.threshold, router.strict, source = float(cfg.serve.threshold), False, source + "+serve.threshold"
    elif cfg.serve.threshold_file and best is None:
        router.threshold, router.strict = read_threshold_file(cfg.serve.threshold_file), False
        source += f"+{cfg.serve.threshold_file}"
    return router, source


def serving_pacer(cfg: R2VConfig, router):
    """The BudgetPacer that holds the served router's call rate at `serve.pace_budget` (None: no pacing)."""
    from r2v.router.thresholds import BudgetPacer

    if cfg.serve.pace_budget is None:
        return None
    if router.fixed:
        raise ConfigError(f"serve.pace_budget = {cfg.serve.pace_budget}: the served router {router.name!r} has no "
                          f"threshold to move; serve a thresholded router or set serve.pace_budget=null")
    return BudgetPacer(router.threshold, cfg.serve.pace_budget, cfg.serve.pace_every, cfg.serve.pace_memory)


def load_verifier(cfg: R2VConfig, models_dir: str | Path):
    """The configured verifier; `learned` is read from models_dir/verifier."""
    from r2v.verifier.base import make_verifier, sandbox_limits

    if cfg.verifier.kind == "learned":
        from r2v.verifier.learned import LearnedVerifier

        return LearnedVerifier.load(Path(models_dir) / "verifier",
                                    device=resolve_device(cfg.verifier.device, "verifier.device"),
                                    limits=sandbox_limits(cfg))
    return make_verifier(cfg)


class NoTeacher:
    """Stands in when the configured teacher cannot serve (oracle: no env): escalations report why."""

    kind = "none"

    def __init__(self, reason: str):
        self.reason = reason

    def act(self, ctx, env=None):
        from r2v.policies.teachers import TeacherReply

        return TeacherReply(None, 0, 0.0, error=self.reason)


def load_teacher(cfg: R2VConfig):
    """openai or hf from config; `oracle` needs a live env, so it serves as a NoTeacher (escalations
    degrade to the SLM's action with an escalation_error)."""
    from r2v.policies.teachers import make_teacher

    if cfg.teacher.kind == "oracle":
        return NoTeacher("teacher.kind=oracle needs a live env; serve with teacher.kind=openai (or hf)")
    return make_teacher(cfg)


def teacher_act(teacher, ctx) -> tuple[str | None, int, float, str | None]:
    """(action, tokens, latency_ms, error): never raises (an exception becomes the error)."""
    t0 = time.perf_counter()
    try:
        reply = teacher.act(ctx, None)
    except Exception as e:  # noqa: BLE001 - a teacher failure must degrade, never fail the request
        return None, 0, (time.perf_counter() - t0) * 1e3, f"{type(e).__name__}: {e}"
    err = reply.error if reply.action else (reply.error or "teacher returned no action")
    return reply.action or None, int(reply.tokens or 0), float(reply.latency_ms), err


__all__ = ["slm_path", "read_threshold_file", "load_serving_router", "load_verifier", "load_teacher",
           "teacher_act", "NoTeacher", "R2VError"]

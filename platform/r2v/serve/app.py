"""The routed agent as a Ray Serve application.

Deployments, composed by DeploymentHandles in a FastAPI ingress:
- `slm`: the SLM (any HF directory), batched continuously across requests (`SLMBatcher`), K candidates per request;
- `verifier`: scores the candidates (rule or learned);
- `router`: risk of the SLM's proposal and the escalation decision (r2v checkpoint or a baseline);
- `teacher`: the OpenAI-compatible (or local HF) teacher, with retries; its failures are reported, not raised;
- `sessions`: multi-turn state (history, feature tracker, LLM-call budget, cost), one replica;
- `ingress`: HTTP API, auth, limits, metrics.

Endpoints: `POST /v1/act` (stateless), `POST /v1/sessions`, `POST /v1/sessions/{id}/step`,
`DELETE /v1/sessions/{id}`, `POST /v1/chat/completions` + `GET /v1/models` (OpenAI-compatible; model
`r2v-routed` or `r2v-slm`; how a conversation maps to the agent context: r2v.serve.protocol), `GET /v1/stats`,
`GET /healthz`. Replicas, autoscaling and resources per deployment come from `serve.deployments` (r2v
config) or, under `serve run conf/serve.yaml`, from that Serve config.

Entry points: `run_serve(cfg)` (the `r2v serve` command), `build_app(cfg, models_dir)` (an Application for
`serve.run`), `app_builder(args)` (the import path for `serve run` / `serve deploy`).
"""

import asyncio
import hashlib
import hmac
import json
import math
import os
import time
import uuid
from collections import Counter as _Counter
from concurrent.futures import ThreadPoolExecutor
from copy import deepcopy
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from ray import serve

from r2v.config import R2VConfig
from r2v.errors import ConfigError

MODELS = ("r2v-routed", "r2v-slm")  # OpenAI model ids: routed agent, SLM alone
DEPLOYMENTS = ("slm", "verifier", "router", "teacher", "sessions", "ingress")


# ----------------------------------------------------------------------------------------- deployments
@serve.deployment(name="slm")
class SLMDeployment:
    """Requests are batched continuously (r2v.policies.slm.SLMBatcher: up to serve.max_batch_size, waiting at
    most serve.batch_wait_timeout_s for company, the next batch growing while one computes) and each batch is
    one padded forward pass; the device follows model.device and the replica's GPUs."""

    def __init__(self, path: str, model_cfg, policy_cfg, max_batch_size: int, batch_wait_timeout_s: float):
        from r2v.policies.slm import SLMBatcher, SLMPolicy

        self.policy = SLMPolicy(path, model_cfg, policy_cfg)
        self.batcher = SLMBatcher(self.policy, int(max_batch_size), float(batch_wait_timeout_s))

    async def act(self, ctx):
        return await asyncio.wrap_future(self.batcher.submit([ctx])[0])

    def stats(self) -> dict[str, Any]:
        return {"device": str(self.policy.device), "batch_sizes": dict(self.batcher.batch_sizes)}


@serve.deployment(name="verifier")
class VerifierDeployment:
    def __init__(self, cfg: R2VConfig, models_dir: str):
        from r2v.serve.components import load_verifier

        self.verifier = load_verifier(cfg, models_dir)

    async def score(self, ctx, texts: list[str]) -> list[float]:
        return [float(s) for s in await asyncio.to_thread(self.verifier.score, ctx, list(texts))]


@serve.deployment(name="router")
class RouterDeployment:
    def __init__(self, cfg: R2VConfig, models_dir: str):
        from r2v.serve.components import load_serving_router, serving_pacer

        self.router, self.source = load_serving_router(cfg, models_dir)
        self.pacer = serving_pacer(cfg, self.router)  # None unless serve.pace_budget

    def decide(self, features: dict[str, float], action: str = ""):
        """r2v.policies.routed.route (StepCalls.route's shape; the proposed `action` only matters to the oracle
        router, which cannot be served)."""
        from r2v.policies.routed import route

        self.router.reset()  # no episode state across requests (per-session state lives in the features)
        return route(self.router, features)

    def observe(self, risk: float | None, llm_call: bool) -> None:
        """One routed step's outcome for the pacer (serve.pace_budget): its risk and whether the teacher acted,
        which the ingress knows after the step (a deferred or refused escalation is no call); τ is retuned every
        serve.pace_every steps, as eval's paced routers count."""
        if self.pacer is not None:
            self.router.threshold = self.pacer.observe(float("nan") if risk is None else risk, llm_call)

    def info(self) -> dict[str, Any]:
        out = {"router": self.router.name, "threshold": float(self.router.threshold), "source": self.source,
               "strict": bool(self.router.strict)}
        if self.pacer is not None:
            out |= {"pace_budget": self.pacer.budget, "paced_steps": self.pacer.steps, "paced_rate": self.pacer.rate}
        return out


@serve.deployment(name="teacher")
class TeacherDeployment:
    def __init__(self, cfg: R2VConfig):
        from r2v.serve.components import load_teacher

        self.teacher = load_teacher(cfg)
        self.pool = ThreadPoolExecutor(max_workers=max(1, cfg.teacher.max_concurrency), thread_name_prefix="teacher")

    async def act(self, ctx):
        from r2v.policies.teachers import TeacherReply
        from r2v.serve.components import teacher_act

        loop = asyncio.get_running_loop()
        action, tokens, ms, err = await loop.run_in_executor(self.pool, teacher_act, self.teacher, ctx)
        return TeacherReply(action, tokens, ms, err)

    def kind(self) -> str:
        return getattr(self.teacher, "kind", "?")


@serve.deployment(name="sessions")
class SessionsDeployment:
    """One replica holds every session (r2v.serve.sessions). Errors come back as {"error": [status, msg]}."""

    def __init__(self, ttl_s: float, max_sessions: int):
        from r2v.serve.sessions import SessionStore

        self.store = SessionStore(ttl_s, max_sessions)

    def _call(self, fn, *args):
        from r2v.serve.sessions import SessionError

        try:
            return {"ok": fn(*args)}
        except SessionError as e:
            return {"error": [e.status, e.message]}

    def create(self, goal, task_id, max_steps, budget):
        return self._call(self.store.create, goal, task_id, max_steps, budget)

    def acquire(self, sid):
        return self._call(self.store.acquire, sid)

    def release(self, state, sid=None):
        return self._call(self.store.release, state, sid)

    def delete(self, sid):
        return self._call(self.store.delete, sid)

    def count(self) -> int:
        return self.store.count()


# ----------------------------------------------------------------------------------------- ingress
api = FastAPI(title="r2v", description="Step-level SLM→LLM routing for interactive agents",
              docs_url=None, redoc_url=None, openapi_url=None)


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.code, self.headers = status, message, kind, code, headers


def _error_body(message: str, kind: str, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


@api.exception_handler(ApiError)
async def _api_error(request: Request, exc: ApiError):
    return JSONResponse(_error_body(exc.message, exc.kind, exc.code), status_code=exc.status, headers=exc.headers)


@api.exception_handler(Exception)
async def _internal_error(request: Request, exc: Exception):
    return JSONResponse(_error_body(f"internal error: {type(exc).__name__}: {str(exc)[:300]}", "server_error"),
                        status_code=500)


def _validation_message(e: ValidationError) -> str:
    parts = []
    for err in e.errors()[:5]:
        loc = ".".join(str(x) for x in err.get("loc", ())) or "body"
        parts.append(f"{loc}: {err.get('msg')}")
    return "invalid request: " + "; ".join(parts)


@serve.deployment(name="ingress")
@serve.ingress(api)
class Ingress:
    def __init__(self, slm, verifier, router, teacher, sessions, settings: dict[str, Any]):
        from ray.serve.metrics import Counter

        self.slm, self.verifier, self.router, self.teacher, self.sessions = slm, verifier, router, teacher, sessions
        self.s = settings
        self.token_sha256: str | None = settings.get("token_sha256")
        self.counts: _Counter = _Counter()
        self.m_escalations = Counter("r2v_escalations", description="steps escalated to the teacher",
                                     tag_keys=("endpoint",))
        self.m_teacher_errors = Counter("r2v_teacher_errors", description="escalations whose teacher call failed",
                                        tag_keys=("endpoint",))
        self.m_budget = Counter("r2v_budget_exhausted", description="escalations refused by a session budget")
        self.m_steps = Counter("r2v_steps", description="agent steps decided", tag_keys=("endpoint", "mode"))

    # -- guards -----------------------------------------------------------------------------------
    def _auth(self, request: Request) -> None:
        if self.token_sha256 is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        ok = scheme.lower() == "bearer" and token and hmac.compare_digest(
            hashlib.sha256(token.strip().encode()).hexdigest(), self.token_sha256)
        if not ok:
            self.counts["unauthorized"] += 1
            raise ApiError(401, "missing or invalid bearer token (Authorization: Bearer <token>)",
                           "authentication_error", "invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    async def _body(self, request: Request, model):
        """Auth, size limit (413), JSON (400), schema (422): the validated request model."""
        self._auth(request)
        limit = int(self.s["max_request_bytes"])
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise ApiError(413, f"request body of {declared} bytes exceeds serve.max_request_bytes = {limit}",
                           code="request_too_large")
        buf = bytearray()
        async for chunk in request.stream():
            buf += chunk
            if len(buf) > limit:
                raise ApiError(413, f"request body exceeds serve.max_request_bytes = {limit}", code="request_too_large")
        try:
            data = json.loads(bytes(buf) or b"null")
        except (ValueError, UnicodeDecodeError) as e:
            raise ApiError(400, f"malformed JSON body: {e}", code="invalid_json") from None
        if not isinstance(data, dict):
            raise ApiError(400, "the JSON body must be an object", code="invalid_json")
        try:
            return model.model_validate(data)
        except ValidationError as e:
            raise ApiError(422, _validation_message(e), code="invalid_request") from None

    async def _call(self, deployment: str, method, *args):
        """Call a sub-deployment. A call whose replica died (killed, node lost, being replaced) is retried with
        back-off: Serve routes it to a live replica or the replacement. When none answers in time the client
        gets a 503 naming the deployment, never a 500."""
        from ray.exceptions import ActorUnavailableError, RayActorError

        retries = int(self.s["replica_retries"])
        for attempt in range(retries + 1):
            try:
                return await method.remote(*args)
            except (RayActorError, ActorUnavailableError) as e:
                if attempt == retries:
                    self.counts[f"unavailable_{deployment}"] += 1
                    raise ApiError(503, f"the {deployment} deployment is unavailable ({type(e).__name__}); "
                                        f"retry shortly", "server_error", "unavailable",
                                   headers={"Retry-After": "1"}) from None
                self.counts[f"retried_{deployment}"] += 1
                await asyncio.sleep(0.1 * 2 ** attempt)

    def _check_history(self, n: int) -> None:
        limit = int(self.s["max_history"])
        if n > limit:
            raise ApiError(422, f"history has {n} steps; the limit is serve.max_history = {limit} "
                                f"(send the most recent ones, or use a session)", code="history_too_long")

    # -- the routed step --------------------------------------------------------------------------
    def _step_calls(self, ctx, out: dict[str, Any]):
        """The deployments as r2v.policies.routed.StepCalls. In rank mode the candidates are admissible
        actions and the verifier scores each on its own, so every admissible action is verified while the SLM
        runs (one sequential hop less). A failed verifier call routes on the SLM's scores alone
        (`verifier_error`); a dead teacher replica fails the call, which routed_step degrades."""
        from r2v.policies.routed import StepCalls

        admissible = list(ctx.observation.admissible or [])
        pending = self.verifier.score.remote(ctx, admissible) if admissible and self.s["speculative_verify"] else None

        async def verify(c, texts: list[str]):
            try:
                known = dict(zip(admissible, await pending)) if pending is not None else {}
                missing = [t for t in texts if t not in known]
                if missing:
                    known.update(zip(missing, await self.verifier.score.remote(c, missing)))
                return [known[t] for t in texts]
            except Exception as e:  # noqa: BLE001 - a server answers; the router sees neutral verifier scores
                out["verifier_error"] = f"{type(e).__name__}: {str(e)[:200]}"
                return None

        return StepCalls(slm=lambda c: self._call("slm", self.slm.act, c), verify=verify,
                         route=lambda f, a: self._call("router", self.router.decide, f, a),
                         teacher=lambda c: self.teacher.act.remote(c))

    async def _decide(self, ctx, mode: str, tracker, budget_left: int | None, endpoint: str,
                      grace_left: int = 0, carried: bool = False) -> dict[str, Any]:
        """`routed`: r2v.policies.routed.routed_step (the same step eval runs); `slm`: the SLM's likeliest
        candidate alone. Returns the response fields (`escalated`, `deferred`, `carried`, `redundant` as defined
        in r2v.policies.routed). Only a session remembers its episode, so only a session step gets grace
        (`grace_left`) and carried escalations (`carried`)."""
        from r2v.policies.routed import routed_step

        t0 = time.perf_counter()
        out: dict[str, Any] = {"risk": None, "threshold": None, "router": None, "escalated": False,
                               "escalation_error": None, "budget_exhausted": False, "deferred": False,
                               "carried": False, "redundant": False, "llm_call": False}
        if mode == "routed":
            step = await routed_step(ctx, self._step_calls(ctx, out), tracker, self.s["select"], budget_left,
                                     grace_left, carried)
            d = step.decision
            out.update(threshold=step.threshold if math.isfinite(step.threshold) else None,  # JSON has no inf
                       router=step.router, budget_exhausted=step.budget_exhausted, deferred=step.deferred,
                       carried=step.carried, redundant=step.redundant, llm_call=step.llm_call)
            if d.escalated:
                self.counts["escalations"] += 1
                self.m_escalations.inc(tags={"endpoint": endpoint})
            if d.escalation_error is not None:
                self.counts["teacher_errors"] += 1
                self.m_teacher_errors.inc(tags={"endpoint": endpoint})
            if step.budget_exhausted:
                self.counts["budget_exhausted"] += 1
                self.m_budget.inc()
            if self.s["paced"]:
                await self._call("router", self.router.observe, d.risk, step.llm_call)
        else:
            d = await self._call("slm", self.slm.act, ctx)
        self.counts[f"steps_{mode}"] += 1
        self.m_steps.inc(tags={"endpoint": endpoint, "mode": mode})
        out.update(action=d.action, actor=d.actor, mode=mode, risk=d.risk, escalated=d.escalated,
                   escalation_error=d.escalation_error, teacher_tokens=d.teacher_tokens, entropy=d.entropy,
                   features=d.features, candidates=[c.as_row() for c in d.candidates],
                   latency_ms=round((time.perf_counter() - t0) * 1e3, 3))
        return out

    # -- endpoints --------------------------------------------------------------------------------
    @api.get("/healthz")
    async def healthz(self) -> dict[str, Any]:
        return {"status": "ok", "router": self.s["router"], "threshold": self.s["threshold"]}

    @api.get("/v1/stats")
    async def stats(self, request: Request) -> dict[str, Any]:
        self._auth(request)
        return {"ingress": dict(self.counts), "slm": await self._call("slm", self.slm.stats),
                "router": await self._call("router", self.router.info),
                "teacher": await self._call("teacher", self.teacher.kind),
                "open_sessions": await self._call("sessions", self.sessions.count)}

    @api.post("/v1/act")
    async def act(self, request: Request) -> dict[str, Any]:
        from r2v.router.features import FeatureTracker
        from r2v.serve.protocol import ActRequest, context_from_act

        req = await self._body(request, ActRequest)
        self._check_history(len(req.history))
        ctx = context_from_act(req, self.s["env_name"], self.s["max_steps"])
        return await self._decide(ctx, req.mode, FeatureTracker(), None, "act")

    @api.post("/v1/sessions")
    async def create_session(self, request: Request) -> dict[str, Any]:
        from r2v.serve.protocol import SessionCreate

        req = await self._body(request, SessionCreate)
        cap = int(self.s["session_budget"])
        budget = cap if req.budget is None else min(int(req.budget), cap)
        res = await self._call("sessions", self.sessions.create, req.goal, req.task_id,
                               req.max_steps or self.s["max_steps"], budget)
        return self._unwrap(res)

    @api.post("/v1/sessions/{session_id}/step")
    async def session_step(self, session_id: str, request: Request) -> dict[str, Any]:
        from r2v.policies.routed import carry_after
        from r2v.serve.protocol import SessionStep, make_context

        req = await self._body(request, SessionStep)
        state = self._unwrap(await self._call("sessions", self.sessions.acquire, session_id))
        done = None
        try:
            info = req.info.model_dump()
            if state.pending_action is not None:
                state.history.append((state.pending_action, req.observation))
                state.tracker.update(state.pending_action, info)
            limit = int(self.s["max_history"])
            state.history = state.history[-limit:]
            state.tracker.trim(limit)
            ctx = make_context(state.goal, req.observation, req.admissible, list(state.history), state.step,
                               state.max_steps, self.s["env_name"], state.task_id, info, req.observation_truncated)
            out = await self._decide(ctx, req.mode, state.tracker, state.budget_left, "session",
                                     max(0, int(self.s["grace"]) - state.deferrals), state.owed > 0)
            state.step += 1
            state.pending_action = out["action"]
            state.llm_calls += int(out["llm_call"])
            state.deferrals += int(out["deferred"])
            state.owed = carry_after(out["llm_call"], out["redundant"], int(self.s["carry"]), state.owed)
            state.teacher_errors += int(out["escalation_error"] is not None)
            state.teacher_tokens += out["teacher_tokens"]
            state.cost += self.s["cost_slm"] + (self.s["cost_llm"] if out["llm_call"] else 0.0)
            state.cost_usd += out["teacher_tokens"] * self.s["cost_per_1k_tokens"] / 1000.0
            out["session"] = state.summary()
            done = state
            return out
        finally:
            await self._call("sessions", self.sessions.release, done, session_id)

    @api.delete("/v1/sessions/{session_id}")
    async def delete_session(self, session_id: str, request: Request) -> dict[str, Any]:
        self._auth(request)
        return self._unwrap(await self._call("sessions", self.sessions.delete, session_id))

    @api.get("/v1/models")
    async def models(self, request: Request) -> dict[str, Any]:
        self._auth(request)
        return {"object": "list", "data": [{"id": m, "object": "model", "created": self.s["created"],
                                            "owned_by": "r2v"} for m in MODELS]}

    @api.post("/v1/chat/completions")
    async def chat(self, request: Request) -> dict[str, Any]:
        from r2v.router.features import FeatureTracker
        from r2v.serve.protocol import ChatRequest, context_from_messages

        req = await self._body(request, ChatRequest)
        if req.model not in MODELS:
            raise ApiError(404, f"model {req.model!r} does not exist; use one of {list(MODELS)}",
                           code="model_not_found")
        if req.stream:
            raise ApiError(400, "stream=true is not supported: an action is one short line", code="unsupported")
        if req.n != 1:
            raise ApiError(400, "n must be 1", code="unsupported")
        self._check_history(sum(m.role == "assistant" for m in req.messages))
        try:
            ctx = context_from_messages(req, self.s["env_name"], self.s["max_steps"])
        except ValueError as e:
            raise ApiError(422, str(e), code="invalid_request") from None
        out = await self._decide(ctx, "routed" if req.model == "r2v-routed" else "slm", FeatureTracker(), None,
                                 "chat")
        return {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "object": "chat.completion", "created": int(time.time()),
                "model": req.model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": out["action"]},
                             "finish_reason": "stop", "logprobs": None}],
                "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": out["teacher_tokens"]},
                "r2v": out}

    @staticmethod
    def _unwrap(res: dict[str, Any]):
        if "error" in res:
            status, message = res["error"]
            raise ApiError(int(status), message, code="session_error")
        return res["ok"]


# ----------------------------------------------------------------------------------------- building
OPTION_KEYS = {"num_replicas", "autoscaling_config", "max_ongoing_requests", "max_queued_requests",
               "ray_actor_options", "health_check_period_s", "health_check_timeout_s",
               "graceful_shutdown_timeout_s", "graceful_shutdown_wait_loop_s", "placement_group_bundles",
               "placement_group_strategy", "max_replicas_per_node", "user_config", "logging_config"}


def _cluster_resources() -> dict[str, float]:
    """What the Ray cluster this process is connected to has ({} when Ray is not initialised)."""
    import ray

    return dict(ray.cluster_resources()) if ray.is_initialized() else {}


def _max_replicas(opts: dict[str, Any]) -> int:
    auto = opts.get("autoscaling_config")
    if auto:
        return max(1, int(auto.get("max_replicas", 1)), int(auto.get("min_replicas", 1)))
    return max(1, int(opts.get("num_replicas", 1)))


def auto_cpus_per_replica(cluster_cpus: float, replicas: int) -> float:
    """1 CPU per replica when the cluster has them; otherwise an equal share (Serve's default of 1 CPU each
    never schedules six deployments on a 2-core laptop). Ray counts resources in steps of 1e-4."""
    if replicas <= 0 or cluster_cpus >= replicas:
        return 1.0
    return max(0.01, int(cluster_cpus / replicas * 100) / 100)


def deployment_options(cfg: R2VConfig, resources: dict[str, float] | None = None) -> dict[str, dict[str, Any]]:
    """Serve options per deployment: defaults <- `serve.deployments[name]` (ray_actor_options merged key by
    key). A replica's CPUs: its `ray_actor_options.num_cpus`, else `serve.num_cpus_per_replica`, else (null,
    the default) sized from the cluster (`resources`, default `ray.cluster_resources()`): the CPUs not
    claimed explicitly, shared by every replica (autoscaling: max_replicas) of the other deployments, at
    most 1 each. The SLM gets a GPU when the cluster has one and model.device allows it."""
    sv = cfg.serve
    resources = _cluster_resources() if resources is None else resources
    opts: dict[str, dict[str, Any]] = {
        "slm": {"num_replicas": 1, "max_ongoing_requests": max(64, 4 * sv.max_batch_size)},
        "verifier": {"num_replicas": 1, "max_ongoing_requests": 128},
        "router": {"num_replicas": 1, "max_ongoing_requests": 256},
        "teacher": {"num_replicas": 1, "max_ongoing_requests": max(16, 2 * cfg.teacher.max_concurrency)},
        "sessions": {"num_replicas": 1, "max_ongoing_requests": 512},
        "ingress": {"num_replicas": 1, "max_ongoing_requests": 256},
    }
    for name in opts:
        opts[name]["ray_actor_options"] = {}
    if cfg.model.device != "cpu" and resources.get("GPU", 0) > 0:
        opts["slm"]["ray_actor_options"]["num_gpus"] = 1
    unknown = set(sv.deployments) - set(DEPLOYMENTS)
    if unknown:
        raise ConfigError(f"serve.deployments: unknown deployment(s) {sorted(unknown)}; known: {list(DEPLOYMENTS)}")
    for name, override in sv.deployments.items():
        override = dict(override or {})
        bad = set(override) - OPTION_KEYS
        if bad:
            raise ConfigError(f"serve.deployments.{name}: unknown option(s) {sorted(bad)}; known: {sorted(OPTION_KEYS)}")
        if "ray_actor_options" in override:
            opts[name]["ray_actor_options"].update(dict(override.pop("ray_actor_options") or {}))
        if "autoscaling_config" in override:
            opts[name].pop("num_replicas", None)
        opts[name].update(override)
    s = opts["sessions"]
    if s.get("num_replicas", 1) != 1 or "autoscaling_config" in s:
        raise ConfigError("serve.deployments.sessions must keep one replica (it holds every session's state)")
    unsized = [n for n in opts if "num_cpus" not in opts[n]["ray_actor_options"]]
    if sv.num_cpus_per_replica is not None:
        cpus = float(sv.num_cpus_per_replica)
    else:
        claimed = sum(float(o["ray_actor_options"]["num_cpus"]) * _max_replicas(o)
                      for n, o in opts.items() if n not in unsized)
        cpus = auto_cpus_per_replica(float(resources.get("CPU", 0)) - claimed if resources else float("inf"),
                                     sum(_max_replicas(opts[n]) for n in unsized))
    for name in unsized:
        opts[name]["ray_actor_options"]["num_cpus"] = cpus
    return opts


def _token_sha256(cfg: R2VConfig) -> str | None:
    env = cfg.serve.auth_token_env
    if not env:
        return None
    token = os.environ.get(env, "")
    if not token:
        raise ConfigError(f"serve.auth_token_env = {env!r} but ${env} is empty or unset: export the token, or "
                          f"unset serve.auth_token_env to serve without auth")
    return hashlib.sha256(token.encode()).hexdigest()


def build_app(cfg: R2VConfig, models_dir: str | Path | None = None):
    """The Serve application (not yet running). Fails fast, in the caller, on a missing SLM, an unservable
    router, a bad threshold file, pacing a router without a threshold, bad deployment options or an unset auth
    token."""
    from r2v.policies.routed import carry_for, grace_for
    from r2v.serve.components import load_serving_router, serving_pacer, slm_path

    models_dir = str(models_dir or cfg.serve.models_dir)
    path = slm_path(cfg, models_dir)
    router, source = load_serving_router(cfg, models_dir)
    serving_pacer(cfg, router)
    if cfg.teacher.kind == "openai" and (not cfg.teacher.base_url or not cfg.teacher.model):
        raise ConfigError("teacher.kind=openai needs `teacher.base_url` and `teacher.model`")
    opts = deployment_options(cfg)
    settings = {
        "token_sha256": _token_sha256(cfg), "max_request_bytes": cfg.serve.max_request_bytes,
        "max_history": cfg.serve.max_history, "session_budget": cfg.serve.session_budget,
        "env_name": cfg.env.name, "max_steps": cfg.env.max_steps, "select": cfg.policy.select,
        "speculative_verify": cfg.serve.speculative_verify and cfg.policy.mode == "rank",
        "replica_retries": cfg.serve.replica_retries,
        "router": router.name, "threshold": float(router.threshold), "router_source": source,
        "grace": grace_for(router, cfg.router.grace), "carry": carry_for(router, cfg.router.carry),
        "paced": cfg.serve.pace_budget is not None,
        "cost_slm": cfg.router.cost_slm, "cost_llm": cfg.router.cost_llm,
        "cost_per_1k_tokens": cfg.teacher.cost_per_1k_tokens, "created": int(time.time()), "slm_path": path,
    }
    cfg = deepcopy(cfg)
    slm = SLMDeployment.options(**opts["slm"]).bind(path, cfg.model, cfg.policy, cfg.serve.max_batch_size,
                                                    cfg.serve.batch_wait_timeout_s)
    verifier = VerifierDeployment.options(**opts["verifier"]).bind(cfg, models_dir)
    router_d = RouterDeployment.options(**opts["router"]).bind(cfg, models_dir)
    teacher = TeacherDeployment.options(**opts["teacher"]).bind(cfg)
    sessions = SessionsDeployment.options(**opts["sessions"]).bind(cfg.serve.session_ttl_s, cfg.serve.max_sessions)
    return Ingress.options(**opts["ingress"]).bind(slm, verifier, router_d, teacher, sessions, settings)


def app_builder(args: dict[str, Any]):
    """For `serve run` / `serve deploy` (conf/serve.yaml): args = {config: r2v YAML, overrides: [k=v, ...],
    models_dir: optional}."""
    from r2v.config import load_config

    args = dict(args or {})
    overrides = args.get("overrides") or []
    if isinstance(overrides, str):
        overrides = overrides.split()
    cfg = load_config(args.get("config"), list(overrides))
    return build_app(cfg, args.get("models_dir"))


def start(cfg: R2VConfig, models_dir: str | Path | None = None) -> dict[str, Any]:
    """Start (or join) Ray and Serve on serve.host:serve.port and deploy the app; returns its summary."""
    from r2v.ray_utils import init_ray

    init_ray(cfg)
    app = build_app(cfg, models_dir)  # validates before Serve starts
    serve.start(http_options={"host": cfg.serve.host, "port": cfg.serve.port})
    serve.run(app, name=cfg.serve.app_name, route_prefix="/")
    host = cfg.serve.host if cfg.serve.host not in ("0.0.0.0", "::") else "127.0.0.1"
    url = f"http://{host}:{cfg.serve.port}"
    return {"url": url, "openai_base_url": f"{url}/v1", "app": cfg.serve.app_name, "bind": cfg.serve.host,
            "auth": bool(cfg.serve.auth_token_env), "models_dir": str(models_dir or cfg.serve.models_dir)}


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def run_serve(cfg: R2VConfig) -> dict[str, Any]:
    """`r2v serve --config ... [serve.models_dir=runs/<exp>/models]`: deploy, print the URL, then serve until
    Ctrl-C or SIGTERM, which shut Serve and Ray down (unless serve.block=false: return once the app is up)."""
    import signal

    from r2v.ray_utils import init_ray

    def announce(summary: dict[str, Any]) -> dict[str, Any]:
        print(f"[serve] r2v routed agent at {summary['url']} (OpenAI base_url {summary['openai_base_url']}, "
              f"model r2v-routed); auth {'on' if summary['auth'] else 'off'}; Ctrl-C stops it", flush=True)
        return summary

    if not cfg.serve.block:
        return announce(start(cfg))
    ray = init_ray(cfg)
    # after ray.init, whose own SIGTERM handler would abort the process: SIGTERM now acts like Ctrl-C
    previous = signal.signal(signal.SIGTERM, _interrupt)
    summary: dict[str, Any] = {}
    try:
        summary = announce(start(cfg))
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("[serve] shutting down", flush=True)
    finally:
        signal.signal(signal.SIGTERM, previous)
        serve.shutdown()
        ray.shutdown()
    return summary


__all__ = ["build_app", "run_serve", "app_builder", "start", "deployment_options", "MODELS", "DEPLOYMENTS"]

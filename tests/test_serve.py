"""The Serve app over real HTTP on 127.0.0.1: every endpoint, the official `openai` client, auth on/off,
limits, session budgets, and a teacher (a fake OpenAI-compatible server) that answers 5xx.

Serve starts once for the module with four apps: `open` at / (no auth, an always-escalating router so the
teacher path is exercised on every routed step, session budget 2), `secure` at /secure (bearer token), and two
routers that ask at every step with `router.grace` 1: `graced` at /graced and, with `router.carry` 1, `carried`.
"""
from __future__ import annotations

import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from r2v.config import TinyModelConfig, load_config
from r2v.errors import ConfigError

httpx = pytest.importorskip("httpx")

TOKEN = "s3cret-token"
ADMISSIBLE = ["go north", "take key", "open door"]
GOAL = "Find the key and open the door."


# ----------------------------------------------------------------------------------------- fixtures
class FakeLLM:
    """An OpenAI-compatible chat server: answers with the first valid action of the prompt (or `look`),
    or 503 while `mode == "500"`."""

    def __init__(self):
        self.mode = "ok"
        self.requests = 0

    def start(self):
        state = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                state.requests += 1
                if state.mode == "500":
                    return self._send(503, b'{"error": "overloaded"}')
                user = body["messages"][-1]["content"]
                action = "look"
                for line in user.splitlines():
                    if line.startswith("Valid actions:"):
                        action = line[len("Valid actions:"):].split(";")[0].strip()
                reply = {"choices": [{"message": {"role": "assistant", "content": action}}],
                         "usage": {"total_tokens": 50}}
                self._send(200, json.dumps(reply).encode())

            def _send(self, code, payload):
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        return self


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    from r2v.policies.init_model import save_tiny_model

    root = tmp_path_factory.mktemp("serve_models")
    texts = [f"Goal: {GOAL}\nObservation: room {i}\nAction: {a}" for i in range(30) for a in ADMISSIBLE]
    save_tiny_model(texts, TinyModelConfig(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2,
                                           vocab_size=300), root / "bc", 256)
    return root


def serve_cfg(models_dir, llm_url, port, **extra):
    overrides = [
        f"serve.models_dir={models_dir}", f"serve.port={port}", "serve.num_cpus_per_replica=0.1",
        "serve.router=llm_only", "serve.session_budget=2", "serve.max_history=8", "serve.max_request_bytes=4096",
        "serve.block=false", "teacher.kind=openai", f"teacher.base_url={llm_url}", "teacher.model=frontier",
        "teacher.timeout_s=2", "teacher.max_retries=1", "teacher.cost_per_1k_tokens=2.0",
        "model.max_context_tokens=256", "policy.num_candidates=2", "policy.max_new_tokens=4", "env.name=textworld",
    ] + [f"{k}={v}" for k, v in extra.items()]
    return load_config(None, overrides)


@pytest.fixture(scope="module")
def app(models_dir, tmp_path_factory):
    ray = pytest.importorskip("ray")
    from ray import serve

    from r2v.serve.app import build_app, run_serve

    llm = FakeLLM().start()
    port = free_port()
    ray.init(num_cpus=2, include_dashboard=False, ignore_reinit_error=True, log_to_driver=False)
    summary = run_serve(serve_cfg(models_dir, llm.url, port, **{"serve.app_name": "open"}))  # serve.block=false
    assert summary["url"] == f"http://127.0.0.1:{port}" and summary["auth"] is False
    mp = pytest.MonkeyPatch()
    mp.setenv("R2V_TEST_TOKEN", TOKEN)
    secure = serve_cfg(models_dir, llm.url, port, **{"serve.auth_token_env": "R2V_TEST_TOKEN"})
    serve.run(build_app(secure), name="secure", route_prefix="/secure")
    mp.undo()
    graced = serve_cfg(models_dir, llm.url, port, **{"serve.router": "entropy", "serve.threshold": -1.0,
                                                       "router.grace": 1})  # asks at every step; one deferral
    serve.run(build_app(graced), name="graced", route_prefix="/graced")
    carried = serve_cfg(models_dir, llm.url, port, **{"serve.router": "entropy", "serve.threshold": -1.0,
                                                        "router.grace": 1, "router.carry": 1,
                                                        "serve.num_cpus_per_replica": 0.02})  # 2 CPUs hold 4 apps
    serve.run(build_app(carried), name="carried", route_prefix="/carried")
    base = f"http://127.0.0.1:{port}"
    with httpx.Client(base_url=base, timeout=60) as client:
        yield {"client": client, "base": base, "llm": llm, "port": port}
    serve.shutdown()
    ray.shutdown()
    llm.server.shutdown()


@pytest.fixture
def client(app):
    app["llm"].mode = "ok"
    return app["client"]


def act_body(**kw):
    body = {"goal": GOAL, "observation": "You are in a dark room. There is a key here.", "admissible": ADMISSIBLE,
            "history": ["look", {"action": "go east", "observation": "A hall."}]}
    body.update(kw)
    return body


# ----------------------------------------------------------------------------------------- HTTP: open app
def test_healthz_and_models(client):
    r = client.get("/healthz")
    assert r.status_code == 200 and r.json()["status"] == "ok" and r.json()["router"] == "llm_only"
    ids = [m["id"] for m in client.get("/v1/models").json()["data"]]
    assert ids == ["r2v-routed", "r2v-slm"]


def test_act_routed_escalates_to_the_teacher(client):
    r = client.post("/v1/act", json=act_body())
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["escalated"] is True and out["actor"] == "teacher" and out["escalation_error"] is None
    assert out["action"] == ADMISSIBLE[0]  # what the fake teacher answers
    assert out["risk"] == 1.0 and out["threshold"] == 0.0 and out["router"] == "llm_only"
    assert 1 <= len(out["candidates"]) <= 2
    assert all(c["text"] in ADMISSIBLE and c["verifier_score"] is not None for c in out["candidates"])
    assert out["latency_ms"] > 0 and out["teacher_tokens"] == 50


def test_act_slm_only_and_free_generation(client):
    out = client.post("/v1/act", json=act_body(mode="slm")).json()
    assert out["escalated"] is False and out["actor"] == "slm" and out["risk"] is None
    assert out["action"] == out["candidates"][0]["text"] and out["action"] in ADMISSIBLE
    gen = client.post("/v1/act", json=act_body(admissible=None, mode="slm"))  # no action set: generate K
    assert gen.status_code == 200 and isinstance(gen.json()["action"], str)


def test_limits_and_malformed_requests(client):
    r = client.post("/v1/act", content=b'{"goal": "x", "observation": ', headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "malformed JSON" in r.json()["error"]["message"]
    r = client.post("/v1/act", json={"goal": "x"})
    assert r.status_code == 422 and "observation" in r.json()["error"]["message"]
    r = client.post("/v1/act", json=act_body(history=["look"] * 9))
    assert r.status_code == 422 and "max_history" in r.json()["error"]["message"]
    r = client.post("/v1/act", json=act_body(observation="x" * 5000))
    assert r.status_code == 413 and "max_request_bytes" in r.json()["error"]["message"]
    r = client.post("/v1/act", json=act_body(unknown_field=1))
    assert r.status_code == 422
    r = client.post("/v1/act", content=b"[1, 2]", headers={"Content-Type": "application/json"})
    assert r.status_code == 400


def test_teacher_5xx_degrades_to_the_slm_action(client, app):
    app["llm"].mode = "500"
    r = client.post("/v1/act", json=act_body())
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["escalated"] is True and out["actor"] == "slm" and out["llm_call"] is False  # called, failed
    assert "HTTP 503" in out["escalation_error"]
    assert out["action"] == out["candidates"][0]["text"]
    stats = client.get("/v1/stats").json()
    assert stats["ingress"]["teacher_errors"] >= 1 and stats["teacher"] == "openai"


def test_session_budget_cost_and_lifecycle(client, app):
    r = client.post("/v1/sessions", json={"goal": GOAL, "budget": 5})
    assert r.status_code == 200, r.text
    s = r.json()
    sid = s["session_id"]
    assert s["budget"] == 2  # capped by serve.session_budget
    outs = []
    for i in range(3):
        r = client.post(f"/v1/sessions/{sid}/step", json={"observation": f"Room {i}.", "admissible": ADMISSIBLE})
        assert r.status_code == 200, r.text
        outs.append(r.json())
    assert [o["escalated"] for o in outs] == [True, True, False]
    assert outs[2]["budget_exhausted"] is True and outs[2]["actor"] == "slm"
    last = outs[2]["session"]
    assert last["step"] == 3 and last["llm_calls"] == 2 and last["budget_left"] == 0
    assert last["teacher_tokens"] == 100 and last["cost_usd"] == pytest.approx(0.2)
    assert last["cost"] == pytest.approx(3 * 0.05 + 2 * 1.0)
    # a failed teacher call does not spend budget
    sid2 = client.post("/v1/sessions", json={"goal": GOAL}).json()["session_id"]
    app["llm"].mode = "500"
    o = client.post(f"/v1/sessions/{sid2}/step", json={"observation": "Room.", "admissible": ADMISSIBLE}).json()
    assert o["escalated"] is True and o["actor"] == "slm" and "HTTP 503" in o["escalation_error"]
    assert o["session"]["budget_left"] == 2 and o["session"]["cost"] == pytest.approx(0.05)
    app["llm"].mode = "ok"
    d = client.delete(f"/v1/sessions/{sid}")
    assert d.status_code == 200 and d.json()["deleted"] is True and d.json()["llm_calls"] == 2
    assert client.post(f"/v1/sessions/{sid}/step", json={"observation": "x"}).status_code == 404
    assert client.delete(f"/v1/sessions/{sid}").status_code == 404
    assert client.post("/v1/sessions/nope/step", json={"observation": "x"}).status_code == 404


def test_session_grace_defers_one_reversible_escalation(client):
    """router.grace=1 with a router that asks at every step: a session's first reversible proposal (a move or a
    look) is the SLM's, the next goes to the teacher, an irreversible one always does; a stateless /v1/act, which
    remembers no deferral, never defers."""
    reversible, irreversible = ["go north", "look"], ["take key", "open door"]
    sid = client.post("/graced/v1/sessions", json={"goal": GOAL}).json()["session_id"]
    outs = []
    for admissible in (irreversible, reversible, reversible):
        r = client.post(f"/graced/v1/sessions/{sid}/step", json={"observation": "A room.", "admissible": admissible})
        assert r.status_code == 200, r.text
        outs.append(r.json())
    assert [(o["deferred"], o["escalated"], o["actor"]) for o in outs] == \
           [(False, True, "teacher"), (True, False, "slm"), (False, True, "teacher")]
    assert outs[1]["action"] in reversible and outs[1]["risk"] > outs[1]["threshold"]
    assert outs[2]["session"]["deferrals"] == 1 and outs[2]["session"]["llm_calls"] == 2
    out = client.post("/graced/v1/act", json=act_body(admissible=reversible)).json()
    assert out["deferred"] is False and out["actor"] == "teacher"


def test_session_carries_a_call_that_changed_nothing_past_grace(client):
    """router.carry=1 (and grace 1): the teacher (first valid action) answers the SLM's only candidate, so the
    call changed nothing and the next step goes to the teacher although grace would have deferred its move; the
    step after that is judged afresh and its move is deferred."""
    sid = client.post("/carried/v1/sessions", json={"goal": GOAL}).json()["session_id"]
    outs = []
    for admissible in (["take key"], ["go north", "look"], ["go north", "look"]):
        r = client.post(f"/carried/v1/sessions/{sid}/step", json={"observation": "A room.", "admissible": admissible})
        assert r.status_code == 200, r.text
        outs.append(r.json())
    assert (outs[0]["redundant"], outs[0]["carried"], outs[0]["actor"]) == (True, False, "teacher")
    assert (outs[1]["carried"], outs[1]["deferred"], outs[1]["actor"]) == (True, False, "teacher")
    assert (outs[2]["carried"], outs[2]["deferred"], outs[2]["actor"]) == (False, True, "slm")
    assert outs[2]["session"]["llm_calls"] == 2 and outs[2]["session"]["deferrals"] == 1


def test_openai_client_chat_completions(app):
    openai = pytest.importorskip("openai")
    app["llm"].mode = "ok"
    oa = openai.OpenAI(base_url=app["base"] + "/v1", api_key="unused", max_retries=0)
    assert {m.id for m in oa.models.list().data} == {"r2v-routed", "r2v-slm"}
    messages = [{"role": "system", "content": GOAL},
                {"role": "user", "content": "You are in a hall."},
                {"role": "assistant", "content": "go east"},
                {"role": "user", "content": "Valid actions: take key; go north\nYou see a key."}]
    resp = oa.chat.completions.create(model="r2v-routed", messages=messages)
    assert resp.choices[0].message.content == "take key"  # the teacher's answer, routed
    meta = resp.model_extra["r2v"]
    assert meta["escalated"] is True and {c["text"] for c in meta["candidates"]} <= {"take key", "go north"}
    slm = oa.chat.completions.create(model="r2v-slm", messages=messages)
    assert slm.choices[0].message.content in ("take key", "go north") and slm.model_extra["r2v"]["escalated"] is False
    with pytest.raises(openai.NotFoundError):
        oa.chat.completions.create(model="gpt-4o", messages=messages)
    with pytest.raises(openai.UnprocessableEntityError):
        oa.chat.completions.create(model="r2v-routed", messages=[{"role": "system", "content": GOAL}])


# ----------------------------------------------------------------------------------------- HTTP: secure app
def test_auth_required_when_a_token_is_configured(client, app):
    assert client.get("/secure/healthz").status_code == 200  # liveness stays open
    r = client.post("/secure/v1/act", json=act_body())
    assert r.status_code == 401 and r.headers.get("www-authenticate") == "Bearer"
    bad = {"Authorization": "Bearer wrong"}
    assert client.post("/secure/v1/act", json=act_body(), headers=bad).status_code == 401
    assert client.get("/secure/v1/models").status_code == 401
    ok = client.post("/secure/v1/act", json=act_body(mode="slm"), headers={"Authorization": f"Bearer {TOKEN}"})
    assert ok.status_code == 200 and ok.json()["action"] in ADMISSIBLE
    openai = pytest.importorskip("openai")
    msgs = [{"role": "user", "content": "Valid actions: go north\nA room."}]
    good = openai.OpenAI(base_url=app["base"] + "/secure/v1", api_key=TOKEN, max_retries=0)
    assert good.chat.completions.create(model="r2v-slm", messages=msgs).choices[0].message.content == "go north"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=app["base"] + "/secure/v1", api_key="nope", max_retries=0).models.list()


def test_concurrent_requests_are_batched(client, app):
    from concurrent.futures import ThreadPoolExecutor

    def one(i):
        with httpx.Client(base_url=app["base"], timeout=60) as c:
            return c.post("/v1/act", json=act_body(mode="slm", observation=f"Room {i}.")).status_code

    with ThreadPoolExecutor(16) as pool:
        codes = list(pool.map(one, range(48)))
    assert codes == [200] * 48
    sizes = {int(k): v for k, v in client.get("/v1/stats").json()["slm"]["batch_sizes"].items()}
    assert max(sizes) > 1  # at least one forward pass served several requests


# ----------------------------------------------------------------------------------------- plain Python
def test_chat_messages_map_to_the_agent_context():
    from r2v.serve.protocol import ChatRequest, context_from_messages

    req = ChatRequest.model_validate({"model": "r2v-routed", "messages": [
        {"role": "system", "content": "goal G"},
        {"role": "user", "content": "obs 0"},
        {"role": "assistant", "content": "a1"},
        {"role": "user", "content": [{"type": "text", "text": "obs 1"}]},
        {"role": "assistant", "content": "a2"},
        {"role": "user", "content": "Valid actions: x; y z\nobs 2"}]})
    ctx = context_from_messages(req, "textworld", 30)
    assert ctx.goal == "goal G" and ctx.observation.text == "obs 2"
    assert ctx.observation.admissible == ["x", "y z"]
    assert ctx.history == [("a1", "obs 1"), ("a2", "obs 2")] and ctx.step == 2
    only = ChatRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "do it"}],
                                       "admissible": ["a"]})
    c = context_from_messages(only, "textworld", 30)
    assert c.goal == "do it" and c.observation.text == "do it" and c.observation.admissible == ["a"]


def test_session_store_expiry_and_locking():
    import time

    from r2v.serve.sessions import SessionError, SessionStore

    store = SessionStore(ttl_s=0.05, max_sessions=1)
    sid = store.create("g", None, 30, 2)["session_id"]
    with pytest.raises(SessionError) as full:
        store.create("g", None, 30, 2)
    assert full.value.status == 429
    st = store.acquire(sid)
    with pytest.raises(SessionError) as busy:
        store.acquire(sid)
    assert busy.value.status == 409
    store.release(st)
    time.sleep(0.1)
    with pytest.raises(SessionError) as gone:
        store.acquire(sid)
    assert gone.value.status == 404 and "expired" in gone.value.message


def test_router_threshold_and_deployment_config(models_dir, tmp_path):
    from r2v.serve.app import deployment_options
    from r2v.serve.components import load_serving_router, read_threshold_file, slm_path

    cfg = load_config(None, [f"serve.models_dir={models_dir}"])
    assert slm_path(cfg, models_dir) == str(models_dir / "bc")
    router, source = load_serving_router(cfg, models_dir)  # router.kind=r2v, no checkpoint: the fallback
    assert router.name == "entropy" and source == "fallback"
    best = tmp_path / "best-0.2.yaml"
    best.write_text("budget: 0.2\nthreshold: 0.37\n")
    assert read_threshold_file(best) == 0.37
    cfg.serve.threshold_file = str(best)
    assert load_serving_router(cfg, models_dir)[0].threshold == 0.37
    cfg.serve.threshold = 0.9
    assert load_serving_router(cfg, models_dir)[0].threshold == 0.9
    (tmp_path / "bad.yaml").write_text("budget: 0.2\n")
    with pytest.raises(ConfigError, match="no numeric"):
        read_threshold_file(tmp_path / "bad.yaml")
    cfg.serve.router = "oracle_teacher"
    with pytest.raises(ConfigError, match="cannot be served"):
        load_serving_router(cfg, models_dir)
    cfg = load_config(None, ["serve.num_cpus_per_replica=0.25", "serve.deployments.slm.num_replicas=2",
                             "serve.deployments.ingress.autoscaling_config.max_replicas=4",
                             "serve.deployments.slm.ray_actor_options.num_gpus=0"])
    opts = deployment_options(cfg)
    assert opts["slm"]["num_replicas"] == 2 and opts["slm"]["ray_actor_options"] == {"num_cpus": 0.25, "num_gpus": 0}
    assert "num_replicas" not in opts["ingress"] and opts["ingress"]["autoscaling_config"]["max_replicas"] == 4
    for bad in (["serve.deployments.sessions.num_replicas=2"], ["serve.deployments.slmm.num_replicas=1"],
                ["serve.deployments.slm.replicas=1"]):
        with pytest.raises(ConfigError):
            deployment_options(load_config(None, bad))


def test_auth_token_env_must_be_set(models_dir, monkeypatch):
    from r2v.serve.app import build_app

    monkeypatch.delenv("R2V_UNSET_TOKEN", raising=False)
    cfg = load_config(None, [f"serve.models_dir={models_dir}", "serve.auth_token_env=R2V_UNSET_TOKEN",
                             "serve.router=entropy"])
    with pytest.raises(ConfigError, match="R2V_UNSET_TOKEN"):
        build_app(cfg)


def test_conf_serve_yaml_is_a_valid_serve_config():
    import yaml
    from ray.serve.schema import ServeDeploySchema

    path = Path(__file__).resolve().parents[1] / "conf" / "serve.yaml"
    schema = ServeDeploySchema.model_validate(yaml.safe_load(path.read_text()))
    app = schema.applications[0]
    assert app.import_path == "r2v.serve.app:app_builder"
    from r2v.serve.app import DEPLOYMENTS

    assert {d.name for d in app.deployments} <= set(DEPLOYMENTS)
    assert schema.http_options.host == "127.0.0.1"


def test_r2v_checkpoint_and_sweep_result_are_served(models_dir, tmp_path):
    from r2v.config import RouterConfig
    from r2v.router.features import FEATURE_NAMES
    from r2v.router.model import RiskModel
    from r2v.serve.components import load_serving_router

    md = tmp_path / "models"
    model = RiskModel(len(FEATURE_NAMES), RouterConfig(device="cpu"))
    model.threshold = 0.42
    model.save(md / "router")
    cfg = load_config(None, ["router.kind=r2v", "router.device=cpu"])
    router, source = load_serving_router(cfg, md)
    assert router.name == "r2v" and router.threshold == 0.42 and source == str(md / "router")
    feats = dict.fromkeys(FEATURE_NAMES, 0.0)
    assert 0.0 <= router.risk(feats) <= 1.0
    # a sweep's best-<budget>.yaml (r2v.tune.sweep format): its own router, τ baked in
    model.threshold = 0.61
    best_dir = model.save(tmp_path / "sweep" / "best-0.2" / "router")
    best = tmp_path / "sweep" / "best-0.2.yaml"
    best.write_text(json.dumps({"router": {"budget": 0.2}, "sweep_result": {
        "format": "r2v-sweep-best@1", "budget": 0.2, "model_dir": str(best_dir), "threshold": 0.61}}))
    cfg.serve.threshold_file = str(best)
    router, source = load_serving_router(cfg, md)
    assert router.threshold == 0.61 and str(best_dir) in source
    cfg.serve.router = "entropy"
    with pytest.raises(ConfigError, match="sweep result"):
        load_serving_router(cfg, md)


def test_replica_cpus_are_sized_from_the_cluster():
    """serve.num_cpus_per_replica unset: six 1-CPU replicas never schedule on 2 cores, so they share them."""
    from r2v.serve.app import DEPLOYMENTS, deployment_options

    def cpus(overrides, resources):
        opts = deployment_options(load_config(None, overrides), resources)
        return {n: opts[n]["ray_actor_options"]["num_cpus"] for n in DEPLOYMENTS}

    assert load_config(None, []).serve.num_cpus_per_replica is None
    assert set(cpus([], {"CPU": 2.0}).values()) == {0.33}
    assert set(cpus([], {"CPU": 64.0}).values()) == {1.0}
    pinned = cpus(["serve.deployments.slm.ray_actor_options.num_cpus=1"], {"CPU": 2.0})
    assert pinned.pop("slm") == 1 and set(pinned.values()) == {0.2}  # the other five share what is left
    scaled = cpus(["serve.deployments.ingress.autoscaling_config.max_replicas=5"], {"CPU": 2.0})
    assert set(scaled.values()) == {0.2}  # room for every autoscaled replica: 10 in all
    assert set(cpus(["serve.num_cpus_per_replica=0.5"], {"CPU": 2.0}).values()) == {0.5}
    gpu = deployment_options(load_config(None, []), {"CPU": 8.0, "GPU": 1.0})
    assert gpu["slm"]["ray_actor_options"]["num_gpus"] == 1 and "num_gpus" not in gpu["router"]["ray_actor_options"]


# ----------------------------------------------------------------------------------------- the README's command
def test_readme_serve_command_answers_and_stops_on_sigterm(tmp_path):
    """`r2v serve --config conf/quickstart.yaml` exactly as the README has it, pointed only at this test's run
    dir and a free port: the preset's `auto` router device and Serve's replica sizing must work on this
    machine. The served router is a real r2v checkpoint; SIGTERM (or Ctrl-C) shuts Serve and Ray down."""
    import os
    import signal
    import subprocess
    import sys
    import time

    openai = pytest.importorskip("openai")
    from r2v.config import RouterConfig
    from r2v.policies.init_model import save_tiny_model
    from r2v.router.features import FEATURE_NAMES
    from r2v.router.model import RiskModel

    repo = Path(__file__).resolve().parents[1]
    models = tmp_path / "runs" / "quickstart" / "models"
    texts = [f"Goal: {GOAL}\nObservation: room {i}\nAction: {a}" for i in range(30) for a in ADMISSIBLE]
    save_tiny_model(texts, TinyModelConfig(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2,
                                           vocab_size=300), models / "bc", 512)
    RiskModel(len(FEATURE_NAMES), RouterConfig(device="cpu")).save(models / "router")
    port = free_port()
    log = tmp_path / "serve.log"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    cmd = [str(Path(sys.executable).parent / "r2v"), "serve", "--config", "conf/quickstart.yaml",
           f"runs_dir={tmp_path / 'runs'}", f"serve.port={port}"]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=repo, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        t0, ready = time.monotonic(), False
        while time.monotonic() - t0 < 240 and proc.poll() is None and not ready:
            try:
                ready = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5).status_code == 200
            except httpx.HTTPError:
                time.sleep(1.0)
        assert ready, f"not ready after {time.monotonic() - t0:.0f}s (rc={proc.poll()}):\n{log.read_text()[-3000:]}"
        print(f"r2v serve answered /healthz after {time.monotonic() - t0:.1f}s")
        oa = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=60)
        assert {m.id for m in oa.models.list().data} == {"r2v-routed", "r2v-slm"}
        messages = [{"role": "system", "content": GOAL},
                    {"role": "user", "content": "Valid actions: take key; go north\nYou see a key."}]
        resp = oa.chat.completions.create(model="r2v-routed", messages=messages)
        assert resp.choices[0].message.content in ("take key", "go north")
        meta = resp.model_extra["r2v"]
        assert meta["router"] == "r2v" and 0.0 <= meta["risk"] <= 1.0  # the checkpoint, on the `auto` device
        assert len(meta["features"]) == len(FEATURE_NAMES)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=90) == 0, log.read_text()[-3000:]
        assert "[serve] shutting down" in log.read_text()
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# ----------------------------------------------------------------------------------------- one routed step
def test_eval_agent_and_serve_session_take_the_same_routed_steps(app, models_dir):
    """The same states through eval's RoutedAgent (in this process) and a Serve session (over HTTP) give the
    same decisions: teacher acts, teacher fails (escalated, the SLM acts, no budget spent), teacher acts,
    budget exhausted. Both run r2v.policies.routed.routed_step; this guards anything around it."""
    from r2v.policies.routed import RoutedAgent
    from r2v.policies.slm import SLMPolicy
    from r2v.router.features import FEATURE_INDEX
    from r2v.serve.components import load_serving_router, load_teacher, load_verifier, slm_path
    from r2v.serve.protocol import make_context

    cfg = serve_cfg(models_dir, app["llm"].url, app["port"])  # the `open` app's config
    router, _ = load_serving_router(cfg, models_dir)
    agent = RoutedAgent(SLMPolicy(slm_path(cfg, models_dir), cfg.model, cfg.policy), load_verifier(cfg, models_dir),
                        router, load_teacher(cfg), cfg.policy.select, cfg.serve.session_budget)
    agent.reset(None)
    client = app["client"]
    sid = client.post("/v1/sessions", json={"goal": GOAL}).json()["session_id"]
    steps = [("You are in a dark room. There is a key here.", False, "ok"),
             ("Error: the game engine did not respond; your command was not carried out.", True, "500"),
             ("A hall. A door is north.", False, "ok"), ("The door is locked.", False, "ok")]
    history, served, local = [], [], []
    for i, (obs, tool_failed, llm_mode) in enumerate(steps):
        app["llm"].mode = llm_mode
        info = {"tool_failed": tool_failed}
        r = client.post(f"/v1/sessions/{sid}/step", json={"observation": obs, "admissible": ADMISSIBLE, "info": info})
        assert r.status_code == 200, r.text
        served.append(r.json())
        if local:
            agent.observe(local[-1].action, info)
            history.append((local[-1].action, obs))
        ctx = make_context(GOAL, obs, ADMISSIBLE, list(history), i, cfg.env.max_steps, cfg.env.name, None, info)
        local.append(agent.decide(ctx, None))
    app["llm"].mode = "ok"
    for s, d in zip(served, local):
        assert (s["action"], s["actor"], s["escalated"], s["teacher_tokens"]) == \
               (d.action, d.actor, d.escalated, d.teacher_tokens)
        assert (s["escalation_error"] is None) == (d.escalation_error is None)
        assert s["risk"] == pytest.approx(d.risk, abs=1e-6)
        assert s["features"] == pytest.approx(d.features, rel=1e-4, abs=1e-5)
        assert [c["text"] for c in s["candidates"]] == [c.text for c in d.candidates]
        assert [c["verifier_score"] for c in s["candidates"]] == [c.verifier_score for c in d.candidates]
    assert [d.actor for d in local] == ["teacher", "slm", "teacher", "slm"]
    assert [d.escalated for d in local] == [True, True, True, False]
    assert "503" in served[1]["escalation_error"] and "503" in local[1].escalation_error
    assert served[3]["budget_exhausted"] is True and served[3]["session"]["llm_calls"] == 2 == agent.calls
    failed = FEATURE_INDEX["recent_tool_error"]  # the error shown reaches both trackers (info is never read)
    assert [s["features"][failed] for s in served] == [0.0, 1.0, 1.0, 0.0]

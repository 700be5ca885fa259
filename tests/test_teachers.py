"""The OpenAI-compatible teacher against a real HTTP server on 127.0.0.1.

The server stands in for a hosted frontier model (which cannot exist here): it answers with the
environment's oracle action, or misbehaves on purpose (5xx, slow, garbled)."""
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from r2v.config import TeacherConfig
from r2v.envs.registry import make_env
from r2v.policies.teachers import OpenAITeacher, TeacherAgent
from r2v.rollout.episode import EpisodeMeta, run_episode


class FakeLLM:
    """Behaviour script: a list of modes consumed one per request; the last one repeats."""

    def __init__(self):
        self.modes = ["ok"]
        self.requests = []
        self.env = None

    def next_mode(self):
        return self.modes.pop(0) if len(self.modes) > 1 else self.modes[0]


@pytest.fixture
def llm():
    state = FakeLLM()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            state.requests.append({"path": self.path, "body": body, "auth": self.headers.get("Authorization")})
            mode = state.next_mode()
            if mode == "500":
                return self._send(503, b'{"error": "overloaded"}')
            if mode == "slow":
                time.sleep(1.0)
            if mode == "garbled":
                return self._send(200, b"<html>not json</html>")
            if mode == "no_choices":
                return self._send(200, json.dumps({"id": "x", "choices": []}).encode())
            if mode == "bad_request":
                return self._send(400, b'{"error": "bad model"}')
            action = state.env.oracle_action() if state.env else "look"
            reply = {"choices": [{"message": {"role": "assistant", "content": f"Action: {action}\n"}}],
                     "usage": {"prompt_tokens": 40, "completion_tokens": 3, "total_tokens": 43}}
            self._send(200, json.dumps(reply).encode())

        def _send(self, code, payload):
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    yield state
    server.shutdown()


def teacher(llm, **kw):
    cfg = TeacherConfig(kind="openai", base_url=llm.url, model="frontier", timeout_s=0.5, max_retries=2, **kw)
    return OpenAITeacher(cfg)


def play(env_cfg, task, t, seed=0):
    env = make_env(env_cfg)
    return env, run_episode(env, TeacherAgent(t), task, EpisodeMeta("e", "train", "teacher", seed), 30)


def test_http_teacher_solves_episodes_and_counts_tokens(llm, tw_cfg, tw_tasks, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    t = teacher(llm)
    env = make_env(tw_cfg)
    llm.env = env
    rows = run_episode(env, TeacherAgent(t), tw_tasks[-1], EpisodeMeta("e", "train", "teacher", 0), 30)
    assert rows[-1]["episode_success"] is True  # the env says so
    assert all(r["escalation_error"] is None for r in rows)
    assert t.total_tokens == 43 * len(rows) and rows[0]["teacher_tokens"] == 43
    req = llm.requests[0]
    assert req["path"] == "/v1/chat/completions" and req["auth"] == "Bearer sk-test"
    assert "Valid actions:" in req["body"]["messages"][1]["content"]


@pytest.mark.parametrize("modes,calls", [(["500", "500", "ok"], 3), (["garbled", "ok"], 2),
                                         (["no_choices", "ok"], 2), (["slow", "ok"], 2)])
def test_transient_failures_are_retried(llm, tw_cfg, tw_tasks, modes, calls):
    llm.modes = list(modes)
    env = make_env(tw_cfg)
    llm.env = env
    from r2v.policies.base import StepContext

    obs = env.reset(tw_tasks[0], seed=0)
    reply = teacher(llm).act(StepContext(tw_tasks[0], obs, [], 0, 30), env)
    assert reply.error is None and reply.action == env.oracle_action()
    assert len(llm.requests) == calls


@pytest.mark.parametrize("mode,err", [("500", "HTTP 503"), ("garbled", "malformed reply"),
                                      ("slow", "timeout"), ("bad_request", "HTTP 400")])
def test_persistent_failure_is_a_recorded_failed_escalation_not_a_crash(llm, tw_cfg, tw_tasks, mode, err):
    llm.modes = [mode]
    env, rows = play(tw_cfg, tw_tasks[0], teacher(llm))
    assert len(rows) == 1 and err in rows[0]["escalation_error"]
    assert rows[0]["episode_success"] is False and rows[0]["done"] is True
    # non-retryable 4xx: one call; retryable: 1 + max_retries
    assert len(llm.requests) == (1 if mode == "bad_request" else 3)

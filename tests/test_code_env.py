"""The HumanEval(+) code env: the oracle solves problems, wrong/looping/escaping solutions fail, data
errors name the file and line. Everything model-written runs in the bubblewrap sandbox."""
from __future__ import annotations

import random
import time
from pathlib import Path

import pytest

from r2v.config import EnvConfig
from r2v.errors import R2VError

FIXTURE = Path(__file__).parent / "data" / "humaneval_plus_tiny.jsonl"


def _sandbox_ok() -> bool:
    try:
        from r2v.sandbox import sandbox_available
    except ImportError:
        return False
    return sandbox_available()


needs_sandbox = pytest.mark.skipif(
    not _sandbox_ok(), reason="bubblewrap sandbox unavailable (apt-get install bubblewrap; needs user namespaces)"
)


def _cfg(**code) -> EnvConfig:
    cfg = EnvConfig(name="code", max_steps=6)
    for k, v in code.items():
        setattr(cfg.code, k, v)
    cfg.sandbox.cpu_seconds = 3
    cfg.sandbox.wall_seconds = 5.0
    return cfg


@pytest.fixture(scope="module")
def he_tasks():
    from r2v.envs.code import CodeEnv

    return CodeEnv.load_tasks(_cfg())


@pytest.fixture(scope="module")
def plus_tasks():
    from r2v.envs.code import CodeEnv

    return {t.task_id: t for t in CodeEnv.load_tasks(_cfg(dataset_path=str(FIXTURE)))}


@pytest.fixture
def env():
    from r2v.envs.code import CodeEnv

    e = CodeEnv.from_config(_cfg())
    yield e
    e.close()


def _play_oracle(env, task):
    env.reset(task)
    res = None
    while (action := env.oracle_action()) is not None:
        res = env.step(action)
    return res


# ----------------------------------------------------------------------------------------- data
def test_default_dataset_loads_offline(he_tasks):
    assert len(he_tasks) == 164
    t = he_tasks[0]
    assert t.env == "code" and t.task_id == "HumanEval/0"
    assert t.payload["visible_calls"] == [
        "has_close_elements([1.0, 2.0, 3.0], 0.5)",
        "has_close_elements([1.0, 2.8, 3.0, 4.0, 5.0, 2.0], 0.3)",
    ]
    assert "has_close_elements" in t.goal and "run tests" in t.goal
    # most problems have visible examples (>>>, `f(x) == y`, `For x = ...`)
    assert sum(bool(t.payload["visible_calls"]) for t in he_tasks) >= 140


def test_max_tasks_limits():
    from r2v.envs.code import CodeEnv

    assert len(CodeEnv.load_tasks(_cfg(max_tasks=5))) == 5


def test_plus_format_is_read(plus_tasks):
    import sys

    from r2v.envs.code import CodeEnv

    before = sys.get_int_max_str_digits()
    CodeEnv.load_tasks(_cfg(dataset_path=str(FIXTURE)))
    assert sys.get_int_max_str_digits() == before  # lifted only while reading big-int inputs
    t = plus_tasks["Fixture/0"]
    assert t.payload["plus_input"][-1] == [10**30]
    assert plus_tasks["Fixture/1"].payload["visible_calls"] == ["mean([1, 2, 3])"]  # from "For xs = ..."
    assert plus_tasks["Fixture/1"].payload["atol"] == 1e-9


def test_malformed_jsonl_names_file_and_line(tmp_path):
    from r2v.envs.code import CodeEnv

    good = FIXTURE.read_text().splitlines()[0]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(good + "\n{not json\n")
    with pytest.raises(R2VError, match=r"bad\.jsonl:2: not valid JSON"):
        CodeEnv.load_tasks(_cfg(dataset_path=str(bad)))
    missing = tmp_path / "missing.jsonl"
    missing.write_text('{"task_id": "X/0", "prompt": "def f():\\n", "entry_point": "f"}\n')
    with pytest.raises(R2VError, match=r"missing\.jsonl:1: .*canonical_solution.*test"):
        CodeEnv.load_tasks(_cfg(dataset_path=str(missing)))
    with pytest.raises(R2VError, match="not found"):
        CodeEnv.load_tasks(_cfg(dataset_path=str(tmp_path / "nope.jsonl")))


# ----------------------------------------------------------------------------------------- episodes
@needs_sandbox
def test_oracle_solves_sample(env, he_tasks):
    sample = he_tasks[::8]  # 21 problems, spread over the set
    start = time.monotonic()
    for task in sample:
        res = _play_oracle(env, task)
        assert res.done and res.success and res.reward == 1.0, (task.task_id, res.observation.text)
        assert res.info["tool_failed"] is False
        assert res.info["tests_passed"] == res.info["tests_total"] >= 1
    assert time.monotonic() - start < 60


@needs_sandbox
@pytest.mark.slow
def test_oracle_solves_all_164(env, he_tasks):
    failed = [t.task_id for t in he_tasks if not _play_oracle(env, t).success]
    assert failed == []


@needs_sandbox
def test_oracle_sequence_and_visible_tests(env, he_tasks):
    obs = env.reset(he_tasks[0])
    assert obs.admissible is None and "has_close_elements" in obs.goal
    first = env.oracle_action()
    assert first.startswith("write\n")
    env.step(first)
    assert env.oracle_action() == "run tests"
    res = env.step("run tests")
    assert res.info["tests_passed"] == res.info["tests_total"] == 2 and not res.done
    assert "PASS" in res.observation.text
    assert env.oracle_action() == "submit"


@needs_sandbox
def test_wrong_solution_fails(env, he_tasks):
    env.reset(he_tasks[0])
    env.step("write\nreturn True")  # body-only write: appended to the prompt
    res = env.step("run tests")
    assert res.info["tests_passed"] == 1 and res.info["tests_total"] == 2 and "FAIL" in res.observation.text
    res = env.step("submit")
    assert res.done and not res.success and res.reward == 0.0
    assert res.info["tool_failed"] is False


@needs_sandbox
def test_submit_without_write_fails(env, he_tasks):
    env.reset(he_tasks[3])
    res = env.step("submit")
    assert res.done and not res.success
    assert env.oracle_action() is None


@needs_sandbox
def test_unknown_action_explains_language(env, he_tasks):
    env.reset(he_tasks[0])
    res = env.step("go north")
    assert not res.done and res.info["tool_failed"] is False
    assert "write" in res.observation.text and "submit" in res.observation.text


@needs_sandbox
def test_markdown_write_and_syntax_error(env, he_tasks):
    task = he_tasks[53]  # add(x, y)
    env.reset(task)
    res = env.step("write\n```python\ndef add(x, y)\n    return x + y\n```")
    assert "syntax error" in res.observation.text
    env.step("write\n```python\ndef add(x: int, y: int):\n    return x + y\n```")
    res = env.step("submit")
    assert res.success


@needs_sandbox
def test_infinite_loop_is_stopped(env, he_tasks):
    env.reset(he_tasks[53])
    env.step("write\ndef add(x, y):\n    while True:\n        pass\n")
    start = time.monotonic()
    res = env.step("submit")
    assert time.monotonic() - start < 15
    assert res.done and not res.success and res.info["tool_failed"] is True


@needs_sandbox
def test_cannot_exit_early_or_fake_result(env, he_tasks):
    env.reset(he_tasks[53])
    env.step("write\nimport sys\nprint('R2V-RESULT x {\"passed\": 1, \"total\": 1}')\nsys.exit(0)\n")
    assert not env.step("submit").success
    env.reset(he_tasks[53])
    env.step("write\nimport os\nos._exit(0)\n")
    res = env.step("submit")
    assert not res.success and res.info["tool_failed"] is True


@needs_sandbox
def test_sandbox_blocks_root_network_and_host_files(env, he_tasks, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("host secret")
    probe = f'''
import os, socket
try:
    os.listdir("/root"); print("ROOT-OK")
except OSError:
    print("ROOT-DENIED")
try:
    open({str(secret)!r}).read(); print("SECRET-OK")
except OSError:
    print("SECRET-DENIED")
try:
    socket.create_connection(("1.1.1.1", 53), timeout=2); print("NET-OK")
except OSError:
    print("NET-DENIED")

def add(x, y):
    return x + y
'''
    env.reset(he_tasks[53])
    env.step("write\n" + probe)
    text = env.step("run tests").observation.text
    assert "ROOT-DENIED" in text and "SECRET-DENIED" in text and "NET-DENIED" in text, text
    assert "-OK" not in text


@needs_sandbox
def test_plus_inputs_enforced(plus_tasks):
    from r2v.envs.code import CodeEnv

    env = CodeEnv.from_config(_cfg(dataset_path=str(FIXTURE)))
    try:
        task = plus_tasks["Fixture/0"]
        env.reset(task)
        env.step("write\ndef is_even(n):\n    return n in (2, 4, 6, 8)\n")  # passes check(), fails 0, -4
        res = env.step("submit")
        assert not res.success and res.info["tests_passed"] >= 1
        assert "extra test" in res.observation.text
        assert _play_oracle(env, task).info["tests_total"] == 1 + 3 + 4  # check + base + plus inputs
        mean = plus_tasks["Fixture/1"]
        env.reset(mean)
        env.step("write\nimport math\nreturn math.fsum(xs) / len(xs)")  # 0.6 vs 0.6000000000000001: within tolerance
        assert env.step("submit").success
        assert _play_oracle(env, mean).success
    finally:
        env.close()


@needs_sandbox
def test_step_limit_and_sample_action(he_tasks):
    from r2v.envs.code import CodeEnv

    cfg = _cfg()
    cfg.max_steps = 2
    env = CodeEnv.from_config(cfg)
    try:
        env.reset(he_tasks[1])
        assert not env.step("run tests").done
        res = env.step("run tests")
        assert res.done and not res.success and res.info["max_steps_reached"]
        rng = random.Random(0)
        actions = {env.sample_action(rng).split("\n")[0] for _ in range(50)}
        assert actions == {"write", "run tests", "submit"}
    finally:
        env.close()


@needs_sandbox
def test_registered_and_truncated(he_tasks):
    from r2v.envs.registry import env_class

    cls = env_class("code")
    cfg = _cfg(max_output_chars=200)
    env = cls.from_config(cfg)
    try:
        env.reset(he_tasks[0])
        env.step("write\nprint('x' * 5000)\nreturn False")
        res = env.step("run tests")
        assert res.info["truncated"] and res.observation.truncated
        assert len(res.observation.text) < 300
    finally:
        env.close()

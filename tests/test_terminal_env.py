"""The terminal env: every bundled task is solvable by its oracle and not by doing nothing, and the step
contract (truncation, tool_failed, max_steps, submit) holds. Needs bubblewrap (skips otherwise)."""
from __future__ import annotations

import random
from pathlib import Path

import pytest

from r2v.config import EnvConfig, SandboxConfig, TerminalEnvConfig
from r2v.envs.base import Task
from r2v.envs.registry import env_class, load_tasks, make_env
from r2v.envs.terminal import (
    BUNDLED_TASKS_DIR, SUBMIT, TerminalEnv, docker_available, docker_exec_command, docker_run_command,
    parse_solution,
)
from r2v.errors import R2VError
from r2v.sandbox import SandboxLimits, sandbox_available

skip_no_sandbox = pytest.mark.skipif(not sandbox_available(), reason="bubblewrap (bwrap) missing or unusable "
                                     "here: apt-get install bubblewrap")
BUNDLED = sorted(p.name for p in BUNDLED_TASKS_DIR.iterdir() if p.is_dir())


def _cfg(tmp_tasks: Path | None = None, **kw) -> EnvConfig:
    cfg = EnvConfig(name="terminal", max_steps=kw.pop("max_steps", 30))
    cfg.terminal = TerminalEnvConfig(tasks_dir=str(tmp_tasks) if tmp_tasks else None, **kw)
    cfg.sandbox = SandboxConfig(wall_seconds=10)
    return cfg


@pytest.fixture(scope="module")
def tasks():
    return {t.task_id: t for t in load_tasks(_cfg())}


@pytest.fixture
def env():
    e = TerminalEnv.from_config(_cfg())
    yield e
    e.close()


def _write_task(root: Path, name: str, solution: str, test: str = "import os\nassert os.path.exists('/app/done')\n",
                env_files: dict[str, str] | None = None) -> Path:
    d = root / name
    (d / "tests").mkdir(parents=True)
    (d / "task.yaml").write_text(f"instruction: do {name}\ndifficulty: easy\n")
    (d / "solution.sh").write_text(solution)
    (d / "run-tests.sh").write_text('python3 "$TEST_DIR/test_outputs.py"\n')
    (d / "tests" / "test_outputs.py").write_text(test)
    for rel, content in (env_files or {}).items():
        (d / "environment" / rel).parent.mkdir(parents=True, exist_ok=True)
        (d / "environment" / rel).write_text(content)
    return d


# ------------------------------------------------------------------------------------------ no sandbox
def test_bundled_tasks_are_complete():
    assert len(BUNDLED) >= 24
    for name in BUNDLED:
        d = BUNDLED_TASKS_DIR / name
        for f in ("task.yaml", "solution.sh", "run-tests.sh", "tests/test_outputs.py"):
            assert (d / f).is_file(), d / f
    tasks = TerminalEnv.load_tasks(_cfg())
    assert [t.task_id for t in tasks] == BUNDLED
    assert all(t.env == "terminal" and t.goal and Path(t.payload["dir"]).is_dir() for t in tasks)
    assert {t.payload["difficulty"] for t in tasks} == {"easy", "medium", "hard"}
    steps = [len(parse_solution((BUNDLED_TASKS_DIR / n / "solution.sh").read_text())) for n in BUNDLED]
    assert min(steps) == 1 and max(steps) >= 10


def test_registry_knows_terminal():
    assert env_class("terminal") is TerminalEnv


def test_parse_solution():
    text = (
        "#!/bin/bash\n# comment\n\necho one\n"
        "cat > f.txt <<'EOF'\nline # not a comment\n\nEOF\n"
        "printf a \\\n  b\n"
        "make  # r2v: may-fail\n"
    )
    assert parse_solution(text) == [
        ("echo one", False),
        ("cat > f.txt <<'EOF'\nline # not a comment\n\nEOF", False),
        ("printf a \\\n  b", False),
        ("make", True),
    ]


def test_missing_task_yaml_names_the_path(tmp_path):
    _write_task(tmp_path, "good", "touch done\n")
    bad = tmp_path / "broken"
    bad.mkdir()
    with pytest.raises(R2VError, match=str(bad / "task.yaml")):
        TerminalEnv.load_tasks(_cfg(tmp_path))


def test_bad_tasks_dir_and_fields(tmp_path):
    with pytest.raises(R2VError, match="tasks_dir"):
        TerminalEnv.load_tasks(_cfg(tmp_path / "nope"))
    with pytest.raises(R2VError, match="no task directories"):
        TerminalEnv.load_tasks(_cfg(tmp_path))
    d = _write_task(tmp_path, "t", "touch done\n")
    (d / "task.yaml").write_text("difficulty: easy\n")
    with pytest.raises(R2VError, match="instruction"):
        TerminalEnv.load_tasks(_cfg(tmp_path))
    (d / "task.yaml").write_text("instruction: x\n")
    (d / "run-tests.sh").unlink()
    with pytest.raises(R2VError, match="run-tests.sh"):
        TerminalEnv.load_tasks(_cfg(tmp_path))


def test_old_terminal_bench_descriptions_format(tmp_path):
    d = _write_task(tmp_path, "old", "touch done\n")
    (d / "task.yaml").write_text("descriptions:\n  - key: base\n    description: Do the old thing.\n"
                                 "  - key: hard\n    description: Harder.\n")
    assert TerminalEnv.load_tasks(_cfg(tmp_path))[0].goal == "Do the old thing."


def test_docker_command_construction():
    lim = SandboxLimits(memory_mb=512, max_processes=32)
    argv = docker_run_command("tb-image:latest", "r2v-x", lim)
    assert argv[:3] == ["docker", "run", "-d"] and argv[-3:] == ["tb-image:latest", "sleep", "infinity"]
    assert "--network=none" in argv and "--memory=512m" in argv and "--pids-limit=32" in argv
    assert "--network=none" not in docker_run_command("img", "n", SandboxLimits(network=True))
    assert docker_exec_command("r2v-x", "ls -la", {"TEST_DIR": "/tests"}) == [
        "docker", "exec", "-w", "/app", "-e", "TEST_DIR=/tests", "r2v-x", "bash", "-c", "ls -la"]


@pytest.mark.skipif(not docker_available(), reason="no Docker engine here (`docker info` fails)")
def test_docker_backend_runs_a_task(tasks):  # pragma: no cover - needs a Docker engine and an image
    env = TerminalEnv.from_config(_cfg(backend="docker"))
    try:
        env.reset(tasks["hello-file"])
        while not (res := env.step(env.oracle_action())).done:
            pass
        assert res.success
    finally:
        env.close()


# ------------------------------------------------------------------------------------------ sandbox
@pytest.mark.sandbox
@skip_no_sandbox
@pytest.mark.parametrize("task_id", BUNDLED)
def test_oracle_solves_and_noop_fails(env, tasks, task_id):
    task = tasks[task_id]
    obs = env.reset(task, seed=0)
    assert obs.goal == task.goal and obs.admissible is None and task.goal in obs.text
    for _ in range(30):
        res = env.step(env.oracle_action())
        if res.done:
            break
    assert res.done and res.success and res.reward == 1.0, res.info.get("test_output")
    assert env.oracle_action() is None

    env.reset(task, seed=0)  # doing nothing must not pass: the tests are not vacuous
    res = env.step(SUBMIT)
    assert res.done and not res.success and res.reward == 0.0


@pytest.mark.sandbox
@skip_no_sandbox
class TestStepContract:
    def test_truncation_sets_flags(self, tasks):
        env = TerminalEnv.from_config(_cfg(max_output_chars=100))
        env.reset(tasks["count-lines"])
        res = env.step("seq 1 5000")
        assert res.observation.truncated and res.info["truncated"]
        assert len(res.observation.text) < 200 and "[exit code 0]" in res.observation.text
        assert not res.info["tool_failed"]
        short = env.step("echo hi")
        assert not short.observation.truncated and not short.info["truncated"]
        assert short.observation.text == "hi\n[exit code 0]"
        env.close()

    def test_tool_failed(self, env, tasks):
        env.reset(tasks["count-lines"])
        res = env.step("ls /does-not-exist")
        assert res.info["tool_failed"] and res.info["exit_code"] != 0 and not res.done
        assert "No such file" in res.observation.text  # stderr is part of the observation
        ok = env.step("cat data.txt | head -1")
        assert not ok.info["tool_failed"] and ok.info["exit_code"] == 0
        assert env.step("   ").info["tool_failed"]

    def test_timeout_is_a_tool_failure(self, tasks):
        cfg = _cfg()
        cfg.sandbox = SandboxConfig(wall_seconds=1)
        env = TerminalEnv.from_config(cfg)
        env.reset(tasks["hello-file"])
        res = env.step("sleep 10")
        assert res.info["tool_failed"] and res.info["timed_out"] and "timed out" in res.observation.text
        env.close()

    def test_max_steps_ends_episode(self, tasks):
        env = TerminalEnv.from_config(_cfg(max_steps=3))
        env.reset(tasks["hello-file"])
        assert not env.step("true").done
        assert not env.step("echo 'Hello, world!' > hello.txt").done
        res = env.step("true")
        assert res.done and not res.success and res.reward == 0.0 and res.info["max_steps_reached"]
        with pytest.raises(R2VError, match="reset"):
            env.step("true")
        env.close()

    def test_tests_are_hidden_until_submit(self, env, tasks):
        obs = env.reset(tasks["fix-python-bug"])
        assert "stats.py" in obs.text
        res = env.step("ls -A /app; ls /tests /setup; find / -name test_outputs.py 2>/dev/null")
        assert "test_outputs" not in res.observation.text and "check_stats.py" in res.observation.text

    def test_state_persists_through_files_only(self, env, tasks):
        env.reset(tasks["hello-file"])
        env.step("echo 1 > a.txt; cd /tmp; export X=1")
        res = env.step("pwd; cat a.txt; echo X=$X")
        assert res.observation.text == "/app\n1\nX=\n[exit code 0]"

    def test_oracle_retries_a_failed_step_once(self, tmp_path):
        # the first run of the flaky line fails (and leaves a flag), the retry succeeds
        _write_task(tmp_path, "flaky", "test -f flag || { touch flag; exit 1; }\ntouch done\n")
        _write_task(tmp_path, "broken", "false\ntouch done\n")
        env = TerminalEnv.from_config(_cfg(tmp_path))
        tasks = {t.task_id: t for t in env.load_tasks(_cfg(tmp_path))}
        env.reset(tasks["flaky"])
        first = env.oracle_action()
        assert env.step(first).info["tool_failed"]
        assert env.oracle_action() == first  # retried once
        assert not env.step(first).info["tool_failed"]
        assert env.oracle_action() == "touch done"
        env.reset(tasks["broken"])
        env.step("false")
        env.step("false")
        assert env.oracle_action() == "touch done"  # gave up after one retry, moves on
        env.step("echo an off-plan command")  # other agents' steps do not move the plan
        assert env.oracle_action() == "touch done"
        env.step("touch done")
        assert env.oracle_action() == SUBMIT
        assert env.step(SUBMIT).success
        env.close()

    def test_sample_action_is_plausible_and_seeded(self, env, tasks):
        env.reset(tasks["count-lines"])
        a = [env.sample_action(random.Random(3)) for _ in range(2)]
        assert a[0] == a[1] and isinstance(a[0], str) and a[0]
        actions = {env.sample_action(random.Random(i)) for i in range(200)}
        assert SUBMIT in actions and any("data.txt" in x for x in actions)
        for x in list(actions)[:10]:
            assert "tool_failed" in env.step(x).info or x == SUBMIT
            if env._done:
                env.reset(tasks["count-lines"])

    def test_make_env_and_close_cleans_up(self, tasks):
        env = make_env(_cfg(), perturbed=False)
        env.reset(tasks["hello-file"])
        env.step(SUBMIT)
        made = [env._session.host_path, *env._hidden_dirs]  # work dir + the hidden test copies
        assert len(made) >= 2 and all(p.is_dir() for p in made)
        env.close()
        assert not any(p.exists() for p in made)

    def test_failing_setup_names_the_script(self, tmp_path):
        d = _write_task(tmp_path, "t", "touch done\n")
        (d / "setup.sh").write_text("echo broken-setup; exit 3\n")
        env = TerminalEnv.from_config(_cfg(tmp_path))
        with pytest.raises(R2VError, match=r"setup.sh failed \(exit 3\): broken-setup"):
            env.reset(env.load_tasks(_cfg(tmp_path))[0])
        assert env._session is None and env._hidden_dirs == []

    def test_custom_task_with_environment_files(self, tmp_path):
        _write_task(tmp_path, "t", "cp in.txt done\n", env_files={"in.txt": "x"})
        env = TerminalEnv.from_config(_cfg(tmp_path))
        task = env.load_tasks(_cfg(tmp_path))[0]
        assert isinstance(task, Task) and task.task_id == "t" and task.goal == "do t"
        env.reset(task)
        assert env.step("cat in.txt").observation.text == "x\n[exit code 0]"
        env.step(env.oracle_action())
        assert env.step(env.oracle_action()).success
        env.close()

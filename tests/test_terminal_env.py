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
    _compose_extras, docker_shell_command, load_solution, parse_dockerfile, parse_solution,
)
from r2v.errors import R2VError
from r2v.sandbox import SandboxLimits, sandbox_available

skip_no_sandbox = pytest.mark.skipif(not sandbox_available(), reason="bubblewrap (bwrap) missing or unusable "
                                     "here: apt-get install bubblewrap")
BUNDLED = sorted(p.name for p in BUNDLED_TASKS_DIR.iterdir() if p.is_dir())
TB_TASKS_DIR = Path(__file__).parent / "data" / "terminal_bench_tasks"  # Terminal-Bench layout, unchanged
TB_TASKS = sorted(p.name for p in TB_TASKS_DIR.iterdir() if p.is_dir())


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


def test_terminal_bench_fixtures_are_in_the_published_layout():
    assert len(TB_TASKS) >= 3
    for name in TB_TASKS:
        d = TB_TASKS_DIR / name
        assert all((d / f).is_file() for f in ("task.yaml", "Dockerfile", "run-tests.sh", "tests/test_outputs.py"))
        assert load_solution(d), d  # solution.sh or solution.yaml
        assert "pytest" in (d / "run-tests.sh").read_text() and "import" in (d / "tests/test_outputs.py").read_text()
    assert (TB_TASKS_DIR / "csv-report" / "solution.yaml").is_file()
    assert (TB_TASKS_DIR / "fix-config-regression" / "docker-compose.yaml").is_file()


def test_parse_dockerfile(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.py").write_text("x")
    (tmp_path / "data.csv").write_text("1")
    (tmp_path / "Dockerfile").write_text(
        "# syntax=docker/dockerfile:1\nFROM python:3.13\nARG BASE=/app\n"
        "RUN apt-get update && apt-get install -y \\\n    git curl \\\n  # a comment inside\n"
        "    && echo 'a && b' > /app/q.txt; pip install numpy\n"
        "WORKDIR $BASE\nENV A=1 B=\"two words\"\nENV OLD legacy value\nENV PATH=/opt/x:$PATH\n"
        "COPY --chown=1000 src/ ./src/\nADD [\"data.csv\", \"/app/in/\"]\nCOPY data.csv /usr/local/bin/\n"
        "WORKDIR sub\nRUN [\"python3\", \"-c\", \"print(1)\"]\nCMD [\"bash\"]\n")
    plan = parse_dockerfile(tmp_path, {"PATH": "/usr/bin"})
    assert plan.workdir == "/app/sub"
    assert plan.env == {"A": "1", "B": "two words", "OLD": "legacy value", "PATH": "/opt/x:/usr/bin"}
    runs = [s[1:3] for s in plan.steps if s[0] == "run"]
    assert runs == [("echo 'a && b' > /app/q.txt", "/app"), ("mkdir -p /app", "/app"),
                    ("mkdir -p /app/sub", "/app"), ("python3 -c 'print(1)'", "/app/sub")]
    copies = [(s[1], s[2]) for s in plan.steps if s[0] == "copy"]
    assert copies == [([tmp_path / "src"], "/app/src/"), ([tmp_path / "data.csv"], "/app/in/")]
    assert len(plan.skipped) == 4 and any("apt-get install -y" in x and "Dockerfile:4" in x for x in plan.skipped)
    assert any("/usr/local/bin" in x for x in plan.skipped) and any("pip install numpy" in x for x in plan.skipped)
    (tmp_path / "Dockerfile").write_text("FROM x\nWORKDIR /srv\n")
    with pytest.raises(R2VError, match=r"Dockerfile:2: WORKDIR /srv is outside /app.*backend=docker"):
        parse_dockerfile(tmp_path)
    (tmp_path / "Dockerfile").write_text("FROM x\nCOPY missing.txt /app/\n")
    with pytest.raises(R2VError, match=r"Dockerfile:2: COPY source 'missing.txt' not found"):
        parse_dockerfile(tmp_path)
    assert _compose_extras(TB_TASKS_DIR / "fix-config-regression") == []  # one service: the task's own
    (tmp_path / "docker-compose.yaml").write_text("services:\n  client: {build: .}\n  db: {image: postgres}\n")
    assert _compose_extras(tmp_path) == [f"{tmp_path / 'docker-compose.yaml'}: service 'db' (only the "
                                         "Dockerfile is replayed)"]


def test_solution_yaml(tmp_path):
    (tmp_path / "solution.yaml").write_text("- command: cd /app\n  block: true\n- command: \"echo $X\\n\"\n")
    assert load_solution(tmp_path) == [("cd /app", False), ("echo $X", False)]
    (tmp_path / "solution.yaml").write_text("cmd: x\n")
    with pytest.raises(R2VError, match="solution.yaml: expected a list"):
        load_solution(tmp_path)
    assert load_solution(tmp_path / "nope") is None


def test_docker_shell_command():
    assert docker_shell_command("r2v-x") == ["docker", "exec", "-i", "-w", "/app", "r2v-x", "bash", "--noprofile",
                                             "--norc", "-s"]


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


def _play_oracle(env, task, limit=60):
    env.reset(task, seed=0)
    for _ in range(limit):
        res = env.step(env.oracle_action())
        if res.done:
            return res
    raise AssertionError(f"{task.task_id}: oracle did not finish in {limit} steps")


@pytest.mark.sandbox
@skip_no_sandbox
@pytest.mark.parametrize("task_id", TB_TASKS)
def test_terminal_bench_task_copied_in_unchanged(task_id, caplog):
    """Dockerfile replayed, pytest run through the unchanged run-tests.sh (uv/uvx/pip stand-ins), the oracle
    typed line by line into the persistent shell passes; doing nothing fails."""
    cfg = _cfg(TB_TASKS_DIR)
    env = TerminalEnv.from_config(cfg)
    task = {t.task_id: t for t in env.load_tasks(cfg)}[task_id]
    try:
        res = _play_oracle(env, task)
        assert res.success and res.reward == 1.0, res.info["test_output"]
        assert " passed" in res.info["test_output"]  # pytest's own summary
        runner = (TB_TASKS_DIR / task_id / "run-tests.sh").read_text()
        if "uv add" in runner or "pip install" in runner:
            assert "r2v sandbox: skipped" in res.info["test_output"]
        env.reset(task, seed=0)
        res = env.step(SUBMIT)
        assert not res.success and "failed" in res.info["test_output"].lower(), res.info["test_output"]
    finally:
        env.close()
    if (TB_TASKS_DIR / task_id / "Dockerfile").read_text().count("install"):
        assert "skipped in the sandbox backend" in caplog.text  # installs are not silently dropped


@pytest.mark.sandbox
@skip_no_sandbox
def test_dockerfile_workdir_env_and_restart():
    cfg = _cfg(TB_TASKS_DIR)
    env = TerminalEnv.from_config(cfg)
    tasks = {t.task_id: t for t in env.load_tasks(cfg)}
    try:
        obs = env.reset(tasks["greeting-files"])
        assert "shell in /app/work (files: greetings)" in obs.text
        assert env.step("pwd").observation.text == "/app/work\n[exit code 0]"
        assert env.step("exit 1").info["shell_restarted"]
        assert env.step("pwd").observation.text == "/app/work\n[exit code 0]"  # a new shell starts in WORKDIR
        env.reset(tasks["csv-report"])
        assert env.step("echo $REPORT_PATH; ls").observation.text == "/app/out/report.csv\nout\nsales.csv\n[exit code 0]"
    finally:
        env.close()


@pytest.mark.sandbox
@skip_no_sandbox
@pytest.mark.parametrize("source,task_id", [("bundled", t) for t in BUNDLED] + [("tb", t) for t in TB_TASKS])
def test_oracle_solves_perturbed_episodes(source, task_id):
    """The oracle still wins under every perturbation family at once (failed tool calls are retried)."""
    from r2v.config import PerturbationConfig

    cfg = _cfg(TB_TASKS_DIR if source == "tb" else None, max_steps=60)
    cfg.perturbations = PerturbationConfig(tool_flakiness=0.3, partial_observability=0.3, prompt_injection=0.3,
                                           distractors=0.3)
    env = make_env(cfg, perturbed=True)
    task = {t.task_id: t for t in load_tasks(cfg)}[task_id]
    try:
        res = _play_oracle(env, task)
        assert res.success, res.info.get("test_output")
    finally:
        env.close()


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
        env.step("cd /tmp; V=kept")
        res = env.step("sleep 10")
        assert res.info["tool_failed"] and res.info["timed_out"] and "timed out" in res.observation.text
        assert not res.info["shell_restarted"]  # the sleep was killed, the shell survived with its state
        assert env.step("pwd; echo $V").observation.text == "/tmp\nkept\n[exit code 0]"
        res = env.step("while true; do :; done")  # the shell itself is busy: it is restarted, and says so
        assert res.info["timed_out"] and res.info["shell_restarted"] and "were reset" in res.observation.text
        assert env.step("pwd; echo V=$V").observation.text == "/app\nV=\n[exit code 0]"
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

    def test_tests_are_hidden_until_submit(self, tasks):
        cfg = _cfg()
        cfg.sandbox = SandboxConfig(wall_seconds=60)  # the search must finish, even on a loaded CI box
        env = TerminalEnv.from_config(cfg)
        obs = env.reset(tasks["fix-python-bug"])
        assert "stats.py" in obs.text
        # the whole tree but /proc and the host's read-only /usr (a full walk can pass the 10 s step limit on a
        # loaded CI box, and a killed find proves nothing); the search must finish for its silence to count
        res = env.step("ls -A /app; ls /tests /setup; "
                       "find / \\( -path /proc -o -path /usr \\) -prune -o -name test_outputs.py -print 2>/dev/null")
        assert not res.info["timed_out"], res.observation.text
        assert "test_outputs" not in res.observation.text and "check_stats.py" in res.observation.text
        env.close()

    def test_shell_state_persists_across_steps(self, env, tasks):
        obs = env.reset(tasks["hello-file"])
        assert "same shell" in obs.text
        env.step("mkdir -p sub && cd sub; echo 1 > a.txt; export X=1; Y=2; greet() { echo hi $1; }")
        res = env.step("pwd; cat a.txt; echo X=$X Y=$Y; greet you; bash -c 'echo child X=$X Y=$Y'")
        assert res.observation.text == "/app/sub\n1\nX=1 Y=2\nhi you\nchild X=1 Y=\n[exit code 0]"
        res = env.step("echo 'unbalanced")  # a syntax error fails that step only
        assert res.info["tool_failed"] and "unexpected EOF" in res.observation.text
        assert not res.info["shell_restarted"] and env.step("pwd").observation.text == "/app/sub\n[exit code 0]"
        assert env.step("cat").observation.text == "[exit code 0]"  # stdin is empty, not the protocol
        res = env.step("exit 3")  # the shell dies: restarted, and the agent is told its state is gone
        assert res.info["shell_restarted"] and res.info["tool_failed"] and res.info["exit_code"] == 3
        assert "shell exited (exit code 3)" in res.observation.text and "reset" in res.observation.text
        assert env.step("pwd; echo X=$X; cat sub/a.txt").observation.text == "/app\nX=\n1\n[exit code 0]"

    def test_replaying_actions_reproduces_the_shell_state(self, env, tasks):
        actions = ["cd /tmp", "N=$((6*7))", "echo $N > /app/n.txt"]
        outs = []
        for _ in range(2):  # a branch replay: reset, then the recorded actions
            env.reset(tasks["hello-file"])
            outs.append([env.step(a).observation.text for a in actions] + [env.step("pwd; echo $N").observation.text])
        assert outs[0] == outs[1] and outs[0][-1] == "/tmp\n42\n[exit code 0]"

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

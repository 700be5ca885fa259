"""Terminal tasks in the Terminal-Bench layout, run in a bubblewrap sandbox (or Docker where available).

A task is a directory:

    <task>/task.yaml            instruction: (required); difficulty: easy|medium|hard; category: ...;
                                max_test_timeout_sec: (default 60); docker_image: (docker backend only)
    <task>/solution.sh          the oracle: each non-comment line is one step (a line ending in `\\` and a
                                heredoc `<<EOF ... EOF` continue onto the next lines); a step ending in
                                `# r2v: may-fail` is a diagnostic expected to fail (not retried)
    <task>/run-tests.sh         run at `submit` as `bash /tests/run-tests.sh` with TEST_DIR=/tests, cwd /app
    <task>/tests/...            e.g. test_outputs.py; mounted read-only at /tests only at submit time, so the
                                agent never sees them; exit code 0 of run-tests.sh = success
    <task>/environment/...      optional: files the agent finds in /app at the start
    <task>/setup.sh             optional: run once in /app after copying environment/ (e.g. build a git
                                history); hidden from the agent

Mapping Terminal-Bench: its Dockerfile's `COPY` sources go into `environment/` and its `RUN` lines into
`setup.sh` (only host tools exist in the sandbox, no apt/pip: no network). Its run-tests.sh usually installs
pytest with uv (network): rewrite it to `python3 $TEST_DIR/test_outputs.py`, or use backend=docker,
which builds the task's Dockerfile and runs the original scripts in a container.

Actions are shell commands, one per step, each in a fresh `bash -c` in /app (files persist; `cd` and
`export` do not). The action `submit` ends the episode and runs the tests. The episode also ends,
unsuccessfully, after env.max_steps steps.
"""
from __future__ import annotations

import os
import random
import re
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path
from typing import Any

import yaml

from r2v.envs.base import Observation, StepResult, Task
from r2v.envs.registry import register_env
from r2v.errors import R2VError
from r2v.sandbox import Sandbox, SandboxLimits, require_sandbox

BUNDLED_TASKS_DIR = Path(__file__).resolve().parent / "terminal_tasks"
SUBMIT = "submit"
DEFAULT_TEST_TIMEOUT = 60.0
DEFAULT_DOCKER_IMAGE = "python:3.11-slim-bookworm"  # docker backend, tasks without a Dockerfile/docker_image
_HEREDOC = re.compile(r"<<-?\s*(['\"]?)(\w+)\1")
MAY_FAIL = "# r2v: may-fail"


# ---------------------------------------------------------------------------------------------- tasks
def _read_task_yaml(task_dir: Path) -> dict[str, Any]:
    path = task_dir / "task.yaml"
    if not path.is_file():
        raise R2VError(f"{path}: missing task.yaml; every task dir needs one with an `instruction:` key")
    try:
        meta = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise R2VError(f"{path}: not valid YAML: {e}") from None
    if isinstance(meta, dict) and not meta.get("instruction") and isinstance(meta.get("descriptions"), list):
        # older Terminal-Bench tasks: descriptions: [{key: base, description: ...}, ...]
        base = [d for d in meta["descriptions"] if isinstance(d, dict) and d.get("key", "base") == "base"]
        meta["instruction"] = base[0].get("description", "") if base else ""
    if not isinstance(meta, dict) or not str(meta.get("instruction", "")).strip():
        raise R2VError(f"{path}: needs a non-empty `instruction:` key (the task given to the agent)")
    for required in ("run-tests.sh", "tests"):
        if not (task_dir / required).exists():
            raise R2VError(f"{task_dir / required}: missing; a task needs run-tests.sh and a tests/ dir")
    return meta


def parse_solution(text: str) -> list[tuple[str, bool]]:
    """solution.sh -> (command, may_fail) per step: skips blanks/comments, joins `\\` continuations and
    heredoc bodies onto the line that opens them, strips the `# r2v: may-fail` marker."""
    cmds: list[tuple[str, bool]] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        i += 1
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        cmd = [line]
        while cmd[-1].endswith("\\") and i < len(lines):
            cmd.append(lines[i])
            i += 1
        for m in _HEREDOC.finditer(" ".join(cmd)):
            end = m.group(2)
            while i < len(lines):
                cmd.append(lines[i])
                i += 1
                if lines[i - 1].strip() == end:
                    break
        may_fail = cmd[0].rstrip().endswith(MAY_FAIL)
        if may_fail:
            cmd[0] = cmd[0].rstrip()[: -len(MAY_FAIL)].rstrip()
        cmds.append(("\n".join(cmd).strip(), may_fail))
    return cmds


def _tasks_dir(env_cfg) -> Path:
    configured = getattr(getattr(env_cfg, "terminal", None), "tasks_dir", None)
    path = Path(configured).expanduser() if configured else BUNDLED_TASKS_DIR
    if not path.is_dir():
        raise R2VError(f"env.terminal.tasks_dir = {path} is not a directory; point it at Terminal-Bench-style tasks")
    return path


# ---------------------------------------------------------------------------------------------- docker
def docker_build_command(task_dir: Path, tag: str) -> list[str]:
    """`docker build` for a Terminal-Bench task whose Dockerfile sits at the task root."""
    return ["docker", "build", "-t", tag, str(task_dir)]


def docker_run_command(image: str, name: str, limits: SandboxLimits) -> list[str]:
    """A long-lived, resource-limited container that commands are `docker exec`-ed into."""
    argv = ["docker", "run", "-d", "--rm", "--name", name, "--workdir", "/app",
            f"--memory={limits.memory_mb}m", f"--pids-limit={limits.max_processes}", "--cpus=1",
            "--security-opt=no-new-privileges", "--cap-drop=ALL"]
    if not limits.network:
        argv.append("--network=none")
    return argv + [image, "sleep", "infinity"]


def docker_exec_command(name: str, command: str, env: dict[str, str] | None = None) -> list[str]:
    argv = ["docker", "exec", "-w", "/app"]
    for k, v in (env or {}).items():
        argv += ["-e", f"{k}={v}"]
    return argv + [name, "bash", "-c", command]


def docker_available() -> bool:
    if shutil.which("docker") is None:
        return False
    try:
        return subprocess.run(["docker", "info"], capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


class DockerSession:
    """The subset of `Sandbox` the env uses, backed by one container (a real Terminal-Bench image)."""

    def __init__(self, task_dir: Path, meta: dict[str, Any], limits: SandboxLimits):
        self.limits = limits
        self.name = f"r2v-{task_dir.name}-{uuid.uuid4().hex[:8]}"
        image = meta.get("docker_image") or DEFAULT_DOCKER_IMAGE
        if (task_dir / "Dockerfile").is_file():
            image = f"r2v-tb-{task_dir.name}".lower()
            self._check(docker_build_command(task_dir, image), f"docker build of {task_dir}")
        self._check(docker_run_command(image, self.name, limits), f"docker run of {image}")

    def _check(self, argv: list[str], what: str) -> None:
        res = subprocess.run(argv, capture_output=True, text=True)
        if res.returncode != 0:
            raise R2VError(f"{what} failed: {res.stderr.strip()[-500:]}")

    def copy_in(self, src: Path, dest: str) -> None:
        self._check(["docker", "cp", f"{src}/.", f"{self.name}:{dest}"], f"docker cp {src}")

    def run(self, command, stdin=None, timeout=None, binds=None, env=None):
        from r2v.sandbox import SandboxResult

        for dest, src in (binds or {}).items():  # copied in for this run, removed after it (hidden files)
            self._check(["docker", "exec", self.name, "mkdir", "-p", dest], "docker exec mkdir")
            self.copy_in(Path(src), dest)
        wall = self.limits.wall_seconds if timeout is None else timeout
        cap = self.limits.max_output_bytes
        try:
            res = subprocess.run(docker_exec_command(self.name, command, env), input=stdin,
                                 capture_output=True, text=True, timeout=wall)
        except subprocess.TimeoutExpired as e:
            out = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
            return SandboxResult(124, out[:cap], "", True, len(out) > cap, wall)
        finally:
            for dest in binds or {}:
                subprocess.run(["docker", "exec", self.name, "rm", "-rf", dest], capture_output=True)
        return SandboxResult(res.returncode, res.stdout[:cap], res.stderr[:cap], False,
                             len(res.stdout) > cap or len(res.stderr) > cap, 0.0)

    def close(self) -> None:
        subprocess.run(["docker", "rm", "-f", self.name], capture_output=True)


# ---------------------------------------------------------------------------------------------- env
_RANDOM_COMMANDS = [
    "ls", "ls -la", "pwd", "find . -maxdepth 2", "du -sh .", "wc -l *", "git status", "git log --oneline",
    "python3 --version", "env", "df -h .", "grep -rn TODO .", "ls /tmp", "date", "whoami",
]
_RANDOM_FILE_COMMANDS = ["cat {f}", "head -n 5 {f}", "tail -n 5 {f}", "wc -l {f}", "file {f}", "sort {f}",
                         "python3 {f}", "bash {f}"]


@register_env("terminal")
class TerminalEnv:
    """One sandbox per episode; see the module docstring for the task layout and the action protocol."""

    name = "terminal"

    def __init__(self, limits: SandboxLimits, backend: str = "sandbox", max_output_chars: int = 2000,
                 max_steps: int = 30):
        if backend not in ("sandbox", "docker"):
            raise R2VError(f"env.terminal.backend = {backend!r} is not one of ['docker', 'sandbox']")
        self.limits = limits
        self.backend = backend
        self.max_output_chars = max_output_chars
        self.max_steps = max_steps
        self._session = None
        self._hidden_dirs: list[Path] = []
        self._task: Task | None = None
        self._done = True

    @classmethod
    def from_config(cls, env_cfg) -> "TerminalEnv":
        return cls(
            limits=SandboxLimits.from_config(env_cfg.sandbox),
            backend=env_cfg.terminal.backend,
            max_output_chars=env_cfg.terminal.max_output_chars,
            max_steps=env_cfg.max_steps,
        )

    @classmethod
    def load_tasks(cls, env_cfg) -> list[Task]:
        root = _tasks_dir(env_cfg)
        tasks = []
        for d in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith((".", "_"))):
            meta = _read_task_yaml(d)
            tasks.append(Task(
                task_id=d.name, env="terminal", goal=str(meta["instruction"]).strip(),
                payload={"dir": str(d), "difficulty": meta.get("difficulty"), "category": meta.get("category")},
            ))
        if not tasks:
            raise R2VError(f"{root}: no task directories found (each needs task.yaml, run-tests.sh, tests/)")
        return tasks

    # ------------------------------------------------------------------ episode
    def reset(self, task: Task, seed: int = 0) -> Observation:
        """Fresh sandbox with the task's start state. `seed` is unused: tasks are deterministic (the
        perturbation wrapper varies what is shown)."""
        self.close()
        task_dir = Path(task.payload["dir"])
        self._meta = _read_task_yaml(task_dir)
        self._task_dir = task_dir
        self._task = task
        sol = task_dir / "solution.sh"
        self._solution = parse_solution(sol.read_text()) if sol.is_file() else None
        self._oracle_idx, self._oracle_retried = 0, False
        self._steps, self._done = 0, False
        env_dir = task_dir / "environment"
        if self.backend == "docker":
            self._session = DockerSession(task_dir, self._meta, self.limits)
            if env_dir.is_dir():
                self._session.copy_in(env_dir, "/app")
        else:
            require_sandbox()
            self._session = Sandbox(self.limits, workdir=env_dir if env_dir.is_dir() else None)
        if (task_dir / "setup.sh").is_file():
            res = self._session.run("bash /setup/setup.sh", binds={"/setup": self._hidden_copy(["setup.sh"])})
            if res.exit_code != 0:
                self.close()
                raise R2VError(f"{task_dir / 'setup.sh'} failed (exit {res.exit_code}): {res.stdout[-300:]}"
                               f"{res.stderr[-300:]}")
        self._goal = task.goal or str(self._meta["instruction"]).strip()
        listing = self._session.run("ls -A").stdout.split()
        files = ", ".join(listing[:30]) + (", ..." if len(listing) > 30 else "") if listing else "(empty)"
        text = (f"{self._goal}\n\nYou are in a bash shell in /app (files: {files}). Each step runs one command "
                f"in a fresh shell (files persist, `cd` does not). Send `{SUBMIT}` when the task is done.")
        return Observation(goal=self._goal, text=text, admissible=None)

    def _hidden_copy(self, names: list[str]) -> Path:
        """Copy task files the agent must not see into a host temp dir that is mounted read-only for one
        run (a dir inside /app could have been replaced with a symlink by the agent)."""
        tmp = Path(tempfile.mkdtemp(prefix="r2v-hidden-"))
        self._hidden_dirs.append(tmp)
        for name in names:
            src = self._task_dir / name
            if src.is_dir():
                shutil.copytree(src, tmp, dirs_exist_ok=True)
            else:
                shutil.copy2(src, tmp / name)
        for dirpath, _, filenames in os.walk(tmp):
            os.chmod(dirpath, 0o755)
            for f in filenames:
                os.chmod(os.path.join(dirpath, f), 0o755)
        return tmp

    def step(self, action: str) -> StepResult:
        if self._done or self._session is None:
            raise R2VError("terminal episode is over (or was never started): call reset(task) first")
        action = action.strip()
        self._steps += 1
        if action.lower() == SUBMIT:
            return self._submit()
        if not action:
            obs, info = "(empty command: send a shell command, or `submit`)", {"exit_code": None}
            failed, truncated = True, False
        else:
            res = self._session.run("exec 2>&1\n" + action)
            out = res.stdout + res.stderr
            truncated = res.output_truncated or len(out) > self.max_output_chars
            if len(out) > self.max_output_chars:
                half = self.max_output_chars // 2
                out = out[:half] + "\n...[output truncated]...\n" + out[-(self.max_output_chars - half):]
            elif res.output_truncated:
                out += "\n...[output truncated]..."
            status = (f"[timed out after {self.limits.wall_seconds:g}s]" if res.timed_out
                      else f"[exit code {res.exit_code}]")
            obs = f"{out.rstrip()}\n{status}".lstrip("\n")
            failed = res.timed_out or res.exit_code != 0
            info = {"exit_code": res.exit_code, "timed_out": res.timed_out}
            self._advance_oracle(action, failed)
        info.update(tool_failed=failed, truncated=truncated, steps=self._steps)
        done = self._steps >= self.max_steps
        if done:
            self._done = True
            info["max_steps_reached"] = True
        observation = Observation(goal=self._goal, text=obs, admissible=None, truncated=truncated)
        return StepResult(observation, reward=0.0, done=done, success=False, info=info)

    def _submit(self) -> StepResult:
        self._done = True
        timeout = float(self._meta.get("max_test_timeout_sec", DEFAULT_TEST_TIMEOUT))
        tests = self._hidden_copy(["tests", "run-tests.sh"])
        res = self._session.run("bash /tests/run-tests.sh", timeout=timeout, binds={"/tests": tests},
                                env={"TEST_DIR": "/tests"})
        success = res.exit_code == 0 and not res.timed_out
        text = "Tests passed." if success else "Tests failed."
        info = {"tool_failed": False, "truncated": False, "exit_code": res.exit_code, "submitted": True,
                "test_output": (res.stdout + res.stderr)[-2000:], "steps": self._steps}
        return StepResult(Observation(goal=self._goal, text=text), reward=1.0 if success else 0.0, done=True,
                          success=success, info=info)

    # ------------------------------------------------------------------ oracle / random
    def _advance_oracle(self, action: str, failed: bool) -> None:
        """The oracle follows solution.sh; a failed oracle command is retried once, then skipped. Other
        agents' commands leave the plan where it was (the tasks' solutions are written to be re-runnable)."""
        if not self._solution or self._oracle_idx >= len(self._solution):
            return
        command, may_fail = self._solution[self._oracle_idx]
        if action != command:
            return
        if failed and not may_fail and not self._oracle_retried:
            self._oracle_retried = True
            return
        self._oracle_idx += 1
        self._oracle_retried = False

    def oracle_action(self) -> str | None:
        if self._solution is None or self._done:
            return None
        if self._oracle_idx < len(self._solution):
            return self._solution[self._oracle_idx][0]
        return SUBMIT

    def sample_action(self, rng: random.Random) -> str:
        """A plausible, usually harmless random command (the `random` baseline); sometimes `submit`."""
        if rng.random() < 0.05:
            return SUBMIT
        files = []
        if isinstance(self._session, Sandbox):
            files = sorted(p.name for p in self._session.host_path.iterdir() if p.is_file())
        if files and rng.random() < 0.5:
            return rng.choice(_RANDOM_FILE_COMMANDS).format(f=rng.choice(files))
        return rng.choice(_RANDOM_COMMANDS)

    def close(self) -> None:
        if self._session is not None:
            self._session.close()
            self._session = None
        for d in getattr(self, "_hidden_dirs", []):
            shutil.rmtree(d, ignore_errors=True)
        self._hidden_dirs: list[Path] = []
        self._done = True

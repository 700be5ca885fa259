"""Terminal tasks in the Terminal-Bench layout, run in a bubblewrap sandbox (or Docker where available).

A task is a directory, as Terminal-Bench ships it (copy one in unchanged) or with r2v's lighter extras:

    <task>/task.yaml            instruction: (required); difficulty: easy|medium|hard; category: ...;
                                max_test_timeout_sec: (default 60); docker_image: (docker backend only)
    <task>/solution.sh          the oracle: each non-comment line is one step (a line ending in `\\` and a
                                heredoc `<<EOF ... EOF` continue onto the next lines); a step ending in
                                `# r2v: may-fail` is a diagnostic expected to fail (not retried).
                                Or Terminal-Bench's solution.yaml: a list of `{command: ...}`, one step each
    <task>/run-tests.sh         run at `submit` as `bash /tests/run-tests.sh` with TEST_DIR=/tests, in the
                                task's WORKDIR (/app unless the Dockerfile says otherwise)
    <task>/tests/...            e.g. test_outputs.py; mounted read-only at /tests only at submit time, so the
                                agent never sees them; exit code 0 of run-tests.sh = success
    <task>/Dockerfile           optional; the docker backend builds it. The sandbox backend replays it
                                (`parse_dockerfile`): WORKDIR (under /app), ENV, COPY/ADD into /app, RUN lines
                                run once at reset, with package installs and downloads skipped (logged: there
                                is no network). docker-compose.yaml, if any, is not read by the sandbox backend
    <task>/environment/...      optional (r2v): files the agent finds in /app at the start
    <task>/setup.sh             optional (r2v): run once after the above (e.g. build a git history); hidden
                                from the agent

In the sandbox, Terminal-Bench's test tooling is stood in for (`sandbox_tools`): `pytest` is r2v's own,
mounted read-only, and `uv run`/`uvx`/`pip install`/`apt-get` lines run the command or are skipped, so an
unchanged run-tests.sh (`uv add pytest; uv run pytest $TEST_DIR/test_outputs.py`) works offline.

Actions are shell commands, one per step, all typed into one persistent bash per episode (as into
Terminal-Bench's tmux session): `cd`, variables, exports and functions carry over between steps; background
jobs end with their step; a timed-out command is killed, and if the shell has to be restarted the
observation says so (see r2v.sandbox). The action `submit` ends the episode and runs the tests. The episode
also ends, unsuccessfully, after env.max_steps steps. Branch replays rebuild a state by resetting and
replaying the recorded actions, so the shell's state is reproduced too.
"""
from __future__ import annotations

import atexit
import json
import logging
import os
import posixpath
import random
import re
import shlex
import shutil
import subprocess
import tempfile
import uuid
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

from r2v.envs.base import Observation, StepResult, Task
from r2v.envs.registry import register_env
from r2v.errors import R2VError
from r2v.sandbox import PersistentShell, Sandbox, SandboxLimits, require_sandbox

log = logging.getLogger(__name__)

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


def load_solution(task_dir: Path) -> list[tuple[str, bool]] | None:
    """The oracle's steps from solution.sh, or from Terminal-Bench's solution.yaml (a list of
    `{command: ..., ...}`, one step each); None when the task has neither."""
    sh, yml = task_dir / "solution.sh", task_dir / "solution.yaml"
    if sh.is_file():
        return parse_solution(sh.read_text())
    if not yml.is_file():
        return None
    items = yaml.safe_load(yml.read_text())
    if not isinstance(items, list) or not all(isinstance(i, dict) and "command" in i for i in items):
        raise R2VError(f"{yml}: expected a list of {{command: ...}} entries (Terminal-Bench's solution.yaml)")
    return [(str(i["command"]).strip(), False) for i in items if str(i["command"]).strip()]


# ---------------------------------------------------------------------------------------------- Dockerfile
_INSTALLER = re.compile(r"^(sudo\s+)?(apt-get|apt|apk|yum|dnf|conda|mamba|pip3?|python3?\s+-m\s+pip|uv|uvx|curl|"
                        r"wget|npm|npx|cargo|rustup|gem|go\s+install)\b")


@dataclass
class DockerfilePlan:
    """What the sandbox backend takes from a Terminal-Bench Dockerfile, in order."""

    workdir: str = "/app"
    env: dict[str, str] = field(default_factory=dict)
    steps: list[tuple] = field(default_factory=list)  # ("copy", [host srcs], dest) | ("run", command, cwd, where)
    skipped: list[str] = field(default_factory=list)  # what could not be reproduced (logged as warnings)


def _split_commands(cmd: str) -> list[str]:
    """Split a shell command at top-level `&&`, `;` and newlines (quotes and escapes respected)."""
    parts, cur, quote, i = [], "", None, 0
    while i < len(cmd):
        c = cmd[i]
        if c == "\\" and quote != "'":
            cur, i = cur + cmd[i:i + 2], i + 2
            continue
        if quote:
            quote = None if c == quote else quote
        elif c in "'\"":
            quote = c
        elif c in ";\n" or cmd.startswith("&&", i):
            parts.append(cur)
            cur, i = "", i + (2 if c == "&" else 1)
            continue
        cur, i = cur + c, i + 1
    return [p.strip() for p in parts + [cur] if p.strip()]


def _expand(text: str, variables: dict[str, str]) -> str:
    """`$NAME` / `${NAME}` from the Dockerfile's ARG/ENV values (unknown names become empty, as in Docker)."""
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: variables.get(m.group(1) or m.group(2), ""), text)


def parse_dockerfile(task_dir: Path, base_env: dict[str, str] | None = None) -> DockerfilePlan:
    """Read `task_dir/Dockerfile` into the sandbox's start state: `WORKDIR` (must be /app or below: only
    /app is writable), `ENV`, `COPY`/`ADD` of build-context files into /app, and `RUN` commands, minus
    package installs and downloads (no network: skipped and listed in `skipped`)."""
    path = task_dir / "Dockerfile"
    plan, variables, lines, cur, start = DockerfilePlan(), dict(base_env or {}), [], "", 0
    for n, raw in enumerate(path.read_text().splitlines(), 1):
        if raw.lstrip().startswith("#"):  # comments, also inside a continued instruction
            continue
        if not cur:
            start = n  # errors name an instruction's first line
        cur += raw.rstrip()  # a continuation drops the backslash and the newline, as Docker does
        if cur.endswith("\\"):
            cur = cur[:-1]
            continue
        if cur.strip():
            lines.append((start, cur.strip()))
        cur = ""
    wd = "/app"
    for n, line in lines:
        where = f"{path}:{n}"
        instr, _, args = line.partition(" ")
        instr, args = instr.upper(), args.strip()
        if instr == "ARG":
            name, _, default = args.partition("=")
            variables.setdefault(name.strip(), default.strip().strip('"'))
        elif instr == "ENV":
            pairs = shlex.split(args)
            if pairs and "=" not in pairs[0]:  # legacy `ENV NAME value`
                pairs = [f"{pairs[0]}={' '.join(pairs[1:])}"]
            for pair in pairs:
                name, _, value = pair.partition("=")
                variables[name] = plan.env[name] = _expand(value, variables)
        elif instr == "WORKDIR":
            wd = posixpath.normpath(posixpath.join(wd, _expand(args, variables)))
            if wd != "/app" and not wd.startswith("/app/"):
                raise R2VError(f"{where}: WORKDIR {wd} is outside /app, and the sandbox backend can only write "
                               "/app: move the task to /app or use env.terminal.backend=docker")
            plan.steps.append(("run", f"mkdir -p {shlex.quote(wd)}", "/app", where))
        elif instr in ("COPY", "ADD"):
            tokens = json.loads(args) if args.startswith("[") else shlex.split(args)
            tokens = [_expand(t, variables) for t in tokens if not t.startswith("--")]
            if len(tokens) < 2:
                raise R2VError(f"{where}: {instr} needs a source and a destination")
            dest = posixpath.normpath(posixpath.join(wd, tokens[-1])) + ("/" if tokens[-1].endswith("/") else "")
            srcs = []
            for src in tokens[:-1]:
                found = sorted(task_dir.glob(src.lstrip("/"))) if "://" not in src else []
                if not found:
                    raise R2VError(f"{where}: {instr} source {src!r} not found in {task_dir}")
                srcs += found
            if dest.rstrip("/") != "/app" and not dest.startswith("/app/"):
                plan.skipped.append(f"{where}: {instr} to {dest} (outside /app)")
                continue
            plan.steps.append(("copy", srcs, dest + ("/" if len(srcs) > 1 and not dest.endswith("/") else "")))
        elif instr == "RUN":
            command = shlex.join(json.loads(args)) if args.startswith("[") else args
            parts = _split_commands(command)
            plan.skipped += [f"{where}: RUN {p}" for p in parts if _INSTALLER.match(p)]
            keep = [p for p in parts if not _INSTALLER.match(p)]
            if keep:
                plan.steps.append(("run", " && ".join(keep), wd, where))
    plan.workdir = wd
    return plan


def _compose_extras(task_dir: Path) -> list[str]:
    """Services of docker-compose.yaml besides the task's own container: the sandbox backend runs none."""
    path = task_dir / "docker-compose.yaml"
    if not path.is_file():
        return []
    services = (yaml.safe_load(path.read_text()) or {}).get("services") or {}
    return [f"{path}: service {name!r} (only the Dockerfile is replayed)" for name in list(services)[1:]]


# ---------------------------------------------------------------------------------------------- tools
_SHIMS = {  # Terminal-Bench scripts install their tools from the network; in the sandbox these stand in
    "pytest": 'PYTHONPATH="/opt/r2v/site-packages${PYTHONPATH:+:$PYTHONPATH}" PYTHONDONTWRITEBYTECODE=1 '
              'PYTEST_DISABLE_PLUGIN_AUTOLOAD=1 exec /usr/bin/python3 -m pytest -p no:cacheprovider "$@"',
    "python": 'exec /usr/bin/python3 "$@"',
    "uv": 'if [ "$1" = run ]; then shift\n'
          '  while [ $# -gt 0 ]; do case "$1" in --with|--python|-p|--project|--directory) shift 2;; '
          '--*) shift;; *) break;; esac; done\n  exec "$@"\nfi\n'
          'echo "r2v sandbox: skipped \\`uv $*\\` (no network; pytest is available)" >&2',
    "uvx": 'while [ $# -gt 0 ]; do case "$1" in --with|--from|--python|-p) shift 2;; --*) shift;; *) break;; esac; '
           'done\ncmd="${1%%==*}"; shift; exec "$cmd" "$@"',
    "pip": 'if [ "$1" = install ]; then echo "r2v sandbox: skipped \\`pip $*\\` (no network)" >&2; exit 0; fi\n'
           'exec /usr/bin/python3 -m pip "$@"',
    "apt-get": 'echo "r2v sandbox: skipped \\`apt-get $*\\` (no network)" >&2',
}
_SHIMS.update({"pip3": _SHIMS["pip"], "apt": _SHIMS["apt-get"]})


@lru_cache(maxsize=1)
def sandbox_tools() -> tuple[dict[str, Path], dict[str, str]]:
    """(binds, env) that give the sandbox Terminal-Bench's test tooling: r2v's own pytest (its site-packages
    mounted read-only, used by a `pytest` shim through the system python3, same minor version needed) and
    stand-ins for uv/uvx/pip/apt-get that run the command without installing (`uv run pytest` -> pytest)."""
    bin_dir = Path(tempfile.mkdtemp(prefix="r2v-tb-tools-"))
    atexit.register(shutil.rmtree, bin_dir, True)
    for name, body in _SHIMS.items():
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        os.chmod(bin_dir / name, 0o755)
    os.chmod(bin_dir, 0o755)
    binds = {"/opt/r2v/bin": bin_dir}
    try:
        import pytest

        binds["/opt/r2v/site-packages"] = Path(pytest.__file__).resolve().parents[1]
    except ImportError:
        log.warning("pytest is not installed next to r2v: Terminal-Bench tests that use it will fail "
                    "(pip install pytest)")
    return binds, {"PATH": "/opt/r2v/bin:/usr/bin:/bin:/usr/sbin:/sbin:/usr/local/bin"}


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


def docker_shell_command(name: str) -> list[str]:
    """The episode's persistent shell: a bash in the container reading commands from stdin."""
    return ["docker", "exec", "-i", "-w", "/app", name, "bash", "--noprofile", "--norc", "-s"]


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

    def shell(self) -> PersistentShell:
        """One `docker exec -i` bash for the episode; its processes live in the container, out of our reach,
        so a timed-out command restarts the shell (after killing everything but the container's init)."""
        def kill_all():
            subprocess.run(["docker", "exec", self.name, "bash", "-c", "kill -9 -1"], capture_output=True)
        return PersistentShell(docker_shell_command(self.name), self.limits, cleanup=kill_all)

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
        self._shell: PersistentShell | None = None
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
        proc = env_cfg.terminal.procedural
        if proc.enabled:  # generated families (r2v.envs.families.terminal), written as task dirs once
            from r2v.envs.families.terminal import generate

            return cls.tasks_in(generate(Path(env_cfg.terminal.generated_dir), proc.seed, proc.instances,
                                         list(proc.templates)))
        return cls.tasks_in(_tasks_dir(env_cfg))

    @staticmethod
    def tasks_in(root: Path) -> list[Task]:
        """One task per task directory under `root` (Terminal-Bench layout), id = directory name."""
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
        self._solution = load_solution(task_dir)
        self._oracle_idx, self._oracle_retried = 0, False
        self._steps, self._done = 0, False
        self._binds, self._env, self._workdir = {}, {}, "/app"
        env_dir = task_dir / "environment"
        if self.backend == "docker":
            self._session = DockerSession(task_dir, self._meta, self.limits)
            if env_dir.is_dir():
                self._session.copy_in(env_dir, "/app")
            self._shell = self._session.shell()
        else:
            require_sandbox()
            self._session = Sandbox(self.limits, workdir=env_dir if env_dir.is_dir() else None)
            self._binds, self._env = sandbox_tools()
            plan = (parse_dockerfile(task_dir, self._env) if (task_dir / "Dockerfile").is_file()
                    else DockerfilePlan())
            plan.skipped += _compose_extras(task_dir)
            self._env = {**self._env, **plan.env}
            self._shell = self._session.shell(self._binds, self._env)
            self._build(plan)
        if (task_dir / "setup.sh").is_file():
            res = self._session.run("bash /setup/setup.sh", binds={"/setup": self._hidden_copy(["setup.sh"])},
                                    env=self._env)
            if res.exit_code != 0:
                self.close()
                raise R2VError(f"{task_dir / 'setup.sh'} failed (exit {res.exit_code}): {res.stdout[-300:]}"
                               f"{res.stderr[-300:]}")
        if self._workdir != "/app":
            self._shell.run(f"cd {shlex.quote(self._workdir)}")
        self._goal = task.goal or str(self._meta["instruction"]).strip()
        listing = self._shell.run("ls -A").stdout.split()
        files = ", ".join(listing[:30]) + (", ..." if len(listing) > 30 else "") if listing else "(empty)"
        text = (f"{self._goal}\n\nYou are in a bash shell in {self._workdir} (files: {files}). Each step runs one "
                f"command in the same shell (`cd`, variables and exports carry over; background jobs end with "
                f"their step). Send `{SUBMIT}` when the task is done.")
        return Observation(goal=self._goal, text=text, admissible=None)

    def _build(self, plan: DockerfilePlan) -> None:
        """Replay a Dockerfile's COPY and RUN steps in the sandbox (RUNs in a subshell of the episode's
        shell, so what they leave in /tmp is there too); what cannot be reproduced is logged."""
        for what in plan.skipped:
            log.warning("%s skipped in the sandbox backend (no network, only /app writable)", what)
        for step in plan.steps:
            if step[0] == "copy":
                rel = posixpath.relpath(step[2], "/app") + ("/" if step[2].endswith("/") else "")
                for src in step[1]:
                    self._session.copy_in(src, rel)
                continue
            _, command, cwd, where = step
            res = self._shell.run(f"(cd {shlex.quote(cwd)} || exit; {command}\n)")
            if res.exit_code != 0 or res.restarted:
                self.close()
                raise R2VError(f"{where}: RUN failed in the sandbox (exit {res.exit_code}): {res.stdout[-300:]!r}; "
                               "there is no network and only /app and /tmp are writable: adapt the line, or "
                               "use env.terminal.backend=docker")
        self._workdir = plan.workdir

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
            res = self._shell.run(action)
            out = res.stdout
            truncated = res.output_truncated or len(out) > self.max_output_chars
            if len(out) > self.max_output_chars:
                half = self.max_output_chars // 2
                out = out[:half] + "\n...[output truncated]...\n" + out[-(self.max_output_chars - half):]
            elif res.output_truncated:
                out += "\n...[output truncated]..."
            status = (f"[timed out after {self.limits.wall_seconds:g}s]" if res.timed_out
                      else f"[exit code {res.exit_code}]")
            if res.restarted:
                if self._workdir != "/app":
                    self._shell.run(f"cd {shlex.quote(self._workdir)}")
                status += (f"\n[{res.restarted}: a new shell was started in {self._workdir}; the working "
                           "directory, variables and functions were reset, files were kept]")
            obs = f"{out.rstrip()}\n{status}".lstrip("\n")
            failed = res.timed_out or res.exit_code != 0 or bool(res.restarted)
            info = {"exit_code": res.exit_code, "timed_out": res.timed_out, "shell_restarted": bool(res.restarted)}
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
        res = self._session.run(f"cd {shlex.quote(self._workdir)} && bash /tests/run-tests.sh", timeout=timeout,
                                binds={"/tests": tests, **self._binds},
                                env={**self._env, "TEST_DIR": "/tests", "T_BENCH_TEST_DIR": "/tests"})
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
        if self._shell is not None:
            self._shell.close()
            self._shell = None
        if self._session is not None:
            self._session.close()
            self._session = None
        for d in getattr(self, "_hidden_dirs", []):
            shutil.rmtree(d, ignore_errors=True)
        self._hidden_dirs: list[Path] = []
        self._done = True

"""A bubblewrap sandbox for running untrusted commands (generated code, agent shell commands).

Each `Sandbox` owns a fresh host temp dir mounted writable at /app; everything else the command sees is
the host's /usr and /etc read-only, a private /tmp (small tmpfs), a minimal /dev and /proc, no network,
no /root and a cleared environment. Commands run under rlimits (CPU seconds, address space, processes,
file size) applied by `prlimit` inside the sandbox, a wall-clock timeout, and capped output.

Two ways to run:
- `Sandbox.run`: one-shot, a separate `bwrap ... bash -c command`; the timeout kills the whole process
  group (bwrap's PID namespace dies with it). For test runs and hidden scripts.
- `Sandbox.shell()`: a `PersistentShell`, one long-lived bash in one bwrap for a whole episode, as an agent
  typing into a terminal (Terminal-Bench's tmux) sees it: `cd`, variables, exports and functions carry over.
  Each command is sent as `eval '<quoted>' </dev/null` followed by a random end marker carrying `$?`, so
  unbalanced quotes only fail that command and a command cannot read the protocol from stdin. After each
  command every other process in the sandbox is killed (`kill -9 -1` in its PID namespace): background jobs
  do not outlive their step, so a fork bomb or a forgotten server cannot eat the host between steps. On a
  timeout (or an output flood) the host kills the command's processes and the shell carries on; if the
  shell itself is stuck (a loop of builtins) or exits, it is restarted and the result says so
  (`restarted`): the working directory and variables are lost, files in /app are kept. The shell lives
  under the same rlimits, so a CPU-bound loop of builtins spends the shell's own CPU budget.

Root ignores RLIMIT_NPROC, so when we run as root the sandbox drops to an unprivileged uid first
(`setpriv`; each Sandbox picks its own uid from a high range). bwrap always runs in a new user namespace,
and on current kernels (>= 5.14) RLIMIT_NPROC then counts only that namespace's processes, so one
sandbox's fork bomb does not eat another's (or the host user's) process budget.
"""
from __future__ import annotations

import itertools
import os
import re
import select
import shlex
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from r2v.errors import R2VError

BWRAP = "bwrap"
_UID_BASE = 200_000  # sandbox uids: _UID_BASE .. _UID_BASE+_UID_SPAN, no host user lives there
_UID_SPAN = 100_000
_uid_counter = itertools.count()
_PATH = "/usr/bin:/bin:/usr/sbin:/sbin:/usr/local/bin"  # /usr/bin first: python3 is the system one
_FLOOD_BYTES = 16 * 1024 * 1024  # past the cap we keep draining (so the command is not blocked); kill after this


@dataclass
class SandboxLimits:
    cpu_seconds: int = 10
    memory_mb: int = 1024  # address space (RLIMIT_AS) per process
    max_processes: int = 64
    wall_seconds: float = 20.0
    max_output_bytes: int = 64_000  # per stream (stdout, stderr)
    network: bool = False
    max_file_mb: int = 256  # RLIMIT_FSIZE: largest file a command may write
    tmp_mb: int = 256  # size of the private /tmp tmpfs

    @classmethod
    def from_config(cls, sandbox_cfg) -> "SandboxLimits":
        """From `r2v.config.SandboxConfig`; fields it lacks keep their defaults."""
        kw = {}
        for name in cls.__dataclass_fields__:
            if hasattr(sandbox_cfg, name):
                kw[name] = getattr(sandbox_cfg, name)
        return cls(**kw)


@dataclass
class SandboxResult:
    exit_code: int  # 124 on timeout (like coreutils `timeout`)
    stdout: str
    stderr: str
    timed_out: bool
    output_truncated: bool
    duration_s: float
    restarted: str = ""  # PersistentShell only: why the shell was restarted (its state is lost); "" = kept


@lru_cache(maxsize=1)
def sandbox_available() -> bool:
    """bwrap is installed *and* can create its namespaces here (it cannot in some containers)."""
    if shutil.which(BWRAP) is None:
        return False
    try:
        with Sandbox(SandboxLimits(wall_seconds=10)) as sb:
            res = sb.run("echo ok")
        return res.exit_code == 0 and res.stdout.strip() == "ok"
    except Exception:
        return False


def require_sandbox() -> None:
    if shutil.which(BWRAP) is None:
        raise R2VError(
            "bubblewrap (bwrap) is not installed: apt-get install bubblewrap (needed to run generated code "
            "and terminal tasks safely); or pick env.name=textworld"
        )
    if not sandbox_available():
        raise R2VError(
            "bubblewrap (bwrap) is installed but cannot create a sandbox here (user namespaces disabled?): "
            "enable unprivileged user namespaces (sysctl kernel.unprivileged_userns_clone=1) or run in a VM"
        )


class Sandbox:
    """Context manager around one fresh work dir mounted at /app."""

    def __init__(self, limits: SandboxLimits | None = None, workdir: Path | None = None):
        self.limits = limits or SandboxLimits()
        self._root = os.geteuid() == 0
        self.uid = _UID_BASE + (os.getpid() * 7919 + next(_uid_counter)) % _UID_SPAN if self._root else os.getuid()
        self.host_path = Path(tempfile.mkdtemp(prefix="r2v-sandbox-"))
        if workdir is not None:
            workdir = Path(workdir)
            if not workdir.is_dir():
                self.close()
                raise R2VError(f"sandbox workdir {workdir} is not a directory")
            shutil.copytree(workdir, self.host_path, symlinks=True, dirs_exist_ok=True)
        self._chown_tree(self.host_path)
        self._shells: list[PersistentShell] = []

    # ------------------------------------------------------------------ files (host side)
    def _chown_tree(self, top: Path) -> None:
        if not self._root:
            return
        os.lchown(top, self.uid, self.uid)
        for dirpath, dirnames, filenames in os.walk(top):
            for name in dirnames + filenames:
                os.lchown(os.path.join(dirpath, name), self.uid, self.uid)

    def _resolve(self, relpath: str) -> Path:
        """Host path of /app/relpath; refuses anything that escapes the work dir (incl. via symlinks the
        sandboxed command may have planted, since the host side may be root)."""
        rel = relpath[len("/app/"):] if relpath.startswith("/app/") else relpath
        base = self.host_path.resolve()
        path = (base / rel).resolve()
        if path != base and base not in path.parents:
            raise R2VError(f"sandbox path {relpath!r} escapes /app; use a path inside the work dir")
        return path

    def write_file(self, relpath: str, content: str) -> None:
        path = self._resolve(relpath)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content)
        if self._root:
            p = path
            while p != self.host_path.resolve():
                os.lchown(p, self.uid, self.uid)
                p = p.parent

    def copy_in(self, src: Path, relpath: str) -> None:
        """Copy a host file or a dir's contents to /app/relpath, as Docker's COPY does: a file goes inside
        relpath when it ends with `/` or is an existing dir, else becomes relpath."""
        dest = self._resolve(relpath)
        if src.is_dir():
            shutil.copytree(src, dest, symlinks=True, dirs_exist_ok=True)
        else:
            if relpath.endswith("/") or dest.is_dir():
                dest = dest / src.name
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest)
        self._chown_tree(self.host_path)

    def read_file(self, relpath: str) -> str:
        path = self._resolve(relpath)
        if not path.is_file():
            raise R2VError(f"sandbox file /app/{relpath} does not exist (or is not a regular file)")
        return path.read_text(errors="replace")

    # ------------------------------------------------------------------ running
    def _argv(self, command: str | None, binds: dict[str, Path], env: dict[str, str]) -> list[str]:
        """bwrap argv for `bash -c command`, or for a bash reading commands from stdin when command is None."""
        lim = self.limits
        argv: list[str] = []
        if self._root:
            argv += ["setpriv", f"--reuid={self.uid}", f"--regid={self.uid}", "--clear-groups"]
        argv += [BWRAP, "--ro-bind", "/usr", "/usr", "--ro-bind", "/etc", "/etc"]
        for link in ("bin", "lib", "lib64", "sbin", "lib32", "libx32"):
            target = Path("/") / link
            if target.is_symlink():
                argv += ["--symlink", os.readlink(target), f"/{link}"]
            elif target.is_dir():
                argv += ["--ro-bind", str(target), f"/{link}"]
        argv += ["--proc", "/proc", "--dev", "/dev", "--size", str(lim.tmp_mb * 1024 * 1024), "--tmpfs", "/tmp"]
        argv += ["--bind", str(self.host_path), "/app"]
        for dest, src in binds.items():
            argv += ["--ro-bind", str(src), dest]
        argv += ["--chdir", "/app", "--unshare-all", "--hostname", "sandbox"]
        if lim.network:
            argv += ["--share-net"]
        argv += ["--die-with-parent", "--new-session", "--clearenv"]
        full_env = {"PATH": _PATH, "HOME": "/app", "LANG": "C.UTF-8", "TMPDIR": "/tmp", "TERM": "dumb", **env}
        for k, v in full_env.items():
            argv += ["--setenv", k, v]
        argv += [
            "--", "/usr/bin/prlimit",
            f"--cpu={lim.cpu_seconds}",
            f"--as={lim.memory_mb * 1024 * 1024}",
            f"--nproc={lim.max_processes}",
            f"--fsize={lim.max_file_mb * 1024 * 1024}",
            "--core=0",
            "/bin/bash", "--noprofile", "--norc", *(["-s"] if command is None else ["-c", command]),
        ]
        return argv

    def run(
        self,
        command: str,
        stdin: str | None = None,
        timeout: float | None = None,
        binds: dict[str, Path] | None = None,
        env: dict[str, str] | None = None,
    ) -> SandboxResult:
        """`bash -c command` in /app. `binds` maps sandbox paths to host dirs mounted read-only for this
        run only (e.g. hidden tests; as root they must be readable by the sandbox uid, all the way up);
        `env` adds variables to the cleared environment."""
        if not self.host_path.is_dir():
            raise R2VError("sandbox already closed: create a new Sandbox")
        wall = self.limits.wall_seconds if timeout is None else timeout
        cap = self.limits.max_output_bytes
        start = time.monotonic()
        proc = subprocess.Popen(
            self._argv(command, binds or {}, env or {}),
            stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
            cwd="/",
        )
        chunks: dict[str, list[bytes]] = {"out": [], "err": []}
        sizes = {"out": 0, "err": 0}
        flooded = threading.Event()

        def pump(stream, key):
            kept = 0
            while True:
                data = stream.read1(65536) if hasattr(stream, "read1") else stream.read(65536)
                if not data:
                    break
                sizes[key] += len(data)
                if kept < cap:
                    chunks[key].append(data[: cap - kept])
                    kept += min(len(data), cap - kept)
                if sizes[key] > max(cap, _FLOOD_BYTES):
                    flooded.set()
            stream.close()

        threads = [threading.Thread(target=pump, args=(proc.stdout, "out"), daemon=True),
                   threading.Thread(target=pump, args=(proc.stderr, "err"), daemon=True)]
        if stdin is not None:
            def feed():
                try:
                    proc.stdin.write(stdin.encode())
                    proc.stdin.close()
                except (BrokenPipeError, OSError):
                    pass
            threads.append(threading.Thread(target=feed, daemon=True))
        for t in threads:
            t.start()

        timed_out = False
        deadline = start + wall
        while proc.poll() is None:
            if time.monotonic() >= deadline:
                timed_out = True
                break
            if flooded.is_set():
                break
            time.sleep(0.01)
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
        for t in threads:
            t.join(timeout=5)
        duration = time.monotonic() - start
        truncated = sizes["out"] > cap or sizes["err"] > cap
        code = 124 if timed_out else proc.returncode
        if code is not None and code < 0:
            code = 128 - code  # killed by a signal, shell convention
        return SandboxResult(
            exit_code=code,
            stdout=b"".join(chunks["out"]).decode("utf-8", errors="replace"),
            stderr=b"".join(chunks["err"]).decode("utf-8", errors="replace"),
            timed_out=timed_out,
            output_truncated=truncated,
            duration_s=duration,
        )

    def shell(self, binds: dict[str, Path] | None = None, env: dict[str, str] | None = None) -> "PersistentShell":
        """A long-lived bash in this sandbox (cwd /app, the same limits, `binds`/`env` as in `run` but for
        the shell's whole life); closed with the sandbox."""
        if not self.host_path.is_dir():
            raise R2VError("sandbox already closed: create a new Sandbox")
        sh = PersistentShell(self._argv(None, binds or {}, env or {}), self.limits, interruptible=True)
        self._shells.append(sh)
        return sh

    # ------------------------------------------------------------------ lifecycle
    def close(self) -> None:
        for sh in getattr(self, "_shells", []):
            sh.close()
        shutil.rmtree(self.host_path, ignore_errors=True)

    def __enter__(self) -> "Sandbox":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:  # best effort: never leave work dirs behind
        try:
            if self.host_path.exists():
                self.close()
        except Exception:
            pass


# ---------------------------------------------------------------------------------------------- persistent shell
# every process but the shell (and the namespace's init) dies; the step's jobs are disowned first, so bash never
# announces their deaths ("line 3: 3 Killed  sleep 30") in the next step's output
_REAP = ("builtin disown -a 2>/dev/null; "
         "for __r2v_i in 1 2 3 4 5 6 7 8 9 10; do builtin kill -9 -1 2>/dev/null || break; done; "
         "builtin wait 2>/dev/null")
_GRACE_S = 1.0  # after killing a timed-out command's processes, how long the shell has to report back


def _descendants(pid: int) -> list[int]:
    """Host pids below `pid` (a scan of /proc; fine for the few processes a sandbox holds)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        children.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


class PersistentShell:
    """One bash reading commands from a pipe, for a whole episode (protocol in the module docstring).

    `argv` starts a bash that reads its script from stdin (in bwrap, or `docker exec -i`). `interruptible`:
    the shell's processes are host processes below argv's, so a timed-out command can be killed without the
    shell; otherwise a timeout restarts the shell. `cleanup` runs before a restart (e.g. kill what the old
    shell left in a container)."""

    def __init__(self, argv: list[str], limits: SandboxLimits, interruptible: bool = False, cleanup=None):
        self._argv, self.limits = argv, limits
        self._interruptible, self._cleanup = interruptible, cleanup
        self._token = uuid.uuid4().hex
        self._n = 0
        self._proc: subprocess.Popen | None = None
        self._start()

    def _start(self) -> None:
        self._proc = subprocess.Popen(self._argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, start_new_session=True, cwd="/")
        res = self._exchange("true", self.limits.wall_seconds)
        if res[0] != "done":
            out = self._head.decode(errors="replace")[-500:]
            self._kill()
            raise R2VError(f"the persistent shell did not start ({res[0]}): {out!r}; check that "
                           f"`{' '.join(self._argv[-4:])}` runs here")
        # what runs now (bwrap's init, bash) is the shell itself; anything else later is a command's
        self._infra = set(_descendants(self._proc.pid)) if self._interruptible else set()

    def _kill(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            try:
                os.killpg(self._proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self._proc.wait()
        for f in (self._proc.stdin, self._proc.stdout) if self._proc is not None else ():
            try:
                f.close()
            except OSError:
                pass

    def _restart(self) -> None:
        self._kill()
        if self._cleanup is not None:
            self._cleanup()
        self._start()

    def _interrupt(self) -> bool:
        """Kill every process of the sandbox except the shell and its init; False if we cannot."""
        if not self._interruptible:
            return False
        for _ in range(50):  # a fork bomb keeps forking while we kill: repeat until nothing is left
            strays = [p for p in _descendants(self._proc.pid) if p not in self._infra]
            if not strays:
                return True
            for p in strays:
                try:
                    os.kill(p, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.01)
        return False

    # ------------------------------------------------------------------ the protocol
    def _exchange(self, command: str, wall: float) -> tuple[str, int | None]:
        """Send one command, read until its marker. -> (status, exit code): status is done | timeout |
        flood | eof; the output is left in self._head (first max_output_bytes) / self._total."""
        self._n += 1
        marker = f"__r2v_end_{self._token}_{self._n}__"
        line = (f"builtin eval {shlex.quote(command.replace(chr(0), ''))} </dev/null 2>&1; __r2v_rc=$?; "
                f"{_REAP}; builtin printf '\\n%s %d\\n' {marker} \"$__r2v_rc\"\n")
        self._pattern = re.compile(rb"\n" + re.escape(marker.encode()) + rb" (-?\d+)\n")
        self._head, self._total, self._window = bytearray(), 0, b""
        try:
            self._proc.stdin.write(line.encode())
            self._proc.stdin.flush()
        except (BrokenPipeError, OSError, ValueError):
            return "eof", None
        return self._read(time.monotonic() + wall, flood_check=True)

    def _read(self, deadline: float, flood_check: bool) -> tuple[str, int | None]:
        fd, cap = self._proc.stdout.fileno(), self.limits.max_output_bytes
        keep = 128  # bytes held back: the marker may arrive split across reads
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return "timeout", None
            if not select.select([fd], [], [], min(left, 0.2))[0]:
                continue
            data = os.read(fd, 65536)
            self._window += data
            m = self._pattern.search(self._window)
            done = self._window[: m.start()] if m else self._window[:-keep] if data else self._window
            self._window = self._window[len(done):]
            self._head += done[: max(0, cap - len(self._head))]
            self._total += len(done)
            if m:
                return "done", int(m.group(1))
            if not data:
                return "eof", None
            if flood_check and self._total > max(cap, _FLOOD_BYTES):
                return "flood", None

    def run(self, command: str, timeout: float | None = None) -> SandboxResult:
        """Run one command in the shell; `exit_code` 124 and `timed_out` on a timeout, `restarted` says why
        the shell had to be restarted (cwd, variables and functions are then lost; files are kept)."""
        if self._proc is None:
            raise R2VError("persistent shell already closed: open a new one with Sandbox.shell()")
        wall = self.limits.wall_seconds if timeout is None else timeout
        start = time.monotonic()
        status, code = self._exchange(command, wall)
        restarted = ""
        timed_out, flooded = status == "timeout", status == "flood"
        if timed_out or flooded:
            if self._interrupt():
                status, code = self._read(time.monotonic() + _GRACE_S, flood_check=False)
            if status != "done":
                restarted = ("the command timed out and could not be stopped without the shell" if timed_out
                             else "the command flooded the output and could not be stopped without the shell")
        elif status == "eof":
            try:
                code = self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._kill()
                code = self._proc.returncode
            code = 128 - code if code < 0 else code
            restarted = f"the shell exited (exit code {code})"
        output = self._head.decode("utf-8", errors="replace")
        truncated = self._total > self.limits.max_output_bytes
        if restarted:
            self._restart()
        return SandboxResult(exit_code=124 if timed_out else code if code is not None else 137, stdout=output,
                             stderr="", timed_out=timed_out, output_truncated=truncated,
                             duration_s=time.monotonic() - start, restarted=restarted)

    def close(self) -> None:
        if self._proc is not None:
            self._kill()
            self._proc = None

"""A bubblewrap sandbox for running untrusted commands (generated code, agent shell commands).

Each `Sandbox` owns a fresh host temp dir mounted writable at /app; everything else the command sees is
the host's /usr and /etc read-only, a private /tmp (small tmpfs), a minimal /dev and /proc, no network,
no /root and a cleared environment. Every `run` is a separate `bwrap ... bash -c command` with rlimits
(CPU seconds, address space, processes, file size) applied by `prlimit` inside the sandbox, a wall-clock
timeout that kills the whole process group (bwrap's PID namespace dies with it), and capped output.

Root ignores RLIMIT_NPROC, so when we run as root the sandbox drops to an unprivileged uid first
(`setpriv`; each Sandbox picks its own uid from a high range). bwrap always runs in a new user namespace,
and on current kernels (>= 5.14) RLIMIT_NPROC then counts only that namespace's processes, so one
sandbox's fork bomb does not eat another's (or the host user's) process budget.
State persists between runs only through /app (each run is a new shell, so `cd`/`export` do not carry).
"""
from __future__ import annotations

import itertools
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
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

    def read_file(self, relpath: str) -> str:
        path = self._resolve(relpath)
        if not path.is_file():
            raise R2VError(f"sandbox file /app/{relpath} does not exist (or is not a regular file)")
        return path.read_text(errors="replace")

    # ------------------------------------------------------------------ running
    def _argv(self, command: str, binds: dict[str, Path], env: dict[str, str]) -> list[str]:
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
            "/bin/bash", "-c", command,
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

    # ------------------------------------------------------------------ lifecycle
    def close(self) -> None:
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

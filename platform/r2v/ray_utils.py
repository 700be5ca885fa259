"""One place that starts or joins Ray, so every stage runs the same on a laptop and on a cluster; and the one
place that decides where Ray's, Tune's and their neighbours' own logs go."""
from __future__ import annotations

import contextlib
import logging
import os
import re
import threading
from collections.abc import Iterator
from pathlib import Path

from r2v.config import R2VConfig
from r2v.experiment import Experiment

# Libraries whose driver-side loggers write to the terminal on their own (Ray/Tune/Train, Optuna's study
# messages, MLflow's database set-up).
LIBRARY_LOGGERS = ("ray", "optuna", "mlflow")
_log_file: Path | None = None  # set by `quiet_logs`: the terminal shows r2v's own output only
# r2v's own progress lines printed in workers, e.g. "[bc] epoch=3 loss=0.61 ..." (not "[2026-12-01 ...]")
WORKER_PROGRESS = re.compile(r"^\[[a-z][a-z0-9_-]*\] ")


def quiet_logs(cfg: R2VConfig) -> Path:
    """Send the library loggers to `runs/<exp>/logs/driver.log` and keep worker output off the terminal
    (`init_ray` then starts Ray with `log_to_driver=False`; `ray-session` links to Ray's own log folder).
    The CLI calls this unless --verbose: without it, Ray Train/Tune print dozens of lines per stage
    between the progress bars. Library use (tests, notebooks) keeps Ray's defaults."""
    global _log_file
    import mlflow  # noqa: F401  (each configures its logger on import: import first, then re-route)
    import optuna
    import ray  # noqa: F401

    folder = Experiment(cfg).logs_dir
    folder.mkdir(parents=True, exist_ok=True)
    _log_file = folder / "driver.log"
    handler = logging.FileHandler(_log_file)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    optuna.logging.disable_default_handler()
    for name in LIBRARY_LOGGERS:
        logger = logging.getLogger(name)
        for h in list(logger.handlers):
            logger.removeHandler(h)
        logger.addHandler(handler)
        logger.propagate = False
    return folder


@contextlib.contextmanager
def library_stdout() -> Iterator[None]:
    """Around a library call that prints its own reports to stdout (Tune's experiment banner and trial
    errors print even at `verbose=0`): into the log file when logs are quiet, else unchanged."""
    if _log_file is None:
        yield
        return
    with open(_log_file, "a") as f, contextlib.redirect_stdout(f):
        yield


def init_ray(cfg: R2VConfig):
    """Join `ray.address` when set (a cluster, or the head a `ray job submit` runs under), else start an
    embedded Ray sized by `ray.num_cpus`. Idempotent."""
    import ray

    if ray.is_initialized():
        return ray
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    kwargs = {"ignore_reinit_error": True, "log_to_driver": _log_file is None}
    if cfg.ray.runtime_env:
        kwargs["runtime_env"] = dict(cfg.ray.runtime_env)
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        context = ray.init(address=address, **kwargs)
    else:
        context = ray.init(num_cpus=cfg.ray.num_cpus, include_dashboard=False, **kwargs)
    if _log_file is not None:
        session_logs = _link_session_logs(context, _log_file.parent)
        if session_logs is not None:
            WorkerProgressEcho.start_for(session_logs)
    return ray


def _link_session_logs(context, folder: Path) -> Path | None:
    """`logs/ray-session` -> this Ray session's log folder (worker stdout/stderr, Train and Tune logs)."""
    session_dir = getattr(context, "address_info", {}).get("session_dir")
    session, link = Path(str(session_dir)) / "logs", folder / "ray-session"
    if not session_dir or not session.is_dir():  # a remote head: its logs are there (`ray logs`, the dashboard)
        return None
    with contextlib.suppress(OSError):
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(session.resolve(), target_is_directory=True)
    return session


class WorkerProgressEcho(threading.Thread):
    """With worker output off the terminal, still show r2v's own progress printed in workers (BC/DPO epochs
    from rank 0): follow this node's worker-*.out files and print each new `WORKER_PROGRESS` line once."""

    current: WorkerProgressEcho | None = None

    def __init__(self, logs: Path):
        super().__init__(daemon=True, name="r2v-worker-progress")
        self.logs, self.stopped, self.last = logs, threading.Event(), None
        self.offsets = {p: p.stat().st_size for p in logs.glob("worker-*.out")}  # earlier jobs' lines stay

    @classmethod
    def start_for(cls, logs: Path) -> None:
        if cls.current is not None:
            cls.current.stopped.set()
        cls.current = cls(logs)
        cls.current.start()

    def run(self) -> None:
        while not self.stopped.wait(1.0):
            self.poll()

    def poll(self) -> None:
        for path in sorted(self.logs.glob("worker-*.out")):
            start = self.offsets.get(path, 0)
            try:
                with open(path, "rb") as f:
                    f.seek(start)
                    data = f.read()
            except OSError:
                continue
            end = data.rfind(b"\n") + 1  # whole lines only; the rest is read next time
            self.offsets[path] = start + end
            for line in data[:end].decode(errors="replace").splitlines():
                if WORKER_PROGRESS.match(line) and line != self.last:  # Train prints a line twice
                    self.last = line
                    print(line, flush=True)

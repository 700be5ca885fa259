"""Helpers for tests that start real `ray start --block` nodes on this machine (job submission, two nodes)."""
from __future__ import annotations

import signal
import socket
import subprocess


def free_ports(n: int) -> list[int]:
    """n distinct free local ports (all bound at once, then released)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL, a `ray start --block` process and all of its descendants (gcs, raylet,
    dashboard, workers, a job's driver), found by parentage, so other Ray instances are left alone."""
    import psutil

    try:
        root = psutil.Process(proc.pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        procs = []
    for p in procs:
        try:
            p.send_signal(signal.SIGTERM)
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=5)  # throwaway nodes: no need to wait long
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=10)
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass

"""The terminal shows r2v's progress, not Ray's: a real `r2v sweep` (Tune + Optuna + MLflow on local Ray) and
a Ray task that prints keep their own output in runs/<exp>/logs/ unless --verbose."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from r2v.config import load_config

pytestmark = [pytest.mark.slow, pytest.mark.ray]
ROOT = Path(__file__).resolve().parents[1]
NOISE = ("Configuration for experiment", "View detailed results", "Started a local Ray instance",
         "Creating initial MLflow", "A new study created", "Trial sweep_trial", "Traceback")
TINY_SWEEP = ["ray.num_cpus=2", "router.hidden_sizes=[16]", "router.device=cpu", "router.epochs=2",
              "sweep.num_samples=2", "sweep.max_concurrent=2", "sweep.budgets=[0.2]", "sweep.epochs=2",
              "sweep.grace_period=1", "sweep.cpus_per_trial=0.5", "sweep.live=false",
              "sweep.live_threshold=false"]  # synthetic router rows: no games to set a live τ on


def r2v(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "platform")}
    return subprocess.run([sys.executable, "-m", "r2v.cli", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)


def test_sweep_logs_go_to_the_experiment_folder(tmp_path):
    sys.path.insert(0, str(ROOT / "tests"))
    from test_sweep import write_rows

    overrides = [f"runs_dir={tmp_path}", "experiment=quiet", *TINY_SWEEP]
    write_rows(load_config(None, overrides))
    done = r2v("sweep", *overrides)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    logs = tmp_path / "quiet" / "logs"
    assert f"logs go to {logs}" in done.stdout
    assert not [n for n in NOISE if n in out], out
    driver_log = (logs / "driver.log").read_text()
    for line in ("Configuration for experiment", "Started a local Ray instance", "Creating initial MLflow"):
        assert line in driver_log
    assert (logs / "ray-session").is_symlink() and any((logs / "ray-session").glob("worker-*"))
    assert '"trials": 2' in done.stdout  # the stage summary still reaches the terminal


def test_worker_output_stays_off_the_terminal_but_r2v_progress_does_not(tmp_path):
    script = f"""
import time
import ray
from r2v.config import load_config
from r2v.ray_utils import init_ray, quiet_logs

cfg = load_config(None, ["runs_dir={tmp_path}", "experiment=quiet", "ray.num_cpus=1"])
quiet_logs(cfg)
init_ray(cfg)

@ray.remote
def noisy():
    import logging, sys
    print("WORKER-STDOUT")
    print("WORKER-STDERR", file=sys.stderr)
    print("[bc] epoch=1 loss=0.5", flush=True)
    print("[bc] epoch=1 loss=0.5", flush=True)  # Ray Train prints a worker's line twice
    logging.getLogger("ray.train").warning("WORKER-RAY-LOGGER")
    return 1

assert ray.get(noisy.remote()) == 1
time.sleep(3)  # the echo follows the worker logs once a second
print("DRIVER-DONE")
ray.shutdown()
"""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "platform")}
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    out = done.stdout + done.stderr
    assert done.returncode == 0 and "DRIVER-DONE" in done.stdout, out
    assert "WORKER-" not in out, out
    assert done.stdout.count("[bc] epoch=1 loss=0.5") == 1, out
    worker_files = list((tmp_path / "quiet" / "logs" / "ray-session").glob("worker-*"))
    assert "WORKER-STDOUT" in "".join(p.read_text(errors="replace") for p in worker_files)

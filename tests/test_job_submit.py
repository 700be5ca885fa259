"""End to end through the Ray Jobs API: a real local Ray head (`ray start --head`), a job submitted with
`JobSubmissionClient` and the runtime env of cluster/runtime_env.yaml (working_dir = this repo), the
pipeline's first stage run by `jobs/pipeline.py` inside the job, artifacts checked on disk.

The head is started with `--block` in its own session and stopped by killing exactly its process tree
(never `ray stop`, which would kill every Ray instance on the machine, other tests' included).
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from local_ray import free_ports, kill_tree

pytestmark = [pytest.mark.slow, pytest.mark.ray]

ROOT = Path(__file__).resolve().parents[1]
JOB_TIMEOUT_S = 300
HEAD_START_TIMEOUT_S = 90

# Printed by the second command of the job's entrypoint: where the driver and a Ray worker import r2v from.
PROBE = (
    "import sys, json; sys.path.insert(0, 'jobs'); import _entry, r2v, ray; ray.init(); "
    "f = ray.remote(num_cpus=0)(lambda: __import__('r2v').__file__); "
    "print('R2V_PROBE ' + json.dumps({'driver': r2v.__file__, 'worker': ray.get(f.remote()), "
    "'cwd': __import__('os').getcwd()}))"
)


@pytest.fixture
def ray_head():
    """A Ray head on 127.0.0.1 with every port chosen free, a short temp dir (unix socket paths are
    limited to ~107 bytes) and the venv first on PATH, so the job's `python` is this interpreter."""
    pytest.importorskip("ray")
    pytest.importorskip("psutil")
    tmp = Path(tempfile.mkdtemp(prefix="r2vjob-", dir="/tmp"))
    ports = free_ports(10)
    gcs, dash, client, agent_listen, agent_grpc, rt_agent, metrics, node_mgr, obj_mgr, _ = ports
    bindir = str(Path(sys.executable).parent)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    # Token auth (Ray's default when a token exists) with a token of our own, passed through the environment:
    # nothing is read from or written to ~/.ray, and this test process's Ray state is not touched.
    token = secrets.token_hex(32)
    env.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token})
    env.pop("RAY_AUTH_TOKEN_PATH", None)
    ray_bin = shutil.which("ray", path=bindir) or "ray"
    cmd = [
        ray_bin, "start", "--head", "--block", "--disable-usage-stats",
        f"--port={gcs}", "--node-ip-address=127.0.0.1",
        "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
        f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent_listen}",
        f"--dashboard-agent-grpc-port={agent_grpc}", f"--runtime-env-agent-port={rt_agent}",
        f"--metrics-export-port={metrics}", f"--node-manager-port={node_mgr}", f"--object-manager-port={obj_mgr}",
        "--num-cpus=2", "--num-gpus=0", f"--temp-dir={tmp / 'ray'}",
    ]
    log = open(tmp / "ray-start.log", "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=tmp)
    try:
        from ray.job_submission import JobSubmissionClient

        url = f"http://127.0.0.1:{dash}"
        deadline = time.time() + HEAD_START_TIMEOUT_S
        client_, last_error = None, None
        while time.time() < deadline:
            if proc.poll() is not None:
                break
            try:
                client_ = JobSubmissionClient(url, headers={"Authorization": f"Bearer {token}"})
                client_.list_jobs()
                break
            except Exception as e:  # not up yet
                client_, last_error = None, e
                time.sleep(1)
        if client_ is None:
            log.flush()
            pytest.fail(f"Ray head did not come up on {url} in {HEAD_START_TIMEOUT_S}s ({last_error!r}):\n"
                        + (tmp / "ray-start.log").read_text()[-4000:])
        yield client_, tmp
    finally:
        kill_tree(proc)
        log.close()
        shutil.rmtree(tmp, ignore_errors=True)


def _runtime_env(tmp: Path) -> dict:
    """cluster/runtime_env.yaml as a cluster user submits it, with working_dir pointed at this checkout
    and DeepSpeed on CPU."""
    renv = yaml.safe_load((ROOT / "cluster" / "runtime_env.yaml").read_text())
    renv["working_dir"] = str(ROOT)
    renv["env_vars"] = {**renv.get("env_vars", {}), "DS_ACCELERATOR": "cpu"}
    renv["env_vars"].pop("MLFLOW_TRACKING_URI", None)
    return renv


def test_pipeline_job_on_local_head(ray_head):
    from ray.job_submission import JobStatus

    client, tmp = ray_head
    runs = tmp / "runs"
    entrypoint = (
        "python jobs/pipeline.py --config conf/quickstart.yaml --until tasks "
        f"runs_dir={runs} experiment=jobtest tracking.enabled=false "
        f"env.textworld.levels=[1] env.textworld.games_per_level=2 env.textworld.cache_dir={runs}/cache"
        f' && python -c "{PROBE}"'
    )
    t0 = time.time()
    from r2v.submit import submit_when_ready  # what `r2v submit` does: wait for the head's job agent

    job_id = submit_when_ready(client, entrypoint=entrypoint, runtime_env=_runtime_env(tmp))
    status = None
    while time.time() - t0 < JOB_TIMEOUT_S:
        status = client.get_job_status(job_id)
        if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            break
        time.sleep(1)
    logs = client.get_job_logs(job_id)
    wall = time.time() - t0
    if status != JobStatus.SUCCEEDED:
        if status not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            client.stop_job(job_id)
        info = client.get_job_info(job_id)
        pytest.fail(f"job {job_id} ended {status} after {wall:.0f}s ({info.message}); logs:\n{logs[-8000:]}")
    print(f"job {job_id} SUCCEEDED in {wall:.1f}s")

    # the pipeline ran its first stage and wrote its artifacts where runs_dir said
    splits = json.loads((runs / "jobtest" / "tasks" / "splits.json").read_text())
    assert splits["env"] == "textworld"
    all_ids = [t for ids in splits["splits"].values() for t in ids]
    assert len(all_ids) == 2 and len(set(all_ids)) == 2, splits
    marker = json.loads((runs / "jobtest" / ".stages" / "tasks.json").read_text())
    assert marker["stage"] == "tasks" and marker["config_hash"]
    assert not (runs / "jobtest" / ".stages" / "collect-teacher.json").exists()  # --until tasks stopped there
    assert "tasks" in logs and "done in" in logs, logs[-4000:]

    # driver and workers imported r2v from the job's working_dir copy, not from this checkout
    line = next((ln for ln in logs.splitlines() if ln.startswith("R2V_PROBE ")), None)
    assert line is not None, logs[-4000:]
    probe = json.loads(line[len("R2V_PROBE "):])
    wd = Path(probe["cwd"]).resolve()
    assert wd != ROOT and str(wd).startswith(str(tmp)), probe  # the unpacked upload under the head's temp dir
    for where in ("driver", "worker"):
        assert Path(probe[where]).resolve() == wd / "platform" / "r2v" / "__init__.py", (where, probe)
    # excludes: nothing of runs/ or .venv travelled with the upload
    assert not (wd / ".venv").exists() and not (wd / "runs").exists()

"""`r2v submit`: the pipeline (or one stage) as a Ray job on a cluster, through the Ray Jobs API.

The job runs `python jobs/<stage>.py --config <file> [overrides]` in a copy of this checkout
(`runtime_env.working_dir`, with runs/ and .venv/ excluded), exactly what `ray job submit --working-dir .`
would run; logs stream back until the job ends (or not, with --no-wait).
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from r2v.config import R2VConfig
from r2v.errors import R2VError

REPO = Path(__file__).resolve().parents[2]
EXCLUDES = ["runs/", ".venv/", ".git/", "**/__pycache__/", "*.parquet", "*.safetensors", ".pytest_cache/"]


def job_entrypoint(stage: str, config_path: str | None, overrides: list[str]) -> str:
    from r2v.pipeline import STAGE_NAMES

    if stage != "run" and stage not in STAGE_NAMES:
        raise R2VError(f"--stage {stage!r} is not `run` or a stage ({', '.join(STAGE_NAMES)})")
    script = "pipeline.py" if stage == "run" else f"{stage.replace('-', '_')}.py"
    if not (REPO / "jobs" / script).is_file():
        raise R2VError(f"jobs/{script} is missing from this checkout")
    parts = ["python", f"jobs/{script}"]
    if config_path:
        rel = os.path.relpath(Path(config_path).resolve(), REPO)
        if rel.startswith(".."):
            raise R2VError(f"--config {config_path} is outside the checkout, so the job would not see it; "
                           "put it under conf/")
        parts += ["--config", rel]
    return " ".join(parts + [f"'{o}'" for o in overrides])


def submit_when_ready(client, timeout_s: float = 90.0, **job) -> str:
    """`client.submit_job(**job)`, retried while a freshly started head answers "No available agent to submit
    job, please try again later" (its dashboard is up before the job agent registers). Any other error, or the
    same one past `timeout_s`, is raised."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return client.submit_job(**job)
        except RuntimeError as e:
            if "try again later" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(2)


def run_submit(cfg: R2VConfig, config_path: str | None = None, overrides: list[str] | None = None,
               address: str | None = None, stage: str = "run", wait: bool = True) -> dict[str, Any]:
    from ray.job_submission import JobStatus, JobSubmissionClient

    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        raise R2VError("no cluster to submit to: pass --address http://<head>:8265 or set RAY_ADDRESS")
    entrypoint = job_entrypoint(stage, config_path, list(overrides or []))
    env = dict(cfg.ray.runtime_env)
    env.setdefault("working_dir", str(REPO))
    env.setdefault("excludes", EXCLUDES)
    env.setdefault("env_vars", {}).setdefault("PYTHONPATH", "platform")
    client = JobSubmissionClient(address)
    job_id = submit_when_ready(client, entrypoint=entrypoint, runtime_env=env)
    print(f"[submit] job {job_id}: {entrypoint}\n[submit] follow it with: ray job logs -f {job_id} --address {address}")
    if not wait:
        return {"job_id": job_id, "entrypoint": entrypoint}
    seen = 0
    while True:
        status = client.get_job_status(job_id)
        logs = client.get_job_logs(job_id)
        print(logs[seen:], end="")
        seen = len(logs)
        if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            break
        time.sleep(2)
    if status != JobStatus.SUCCEEDED:
        raise R2VError(f"job {job_id} ended {status}; its logs are above (`ray job logs {job_id}`)")
    return {"job_id": job_id, "status": str(status), "entrypoint": entrypoint}

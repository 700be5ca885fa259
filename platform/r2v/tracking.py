"""MLflow tracking: one parent run per pipeline, one nested run per stage.

The default store is `sqlite:///<runs_dir>/<experiment>/mlflow.db` (MLflow 3 refuses a plain ./mlruns
file store); on a cluster set `tracking.uri` to the tracking server. `mlflow ui --backend-store-uri <uri>`
browses it.
"""
from __future__ import annotations

import contextlib
import json
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from r2v.config import R2VConfig, flatten, to_dict, to_yaml
from r2v.experiment import Experiment


def tracking_uri(cfg: R2VConfig) -> str:
    if cfg.tracking.uri:
        return cfg.tracking.uri
    db = Experiment(cfg).mlflow_db.resolve()
    db.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{db}"


class Tracker:
    """Thin wrapper so stages log the same way whether tracking is on, off, local or remote."""

    def __init__(self, cfg: R2VConfig):
        self.cfg = cfg
        self.enabled = cfg.tracking.enabled
        self._mlflow = None
        if self.enabled:
            import mlflow

            mlflow.set_tracking_uri(tracking_uri(cfg))
            name = cfg.tracking.experiment_name
            if cfg.tracking.uri is None and mlflow.get_experiment_by_name(name) is None:
                # with a sqlite store MLflow would put artifacts in ./mlruns of whatever the cwd is
                artifacts = Experiment(cfg).mlartifacts.resolve()
                mlflow.create_experiment(name, artifact_location=artifacts.as_uri())
            mlflow.set_experiment(name)
            self._mlflow = mlflow

    @contextlib.contextmanager
    def pipeline_run(self, name: str = "pipeline") -> Iterator[str | None]:
        """The parent run; logs the resolved config as params and as `config.yaml`."""
        if not self.enabled:
            yield None
            return
        with self._mlflow.start_run(run_name=name) as run:
            self.log_config()
            yield run.info.run_id

    @contextlib.contextmanager
    def stage_run(self, stage: str) -> Iterator[str | None]:
        """A run for one stage, nested under the active pipeline run when there is one."""
        if not self.enabled:
            yield None
            return
        nested = self._mlflow.active_run() is not None
        with self._mlflow.start_run(run_name=stage, nested=nested) as run:
            self._mlflow.set_tag("r2v.stage", stage)
            if not nested:
                self.log_config()
            yield run.info.run_id

    def log_config(self) -> None:
        params = {k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in flatten(to_dict(self.cfg)).items()}
        items = [(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow caps a batch at 100 params
            self._mlflow.log_params(dict(items[i : i + 100]))
        self.log_text(to_yaml(self.cfg), "config.yaml")

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if self.enabled:
            # MLflow keys allow letters, digits, _ - . / and spaces (a method such as `r2v@0.2` becomes r2v_0.2)
            clean = {re.sub(r"[^\w\-. /]", "_", k): float(v) for k, v in metrics.items()
                     if isinstance(v, (int, float)) and v == v}
            self._mlflow.log_metrics(clean, step=step)

    def log_history(self, history: list[dict[str, Any]], prefix: str = "router/") -> None:
        """Per-epoch training records (RiskModel.fit's history: λ, CVaR violation, Brier, loss, …) as metric
        series with step = epoch, so MLflow draws them as curves; records without `epoch` (the summary) are
        left to the caller."""
        for rec in history:
            if "epoch" in rec:
                self.log_metrics({prefix + k: v for k, v in rec.items() if k != "epoch"}, step=int(rec["epoch"]))

    def log_params(self, params: dict[str, Any]) -> None:
        if self.enabled:
            self._mlflow.log_params({k: str(v)[:6000] for k, v in params.items()})

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if self.enabled and Path(path).exists():
            p = Path(path)
            if p.is_dir():
                self._mlflow.log_artifacts(str(p), artifact_path=artifact_path or p.name)
            else:
                self._mlflow.log_artifact(str(p), artifact_path=artifact_path)

    def log_text(self, text: str, name: str) -> None:
        if self.enabled:
            with tempfile.TemporaryDirectory() as d:
                f = Path(d) / name
                f.write_text(text)
                self._mlflow.log_artifact(str(f))

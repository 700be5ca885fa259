"""The layout of one experiment folder, `runs/<experiment>/`: the only place that spells out its paths.

```
tasks/splits.json             the train/val/test split (stage `tasks`)
rollouts/<policy>/            step shards: teacher, slm, pair-probes, slm-router, branches-m<m>,
                              budget-calibration
pairs/                        DPO preference pairs
router/                       router rows (features + labels)
models/<stage>/               init, bc, dpo (HF directories), verifier, router
eval/summary.json, eval/episodes/
report/                       tables and plots
sweep/                        frontier.parquet, best-<budget>.yaml, the Tune experiment
.stages/<stage>.json          completion markers (config section hashes, upstream markers' digests)
logs/                         driver.log (library loggers), ray-session -> Ray's log folder (r2v.ray_utils)
mlflow.db, mlartifacts/       the default MLflow store
ray_results/                  Ray Train storage
```
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from r2v.config import R2VConfig

POLICY_STAGES = ("dpo", "bc")  # the SLM that is deployed: the first of these that exists


def is_model_dir(path: str | Path) -> bool:
    """An HF model directory (full weights or a LoRA adapter)."""
    path = Path(path)
    return (path / "config.json").is_file() or (path / "adapter_config.json").is_file()


def deployed_policy_dir(models_dir: str | Path) -> Path | None:
    """The SLM an experiment deploys, among the trained ones under `models_dir`: dpo if it exists, else bc."""
    for stage in POLICY_STAGES:
        if is_model_dir(Path(models_dir) / stage):
            return Path(models_dir) / stage
    return None


class Experiment:
    """Paths under `runs/<experiment>/` for a config (nothing is created here)."""

    def __init__(self, cfg: "R2VConfig"):
        self.root = Path(cfg.runs_dir) / cfg.experiment
        self.base_model = Path(cfg.model.path)
        self.branch_teacher_steps = cfg.router.branch_teacher_steps

    # ------------------------------------------------------------------ data
    @property
    def splits_file(self) -> Path:
        return self.root / "tasks" / "splits.json"

    @property
    def rollouts_dir(self) -> Path:
        return self.root / "rollouts"

    def rollouts(self, policy: str) -> Path:
        return self.rollouts_dir / policy

    @property
    def pair_probes(self) -> Path:
        return self.rollouts("pair-probes")

    @property
    def slm_router_rollouts(self) -> Path:
        return self.rollouts("slm-router")

    @property
    def branches(self) -> Path:
        """Branch episodes depend on m (router.branch_teacher_steps): one folder per m."""
        return self.rollouts(f"branches-m{self.branch_teacher_steps}")

    @property
    def pairs(self) -> Path:
        return self.root / "pairs"

    @property
    def router_rows(self) -> Path:
        return self.root / "router"

    # ------------------------------------------------------------------ models
    @property
    def models_dir(self) -> Path:
        return self.root / "models"

    def model(self, stage: str) -> Path:
        """models/<stage>: init, bc, dpo, verifier or router."""
        return self.models_dir / stage

    def deployed_policy_dir(self) -> Path:
        """The SLM later stages play and serve: models/dpo, else models/bc, else the base `model.path`."""
        return deployed_policy_dir(self.models_dir) or self.base_model

    # ------------------------------------------------------------------ results and bookkeeping
    @property
    def eval_dir(self) -> Path:
        return self.root / "eval"

    @property
    def eval_episodes(self) -> Path:
        return self.eval_dir / "episodes"

    @property
    def report_dir(self) -> Path:
        return self.root / "report"

    @property
    def sweep_dir(self) -> Path:
        return self.root / "sweep"

    def marker(self, stage: str) -> Path:
        return self.root / ".stages" / f"{stage}.json"

    @property
    def logs_dir(self) -> Path:
        return self.root / "logs"

    @property
    def mlflow_db(self) -> Path:
        return self.root / "mlflow.db"

    @property
    def mlartifacts(self) -> Path:
        return self.root / "mlartifacts"

    @property
    def ray_results(self) -> Path:
        return self.root / "ray_results"


__all__ = ["Experiment", "deployed_policy_dir", "is_model_dir", "POLICY_STAGES"]

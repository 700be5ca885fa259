"""The layout of one experiment folder, `runs/<experiment>/`: the only place that spells out its paths.

```
tasks/splits.json             the train/val/test split (stage `tasks`)
rollouts/<policy>/            step shards: teacher, slm, pair-probes, slm-router, branches-m<m>,
                              budget-calibration, select-<bc|dpo>-<clean|perturbed>
pairs/                        DPO preference pairs
router/                       router rows (features + labels)
models/<stage>/               init, bc, dpo (HF directories), verifier, router
models/selected.json          which SLM (bc | dpo) is deployed, with both validation numbers (select-policy)
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

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from r2v.errors import R2VError

if TYPE_CHECKING:
    from r2v.config import R2VConfig

POLICY_STAGES = ("dpo", "bc")  # without a selection file the SLM deployed is the first of these that exists
SELECTION_FILE = "selected.json"  # under models/: select-policy's decision (r2v.rollout.selection)


def is_model_dir(path: str | Path) -> bool:
    """An HF model directory (full weights or a LoRA adapter)."""
    path = Path(path)
    return (path / "config.json").is_file() or (path / "adapter_config.json").is_file()


def read_selection(models_dir: str | Path) -> dict[str, Any] | None:
    """select-policy's decision under `models_dir` ({"selected": "bc" | "dpo", ...}); None when it never ran."""
    path = Path(models_dir) / SELECTION_FILE
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise R2VError(f"{path} is not valid JSON ({e}): re-run `r2v select-policy` or delete the file") from None
    if not isinstance(doc, dict) or doc.get("selected") not in POLICY_STAGES:
        raise R2VError(f"{path}: `selected` must be one of {list(POLICY_STAGES)}: re-run `r2v select-policy`")
    return doc


def deployed_policy_dir(models_dir: str | Path) -> Path | None:
    """The SLM an experiment deploys, among the trained ones under `models_dir`: the one select-policy chose
    by validation play (models/selected.json), else dpo if it exists, else bc."""
    selection = read_selection(models_dir)
    if selection is not None:
        path = Path(models_dir) / selection["selected"]
        if not is_model_dir(path):
            raise R2VError(f"{Path(models_dir) / SELECTION_FILE} selects {selection['selected']} but {path} holds "
                           f"no model: re-run `r2v select-policy` (or `r2v run`)")
        return path
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

    @property
    def selection_file(self) -> Path:
        return self.models_dir / SELECTION_FILE

    def selection_rollouts(self, stage: str) -> Path:
        """select-policy's validation episodes of one candidate (bc | dpo), clean and perturbed (policy slm-<condition>)."""
        return self.rollouts(f"select-{stage}")

    def deployed_policy_dir(self) -> Path:
        """The SLM later stages play and serve: select-policy's choice, else models/dpo, else models/bc, else
        the base `model.path`."""
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


__all__ = ["Experiment", "deployed_policy_dir", "read_selection", "is_model_dir", "POLICY_STAGES", "SELECTION_FILE"]

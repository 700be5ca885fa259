"""MLflow: a parent run per pipeline and nested stage runs, in a sqlite store under the experiment dir."""
import mlflow

from r2v.config import load_config
from r2v.tracking import Tracker, tracking_uri


def test_parent_and_nested_stage_runs(tmp_path):
    cfg = load_config(None, [f"runs_dir={tmp_path}", "experiment=trk"])
    assert tracking_uri(cfg) == f"sqlite:///{tmp_path.resolve()}/trk/mlflow.db"
    tracker = Tracker(cfg)
    with tracker.pipeline_run("pipeline") as parent_id:
        with tracker.stage_run("collect-teacher") as child_id:
            tracker.log_metrics({"episodes": 12, "success_rate": 1.0})
        with tracker.stage_run("train-bc"):
            tracker.log_metrics({"loss": 0.5}, step=1)
    client = mlflow.MlflowClient(tracking_uri(cfg))
    parent = client.get_run(parent_id)
    assert parent.data.params["env.name"] == "textworld"
    assert parent.data.params["experiment"] == "trk"
    artifacts = [a.path for a in client.list_artifacts(parent_id)]
    assert "config.yaml" in artifacts
    assert (tmp_path / "trk" / "mlartifacts").is_dir()  # artifacts live with the experiment, not in ./mlruns
    child = client.get_run(child_id)
    assert child.data.tags["mlflow.parentRunId"] == parent_id
    assert child.data.metrics["episodes"] == 12
    exp = client.get_experiment_by_name("trk")
    runs = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'")
    assert sorted(r.info.run_name for r in runs) == ["collect-teacher", "train-bc"]


def test_disabled_tracking_writes_nothing(tmp_path):
    cfg = load_config(None, [f"runs_dir={tmp_path}", "tracking.enabled=false"])
    tracker = Tracker(cfg)
    with tracker.pipeline_run() as run_id, tracker.stage_run("x"):
        tracker.log_metrics({"a": 1})
    assert run_id is None
    assert not (tmp_path / "default" / "mlflow.db").exists()

"""The whole pipeline on a tiny TextWorld config, in-process on local Ray: every stage runs, the report
holds every method measured live, MLflow has the runs, and a re-run skips everything."""
import json
from pathlib import Path

import mlflow
import pytest

from r2v.config import load_config
from r2v.pipeline import STAGE_NAMES, run_pipeline
from r2v.tracking import tracking_uri

pytestmark = [pytest.mark.slow, pytest.mark.ray]

TINY = [
    "experiment=e2e", "env.textworld.levels=[3,4]", "env.textworld.games_per_level=4",
    "env.split_fractions=[0.5,0.25,0.25]", "env.max_steps=12", "collect.perturbation_seeds=[0,1]",
    "model.init.hidden_size=64", "model.init.intermediate_size=128", "model.init.vocab_size=512",
    "bc.epochs=2", "dpo.train.epochs=1", "dpo.perturbation_seeds=[1,2]",
    "router.fit_split=train", "router.cross_fit=false", "router.rollout_seeds=[0,1,2,3]", "router.epochs=10",
    "sweep.num_samples=2", "sweep.epochs=3", "sweep.budgets=[0.3]", "eval.perturbation_seeds=[0,1]",
    "eval.bootstrap_samples=100", "eval.budgets=[0.5]",
    "selection.seeds=[0,1]", "selection.clean_seeds=[]",  # select-policy: one pool per model, perturbed only
]


def test_quickstart_shaped_pipeline_end_to_end(ray_local, tmp_path, tw_session_cfg):
    cfg = load_config("conf/quickstart.yaml", TINY + [f"runs_dir={tmp_path}",
                                                      f"env.textworld.cache_dir={tmp_path}/cache"])
    rows = run_pipeline(cfg, echo=lambda s: None)
    assert [r["stage"] for r in rows] == list(STAGE_NAMES)
    assert all(r["status"] == "ran" for r in rows), rows

    exp = tmp_path / "e2e"
    results = json.loads((exp / "report" / "results.json").read_text())
    paced = {f"{m}_paced@0.5" for m in cfg.eval.paced_methods}  # ... and the quickstart's r2v also paced to it
    budgeted = {f"{m}@0.5" for m in cfg.eval.budget_methods} | paced  # each router at each budget of live calls
    frontier = results.pop("frontier")  # per-router summaries of the matched-budget curves
    selection = results.pop("slm_selection")  # select-policy: BC vs DPO on the validation games, the deployed one
    choice = results.pop("budget_choice")  # router.choose_budget: eval.budgets tried on the val games
    assert selection["selected"] in ("bc", "dpo") and set(selection["candidates"]) == {"bc", "dpo"}
    assert paced == {"r2v_paced@0.5"} and set(results) == set(cfg.eval.methods) | budgeted
    assert set(frontier) == set(cfg.eval.budget_methods) | {"r2v_paced"}
    pacing = results["r2v_paced@0.5"]["extra"]["pacing"]  # the first wave starts where r2v@0.5 was calibrated
    assert pacing["taus"][0] == pytest.approx(results["r2v@0.5"]["threshold"]) and len(pacing["wave_rates"]) >= 1
    assert 0.2 < results["random@0.5"]["llm_call_rate"] < 0.8
    n_test = len(json.loads((exp / "tasks" / "splits.json").read_text())["splits"]["test"])
    for name, r in results.items():
        assert r["n_episodes"] == n_test * 2 and r["n_seeds"] == 2, name
        for key in ("success", "success_ci", "worst_seed_success", "cvar_failure", "llm_call_rate",
                    "episode_call_share", "cost", "ece", "brier"):
            assert key in r, (name, key)
    assert results["llm_only"]["llm_call_rate"] == 1.0 and results["llm_only"]["success"] == 1.0  # oracle teacher
    assert results["slm_only"]["llm_call_rate"] == 0.0
    assert results["r2v"]["ece"] is not None
    for f in ("results.md", "frontier.png", "reliability.png"):
        assert (exp / "report" / f).is_file(), f
    for d in ("models/bc", "models/dpo", "models/router"):
        assert (exp / d).is_dir(), d
    from r2v.router.stage import run_calibrate  # a budget means the same in train-router, calibrate and eval

    router_json = json.loads((exp / "models" / "router" / "router.json").read_text())
    info = router_json["threshold_info"]
    assert info["kind"] == "budget" and 0.0 <= info["live_rate"] <= 1.0 and info["probes"]
    assert info["budget_choice"] == choice and choice["teacher_success"] == 1.0  # the oracle teacher, played
    assert [c["budget"] for c in choice["candidates"]] == [0.5]
    assert info["budget"] == (cfg.router.budget if choice["chosen"] is None else choice["chosen"])
    assert run_calibrate(cfg)["threshold"] == pytest.approx(router_json["threshold"])  # probes are reused
    for name in budgeted:  # each budgeted method reports its target and the rate its calibration games gave
        assert results[name]["budget"] == 0.5 and 0.0 <= results[name]["calibration_call_rate"] <= 1.0, name
    assert (exp / "sweep" / "frontier.parquet").is_file()
    from r2v.tune import load_best  # the sweep's best router at a budget has a live τ, like router.budget

    best = load_best(exp / "sweep" / "best-0.3.yaml")
    assert best["meta"]["threshold_kind"] == "live" and 0.0 <= best["meta"]["val_llm_call_rate_live"] <= 1.0
    assert json.loads((Path(best["model_dir"]) / "router.json").read_text())["threshold"] == best["threshold"]

    client = mlflow.MlflowClient(tracking_uri(cfg))
    runs = client.search_runs([client.get_experiment_by_name("e2e").experiment_id])
    stage_runs = {r.info.run_name for r in runs if r.data.tags.get("r2v.stage")}
    assert set(STAGE_NAMES) <= stage_runs
    eval_run = next(r for r in runs if r.data.tags.get("r2v.stage") == "eval")
    assert eval_run.data.metrics["r2v_0.5_success"] == results["r2v@0.5"]["success"]  # MLflow-safe key

    again = run_pipeline(cfg, echo=lambda s: None)
    assert all(r["status"] == "skipped" for r in again)

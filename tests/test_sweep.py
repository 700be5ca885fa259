"""Router sweep (Ray Tune + Optuna + ASHA + MLflow): offline estimator, per-epoch trainer, a real small sweep
on local Ray that is interrupted once and resumed, its frontier and best-<budget>.yaml files."""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from r2v.config import R2VConfig, RouterConfig
from r2v.data import ShardStore
from r2v.router.features import FEATURE_INDEX, FEATURE_NAMES, FEATURE_VERSION
from r2v.tune.estimator import ValEpisodes

D = len(FEATURE_NAMES)
SPLITS = {"train": 24, "val": 10, "test": 6}  # tasks per split


# ----------------------------------------------------------------------------------------- synthetic rows
def synthetic_rows(experiment: str, seeds=(0, 1, 2, 3), rng_seed: int = 0) -> dict[str, list[dict]]:
    """Router rows shaped like collect-router's: each (task, seed) is an SLM episode of 5–10 steps. A task has a
    difficulty; a perturbation seed adds to it; the episode fails with probability σ(difficulty). Failed
    episodes have "risky" steps (high entropy, small log-prob margin, low verifier score) where a teacher step
    saves the episode with probability 0.85 (0.1 elsewhere); 3 steps per failed episode get a teacher branch."""
    rng = np.random.default_rng(rng_seed)
    out: dict[str, list[dict]] = {}
    i_ent, i_margin, i_ver = FEATURE_INDEX["entropy"], FEATURE_INDEX["logprob_margin"], FEATURE_INDEX["verifier_best"]
    for split, n_tasks in SPLITS.items():
        rows = []
        for t in range(n_tasks):
            task = f"{split}-task{t}"
            difficulty = rng.normal(0.0, 1.0)
            for seed in seeds:
                n = int(rng.integers(5, 11))
                failed = rng.random() < 1 / (1 + math.exp(-(difficulty + 0.3 * seed - 0.3)))
                risky = np.zeros(n, dtype=bool)
                if failed:
                    risky[rng.choice(n, size=max(1, n // 3), replace=False)] = True
                X = rng.normal(0.0, 1.0, size=(n, D)).astype(np.float32)
                X[:, i_ent] += 1.6 * risky + 0.3 * failed
                X[:, i_margin] -= 1.6 * risky
                X[:, i_ver] -= 1.0 * risky
                X[:, FEATURE_INDEX["step"]] = np.arange(n)
                branched = set(rng.choice(n, size=min(3, n), replace=False).tolist()) if failed else set()
                ep = f"{task}__seed{seed}"
                for s in range(n):
                    teacher = None
                    if s in branched:
                        teacher = bool(rng.random() < (0.85 if risky[s] else 0.1))
                    label = (False if not failed else (teacher if teacher is not None else None))
                    rows.append({
                        "experiment": experiment, "env": "synthetic", "task_id": task, "split": split,
                        "episode_id": ep, "perturbation_seed": int(seed), "step": s,
                        "features": X[s].tolist(), "feature_spec": FEATURE_VERSION,
                        "episode_failed": bool(failed), "branch_label": label,
                        "slm_branch_success": (not failed) if label is not None else None,
                        "teacher_branch_success": teacher,
                        "label_weight": 1.0 if label is not None else None,
                    })
        out[split] = rows
    return out


def write_rows(cfg: R2VConfig) -> pd.DataFrame:
    from r2v.experiment import Experiment

    store = ShardStore(Experiment(cfg).router_rows, "router_rows")
    for split, rows in synthetic_rows(cfg.experiment).items():
        store.write(f"split={split}", rows)
    return store.read_pandas()


# ----------------------------------------------------------------------------------------- unit tests
def test_offline_estimator_branch_replay():
    # episode A (failed): steps 0..3, branches at 1 (teacher fails) and 2 (teacher wins)
    # episode B (succeeded): steps 0..1; episode C (failed): steps 0..1, no branches
    df = pd.DataFrame({
        "episode_id": ["A"] * 4 + ["B"] * 2 + ["C"] * 2,
        "step": [0, 1, 2, 3, 0, 1, 0, 1],
        "features": [[float(i)] for i in range(8)],
        "episode_failed": [True] * 4 + [False] * 2 + [True] * 2,
        "teacher_branch_success": [None, False, True, None, None, None, None, None],
    }).sample(frac=1.0, random_state=0)  # order must not matter
    v = ValEpisodes.from_frame(df)
    order = [("A", 0), ("A", 1), ("A", 2), ("A", 3), ("B", 0), ("B", 1), ("C", 0), ("C", 1)]
    assert list(zip(["ABC"[e] for e in v.episode], v.step)) == order

    def mask(*escalated):
        return np.array([k in escalated for k in order])

    assert v.slm_success == pytest.approx(1 / 3)
    none = v.estimate(mask())
    assert none == {"success": pytest.approx(1 / 3), "llm_call_rate": 0.0, "branch_hit_rate": 0.0}
    # escalating at A's winning branch step saves A; an un-branched step changes nothing
    assert v.estimate(mask(("A", 2)))["success"] == pytest.approx(2 / 3)
    assert v.estimate(mask(("A", 0), ("C", 1)))["success"] == pytest.approx(1 / 3)
    # a failed teacher branch alone does not save A; any escalated step whose branch was won does
    est = v.estimate(mask(("A", 1)))
    assert est["success"] == pytest.approx(1 / 3) and est["branch_hit_rate"] == pytest.approx(0.5)
    assert v.estimate(mask(("A", 1), ("A", 2)))["success"] == pytest.approx(2 / 3)
    # more escalation never lowers the estimate
    rng = np.random.default_rng(0)
    for _ in range(20):
        m = rng.random(len(order)) < 0.4
        assert v.estimate(m | (rng.random(len(order)) < 0.3))["success"] >= v.estimate(m)["success"]
    # escalating in an episode the SLM won keeps it won; the rate counts every step
    est = v.estimate(mask(("B", 0), ("A", 2), ("A", 3)))
    assert est["success"] == pytest.approx(2 / 3) and est["llm_call_rate"] == pytest.approx(3 / 8)


def test_pareto_mask():
    from r2v.tune.sweep import pareto_mask

    s = [0.5, 0.6, 0.6, 0.4, 0.7, 0.7]
    r = [0.1, 0.2, 0.3, 0.05, 0.5, 0.5]
    assert pareto_mask(s, r).tolist() == [True, True, False, True, True, True]


def test_epoch_trainer_reproduces_risk_model_fit(tmp_path):
    """The sweep trains with EpochTrainer (to report per epoch); it must give RiskModel.fit's model, also
    when stopped and resumed from a checkpointed state in between."""
    import torch

    from r2v.router.model import RiskModel, RouterData
    from r2v.tune.trainable import EpochTrainer

    rows = synthetic_rows("unit")
    train = RouterData.from_frame(pd.DataFrame(rows["train"]), "branch")
    val = RouterData.from_frame(pd.DataFrame(rows["val"]), "branch")
    rcfg = RouterConfig(epochs=5, threshold="cvar", calibration="platt", device="cpu", hidden_sizes=[32, 16])
    ref = RiskModel(D, rcfg, device="cpu")
    ref.fit(train, val, rcfg, seed=3)

    t = EpochTrainer(D, rcfg, train, val, seed=3)
    for _ in range(2):
        t.step()
    state = torch.load(_save(t.state(), tmp_path / "s.pt"), weights_only=False)
    torch.manual_seed(999)  # a resumed process has other RNG state: the checkpoint must restore it
    t2 = EpochTrainer(D, rcfg, train, val, seed=3)
    t2.load_state(state)
    while t2.epoch < rcfg.epochs:
        t2.step()
    snap = t2.snapshot()
    x = val.X[:50]
    np.testing.assert_allclose(snap.predict(x), ref.predict(x), rtol=1e-5, atol=1e-6)
    assert snap.threshold == pytest.approx(ref.threshold)
    assert snap.temperature == pytest.approx(ref.temperature)
    assert len(snap.history) == len(ref.history)


def _save(obj, path: Path) -> Path:
    import torch

    torch.save(obj, path)
    return path


# ----------------------------------------------------------------------------------------- a real sweep
BUDGETS = [0.1, 0.2, 0.3]
N_TRIALS = 8
EPOCHS = 6


@pytest.fixture(scope="module")
def swept(ray_local, tmp_path_factory):
    """One sweep of 8 trials that is interrupted (the driver gets the signal Ctrl+C sends once 3 trials have
    finished; Tune saves its state and stops) and in which one trial crashes once at epoch 3; then the
    stage runs again and resumes it."""
    import r2v.tune.sweep
    from fault_injection import InterruptOnce, traced_trial
    from r2v.errors import R2VError
    from r2v.tune import run_sweep

    tmp = tmp_path_factory.mktemp("sweep")
    cfg = R2VConfig(experiment="sweeptest", runs_dir=str(tmp / "runs"))
    cfg.router = dataclasses.replace(cfg.router, hidden_sizes=[32, 16], device="cpu", epochs=EPOCHS)
    cfg.sweep = dataclasses.replace(cfg.sweep, num_samples=N_TRIALS, max_concurrent=2, budgets=list(BUDGETS),
                                    epochs=EPOCHS, grace_period=2, reduction_factor=2.0, cpus_per_trial=0.5,
                                    max_failures=0, live=False, live_threshold=False)  # synthetic rows: no games
    rows = write_rows(cfg)
    (tmp / "crash-once").touch()
    (tmp / "interrupt-once").touch()
    mp = pytest.MonkeyPatch()  # module-scoped fixture: undo the trial wrapper by hand
    mp.setattr(r2v.tune.sweep, "sweep_trial", traced_trial(r2v.tune.sweep.sweep_trial, tmp / "trace",
                                                           fail_marker=tmp / "crash-once", fail_epoch=3))
    try:
        with pytest.raises(R2VError, match="sweep interrupted"):
            run_sweep(cfg, callbacks=[InterruptOnce(3, tmp / "interrupt-once", tmp / "finished-before-interrupt")])
        assert not (tmp / "interrupt-once").exists()
        finished_before = set((tmp / "finished-before-interrupt").read_text().split())
        summary = run_sweep(cfg)
    finally:
        mp.undo()
    return cfg, summary, rows, tmp, finished_before


@pytest.mark.ray
def test_sweep_resumes_without_rerunning_finished_trials(swept):
    cfg, summary, _, tmp, finished_before = swept
    assert summary["resumed"] and summary["trials"] == N_TRIALS
    assert 3 <= len(finished_before) < N_TRIALS  # the interruption really left work for the resume
    starts = [p.name.split("-from") for p in (tmp / "trace").iterdir()]
    ids = [tid for tid, _ in starts]
    assert len(set(ids)) == N_TRIALS
    for tid in finished_before:  # a trial that had finished never ran again
        assert ids.count(tid) == 1
    # every trial started from scratch at most once: re-runs resumed from a checkpoint (epoch > 0), except
    # a trial interrupted before its first report
    assert all(ids.count(t) <= 3 for t in set(ids))
    assert not (tmp / "crash-once").exists()
    resumed = [(tid, rest) for tid, rest in starts if not rest.startswith("0-")]
    assert any(rest.startswith("3-") for _, rest in resumed), resumed  # the crashed trial, from its checkpoint


@pytest.mark.ray
def test_every_trial_logged_to_mlflow(swept):
    from mlflow.tracking import MlflowClient

    from r2v.tracking import tracking_uri

    cfg, *_ = swept
    assert tracking_uri(cfg).startswith("sqlite:///")
    client = MlflowClient(tracking_uri(cfg))
    exp = client.get_experiment_by_name(cfg.tracking.experiment_name)
    runs = client.search_runs([exp.experiment_id], filter_string="tags.`r2v.stage` = 'sweep'")
    frontier = pd.read_parquet(Path(cfg.experiment_dir) / "sweep" / "frontier.parquet")
    assert len(runs) == N_TRIALS
    assert {r.data.tags["r2v.trial_id"] for r in runs} == set(frontier["trial_id"])
    for r in runs:
        assert r.info.status == "FINISHED"
        assert {"alpha", "epsilon", "cost_ratio", "brier_weight", "label", "dual_lr", "calibration",
                "threshold", "budget"} <= set(r.data.params)
        assert {"val_success_offline", "val_llm_call_rate", "val_budget_success_offline"} <= set(r.data.metrics)
        history = client.get_metric_history(r.info.run_id, "val_success_offline")
        assert len(history) == int(frontier[frontier["trial_id"] == r.data.tags["r2v.trial_id"]]
                                   ["epochs_trained"].iloc[0])
        assert {a.path for a in client.list_artifacts(r.info.run_id, "router")} >= {"router/router.json",
                                                                                      "router/router.pt"}


@pytest.mark.ray
def test_frontier_is_non_dominated_and_plotted(swept):
    cfg, *_ = swept
    out = Path(cfg.experiment_dir) / "sweep"
    df = pd.read_parquet(out / "frontier.parquet")
    assert (out / "frontier.png").stat().st_size > 1000
    assert {"trial_id", "alpha", "epsilon", "cost_ratio", "brier_weight", "label", "dual_lr", "calibration",
            "threshold", "budget", "success", "llm_call_rate", "source", "pareto", "estimator"} <= set(df.columns)
    val = df[df["source"] == "validation"]
    assert set(df["source"]) == {"validation"}
    assert df["trial_id"].nunique() == N_TRIALS and len(val) == N_TRIALS * (1 + len(BUDGETS))
    assert set(val["label"]) <= {"episode", "branch"}
    front = val[val["pareto"]]
    s, r = val["success"].to_numpy(), val["llm_call_rate"].to_numpy()
    for _, p in front.iterrows():  # no point dominates a Pareto point
        assert not (((s >= p["success"]) & (r <= p["llm_call_rate"]))
                    & ((s > p["success"]) | (r < p["llm_call_rate"]))).any()
    for _, q in val[~val["pareto"]].iterrows():  # every other point is dominated by a Pareto point
        assert ((front["success"] >= q["success"]) & (front["llm_call_rate"] <= q["llm_call_rate"])).any()
    # ASHA stopped some trials before max_t, some ran to the end
    assert val["epochs_trained"].max() == EPOCHS and val["epochs_trained"].min() < EPOCHS
    # the configured router was evaluated as the first point
    assert ((val["alpha"] - cfg.router.alpha).abs() < 1e-9).any()


@pytest.mark.ray
def test_best_budget_files_meet_their_budget_on_validation(swept):
    from r2v.config import load_config
    from r2v.router.baselines import make_router, rows_from_matrix
    from r2v.tune import load_best

    cfg, summary, rows, *_ = swept
    steps = ValEpisodes.from_frame(rows[rows["split"] == "val"])
    df = pd.read_parquet(Path(cfg.experiment_dir) / "sweep" / "frontier.parquet")
    val = df[df["source"] == "validation"]
    for b in BUDGETS:
        best = load_best(Path(cfg.experiment_dir) / "sweep" / f"best-{b:g}.yaml")
        assert best["budget"] == b and best["meta"]["val_llm_call_rate"] <= b
        assert "OFFLINE" in Path(summary[f"best_{b:g}"]).read_text()
        # the saved router, loaded the way eval/serve will, escalates at most b of the validation steps
        router = make_router("r2v", model_dir=best["model_dir"])
        assert router.threshold == pytest.approx(best["threshold"])
        p = router.risks(rows_from_matrix(steps.X))
        est = steps.estimate(p >= router.threshold)
        assert est["llm_call_rate"] <= b
        assert est["success"] == pytest.approx(best["meta"]["val_success_offline"])
        # it is the best validation point within the budget
        assert best["meta"]["val_success_offline"] == pytest.approx(val[val["llm_call_rate"] <= b]["success"].max())
        # its overrides are valid config
        loaded = load_config(None, best["overrides"])
        assert loaded.router.label in ("episode", "branch") and loaded.router.threshold in ("budget", "bayes", "cvar")
    # routing beats never escalating on this synthetic data (the router learned the risky steps)
    assert summary["val_success_offline_at_0.3"] > steps.slm_success


def test_a_best_router_keeps_the_grace_its_live_tau_was_searched_with(swept, tmp_path):
    """A sweep budget that `router.grace` could not spend is searched without grace
    (live_budget.search_spending_grace): the saved best router routes without it, as eval and Serve load it; a
    budget searched with grace keeps `router.grace` (no stored grace)."""
    from r2v.router.baselines import make_router
    from r2v.tune import load_best
    from r2v.tune.sweep import write_best

    cfg, *_ = swept
    cfg = dataclasses.replace(cfg, runs_dir=str(tmp_path))
    row = pd.read_parquet(Path(swept[0].experiment_dir) / "sweep" / "frontier.parquet").iloc[0]
    search = {"tau": 0.25, "rate": 0.6, "probes": [(0.25, 0.6)], "calibrated_on": "routed episodes"}
    for budget, live, grace in ((0.6, search | {"grace": 0}, 0), (0.2, search, None)):
        best = load_best(write_best(cfg, row, budget, live))
        assert best["meta"].get("grace") == grace and best["threshold"] == 0.25
        assert make_router("r2v", model_dir=best["model_dir"]).grace == grace


@pytest.mark.ray
def test_live_reevaluation_of_pareto_points(swept, tw_cfg):
    """sweep.live=true on a tiny real setup: TextWorld tasks, a tiny SLM built from config, the oracle teacher.
    The finished Tune experiment is restored (nothing retrains) and the picked points are played live."""
    import copy

    from r2v.config import TinyModelConfig
    from r2v.envs.stage import run_tasks
    from r2v.policies.init_model import save_tiny_model
    from r2v.tune import run_sweep

    cfg = copy.deepcopy(swept[0])
    cfg.env = copy.deepcopy(tw_cfg)
    cfg.env.max_steps = 8
    cfg.model.path = str(Path(cfg.experiment_dir) / "models" / "init")
    texts = [f"Goal: find the key\nObservation: room {i}\nAction: go north" for i in range(40)]
    save_tiny_model(texts, TinyModelConfig(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2,
                                           vocab_size=300), cfg.model.path, 256)
    cfg.policy.num_candidates = 2
    cfg.collect.num_workers, cfg.collect.cpus_per_worker = 1, 0.5
    cfg.eval.bootstrap_samples = 50
    cfg.sweep = dataclasses.replace(cfg.sweep, live=True, live_top_k=2, live_seeds=[0])
    run_tasks(cfg)
    summary = run_sweep(cfg)
    assert summary["resumed"] and summary["live_points"] == 2
    df = pd.read_parquet(Path(cfg.experiment_dir) / "sweep" / "frontier.parquet")
    live = df[df["source"] == "live"]
    assert len(live) == 2 and live["live_episodes"].min() >= 1
    assert live["success"].between(0, 1).all() and live["llm_call_rate"].between(0, 1).all()
    assert live["estimator"].str.startswith("live").all()
    val = df[df["source"] == "validation"]
    assert len(val) == N_TRIALS * (1 + len(BUDGETS))  # validation rows unchanged by the live pass
    for _, row in live.iterrows():  # a live point is one of the validation points, re-measured
        assert ((val["trial_id"] == row["trial_id"]) & (val["tau"] == row["tau"])).any()

"""`sweep`: a Ray Tune search over the router's risk/cost hyper-parameters and escalation thresholds.

Each trial trains a router (r2v.tune.trainable) on the cached router rows (train split) with sampled
α, ε, c_LLM/c_SLM, Brier weight, label kind, dual step size, calibration and threshold rule/budget, and
reports per epoch an OFFLINE ESTIMATE of validation episode success and the validation LLM-call rate
(r2v.tune.estimator). Optuna searches both objectives (success ↑, LLM-call rate ↓); ASHA stops trials
early on `val_budget_success_offline` (mean offline success over `sweep.budgets`, label-agnostic).
Every trial is an MLflow run (params, per-epoch metrics, its router as an artifact).

Outputs under runs/<exp>/sweep/:
  tune-<hash>/            the Tune experiment (restored after an interruption when sweep.resume)
  trials/<trial_id>/router/   each trial's final router (RiskModel.load-able; τ = the trial's own)
  frontier.parquet        one row per (trial, operating point) from validation, + live rows
  frontier.png            validation points, validation Pareto front, live points
  best-<budget>.yaml      per budget in sweep.budgets: see `load_best` for the format
  best-<budget>/router/   that point's router with its τ baked in (make_router("r2v", model_dir=...))
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
from ray.tune import Callback

from r2v.config import CALIBRATIONS, R2VConfig, to_dict
from r2v.errors import R2VError
from r2v.experiment import Experiment
from r2v.tune.estimator import ESTIMATOR, ValEpisodes
from r2v.tune.trainable import MODEL_SUBDIR, SweepData, overrides, router_config, sweep_trial

SUCCESS, RATE = "val_success_offline", "val_llm_call_rate"
ASHA_METRIC = "val_budget_success_offline"
BEST_FORMAT = "r2v-sweep-best@1"


def best_path(cfg: R2VConfig, budget: float) -> Path:
    return Experiment(cfg).sweep_dir / f"best-{budget:g}.yaml"


# ----------------------------------------------------------------------------------------- space and data
def search_space(cfg: R2VConfig, labels: list[str]) -> dict[str, Any]:
    from ray import tune

    budgets = [float(b) for b in cfg.sweep.budgets] or [cfg.router.budget]
    return {
        "alpha": tune.uniform(0.05, 0.5),
        "epsilon": tune.uniform(0.02, 0.5),
        "cost_ratio": tune.loguniform(2.0, 100.0),  # c_LLM / c_SLM; c_LLM stays router.cost_llm
        "brier_weight": tune.loguniform(0.1, 10.0),
        "label": tune.choice(labels),
        "dual_lr": tune.loguniform(0.005, 0.5),
        "calibration": tune.choice(list(CALIBRATIONS)),
        "threshold": tune.choice(list(cfg.sweep.thresholds)),
        "budget": tune.uniform(max(0.01, min(budgets) / 2), min(1.0, max(budgets) * 1.25)),
    }


def current_point(cfg: R2VConfig, labels: list[str]) -> dict[str, Any] | None:
    """The configured router as the first trial (so today's default is on the frontier), when in the space."""
    r = cfg.router
    budgets = [float(b) for b in cfg.sweep.budgets] or [r.budget]
    lo, hi = max(0.01, min(budgets) / 2), min(1.0, max(budgets) * 1.25)
    ratio = r.cost_llm / r.cost_slm if r.cost_slm > 0 else 0.0
    point = {"alpha": r.alpha, "epsilon": r.epsilon, "cost_ratio": ratio, "brier_weight": r.brier_weight,
             "label": r.label, "dual_lr": r.dual_lr, "calibration": r.calibration, "threshold": r.threshold,
             "budget": r.budget}
    ok = (0.05 <= r.alpha <= 0.5 and 0.02 <= r.epsilon <= 0.5 and 2 <= ratio <= 100 and 0.1 <= r.brier_weight <= 10
          and r.label in labels and 0.005 <= r.dual_lr <= 0.5 and r.threshold in cfg.sweep.thresholds
          and lo <= r.budget <= hi)
    return point if ok else None


def check_sweep_config(cfg: R2VConfig) -> None:
    s = cfg.sweep
    if s.num_samples < 1:
        raise R2VError(f"`sweep.num_samples` = {s.num_samples} must be at least 1")
    for b in s.budgets:
        if not 0 < b <= 1:
            raise R2VError(f"`sweep.budgets` holds {b}: budgets are LLM-call rates in (0, 1]")
    if s.cpus_per_trial <= 0 or s.gpus_per_trial < 0:
        raise R2VError("`sweep.cpus_per_trial` must be > 0 and `sweep.gpus_per_trial` ≥ 0")


def load_data(cfg: R2VConfig) -> tuple[SweepData, list[str]]:
    """Router data for every searchable label (a label without rows is dropped, with a note) + val steps."""
    from r2v.router.stage import read_router_rows, router_part, split_data

    rows = read_router_rows(cfg)
    train, val, labels = {}, {}, []
    for label in cfg.sweep.labels:
        try:
            train[label], val[label] = split_data(cfg, rows, "fit", label), split_data(cfg, rows, "calibration", label)
        except R2VError as e:
            print(f"[sweep] router.label={label} left out of the search: {e}")
            continue
        if len(train[label]) < 2 or len(val[label]) == 0:
            print(f"[sweep] router.label={label} left out of the search: too few train/val rows")
            train.pop(label), val.pop(label)
            continue
        labels.append(label)
    if not labels:
        raise R2VError(f"no router label in sweep.labels={list(cfg.sweep.labels)} has train and val rows; "
                       f"run `r2v collect-router` (with branches for label=branch)")
    steps = ValEpisodes.from_frame(router_part(cfg, rows, "calibration"))
    epochs = int(cfg.sweep.epochs or cfg.router.epochs)
    if epochs < 1:
        raise R2VError("`sweep.epochs` (or router.epochs) must be at least 1")
    data = SweepData(train, val, steps, cfg.router, [float(b) for b in cfg.sweep.budgets], epochs, cfg.seed)
    return data, labels


def experiment_key(cfg: R2VConfig) -> str:
    """Hash of what the trials depend on: router + search settings + the router rows on disk. A change
    starts a new Tune experiment next to the old one instead of restoring the old one."""
    sweep = {k: v for k, v in to_dict(cfg)["sweep"].items() if k not in ("live", "live_top_k", "live_seeds", "live_threshold",
                                                                                "resume")}
    files = sorted((p.name, p.stat().st_size) for p in Experiment(cfg).router_rows.glob("*.parquet"))
    blob = json.dumps({"router": to_dict(cfg)["router"], "sweep": sweep, "seed": cfg.seed, "rows": files},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:10]


# ----------------------------------------------------------------------------------------- MLflow
class MLflowTrials(Callback):
    """Tune callback (driver side): one MLflow run per trial, nested under the stage run when there is one;
    params at start, each report's numeric metrics (step = training iteration), the router at the end.
    A restored sweep finds its trials' runs again by tag, so no trial gets two runs."""

    def __init__(self, uri: str, experiment_id: str, sweep_key: str, parent_run_id: str | None):
        self.uri, self.experiment_id, self.sweep_key, self.parent = uri, experiment_id, sweep_key, parent_run_id
        self._runs: dict[str, str] = {}
        self._client = None

    def __getstate__(self):  # Tune pickles its callbacks with the experiment state
        return {**self.__dict__, "_client": None, "_runs": {}}

    def client(self):
        if self._client is None:
            from mlflow.tracking import MlflowClient

            self._client = MlflowClient(self.uri)
        return self._client

    def run_id(self, trial) -> str:
        tid = trial.trial_id
        if tid in self._runs:
            return self._runs[tid]
        c = self.client()
        found = c.search_runs([self.experiment_id], filter_string=(
            f"tags.`r2v.sweep` = '{self.sweep_key}' and tags.`r2v.trial_id` = '{tid}'"), max_results=1)
        if found:
            run_id = found[0].info.run_id
            c.update_run(run_id, status="RUNNING")
        else:
            tags = {"r2v.stage": "sweep", "r2v.sweep": self.sweep_key, "r2v.trial_id": tid,
                    "r2v.estimator": ESTIMATOR}
            if self.parent:
                tags["mlflow.parentRunId"] = self.parent
            run_id = c.create_run(self.experiment_id, run_name=f"sweep-{tid}", tags=tags).info.run_id
            c.log_batch(run_id, params=_params(trial.config))
        self._runs[tid] = run_id
        return run_id

    def on_trial_start(self, iteration, trials, trial, **info):
        self.run_id(trial)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        from mlflow.entities import Metric

        step = int(result.get("training_iteration", 0))
        ts = int(result.get("timestamp", 0) * 1000)
        metrics = [Metric(k, float(v), ts, step) for k, v in result.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v)
                   and (k.startswith("val_") or k in ("tau", "temperature", "lambda_end", "best_epoch", "epoch"))]
        if metrics:
            self.client().log_batch(self.run_id(trial), metrics=metrics)

    def on_trial_complete(self, iteration, trials, trial, **info):
        run_id = self.run_id(trial)
        ckpt = trial.checkpoint
        if ckpt is not None:
            with ckpt.as_directory() as d:
                router = Path(d) / MODEL_SUBDIR
                if router.is_dir():
                    self.client().log_artifacts(run_id, str(router), artifact_path="router")
        self.client().set_terminated(run_id, "FINISHED")

    def on_trial_error(self, iteration, trials, trial, **info):
        self.client().set_terminated(self.run_id(trial), "FAILED")


def _params(config: dict[str, Any]):
    from mlflow.entities import Param

    return [Param(k, str(v)[:6000]) for k, v in sorted(config.items())]


def mlflow_callback(cfg: R2VConfig, sweep_key: str):
    """The MLflowTrials callback as a tune.Callback, or None when tracking is off."""
    if not cfg.tracking.enabled:
        return None
    import mlflow

    from r2v.tracking import Tracker, tracking_uri

    Tracker(cfg)  # creates the experiment (artifacts under runs/<exp>/mlartifacts) when needed
    exp = mlflow.get_experiment_by_name(cfg.tracking.experiment_name)
    active = mlflow.active_run()
    return MLflowTrials(tracking_uri(cfg), exp.experiment_id, sweep_key, active.info.run_id if active else None)


# ----------------------------------------------------------------------------------------- the sweep
def run_sweep(cfg: R2VConfig, callbacks: list[Callback] | None = None) -> dict[str, Any]:
    """Run (or resume) the sweep; write frontier.parquet/png and best-<budget>.yaml. Returns a summary.
    `callbacks`: extra `tune.Callback`s for a fresh run (progress, alerts; the drills inject faults this way)."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    from r2v.ray_utils import init_ray, library_stdout

    check_sweep_config(cfg)
    data, labels = load_data(cfg)
    key = experiment_key(cfg)
    out = Experiment(cfg).sweep_dir.resolve()
    out.mkdir(parents=True, exist_ok=True)
    name = f"tune-{key}"
    # trials checkpoint (a few small files) every epoch so that a resumed trial loses at most one epoch;
    # with num_to_keep=1 that forces frequent experiment snapshots, which Tune would warn about each time
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    init_ray(cfg)
    trainable = tune.with_resources(
        tune.with_parameters(sweep_trial, data=data),
        {"cpu": float(cfg.sweep.cpus_per_trial), "gpu": float(cfg.sweep.gpus_per_trial)})
    path = out / name
    resumed = bool(cfg.sweep.resume and tune.Tuner.can_restore(str(path)))
    if resumed:
        print(f"[sweep] resuming the interrupted sweep in {path}")
        tuner = tune.Tuner.restore(str(path), trainable, resume_unfinished=True, resume_errored=True)
    else:
        if path.exists():
            shutil.rmtree(path)  # sweep.resume=false: start over
        first = current_point(cfg, labels)
        searcher = OptunaSearch(metric=[SUCCESS, RATE], mode=["max", "min"], seed=cfg.seed,
                                points_to_evaluate=[first] if first else None)
        scheduler = ASHAScheduler(time_attr="training_iteration", metric=ASHA_METRIC, mode="max",
                                  max_t=data.epochs, grace_period=max(1, min(cfg.sweep.grace_period, data.epochs)),
                                  reduction_factor=cfg.sweep.reduction_factor)
        callbacks = [c for c in [mlflow_callback(cfg, key), *(callbacks or [])] if c is not None]
        tuner = tune.Tuner(
            trainable,
            param_space=search_space(cfg, labels),
            tune_config=tune.TuneConfig(search_alg=searcher, scheduler=scheduler, num_samples=cfg.sweep.num_samples,
                                        max_concurrent_trials=max(1, cfg.sweep.max_concurrent)),
            run_config=tune.RunConfig(
                name=name, storage_path=str(out), verbose=0,
                failure_config=tune.FailureConfig(max_failures=cfg.sweep.max_failures),
                checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
                callbacks=callbacks or None))
    with library_stdout():  # Tune prints its banner and trial errors even at verbose=0
        results = tuner.fit()
    errors = [r for r in results if r.error is not None]
    finished = [r for r in results if r.error is None and r.checkpoint is not None]
    if errors or len(finished) < cfg.sweep.num_samples:
        raise R2VError(f"sweep interrupted: {len(finished)} of {cfg.sweep.num_samples} trials finished"
                       f"{f', {len(errors)} failed ({errors[0].error})' if errors else ''}; run `r2v sweep` again "
                       f"to resume (finished trials are kept, failed ones resume from their last checkpoint)")
    frame = frontier_frame(cfg, data, finished, out)
    if cfg.sweep.live and cfg.sweep.live_top_k > 0:
        frame = add_live_rows(cfg, frame)
    write_outputs(cfg, frame)
    best = {f"best_{b:g}": str(best_path(cfg, b)) for b in cfg.sweep.budgets if best_path(cfg, b).is_file()}
    val = frame[frame["source"] == "validation"]
    summary: dict[str, Any] = {"trials": len(finished), "resumed": resumed, "tune_dir": str(path),
                               "frontier": str(out / "frontier.parquet"), "pareto_points": int(val["pareto"].sum()),
                               "val_slm_success": data.steps.slm_success, **best}
    for b in cfg.sweep.budgets:
        row = pick_best(val, b)
        if row is not None:
            summary[f"val_success_offline_at_{b:g}"] = float(row["success"])
    live = frame[frame["source"] == "live"]
    if len(live):
        summary["live_points"] = len(live)
    return summary


# ----------------------------------------------------------------------------------------- frontier
def pareto_mask(success: Any, rate: Any) -> np.ndarray:
    """Non-dominated points: no other point has success ≥ and rate ≤ with one of them strict."""
    s, r = np.asarray(success, dtype=np.float64), np.asarray(rate, dtype=np.float64)
    keep = np.ones(s.size, dtype=bool)
    for i in range(s.size):
        dominated = (s >= s[i]) & (r <= r[i]) & ((s > s[i]) | (r < r[i]))
        keep[i] = not dominated.any()
    return keep


def frontier_frame(cfg: R2VConfig, data: SweepData, results, out: Path):
    """Rows from each trial's final router, re-scored on validation: its own threshold ("trial") and its
    scores re-thresholded to every sweep budget ("budget=<b>")."""
    import pandas as pd

    from r2v.router.model import RiskModel
    from r2v.router.thresholds import budget_threshold

    rows = []
    for res in results:
        tid = res.metrics["trial_id"]
        params = {k: res.config[k] for k in sorted(res.config)}
        rcfg = router_config(data.base, res.config, data.epochs)
        model_dir = out / "trials" / tid / MODEL_SUBDIR
        with res.checkpoint.as_directory() as d:
            if model_dir.exists():
                shutil.rmtree(model_dir)
            shutil.copytree(Path(d) / MODEL_SUBDIR, model_dir)
        model = RiskModel.load(model_dir)
        p = model.predict(data.steps.X)
        common = {"trial_id": tid, **params, "cost_llm": rcfg.cost_llm, "cost_slm": rcfg.cost_slm,
                  "epochs_trained": int(res.metrics.get("training_iteration", 0)), "model_dir": str(model_dir),
                  "source": "validation", "estimator": ESTIMATOR}
        points = [("trial", rcfg.threshold, rcfg.budget, float(model.threshold))]
        points += [(f"budget={b:g}", "budget", float(b), budget_threshold(p, b)) for b in data.budgets]
        for point, kind, budget, tau in points:
            est = data.steps.estimate_at(p, tau)
            rows.append({**common, "operating_point": point, "threshold": kind, "budget": budget, "tau": tau,
                         "success": est["success"], "llm_call_rate": est["llm_call_rate"],
                         "branch_hit_rate": est["branch_hit_rate"]})
    df = pd.DataFrame(rows)
    df["pareto"] = pareto_mask(df["success"], df["llm_call_rate"])
    return df


def pick_best(val, budget: float):
    """The validation row with the highest offline success among those with LLM-call rate ≤ budget
    (ties: lower rate, then trial id)."""
    ok = val[val["llm_call_rate"] <= budget + 1e-12]
    if ok.empty:
        return None
    return ok.sort_values(["success", "llm_call_rate", "trial_id"], ascending=[False, True, True]).iloc[0]


def write_best(cfg: R2VConfig, row, budget: float, live: dict[str, Any] | None = None) -> Path:
    """best-<budget>.yaml + best-<budget>/router (the trial's router with this point's τ: the live one when
    `live` holds its search record, else the offline step quantile)."""
    from omegaconf import OmegaConf

    from r2v.router.model import RiskModel

    model = RiskModel.load(row["model_dir"])
    model.threshold = float(live["tau"] if live else row["tau"])
    model.threshold_info = {"kind": str(row["threshold"]), "tau": model.threshold, "source": "sweep",
                            "val_rate": float(row["llm_call_rate"])}
    if live:
        model.threshold_info.update(kind="budget", live_rate=live["rate"], probes=live["probes"],
                                    calibrated_on=live["calibrated_on"])
        if "grace" in live:  # τ was searched without router.grace: the saved router routes so (R2VRouter.grace)
            model.threshold_info["grace"] = live["grace"]
    model_dir = model.save(Experiment(cfg).sweep_dir.resolve() / f"best-{budget:g}" / MODEL_SUBDIR)
    rcfg = router_config(cfg.router, {k: row[k] for k in ("alpha", "epsilon", "brier_weight", "label", "dual_lr",
                                                           "calibration", "threshold", "budget", "cost_ratio")},
                         int(cfg.sweep.epochs or cfg.router.epochs))
    doc = {
        "router": overrides(rcfg),
        "sweep_result": {
            "format": BEST_FORMAT, "budget": float(budget), "trial_id": str(row["trial_id"]),
            "operating_point": str(row["operating_point"]), "model_dir": str(model_dir), "threshold": model.threshold,
            "val_success_offline": float(row["success"]), "val_llm_call_rate": float(row["llm_call_rate"]),
            "estimator": ESTIMATOR, "experiment": cfg.experiment,
        },
    }
    if live:
        doc["sweep_result"].update(threshold_kind="live", val_llm_call_rate_live=float(live["rate"]),
                                   calibrated_on=live["calibrated_on"])
        if "grace" in live:  # as in the saved router: τ was searched without router.grace
            doc["sweep_result"]["grace"] = live["grace"]
    how = ("τ set live on the calibration games, success an offline estimate" if live
           else "OFFLINE ESTIMATE: τ is a step quantile, not a live rate")
    path = best_path(cfg, budget)
    path.write_text(f"# r2v sweep: best router at LLM-call budget {budget:g} (validation; {how}).\n"
                    f"# `router:` are config overrides; `sweep_result:` says which saved router to load.\n"
                    + OmegaConf.to_yaml(OmegaConf.create(doc)))
    return path


def load_best(path: str | Path) -> dict[str, Any]:
    """Read a best-<budget>.yaml. Returns {"overrides": ["router.alpha=…", …] (dotlist for load_config),
    "model_dir": the router to load (τ baked in), "threshold": τ, "budget", "meta": sweep_result}.

    Format (r2v-sweep-best@1): a YAML mapping with
      router:        the router.* config keys of the chosen point (label, alpha, epsilon, cost_llm, cost_slm,
                     brier_weight, dual_lr, calibration, threshold, budget, epochs): valid `router` overrides
      sweep_result:  format, budget, trial_id, operating_point, model_dir (absolute path of a RiskModel
                     directory whose router.json threshold = `threshold`), threshold (τ), val_success_offline,
                     val_llm_call_rate, estimator, experiment.
    `r2v eval`/`r2v serve` use it as: load_config(..., overrides=best["overrides"]) and
    make_router("r2v", model_dir=best["model_dir"]) (its threshold is already τ)."""
    from omegaconf import OmegaConf

    p = Path(path)
    if not p.is_file():
        raise R2VError(f"{p}: no sweep result here; run `r2v sweep` first")
    doc = OmegaConf.to_container(OmegaConf.load(p), resolve=True)
    meta = doc.get("sweep_result") if isinstance(doc, dict) else None
    if not isinstance(meta, dict) or meta.get("format") != BEST_FORMAT or "router" not in doc:
        raise R2VError(f"{p}: not an r2v sweep result ({BEST_FORMAT}); re-run `r2v sweep`")
    if not Path(meta["model_dir"]).is_dir():
        raise R2VError(f"{p}: its router {meta['model_dir']} is gone; re-run `r2v sweep`")
    dotlist = [f"router.{k}={json.dumps(v) if isinstance(v, (list, dict)) else v}" for k, v in doc["router"].items()]
    return {"overrides": dotlist, "model_dir": meta["model_dir"], "threshold": float(meta["threshold"]),
            "budget": float(meta["budget"]), "meta": meta}


def live_picks(cfg: R2VConfig, frame) -> list[dict[str, Any]]:
    """Up to sweep.live_top_k validation points to measure live: the best point at each budget first (what
    best-<budget>.yaml would deploy), then the other Pareto points by offline success."""
    val = frame[frame["source"] == "validation"]
    picks, seen = [], set()
    chosen = [pick_best(val, b) for b in cfg.sweep.budgets]
    chosen += [r for _, r in val[val["pareto"]].sort_values("success", ascending=False).iterrows()]
    for row in chosen:
        if row is None:
            continue
        k = (row["trial_id"], round(float(row["tau"]), 12))
        if k in seen:
            continue
        seen.add(k)
        picks.append(row)
        if len(picks) >= cfg.sweep.live_top_k:
            break
    return picks


def add_live_rows(cfg: R2VConfig, frame):
    """Play eval.split tasks live (under sweep.live_seeds) with each picked router on one worker pool,
    as `r2v eval` does, and append their measured success and LLM-call rate as source="live" rows."""
    import pandas as pd

    from r2v.data import ShardStore
    from r2v.eval.metrics import summarise_method
    from r2v.policies.slm import collection_slm
    from r2v.ray_utils import init_ray
    from r2v.rollout.engine import collect, plan_units
    from r2v.rollout.router_rows import RoutedAgentFactory
    from r2v.rollout.stage import routed_inputs, tasks_by_split
    from r2v.router.baselines import make_router

    picks = live_picks(cfg, frame)
    if not picks:
        return frame
    init_ray(cfg)
    tasks = tasks_by_split(cfg, [cfg.eval.split])
    if not tasks[cfg.eval.split]:
        raise R2VError(f"split `{cfg.eval.split}` has no tasks for the live re-evaluation; set sweep.live=false")
    model_dir = str(Experiment(cfg).deployed_policy_dir())
    episodes = Experiment(cfg).sweep_dir / "live" / "episodes"
    with collection_slm(cfg, model_dir) as server:
        factories, units, names = {}, [], []
        for row in picks:
            policy = f"sweep-{row['trial_id']}-t{float(row['tau']):.6f}"
            router = make_router("r2v", model_dir=str(row["model_dir"]), threshold=float(row["tau"]))
            factories[policy] = RoutedAgentFactory(model_dir, server, router, with_teacher=True, name=policy)
            units += plan_units(tasks, list(cfg.sweep.live_seeds), 1, policy)
            names.append(policy)
        print(f"[sweep] live re-evaluation: {len(picks)} points x {len(units) // len(picks)} episodes on "
              f"{cfg.eval.split}")
        collect(cfg, units, factories, episodes, inputs=routed_inputs(cfg, model_dir))
    df = ShardStore(episodes, "steps").read_pandas()
    rows = []
    for policy, row in zip(names, picks):
        part = df[df["policy"] == policy]
        m = summarise_method(part, c_slm=float(row["cost_slm"]), c_llm=float(row["cost_llm"]),
                             n_boot=cfg.eval.bootstrap_samples, seed=cfg.seed)
        rows.append({**row.to_dict(), "source": "live", "success": m["success"], "llm_call_rate": m["llm_call_rate"],
                     "estimator": f"live ({cfg.eval.split}, seeds {list(cfg.sweep.live_seeds)})",
                     "live_success_ci_lo": m["success_ci"][0], "live_success_ci_hi": m["success_ci"][1],
                     "live_episodes": m["n_episodes"]})
    live = pd.DataFrame(rows)
    live["pareto"] = pareto_mask(live["success"], live["llm_call_rate"])
    return pd.concat([frame, live], ignore_index=True)


def write_outputs(cfg: R2VConfig, frame) -> None:
    out = Experiment(cfg).sweep_dir
    frame.to_parquet(out / "frontier.parquet", index=False)
    plot_frontier(frame, out / "frontier.png")
    val = frame[frame["source"] == "validation"]
    best = {float(b): row for b in cfg.sweep.budgets if (row := pick_best(val, float(b))) is not None}
    live = live_taus(cfg, best) if cfg.sweep.live_threshold else {}
    for b, row in best.items():
        write_best(cfg, row, b, live.get(b))


def live_taus(cfg: R2VConfig, best: dict[float, Any]) -> dict[float, dict[str, Any]]:
    """Each budget's best router set to escalate that budget's share of *live* steps on the calibration games,
    all budgets in one batched search (r2v.rollout.live_budget); {budget: the search record}."""
    from r2v.rollout.live_budget import calibrate_live
    from r2v.router.baselines import make_router
    from r2v.router.stage import read_router_rows, router_part, step_features

    if not best:
        return {}
    X = step_features(router_part(cfg, read_router_rows(cfg), "calibration"))
    routers = {f"best@{b:g}": make_router("r2v", model_dir=str(row["model_dir"]), threshold=float(row["tau"]))
               for b, row in best.items()}
    p_offline = {name: r.model.predict(X) for name, r in routers.items()}
    found = calibrate_live(cfg, routers, {f"best@{b:g}": b for b in best}, p_offline)
    return {b: found[f"best@{b:g}"] for b in best}


def plot_frontier(frame, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.2))
    val = frame[frame["source"] == "validation"]
    ax.scatter(val["llm_call_rate"], val["success"], s=12, c="0.7", label="trials (validation, offline estimate)")
    front = val[val["pareto"]].sort_values("llm_call_rate")
    ax.plot(front["llm_call_rate"], front["success"], "o-", c="tab:blue", ms=5,
            label="Pareto front (validation, offline estimate)")
    live = frame[frame["source"] == "live"]
    if len(live):
        ax.scatter(live["llm_call_rate"], live["success"], marker="*", s=120, c="tab:red", zorder=3,
                   label="re-measured live (held-out tasks)")
    ax.set_xlabel("LLM-call rate (share of steps escalated)")
    ax.set_ylabel("episode success")
    ax.set_title("router sweep: success vs LLM calls")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


__all__ = ["run_sweep", "load_best", "pareto_mask", "best_path", "search_space", "frontier_frame",
           "pick_best", "plot_frontier", "MLflowTrials", "SUCCESS", "RATE", "ASHA_METRIC", "BEST_FORMAT"]

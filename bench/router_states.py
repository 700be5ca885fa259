"""The router fitted on the states routed episodes visit: does it route better than one fitted on the SLM's own?

    python -m bench.router_states [--exp quickstart] [--config conf/<exp>.yaml] [--runs-dir runs]

`collect-router` labels the steps of the SLM playing alone; once a router escalates, its episodes go elsewhere
(after a correction the SLM is back on the teacher's path, and most departures from there are recoverable).
This bench plays the hindsight oracle (`HindsightRouter`: it escalates exactly where the SLM's proposal departs
from the teacher's and the SLM alone loses from here) on the validation games under `router.rollout_seeds`,
and makes each of its steps a router row whose `critical` label is the oracle's decision: the same label
definition as the SLM rows, on the states of a router that escalates exactly right. It also labels R2V's own
routed episodes the same way (DAgger's remedy: the learner's own states, the expert's label): train-router's
live budget search played the run's router and its cross-fitted twin on the val games at every τ it probed, and
each of those steps becomes a row whose `critical` label is what the hindsight oracle would decide there (a
counterfactual branch of the SLM alone, `Lookahead`, played in this process). Then, for the run's own router
recipe fitted on SLM rows, on hindsight rows, on R2V's routed rows, or on SLM rows plus either:
1. offline, out-of-game AUROC of the critical label on each kind of state (each game scored by the model of the
   cross-fitted pair that did not fit it, as train-router cross-fits);
2. live, on the validation games, each trained as `bench.router_recipes` trains a recipe (`r2v train-router` in a
   scratch copy of the run, the extra rows added to its router rows): success @ live LLM calls/step per
   budget. Test games are never played. Needs a run with `router.label=critical` (the quickstart's).
Writes runs/bench/router_states.json.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bench import MISSING_INPUT, write_result
from bench.router_recipes import points, points_line, run_parser, train_recipe

SOURCES = {"SLM rows (the run's recipe)": ("slm",), "hindsight rows": ("hindsight",),
           "SLM + hindsight rows": ("slm", "hindsight"), "R2V's routed rows": ("routed",),
           "SLM + R2V's routed rows": ("slm", "routed")}
STATES = {"hindsight": "the hindsight oracle's", "slm": "the SLM's", "routed": "R2V's routed"}  # kinds of state


def play_hindsight(cfg, episodes_dir: Path):
    """The hindsight oracle's episodes on the val games under router.rollout_seeds (resumable shards)."""
    from r2v.data import ShardStore
    from r2v.experiment import Experiment
    from r2v.policies.slm import collection_slm
    from r2v.ray_utils import init_ray
    from r2v.rollout.engine import collect, of_units, plan_units
    from r2v.rollout.router_rows import RoutedAgentFactory
    from r2v.rollout.stage import collection_inputs, tasks_by_split
    from r2v.router.baselines import make_router

    init_ray(cfg)
    model_dir = str(Experiment(cfg).deployed_policy_dir())
    units = plan_units(tasks_by_split(cfg, ["val"]), list(cfg.router.rollout_seeds), 1, "routed-hindsight")
    with collection_slm(cfg, model_dir) as server:
        factory = RoutedAgentFactory(model_dir, server, make_router("hindsight"), name="routed-hindsight")
        collect(cfg, units, factory, episodes_dir,
                inputs=collection_inputs(cfg, ("env", "policy", "verifier", "teacher"), (model_dir,)))
    return of_units(ShardStore(episodes_dir, "steps").read_pandas(), units)


def state_rows(steps, critical, departs=None) -> list[dict[str, Any]]:
    """Router rows of routed steps, each with its `critical` label (the hindsight oracle's decision there) and, where
    known, its step label (`departs`: the proposal departs from the teacher's action); the other labels are about
    the SLM's own episodes and stay empty."""
    from r2v.router.features import FEATURE_VERSION

    return [{"experiment": r.experiment, "env": r.env, "task_id": r.task_id, "split": r.split,
             "episode_id": r.episode_id, "perturbation_seed": int(r.perturbation_seed), "step": int(r.step),
             "features": list(r.features), "feature_spec": FEATURE_VERSION, "episode_failed": None,
             "branch_label": None, "slm_branch_success": None, "teacher_branch_success": None,
             "step_label": None if step is None else bool(step), "critical_label": bool(label), "label_weight": None}
            for r, label, step in zip(steps.itertuples(index=False), critical, departs or [None] * len(steps))]


def hindsight_rows(steps) -> list[dict[str, Any]]:
    """Router rows of the oracle's own steps: its decision (risk 1 = escalated) is the critical label."""
    return state_rows(steps, steps["risk"] >= 0.5)


def routed_probes(cfg):
    """R2V's routed episodes of train-router's live budget search, in step order: the run's router (on its
    calibration games) and its cross-fitted twin (on the fit games) at every τ the search probed."""
    from r2v.data import ShardStore
    from r2v.experiment import Experiment
    from r2v.rollout.live_budget import probes_dir, router_identity
    from r2v.router.baselines import make_router

    router = make_router("r2v", model_dir=str(Experiment(cfg).model("router")))  # with its twin, if saved
    names = tuple(f"{r.name}#{router_identity(r)}~" for r in (router, router.twin) if r is not None)  # routing_name
    steps = ShardStore(probes_dir(cfg), "steps").read_pandas()
    return steps[steps["policy"].str.startswith(names)].sort_values(["episode_id", "step"], kind="stable")


def hindsight_labels(cfg, steps) -> tuple[list[bool], list[bool]]:
    """(the hindsight oracle's decision, whether the proposal departs) at each step of `steps` (routed val
    episodes in step order). The oracle escalates where the proposal (the first candidate) departs from the env's
    reference action, which is the teacher's (the oracle teacher the critical label assumes), and the SLM alone,
    taking over at this state, loses. A `Lookahead` branch in this process shows it; one branch serves an episode
    until an escalation leaves its path."""
    from tqdm.auto import tqdm

    from r2v.envs.registry import make_env
    from r2v.experiment import Experiment
    from r2v.policies.routed import RoutedAgent
    from r2v.policies.slm import SLMPolicy
    from r2v.rollout.episode import Lookahead
    from r2v.rollout.stage import tasks_by_split
    from r2v.router.baselines import make_router
    from r2v.verifier import make_verifier

    slm = SLMPolicy(str(Experiment(cfg).deployed_policy_dir()), cfg.model, cfg.policy)
    alone = RoutedAgent(slm, make_verifier(cfg), make_router("slm_only"), None, cfg.policy.select, name="slm")
    lookahead = Lookahead(make_env(cfg.env), alone, cfg.env.max_steps, cfg.policy.history_steps)
    tasks = {t.task_id: t for t in tasks_by_split(cfg, ["val"])["val"]}
    labels: list[bool] = []
    departures: list[bool] = []
    episodes = steps.groupby("episode_id", sort=False)
    for _, episode in tqdm(episodes, total=episodes.ngroups, desc="hindsight labels", unit="ep"):
        executed: list[str] = []
        for r in episode.itertuples(index=False):
            departs = bool(r.oracle_action) and r.candidates[0]["text"] != r.oracle_action
            labels.append(departs and not lookahead.wins_from(tasks[r.task_id], int(r.perturbation_seed), executed))
            departures.append(departs)
            executed.append(r.action)
    return labels, departures


def slm_part(slm, sources: tuple[str, ...]):
    """The SLM rows a recipe reads: without their label when they are not one of its sources (they keep their
    features, which train-router's offline start reads)."""
    return slm if "slm" in sources else slm.assign(critical_label=None)


def rows_of(slm, others: dict[str, Any], sources: tuple[str, ...]):
    """The rows a recipe learns from: the SLM rows (labelled only when "slm" is a source) plus the rows of each
    other source it names (`others`: source → rows)."""
    import pandas as pd

    return pd.concat([slm_part(slm, sources)] + [others[s] for s in sources if s != "slm"], ignore_index=True)


def offline(cfg, slm, others: dict[str, Any]) -> list[dict[str, Any]]:
    """Out-of-game AUROC on each kind of state (STATES), of each source, cross-fitted over the val halves."""
    import numpy as np

    from r2v.eval.metrics import auroc
    from r2v.router.model import RiskModel, RouterData
    from r2v.router.stage import router_part

    data = lambda df: RouterData.from_frame(df, "critical", source="critical rows")  # noqa: E731
    out = []
    for name, sources in SOURCES.items():
        rows = rows_of(slm, others, sources)
        fit, cal = router_part(cfg, rows, "fit"), router_part(cfg, rows, "calibration")
        frames = {"slm": slm, **others}  # each kind of state the fits are scored on
        scores: dict[str, tuple[list, list]] = {kind: ([], []) for kind in frames}
        for a, b in ((fit, cal), (cal, fit)):  # fitted on one half, scored on the other's games
            model = RiskModel(cfg=cfg.router)
            model.fit(data(a), data(b), cfg.router, seed=cfg.seed)
            games = set(b["task_id"])
            for kind, frame in frames.items():
                held = data(frame[frame["task_id"].isin(games)])
                scores[kind][0].append(model.predict(held.X))
                scores[kind][1].append(held.y)
        out.append({"rows": name, **{f"auroc_{kind}": float(auroc(np.concatenate(p), np.concatenate(y)))
                                     for kind, (p, y) in scores.items()}})
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = run_parser(__doc__)
    ap.add_argument("--out", default="runs/bench/router_states.json")
    args = ap.parse_args(argv)
    args.config = args.config or f"conf/{args.exp}.yaml"
    import pandas as pd

    from r2v.config import load_config
    from r2v.data import ShardStore
    from r2v.experiment import Experiment
    from r2v.router.stage import read_router_rows

    cfg = load_config(args.config, [f"experiment={args.exp}", f"runs_dir={args.runs_dir}"])
    if not (Experiment(cfg).model("router") / "router.json").is_file():
        print(f"no trained router in {Experiment(cfg).model('router')}: run the pipeline first "
              f"(.venv/bin/r2v run --config {args.config} --until train-router)")
        return {"status": "missing"}
    if cfg.router.label != "critical":
        raise SystemExit(f"{args.config}: router.label is {cfg.router.label!r}; the hindsight oracle's decisions are "
                         "the `critical` label, so this comparison needs a run fitted on it")
    slm = read_router_rows(cfg)
    slm = slm[slm["split"] == "val"].drop(columns=["schema_version"], errors="ignore")
    scratch = Path(args.runs_dir) / "_recipes" / f"{args.exp}-hindsight-states"
    steps = play_hindsight(cfg, scratch / "episodes")
    hindsight = pd.DataFrame(hindsight_rows(steps))
    print(f"[router_states] hindsight oracle on the val games: {len(hindsight)} steps, "
          f"{hindsight['critical_label'].mean():.3f} escalated, success {steps.groupby('episode_id')['episode_success'].last().mean():.3f}")
    probes = routed_probes(cfg)
    routed = pd.DataFrame(state_rows(probes, *hindsight_labels(cfg, probes)))
    fatal = float(routed.loc[routed["step_label"], "critical_label"].mean())
    print(f"[router_states] R2V's routed episodes on the val games: {len(routed)} steps of "
          f"{probes['episode_id'].nunique()} episodes, {routed['critical_label'].mean():.3f} would be escalated by "
          f"the hindsight oracle ({fatal:.3f} of the {int(routed['step_label'].sum())} departures)")
    others = {"hindsight": hindsight, "routed": routed}
    table = offline(cfg, slm, others)

    def inject(sources):
        def prepare(copy: Path) -> None:
            store = ShardStore(copy / "router", "router_rows")
            store.write("split=val", slm_part(slm, sources).to_dict("records"))
            for source in (s for s in sources if s != "slm"):  # each other source in a shard of its own
                store.write(f"split=val-{source}", others[source].to_dict("records"))
        return prepare

    live = []
    for name, sources in SOURCES.items():
        if sources == ("slm",):  # the run's own router: its live search is in its router.json
            meta = json.loads((Experiment(cfg).model("router") / "router.json").read_text())
            live.append({"recipe": name, "status": "ok", "architecture": meta.get("architecture"),
                         "points": points(meta)})
            continue
        live.append(train_recipe(args, f"fit on {name}", [], prepare=inject(sources)))
    for row in table:
        print(f"{row['rows']:<32} AUROC on " + ", ".join(f"{STATES[k]} states {row['auroc_' + k]:.3f}" for k in STATES))
    for r in live:
        print(f"{r['recipe']:<40}{points_line(r.get('points', []))}")
    return write_result(args.out, {"status": "ok", "experiment": args.exp, "config": args.config,
                                   "hindsight_steps": len(hindsight),
                                   "hindsight_escalated": float(hindsight["critical_label"].mean()),
                                   "routed_episodes": int(probes["episode_id"].nunique()), "routed_steps": len(routed),
                                   "routed_positive": float(routed["critical_label"].mean()),
                                   "routed_departures": int(routed["step_label"].sum()),
                                   "routed_departures_positive": fatal,
                                   "offline": table, "live": live})


if __name__ == "__main__":
    raise SystemExit(MISSING_INPUT if main().get("status") == "missing" else 0)

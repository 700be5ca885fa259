"""Rollout scaling: steps/s with 1 vs 2 env-worker actors on TextWorld, env-bound and SLM-bound, and where the SLM runs.

    python -m bench.rollout_scaling [--games 4 --seeds 4 --levels 5,6,7,8 --min-seconds 30 --slm-size 20m]

Three cases, each with 1 and then 2 workers: the oracle teacher (env-bound: no model, scales with cores); the
SLM (`--slm-size`, built locally) on one shared `SLMServer` actor that batches every worker's steps into one padded
forward, so it scales only as far as that actor keeps up (SLM-bound; `ray.slm_server=shared`); and the same SLM as
one copy per worker (`slm_copies`, what `ray.slm_server=auto` does on CPU). A point re-collects the same episodes into
fresh shard dirs (nothing skipped) round after round until `--min-seconds` of collection have passed, so its
steps/s is a steady-state rate, not one dominated by a round's start and tail. Writes runs/bench/rollout_scaling.json.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path


def main(argv: list[str] | None = None) -> dict:
    from bench.serve_latency import SIZES

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--games", type=int, default=4, help="games per level")
    ap.add_argument("--levels", default="5,6,7,8")
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--min-seconds", type=float, default=30.0, help="collection time per point (steady state)")
    ap.add_argument("--slm-size", choices=list(SIZES), default="20m", help="the SLM-bound case's model")
    ap.add_argument("--out", default="runs/bench/rollout_scaling.json")
    args = ap.parse_args(argv)

    import ray

    from r2v.config import R2VConfig, TinyModelConfig
    from r2v.envs.registry import load_tasks
    from r2v.policies.init_model import save_tiny_model
    from r2v.policies.slm import SLMAgentFactory, start_slm_server
    from r2v.rollout.engine import collect, plan_units
    from r2v.rollout.stage import teacher_agent

    policies = ("oracle", "slm", "slm_copies")

    tmp = Path(tempfile.mkdtemp(prefix="r2v-bench-"))
    cfg = R2VConfig(experiment="bench", runs_dir=str(tmp))
    cfg.tracking.enabled = False
    cfg.env.textworld.levels = [int(x) for x in args.levels.split(",")]
    cfg.env.textworld.games_per_level = args.games
    cfg.env.textworld.cache_dir = "runs/_cache/textworld"
    cfg.collect.cpus_per_worker = 1.0
    load_start = os.getloadavg()
    ray.init(num_cpus=2, include_dashboard=False)
    tasks = load_tasks(cfg.env)
    units = lambda policy: plan_units({"train": tasks}, list(range(args.seeds)), 1, policy)  # noqa: E731
    model_dir = tmp / "slm"
    built = save_tiny_model([t.goal for t in tasks] * 4, TinyModelConfig(**SIZES[args.slm_size]), model_dir,
                            max(512, cfg.model.max_context_tokens))
    cfg.model.path = str(model_dir)

    rows = []
    for policy in policies:
        server = start_slm_server(cfg, str(model_dir), 2) if policy == "slm" else None
        agents = teacher_agent if policy == "oracle" else SLMAgentFactory(str(model_dir), server)
        for workers in (1, 2):
            cfg.collect.num_workers = workers
            episodes = steps = rounds = 0
            wall = 0.0
            while wall < args.min_seconds:  # actor start-up is not timed by collect; every round is
                s = collect(cfg, units(policy), agents, tmp / f"{policy}-{workers}-{rounds}", progress=False)
                episodes, steps, rounds = episodes + s["episodes_run"], steps + s["steps"], rounds + 1
                wall += s["wall_s"]
            rows.append({"policy": policy, "workers": workers, "rounds": rounds, "episodes": episodes, "steps": steps,
                         "wall_s": round(wall, 2), "steps_per_s": round(steps / wall, 2)})
            print(rows[-1], flush=True)
        if server is not None:
            ray.get(server.batch_sizes.remote())  # the server served every round (raises if it died)
            ray.kill(server)
    ray.shutdown()
    rate = {(r["policy"], r["workers"]): r["steps_per_s"] for r in rows}
    ratios = {p: rate[p, 2] / max(1e-9, rate[p, 1]) for p in policies}
    copies_vs_shared = rate["slm_copies", 2] / max(1e-9, rate["slm", 2])
    print(f"SLM: {args.slm_size} ({built['params'] / 1e6:.1f}M parameters); load average "
          f"{load_start[0]:.1f} -> {os.getloadavg()[0]:.1f}")
    print(f"{'policy':<8}{'workers':>8}{'rounds':>8}{'episodes':>10}{'steps':>8}{'wall s':>9}{'steps/s':>10}")
    for r in rows:
        print(f"{r['policy']:<8}{r['workers']:>8}{r['rounds']:>8}{r['episodes']:>10}{r['steps']:>8}{r['wall_s']:>9}"
              f"{r['steps_per_s']:>10}")
    for p, ratio in ratios.items():
        print(f"scaling 2 vs 1 workers, {p}: {ratio:.2f}x" + ("  (target >= 1.7x)" if p == "oracle" else ""))
    print(f"2 workers, a copy each vs one shared actor: {copies_vs_shared:.2f}x")
    result = {"rows": rows, "ratio_2v1": ratios, "copies_vs_shared_2_workers": copies_vs_shared,
              "levels": cfg.env.textworld.levels, "seeds": args.seeds,
              "min_seconds": args.min_seconds, "slm": {"size": args.slm_size, "params": built["params"]},
              "loadavg": [load_start[0], os.getloadavg()[0]]}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()

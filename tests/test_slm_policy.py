"""The SLM policy on a real (tiny) HF directory: K candidates, finite log-probs and entropy, batching."""
import math

import pytest

from r2v.config import ModelConfig, PolicyConfig, TinyModelConfig
from r2v.envs.registry import make_env
from r2v.errors import R2VError
from r2v.policies.base import StepContext
from r2v.policies.init_model import save_tiny_model
from r2v.policies.slm import SLMAgent, SLMPolicy, SLMServer
from r2v.rollout.episode import EpisodeMeta, run_episode


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny_slm")
    texts = [f"Goal: take the key\nObservation: room {i}\nAction: go north" for i in range(50)]
    save_tiny_model(texts, TinyModelConfig(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2,
                                           vocab_size=300), out, 256)
    return out


def contexts(env_cfg, tasks, n):
    env = make_env(env_cfg)
    out = []
    for t in tasks[:n]:
        out.append(StepContext(t, env.reset(t, seed=0), [], 0, 30))
    return out


@pytest.mark.parametrize("mode", ["rank", "generate"])
def test_batch_of_states_gives_k_candidates_with_finite_scores(tiny_dir, tw_cfg, tw_tasks, mode):
    k = 3
    policy = SLMPolicy(tiny_dir, ModelConfig(max_context_tokens=256),
                       PolicyConfig(mode=mode, num_candidates=k, max_new_tokens=8))
    ctxs = contexts(tw_cfg, tw_tasks, 4)
    decisions = policy.act(ctxs)
    assert len(decisions) == 4
    for ctx, d in zip(ctxs, decisions):
        assert 1 <= len(d.candidates) <= k
        assert all(math.isfinite(c.logprob) and math.isfinite(c.mean_logprob) for c in d.candidates)
        assert math.isfinite(d.entropy) and d.entropy >= 0
        assert d.action == d.candidates[0].text  # the best-scored candidate acts
        if mode == "rank":
            assert d.action in ctx.observation.admissible
            assert [c.logprob for c in d.candidates] == sorted((c.logprob for c in d.candidates), reverse=True)


def test_scores_are_consistent_between_batched_and_single(tiny_dir):
    policy = SLMPolicy(tiny_dir, ModelConfig(max_context_tokens=256), PolicyConfig())
    prompts = ["Goal: a\nObservation: b\nAction:", "Goal: a much longer goal text here\nObservation: x\nAction:"]
    comps = [" go north", " take key"]
    batched = policy.score(prompts, comps)
    single = [policy.score([p], [c])[0] for p, c in zip(prompts, comps)]
    flat = lambda pairs: [x for pair in pairs for x in pair]  # noqa: E731
    assert flat(batched) == pytest.approx(flat(single), rel=1e-4, abs=1e-4)


def test_slm_plays_an_episode_and_the_env_decides(tiny_dir, tw_cfg, tw_tasks):
    policy = SLMPolicy(tiny_dir, ModelConfig(max_context_tokens=256), PolicyConfig(mode="rank"))
    rows = run_episode(make_env(tw_cfg), SLMAgent(policy), tw_tasks[0], EpisodeMeta("e", "test", "slm", 0), 8)
    assert 1 <= len(rows) <= 8
    assert all(r["actor"] == "slm" and r["candidates"] for r in rows)
    assert rows[-1]["episode_success"] == (rows[-1]["done"] and rows[-1]["reward"] > 0) or len(rows) == 8


def test_server_batches_concurrent_callers(tiny_dir, tw_cfg, tw_tasks):
    import threading

    server = SLMServer(str(tiny_dir), ModelConfig(max_context_tokens=256), PolicyConfig(), max_wait_s=0.05)
    ctxs = contexts(tw_cfg, tw_tasks, 6)
    results = [None] * 6
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, server.act([ctxs[i]])[0]))
               for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(r is not None and r.action for r in results)
    assert max(server.batch_sizes()) > 1  # callers were served together


def test_missing_model_dir_is_a_clear_error(tmp_path):
    with pytest.raises(R2VError, match="not a Hugging Face model directory"):
        SLMPolicy(tmp_path / "nope", ModelConfig(), PolicyConfig())


def test_shared_prefix_scores_equal_full_encoding(tiny_dir, monkeypatch):
    """Rank mode encodes the prompt once and scores every action from its KV cache: same numbers as
    encoding each (prompt, action) in full, including actions of different token lengths."""
    policy = SLMPolicy(tiny_dir, ModelConfig(max_context_tokens=256), PolicyConfig())
    prompt = "Goal: take the key\nRecent: go north | go south\nObservation: room 7, a key is here\nAction:"
    comps = [" go north", " take key", " open the wooden chest with the key", " look"]
    full = policy.score([prompt] * len(comps), comps)
    monkeypatch.setattr(policy, "score", None)  # the shared path must not fall back to full encoding
    shared = policy.score_actions(prompt, comps)
    flat = lambda pairs: [x for pair in pairs for x in pair]  # noqa: E731
    assert flat(shared) == pytest.approx(flat(full), rel=1e-4, abs=1e-4)
    assert len({s for s, _ in shared}) == len(comps)  # distinct actions, distinct scores: nothing collapsed


def test_length_buckets_sort_and_respect_the_budget():
    from r2v.policies.slm import length_buckets

    lengths, rows = [50, 10, 30, 10, 200, 40], [2, 1, 3, 1, 1, 2]
    groups = length_buckets(lengths, rows, budget=120)
    assert sorted(i for g in groups for i in g) == list(range(6))
    flat = [lengths[i] for g in groups for i in g]
    assert flat == sorted(flat)  # similar lengths batched together
    for g in groups:
        assert len(g) == 1 or sum(rows[i] for i in g) * max(lengths[i] for i in g) <= 120


@pytest.mark.parametrize("budget", [None, 64])  # one bucket; many small buckets
def test_batched_rank_equals_one_by_one(tiny_dir, tw_cfg, tw_tasks, monkeypatch, budget):
    """One padded pass over many states (bucketed by length, prefixes right-padded, continuations over each
    prefix's cache) gives the numbers of acting on each state alone."""
    import r2v.policies.slm as slm

    monkeypatch.setattr(slm, "BATCH_TOKENS", budget or slm.BATCH_TOKENS)
    policy = SLMPolicy(tiny_dir, ModelConfig(max_context_tokens=256), PolicyConfig(mode="rank", num_candidates=8))
    env = make_env(tw_cfg)
    ctxs = contexts(tw_cfg, tw_tasks, 4)
    ctxs.append(StepContext(tw_tasks[0], env.reset(tw_tasks[0], seed=1), [("go north", "x " * 40)] * 3, 3, 30))
    batched = policy.act(ctxs)
    for ctx, b in zip(ctxs, batched):
        alone = policy.act([ctx])[0]
        assert b.action == alone.action
        assert [c.text for c in b.candidates] == [c.text for c in alone.candidates]
        assert [(c.logprob, c.mean_logprob) for c in b.candidates] == [
            (pytest.approx(c.logprob, abs=1e-4), pytest.approx(c.mean_logprob, abs=1e-4)) for c in alone.candidates]
        assert b.entropy == pytest.approx(alone.entropy, abs=1e-4)


def test_batched_action_scores_equal_full_encoding(tiny_dir):
    """score_actions_many over prompts of different lengths and action counts = `score` one pair at a time."""
    policy = SLMPolicy(tiny_dir, ModelConfig(max_context_tokens=256), PolicyConfig())
    prompts = ["Goal: a\nAction:", "Goal: take the key\nRecent: go north | go south\nObservation: room 7, "
               "a key is here and a long corridor leads east\nAction:", "Goal: b\nObservation: c\nAction:"]
    comps = [[" go north", " look"], [" take key", " open the wooden chest with the key", " go east"], [" x"]]
    batched = policy.score_actions_many(prompts, comps)
    single = [[policy.score([p], [c])[0] for c in cs] for p, cs in zip(prompts, comps)]
    flat = lambda rows: [x for row in rows for pair in row for x in pair]  # noqa: E731
    assert flat(batched) == pytest.approx(flat(single), rel=1e-4, abs=1e-4)


def test_greedy_generation_is_the_same_batched_or_alone(tiny_dir, tw_cfg, tw_tasks):
    policy = SLMPolicy(tiny_dir, ModelConfig(max_context_tokens=256),
                       PolicyConfig(mode="generate", temperature=0.0, num_candidates=2, max_new_tokens=6))
    ctxs = contexts(tw_cfg, tw_tasks, 4)
    batched = policy.act(ctxs)
    for ctx, b in zip(ctxs, batched):
        alone = policy.act([ctx])[0]
        assert b.action == alone.action
        assert b.candidates[0].logprob == pytest.approx(alone.candidates[0].logprob, abs=1e-4)


def test_batcher_survives_a_caller_that_left(tiny_dir, tw_cfg, tw_tasks):
    """A cancelled request (a Serve client that disconnected) is dropped, and the batcher keeps serving."""
    from r2v.policies.slm import SLMBatcher

    policy = SLMPolicy(tiny_dir, ModelConfig(max_context_tokens=256), PolicyConfig())
    batcher = SLMBatcher(policy, max_wait_s=0.2)
    ctxs = contexts(tw_cfg, tw_tasks, 2)
    gone, kept = batcher.submit(ctxs)
    assert gone.cancel()
    assert kept.result(timeout=60).action
    assert batcher.act(ctxs[1:])[0].action == kept.result().action


def test_batch_invariant_scores_do_not_depend_on_company(tiny_dir, tw_cfg, tw_tasks):
    """`policy.batch_invariant`: a state's numbers are bit-identical whichever states share its call, which is
    what makes a re-run of a pipeline bit-identical (plain batching moves them by ~1e-5)."""
    env = make_env(tw_cfg)
    ctxs = contexts(tw_cfg, tw_tasks, 4)
    ctxs.append(StepContext(tw_tasks[0], env.reset(tw_tasks[0], seed=1), [("go north", "x " * 40)] * 3, 3, 30))

    def numbers(policy, batch):
        return [(d.action, d.entropy, [(c.text, c.logprob, c.mean_logprob) for c in d.candidates])
                for d in policy.act(batch)]

    cfg = ModelConfig(max_context_tokens=256)
    plain = SLMPolicy(tiny_dir, cfg, PolicyConfig(mode="rank", num_candidates=8))
    alone = [numbers(plain, [c])[0] for c in ctxs]
    assert numbers(plain, ctxs) != alone  # the hazard is real on this model: company moves the last bits
    invariant = SLMPolicy(tiny_dir, cfg, PolicyConfig(mode="rank", num_candidates=8, batch_invariant=True))
    assert numbers(invariant, ctxs) == alone
    assert numbers(invariant, ctxs[::-1]) == alone[::-1]
    assert numbers(invariant, ctxs[1:3]) == alone[1:3]


@pytest.mark.ray
def test_collection_slm_copies_the_model_per_worker_on_cpu_or_shares_one_actor_with_the_same_episodes(
        ray_local, tiny_dir, tw_cfg, tw_tasks, tmp_path):
    """`ray.slm_server`: "auto" without a GPU gives each env worker its own copy (no actor); "shared" serves every
    worker from one actor, gone once the collection ends. With `policy.batch_invariant` (the quickstarts'), both play
    the same episodes to the last bit of every score: the actor's company in a batch changes nothing."""
    import copy

    from r2v.config import R2VConfig
    from r2v.data import ShardStore
    from r2v.policies.slm import SLMAgentFactory, collection_slm
    from r2v.rollout.engine import collect, plan_units

    cfg = R2VConfig(experiment="slm-placement", runs_dir=str(tmp_path))
    cfg.env, cfg.tracking.enabled, cfg.collect.cpus_per_worker = copy.deepcopy(tw_cfg), False, 0.5
    cfg.model.max_context_tokens, cfg.policy.batch_invariant = 256, True
    units = plan_units({"val": tw_tasks[:3]}, [0, 1], 1, "slm")
    columns = ["episode_id", "step", "action", "entropy", "candidates", "episode_success"]
    played = {}
    for mode in ("auto", "shared"):
        cfg.ray.slm_server = mode
        with collection_slm(cfg, str(tiny_dir)) as server:
            assert (server is None) == (mode == "auto")
            collect(cfg, units, SLMAgentFactory(str(tiny_dir), server), tmp_path / mode, progress=False)
        played[mode] = ShardStore(tmp_path / mode, "steps").read_pandas(columns).sort_values(["episode_id", "step"])
    auto, shared = (played[m].reset_index(drop=True) for m in ("auto", "shared"))
    assert len(auto) >= len(units)
    assert auto.to_json(double_precision=15) == shared.to_json(double_precision=15)
    with pytest.raises(ray_local.exceptions.RayActorError):
        ray_local.get(server.act.remote([]), timeout=60)

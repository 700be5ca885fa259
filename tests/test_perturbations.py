"""Perturbation wrappers: determinism, each family's effect at rate 1, and pass-through of the oracle."""
from __future__ import annotations

import random

import pytest

from r2v.config import PerturbationConfig
from r2v.envs.base import Observation, StepResult, Task
from r2v.envs.perturbations import DEFAULT_FLAVOUR, MASK, PerturbedEnv, wrap_with_perturbations
from r2v.errors import ConfigError

FAMILIES = ("tool_flakiness", "partial_observability", "prompt_injection", "distractors")


def only(family: str, rate: float = 1.0, **kw) -> PerturbationConfig:
    return PerturbationConfig(**{family: rate}, **kw)


class CounterEnv:
    """A tiny env without an action set: `add N` adds N; reaching 3 wins. Shows the wrapper is generic."""

    name = "counter"
    max_steps = 8

    def reset(self, task: Task, seed: int = 0) -> Observation:
        self.total, self.t = 0, 0
        return Observation(goal="reach 3", text="The counter reads 0.\nUse add N to add N.")

    def step(self, action: str) -> StepResult:
        self.t += 1
        if action.startswith("add "):
            self.total += int(action.split()[1])
        won = self.total == 3
        obs = Observation(goal="reach 3", text=f"The counter reads {self.total}.\nUse add N to add N.")
        return StepResult(obs, float(won), won or self.t >= self.max_steps, won, {"tool_failed": False})

    def oracle_action(self) -> str:
        return "add 1"

    def sample_action(self, rng: random.Random) -> str:
        return f"add {rng.randint(0, 2)}"

    def close(self) -> None:
        pass


def play(env, task, seed, policy="oracle"):
    """(observations, infos, success) of one episode; step 0's info is the wrapper's reset_info."""
    obs = env.reset(task, seed)
    seen, infos = [obs], [dict(getattr(env, "reset_info", {}))]
    rng = random.Random(seed)
    while True:
        action = env.oracle_action() if policy == "oracle" else rng.choice(obs.admissible)
        result = env.step(action)
        obs = result.observation
        seen.append(obs)
        infos.append(result.info)
        if result.done:
            return seen, infos, result.success


# ----------------------------------------------------------------------------------------- generic
def test_zero_rates_return_the_env_itself_and_bad_rates_fail():
    env = CounterEnv()
    assert wrap_with_perturbations(env, PerturbationConfig()) is env
    assert wrap_with_perturbations(env, None) is env
    with pytest.raises(ConfigError, match="env.perturbations.distractors"):
        wrap_with_perturbations(env, PerturbationConfig(distractors=1.5))


def test_generic_env_without_action_set_passes_through():
    env = wrap_with_perturbations(CounterEnv(), PerturbationConfig(**{f: 1.0 for f in FAMILIES}))
    assert isinstance(env, PerturbedEnv) and env.name == "counter" and env.max_steps == 8
    assert env.sample_action(random.Random(0)).startswith("add ")
    seen, infos, _ = play(env, Task("c-1", "counter"), seed=3)
    assert all(o.admissible is None for o in seen)  # no decoys invented where there is no action set
    assert all(infos[i]["tool_failed"] for i in range(1, len(infos)))
    assert len(seen) - 1 <= env.max_steps  # failed calls use up steps too
    env.close()


def test_same_seed_same_episode_other_seed_other_perturbations():
    cfg = PerturbationConfig(**{f: 0.5 for f in FAMILIES})
    env = wrap_with_perturbations(CounterEnv(), cfg)
    task = Task("c-7", "counter")
    assert play(env, task, 1) == play(env, task, 1)
    schedules = {tuple(tuple(i.get("perturbations", [])) for i in play(env, task, s)[1]) for s in range(6)}
    assert len(schedules) > 1


class ScriptedAgent:
    """Plays a fixed action list, scoring two candidates with a rule verifier and the router's features, the
    way the routed agent does: every step's features come from what the agent is shown."""

    name = "scripted"

    def __init__(self, actions):
        from r2v.router.features import FeatureTracker
        from r2v.verifier.rules import rule_verifier

        self.actions, self.verifier, self.tracker = list(actions), rule_verifier("terminal"), FeatureTracker()

    def reset(self, task):
        from r2v.router.features import FeatureTracker

        self.tracker = FeatureTracker()

    def observe(self, action, info):
        self.tracker.update(action, info)

    def decide(self, ctx, env):
        from r2v.policies.base import Candidate, Decision
        from r2v.verifier.base import annotate

        action = self.actions[ctx.step]
        d = Decision(action, "slm", [Candidate(action, -0.5, -0.25), Candidate("add 2", -1.5, -0.75)], entropy=0.6)
        annotate(self.verifier, ctx, d)
        d.features = self.tracker.features(ctx, d)
        return d


class HiddenInfoChanged:
    """The same env, with every bookkeeping field of `info` contradicted; observations are untouched."""

    def __init__(self, env):
        self.env, self.name, self.max_steps = env, env.name, env.max_steps
        self.reset_info = {"perturbations": ["prompt_injection/direct"], "tool_failed": True, "exit_code": 2}

    def reset(self, task, seed=0):
        return self.env.reset(task, seed)

    def step(self, action):
        r = self.env.step(action)
        info = {"tool_failed": not r.info.get("tool_failed"), "perturbations": [], "exit_code": 1,
                "timed_out": True, "won": not r.success, "truncated": False}
        return StepResult(r.observation, r.reward, r.done, r.success, info)

    def oracle_action(self):
        return self.env.oracle_action()


def test_features_read_only_what_the_agent_sees():
    """A stale tool output is flagged in the wrapper's bookkeeping but shows no error: features (and the
    verifier scores among them) must be the same when every hidden flag says otherwise."""
    from r2v.rollout.episode import EpisodeMeta, run_episode
    from r2v.router.features import features_by_name

    actions = ["add 0", "add 1", "add 0", "add 0", "add 1", "add 0", "add 0", "add 0"]
    cfg = PerturbationConfig(tool_flakiness=1.0, prompt_injection=0.3)
    task, meta = Task("c-2", "counter"), EpisodeMeta("x", "test", "scripted", 0)
    for seed in range(30):
        meta.seed = seed
        rows = run_episode(wrap_with_perturbations(CounterEnv(), cfg), ScriptedAgent(actions), task, meta, 8)
        kinds = {p for r in rows for p in r["perturbation"]}
        if {"tool_flakiness/stale", "tool_flakiness/failure"} <= kinds:
            break
    else:
        pytest.fail("no episode with both a stale and a failed tool call in 30 seeds")
    changed = run_episode(HiddenInfoChanged(wrap_with_perturbations(CounterEnv(), cfg)), ScriptedAgent(actions),
                          task, meta, 8)
    assert [r["observation"] for r in changed] == [r["observation"] for r in rows]
    assert [r["tool_failed"] for r in changed] != [r["tool_failed"] for r in rows]  # the bookkeeping did differ
    assert [r["features"] for r in changed] == [r["features"] for r in rows]
    assert [[c["verifier_score"] for c in r["candidates"]] for r in changed] == \
        [[c["verifier_score"] for c in r["candidates"]] for r in rows]
    feats = [features_by_name(r["features"]) for r in rows]
    # and the features do see what is visible: an error shown after a failed call
    after_failure = [j for j, r in enumerate(rows) if "tool_flakiness/failure" in r["perturbation"]]
    assert after_failure and all(feats[j]["recent_tool_error"] == 1 for j in after_failure)


def test_stale_output_is_silent_but_flagged_in_bookkeeping():
    env = wrap_with_perturbations(CounterEnv(), only("tool_flakiness"))
    for seed in range(40):
        before = env.reset(Task("c-3", "counter"), seed).text
        res = env.step("add 1")
        if res.info["perturbations"] == ["tool_flakiness/stale"]:
            from r2v.policies.observed import observed_step, shows_tool_error

            assert res.info["tool_failed"] and res.observation.text == before and not shows_tool_error(before)
            assert observed_step("add 1", res.observation.text, before, None) == {"tool_error": False,
                                                                                  "repeated": True}
            return
    pytest.fail("no stale first step in 40 seeds at rate 1")


# ----------------------------------------------------------------------------------------- TextWorld
@pytest.fixture
def tw(tw_cfg, tw_tasks):
    from r2v.envs.registry import make_env

    def make(pcfg: PerturbationConfig):
        tw_cfg.perturbations = pcfg
        return make_env(tw_cfg)

    return make


def test_textworld_determinism_over_a_full_oracle_episode(tw, tw_tasks):
    env = tw(PerturbationConfig(**{f: 0.5 for f in FAMILIES}))
    for task in tw_tasks[-2:]:
        first, second = play(env, task, 4), play(env, task, 4)
        assert first == second and first[2]
    schedules = {str(play(env, tw_tasks[-1], s)[1]) for s in range(6)}
    assert len(schedules) > 1
    env.close()


def test_tool_flakiness_fires_every_step_and_oracle_retries(tw, tw_tasks):
    env = tw(only("tool_flakiness"))
    kinds = set()
    for seed in range(6):
        seen, infos, success = play(env, tw_tasks[-1], seed)
        assert success
        for obs, info in zip(seen[1:], infos[1:]):
            assert info["tool_failed"] and len(info["perturbations"]) == 1
            kind = info["perturbations"][0]
            kinds.add(kind)
            if kind == "tool_flakiness/failure":
                assert obs.text in env.flavour["tool_errors"] and info["score"] == 0 and not info["won"]
    assert {"tool_flakiness/failure", "tool_flakiness/stale", "tool_flakiness/timeout"} <= kinds


def test_failed_call_does_not_reach_the_env(tw, tw_tasks):
    env = tw(only("tool_flakiness"))
    for seed in range(20):  # find a first step that fails, then check the game never saw the action
        env.reset(tw_tasks[0], seed)
        action = env.oracle_action()
        result = env.step(action)
        if result.info["perturbations"] == ["tool_flakiness/failure"]:
            assert env.oracle_action() == action and not result.done and result.reward == 0
            assert env.env.last_info["score"] == 0 and not env.env.last_info["won"]
            return
    pytest.fail("no tool failure in 20 seeds at rate 1")


def test_partial_observability_truncates_drops_and_masks(tw, tw_tasks):
    env = tw(only("partial_observability", max_observation_chars=60))
    kinds = set()
    for task in tw_tasks:
        for seed in range(3):
            true_text = env.env.reset(task, seed).text
            obs = env.reset(task, seed)
            [kind] = env.reset_info["perturbations"]  # the first observation is long enough for all kinds
            kinds.add(kind)
            if kind.endswith("truncate"):
                assert obs.truncated and env.reset_info["truncated"] and len(obs.text) <= 60 + len(MASK) + 1
            else:
                assert not obs.truncated and obs.text != true_text
            if kind.endswith("mask"):
                assert MASK in obs.text
            if kind.endswith("drop_lines"):
                assert obs.text.count("\n") < true_text.count("\n")
    assert kinds == {f"partial_observability/{k}" for k in ("truncate", "drop_lines", "mask")}
    seen, infos, _ = play(env, tw_tasks[-1], 0)
    for obs, info in zip(seen[1:], infos[1:]):
        assert info["truncated"] == obs.truncated == any(p.endswith("truncate") for p in info["perturbations"])


def test_prompt_injection_text_is_present_and_targets_a_wrong_action(tw, tw_tasks):
    env = tw(only("prompt_injection"))
    kinds = set()
    for seed in range(12):
        obs = env.reset(tw_tasks[-1], seed)
        [kind] = env.reset_info["perturbations"]
        kinds.add(kind)
        family = kind.split("/")[1]
        target = next(a for a in obs.admissible if f"'{a}'" in obs.text)
        assert target != env.oracle_action()
        assert any(t.split("{action}")[0] in obs.text for t in env.flavour[family])
    assert kinds == {f"prompt_injection/{k}" for k in ("direct", "indirect", "misleading")}


def test_distractor_decoys_are_rejected_by_the_env(tw, tw_tasks):
    env = tw(only("distractors"))
    decoys_tried = 0
    kinds = set()
    for seed in range(12):
        true_admissible = env.env.reset(tw_tasks[0], seed).admissible
        obs = env.reset(tw_tasks[0], seed)
        kinds.update(env.reset_info["perturbations"])
        extra = sorted(set(obs.admissible) - set(true_admissible))
        if env.reset_info["perturbations"] == ["distractors/decoy_action"]:
            assert extra and obs.admissible == sorted(obs.admissible)
            result = env.step(extra[0])
            assert result.info["invalid_action"] and result.info.get("decoy_action")
            assert result.info["score"] == 0 and not result.done
            decoys_tried += 1
        else:
            assert not extra and obs.text != env.env.reset(tw_tasks[0], seed).text
    assert decoys_tried and kinds == {f"distractors/{k}" for k in ("decoy_action", "red_herring", "wrong_hint")}


def test_oracle_still_solves_heavily_perturbed_episodes(tw, tw_tasks):
    env = tw(PerturbationConfig(**{f: 1.0 for f in FAMILIES}))
    wins = sum(play(env, task, seed)[2] for task in tw_tasks for seed in range(2))
    assert wins == 2 * len(tw_tasks)
    assert env.oracle_action() is None  # passes through; the episode is over


def test_default_flavour_keys_cover_env_hook(tw, tw_tasks):
    env = tw(only("distractors"))
    hook = env.env.perturbation_flavour()
    assert set(hook) <= set(DEFAULT_FLAVOUR)
    assert all("{action}" in t for k in ("direct", "indirect", "misleading", "hint") for t in env.flavour[k])

"""The routed agent and branch labels: escalations really act, failures degrade, labels follow outcomes."""
import pandas as pd
import pytest

from r2v.config import ModelConfig, PolicyConfig, R2VConfig, TinyModelConfig
from r2v.envs.registry import make_env
from r2v.policies.init_model import save_tiny_model
from r2v.policies.routed import RoutedAgent, carry_after
from r2v.policies.slm import SLMPolicy
from r2v.policies.teachers import OracleTeacher, TeacherReply
from r2v.rollout.episode import BranchAgent, EpisodeMeta, run_episode
from r2v.rollout.router_rows import label_rows
from r2v.router.baselines import Router, make_router
from r2v.router.features import FEATURE_NAMES
from r2v.verifier import make_verifier


@pytest.fixture(scope="module")
def slm(tmp_path_factory):
    out = tmp_path_factory.mktemp("slm")
    save_tiny_model(["Goal: go east\nAction: go east"] * 20, TinyModelConfig(hidden_size=32, intermediate_size=64,
                    num_layers=1, num_heads=2, vocab_size=300), out, 256)
    return SLMPolicy(out, ModelConfig(max_context_tokens=256), PolicyConfig(mode="rank", num_candidates=3))


class BrokenTeacher:
    kind = "broken"

    def act(self, ctx, env):
        return TeacherReply(None, error="HTTP 503: overloaded")


class AsksAtFirstStep(Router):
    """Asks for the teacher at step 0 and never again."""

    name = "asks_at_first_step"

    def risk(self, features):
        return float(features["step"] == 0)


class MirrorTeacher:
    """Answers what the SLM proposes (rank mode, its likeliest candidate): every call it makes changes nothing."""

    kind = "mirror"

    def __init__(self, slm):
        self.slm = slm

    def act(self, ctx, env):
        return TeacherReply(self.slm.act([ctx])[0].action)


class ContraryTeacher(MirrorTeacher):
    """Answers a valid action other than the SLM's proposal: every call it makes changes the action."""

    def act(self, ctx, env):
        mine = self.slm.act([ctx])[0].action
        return TeacherReply(next(a for a in ctx.observation.admissible if a != mine))


def agent(slm, tw_cfg, router, teacher, budget=None, grace=0, carry=0):
    cfg = R2VConfig()
    cfg.env = tw_cfg
    router = make_router(router) if isinstance(router, str) else router
    return RoutedAgent(slm, make_verifier(cfg), router, teacher, "logprob", budget, grace=grace, carry=carry)


def play(env_cfg, a, task, seed=0):
    return run_episode(make_env(env_cfg), a, task, EpisodeMeta("e", "test", a.name, seed), 30)


def test_llm_only_is_the_teacher_acting_and_the_env_decides(slm, tw_cfg, tw_tasks):
    rows = play(tw_cfg, agent(slm, tw_cfg, "llm_only", OracleTeacher()), tw_tasks[-1])
    assert all(r["actor"] == "teacher" and r["escalated"] for r in rows)
    assert rows[-1]["episode_success"] is True
    assert all(len(r["features"]) == len(FEATURE_NAMES) and r["risk"] is not None for r in rows)


def test_slm_only_never_calls_the_teacher(slm, tw_cfg, tw_tasks):
    rows = play(tw_cfg, agent(slm, tw_cfg, "slm_only", OracleTeacher()), tw_tasks[-1])
    assert all(r["actor"] == "slm" and not r["escalated"] for r in rows)
    assert all(r["candidates"][0]["verifier_score"] is not None for r in rows)


def test_per_episode_budget_caps_calls(slm, tw_cfg, tw_tasks):
    a = agent(slm, tw_cfg, "llm_only", OracleTeacher(), budget=1)
    task = max(tw_tasks, key=lambda t: t.task_id)  # any game; the cap holds whatever its length
    for seed in (0, 1):  # the budget resets per episode
        rows = play(tw_cfg, a, task, seed)
        assert sum(r["actor"] == "teacher" for r in rows) == 1


def test_grace_lets_the_slm_try_reversible_proposals_first(slm, tw_cfg, tw_tasks):
    """A router that asks at every step, with grace 2: the first two proposals the SLM could take back (moves,
    looks) are executed as proposed, every other step goes to the teacher, and each episode starts afresh. A
    fixed reference (LLM alone) never defers."""
    from r2v.verifier.rules import reversible_action

    always = make_router("entropy", threshold=-1.0)  # entropy > -1: the router asks at every step
    a = agent(slm, tw_cfg, always, OracleTeacher(), grace=2)
    deferred_any = False
    for task, seed in ((tw_tasks[0], 0), (tw_tasks[-1], 1)):
        rows = play(tw_cfg, a, task, seed)
        left = 2
        for r in rows:
            proposal = r["candidates"][0]["text"]
            defer = left > 0 and reversible_action("textworld", proposal)
            assert r["risk"] > always.threshold
            want = ("slm", False) if defer else ("teacher", True)
            assert (r["actor"], r["escalated"]) == want, (r["step"], proposal)
            left -= int(defer)
            deferred_any |= defer
        assert a.deferrals == 2 - left
    assert deferred_any  # the tiny SLM proposes moves: the rule above was exercised
    rows = play(tw_cfg, agent(slm, tw_cfg, "llm_only", OracleTeacher(), grace=2), tw_tasks[0])
    assert all(r["actor"] == "teacher" for r in rows)


@pytest.mark.parametrize("llm_call, redundant, owed, after", [
    (True, True, 0, 2),  # a call that changed nothing owes the next `carry` (2) steps one
    (True, False, 0, 0),  # a call that changed the action settles the risk
    (False, False, 2, 1),  # a carried step without a call (budget spent, teacher down) still uses one up
    (True, True, 2, 1),  # a carried call that changed nothing too: the owed steps do not grow
    (True, False, 2, 0),  # a carried call that changed the action ends the carry
    (False, False, 0, 0),
])
def test_carry_after(llm_call, redundant, owed, after):
    assert carry_after(llm_call, redundant, 2, owed) == after


def test_a_call_that_changed_nothing_carries_the_escalation_to_the_next_steps(slm, tw_cfg, tw_tasks):
    """`router.carry`: the router asks at step 0 only. When the teacher answers the SLM's own proposal, the
    next `carry` steps go to the teacher too, at risk 0; when the teacher changes the action, nothing is carried;
    a fixed reference never carries. (That a carried step is never deferred by grace: tests/test_serve.py.)"""
    task = tw_tasks[-1]
    for carry in (0, 2):
        rows = play(tw_cfg, agent(slm, tw_cfg, AsksAtFirstStep(), MirrorTeacher(slm), carry=carry), task)
        assert len(rows) > carry + 1  # the SLM (and its mirror) does not win this game in three steps
        assert [r["actor"] for r in rows[:carry + 2]] == ["teacher"] * (carry + 1) + ["slm"], carry
        assert all(r["risk"] == 0.0 for r in rows[1:])
        assert sum(r["escalated"] for r in rows) == carry + 1
    rows = play(tw_cfg, agent(slm, tw_cfg, AsksAtFirstStep(), ContraryTeacher(slm), carry=2), task)
    assert rows[0]["actor"] == "teacher" and not any(r["escalated"] for r in rows[1:])
    rows = play(tw_cfg, agent(slm, tw_cfg, "slm_only", MirrorTeacher(slm), carry=2), task)
    assert not any(r["escalated"] for r in rows)


def test_teacher_failure_degrades_to_the_slm(slm, tw_cfg, tw_tasks):
    rows = play(tw_cfg, agent(slm, tw_cfg, "llm_only", BrokenTeacher(), budget=1), tw_tasks[0])
    assert len(rows) > 1 and all(r["actor"] == "slm" and r["escalated"] for r in rows)  # failures spend no budget
    assert all("503" in r["escalation_error"] for r in rows)


def test_branch_replays_prefix_then_teacher_then_base(slm, tw_cfg, tw_tasks):
    task = tw_tasks[-1]
    teacher_rows = run_episode(make_env(tw_cfg), BranchAgent(None, OracleTeacher(), [], 30), task,
                               EpisodeMeta("e", "train", "t", 0), 30)
    actions = [r["action"] for r in teacher_rows]
    base = agent(slm, tw_cfg, "slm_only", None)
    rows = run_episode(make_env(tw_cfg), BranchAgent(base, OracleTeacher(), actions[:1], 1), task,
                       EpisodeMeta("e", "train", "b", 0), 30)
    assert rows[0]["actor"] == "replay" and rows[0]["action"] == actions[0]
    if len(rows) > 1:
        assert rows[1]["actor"] == "teacher" and rows[1]["action"] == actions[1]
        assert all(r["actor"] == "slm" for r in rows[2:])


def test_branch_labels_follow_outcomes():
    cfg = R2VConfig(experiment="x")
    steps = pd.DataFrame([
        # a failed SLM episode with two steps; a successful one
        dict(env="textworld", task_id="t", split="train", episode_id="t/slm/s0", perturbation_seed=0, step=0,
             features=[0.0] * len(FEATURE_NAMES), episode_success=False),
        dict(env="textworld", task_id="t", split="train", episode_id="t/slm/s0", perturbation_seed=0, step=1,
             features=[0.0] * len(FEATURE_NAMES), episode_success=False),
        dict(env="textworld", task_id="t", split="train", episode_id="t/slm/s1", perturbation_seed=1, step=0,
             features=[0.0] * len(FEATURE_NAMES), episode_success=True),
    ])
    branches = pd.DataFrame([  # the teacher at step 0 of seed 0 wins; nothing branched at step 1
        dict(task_id="t", perturbation_seed=0, policy="branch@0", episode_id="t/branch@0/s0", episode_success=True),
    ])
    rows = {(r["perturbation_seed"], r["step"]): r for r in label_rows(cfg, steps, branches)}
    assert rows[(0, 0)]["branch_label"] is True and rows[(0, 0)]["teacher_branch_success"] is True
    assert rows[(0, 1)]["branch_label"] is None  # not branched: no label, not a guessed one
    assert rows[(1, 0)]["branch_label"] is False  # the SLM succeeded from here
    assert [rows[k]["episode_failed"] for k in sorted(rows)] == [True, True, False]
    assert rows[(0, 0)]["label_weight"] == 1.0 and rows[(0, 1)]["label_weight"] is None


def test_every_episode_is_sampled_and_weighted_and_every_step_gets_a_step_label():
    """Branch labels sample steps of successful episodes too (label 0, no branch needed), each sampled row
    standing for len/n steps; the step label (action ≠ the env's reference action) covers every step."""
    cfg = R2VConfig(experiment="x")
    cfg.router.branch_steps_per_episode = 2
    feats = [0.0] * len(FEATURE_NAMES)
    steps = pd.DataFrame([
        dict(env="textworld", task_id="t", split="val", episode_id="t/slm/s1", perturbation_seed=1, step=i,
             features=feats, episode_success=True, action=a, oracle_action=o)
        for i, (a, o) in enumerate([("go east", "go east"), ("take key", "go west"), ("open box", "open box"),
                                    ("look", None), ("go north", "go north"), ("eat", "eat")])
    ])
    rows = sorted(label_rows(cfg, steps, pd.DataFrame(columns=["task_id", "perturbation_seed", "policy",
                                                                "episode_id", "episode_success"])),
                  key=lambda r: r["step"])
    labelled = [r for r in rows if r["branch_label"] is not None]
    assert len(labelled) == 2 and all(r["branch_label"] is False for r in labelled)
    assert all(r["label_weight"] == 3.0 for r in labelled)  # 6 steps, 2 sampled
    assert [r["step_label"] for r in rows] == [False, True, False, None, False, False]
    assert [r["critical_label"] for r in rows] == [False, False, False, None, False, False]  # a won episode
    lost = sorted(label_rows(cfg, steps.assign(episode_success=False), pd.DataFrame(
        columns=["task_id", "perturbation_seed", "policy", "episode_id", "episode_success"])), key=lambda r: r["step"])
    assert [r["critical_label"] for r in lost] == [False, True, False, None, False, False]  # its departures count


def test_route_scores_once_and_decides_on_that_score():
    """The recorded risk is the one that decided: a random router drawn twice would disagree with itself."""
    from r2v.policies.routed import route

    router = make_router("random", budget=0.5, seed=3)
    feats = dict.fromkeys(FEATURE_NAMES, 0.0)
    verdicts = [route(router, feats) for _ in range(200)]
    assert all(v.escalate == (v.risk >= 0.5) for v in verdicts)
    assert 60 < sum(v.escalate for v in verdicts) < 140
    strict = make_router("entropy", threshold=1.0)
    assert not route(strict, {**feats, "entropy": 1.0}).escalate and route(strict, {**feats, "entropy": 1.01}).escalate


def test_random_routing_of_an_episode_does_not_depend_on_what_the_worker_played_before(slm, tw_cfg, tw_tasks):
    """Rollout workers take episodes in whatever order Ray hands them out: a random router must route an episode
    (task, seed) the same way whatever else its worker played, at its budget's rate over many steps."""
    def routing(order):
        a = RoutedAgent(slm, None, make_router("random", budget=0.5, seed=7), OracleTeacher(), "logprob")
        played = {(t.task_id, s): [r["escalated"] for r in play(tw_cfg, a, t, s)] for t, s in order}
        return played

    episodes = [(t, s) for t in tw_tasks[:3] for s in (0, 1)]
    forward, backward = routing(episodes), routing(episodes[::-1] + episodes[:2])
    assert forward == {k: backward[k] for k in forward}
    router = make_router("random", budget=0.3, seed=7)
    feats = dict.fromkeys(FEATURE_NAMES, 0.0)
    from r2v.router.baselines import STEP_KEY, step_key

    draws = [router.risk({**feats, STEP_KEY: step_key("game", 0, i)}) for i in range(3000)]
    assert draws[:5] == [router.risk({**feats, STEP_KEY: step_key("game", 0, i)}) for i in range(5)]
    assert abs(sum(d >= 0.7 for d in draws) / 3000 - 0.3) < 0.03
    other = make_router("random", budget=0.3, seed=8).risk({**feats, STEP_KEY: step_key("game", 0, 0)})
    assert other != draws[0]  # the router's seed still matters


def test_hindsight_escalates_exactly_where_the_slm_alone_would_lose(slm, tw_cfg, tw_tasks):
    """A step goes to the teacher iff the SLM alone loses from there and the teacher acts differently; with
    the oracle teacher the episode is then won; one branch per escalation plus one decides every step."""
    from r2v.rollout.episode import Lookahead

    def slm_alone():
        return agent(slm, tw_cfg, "slm_only", None)

    def slm_branch(task, seed, prefix):  # the SLM alone after `prefix`: its actions and whether it won
        rows = run_episode(make_env(tw_cfg), BranchAgent(slm_alone(), None, prefix, 0), task,
                           EpisodeMeta("e", "test", "check", seed), 30)
        return [r["action"] for r in rows], rows[-1]["episode_success"]

    cfg = R2VConfig()
    cfg.env = tw_cfg
    calls = 0
    for task in tw_tasks[:3]:
        lookahead = Lookahead(make_env(tw_cfg), slm_alone(), 30)
        hindsight = RoutedAgent(slm, make_verifier(cfg), make_router("hindsight"), OracleTeacher(), "logprob",
                                lookahead=lookahead)
        rows = play(tw_cfg, hindsight, task)
        assert rows[-1]["episode_success"] is True  # with the oracle teacher, hindsight routing always wins
        executed = [r["action"] for r in rows]
        for t, row in enumerate(rows):
            slm_actions, slm_wins = slm_branch(task, 0, executed[:t])
            slm_action = slm_actions[t]
            if row["actor"] == "teacher":
                assert not slm_wins and row["action"] != slm_action
            else:
                assert row["action"] == slm_action and (slm_wins or slm_action == row["oracle_action"])
        called = sum(r["actor"] == "teacher" for r in rows)
        assert 1 <= lookahead.branches <= called + 1  # a branch is reused while the episode stays on it
        calls += called
    assert calls  # the tiny SLM loses somewhere, so the rule was exercised
    with pytest.raises(ValueError, match="Lookahead"):
        RoutedAgent(slm, None, make_router("hindsight"), OracleTeacher())

"""Preference pairs from probe rows: chosen = the teacher's action (else the verifier's best), rejected = the
SLM's most likely wrong candidates, consistency peers = the same state (task + action prefix) under another seed."""
import pandas as pd
import pytest

from r2v.config import R2VConfig
from r2v.rollout.pairs import pairs_from_probes


def probe(task, step, seed, cands, obs="room", action="go north", actor="teacher", oracle=None, prefix=None,
          split="train", shown=()):
    prefix = ["go north"] * step if prefix is None else prefix
    return {"task_id": task, "step": step, "perturbation_seed": seed, "env": "textworld", "episode_id": f"{task}/{seed}",
            "split": split, "goal": "take the key", "history": prefix, "observation": f"{obs} seed {seed}",
            "action": action, "actor": actor, "oracle_action": oracle, "perturbation": list(shown),
            "candidates": [{"text": t, "logprob": lp, "mean_logprob": lp, "verifier_score": v} for t, lp, v in cands]}


def test_verifier_rule_pairs_best_with_the_slms_likeliest_wrong_candidate():
    cfg = R2VConfig()
    cfg.dpo.chosen, cfg.dpo.pair_margin = "verifier", 0.2
    rows = pd.DataFrame([
        probe("t1", 0, 1, [("go north", -1.0, 0.3), ("take key", -2.0, 0.9), ("look", -0.5, 0.1)]),
        probe("t1", 0, 2, [("take key", -1.0, 0.9), ("go north", -2.0, 0.8)]),  # gap 0.1 < margin: skipped
        probe("t1", 1, 1, [("take key", -1.0, 0.5), ("take key", -1.5, 0.5)]),  # no different text: skipped
        probe("t2", 0, 1, [("open door", -1.0, 0.9), ("go west", -1.0, None)]),  # one scored candidate: skipped
    ])
    pairs = pairs_from_probes(cfg, rows)
    assert len(pairs) == 1
    p = pairs[0]
    assert (p["chosen"], p["rejected"], p["chosen_source"]) == ("take key", "look", "verifier")  # look: the hardest
    assert p["chosen_score"] - p["rejected_score"] >= 0.2 and p["split"] == "train"
    assert p["peer_seed"] == 2 and "seed 2" in p["peer_prompt"] and "seed 1" in p["prompt"]
    assert p["prompt"].endswith("Action:")


def test_teacher_rule_chooses_the_teachers_action_against_hard_negatives():
    cfg = R2VConfig()
    cfg.dpo.negatives = 2
    cands = [("go north", -0.2, 0.9), ("take key", -1.0, 0.4), ("look", -0.5, 0.95), ("drop key", -3.0, 0.1)]
    rows = pd.DataFrame([
        probe("t1", 0, 1, cands, action="take key"),  # the teacher acted here: its action is chosen, whatever scores
        probe("t2", 0, 1, cands, action="", actor="slm", oracle="open door", split="val"),  # the env's reference
        probe("t3", 0, 1, cands, action="go north", actor="slm"),  # no teacher action: the verifier's best
    ])
    pairs = pairs_from_probes(cfg, rows)
    got = [(p["task_id"], p["chosen"], p["rejected"], p["chosen_source"]) for p in pairs]
    assert got == [("t1", "take key", "go north", "teacher"), ("t1", "take key", "look", "teacher"),
                   ("t2", "open door", "go north", "teacher"), ("t2", "open door", "look", "teacher"),
                   ("t3", "look", "take key", "verifier"), ("t3", "look", "drop key", "verifier")], got
    # t3: go north (0.9) is within pair_margin (0.1) of look (0.95), so it is no negative there
    assert {p["split"] for p in pairs if p["task_id"] == "t2"} == {"val"}
    assert pairs[0]["chosen_score"] == 0.4 and pairs[2]["chosen_score"] is None  # open door was no candidate


def test_consistency_peers_are_the_same_state_not_the_same_step():
    """Seed 2's first `go north` never reached the env (a failed tool call, shown at its step 1), so the teacher
    repeated it: seed 2's step 1 is still the start state and its step 2 is the state seeds 1 and 3 reach at
    step 1. Peers follow the state; a step-index match would pair seed 1's hall with seed 2's start room."""
    cfg = R2VConfig()
    c = [("take key", -0.5, 0.9), ("look", -0.1, 0.1)]
    rows = pd.DataFrame([
        probe("t1", 0, 1, c, action="go north", prefix=[]),
        probe("t1", 1, 1, c, action="take key", prefix=["go north"], obs="hall"),
        probe("t1", 0, 2, c, action="go north", prefix=[]),
        probe("t1", 1, 2, c, action="go north", prefix=["go north"], obs="error", shown=["tool_flakiness/failure"]),
        probe("t1", 2, 2, c, action="take key", prefix=["go north", "go north"], obs="hall"),
        probe("t1", 0, 3, c, action="go north", prefix=[], shown=["distractors/room"]),
        probe("t1", 1, 3, c, action="take key", prefix=["go north"], obs="hall", shown=["tool_flakiness/stale"]),
    ])
    pairs = {(p["perturbation_seed"], p["step"]): p for p in pairs_from_probes(cfg, rows)}
    peers = {k: (p["peer_seed"], p["peer_prompt"]) for k, p in pairs.items()}
    assert len(pairs) == 7
    assert peers[(1, 0)] == (2, pairs[(2, 0)]["prompt"])  # the start state: seed 2 first reached it at step 0
    assert peers[(3, 0)][0] == 1 and peers[(2, 1)][0] == 3  # seed 2's step 1 is the start state too
    assert peers[(1, 1)] == (2, pairs[(2, 2)]["prompt"])  # the hall: seed 2's step 2, not its step 1
    assert "hall seed 2" in peers[(1, 1)][1] and peers[(2, 2)][0] == 3 and peers[(3, 1)][0] == 1


def test_both_probes_at_one_state_give_its_pairs_once():
    """`dpo.pair_states=both`: the teacher's and the SLM's probe episodes share their opening state; its pairs
    come once, while the states only the SLM reaches add their own (labelled by the teacher's action there)."""
    cfg = R2VConfig()
    c = [("take key", -0.5, 0.9), ("look", -0.1, 0.1)]
    rows = pd.DataFrame([
        {**probe("t1", 0, 1, c, action="go north", prefix=[]), "policy": "pair-probe"},
        {**probe("t1", 0, 1, c, action="look", actor="slm", oracle="go north", prefix=[]), "policy": "pair-probe-slm"},
        {**probe("t1", 1, 1, c, action="look", actor="slm", oracle="go south", prefix=["look"], obs="cellar"),
         "policy": "pair-probe-slm"},
    ])
    got = sorted((p["step"], p["prompt"].count("cellar"), p["chosen"], p["rejected"]) for p in pairs_from_probes(cfg, rows))
    assert got == [(0, 0, "go north", "look"), (1, 1, "go south", "look")]


@pytest.mark.parametrize("states", ["teacher", "slm"])
def test_probes_execute_whose_action_pair_states_says_and_record_the_teachers(tmp_path, tw_cfg, tw_tasks, states):
    """A real (untrained) SLM and the oracle teacher on real TextWorld games: `slm` probes play the SLM's own
    choices (so they reach states the teacher never visits), `teacher` probes the teacher's; both record the
    teacher's action at every state, which becomes the chosen side of the pairs."""
    from r2v.config import ModelConfig, PolicyConfig, TinyModelConfig
    from r2v.envs.registry import make_env
    from r2v.policies.init_model import save_tiny_model
    from r2v.policies.slm import SLMPolicy
    from r2v.policies.teachers import make_teacher
    from r2v.rollout.episode import EpisodeMeta, run_episode
    from r2v.rollout.pairs import PairProbeAgent
    from r2v.verifier import make_verifier

    save_tiny_model([f"Goal: take the key\nObservation: room {i}\nAction: go north" for i in range(50)],
                    TinyModelConfig(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2, vocab_size=300),
                    tmp_path / "slm", 256)
    cfg = R2VConfig()
    cfg.env = tw_cfg
    slm = SLMPolicy(tmp_path / "slm", ModelConfig(max_context_tokens=256), PolicyConfig(num_candidates=4))
    agent = PairProbeAgent(slm, make_verifier(cfg), make_teacher(cfg), states)
    env, rows = make_env(tw_cfg), []
    for task in tw_tasks[:3]:
        rows += run_episode(env, agent, task, EpisodeMeta("t", "train", "pair-probe", seed=0), max_steps=6)
    assert rows and {r["actor"] for r in rows} == {states}
    assert all(r["oracle_action"] for r in rows)  # the teacher's action, asked at every state
    own = [r["action"] == r["oracle_action"] for r in rows]
    if states == "teacher":
        assert all(own)
    else:
        assert not all(own)  # the untrained SLM strays from the teacher: these are its own states
        assert all(r["action"] in [c["text"] for c in r["candidates"]] for r in rows)
    pairs = pairs_from_probes(cfg, pd.DataFrame(rows))
    by_state = {(r["episode_id"], r["step"]): r["oracle_action"] for r in rows}
    assert pairs and all(p["chosen"] == by_state[(p["episode_id"], p["step"])] for p in pairs)

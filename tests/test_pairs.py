"""Preference pairs from probe rows: chosen = the teacher's action (else the verifier's best), rejected = the
SLM's most likely wrong candidates, consistency peers = the same state (task + action prefix) under another seed."""
import pandas as pd

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

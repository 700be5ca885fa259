"""Preference pairs from probe rows: best vs worst-with-different-text, margin, consistency peers."""
import pandas as pd

from r2v.config import R2VConfig
from r2v.rollout.pairs import pairs_from_probes


def probe(task, step, seed, cands, obs="room"):
    return {"task_id": task, "step": step, "perturbation_seed": seed, "env": "textworld", "episode_id": f"{task}/{seed}",
            "goal": "take the key", "history": ["go north"] * step, "observation": f"{obs} seed {seed}",
            "candidates": [{"text": t, "logprob": lp, "mean_logprob": lp, "verifier_score": v} for t, lp, v in cands]}


def test_pairs_rank_by_verifier_and_link_peers():
    cfg = R2VConfig()
    cfg.dpo.pair_margin = 0.2
    rows = pd.DataFrame([
        probe("t1", 0, 1, [("go north", -1.0, 0.3), ("take key", -2.0, 0.9), ("look", -0.5, 0.1)]),
        probe("t1", 0, 2, [("take key", -1.0, 0.9), ("go north", -2.0, 0.8)]),  # gap 0.1 < margin: skipped
        probe("t1", 1, 1, [("take key", -1.0, 0.5), ("take key", -1.5, 0.5)]),  # no different text: skipped
        probe("t2", 0, 1, [("open door", -1.0, 0.9), ("go west", -1.0, None)]),  # one scored candidate: skipped
    ])
    pairs = pairs_from_probes(cfg, rows)
    assert len(pairs) == 1
    p = pairs[0]
    assert (p["chosen"], p["rejected"]) == ("take key", "look")
    assert p["chosen_score"] - p["rejected_score"] >= 0.2
    assert p["peer_seed"] == 2 and "seed 2" in p["peer_prompt"] and "seed 1" in p["prompt"]
    assert p["prompt"].endswith("Action:")

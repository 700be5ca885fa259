"""Offline estimate of a routed agent's episode success and LLM-call rate, from cached router rows.

This is an OFFLINE ESTIMATE (validation split), never a measured success: the sweep uses it to rank
router configurations cheaply; the chosen points are re-measured live (`sweep.live`, `r2v eval`).

Estimator ("branch replay"), for one escalation policy escalate(step) = p_t ≥ τ:

* the rows are every logged step of every validation SLM episode (the frozen SLM played alone, with the
  verifier choosing among its candidates; `collect-router`), whatever their label;
* LLM-call rate = (#steps with p_t ≥ τ) / (#steps), over all those steps;
* per SLM episode e, with E = {t : p_t ≥ τ} its escalated steps and B = {t : a teacher branch was played
  at t} (`teacher_branch_success` not null; branches are only played in failed SLM episodes):
    - if E ∩ B is non-empty: estimated success(e) = max over t ∈ E ∩ B of teacher_branch_success(t), each the
      recorded outcome of "replay the SLM's actions up to t, the teacher acts at t, the SLM continues";
      i.e. the episode counts as saved when the router escalates at some step where one teacher step
      was shown to save it;
    - otherwise: estimated success(e) = the SLM episode's own recorded success.
* estimated success = the mean over episodes.

Properties: escalating at more steps never lowers the estimate (so the frontier is monotone, as it is for
an oracle-like teacher), and with no escalation it is the SLM's validation success.
What it assumes, knowingly: escalating inside an episode the SLM already wins does not break it; an
escalation at a step without a branch outcome changes nothing (pessimistic: the teacher might have saved
the episode there); a branch's outcome still holds when the router also escalated at earlier steps of the
episode, although the live trajectory would then differ from the logged one (optimistic when an earlier
teacher step would have derailed it, pessimistic otherwise); a branch has exactly one teacher step, where the
live agent may escalate again later (pessimistic). `branch_hit_rate` reports the share of failed episodes
with an escalated branched step: when it is small, the estimate is mostly the SLM's own success.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from r2v.errors import R2VError

ESTIMATOR = "offline branch replay (validation)"


@dataclass
class ValEpisodes:
    """All validation steps as arrays, sorted by (episode, step)."""

    X: np.ndarray  # n×d features
    episode: np.ndarray  # n episode codes 0..E-1
    step: np.ndarray
    episode_success: np.ndarray  # n (bool, the episode's recorded SLM success, repeated per step)
    teacher_success: np.ndarray  # n float: 1/0 where a teacher branch was played at this step, NaN otherwise
    n_episodes: int

    @classmethod
    def from_frame(cls, df: Any, source: str = "router rows (val)") -> "ValEpisodes":
        if len(df) == 0:
            raise R2VError(f"{source}: no validation router rows; collect router rows for the val split "
                           f"(`r2v collect-router`) before sweeping")
        df = df.sort_values(["episode_id", "step"], kind="stable")
        codes, _ = _codes(df["episode_id"].to_numpy())
        X = np.stack([np.asarray(v, dtype=np.float32) for v in df["features"]])
        if not np.all(np.isfinite(X)):
            raise R2VError(f"{source}: features hold NaN or infinite values; re-collect the router rows")
        succ = ~df["episode_failed"].astype(bool).to_numpy()
        teach = df["teacher_branch_success"].to_numpy(dtype=object)
        teach = np.array([np.nan if v is None or (isinstance(v, float) and np.isnan(v)) else float(bool(v))
                          for v in teach], dtype=np.float64)
        return cls(X, codes, df["step"].to_numpy(), succ, teach, int(codes.max()) + 1)

    def __len__(self) -> int:
        return int(self.X.shape[0])

    @property
    def slm_success(self) -> float:
        return float(self._episode_success().mean())

    def _episode_success(self) -> np.ndarray:
        out = np.zeros(self.n_episodes, dtype=np.float64)
        out[self.episode] = self.episode_success.astype(np.float64)
        return out

    def estimate(self, escalate: np.ndarray) -> dict[str, float]:
        """{success, llm_call_rate, branch_hit_rate} of an escalation mask over these steps (see module doc)."""
        escalate = np.asarray(escalate, dtype=bool).reshape(-1)
        if escalate.shape[0] != len(self):
            raise R2VError(f"escalation mask has {escalate.shape[0]} entries for {len(self)} validation steps")
        success = self._episode_success()
        hit = escalate & ~np.isnan(self.teacher_success)
        idx = np.nonzero(hit)[0]
        saved = np.zeros(self.n_episodes, dtype=np.float64)
        np.maximum.at(saved, self.episode[idx], self.teacher_success[idx])
        eps = np.unique(self.episode[idx])
        success[eps] = saved[eps]
        failed = int((~self._episode_success().astype(bool)).sum())
        return {"success": float(success.mean()), "llm_call_rate": float(escalate.mean()) if len(self) else 0.0,
                "branch_hit_rate": float(len(eps) / failed) if failed else 0.0}

    def estimate_at(self, p: np.ndarray, tau: float) -> dict[str, float]:
        return self.estimate(np.asarray(p, dtype=np.float64) >= tau)


def _codes(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    uniq, inv = np.unique(values.astype(str), return_inverse=True)
    return inv.astype(np.int64), uniq


__all__ = ["ValEpisodes", "ESTIMATOR"]

"""Procedurally generated task families in each benchmark's own format (`env.code.procedural`,
`env.terminal.procedural`).

A from-scratch quickstart SLM cannot write unseen programs, so on real HumanEval or Terminal-Bench tasks it
solves about nothing and a router has nothing to decide. Each family here is a template with many instances
that differ in parameters the agent must read from the task (names, constants, files, words), so a tiny model
trained on teacher trajectories of some instances can solve a share of held-out ones. Instances are pure
functions of (seed, template, index): the same on every machine, and split by instance id.
"""
from __future__ import annotations

import random

from r2v.envs.base import stable_seed


def instance_rng(env: str, seed: int, template: str, index: int) -> random.Random:
    """The one random stream an instance is generated from."""
    return random.Random(stable_seed("procedural", env, seed, template, index))


def pick_templates(available: dict, wanted: list[str] | None, key: str) -> list[str]:
    """The configured templates (all when `wanted` is empty), in a fixed order; unknown names fail here."""
    if not wanted:
        return sorted(available)
    unknown = sorted(set(wanted) - set(available))
    if unknown:
        from r2v.errors import ConfigError

        raise ConfigError(f"`{key}` names unknown template(s) {unknown}; available: {sorted(available)}")
    return list(dict.fromkeys(wanted))

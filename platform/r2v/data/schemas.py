"""The Arrow schemas every stage agrees on. Add fields, never repurpose one; bump the version when you do.

Each schema carries its name and version in the Parquet metadata, so a reader can refuse a shard written
by another stage or another version with a message naming the file.
"""
from __future__ import annotations

import pyarrow as pa

CANDIDATE = pa.struct(
    [
        pa.field("text", pa.string()),
        pa.field("logprob", pa.float32()),  # summed token log-prob under the SLM
        pa.field("mean_logprob", pa.float32()),
        pa.field("verifier_score", pa.float32()),
    ]
)

STEPS_V1 = pa.schema(
    [
        pa.field("experiment", pa.string(), nullable=False),
        pa.field("env", pa.string(), nullable=False),
        pa.field("task_id", pa.string(), nullable=False),
        pa.field("split", pa.string(), nullable=False),
        pa.field("episode_id", pa.string(), nullable=False),
        pa.field("policy", pa.string(), nullable=False),  # teacher | slm | routed:<router> | ...
        pa.field("perturbation_seed", pa.int64(), nullable=False),
        pa.field("perturbation", pa.list_(pa.string())),  # applied at this step, e.g. "tool_flakiness/timeout"
        pa.field("step", pa.int32(), nullable=False),
        pa.field("goal", pa.string()),
        pa.field("observation", pa.string()),  # as shown to the agent
        pa.field("observation_truncated", pa.bool_()),
        pa.field("admissible", pa.list_(pa.string())),  # null where the env has no closed action set
        pa.field("history", pa.list_(pa.string())),  # previous actions of the episode
        pa.field("action", pa.string()),
        pa.field("actor", pa.string()),  # slm | teacher
        pa.field("oracle_action", pa.string()),  # the teacher's choice at this state, when known (labels)
        pa.field("candidates", pa.list_(CANDIDATE)),
        pa.field("entropy", pa.float32()),
        pa.field("features", pa.list_(pa.float32())),
        pa.field("risk", pa.float32()),
        pa.field("escalated", pa.bool_()),
        pa.field("escalation_error", pa.string()),  # teacher failure: the SLM acted instead
        pa.field("tool_failed", pa.bool_()),
        pa.field("reward", pa.float32()),
        pa.field("done", pa.bool_()),
        pa.field("episode_success", pa.bool_()),  # as reported by the environment at the episode's end
        pa.field("latency_ms", pa.float32()),
        pa.field("teacher_tokens", pa.int32()),
        pa.field("schema_version", pa.int16(), nullable=False),
    ]
)

PAIRS_V2 = pa.schema(
    [
        pa.field("experiment", pa.string(), nullable=False),
        pa.field("env", pa.string(), nullable=False),
        pa.field("task_id", pa.string(), nullable=False),
        pa.field("episode_id", pa.string(), nullable=False),
        pa.field("step", pa.int32(), nullable=False),
        pa.field("perturbation_seed", pa.int64(), nullable=False),
        pa.field("prompt", pa.string(), nullable=False),
        pa.field("chosen", pa.string(), nullable=False),
        pa.field("rejected", pa.string(), nullable=False),
        pa.field("chosen_score", pa.float32()),
        pa.field("rejected_score", pa.float32()),
        pa.field("peer_prompt", pa.string()),  # the same state (task + action prefix) under another seed (consistency)
        pa.field("peer_seed", pa.int64()),
        # v2: the split of the probed game (val pairs validate DPO) and where `chosen` came from (teacher | verifier)
        pa.field("split", pa.string()),
        pa.field("chosen_source", pa.string()),
        pa.field("schema_version", pa.int16(), nullable=False),
    ]
)

ROUTER_ROWS_V3 = pa.schema(
    [
        pa.field("experiment", pa.string(), nullable=False),
        pa.field("env", pa.string(), nullable=False),
        pa.field("task_id", pa.string(), nullable=False),
        pa.field("split", pa.string(), nullable=False),
        pa.field("episode_id", pa.string(), nullable=False),
        pa.field("perturbation_seed", pa.int64(), nullable=False),
        pa.field("step", pa.int32(), nullable=False),
        pa.field("features", pa.list_(pa.float32()), nullable=False),
        pa.field("feature_spec", pa.string()),  # name@version of the feature extractor
        pa.field("episode_failed", pa.bool_()),  # label (a): 1 - SLM episode success
        pa.field("branch_label", pa.bool_()),  # label (b): teacher branch succeeds where the SLM branch fails
        pa.field("slm_branch_success", pa.bool_()),
        pa.field("teacher_branch_success", pa.bool_()),
        pa.field("step_label", pa.bool_()),  # label (c): the SLM's action differs from the env's reference action
        pa.field("critical_label", pa.bool_()),  # label (d): step_label in an episode the SLM goes on to lose
        pa.field("label_weight", pa.float32()),  # steps of its episode each sampled branch row stands for
        pa.field("schema_version", pa.int16(), nullable=False),
    ]
)

SCHEMAS: dict[str, tuple[int, pa.Schema]] = {
    "steps": (1, STEPS_V1),
    "pairs": (2, PAIRS_V2),
    "router_rows": (3, ROUTER_ROWS_V3),
}


def schema_for(name: str) -> tuple[int, pa.Schema]:
    """(version, schema with r2v metadata) for a schema name."""
    if name not in SCHEMAS:
        raise KeyError(f"unknown schema {name!r}; known: {sorted(SCHEMAS)}")
    version, schema = SCHEMAS[name]
    meta = {b"r2v.schema": name.encode(), b"r2v.schema_version": str(version).encode()}
    return version, schema.with_metadata(meta)

"""Shards: round trips, atomic writes, skip-on-rerun keys, and loud failures on bad files."""
import os

import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from r2v.data import ShardStore, shard_key
from r2v.errors import ShardError

text = st.text(max_size=40)
floats = st.floats(allow_nan=False, allow_infinity=False, width=32)
candidate = st.fixed_dictionaries(
    {"text": text, "logprob": floats, "mean_logprob": floats, "verifier_score": st.none() | floats}
)
step_row = st.fixed_dictionaries(
    {
        "experiment": st.just("exp"),
        "env": st.sampled_from(["textworld", "code", "terminal"]),
        "task_id": text,
        "split": st.sampled_from(["train", "val", "test"]),
        "episode_id": text,
        "policy": st.sampled_from(["teacher", "slm"]),
        "perturbation_seed": st.integers(0, 2**40),
        "perturbation": st.lists(text, max_size=3),
        "step": st.integers(0, 500),
        "observation": text,
        "action": st.none() | text,
        "candidates": st.lists(candidate, max_size=4),
        "features": st.lists(floats, max_size=8),
        "escalated": st.booleans(),
        "episode_success": st.none() | st.booleans(),
    }
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.lists(step_row, min_size=1, max_size=6))
def test_steps_round_trip(tmp_path, rows):
    store = ShardStore(tmp_path / "steps", "steps")
    store.write("k", rows)
    back = store.read().to_pylist()
    assert len(back) == len(rows)
    for want, got in zip(rows, back):
        for key, value in want.items():
            if key == "candidates":
                assert [c["text"] for c in got[key]] == [c["text"] for c in value]
                assert [c["logprob"] for c in got[key]] == pytest.approx([c["logprob"] for c in value])
            elif key == "features":
                assert got[key] == pytest.approx(value)
            else:
                assert got[key] == value
        assert got["schema_version"] == 1


def test_keys_skip_on_rerun_and_never_duplicate(tmp_path):
    store = ShardStore(tmp_path / "steps", "steps")
    keys = [shard_key(task=f"t{i}", seed=0, policy="teacher") for i in range(3)]
    row = dict(experiment="e", env="textworld", task_id="t", split="train", episode_id="e0", policy="teacher",
               perturbation_seed=0, step=0)
    written = 0
    for _ in range(2):  # the second pass is a re-run: every key is already complete
        for k in keys:
            if not store.exists(k):
                store.write(k, [row, {**row, "step": 1}])
                written += 1
    assert written == 3
    assert store.completed_keys() == set(keys)
    assert store.read().num_rows == 6


def test_key_is_filename_safe():
    k = shard_key(task="tw/a b:c", seed=3, policy="routed:r2v")
    assert "/" not in k and " " not in k and ":" not in k
    assert k.startswith("task=tw_a_b_c__seed=3")


def test_corrupt_and_truncated_shards_name_the_file(tmp_path):
    store = ShardStore(tmp_path / "steps", "steps")
    row = dict(experiment="e", env="textworld", task_id="t", split="train", episode_id="e0", policy="teacher",
               perturbation_seed=0, step=0, observation="x" * 2000)
    good = store.write("good", [row] * 50)
    truncated = store.path("truncated")
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ShardError, match=r"truncated\.parquet.*corrupt or truncated.*Delete"):
        store.read()
    truncated.unlink()
    store.path("garbage").write_bytes(b"not parquet at all")
    with pytest.raises(ShardError, match=r"garbage\.parquet"):
        store.read()


def test_other_schema_or_version_is_refused(tmp_path):
    steps = ShardStore(tmp_path / "mixed", "steps")
    pairs = ShardStore(tmp_path / "mixed", "pairs")
    pairs.write("p", [dict(experiment="e", env="textworld", task_id="t", episode_id="e", step=0,
                           perturbation_seed=0, prompt="p", chosen="a", rejected="b")])
    with pytest.raises(ShardError, match=r"p\.parquet holds schema `pairs` v2, expected `steps` v1"):
        steps.read()
    # a file of our schema name but a future version
    table = pq.read_table(pairs.path("p"))
    table = table.replace_schema_metadata({b"r2v.schema": b"pairs", b"r2v.schema_version": b"99"})
    pq.write_table(table, pairs.path("p"))
    with pytest.raises(ShardError, match="v99, expected `pairs` v2"):
        pairs.read()


def test_unknown_field_is_refused_with_its_name(tmp_path):
    store = ShardStore(tmp_path / "s", "steps")
    with pytest.raises(ShardError, match=r"\['actionz'\]"):
        store.write("k", [dict(experiment="e", env="x", task_id="t", split="train", episode_id="e",
                               policy="teacher", perturbation_seed=0, step=0, actionz="go")])
    assert store.files() == []


def test_failed_write_leaves_no_partial_shard(tmp_path, monkeypatch):
    """A write that dies mid-file (full disk, kill) leaves neither a shard nor a temp file."""
    store = ShardStore(tmp_path / "s", "steps")
    row = dict(experiment="e", env="x", task_id="t", split="train", episode_id="e", policy="teacher",
               perturbation_seed=0, step=0)

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space"):
        store.write("k", [row])
    monkeypatch.undo()
    assert not store.exists("k")
    assert list((tmp_path / "s").iterdir()) == []
    store.write("k", [row])  # and the unit is simply redone on the re-run
    assert store.read().num_rows == 1


def test_empty_store_reads_as_empty_table(tmp_path):
    t = ShardStore(tmp_path / "none", "router_rows").read()
    assert t.num_rows == 0 and "features" in t.schema.names


def test_shards_of_other_inputs_are_set_aside_not_skipped(tmp_path):
    from r2v.data.shards import prepare_dir

    root = tmp_path / "eval"
    row = dict(experiment="e", env="x", task_id="t", split="test", episode_id="e", policy="p",
               perturbation_seed=0, step=0)
    prepare_dir(root, {"model": "a"})
    ShardStore(root, "steps").write("k", [row])
    prepare_dir(root, {"model": "a"})  # same inputs: a resume keeps what is done
    assert ShardStore(root, "steps").exists("k")
    prepare_dir(root, {"model": "b"})  # retrained model: the old episodes must not count as done
    assert not ShardStore(root, "steps").exists("k")
    stale = [p for p in tmp_path.iterdir() if p.name.startswith("eval.stale-")]
    assert len(stale) == 1 and ShardStore(stale[0], "steps").exists("k")  # kept, not lost

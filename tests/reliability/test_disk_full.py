"""Drill: the disk really fills up under a ShardStore (a 256 KiB tmpfs, not a monkeypatched fsync).

tests/test_shards.py::test_failed_write_leaves_no_partial_shard fakes ENOSPC by replacing `os.fsync`; here
the kernel refuses the bytes, wherever pyarrow's writer happens to be when the space runs out (a data page,
the footer, the close/flush or the fsync).
"""
from __future__ import annotations

import errno
import os
import subprocess
import uuid

import pytest

from r2v.data import ShardStore, shard_key

SIZE = "256k"


@pytest.fixture
def tiny_fs(tmp_path):
    """A real 256 KiB tmpfs mounted at a temp dir; unmounted in a finally. Skips (with the reason) when this
    process may not mount file systems."""
    if os.geteuid() != 0:
        pytest.skip("disk-full drill needs root to mount a 256 KiB tmpfs (run as root, e.g. in the CI container)")
    mnt = tmp_path / "tinyfs"
    mnt.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={SIZE}", "tmpfs", str(mnt)],
                         capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({(res.stderr or res.stdout).strip()}); "
                    "needs CAP_SYS_ADMIN (a privileged container or a VM)")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def episode_rows(i: int, steps: int = 6) -> list[dict]:
    # random hex observations: zstd cannot shrink them, so ~15 KiB per shard and the fs fills in ~15 shards
    return [dict(experiment="drill", env="textworld", task_id=f"t{i}", split="train", episode_id=f"e{i}",
                 policy="teacher", perturbation_seed=0, step=s, observation=os.urandom(1200).hex(),
                 action="go east", episode_success=True)
            for s in range(steps)]


def used_bytes(path) -> int:
    st = os.statvfs(path)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


def test_enospc_mid_write_leaves_no_partial_shard_and_keeps_the_rest(tiny_fs):
    """Must hold when the disk fills during `ShardStore.write`:
    - the failing write raises OSError(ENOSPC) to the caller (it is not swallowed);
    - no partial shard under the key and no `.tmp-` file are left, and the bytes it had written are freed;
    - every shard written before it is still listed and reads back whole (same rows, same content);
    - once space is freed, the same unit is simply written again (the re-run path)."""
    store = ShardStore(tiny_fs / "steps", "steps")
    written: dict[str, list[dict]] = {}
    failure = None
    for i in range(200):  # 256 KiB / ~15 KiB per shard: ENOSPC long before 200
        key, rows = shard_key(task=f"t{i}", seed=0, policy="teacher"), episode_rows(i)
        before = used_bytes(tiny_fs)
        try:
            store.write(key, rows)
        except OSError as e:
            failure = (key, rows, e, before)
            break
        written[key] = rows
    assert failure is not None, "the 256 KiB file system never filled up"
    key, rows, err, before = failure
    assert err.errno == errno.ENOSPC, f"expected ENOSPC, got {err!r}"
    assert len(written) >= 3, f"the fs filled after only {len(written)} shards; the drill needs several"

    # nothing of the failed write is visible or left behind
    assert not store.exists(key)
    names = sorted(p.name for p in store.root.iterdir())
    assert not [n for n in names if n.startswith(".") or ".tmp-" in n], f"temp files left behind: {names}"
    assert names == sorted(f"{k}.parquet" for k in written)
    assert used_bytes(tiny_fs) <= before, "the failed write's temp file still holds disk space"

    # every earlier shard is intact
    assert store.completed_keys() == set(written)
    df = store.read_pandas()
    assert len(df) == sum(len(r) for r in written.values())
    for k, rs in written.items():
        got = df[df["episode_id"] == rs[0]["episode_id"]].sort_values("step")
        assert list(got["observation"]) == [r["observation"] for r in rs], f"shard {k} changed"

    # free space (drop two finished shards, as an operator would move them off), then redo the unit
    for k in list(written)[:2]:
        store.path(k).unlink()
        del written[k]
    store.write(key, rows)
    assert store.exists(key) and store.read().num_rows == sum(len(r) for r in written.values()) + len(rows)


def test_enospc_on_a_full_disk_before_any_byte(tiny_fs):
    """Must hold when the disk is already full before the write starts (the temp file cannot even be
    created or grown): the write raises ENOSPC, leaves no file at all, and the store reads as before."""
    store = ShardStore(tiny_fs / "steps", "steps")
    store.write("first", episode_rows(0, steps=1))
    filler = tiny_fs / f"filler-{uuid.uuid4().hex}"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:  # eat every remaining byte (unbuffered, so the ENOSPC surfaces here and nowhere else)
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError as e:
        assert e.errno == errno.ENOSPC
    finally:
        os.close(fd)
    with pytest.raises(OSError) as info:
        store.write("second", episode_rows(1))
    assert info.value.errno == errno.ENOSPC
    assert sorted(p.name for p in store.root.iterdir()) == ["first.parquet"]
    assert store.read().num_rows == 1

"""Keyed Parquet shards: atomic writes, skip-on-rerun, readers that refuse bad files loudly.

One shard is one unit of work (an episode, a task's pairs, ...), named by its key. A shard either exists
whole or not at all (temp file + fsync + rename), so a stage re-run skips exactly the completed units and
never duplicates or loses one, even after a crash or a full disk mid-write.
"""
from __future__ import annotations

import os
import re
import time
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from r2v.data.schemas import schema_for
from r2v.errors import ShardError

SUFFIX = ".parquet"
_TMP_MARK = ".tmp-"
_UNSAFE = re.compile(r"[^A-Za-z0-9._=-]+")


def shard_key(**parts: Any) -> str:
    """A readable, file-name-safe key, e.g. shard_key(task="tw-l1-s3", seed=0, policy="teacher")."""
    if not parts:
        raise ValueError("shard_key needs at least one part")
    return "__".join(f"{k}={_UNSAFE.sub('_', str(v))}" for k, v in parts.items())


def _fix_msg(path: Path) -> str:
    return (
        f"Delete {path} and re-run the stage that wrote it; completed shards are kept and only the "
        "missing unit is regenerated."
    )


class ShardStore:
    """A directory of shards of one schema (`steps`, `pairs`, `router_rows`)."""

    def __init__(self, root: str | Path, schema: str):
        self.root = Path(root)
        self.schema_name = schema
        self.version, self.schema = schema_for(schema)

    # -- writing ---------------------------------------------------------------------------------------
    def path(self, key: str) -> Path:
        return self.root / f"{key}{SUFFIX}"

    def exists(self, key: str) -> bool:
        return self.path(key).is_file()

    def completed_keys(self) -> set[str]:
        return {p.name[: -len(SUFFIX)] for p in self.files()}

    def to_table(self, rows: Iterable[Mapping[str, Any]]) -> pa.Table:
        rows = [dict(r) for r in rows]
        names = set(self.schema.names)
        for i, row in enumerate(rows):
            unknown = set(row) - names
            if unknown:
                raise ShardError(
                    f"row {i} has fields {sorted(unknown)} that the `{self.schema_name}` schema "
                    f"v{self.version} does not define; add them to r2v/data/schemas.py (new fields only)"
                )
            row.setdefault("schema_version", self.version)
        try:
            return pa.Table.from_pylist(rows, schema=self.schema)
        except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
            raise ShardError(f"rows do not match the `{self.schema_name}` schema: {e}") from None

    def write(self, key: str, rows: Iterable[Mapping[str, Any]] | pa.Table) -> Path:
        """Write one shard atomically. Re-writing an existing key replaces it whole."""
        table = rows if isinstance(rows, pa.Table) else self.to_table(rows)
        if not table.schema.equals(self.schema, check_metadata=False):
            table = table.cast(self.schema)
        table = table.replace_schema_metadata(self.schema.metadata)
        self.root.mkdir(parents=True, exist_ok=True)
        final = self.path(key)
        tmp = self.root / f".{final.name}{_TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            with open(tmp, "wb") as f:
                pq.write_table(table, f, compression="zstd")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return final

    def remove_stale_temp(self, older_than_s: float = 3600.0) -> int:
        """Temp files left by a killed writer (never visible to readers, but they take disk)."""
        n = 0
        if self.root.is_dir():
            for p in self.root.glob(f".*{_TMP_MARK}*"):
                if time.time() - p.stat().st_mtime > older_than_s:
                    p.unlink(missing_ok=True)
                    n += 1
        return n

    # -- reading ---------------------------------------------------------------------------------------
    def files(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        return sorted(p for p in self.root.glob(f"*{SUFFIX}") if not p.name.startswith("."))

    def validate(self, path: Path) -> None:
        """Footer-only check: a readable Parquet file of this schema and version."""
        try:
            meta = pq.read_metadata(path)
        except Exception as e:
            raise ShardError(f"shard {path} is corrupt or truncated ({e}). {_fix_msg(path)}") from None
        kv = meta.metadata or {}
        name = kv.get(b"r2v.schema", b"?").decode()
        version = kv.get(b"r2v.schema_version", b"?").decode()
        if name != self.schema_name or version != str(self.version):
            raise ShardError(
                f"shard {path} holds schema `{name}` v{version}, expected `{self.schema_name}` v{self.version}. "
                f"It was written by another stage or another r2v version. {_fix_msg(path)}"
            )

    def read(self, columns: list[str] | None = None, keys: Iterable[str] | None = None) -> pa.Table:
        """All shards (or those of `keys`, which must exist) as one table (empty table with the schema when there
        are none)."""
        tables = []
        for path in (self.files() if keys is None else [self.path(k) for k in keys]):
            self.validate(path)
            try:
                tables.append(pq.read_table(path, columns=columns, schema=self.schema))
            except Exception as e:
                raise ShardError(f"shard {path} is corrupt or truncated ({e}). {_fix_msg(path)}") from None
        if not tables:
            schema = self.schema if columns is None else pa.schema([self.schema.field(c) for c in columns])
            return schema.empty_table()
        return pa.concat_tables(tables)

    def read_pandas(self, columns: list[str] | None = None, keys: Iterable[str] | None = None):
        return self.read(columns, keys).to_pandas()

    def ray_dataset(self):
        """A Ray Dataset over the shards, after the same validation as `read`."""
        import ray.data

        files = self.files()
        for path in files:
            self.validate(path)
        if not files:
            raise ShardError(f"no shards under {self.root}; run the stage that produces `{self.schema_name}` first")
        return ray.data.read_parquet([str(p) for p in files], schema=self.schema)


INPUTS_FILE = "_inputs.json"


def prepare_dir(root: str | Path, inputs: Mapping[str, Any]) -> Path:
    """Make `root` the shard folder of exactly these inputs (model fingerprints, config hashes). Shards
    made from other inputs (e.g. by a model since retrained) are never mixed in or skipped over: the old
    folder is kept aside as `<root>.stale-<time>` and a fresh one is started."""
    import json

    root = Path(root)
    want = json.dumps(dict(inputs), sort_keys=True, default=str)
    marker = root / INPUTS_FILE
    if root.is_dir() and any(root.iterdir()):
        have = marker.read_text() if marker.is_file() else None
        if have == want:
            return root
        stale = root.with_name(f"{root.name}.stale-{time.strftime('%Y%m%d-%H%M%S')}")
        os.replace(root, stale)
        print(f"[shards] {root} was made from other inputs; kept aside as {stale.name}, starting afresh")
    root.mkdir(parents=True, exist_ok=True)
    marker.write_text(want)
    return root


def fingerprint_dir(path: str | Path) -> str:
    """Cheap identity of a model directory: names, sizes and mtimes of its files."""
    import hashlib

    p = Path(path)
    if not p.is_dir():
        return "missing"
    h = hashlib.sha256()
    for f in sorted(p.rglob("*")):
        if f.is_file():
            st = f.stat()
            h.update(f"{f.relative_to(p)}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]

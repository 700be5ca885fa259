"""Data: versioned Arrow schemas and keyed, atomic Parquet shards."""
from r2v.data.schemas import PAIRS_V2, ROUTER_ROWS_V3, STEPS_V1, schema_for
from r2v.data.shards import ShardStore, shard_key

__all__ = ["STEPS_V1", "PAIRS_V2", "ROUTER_ROWS_V3", "schema_for", "ShardStore", "shard_key"]

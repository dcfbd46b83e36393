"""Pretraining data: parquet shards (nanochat's format), the embedded sample, download and ingest.

Light to import: pyarrow is loaded only when shards are read or written.
"""

from nanoctl.data.shards import (
    ShardInfo,
    ShardSet,
    iter_row_group_texts,
    iter_shard_texts,
    iter_texts,
    list_shards,
    num_row_groups,
    resolve_pretrain_shards,
    shard_info,
)

__all__ = [
    "ShardInfo",
    "ShardSet",
    "iter_row_group_texts",
    "iter_shard_texts",
    "iter_texts",
    "list_shards",
    "num_row_groups",
    "resolve_pretrain_shards",
    "shard_info",
]

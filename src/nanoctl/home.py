"""The artifact home: where shards, tokenizers, checkpoints, eval bundles and reports live.

Resolution order: explicit argument (the CLI's --home) > NANOCTL_HOME > platformdirs user cache dir.
The CLI exports --home as NANOCTL_HOME so processes it spawns (torchrun workers) see the same home.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

STAGES = ("base", "mid", "sft", "rl")  # training order; chat/serve default to the newest: rl > sft > mid > base


def resolve_home(home: str | os.PathLike[str] | None = None) -> Path:
    """Return the artifact home directory (not created here)."""
    if home:
        return Path(home).expanduser().resolve()
    env = os.environ.get("NANOCTL_HOME")
    if env:
        return Path(env).expanduser().resolve()
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("nanoctl")).resolve()


@dataclass(frozen=True)
class Home:
    """Typed view of the home layout (see DESIGN.md). Paths are not created until written to."""

    root: Path

    @classmethod
    def resolve(cls, home: str | os.PathLike[str] | None = None) -> Home:
        return cls(resolve_home(home))

    @property
    def data_dir(self) -> Path:
        """Pretraining shards (shard_00000.parquet ...); the highest-numbered one is validation."""
        return self.root / "data" / "base"

    @property
    def sample_data_dir(self) -> Path:
        """Shards materialized from the embedded sample corpus, used when data_dir has none."""
        return self.root / "data" / "sample"

    @property
    def tasks_dir(self) -> Path:
        return self.root / "data" / "tasks"

    @property
    def tokenizer_dir(self) -> Path:
        return self.root / "tokenizer"

    @property
    def checkpoints_root(self) -> Path:
        return self.root / "checkpoints"

    def checkpoint_dir(self, stage: str, tag: str) -> Path:
        return self.checkpoints_root / stage / tag

    @property
    def eval_bundle_dir(self) -> Path:
        return self.root / "eval" / "bundle"

    @property
    def reports_root(self) -> Path:
        return self.root / "reports"

    def report_dir(self, tag: str) -> Path:
        return self.reports_root / tag

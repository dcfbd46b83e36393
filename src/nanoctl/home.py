"""The artifact home: where shards, tokenizers, checkpoints, eval bundles and reports live.

The home is resolved once, by an entry point, and passed down as a `Home`: `Home.resolve` is the one
place that reads NANOCTL_HOME or asks platformdirs. Only entry points call it (the CLI's root callback,
and the public top-level functions a library user calls, such as `train_tokenizer` or `eval_base`,
which take `home: Home | str | PathLike | None = None`); everything below them takes `home: Home` and
never consults the environment. Processes spawned for a run (torchrun workers) get the resolved home
in their own environment (see `dist.relaunch_with_torchrun`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

STAGES = ("base", "mid", "sft", "rl")  # training order; chat defaults to the newest: rl > sft > mid > base
HOME_ENV = "NANOCTL_HOME"


@dataclass(frozen=True)
class Home:
    """Typed view of the home layout (see DESIGN.md). Paths are not created until written to."""

    root: Path

    @classmethod
    def resolve(cls, home: Home | str | os.PathLike[str] | None = None) -> Home:
        """The home to use: `home` itself when it is a Home, else the explicit path (the CLI's --home)
        > $NANOCTL_HOME > the platformdirs user cache dir. Nothing is created here.

        Call it only in entry points (once, at the top); library code below them takes a `Home`.
        """
        if isinstance(home, Home):
            return home
        if home:
            return cls(Path(home).expanduser().resolve())
        env = os.environ.get(HOME_ENV)
        if env:
            return cls(Path(env).expanduser().resolve())
        from platformdirs import user_cache_dir

        return cls(Path(user_cache_dir("nanoctl")).resolve())

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
    def adapters_root(self) -> Path:
        return self.root / "adapters"

    def adapter_dir(self, stage: str, tag: str) -> Path:
        """A LoRA run of `stage` (--lora-rank): its checkpoints plus PEFT's adapter files."""
        return self.adapters_root / stage / tag

    @property
    def eval_bundle_dir(self) -> Path:
        return self.root / "eval" / "bundle"

    @property
    def reports_root(self) -> Path:
        return self.root / "reports"

    def report_dir(self, tag: str) -> Path:
        return self.reports_root / tag

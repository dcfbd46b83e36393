"""Training metrics: one JSON object per line in `<report_dir>/metrics.jsonl`, optionally mirrored to wandb.

Only rank 0 writes (other ranks get a no-op logger), so a multi-process run leaves one file. wandb is
imported lazily and only when a run name is given, so it stays an optional dependency.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

from nanoctl.errors import NanoctlError


def _jsonable(value: Any) -> Any:
    # Tensors/numpy scalars -> Python numbers; NaN/inf -> None so every line stays strict JSON.
    if hasattr(value, "item") and callable(value.item):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class MetricsLogger:
    """Append-only JSONL metrics log (rank 0 only) with optional wandb forwarding."""

    def __init__(
        self,
        report_dir: str | os.PathLike[str] | None,
        wandb_project: str | None = None,
        wandb_run: str | None = None,
        *,
        rank: int = 0,
        config: dict[str, Any] | None = None,
        truncate_after_step: int | None = None,
    ) -> None:
        self.enabled = rank == 0 and report_dir is not None
        self.path: Path | None = None
        self._file = None
        self._wandb = None
        if not self.enabled:
            return
        self.path = Path(report_dir) / "metrics.jsonl"  # type: ignore[arg-type]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if truncate_after_step is not None:
            self._truncate(truncate_after_step)
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        if wandb_run and wandb_run != "dummy":
            try:
                import wandb
            except ImportError as e:
                raise NanoctlError(
                    "--wandb-run needs the wandb package", "install it: uv pip install wandb"
                ) from e
            self._wandb = wandb.init(project=wandb_project or "nanoctl", name=wandb_run, config=config or {})

    def _truncate(self, step: int) -> None:
        """Drop lines logged after `step`: a resumed run re-logs them, so the file never holds duplicates."""
        assert self.path is not None
        if not self.path.exists():
            return
        kept = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line torn by a kill mid-write
            if rec.get("step", -1) <= step:
                kept.append(line)
        from nanoctl.atomic import atomic_write_text

        atomic_write_text(self.path, "".join(k + "\n" for k in kept))

    def log(self, step: int, **values: Any) -> None:
        if not self.enabled or self._file is None:
            return
        rec = {"step": step, "time": round(time.time(), 3)}
        rec.update({k: _jsonable(v) for k, v in values.items()})
        self._file.write(json.dumps(rec) + "\n")
        self._file.flush()  # a kill must not lose already-reported steps
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in rec.items() if k != "time"}, step=step)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

"""Ctrl+C / SIGTERM during training: save at the next step boundary, then exit 130."""

from __future__ import annotations

import signal
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


class StopSignal:
    """First Ctrl+C (or SIGTERM) sets `requested`; the loop saves at the next step boundary and raises
    `Interrupted` (exit 130). A second Ctrl+C aborts at once."""

    def __init__(self) -> None:
        self.requested: str | None = None
        self._old: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name
        print(
            f"\n{self.requested}: saving a checkpoint at the end of this step (Ctrl+C again to abort)",
            file=sys.stderr,
            flush=True,
        )

    def __enter__(self) -> StopSignal:
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old.clear()

    def should_stop(self, device: torch.device) -> bool:
        """Agreed across ranks (any rank signalled -> all stop at the same step)."""
        from nanoctl.dist import all_reduce_max

        return all_reduce_max(1.0 if self.requested else 0.0, device) > 0

"""How a worker process ended, and naming signals."""

from __future__ import annotations

import signal as _signal
from typing import Any, Optional

__all__ = ["ExitInfo", "signal_number"]


def signal_number(sig: Any) -> int:
    """Accept ``15``, ``"TERM"``, ``"SIGTERM"`` or ``signal.SIGTERM``; return the number."""
    if isinstance(sig, int):
        return int(sig)
    name = str(sig).upper()
    if not name.startswith("SIG"):
        name = "SIG" + name
    try:
        return int(getattr(_signal, name))
    except AttributeError:
        raise ValueError(f"unknown signal {sig!r}") from None


class ExitInfo:
    """
    How a worker process ended.

    :ivar kind: ``clean`` (exit 0, not asked to), ``crash`` (non-zero exit or a
        signal), ``boot-failure`` (exited before it reported READY), ``hung`` (killed
        after missing heartbeats), ``stopped`` (exited after we asked it to stop).
    """

    __slots__ = ("code", "kind", "signal")

    def __init__(self, code: Optional[int], signal: Optional[int], kind: str) -> None:
        self.code = code
        self.signal = signal
        self.kind = kind

    def as_dict(self) -> dict[str, Any]:
        """A JSON-friendly view."""
        return {"code": self.code, "signal": self.signal, "kind": self.kind}

    def describe(self) -> str:
        """``exit code 3`` or ``signal SIGKILL``."""
        if self.signal is not None:
            try:
                return f"signal {_signal.Signals(self.signal).name}"
            except ValueError:
                return f"signal {self.signal}"
        return f"exit code {self.code}"

"""Fault injection for the reliability tests: a real SIGKILL at a named point of a real run."""

from __future__ import annotations

import os
import signal


def crash_point(name: str) -> None:
    """SIGKILL this process at `name` when CHARFORGE_CRASH_AT says so (`after_decision`, `alias_move`)."""
    if os.environ.get("CHARFORGE_CRASH_AT") == name:
        os.kill(os.getpid(), signal.SIGKILL)

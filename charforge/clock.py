"""Timestamps as charforge records them (MLflow tags, results, audit lines): UTC, to the second, ISO 8601."""

from __future__ import annotations

import time


def utc(t: float | None = None) -> str:
    """`2026-12-06T14:05:00Z` for epoch seconds `t` (default: now)."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))

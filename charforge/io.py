"""Files that a crash must never leave half-written."""

from __future__ import annotations

import json
import os
from pathlib import Path


def write_json_atomic(path: Path, data: object, sync: bool = True) -> None:
    """Write JSON to `path` so that a reader (or a crash at any moment) sees the previous content or the new one,
    never a part: written beside it, flushed to disk, then renamed over it."""
    write_text_atomic(path, json.dumps(data, indent=2), sync)


def write_text_atomic(path: Path, text: str, sync: bool = True) -> None:
    """`text` into `path`, all or nothing (see write_json_atomic)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        if sync:
            os.fsync(handle.fileno())
    os.replace(tmp, path)
    if not sync:  # a copy: after a power loss it may lag or be unusable (its readers must cope)
        return
    try:  # the rename itself reaches the disk only when the folder is synced
        folder = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(folder)
    except OSError:
        pass
    finally:
        os.close(folder)

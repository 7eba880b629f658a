"""The gateway's credentials: an inference key ring (apps that chat) and an admin key ring (deployments, operators).

A ring holds one or more keys, so a key is rotated without downtime: add the new key, move the clients, remove the
old one. Keys come from an environment variable (`KEY` or `KEY_a,KEY_b`) or, where the variable is unset, from the
file named by `<VAR>_FILE` (one key per line; re-read when it changes, the way Kubernetes updates a mounted Secret),
so a running gateway takes a rotation without a restart. Presented keys are compared in constant time against every
key of the ring.

A ring that was configured never opens: a variable set to nothing usable (`" "`, `","`) or a key file that is missing
or empty at start is an error naming the variable, and a key file emptied later refuses every key until it holds one
again. Only a ring nobody configured (neither variable set) leaves its API open.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from pathlib import Path

from charforge.errors import InputError


def fingerprint(key: str) -> str:
    """What logs and the audit trail show of a key: never the key itself."""
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()[:12]


class KeyRing:
    """Valid keys; static, or read from a file that may change while the gateway runs."""

    def __init__(self, keys: list[str] | tuple[str, ...] = (), file: Path | None = None) -> None:
        self._static = tuple(k for k in keys if k)
        self.file = Path(file) if file else None
        self._stamp: tuple[int, int, int] | None = None
        self._from_file: tuple[str, ...] = ()

    @property
    def configured(self) -> bool:
        """Keys were given (or a key file): the API they guard is closed to anyone without one of them."""
        return bool(self._static) or self.file is not None

    @classmethod
    def of(cls, value: KeyRing | str | list[str] | None) -> KeyRing:
        if isinstance(value, KeyRing):
            return value
        if value is None:
            return cls()
        return cls([value] if isinstance(value, str) else list(value))

    @classmethod
    def from_env(cls, var: str | None) -> KeyRing:
        """`$VAR` (comma-separated keys), else the file `$VAR_FILE` names, else no key."""
        if not var:
            return cls()
        if os.environ.get(var):
            ring = cls([k.strip() for k in os.environ[var].split(",")])
            if not ring.keys():
                raise InputError(f"${var} is set but holds no key ({os.environ[var]!r}): set it to the key (or "
                                 f"comma-separated keys), or unset it")
            return ring
        if os.environ.get(f"{var}_FILE"):
            ring = cls(file=Path(os.environ[f"{var}_FILE"]))
            try:
                keys = ring.keys()
            except OSError as exc:
                raise InputError(f"${var}_FILE names {ring.file}, which cannot be read ({exc.strerror}): mount or "
                                 f"write the key file there, or unset ${var}_FILE") from None
            if not keys:
                raise InputError(f"${var}_FILE names {ring.file}, which is missing or holds no key: write one key "
                                 f"per line there, or unset ${var}_FILE")
            return ring
        return cls()

    def keys(self) -> tuple[str, ...]:
        if self.file is None:
            return self._static
        try:
            st = self.file.stat()
        except OSError:  # removed mid-rotation: keep the last keys read rather than lock everyone out
            return self._from_file
        if self._stamp != (st.st_mtime_ns, st.st_size, st.st_ino):
            try:
                lines = self.file.read_text().splitlines()
            except OSError:  # replaced between stat and read: the next call reads it
                return self._from_file
            self._from_file = tuple(k.strip() for k in lines if k.strip() and not k.lstrip().startswith("#"))
            self._stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        return self._from_file

    def __bool__(self) -> bool:
        """Configured, whether or not its file holds a key right now (an emptied file refuses everyone)."""
        return self.configured

    def first(self) -> str | None:
        """The key a client of this ring sends (the first one listed)."""
        keys = self.keys()
        return keys[0] if keys else None

    def match(self, presented: str | None) -> str | None:
        """The fingerprint of the key `presented` equals, or None; every key is compared, in constant time."""
        if not presented:
            return None
        found = None
        for key in self.keys():
            if hmac.compare_digest(presented.encode(), key.encode()):
                found = fingerprint(key)
        return found


def presented_key(authorization: str | None) -> str | None:
    """The key of an `Authorization: Bearer <key>` header."""
    if not authorization or not authorization.startswith("Bearer "):
        return None
    return authorization[len("Bearer "):].strip() or None

"""HTTP details shared by every client of a charforge server (the gateway, a vLLM replica, an OpenAI endpoint)."""

from __future__ import annotations


def bearer(key: str | None) -> dict[str, str]:
    """The `Authorization: Bearer <key>` header, or no header when there is no key."""
    return {"authorization": f"Bearer {key}"} if key else {}

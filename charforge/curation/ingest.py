"""Reading seed JSONL: every line becomes either a conversation or a Drop with a machine-readable reason."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from charforge.errors import InputError

ROLES = {"system", "user", "assistant"}


@dataclass(frozen=True)
class Drop:
    """Why a row was quarantined: `reason` is a stable key for counting, `detail` is for the reviewer."""

    reason: str
    detail: str


# Captured production conversations (`charforge capture export`, the retrain chain's `source: production` input): only
# a reply a user rated up, and the monitor did not flag, becomes a training target; the others are quarantined with
# their reason (rated-down and monitor-flagged ones are the preference stage's negatives).
RATINGS = ("up", "down")


def production_drop(obj: dict) -> Drop | None:
    """None for a captured reply a user rated up that the monitor did not flag; otherwise why it may not be a
    supervised training target. A user's thumbs-down names the row first; a flag outranks a thumbs-up (a user who
    pushed a character out of persona may like the break)."""
    rating, flagged = obj.get("rating"), obj.get("flagged")
    if flagged and rating != "down":
        reasons = ", ".join(map(str, flagged)) if isinstance(flagged, list) else str(flagged)
        return Drop("monitor_flagged", f"the monitor flagged this reply ({reasons[:80]}; rated "
                                       f"{json.dumps(rating)[:20]}): kept as a negative for preference tuning, never "
                                       f"a training target")
    if rating == "up":
        return None
    if rating == "down":
        comment = obj.get("comment")
        return Drop("rated_down", "a user rated this reply down" + (f" ({str(comment)[:120]!r})" if comment else "")
                    + ": kept as a negative for preference tuning, never a training target")
    if rating is None:
        return Drop("unrated", "a captured model reply no user rated: the model is never trained on its own "
                               "unjudged output")
    return Drop("unknown_rating", f"rating {json.dumps(rating)[:40]}; expected \"up\", \"down\" or null")


def expand_inputs(paths: list[Path]) -> list[Path]:
    """Files as given, directories as their `*.jsonl` files in name order; unusable paths raise InputError."""
    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted(path.glob("*.jsonl"))
            if not found:
                raise InputError(f"{path}: directory has no *.jsonl files")
            for entry in found:
                if not entry.is_file():
                    raise InputError(f"{entry}: not a file (a directory or a broken link named like an input)")
            files.extend(found)
        elif path.is_file():
            try:
                with open(path, "rb"):
                    pass
            except OSError as err:
                raise InputError(f"{path}: cannot read input ({err.strerror})") from None
            files.append(path)
        else:
            raise InputError(f"{path}: input not found")
    return files


def read_lines(path: Path) -> Iterator[tuple[int, int, bytes]]:
    """Yield (1-based line number, byte offset, raw bytes without the newline); never decodes, so bad bytes
    survive to be reported."""
    offset = 0
    with open(path, "rb") as fh:
        for number, line in enumerate(fh, start=1):
            yield number, offset, line.rstrip(b"\r\n")
            offset += len(line)


def read_line_at(path: Path, offset: int) -> bytes:
    """The raw line starting at `offset` (to quote an original row without keeping it in memory)."""
    with open(path, "rb") as fh:
        fh.seek(offset)
        return fh.readline().rstrip(b"\r\n")


def raw_text(line: bytes) -> str:
    """The original line as text, with undecodable bytes escaped (\\xff) so rejected.jsonl stays valid UTF-8."""
    return line.decode("utf-8", errors="backslashreplace")


def parse_conversation(line: bytes) -> tuple[dict | None, Drop | None]:
    """Decode and shape-check one line of the seed format: {"messages": [...], "character"?: str}."""
    if not line.strip():
        return None, Drop("empty_line", "blank line")
    try:
        text = line.decode("utf-8").removeprefix("\ufeff")  # a UTF-8 BOM opens the first line of some exports
    except UnicodeDecodeError as err:
        return None, Drop("not_utf8", f"invalid byte 0x{line[err.start]:02x} at byte {err.start}")
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as err:
        return None, Drop("not_json", f"{err.msg} at column {err.colno}")
    except RecursionError:
        return None, Drop("not_json", "nested deeper than the JSON parser's recursion limit")
    except ValueError as err:  # e.g. an integer literal longer than Python converts
        return None, Drop("not_json", str(err).split(";")[0])
    return obj, check_shape(obj)


def is_text(value: str) -> bool:
    """False for strings JSON can hold but UTF-8 cannot: lone surrogates from `\\ud800`-style escapes."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def check_shape(obj: object) -> Drop | None:
    """The structural rules a trainable conversation must meet."""
    if not isinstance(obj, dict) or not isinstance(obj.get("messages"), list) or not obj["messages"]:
        return Drop("no_messages", "expected an object with a non-empty 'messages' list")
    if "character" in obj and not isinstance(obj["character"], str):
        return Drop("unknown_character", f"'character' must be a string, got {type(obj['character']).__name__}")
    messages = obj["messages"]
    for i, msg in enumerate(messages):
        role = msg.get("role") if isinstance(msg, dict) else msg
        if not isinstance(msg, dict) or not isinstance(role, str) or role not in ROLES:
            return Drop("unknown_role", f"message {i} has role {role!r}; expected system, user or assistant")
        if not isinstance(msg.get("content"), str):
            return Drop("non_string_content", f"message {i} content is {type(msg.get('content')).__name__}")
        if not is_text(msg["content"]):
            return Drop("not_utf8", f"message {i} content has a lone surrogate (a \\ud800-\\udfff escape)")
        if msg["role"] == "system" and i > 0:
            return Drop("system_not_first", f"system message at position {i}")
    assistants = [m for m in messages if m["role"] == "assistant"]
    if not assistants:
        return Drop("no_assistant_turn", "no assistant message to learn from")
    for i, msg in enumerate(messages):
        if msg["role"] == "assistant" and not msg["content"].strip():
            return Drop("empty_assistant", f"message {i} (assistant) is empty")
    return None

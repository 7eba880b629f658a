"""Text normalisation and PII scrubbing: PII becomes a typed placeholder, counted per kind."""

from __future__ import annotations

import re
import unicodedata
from collections import Counter

# Zero-width and bidi control characters: invisible, yet they split words and defeat filters and dedup.
_INVISIBLE = re.compile("[\u200b-\u200f\u202a-\u202e\u2060-\u2064\ufeff]")
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_HSPACE = re.compile(r"[ \t\u00a0\u2000-\u200a\u3000]+")
_BLANK_LINES = re.compile(r"\n{3,}")

# Order matters: IP addresses before phone numbers, whose digit groups they would otherwise match.
PII_PATTERNS: dict[str, re.Pattern] = {
    "email": re.compile(r"(?<![\w.+-])[\w.+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b"),
    "ip_address": re.compile(r"(?<![\w.])(?:(?:25[0-5]|2[0-4]\d|1?\d?\d)\.){3}(?:25[0-5]|2[0-4]\d|1?\d?\d)(?!\w|\.\d)"),
    # International or North-American style numbers with separators: +44 20 7946 0958, (555) 123-4567, 555.987.6543
    "phone": re.compile(
        r"(?<![\w+])(?:\+\d{1,3}[\s.-]?)?(?:\(\d{2,4}\)\s?|\d{2,4}[\s.-])\d{3,4}[\s.-]\d{3,4}(?![\w])"
    ),
}
# Cheap pre-checks: most text has no '@' and many lines no digit, so most regex scans can be skipped.
_PRECHECK = {"email": re.compile("@"), "ip_address": re.compile(r"\d"), "phone": re.compile(r"\d")}
# any kind's pre-check, in one scan ("@|\d"): text it does not match needs no PII regex at all
_ANY_PRECHECK = re.compile("|".join(sorted({check.pattern for check in _PRECHECK.values()})))
PLACEHOLDERS = {"email": "[EMAIL]", "phone": "[PHONE]", "ip_address": "[IP_ADDRESS]"}


def normalize_text(text: str) -> str:
    """NFC, no invisible or control characters, single spaces, trimmed lines, at most one blank line in a row."""
    text = unicodedata.normalize("NFC", text.replace("\r\n", "\n").replace("\r", "\n"))
    text = _CONTROL.sub("", _INVISIBLE.sub("", text))
    lines = [_HSPACE.sub(" ", line).strip() for line in text.split("\n")]
    return _BLANK_LINES.sub("\n\n", "\n".join(lines)).strip()


def may_hold_pii(text: str) -> bool:
    """False when no PII pattern can match (no '@' and no digit): most chat text, which then needs no regex."""
    return _ANY_PRECHECK.search(text) is not None


def scrub_pii(text: str, kinds: list[str]) -> tuple[str, Counter]:
    """Replace each enabled PII kind with its placeholder; return the new text and counts per kind."""
    counts: Counter = Counter()
    for kind in (k for k in PII_PATTERNS if k in kinds):
        if not _PRECHECK[kind].search(text):
            continue
        text, n = PII_PATTERNS[kind].subn(PLACEHOLDERS[kind], text)
        if n:
            counts[kind] += n
    return text, counts

"""Exact and near-duplicate detection; the first occurrence in input order is the one kept."""

from __future__ import annotations

import hashlib
import json
import re
import zlib

import numpy as np
from datasketch import MinHash, MinHashLSH

_WORD = re.compile(r"\w+")


def content_key(character: str, messages: list[dict]) -> bytes:
    """Identity of a conversation's content (character + role/content pairs), 16 bytes."""
    payload = json.dumps([character, [[m["role"], m["content"]] for m in messages]], ensure_ascii=False)
    return hashlib.blake2b(payload.encode(), digest_size=16).digest()


def shingles(messages: list[dict], n: int) -> list[bytes]:
    """Lower-cased word n-grams of the user/assistant text; punctuation-only edits vanish here."""
    words = _WORD.findall(" ".join(m["content"] for m in messages if m["role"] != "system").casefold())
    if len(words) < n:
        return [" ".join(words).encode()]
    return list({" ".join(words[i : i + n]).encode() for i in range(len(words) - n + 1)})


class ExactDeduper:
    def __init__(self) -> None:
        self.seen: dict[bytes, int] = {}

    def check(self, key: bytes, row_id: int) -> int | None:
        """Row id of an earlier identical row, else None (and remember this one)."""
        first = self.seen.setdefault(key, row_id)
        return None if first == row_id else first


class NearDeduper:
    """MinHash LSH over word shingles (datasketch), candidates confirmed by their estimated Jaccard.

    The LSH bands are tuned for recall (missing a near duplicate costs more than checking a candidate);
    the confirmation step then removes the extra false positives, so unrelated rows are never dropped.
    """

    def __init__(self, threshold: float, num_perm: int, shingle_words: int) -> None:
        self.threshold = threshold
        self.num_perm = num_perm
        self.n = shingle_words
        # Band keys are hashed to 8 bytes: at a million rows the raw band bytes would dominate memory.
        self.lsh = MinHashLSH(threshold=threshold, num_perm=num_perm, weights=(0.2, 0.8), hashfunc=_hash8)
        self.kept: dict[int, np.ndarray] = {}

    def signatures(self, batch: list[list[dict]]) -> list[MinHash]:
        # crc32 is deterministic and ~10x cheaper than datasketch's default sha1 per shingle; the MinHash
        # permutations on top of it supply the mixing.
        return MinHash.bulk([shingles(m, self.n) for m in batch], num_perm=self.num_perm, seed=1, hashfunc=zlib.crc32)

    def check(self, signature: MinHash, row_id: int) -> int | None:
        """Row id of an earlier near-identical row, else None (and index this one)."""
        values = signature.hashvalues.astype(np.uint32)
        for candidate in sorted(self.lsh.query(signature)):
            if np.count_nonzero(self.kept[candidate] == values) / self.num_perm >= self.threshold:
                return candidate
        self.lsh.insert(row_id, signature, check_duplication=False)
        self.kept[row_id] = values
        return None


def _hash8(band: bytes) -> bytes:
    return hashlib.blake2b(band, digest_size=8).digest()

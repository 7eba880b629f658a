"""Exact and near-duplicate detection; the first occurrence in input order is the one kept."""

from __future__ import annotations

import hashlib
import json
import re
import zlib

import numpy as np
from datasketch import MinHash

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


def minhash_signatures(batch: list[list[dict]], num_perm: int, shingle_words: int) -> np.ndarray:
    """One uint16 MinHash signature row per conversation (datasketch MinHash over word shingles).

    crc32 is deterministic and ~10x cheaper than datasketch's default sha1 per shingle; the MinHash permutations on
    top of it supply the mixing. 16 bits per min-hash are plenty to test equality.
    """
    hashes = MinHash.bulk([shingles(m, shingle_words) for m in batch], num_perm=num_perm, seed=1,
                          hashfunc=zlib.crc32)
    return np.stack([h.hashvalues for h in hashes]).astype(np.uint16)


class ExactDeduper:
    def __init__(self) -> None:
        self.seen: dict[bytes, int] = {}

    def check(self, key: bytes, row_id: int) -> int | None:
        """Row id of an earlier identical row, else None (and remember this one)."""
        first = self.seen.setdefault(key, row_id)
        return None if first == row_id else first


class NearDeduper:
    """MinHash LSH: datasketch MinHash signatures over word shingles, banded into a compact index of our own,
    each candidate confirmed by its estimated Jaccard before a row is dropped.

    datasketch's MinHashLSH keeps ~5 KB of Python objects per indexed row (a set per bucket, a list of band keys per
    row): 5.3 GB peak at a million rows. Here a bucket is one dict slot per band holding the first row's slot, and
    signatures live in one growing uint16 matrix (16 bits per min-hash are plenty to test equality).
    """

    def __init__(self, threshold: float, num_perm: int, bands: int) -> None:
        if num_perm % bands:
            raise ValueError(f"num_perm {num_perm} must be a multiple of bands {bands}")
        self.threshold, self.num_perm, self.bands = threshold, num_perm, bands
        self.width = num_perm // bands
        self.tables: list[dict[int, int]] = [{} for _ in range(bands)]
        self.matrix = np.zeros((1024, num_perm), dtype=np.uint16)
        self.row_of_slot: list[int] = []
        mixer = np.random.default_rng(20240531).integers(1, 2**63, size=self.width, dtype=np.uint64) | np.uint64(1)
        self.mixer = mixer  # odd multipliers: a band's values fold into one 64-bit key

    def band_keys(self, signature: np.ndarray) -> list[int]:
        bands = signature.reshape(self.bands, self.width).astype(np.uint64)
        return (bands * self.mixer).sum(axis=1, dtype=np.uint64).tolist()

    def check(self, signature: np.ndarray, row_id: int) -> int | None:
        """Row id of an earlier near-identical row, else None (and index this one)."""
        keys = self.band_keys(signature)
        candidates = sorted({t[k] for t, k in zip(self.tables, keys) if k in t})
        for slot in candidates:
            if np.count_nonzero(self.matrix[slot] == signature) / self.num_perm >= self.threshold:
                return self.row_of_slot[slot]
        slot = len(self.row_of_slot)
        if slot == len(self.matrix):
            self.matrix = np.concatenate([self.matrix, np.zeros_like(self.matrix)])
        self.matrix[slot] = signature
        self.row_of_slot.append(row_id)
        for table, key in zip(self.tables, keys):
            table.setdefault(key, slot)
        return None



"""Per-character balance cap and a stratified, seeded train/eval split."""

from __future__ import annotations

import random

TRAIN, EVAL, OVER_CAP = 0, 1, 2


def eval_count(n: int, fraction: float, minimum: int) -> int:
    """How many of a character's `n` rows go to eval; train always keeps at least one row."""
    if n <= 1:
        return 0
    count = round(n * fraction)
    if n > minimum:
        count = max(count, minimum)
    return min(count, n - 1)


def assign_splits(
    characters: list[str], cap: int | None, fraction: float, minimum: int, seed: int
) -> bytearray:
    """Assign each kept row (by position) TRAIN, EVAL or OVER_CAP, deterministically from `seed`."""
    by_character: dict[str, list[int]] = {}
    for row, character in enumerate(characters):
        by_character.setdefault(character, []).append(row)
    assignment = bytearray(len(characters))
    for character in sorted(by_character):
        rows = by_character[character]
        random.Random(f"{seed}:{character}").shuffle(rows)
        kept = rows[:cap] if cap else rows
        for row in rows[len(kept):]:
            assignment[row] = OVER_CAP
        for row in kept[: eval_count(len(kept), fraction, minimum)]:
            assignment[row] = EVAL
    return assignment

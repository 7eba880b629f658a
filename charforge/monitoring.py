"""Character drift in live traffic: the captured replies of a window scored with the evaluation's judges, per route
and served version, against the limits of `configs/monitor.yaml`; and the cooldown that keeps one drift from
announcing itself every window.

Pure functions over captured rows (`serving/capture.py` writes them; `tasks/monitor.py` reads the store and acts).
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from pathlib import Path
from statistics import NormalDist

import numpy as np

from charforge.characters import load_characters
from charforge.curation.persona import PersonaIndex
from charforge.evaluation.lm_eval_tasks import classifier, identifier
from charforge.evaluation.metrics import GENERIC_ASSISTANT, is_empty, out_of_character, repetition
from charforge.io import write_json_atomic
from charforge.results import Crossing, WindowJudgement
from charforge.schemas.monitor import MONITOR_METRICS, Limit, MonitorConfig
from charforge.settings import repo_path


def reply_scores(rows: list[dict], cfg: MonitorConfig) -> list[dict]:
    """Per captured reply with a known character: its route, version and each per-reply metric. Replies asked under
    no card's system prompt cannot be judged for character and are left out (counted by the caller)."""
    cards_dir = str(repo_path(cfg.characters_dir))
    cards = load_characters(Path(cards_dir))
    index = PersonaIndex(cards)
    known = []
    for row in rows:
        messages = [m for m in row.get("messages", []) if isinstance(m, dict) and isinstance(m.get("content"), str)]
        if not messages or row.get("status") != "200" or not isinstance(row.get("reply"), str):
            continue
        character, _ = index.resolve({"messages": messages})
        if character is not None:
            user = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
            known.append((row, character, user))
    if not known:
        return []
    ident = identifier(cards_dir)
    replies = [row["reply"].strip() for row, _, _ in known]
    vectors = ident.encoder.encode(replies)
    voices = classifier(cards_dir, str(repo_path(cfg.probes))).predict(replies, vectors)
    guesses = ident.identify_vectors(vectors, [c for _, c, _ in known])
    return [{"route": row["route"], "version": row["version"], "id": row.get("id"), "at": row.get("at"),
             "user_hash": row.get("user_hash"), "character": character,
             "ooc_rate": out_of_character(reply, user, cards[character]),
             "assistant_voice_rate": float(guess.character == GENERIC_ASSISTANT),
             "char_id_clf": float(voice == character), "repetition": repetition(reply), "empty_rate": is_empty(reply)}
            for (row, character, user), reply, voice, guess in zip(known, replies, voices, guesses)]


def crossing(value: float, limit: Limit) -> bool:
    return (limit.max is not None and value > limit.max) or (limit.min is not None and value < limit.min)


# Metrics whose per-reply value is 0 or 1 (a share of replies or ratings): Wilson intervals; the others are means.
RATES = {"ooc_rate", "assistant_voice_rate", "char_id_clf", "empty_rate", "thumbs_down_ratio"}


def interval(metric: str, samples: list[float], confidence: float) -> tuple[float, float]:
    """The `confidence` interval of a window's value from its per-reply (or per-rating) samples: Wilson's score
    interval for a rate (honest at 0 or 1 and at a dozen replies, where the normal one is not), a normal interval for
    a mean; the point value at `confidence` 0."""
    n, mean = len(samples), float(np.mean(samples))
    if confidence == 0 or n == 0:
        return mean, mean
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    if metric in RATES:
        centre = (mean + z * z / (2 * n)) / (1 + z * z / n)
        half = z * np.sqrt(mean * (1 - mean) / n + z * z / (4 * n * n)) / (1 + z * z / n)
        return max(0.0, float(centre - half)), min(1.0, float(centre + half))
    half = z * float(np.std(samples, ddof=1)) / np.sqrt(n) if n > 1 else float("inf")
    return mean - half, mean + half


def flagged_replies(scores: list[dict], cfg: MonitorConfig, now: float) -> list[dict]:
    """The replies whose own value crosses a limit named in `flag_replies` (an out-of-character line, an assistant
    voice, a loop, an empty answer), as the capture store keeps them: the capture id, its route, version and user
    hash (a user's purge removes the flags too), when it was captured and flagged, and the metrics that flagged it.
    Curation never trains on a flagged reply."""
    out = []
    for s in scores:
        reasons = [m for m in cfg.flag_replies if m in s and crossing(s[m], cfg.limits[m])]
        if reasons and s.get("id"):
            out.append({"id": s["id"], "at": s["at"], "flagged_at": now, "route": s["route"], "version": s["version"],
                        "user_hash": s.get("user_hash"), "reasons": reasons})
    return out


def judge_window(rows: list[dict], ratings: list[dict], cfg: MonitorConfig, since: float, until: float,
                 scores: list[dict] | None = None) -> list[WindowJudgement]:
    """One judgement per (route, version) seen in the window's captures or ratings (`scores`: `reply_scores(rows)`
    when the caller already has them)."""
    scores = reply_scores(rows, cfg) if scores is None else scores
    flags = {f["id"] for f in flagged_replies(scores, cfg, until)}
    scored: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for s in scores:
        scored[(s["route"], s["version"])].append(s)
    captured: dict[tuple[str, str], int] = defaultdict(int)
    for row in rows:
        captured[(row["route"], row["version"])] += 1
    rated: dict[tuple[str, str], list[str]] = defaultdict(list)
    for r in ratings:
        if since <= r["at"] < until:
            rated[(r["route"], r["version"])].append(r["rating"])
    out = []
    for key in sorted(set(captured) | set(rated)):
        replies, votes = scored.get(key, []), rated.get(key, [])
        samples = {m: [s[m] for s in replies] for m in MONITOR_METRICS if replies and m in replies[0]}
        if len(votes) >= cfg.min_ratings:
            samples["thumbs_down_ratio"] = [float(v == "down") for v in votes]
        values = {m: float(np.mean(v)) for m, v in samples.items()}
        judged = len(replies) >= cfg.min_replies
        crossings = []
        for metric, limit in cfg.limits.items():
            value = values.get(metric)
            if value is None or (not judged and metric != "thumbs_down_ratio"):
                continue
            low, high = interval(metric, samples[metric], cfg.confidence)
            bound = low if limit.max is not None else high  # the end nearest the limit must be past it too
            if crossing(value, limit) and crossing(bound, limit):
                crossings.append(Crossing(metric=metric, value=round(value, 4), bound=round(bound, 4),
                                          limit=f"max {limit.max}" if limit.max is not None else f"min {limit.min}"))
        reason = ("" if judged else f"{len(replies)} judgeable replies < min_replies {cfg.min_replies}: not judged")
        out.append(WindowJudgement(route=key[0], version=key[1], since=since, until=until, captured=captured.get(key, 0),
                                   replies=len(replies), ratings=len(votes), judged=judged, reason=reason,
                                   flagged=sum(s["id"] in flags for s in replies),
                                   values={k: round(v, 4) for k, v in values.items()}, crossings=tuple(crossings)))
    return out


class Cooldown:
    """When each (route, version, metric) last announced drift, in `<state>/monitor/cooldown.json`."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.last: dict[str, float] = json.loads(self.path.read_text()) if self.path.is_file() else {}

    @staticmethod
    def key(route: str, version: str, metric: str) -> str:
        return f"{route}|{version}|{metric}"

    def due(self, key: str, cooldown_s: float, now: float | None = None) -> bool:
        return (now or time.time()) - self.last.get(key, float("-inf")) >= cooldown_s

    def mark(self, key: str, now: float | None = None) -> None:
        self.last[key] = now or time.time()
        write_json_atomic(self.path, self.last)

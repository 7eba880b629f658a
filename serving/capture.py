"""Live conversations and ratings, captured at the gateway: the first half of the loop from production back into
training.

- **Response ids.** Every answer the gateway relays carries an id (`x-charforge-response-id`, and the body's `id`
  when not streamed) that names its route, served version, time and the user's hash, signed with the capture
  secret: any gateway sharing the secret can take a rating for a response another served, with no lookup and no
  per-request write, and an id nobody signed is unknown (404).
- **Capture** (opt-in per route, with a sampling rate, `capture.routes`): the request's messages, the reply (a
  streamed one reassembled), token counts, version, replica, latency, the user id hashed (HMAC), a schema version.
  PII is scrubbed with the curation scrubber and credentials (the gateway's keys, and text matching
  `capture.key_patterns`) are replaced before anything is written; headers are never captured. The request path
  only puts a row on a bounded queue; a writer thread scrubs and writes it. A full queue drops the capture and
  counts it (`gateway_capture_dropped_total`); it never blocks or fails a request. A gateway crash loses what was
  queued (at most `capture.buffer` rows) and what the writer had not yet flushed (at most `capture.flush_s`).
- **Ratings** (`POST /v1/feedback`) are written synchronously (fsync'd, or committed) before the 200: an
  acknowledged rating is never lost. A second rating of a response replaces the first.
- **Stores** follow the serving store: files under `<state>/capture/` (one JSONL per hour per gateway process, and a
  rating log) or PostgreSQL tables `charforge_captures` and `charforge_feedback` shared by every gateway. Rotation is
  by hour (files) and retention by age (`capture.retention_days`, applied hourly by the writer and by
  `charforge capture purge --older-than`).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import os
import random
import re
import secrets
import shutil
import socket
import threading
import time
from collections import Counter, deque
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

from charforge.curation.scrub import PII_PATTERNS, may_hold_pii, scrub_pii
from charforge.errors import InputError
from charforge.schemas.serving import CaptureSettings

log = logging.getLogger(__name__)
SCHEMA_VERSION = 1
PII_KINDS = list(PII_PATTERNS)
ID_PREFIX = "cfr-"
SEP = "\x1f"


# ---- response ids ----------------------------------------------------------------------------------------------------
class ResponseRef(NamedTuple):
    """What a response id says: enough to store a rating for a response that was never captured."""

    id: str
    route: str
    version: str
    at: float
    user_hash: str | None


class ResponseIds:
    def __init__(self, secret: bytes) -> None:
        self.secret = secret

    def user_hash(self, user: str | None) -> str | None:
        """A keyed hash of the client's user id: stable (a purge finds every row), not reversible by guessing."""
        if not user:
            return None
        return hmac.new(self.secret, b"user" + user.encode(), hashlib.sha256).hexdigest()[:24]

    def mint(self, route: str, version: str, user_hash: str | None, at: float | None = None) -> str:
        payload = SEP.join([route, version, f"{at or time.time():.3f}", user_hash or "", secrets.token_hex(6)])
        body = base64.urlsafe_b64encode(payload.encode()).rstrip(b"=")
        mac = base64.urlsafe_b64encode(hmac.new(self.secret, body, hashlib.sha256).digest()[:12]).rstrip(b"=")
        return f"{ID_PREFIX}{body.decode()}.{mac.decode()}"

    def read(self, response_id: object) -> ResponseRef | None:
        """The id's contents if this secret signed it; None for anything else."""
        if not isinstance(response_id, str) or not response_id.startswith(ID_PREFIX) or len(response_id) > 1024:
            return None
        body, _, mac = response_id[len(ID_PREFIX):].partition(".")
        expected = base64.urlsafe_b64encode(hmac.new(self.secret, body.encode(), hashlib.sha256).digest()[:12])
        if not hmac.compare_digest(expected.rstrip(b"=").decode(), mac):
            return None
        try:
            route, version, at, user_hash, _ = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)).decode() \
                .split(SEP)
            return ResponseRef(response_id, route, version, float(at), user_hash or None)
        except (ValueError, UnicodeDecodeError):
            return None


# ---- what is written -------------------------------------------------------------------------------------------------
class Scrubber:
    """PII as the curation stage scrubs it, then credentials: the gateway's own keys and `key_patterns`."""

    def __init__(self, patterns: list[str], keys: tuple[str, ...]) -> None:
        self.patterns = [re.compile(p) for p in patterns]
        self.keys = tuple(k for k in keys if k)

    def __call__(self, text: str) -> str:
        for key in self.keys:
            text = text.replace(key, "[KEY]")
        for pattern in self.patterns:
            text = pattern.sub("[KEY]", text)
        return scrub_pii(text, PII_KINDS)[0] if may_hold_pii(text) else text


def stream_reply(raw: bytes) -> tuple[str, int]:
    """The reply text of a relayed SSE stream and its content chunks (vLLM sends one token per chunk)."""
    parts, chunks = [], 0
    for line in raw.split(b"\n"):
        if not line.startswith(b"data:"):
            continue
        try:
            event = json.loads(line[5:])
        except ValueError:
            continue
        for choice in (event.get("choices") or []) if isinstance(event, dict) else []:
            piece = (choice.get("delta") or {}).get("content") or choice.get("text") or ""
            if piece:
                parts.append(piece)
                chunks += 1
    return "".join(parts), chunks


class Pending(NamedTuple):
    """One sampled exchange as the request path leaves it: unscrubbed, unparsed (the writer thread does that).

    Only strings, bytes and numbers (the request as the bytes sent upstream, not parsed messages): queued as a plain
    tuple (`Capturer.submit`), a row is something the garbage collector stops tracking, so the rows a busy queue
    holds are never walked by collections nor promoted to the older generations."""

    ref: ResponseRef
    replica: str
    request: bytes  # the JSON body sent upstream (the route's system prompt included)
    latency_s: float
    status: str
    reply: str | None = None  # non-streaming: the reply text
    usage: tuple[int | None, int | None] | None = None  # non-streaming: (prompt_tokens, completion_tokens)
    stream: bytes | None = None  # streaming: the raw SSE bytes


def queued(p: Pending) -> tuple:
    """A row as the queue holds it: one flat tuple of strings, bytes and numbers, which the garbage collector stops
    tracking the first time it meets it (it never untracks a NamedTuple, nor a tuple holding a tuple it has not
    untracked yet): a full queue costs collections nothing."""
    return (*p.ref, p.replica, p.request, p.latency_s, p.status, p.reply, *(p.usage or (None, None)), p.stream)


def unqueued(q: tuple) -> Pending:
    return Pending(ResponseRef(*q[:5]), *q[5:10], usage=q[10:12], stream=q[12])


def request_messages(request: bytes) -> list:
    """The messages of a chat request body, or a completion's prompt as one user message."""
    try:
        body = json.loads(request)
    except ValueError:
        return []
    if not isinstance(body, dict):
        return []
    messages = body.get("messages")
    if isinstance(messages, list):
        return messages
    return [{"role": "user", "content": body.get("prompt")}] if "prompt" in body else []


def capture_row(p: Pending, scrub: Scrubber) -> dict:
    if p.stream is not None:
        reply, chunks = stream_reply(p.stream)
        tokens = {"completion_tokens": chunks, "counted": "stream chunks"}
    else:
        reply = p.reply or ""
        prompt_tokens, completion_tokens = p.usage or (None, None)
        tokens = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "counted": "usage"}
    messages = [{"role": str(m.get("role")), "content": scrub(m["content"]) if isinstance(m.get("content"), str)
                 else m.get("content")} for m in request_messages(p.request) if isinstance(m, dict)]
    return {"schema": SCHEMA_VERSION, "id": p.ref.id, "at": p.ref.at, "route": p.ref.route,
            "version": p.ref.version, "replica": p.replica, "user_hash": p.ref.user_hash,
            "latency_s": round(p.latency_s, 4), "status": p.status, "messages": messages, "reply": scrub(reply),
            "tokens": tokens}


# ---- stores ----------------------------------------------------------------------------------------------------------
class FileCaptureStore:
    """`<folder>/conversations/<YYYY-MM-DD>/<HH>-<host>-<pid>.jsonl` (one writer per file: no interleaving) and
    `<folder>/feedback/<YYYY-MM-DD>.jsonl` (an append-only log, fsync'd per rating; the last rating of an id wins)."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.me = f"{socket.gethostname()}-{os.getpid()}"
        self._feedback_lock = threading.Lock()

    def secret(self) -> bytes:
        path = self.folder / "secret"
        if not path.is_file():
            self.folder.mkdir(parents=True, exist_ok=True)
            try:  # the first gateway to start creates it; the others read it
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                os.write(fd, secrets.token_hex(32).encode())
                os.fsync(fd)
                os.close(fd)
            except FileExistsError:
                pass
        for _ in range(50):
            value = path.read_text().strip()
            if value:
                return value.encode()
            time.sleep(0.01)  # created this instant by another gateway, not yet written
        raise InputError(f"{path}: empty capture secret; delete it and restart the gateway")

    def hour_file(self, hour: int) -> Path:
        """This process's conversation file for an hour since the epoch (UTC)."""
        t = time.gmtime(hour * 3600)
        return self.folder / "conversations" / time.strftime("%Y-%m-%d", t) / \
            f"{time.strftime('%H', t)}-{self.me}.jsonl"

    def write(self, rows: list[dict]) -> None:
        by_hour: dict[int, list[str]] = {}  # a row's file is its hour's: paths are built once per hour, not per row
        for row in rows:
            by_hour.setdefault(int(row["at"] // 3600), []).append(json.dumps(row, ensure_ascii=False))
        for hour, lines in by_hour.items():
            path = self.hour_file(hour)
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "a") as handle:
                handle.write("\n".join(lines) + "\n")
                handle.flush()
                os.fsync(handle.fileno())

    def put_feedback(self, row: dict) -> None:
        path = self.folder / "feedback" / f"{time.strftime('%Y-%m-%d', time.gmtime(row['rated_at']))}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        with self._feedback_lock, open(path, "a") as handle:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    def put_drops(self, rows: list[dict]) -> None:
        path = self.folder / "dropped" / f"{time.strftime('%Y-%m-%d', time.gmtime(rows[0]['at']))}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as handle:
            handle.write("".join(json.dumps(r) + "\n" for r in rows))

    def drops(self, since: float = 0) -> list[dict]:
        return [row for _, row in self._lines("dropped") if row["at"] >= since]

    def put_flags(self, rows: list[dict]) -> None:
        if not rows:
            return
        path = self.folder / "flagged" / f"{time.strftime('%Y-%m-%d', time.gmtime(rows[0]['flagged_at']))}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as handle:
            handle.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
            handle.flush()
            os.fsync(handle.fileno())

    def flags(self) -> dict[str, dict]:
        return {row["id"]: row for _, row in self._lines("flagged")}  # a later flag of a reply replaces the earlier

    def _lines(self, kind: str) -> Iterator[tuple[Path, dict]]:
        for path in sorted((self.folder / kind).glob("**/*.jsonl")):
            for line in path.read_text().splitlines():
                try:
                    yield path, json.loads(line)
                except ValueError:  # a line cut by a crash mid-write: skipped, as the writer's contract allows
                    continue

    def captures(self, since: float = 0, until: float = float("inf")) -> list[dict]:
        return [row for _, row in self._lines("conversations") if since <= row["at"] < until]

    def feedback(self) -> dict[str, dict]:
        latest: dict[str, dict] = {}
        for _, row in self._lines("feedback"):
            latest[row["id"]] = row  # later lines replace earlier ones
        return latest

    def purge(self, keep) -> Counter:
        """Rewrite every file without the rows `keep(row)` refuses; counts removed by kind."""
        removed: Counter = Counter()
        for kind in ("conversations", "feedback", "flagged"):
            for path in sorted((self.folder / kind).glob("**/*.jsonl")):
                lines = path.read_text().splitlines()
                kept = [line for line in lines if _keep_line(line, keep)]
                if len(kept) != len(lines):
                    removed[kind] += len(lines) - len(kept)
                    tmp = path.with_name(f".{path.name}.purge")
                    tmp.write_text("".join(f"{line}\n" for line in kept))
                    os.replace(tmp, path)
        return removed

    def drop_days_before(self, cutoff: float) -> Counter:
        removed: Counter = Counter()
        day = time.strftime("%Y-%m-%d", time.gmtime(cutoff))
        for folder in sorted((self.folder / "conversations").glob("*")):
            if folder.is_dir() and folder.name < day:
                removed["conversations"] += sum(len(p.read_text().splitlines()) for p in folder.glob("*.jsonl"))
                shutil.rmtree(folder)
        return removed + self.purge(lambda row: row.get("at", row.get("rated_at", 0)) >= cutoff)

    def close(self) -> None:
        pass


def _keep_line(line: str, keep) -> bool:
    try:
        return keep(json.loads(line))
    except ValueError:
        return True


class PostgresCaptureStore:
    """Captures and ratings in the serving store's PostgreSQL, shared by every gateway."""

    SCHEMA = """
    CREATE TABLE IF NOT EXISTS charforge_captures (
        id text PRIMARY KEY, at timestamptz NOT NULL, route text NOT NULL, version text NOT NULL,
        user_hash text, row jsonb NOT NULL);
    CREATE INDEX IF NOT EXISTS charforge_captures_at ON charforge_captures (at);
    CREATE INDEX IF NOT EXISTS charforge_captures_user ON charforge_captures (user_hash);
    CREATE TABLE IF NOT EXISTS charforge_feedback (
        id text PRIMARY KEY, at timestamptz NOT NULL, rated_at timestamptz NOT NULL, route text NOT NULL,
        version text NOT NULL, user_hash text, rating text NOT NULL, comment text);
    CREATE TABLE IF NOT EXISTS charforge_capture_secret (one boolean PRIMARY KEY DEFAULT true, secret text NOT NULL);
    CREATE TABLE IF NOT EXISTS charforge_capture_drops (
        at timestamptz NOT NULL, route text NOT NULL, version text NOT NULL, count integer NOT NULL);
    CREATE TABLE IF NOT EXISTS charforge_capture_flags (
        id text PRIMARY KEY, at timestamptz NOT NULL, flagged_at timestamptz NOT NULL, route text NOT NULL,
        version text NOT NULL, user_hash text, reasons jsonb NOT NULL);
    """

    def __init__(self, store) -> None:  # a serving.state_store.PostgresStore (its connection and locking)
        self.store = store
        self._schema_ready = False

    def _run(self, work):
        def with_schema(conn):
            if not self._schema_ready:  # two gateways starting at once: one creates the tables, one waits
                conn.execute("SELECT pg_advisory_xact_lock(7406020002)")
                conn.execute(self.SCHEMA)
            return work(conn)
        result = self.store._run(with_schema)
        self._schema_ready = True  # committed with the work (a failed transaction leaves it False)
        return result

    def secret(self) -> bytes:
        def get(conn):
            conn.execute("INSERT INTO charforge_capture_secret (secret) VALUES (%s) ON CONFLICT DO NOTHING",
                         (secrets.token_hex(32),))
            return conn.execute("SELECT secret FROM charforge_capture_secret").fetchone()[0]
        return self._run(get).encode()

    def write(self, rows: list[dict]) -> None:
        from psycopg.types.json import Jsonb

        self._run(lambda c: c.cursor().executemany(
            "INSERT INTO charforge_captures (id, at, route, version, user_hash, row) VALUES "
            "(%s, to_timestamp(%s), %s, %s, %s, %s) ON CONFLICT (id) DO NOTHING",
            [(r["id"], r["at"], r["route"], r["version"], r["user_hash"], Jsonb(r)) for r in rows]))

    def put_feedback(self, row: dict) -> None:
        self._run(lambda c: c.execute(
            "INSERT INTO charforge_feedback (id, at, rated_at, route, version, user_hash, rating, comment) VALUES "
            "(%s, to_timestamp(%s), to_timestamp(%s), %s, %s, %s, %s, %s) ON CONFLICT (id) DO UPDATE SET "
            "rated_at = excluded.rated_at, rating = excluded.rating, comment = excluded.comment",
            (row["id"], row["at"], row["rated_at"], row["route"], row["version"], row["user_hash"], row["rating"],
             row["comment"])))

    def put_drops(self, rows: list[dict]) -> None:
        self._run(lambda c: c.cursor().executemany(
            "INSERT INTO charforge_capture_drops (at, route, version, count) VALUES (to_timestamp(%s), %s, %s, %s)",
            [(r["at"], r["route"], r["version"], r["count"]) for r in rows]))

    def drops(self, since: float = 0) -> list[dict]:
        return self._run(lambda c: [{"at": float(a), "route": r, "version": v, "count": n} for a, r, v, n in c.execute(
            "SELECT extract(epoch FROM at), route, version, count FROM charforge_capture_drops "
            "WHERE at >= to_timestamp(%s)", (since,))])

    def put_flags(self, rows: list[dict]) -> None:
        from psycopg.types.json import Jsonb

        if rows:
            self._run(lambda c: c.cursor().executemany(
                "INSERT INTO charforge_capture_flags (id, at, flagged_at, route, version, user_hash, reasons) VALUES "
                "(%s, to_timestamp(%s), to_timestamp(%s), %s, %s, %s, %s) ON CONFLICT (id) DO UPDATE SET "
                "flagged_at = excluded.flagged_at, reasons = excluded.reasons",
                [(r["id"], r["at"], r["flagged_at"], r["route"], r["version"], r.get("user_hash"), Jsonb(r["reasons"]))
                 for r in rows]))

    def flags(self) -> dict[str, dict]:
        rows = self._run(lambda c: c.execute(
            "SELECT id, extract(epoch FROM at), extract(epoch FROM flagged_at), route, version, user_hash, reasons "
            "FROM charforge_capture_flags").fetchall())
        return {r[0]: {"id": r[0], "at": float(r[1]), "flagged_at": float(r[2]), "route": r[3], "version": r[4],
                       "user_hash": r[5], "reasons": list(r[6])} for r in rows}

    def captures(self, since: float = 0, until: float = float("inf")) -> list[dict]:
        until = min(until, 4e9)
        return self._run(lambda c: [r for (r,) in c.execute(
            "SELECT row FROM charforge_captures WHERE at >= to_timestamp(%s) AND at < to_timestamp(%s) ORDER BY at",
            (since, until))])

    def feedback(self) -> dict[str, dict]:
        rows = self._run(lambda c: c.execute(
            "SELECT id, extract(epoch FROM at), extract(epoch FROM rated_at), route, version, user_hash, rating, "
            "comment FROM charforge_feedback").fetchall())
        return {r[0]: {"id": r[0], "at": float(r[1]), "rated_at": float(r[2]), "route": r[3], "version": r[4],
                       "user_hash": r[5], "rating": r[6], "comment": r[7]} for r in rows}

    def purge_user(self, user_hash: str) -> Counter:
        def purge(conn):
            a = conn.execute("DELETE FROM charforge_captures WHERE user_hash = %s", (user_hash,)).rowcount
            b = conn.execute("DELETE FROM charforge_feedback WHERE user_hash = %s", (user_hash,)).rowcount
            c = conn.execute("DELETE FROM charforge_capture_flags WHERE user_hash = %s", (user_hash,)).rowcount
            return Counter({"conversations": a, "feedback": b, "flagged": c})
        return self._run(purge)

    def drop_days_before(self, cutoff: float) -> Counter:
        def drop(conn):
            a = conn.execute("DELETE FROM charforge_captures WHERE at < to_timestamp(%s)", (cutoff,)).rowcount
            b = conn.execute("DELETE FROM charforge_feedback WHERE rated_at < to_timestamp(%s)", (cutoff,)).rowcount
            c = conn.execute("DELETE FROM charforge_capture_flags WHERE at < to_timestamp(%s)", (cutoff,)).rowcount
            return Counter({"conversations": a, "feedback": b, "flagged": c})
        return self._run(drop)

    def close(self) -> None:
        self.store.close()


def capture_store(state: Path, url: str | None) -> FileCaptureStore | PostgresCaptureStore:
    """Captures beside the serving store: files under `<state>/capture/`, or its PostgreSQL."""
    from serving.state_store import PostgresStore

    return PostgresCaptureStore(PostgresStore(url)) if url else FileCaptureStore(state / "capture")


def purge_user(store, user_hash: str) -> Counter:
    if isinstance(store, PostgresCaptureStore):
        return store.purge_user(user_hash)
    return store.purge(lambda row: row.get("user_hash") != user_hash)


# ---- the gateway's side ----------------------------------------------------------------------------------------------
class Capturer:
    """What the gateway holds: the ids, the sampling decision, the queue and its writer thread, the rating writes."""

    def __init__(self, settings: CaptureSettings, store, keys: tuple[str, ...] = (), dropped=None) -> None:
        self.settings, self.store = settings, store
        self.ids = ResponseIds(store.secret())
        self.scrub = Scrubber(settings.key_patterns, keys)
        # a deque, not a queue.Queue: appends and pops are atomic without a lock, and no thread waits on it, so a
        # request never wakes the writer (which drains it every flush_s) and never contends for a lock
        self.queue: deque[tuple] = deque()  # Pending rows as plain tuples (see submit)
        self.dropped = dropped  # a prometheus Counter (labels: reason), or None
        self.stop = threading.Event()
        self.thread: threading.Thread | None = None
        self.written = 0
        self.dropped_by: Counter = Counter()  # (route, version) -> captures dropped since the writer last saved them
        self._drops_lock = threading.Lock()

    def sampled(self, route: str) -> bool:
        rate = self.settings.routes.get(route, 0.0)
        return rate > 0 and (rate >= 1 or random.random() < rate)

    def submit(self, pending: Pending) -> None:
        if len(self.queue) >= self.settings.buffer:
            self.drop("buffer_full", [pending])
            return
        self.queue.append(queued(pending))

    def drop(self, reason: str, lost: list[Pending]) -> None:
        if self.dropped is not None:
            self.dropped.labels(reason).inc(len(lost))
        with self._drops_lock:
            for p in lost:
                self.dropped_by[(p.ref.route, p.ref.version)] += 1

    def start(self) -> None:
        if self.thread is None or not self.thread.is_alive():
            self.stop.clear()
            self.thread = threading.Thread(target=self._write_forever, name="capture-writer", daemon=True)
            self.thread.start()

    def close(self, timeout: float = 15) -> None:
        """Write what is queued (waiting at most `timeout` for a slow store), then stop the writer."""
        self.stop.set()
        if self.thread is not None:
            self.thread.join(timeout)

    def _write_forever(self) -> None:
        last_retention = 0.0
        while not (self.stop.is_set() and not self.queue):
            if len(self.queue) < self.settings.buffer // 2:  # one batch per flush_s, unless the queue fills up
                self.stop.wait(self.settings.flush_s)
            batch: list[Pending] = []
            while self.queue and len(batch) < self.settings.buffer:
                batch.append(unqueued(self.queue.popleft()))
            if batch:
                try:
                    self.store.write([capture_row(p, self.scrub) for p in batch])
                    self.written += len(batch)
                except Exception as exc:  # a full disk, the store down: drop this batch, count it, go on
                    log.error("capture: %d rows not written (%s: %s)", len(batch), type(exc).__name__, exc)
                    self.drop("write_failed", batch)
            with self._drops_lock:
                drops, self.dropped_by = self.dropped_by, Counter()
            if drops:
                try:  # what `charforge capture stats` shows as dropped
                    self.store.put_drops([{"at": time.time(), "route": r, "version": v, "count": n}
                                          for (r, v), n in drops.items()])
                except Exception as exc:
                    log.error("capture: drop counts not written (%s: %s)", type(exc).__name__, exc)
            if time.time() - last_retention > 3600:
                last_retention = time.time()
                try:
                    self.store.drop_days_before(time.time() - self.settings.retention_days * 86400)
                except Exception as exc:
                    log.error("capture retention failed (%s: %s)", type(exc).__name__, exc)

    def rate(self, body: dict) -> dict:
        """Store a rating (raises `ValueError` with the status and message for a bad one)."""
        ref = self.ids.read(body.get("id"))
        if ref is None:
            raise LookupError(f"unknown response id {str(body.get('id'))[:80]!r}: rate the `id` of a response this "
                              f"service gave (header x-charforge-response-id)")
        rating = body.get("rating")
        if rating not in ("up", "down"):
            raise ValueError(f"'rating' must be \"up\" or \"down\", not {json.dumps(rating)[:40]}")
        comment = body.get("comment")
        if comment is not None and not isinstance(comment, str):
            raise ValueError("'comment' must be a string")
        if comment is not None and len(comment) > self.settings.max_comment_chars:
            raise OverflowError(f"'comment' has {len(comment)} characters; at most "
                                f"{self.settings.max_comment_chars} (capture.max_comment_chars)")
        row = {"id": ref.id, "at": ref.at, "rated_at": time.time(), "route": ref.route, "version": ref.version,
               "user_hash": ref.user_hash, "rating": rating,
               "comment": self.scrub(comment) if comment else None}
        self.store.put_feedback(row)
        return row


# ---- reading it ------------------------------------------------------------------------------------------------------
def stats(store, since: float = 0) -> list[dict]:
    """Per route and version: conversations captured, ratings up and down (of captured or not), captures dropped."""
    table: dict[tuple[str, str], Counter] = {}
    for row in store.drops(since):
        table.setdefault((row["route"], row["version"]), Counter())["dropped"] += row["count"]
    for row in store.captures(since):
        table.setdefault((row["route"], row["version"]), Counter())["conversations"] += 1
    for row in store.feedback().values():
        if row["at"] >= since:
            table.setdefault((row["route"], row["version"]), Counter())[f"rated_{row['rating']}"] += 1
    return [{"route": r, "version": v, "conversations": c["conversations"], "rated_up": c["rated_up"],
             "rated_down": c["rated_down"], "dropped": c["dropped"]} for (r, v), c in sorted(table.items())]


def export_rows(store, since: float, until: float) -> list[dict]:
    """Captured conversations of a window in `data/raw`'s JSONL format (messages, the reply appended as the
    assistant turn), with the served version, the rating (and the rater's comment), the monitor's flags (`flagged`)
    and the capture id on each row."""
    ratings, flags = store.feedback(), store.flags()
    out = []
    for row in store.captures(since, until):
        if row.get("status") != "200" or not row.get("reply"):
            continue
        rated = ratings.get(row["id"])
        out.append({"messages": [*row["messages"], {"role": "assistant", "content": row["reply"]}],
                    "source": "production", "route": row["route"], "version": row["version"],
                    "rating": rated["rating"] if rated else None, "capture_id": row["id"],
                    "captured_at": row["at"],
                    **({"comment": rated["comment"]} if rated and rated.get("comment") else {}),
                    **({"flagged": flags[row["id"]]["reasons"]} if row["id"] in flags else {})})
    return out


def parse_when(value: str | None, default: float) -> float:
    """`2026-12-06`, `2026-12-06T13:00:00` (UTC) or a number of hours ago (`24h`)."""
    if value is None:
        return default
    if re.fullmatch(r"\d+(\.\d+)?h", value):
        return time.time() - float(value[:-1]) * 3600
    for fmt in ("%Y-%m-%dT%H:%M:%S", "%Y-%m-%d"):
        try:
            return float(time.mktime(time.strptime(value, fmt))) - time.timezone
        except ValueError:
            continue
    raise InputError(f"{value!r}: give a UTC date (2026-12-06), a time (2026-12-06T13:00:00) or hours ago (24h)")

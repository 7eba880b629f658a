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
  only puts a row on a bounded queue; every `flush_s` a thread sends the queue down a pipe to the capture writer,
  a process of its own (`writer_main`), which scrubs, writes and fsyncs the rows and acknowledges them: scrubbing
  and encoding never take the gateway's interpreter from requests. `capture.buffer` bounds the rows queued or sent
  and not yet written; beyond it a capture is dropped and counted (`gateway_capture_dropped_total`), never blocking
  or failing a request. A writer that dies is counted (`writer_died`) and started again. A gateway crash loses the
  rows queued since the last send (at most `capture.flush_s` of them): the writer writes everything it was sent
  before it exits, and what it had not yet flushed is lost only if it dies too.
- **Ratings** (`POST /v1/feedback`) are written synchronously (fsync'd, or committed) before the 200: an
  acknowledged rating is never lost. A second rating of a response replaces the first.
- **Stores** follow the serving store: files under `<state>/capture/` (one JSONL per hour per gateway process, and a
  rating log) or PostgreSQL tables `charforge_captures` and `charforge_feedback` shared by every gateway. Rotation is
  by hour (files) and retention by age (`capture.retention_days`, applied hourly by the writer and by
  `charforge capture purge --older-than`).
"""

from __future__ import annotations

import base64
import fcntl
import hashlib
import hmac
import json
import logging
import marshal
import os
import random
import re
import secrets
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
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


def stream_reply(raw: bytes) -> tuple[str, int, dict | None]:
    """The reply text of a relayed SSE stream, its content chunks (vLLM sends one token per chunk) and its usage
    event's counts (the gateway asks the replica for them), if any."""
    parts, chunks, usage = [], 0, None
    for line in raw.split(b"\n"):
        if not line.startswith(b"data:"):
            continue
        try:
            event = json.loads(line[5:])
        except ValueError:
            continue
        if isinstance(event, dict) and isinstance(event.get("usage"), dict):
            usage = event["usage"]
        for choice in (event.get("choices") or []) if isinstance(event, dict) else []:
            piece = (choice.get("delta") or {}).get("content") or choice.get("text") or ""
            if piece:
                parts.append(piece)
                chunks += 1
    return "".join(parts), chunks, usage


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
        reply, chunks, usage = stream_reply(p.stream)
        tokens = ({"prompt_tokens": usage.get("prompt_tokens"), "completion_tokens": usage.get("completion_tokens"),
                   "counted": "usage"} if usage else {"completion_tokens": chunks, "counted": "stream chunks"})
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

    def spec(self) -> dict:
        """What another process needs to open this store (`open_store`)."""
        return {"folder": str(self.folder)}

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

    def spec(self) -> dict:
        return {"url": self.store.dsn}

    def close(self) -> None:
        self.store.close()


def open_store(spec: dict) -> FileCaptureStore | PostgresCaptureStore:
    from serving.state_store import PostgresStore

    return PostgresCaptureStore(PostgresStore(spec["url"])) if "url" in spec else FileCaptureStore(Path(spec["folder"]))


def capture_store(state: Path, url: str | None) -> FileCaptureStore | PostgresCaptureStore:
    """Captures beside the serving store: files under `<state>/capture/`, or its PostgreSQL."""
    from serving.state_store import PostgresStore

    return PostgresCaptureStore(PostgresStore(url)) if url else FileCaptureStore(state / "capture")


def purge_user(store, user_hash: str) -> Counter:
    if isinstance(store, PostgresCaptureStore):
        return store.purge_user(user_hash)
    return store.purge(lambda row: row.get("user_hash") != user_hash)


# ---- the gateway's side ----------------------------------------------------------------------------------------------
class WriterProcess:
    """One capture writer process (`writer_main`) and what the gateway knows of it: the frames it was sent and has
    not yet acknowledged (it acknowledges each, in order, once its rows are written or have failed and been
    counted)."""

    def __init__(self, config: dict, on_ack) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "from serving.capture import writer_main; writer_main()"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [
                str(Path(__file__).resolve().parent.parent), os.environ.get("PYTHONPATH")]))})
        self.unacked = 0  # rows sent, not yet acknowledged
        self.frames: deque[tuple[Counter, Counter]] = deque()  # per unacknowledged frame: its rows and drops
        self.lock = threading.Lock()
        self.on_ack = on_ack
        try:  # room for bursts: a pipe holds 64 KiB by default
            fcntl.fcntl(self.proc.stdin.fileno(), getattr(fcntl, "F_SETPIPE_SZ", 1031), 1 << 20)
        except OSError:
            pass
        self.proc.stdin.write(frame(json.dumps(config).encode()))  # settings, keys (never on a command line), store
        self.proc.stdin.flush()
        self.listener = threading.Thread(target=self._listen, name="capture-acks", daemon=True)
        self.listener.start()

    def send(self, batch: list[tuple], drops: Counter) -> None:
        """Raises OSError (BrokenPipeError) when the process is gone."""
        rows = Counter((q[1], q[2]) for q in batch)  # (route, version): see queued()
        with self.lock:  # before the write: its acknowledgement may come back at once
            self.frames.append((rows, drops))
            self.unacked += len(batch)
        try:
            self.proc.stdin.write(frame(marshal.dumps((batch, [(*k, n) for k, n in drops.items()]))))
            self.proc.stdin.flush()
        except OSError:  # not sent: the caller counts this batch itself
            with self.lock:
                self.frames.pop()
                self.unacked -= len(batch)
            raise

    def _listen(self) -> None:
        for line in self.proc.stdout:  # "written N" or "failed N", one line per frame, in order; EOF when it exits
            kind, _, n = line.decode().partition(" ")
            with self.lock:
                self.frames.popleft()
                self.unacked -= int(n)
            self.on_ack(kind, int(n))

    def finish(self, timeout: float) -> tuple[Counter, Counter]:
        """Close its input (it writes everything it has and exits) and wait for it. What it never acknowledged:
        rows and drop counts, each by (route, version)."""
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            log.error("capture writer (pid %d) still writing after %.0f s: killed", self.proc.pid, timeout)
            self.proc.kill()
            self.proc.wait()
        self.listener.join(5)
        with self.lock:
            return sum((r for r, _ in self.frames), Counter()), sum((d for _, d in self.frames), Counter())


def frame(payload: bytes) -> bytes:
    return struct.pack("<I", len(payload)) + payload


def read_frame(fd: int) -> bytes | None:
    """The next frame on a pipe, None at its end (a frame cut short by the gateway's death included)."""
    head = read_exactly(fd, 4)
    return None if head is None else read_exactly(fd, struct.unpack("<I", head)[0])


def read_exactly(fd: int, n: int) -> bytes | None:
    parts, left = [], n
    while left:
        chunk = os.read(fd, min(left, 1 << 20))
        if not chunk:
            return None
        parts.append(chunk)
        left -= len(chunk)
    return b"".join(parts)


class Capturer:
    """What the gateway holds: the ids, the sampling decision, the queue, the rating writes, and the writer.

    The writer is a process of its own, so that scrubbing and encoding rows never takes the gateway's interpreter
    (its GIL) from requests: the request path appends a row to a queue; a thread sends the queue to the writer
    every `flush_s`, as one marshalled frame on a pipe; the writer scrubs, writes and fsyncs the frame's rows and
    acknowledges them. `capture.buffer` bounds the rows queued or sent and not yet acknowledged. A writer that dies
    is counted (its unacknowledged rows as dropped, `writer_died`) and started again."""

    RESTART_S = 5  # a writer is started again at most this often (one that dies at once does not spin)

    def __init__(self, settings: CaptureSettings, store, keys: tuple[str, ...] = (), dropped=None) -> None:
        self.settings, self.store = settings, store
        self.ids = ResponseIds(store.secret())
        self.keys = tuple(k for k in keys if k)
        self.scrub = Scrubber(settings.key_patterns, self.keys)  # for rating comments, written here
        # a deque, not a queue.Queue: appends and pops are atomic without a lock, and no thread waits on it, so a
        # request never wakes the sender (which drains it every flush_s) and never contends for a lock
        self.queue: deque[tuple] = deque()  # Pending rows as plain tuples (see submit)
        self.dropped = dropped  # a prometheus Counter (labels: reason), or None
        self.stop = threading.Event()
        self.thread: threading.Thread | None = None
        self.writer: WriterProcess | None = None
        self.written = 0
        self.dropped_by: Counter = Counter()  # (route, version) -> captures dropped since the writer last had them
        self._drops_lock = threading.Lock()
        self._started_writer = 0.0
        self._close_timeout = 15.0

    def sampled(self, route: str) -> bool:
        rate = self.settings.routes.get(route, 0.0)
        return rate > 0 and (rate >= 1 or random.random() < rate)

    def submit(self, pending: Pending) -> None:
        writer = self.writer
        if len(self.queue) + (writer.unacked if writer else 0) >= self.settings.buffer:
            self.drop("buffer_full", [pending.ref])
            return
        self.queue.append(queued(pending))

    def drop(self, reason: str, lost: list[ResponseRef] | Counter) -> None:
        """Count lost captures: the rows' refs, or a Counter of (route, version) -> rows."""
        counts = lost if isinstance(lost, Counter) else Counter((r.route, r.version) for r in lost)
        if self.dropped is not None:
            self.dropped.labels(reason).inc(sum(counts.values()))
        with self._drops_lock:
            self.dropped_by.update(counts)

    def start(self) -> None:
        if self.thread is None or not self.thread.is_alive():
            self.stop.clear()
            self._start_writer()
            self.thread = threading.Thread(target=self._send_forever, name="capture-sender", daemon=True)
            self.thread.start()

    def close(self, timeout: float = 15) -> None:
        """Send what is queued, let the writer write it (waiting at most `timeout` for a slow store), stop both."""
        self._close_timeout = timeout
        self.stop.set()
        if self.thread is not None:
            self.thread.join(timeout + 5)

    def _start_writer(self) -> None:
        self._started_writer = time.monotonic()
        try:
            self.writer = WriterProcess({"settings": self.settings.model_dump(), "keys": list(self.keys),
                                         "store": self.store.spec()}, self._acked)
        except OSError as exc:
            log.error("capture writer did not start (%s: %s): captures are dropped until it does",
                      type(exc).__name__, exc)
            self.writer = None

    def _acked(self, kind: str, n: int) -> None:
        if kind == "written":
            self.written += n
        elif self.dropped is not None:  # the writer counted them in the store itself
            self.dropped.labels("write_failed").inc(n)

    def _send_forever(self) -> None:
        while True:
            stopping = self.stop.wait(self.settings.flush_s)
            batch = [self.queue.popleft() for _ in range(len(self.queue))]
            with self._drops_lock:
                drops, self.dropped_by = self.dropped_by, Counter()
            if batch or drops:
                self._send(batch, drops)
            if stopping and not self.queue:
                break
        if self.writer is not None:
            unwritten, _ = self.writer.finish(self._close_timeout)
            if unwritten:
                log.error("capture writer stopped with %d rows not written", sum(unwritten.values()))

    def _send(self, batch: list[tuple], drops: Counter) -> None:
        writer = self.writer
        if writer is not None and writer.proc.poll() is None:
            try:
                writer.send(batch, drops)
                return
            except OSError:
                pass
        # the writer is gone: the rows it was sent and never acknowledged, and this batch, are lost (counted as
        # writer_died); the drop counts it never stored go to the next one
        lost = Counter((q[1], q[2]) for q in batch)
        if writer is not None:
            unwritten, unstored = writer.finish(0)
            log.error("capture writer (pid %d) exited with code %s: %d rows it had not written and %d queued are "
                      "dropped (writer_died)", writer.proc.pid, writer.proc.returncode, sum(unwritten.values()),
                      len(batch))
            lost += unwritten
            drops += unstored
            self.writer = None
        with self._drops_lock:
            self.dropped_by.update(drops)
        self.drop("writer_died", lost)
        if time.monotonic() - self._started_writer >= self.RESTART_S:
            self._start_writer()

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


# ---- the writer process ---------------------------------------------------------------------------------------------
def writer_main() -> None:
    """The capture writer: frames from the gateway on stdin (the first its config, then marshalled batches of queued
    rows and drop counts), each scrubbed, written, fsync'd and acknowledged on stdout ("written N" or "failed N").
    It ends when the gateway closes the pipe (or dies): everything received is written first. Signals meant for the
    gateway's process group (Ctrl-C, a terminal's SIGTERM) do not stop it halfway."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s capture writer: %(message)s")
    acks = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # anything else printed goes to the log, not into the acknowledgements
    config = json.loads(read_frame(0) or b"{}")
    settings = CaptureSettings(**config["settings"])
    scrub, store = Scrubber(settings.key_patterns, tuple(config["keys"])), open_store(config["store"])
    last_retention = 0.0
    while True:
        if time.time() - last_retention > 3600:  # retention by age, also for a gateway that captures nothing
            last_retention = time.time()
            try:
                store.drop_days_before(time.time() - settings.retention_days * 86400)
            except Exception as exc:
                log.error("retention failed (%s: %s)", type(exc).__name__, exc)
        if not select.select([0], [], [], 600)[0]:
            continue
        data = read_frame(0)
        if data is None:
            break
        batch, drop_counts = marshal.loads(data)
        drops = [{"at": time.time(), "route": r, "version": v, "count": n} for r, v, n in drop_counts]
        kind = "written"
        if batch:
            try:
                store.write([capture_row(unqueued(q), scrub) for q in batch])
            except Exception as exc:  # a full disk, the store down: drop this batch, count it, go on
                log.error("%d rows not written (%s: %s)", len(batch), type(exc).__name__, exc)
                kind = "failed"
                failed = Counter((q[1], q[2]) for q in batch)
                drops += [{"at": time.time(), "route": r, "version": v, "count": n} for (r, v), n in failed.items()]
        if drops:
            try:  # what `charforge capture stats` shows as dropped
                store.put_drops(drops)
            except Exception as exc:
                log.error("drop counts not written (%s: %s)", type(exc).__name__, exc)
        if acks is not None:
            try:
                acks.write(f"{kind} {len(batch)}\n")
            except OSError:  # the gateway is gone: no one to tell, and still everything it sent to write
                acks = None
    store.close()


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

"""Where the serving state that several processes share lives: the routing table every gateway serves, and each
adapter family's rollout (its lock and its record).

Two stores, one interface, picked by `serving_store` in `configs/platform.yaml` (or `CHARFORGE_SERVING_STORE`):

- **files** (the default): `<state>/serving/routes.json` and `<state>/serving/rollouts/<family>.json|.lock`. Every
  gateway and deployment on one machine shares them: a route write is a compare-and-set under an exclusive `flock`
  that re-reads the file, gateways notice a change by its `stat` (checked every 0.2 s), the rollout lock is a
  `flock` the OS releases when the deployer dies.
- **PostgreSQL** (`postgresql://user@host:port/db`; the password from `PGPASSWORD`, as libpq reads it): for
  gateways and flow-run pods on different machines. Routes are rows; a write is a transaction holding an advisory
  transaction lock, re-reading the row and announcing the change with `NOTIFY charforge_routes`; every gateway
  `LISTEN`s and re-reads (and re-reads every 5 s anyway, should a notification be lost with a broken connection).
  The rollout lock is a session advisory lock held on its own connection for the rollout's length: when the flow-run
  pod dies its connection closes and PostgreSQL releases the lock; the record is a row that outlives the pod.
  Why PostgreSQL and not a shared volume or the registry: it already runs beside MLflow and Prefect in every
  production layout (deploy/), it has the two primitives this needs — transactions for compare-and-set and
  LISTEN/NOTIFY for a change every gateway sees within a second — while `flock` on network volumes (NFS, EFS) is
  not reliable, and MLflow's registry has neither.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from charforge.errors import InputError, Refused, Unavailable
from charforge.io import write_json_atomic

log = logging.getLogger(__name__)

Doc = dict  # one route as JSON: weights, system_prompt, previous, generation, changed_by, changed_at
Change = Callable[[Doc | None], Doc]  # the route now (None: not there yet) -> the route to write; may raise
Parse = Callable[[dict], object]  # validates the routes read (raises on a damaged table)


class RolloutLocked(Refused):
    """Another rollout of the family holds the lock."""


class StoreUnavailable(Unavailable):
    """The shared store does not answer."""


# ---- files ---------------------------------------------------------------------------------------------------------
class FileRoutes:
    """The routing table as one JSON file, fsync'd, with a copy (`.bak`) a damaged file falls back to."""

    kind = "file"

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def describe(self) -> str:
        return str(self.path)

    @property
    def backup(self) -> Path:
        return self.path.with_name(f"{self.path.name}.bak")

    def load(self, parse: Parse = lambda raw: raw) -> dict[str, Doc]:
        """The routes; if the file is unreadable (cut short, edited into invalid JSON), those of the copy beside it,
        with the bad file moved aside and an error logged. Never raises: with neither file usable, no routes."""
        if not self.path.is_file() and not self.backup.is_file():
            return {}
        for source in (self.path, self.backup):
            try:
                raw = json.loads(source.read_text()).get("routes", {})
                parse(raw)
            except (OSError, ValueError, TypeError, AttributeError) as exc:
                if source.is_file():
                    log.error("routing table %s is unusable (%s: %s)", source, type(exc).__name__, exc)
                continue
            if source != self.path:
                if self.path.is_file():
                    aside = self.path.with_name(f"{self.path.name}.unusable-{time.strftime('%Y%m%dT%H%M%S')}")
                    self.path.replace(aside)
                    log.error("serving the routes of %s; the unusable table is kept as %s", source, aside)
                self._save(raw)
            return raw
        log.error("no usable routing table at %s or %s: starting with no routes (deploy again, or restore the "
                  "file)", self.path, self.backup)
        return {}

    def _save(self, routes: dict[str, Doc]) -> None:
        # atomic and fsync'd: a crash leaves the old table or the new one; the copy is not fsync'd (load() copes)
        write_json_atomic(self.path, {"routes": routes})
        write_json_atomic(self.backup, {"routes": routes}, sync=False)

    def update(self, name: str, change: Change, parse: Parse = lambda raw: raw) -> dict[str, Doc]:
        """Compare-and-set one route: under an exclusive lock, re-read the file (another gateway may have written
        it), apply `change` to the route as stored, write. Returns every route after the write."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_name(f"{self.path.name}.lock"), "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            routes = self.load(parse)
            routes = {**routes, name: change(routes.get(name))}
            self._save(routes)
            return routes

    def version(self) -> tuple | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return st.st_ino, st.st_mtime_ns, st.st_size

    def watch(self, on_change: Callable[[], None], stop: threading.Event, interval_s: float = 0.2) -> None:
        """Call `on_change` whenever the file changes (run in a thread until `stop`)."""
        seen = self.version()
        while not stop.wait(interval_s):
            now = self.version()
            if now != seen:
                seen = now
                _call(on_change)

    def close(self) -> None:
        pass


class FileRollouts:
    """Rollout records (`<folder>/<family>.json`) and locks (`<family>.lock`, a `flock`)."""

    kind = "file"

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)

    def read(self, family: str) -> dict | None:
        path = self.folder / f"{family}.json"
        return json.loads(path.read_text()) if path.is_file() else None

    def save(self, family: str, record: dict) -> None:
        write_json_atomic(self.folder / f"{family}.json", record)

    @contextmanager
    def lock(self, family: str) -> Iterator[None]:
        """Exclusive per family, across processes and threads; released by the OS if the deployer dies."""
        path = self.folder / f"{family}.lock"
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise RolloutLocked(f"another rollout of {family} is running (lock {path})") from None
        try:
            yield
        finally:
            handle.close()


# ---- PostgreSQL ------------------------------------------------------------------------------------------------------
SCHEMA = """
CREATE TABLE IF NOT EXISTS charforge_routes (
    name text PRIMARY KEY, route jsonb NOT NULL, updated_at timestamptz NOT NULL DEFAULT now());
CREATE TABLE IF NOT EXISTS charforge_rollouts (
    family text PRIMARY KEY, record jsonb NOT NULL, updated_at timestamptz NOT NULL DEFAULT now());
"""
CHANNEL = "charforge_routes"
ROUTES_LOCK = 7_406_020_001  # the advisory transaction lock every route write takes (one writer at a time)


class PostgresStore:
    """Routes and rollouts in PostgreSQL (both interfaces above). One connection for reads and writes, guarded
    by a lock (the gateway writes from its event loop, a deployment from its flow); LISTEN and each rollout lock
    get their own."""

    kind = "postgresql"

    def __init__(self, dsn: str, connect_timeout_s: int = 5) -> None:
        self.dsn, self.connect_timeout_s = dsn, connect_timeout_s
        self._conn = None
        self._guard = threading.Lock()
        self._schema_ready = False

    def __getstate__(self) -> dict:  # travels between tasks as its URL; connections are made where it is used
        return {"dsn": self.dsn, "connect_timeout_s": self.connect_timeout_s}

    def __setstate__(self, state: dict) -> None:
        self.__init__(**state)

    def describe(self) -> str:
        from charforge.settings import redact_credentials

        return redact_credentials(self.dsn)

    def connect(self, autocommit: bool = True):
        import psycopg

        try:
            return psycopg.connect(self.dsn, autocommit=autocommit, connect_timeout=self.connect_timeout_s)
        except psycopg.OperationalError as exc:
            raise StoreUnavailable(f"serving store {self.describe()} unreachable: {str(exc).strip()}") from None

    def _run(self, work: Callable) -> object:
        """`work(connection)` in a transaction on the shared connection; one reconnect if the connection broke."""
        import psycopg

        with self._guard:
            for attempt in (1, 2):
                if self._conn is None or self._conn.closed:
                    self._conn = self.connect()
                try:
                    if not self._schema_ready:
                        with self._conn.transaction():  # two gateways starting at once: one creates, one waits
                            self._conn.execute("SELECT pg_advisory_xact_lock(%s)", (ROUTES_LOCK,))
                            self._conn.execute(SCHEMA)
                        self._schema_ready = True
                    with self._conn.transaction():
                        return work(self._conn)
                except psycopg.OperationalError as exc:
                    self._conn.close()
                    if attempt == 2:
                        raise StoreUnavailable(f"serving store {self.describe()}: {str(exc).strip()}") from None

    # routes
    def load(self, parse: Parse = lambda raw: raw) -> dict[str, Doc]:
        routes = self._run(lambda c: {n: r for n, r in c.execute("SELECT name, route FROM charforge_routes")})
        parse(routes)
        return routes

    def update(self, name: str, change: Change, parse: Parse = lambda raw: raw) -> dict[str, Doc]:
        from psycopg.types.json import Jsonb

        def write(conn) -> dict[str, Doc]:
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (ROUTES_LOCK,))
            routes = {n: r for n, r in conn.execute("SELECT name, route FROM charforge_routes")}
            doc = change(routes.get(name))
            conn.execute("INSERT INTO charforge_routes (name, route) VALUES (%s, %s) ON CONFLICT (name) DO UPDATE "
                         "SET route = excluded.route, updated_at = now()", (name, Jsonb(doc)))
            conn.execute(f"NOTIFY {CHANNEL}")  # delivered at commit, to every gateway listening
            return {**routes, name: doc}
        routes = self._run(write)
        parse(routes)
        return routes

    def watch(self, on_change: Callable[[], None], stop: threading.Event, fallback_s: float = 5.0) -> None:
        """Call `on_change` on every NOTIFY, every `fallback_s` anyway, and after a reconnect (run in a thread)."""
        while not stop.is_set():
            try:
                conn = self.connect()
            except StoreUnavailable as exc:
                log.warning("%s; retrying in 1 s", exc)
                stop.wait(1)
                continue
            try:
                conn.execute(f"LISTEN {CHANNEL}")
                _call(on_change)  # whatever changed while not listening
                last = time.monotonic()
                while not stop.is_set():
                    for _ in conn.notifies(timeout=0.5, stop_after=1):
                        _call(on_change)
                        last = time.monotonic()
                    if time.monotonic() - last >= fallback_s:
                        _call(on_change)
                        last = time.monotonic()
            except Exception as exc:  # the connection broke: listen again
                log.warning("route watch on %s lost its connection (%s); reconnecting", self.describe(), exc)
                stop.wait(1)
            finally:
                conn.close()

    # rollouts
    def read(self, family: str) -> dict | None:
        rows = self._run(lambda c: c.execute("SELECT record FROM charforge_rollouts WHERE family = %s",
                                             (family,)).fetchall())
        return rows[0][0] if rows else None

    def save(self, family: str, record: dict) -> None:
        from psycopg.types.json import Jsonb

        self._run(lambda c: c.execute(
            "INSERT INTO charforge_rollouts (family, record) VALUES (%s, %s) ON CONFLICT (family) DO UPDATE "
            "SET record = excluded.record, updated_at = now()", (family, Jsonb(record))))

    @contextmanager
    def lock(self, family: str) -> Iterator[None]:
        """A session advisory lock on a connection of its own, held while the rollout runs: a deployer that dies
        closes its connection, and PostgreSQL releases the lock with it."""
        conn = self.connect()
        try:
            (got,) = conn.execute("SELECT pg_try_advisory_lock(hashtextextended(%s, 0))",
                                  (f"charforge-rollout:{family}",)).fetchone()
            if not got:
                raise RolloutLocked(f"another rollout of {family} is running (advisory lock in {self.describe()})")
            yield
        finally:
            conn.close()

    def close(self) -> None:
        with self._guard:
            if self._conn is not None:
                self._conn.close()


def _call(on_change: Callable[[], None]) -> None:
    try:
        on_change()
    except Exception:  # a watcher never dies of one bad read; the next change or poll tries again
        log.exception("re-reading the routing table failed")


def store_url(value: str | None, setting: str = "serving_store") -> str | None:
    """None (files under the state directory) or a PostgreSQL URL; anything else is refused with the fix."""
    if value in (None, "", "files"):
        return None
    if value.startswith(("postgresql://", "postgres://")):
        return value
    raise InputError(f"{setting}: {value!r} is not a serving store; use 'files' (the default: under the state "
                     f"directory) or a PostgreSQL URL such as postgresql://charforge@db:5432/charforge")


def route_store(state: Path, url: str | None) -> FileRoutes | PostgresStore:
    """The routing table's store: `<state>/serving/routes.json`, or PostgreSQL."""
    return PostgresStore(url) if url else FileRoutes(state / "serving" / "routes.json")


def rollout_store(state: Path, url: str | None) -> FileRollouts | PostgresStore:
    """The rollouts' store: `<state>/serving/rollouts/`, or PostgreSQL."""
    return PostgresStore(url) if url else FileRollouts(state / "serving" / "rollouts")

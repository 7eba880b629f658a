"""A throwaway PostgreSQL server for tests: Debian's package (`make postgres` installs it when missing), run on
loopback with password authentication, as the `postgres` user when the tests run as root."""

from __future__ import annotations

import glob
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from charforge.settings import REPO_ROOT
from charforge.vllm_server import free_port

INIT_SQL = REPO_ROOT / "deploy" / "compose" / "postgres-init.sql"


def postgres_bindir() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))  # Debian's layout, newest major last
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


class LocalPostgres:
    """A throwaway PostgreSQL cluster on loopback with password (scram) authentication. PostgreSQL refuses to run
    as root, so as root it runs as the `postgres` user the Debian package creates."""

    def __init__(self, bindir: Path) -> None:
        self.bindir, self.port = bindir, free_port()
        self.user, self.password = "charforge", secrets.token_urlsafe(16)
        self.root = Path(tempfile.mkdtemp(prefix="charforge-pg-"))  # not under pytest's root-only tmp dir
        self.run_as = "postgres" if os.geteuid() == 0 else None
        self.process: subprocess.Popen | None = None

    def _run(self, *cmd: str) -> None:
        subprocess.run(cmd, check=True, capture_output=True, user=self.run_as, timeout=120)

    def start(self) -> None:
        pwfile = self.root / "pw"
        pwfile.write_text(self.password)
        if self.run_as:
            owner = pwd.getpwnam(self.run_as)
            for path in (self.root, pwfile):
                os.chown(path, owner.pw_uid, owner.pw_gid)
        self._run(str(self.bindir / "initdb"), "-D", str(self.root / "data"), "-U", self.user, "--pwfile",
                  str(pwfile), "--auth=scram-sha-256", "-E", "UTF8", "--no-sync")
        pwfile.unlink()
        log = open(self.root / "postgres.log", "wb")
        # durability off: a test cluster, thrown away afterwards
        self.process = subprocess.Popen(
            [str(self.bindir / "postgres"), "-D", str(self.root / "data"), "-p", str(self.port),
             "-c", "listen_addresses=127.0.0.1", "-c", f"unix_socket_directories={self.root}",
             "-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off"],
            stdout=log, stderr=subprocess.STDOUT, user=self.run_as, start_new_session=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                self.connect("postgres").close()
                return
            except Exception:
                if self.process.poll() is not None:
                    raise RuntimeError((self.root / "postgres.log").read_text()[-2000:]) from None
                time.sleep(0.3)
        raise RuntimeError("PostgreSQL did not accept connections within 60 s")

    def connect(self, database: str):
        import psycopg

        return psycopg.connect(host="127.0.0.1", port=self.port, user=self.user, password=self.password,
                               dbname=database, connect_timeout=3)

    def run_init_sql(self, path: Path) -> None:
        """The deployment's init script (CREATE DATABASE cannot run inside a transaction: one statement each)."""
        conn = self.connect("postgres")
        conn.autocommit = True
        with conn.cursor() as cur:
            for statement in (s.strip() for s in path.read_text().split(";")):
                lines = [line for line in statement.splitlines() if not line.strip().startswith("--")]
                if "".join(lines).strip():
                    cur.execute("\n".join(lines))
        conn.close()

    def query(self, database: str, sql: str) -> list[tuple]:
        conn = self.connect(database)
        with conn.cursor() as cur:
            cur.execute(sql)
            rows = cur.fetchall()
        conn.close()
        return rows

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)  # "fast" shutdown
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="module")
def postgres():
    bindir = postgres_bindir()
    if bindir is None:
        message = "PostgreSQL server binaries missing: `make postgres` installs Debian's package"
        pytest.fail(message) if os.environ.get("CI") else pytest.skip(message)
    pg = LocalPostgres(bindir)
    try:
        pg.start()
        pg.run_init_sql(INIT_SQL)
        yield pg
    finally:
        pg.stop()

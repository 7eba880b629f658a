"""Several gateways, one routing table; rollout locks and records that every deployer sees — on the local default
(files under the state directory) and on a real PostgreSQL server (`tests/postgres.py`), each case on both.

The replicas behind the gateways are fakes (`tests/fakes.py`): what is under test is the shared table, not vLLM.
Two gateway processes over the real fleet, under load, with one SIGTERMed mid-canary, are in bench/load.py.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid

import httpx
import pytest

from charforge.errors import InputError
from serving import state_store
from serving.admin import GatewayAdmin, GatewayUnavailable, expand_urls
from serving.gateway import Gateway, RouteTable
from serving.rollout import RolloutRefused, rollout_lock, window
from tests.fakes import VERSION, FakeReplica
from tests.gateways import running, wait_healthy
from tests.postgres import postgres  # noqa: F401  (the fixture)

KEY, ADMIN_KEY = "app-key", "admin-key"
AUTH, ADMIN = {"authorization": f"Bearer {KEY}"}, {"authorization": f"Bearer {ADMIN_KEY}"}
V2 = "charforge-lora-v2"


@pytest.fixture(params=["files", "postgresql"])
def store_url(request, tmp_path, monkeypatch):
    """None (files under tmp_path) or the URL of a fresh database on the module's PostgreSQL server, in the
    deployment's form: no password in the URL, libpq reads PGPASSWORD."""
    if request.param == "files":
        return None
    pg = request.getfixturevalue("postgres")
    database = f"serving_{uuid.uuid4().hex[:8]}"
    conn = pg.connect("postgres")
    conn.autocommit = True
    conn.execute(f"CREATE DATABASE {database}")
    conn.close()
    monkeypatch.setenv("PGPASSWORD", pg.password)
    return f"postgresql://{pg.user}@127.0.0.1:{pg.port}/{database}"


def gateway(tmp_path, url: str | None, replica: FakeReplica, name: str) -> Gateway:
    """A gateway over its own connection to the shared store (as a second process would have)."""
    table = RouteTable.load(state_store.route_store(tmp_path, url))
    return Gateway([replica.url], table, api_key=KEY, admin_key=ADMIN_KEY, health_interval_s=0.2,
                   audit_path=tmp_path / f"audit-{name}.jsonl")


def put(url: str, weights: dict, **kw) -> httpx.Response:
    return httpx.put(f"{url}/admin/routes/nell", headers=ADMIN, json={"weights": weights, **kw}, timeout=10)


def chat(url: str) -> httpx.Response:
    return httpx.post(f"{url}/v1/chat/completions", headers=AUTH, timeout=10,
                      json={"model": "nell", "max_tokens": 4, "messages": [{"role": "user", "content": "Hi"}]})


@pytest.fixture
def two_gateways(tmp_path, store_url):
    replica = FakeReplica("ok")
    replica.models = {"data": [{"id": VERSION}, {"id": V2}]}
    a, b = gateway(tmp_path, store_url, replica, "a"), gateway(tmp_path, store_url, replica, "b")
    with running(a) as url_a, running(b) as url_b:
        wait_healthy(a), wait_healthy(b)
        yield a, b, url_a, url_b, replica
    replica.close()


def test_a_change_through_one_gateway_is_served_by_the_other_within_a_second(two_gateways):
    """The rollout writes through gateway a; requests through gateway b follow: b sends the next requests to the
    new version within 1 s, without a restart or a call to b."""
    a, b, url_a, url_b, replica = two_gateways
    assert put(url_a, {VERSION: 100}).status_code == 200
    deadline = time.monotonic() + 1.0
    while chat(url_b).status_code != 200:  # b had no route 'nell' at all: 404 until it sees a's write
        assert time.monotonic() < deadline, "gateway b did not see the route gateway a created within 1 s"
    assert put(url_a, {V2: 100}).status_code == 200
    changed = time.monotonic()
    while True:
        replica.asked.clear()
        assert chat(url_b).status_code == 200
        if replica.asked == [V2]:
            break
        assert time.monotonic() - changed < 1.0, f"gateway b still sends {replica.asked} 1 s after the change"
    print(f"gateway b served the new weights {1000 * (time.monotonic() - changed):.0f} ms after gateway a wrote them")
    assert b.table.routes["nell"].generation == a.table.routes["nell"].generation == 2


def test_writes_are_compare_and_set_across_gateways(two_gateways):
    """A writer that read generation N through gateway b loses to an operator who rolled back through gateway a
    (409 naming who changed it); 12 writers racing with the same expected generation through both gateways: exactly
    one wins."""
    _, _, url_a, url_b, _ = two_gateways
    assert put(url_a, {VERSION: 100}).status_code == 200
    assert put(url_a, {VERSION: 75, V2: 25}).status_code == 200
    read = wait_generation(url_b, 2)
    rolled = httpx.post(f"{url_a}/admin/routes/nell/rollback", timeout=10,
                        headers={**ADMIN, "x-charforge-actor": "operator"})
    assert rolled.status_code == 200 and rolled.json()["weights"] == {VERSION: 100}
    late = put(url_b, {VERSION: 50, V2: 50}, expected_generation=read)
    assert late.status_code == 409
    assert late.json()["error"]["type"] == "route_changed"
    assert f"route 'nell' is at generation {read + 1}, not {read}: changed by operator" in \
        late.json()["error"]["message"]

    now = read + 1
    results: list[int] = []
    racers = [threading.Thread(target=lambda u=u: results.append(
        put(u, {VERSION: 10, V2: 90}, expected_generation=now).status_code)) for u in [url_a, url_b] * 6]
    for t in racers:
        t.start()
    for t in racers:
        t.join()
    assert sorted(results) == [200] + [409] * 11
    for url in (url_a, url_b):
        wait_generation(url, now + 1)


def wait_generation(url: str, generation: int) -> int:
    """Until the gateway at `url` serves route 'nell' at `generation` (at most 1 s)."""
    deadline = time.monotonic() + 1.0
    while httpx.get(f"{url}/admin/routes", headers=ADMIN).json().get("nell", {}).get("generation") != generation:
        assert time.monotonic() < deadline, f"{url} does not serve generation {generation} of 'nell' after 1 s"
        time.sleep(0.02)
    return generation


def test_the_canary_gate_counts_the_requests_of_every_gateway(two_gateways):
    """Users reach both gateways; the deployment reads both gateways' /metrics (gateway.metrics_urls) and judges
    the window on their sum: 3 requests through a and 5 through b are 8."""
    _, _, url_a, url_b, _ = two_gateways
    assert put(url_a, {VERSION: 100}).status_code == 200
    while chat(url_b).status_code != 200:
        time.sleep(0.05)
    admin = GatewayAdmin(url_a, ADMIN_KEY, "rollout", metrics_urls=[url_a, url_b])
    before = admin.metrics()
    for url, n in ((url_a, 3), (url_b, 5)):
        for _ in range(n):
            assert chat(url).status_code == 200
    assert window(before, admin.metrics(), VERSION).requests == 8
    assert window(before, GatewayAdmin(url_a, ADMIN_KEY).metrics(), VERSION).requests == 3  # one gateway's view
    port = url_b.rsplit(":", 1)[1]
    assert f"http://127.0.0.1:{port}" in expand_urls([f"dns+http://localhost:{port}"])
    with pytest.raises(GatewayUnavailable, match=r"^dns\+http://no-such-gateway\.invalid:8000: no-such-gateway\.invalid "
                                                 r"does not resolve"):
        expand_urls(["dns+http://no-such-gateway.invalid:8000"])


LOCK_HOLDER = """
import sys, time
from serving import state_store
from serving.rollout import rollout_lock
with rollout_lock(state_store.rollout_store(__import__("pathlib").Path(sys.argv[1]), sys.argv[2] or None), "charforge-x"):
    print("held", flush=True)
    time.sleep(600)
"""


def test_one_rollout_per_family_across_processes_and_the_lock_dies_with_its_holder(tmp_path, store_url):
    """A deployer (another process, as another flow-run pod would be) holds the family's lock: a second one is
    refused with the named reason; SIGKILL the holder and the lock is free again, with no stale lock to clear. The
    record the dead holder saved is what the next deployer reads."""
    holder = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, str(tmp_path), store_url or ""],
                              stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": os.getcwd()})
    try:
        assert holder.stdout.readline().strip() == "held"
        records = state_store.rollout_store(tmp_path, store_url)
        with pytest.raises(RolloutRefused, match=r"^another rollout of charforge-x is running \(.*\); wait for it to "
                                                 r"finish, or roll back with `charforge rollback`$"):
            with rollout_lock(records, "charforge-x"):
                pass
        records.save("charforge-x", {"status": "canary", "step": 25})
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    deadline = time.monotonic() + 10
    while True:
        try:
            with rollout_lock(state_store.rollout_store(tmp_path, store_url), "charforge-x"):
                break
        except RolloutRefused:
            assert time.monotonic() < deadline, "the lock outlived its holder"
            time.sleep(0.1)
    assert state_store.rollout_store(tmp_path, store_url).read("charforge-x") == {"status": "canary", "step": 25}


def test_a_bad_serving_store_is_one_line_naming_the_key():
    with pytest.raises(InputError) as bad:
        state_store.store_url("redis://cache:6379")
    assert str(bad.value) == ("serving_store: 'redis://cache:6379' is not a serving store; use 'files' (the default: "
                              "under the state directory) or a PostgreSQL URL such as "
                              "postgresql://charforge@db:5432/charforge")
    down = state_store.PostgresStore("postgresql://charforge@127.0.0.1:9/charforge", connect_timeout_s=2)
    with pytest.raises(state_store.StoreUnavailable, match=r"^serving store postgresql://charforge@127.0.0.1:9/"
                                                           r"charforge unreachable: "):
        RouteTable.load(down)


def test_the_gateway_command_refuses_an_unknown_store_with_exit_2(tmp_path):
    run = subprocess.run([sys.executable, "-m", "cli.main", "gateway"], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "CHARFORGE_STATE_DIR": str(tmp_path),
                              "CHARFORGE_SERVING_STORE": "redis://cache:6379"})
    assert run.returncode == 2
    assert run.stderr.strip().splitlines()[-1] == (
        "error: serving_store: 'redis://cache:6379' is not a serving store; use 'files' (the default: under the state "
        "directory) or a PostgreSQL URL such as postgresql://charforge@db:5432/charforge")

"""Two `charforge gateway` processes sharing one routing table behind HAProxy in plain TCP mode: the layout for more
traffic than one gateway process takes. Clients keep sending chats through the balancer while the routes change
through one gateway and the other is SIGTERMed (a rolling restart) and started again.

The replica behind them is a fake (`tests/fakes.py`): what is under test is the gateways and the balancer. The same
layout over the real vLLM fleet, under locust, with a real rollout, is section 6 of bench/load.py.
"""

from __future__ import annotations

import threading
import time
from collections import Counter

import httpx
import pytest

from tests.fakes import VERSION, FakeReplica
from tests.gateways import GatewayProcess, TCPBalancer

pytestmark = pytest.mark.reliability
KEY, ADMIN_KEY = "app-key", "admin-key"
AUTH, ADMIN = {"authorization": f"Bearer {KEY}"}, {"authorization": f"Bearer {ADMIN_KEY}"}
ENV = {"CHARFORGE_GATEWAY_API_KEY": KEY, "CHARFORGE_GATEWAY_ADMIN_KEY": ADMIN_KEY}
V2 = "charforge-lora-v2"
CHAT = {"model": "nell", "max_tokens": 4, "messages": [{"role": "user", "content": "Hello"}]}


def clients(url: str, stop: threading.Event, outcomes: list, n: int = 4) -> list[threading.Thread]:
    """`n` keep-alive clients sending chats back to back until `stop`; each outcome is the status (with
    Retry-After noted) or the name of the exception."""
    def run() -> None:
        with httpx.Client(timeout=10) as client:
            while not stop.is_set():
                try:
                    r = client.post(f"{url}/v1/chat/completions", headers=AUTH, json=CHAT)
                    outcomes.append(f"{r.status_code}{' retry-after' if 'retry-after' in r.headers else ''}")
                except httpx.HTTPError as exc:
                    outcomes.append(type(exc).__name__)
    threads = [threading.Thread(target=run) for _ in range(n)]
    for t in threads:
        t.start()
    return threads


def metric(url: str, name: str, **labels) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    return sum(s.value for f in text_string_to_metric_families(httpx.get(f"{url}/metrics").text) for s in f.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def put(url: str, weights: dict) -> int:
    return httpx.put(f"{url}/admin/routes/nell", headers=ADMIN, json={"weights": weights}, timeout=10).status_code


def routes(url: str) -> dict:
    return {name: (r["weights"], r["generation"])
            for name, r in httpx.get(f"{url}/admin/routes", headers=ADMIN, timeout=10).json().items()}


def test_two_gateways_behind_a_tcp_balancer_survive_a_rolling_restart_with_no_failed_request(tmp_path):
    replica = FakeReplica("ok")
    replica.models = {"data": [{"id": VERSION}, {"id": V2}]}
    config = {"gateway": {"health_interval_s": 0.2, "drain_s": 1.5}}  # drain: 3 health checks of the balancer
    gateways, balancer = [], None
    stop, outcomes = threading.Event(), []
    try:
        gateways = [GatewayProcess(tmp_path, name, [replica.url], tmp_path / "state", config, ENV)
                    for name in ("a", "b")]
        a, b = gateways
        assert put(a.url, {VERSION: 100}) == 200
        balancer = TCPBalancer(tmp_path, [a.url, b.url])
        threads = clients(balancer.url, stop, outcomes)
        time.sleep(1)
        assert put(a.url, {VERSION: 90, V2: 10}) == 200  # a canary step, through gateway a
        time.sleep(1)
        before = len(outcomes)
        assert b.stop() == 128 + 15  # SIGTERM: b drains, then exits
        during_restart = len(outcomes)
        assert put(a.url, {V2: 100}) == 200  # the canary completes while b is down
        b.start()  # on the same port, from the shared table
        time.sleep(2)  # the balancer's check brings b back; traffic reaches both again
        replica.asked.clear()
        time.sleep(1)
        stop.set()
        for t in threads:
            t.join(timeout=30)
        # the balancer spreads connections, not requests: the keep-alive clients stay where they reconnected, and
        # new connections reach the restarted gateway again
        fresh = [httpx.post(f"{balancer.url}/v1/chat/completions", headers=AUTH, json=CHAT, timeout=10).status_code
                 for _ in range(6)]
        final = routes(a.url), routes(b.url)
        served_by_b = metric(b.url, "gateway_requests_total", version=V2, status="200")
    finally:
        stop.set()
        if balancer:
            balancer.stop()
        for g in gateways:
            g.kill()
        replica.close()
    tally = Counter(outcomes)
    print(f"{len(outcomes)} requests through the balancer: {dict(tally)}; {during_restart - before} while gateway b "
          f"drained")
    assert set(tally) <= {"200", "503 retry-after"}, tally
    assert during_restart - before > 0  # traffic went on while b drained
    assert final[0] == final[1] == {"nell": ({V2: 100.0}, 3)}
    assert set(replica.asked) == {V2}  # after the restart, both gateways serve the final weights
    assert fresh == [200] * 6 and served_by_b > 0  # ... and the balancer sends to the restarted gateway again

"""The gateway's guards where replicas misbehave or clients push: phantom in-flight requests, streams cut midway,
timeouts, connect timeouts, oversized bodies, overload, a poller fed bad answers, unexpected errors, route
compare-and-set and the admin audit trail.

The misbehaving replicas are fakes (`tests/fakes.py`): no real vLLM drops a connection, cuts a stream or hangs on
demand. Every case of the real fleet (rollouts, rollbacks, kills under load) is in tests/serving/test_rollout.py and
bench/load.py.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import httpx
import openai
import pytest
from starlette.requests import Request

from charforge.vllm_server import free_port
from serving.discovery_k8s import ready_replicas
from serving.gateway import Gateway, RouteChanged, RouteTable
from tests.fakes import VERSION, FakeReplica
from tests.gateways import running, wait_healthy

pytestmark = pytest.mark.reliability
KEY, ADMIN_KEY = "app-key", "admin-key"
AUTH, ADMIN = {"authorization": f"Bearer {KEY}"}, {"authorization": f"Bearer {ADMIN_KEY}"}
CHAT = {"model": "nell", "max_tokens": 8, "messages": [{"role": "user", "content": "Hello"}]}


def gateway(tmp_path, urls: list[str], **kw) -> Gateway:
    table = RouteTable(tmp_path / "routes.json")
    table.set_weights("nell", {VERSION: 100})
    return Gateway(urls, table, api_key=KEY, admin_key=ADMIN_KEY, **{"health_interval_s": 0.2, **kw})


def metric(url: str, name: str, **labels) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics").text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


# --- routing ---------------------------------------------------------------------------------------------------------

def test_round_robin_alternates_between_two_replicas(tmp_path):
    """10 requests, two replicas: 5 each. (Before: the one counter advanced twice per request, so all 10 went to
    replica-1.) The same over the real fleet, with locust: bench/load.py."""
    gw = gateway(tmp_path, ["http://127.0.0.1:1", "http://127.0.0.1:2"], strategy="round_robin")
    for name in gw.replicas:
        gw.replicas[name] = replace(gw.replicas[name], healthy=True, loaded=frozenset({VERSION}))
    request = Request({"type": "http", "headers": []})
    picked = []
    for _ in range(10):
        _, version, _ = gw.resolve(dict(CHAT), request)
        picked.append(gw.pick(version, None).replica.name)
    assert picked.count("replica-0") == picked.count("replica-1") == 5, picked


# --- replicas that misbehave -----------------------------------------------------------------------------------------

def test_a_replica_that_drops_connections_leaves_no_phantom_in_flight_request(tmp_path):
    bad = FakeReplica("drop")
    gw = gateway(tmp_path, [bad.url], connect_retries=0)
    with running(gw) as url:
        wait_healthy(gw)
        for stream in (True, False):
            r = httpx.post(f"{url}/v1/chat/completions", headers=AUTH, json={**CHAT, "stream": stream}, timeout=30)
            assert r.status_code == 503, r.text
            assert r.json()["error"]["message"] == (f"{VERSION!r}: no replica could be reached (1 tried: replica-0); "
                                                    "retry later")
            wait_healthy(gw)  # the poller puts it back: /health still answers
        assert gw.replicas["replica-0"].outstanding == 0  # before: 1 after the streamed request, forever
        assert metric(url, "gateway_outstanding_requests", replica="replica-0") == 0
    bad.close()


def test_a_stream_cut_midway_ends_with_an_error_event_and_counts_as_an_error(tmp_path):
    cut = FakeReplica("cut")
    gw = gateway(tmp_path, [cut.url])
    with running(gw) as url:
        wait_healthy(gw)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0)
        received = []
        with pytest.raises(openai.APIError, match="broke off midway"):
            for chunk in client.chat.completions.create(model="nell", messages=CHAT["messages"], stream=True):
                received.append(chunk.choices[0].delta.content)
        assert received == ["Good"]  # what arrived before the cut still reached the client
        assert metric(url, "gateway_requests_total", status="cut") == 1
        assert gw.replicas["replica-0"].outstanding == 0
    cut.close()


def test_a_replica_timeout_is_a_504_counted_as_an_error(tmp_path):
    slow = FakeReplica("slow", delay=3)
    gw = gateway(tmp_path, [slow.url], request_timeout_s=0.5)
    with running(gw) as url:
        wait_healthy(gw)
        r = httpx.post(f"{url}/v1/chat/completions", headers=AUTH, json=CHAT, timeout=30)
        assert r.status_code == 504
        assert r.json()["error"] == {"message": "replica-0 did not answer within 0.5 s (gateway.request_timeout_s)",
                                     "type": "timeout", "param": None, "code": 504}
        assert metric(url, "gateway_requests_total", status="504") == 1
        assert slow.posts == 1  # not retried: the replica may still be working on it
    slow.close()


def test_a_connect_timeout_fails_over_to_another_replica(tmp_path):
    """replica-0 accepts no connection (its listen backlog is full: the SYN is dropped, as from a frozen host);
    the request goes to replica-1. Before: httpx.ConnectTimeout was not retried and the client got a 500."""
    blackhole = socket.socket()
    blackhole.bind(("127.0.0.1", 0))
    blackhole.listen(0)
    filler = socket.create_connection(blackhole.getsockname(), timeout=2)
    good = FakeReplica("ok")
    gw = gateway(tmp_path, [f"http://127.0.0.1:{blackhole.getsockname()[1]}", good.url], strategy="round_robin",
                 health_interval_s=3600)
    with running(gw) as url:
        for name in gw.replicas:  # as if both had answered their last health poll
            gw.replicas[name] = replace(gw.replicas[name], healthy=True, loaded=frozenset({VERSION}))
        r = httpx.post(f"{url}/v1/chat/completions", headers=AUTH, json=CHAT, timeout=30)
        assert r.status_code == 200 and r.headers["x-charforge-replica"] == "replica-1", r.text
        assert metric(url, "gateway_connect_retries_total", replica="replica-0") == 1
        assert not gw.replicas["replica-0"].healthy
    filler.close()
    blackhole.close()
    good.close()


def test_the_poller_survives_a_null_model_list_and_an_ipv6_pod_address(tmp_path):
    fake = FakeReplica("ok")
    fake.models = {"data": None}  # before: a TypeError that ended the poller, and health froze
    gw = gateway(tmp_path, [fake.url, "http://fd00::5:8000"])  # the URL discovery built for an IPv6 pod before
    with running(gw) as url:
        time.sleep(0.6)
        assert not any(r.healthy for r in gw.replicas.values())
        assert not gw._poller.done()
        fake.models = {"data": [{"id": VERSION}]}
        wait_healthy(gw)
        assert httpx.post(f"{url}/v1/chat/completions", headers=AUTH, json=CHAT, timeout=30).status_code == 200
    fake.close()
    pods = {"items": [{"metadata": {"name": "vllm-0"}, "status": {
        "phase": "Running", "podIP": "fd00::5", "conditions": [{"type": "Ready", "status": "True"}]}}]}
    assert ready_replicas(pods, 8000) == {"vllm-0": "http://[fd00::5]:8000"}


def test_an_empty_reply_is_counted_as_an_error(tmp_path):
    fake = FakeReplica("empty")
    gw = gateway(tmp_path, [fake.url])
    with running(gw) as url:
        wait_healthy(gw)
        r = httpx.post(f"{url}/v1/chat/completions", headers=AUTH, json=CHAT, timeout=30)
        assert r.status_code == 200  # the client gets what the replica said
        assert metric(url, "gateway_requests_total", status="empty") == 1
    fake.close()


def test_streams_with_no_text_or_an_error_event_count_as_errors(tmp_path):
    """A streamed 200 is not a success by its status alone: deltas that never carry text (the NaN adapter's
    replies) count as `empty`, an error event from the replica as `upstream_error`; the canary gate sees both."""
    for mode, status in (("empty", "empty"), ("error_event", "upstream_error")):
        fake = FakeReplica(mode)
        gw = gateway(tmp_path / mode, [fake.url])
        with running(gw) as url:
            wait_healthy(gw)
            with httpx.stream("POST", f"{url}/v1/chat/completions", headers=AUTH, json={**CHAT, "stream": True},
                              timeout=30) as r:
                assert r.status_code == 200 and r.read().endswith(b"data: [DONE]\n\n")  # relayed unchanged
            assert metric(url, "gateway_requests_total", status=status) == 1
            assert metric(url, "gateway_requests_total", status="200") == 0
            assert gw.replicas["replica-0"].outstanding == 0
        fake.close()


def test_a_404_that_is_not_vllms_unknown_model_is_relayed_not_retried(tmp_path):
    """Only vLLM's 404 "The model `<version>` does not exist" means the version left the replica (and the request is
    placed again); any other 404 (here a proxy's) is the answer: relayed as it came, streamed or not, counted, and
    the replica asked once per request."""
    fake = FakeReplica("not_found")
    gw = gateway(tmp_path, [fake.url])
    with running(gw) as url:
        wait_healthy(gw)
        plain = httpx.post(f"{url}/v1/chat/completions", headers=AUTH, json=CHAT, timeout=30)
        assert plain.status_code == 404 and plain.json() == {"detail": "Not Found"}
        with httpx.stream("POST", f"{url}/v1/chat/completions", headers=AUTH, json={**CHAT, "stream": True},
                          timeout=30) as r:
            assert r.status_code == 404 and json.loads(r.read()) == {"detail": "Not Found"}
        assert fake.posts == 2
        assert metric(url, "gateway_requests_total", status="404") == 2
        assert "gateway_adapter_gone_total{" not in httpx.get(f"{url}/metrics").text
        assert gw.replicas["replica-0"].outstanding == 0
    fake.close()


def test_attempts_that_all_failed_are_a_counted_503_not_overload(tmp_path):
    """connect_retries 0, round robin, replica-0 refuses connections: the request's one attempt failed while
    replica-1 was never tried. That is an error of the version (counted; the canary gate sees it), not a full fleet
    (before: 503 'every replica ... has 32 requests in flight' with Retry-After, counted as overload only)."""
    good = FakeReplica("ok")
    gw = gateway(tmp_path, [f"http://127.0.0.1:{free_port()}", good.url], strategy="round_robin", connect_retries=0,
                 health_interval_s=3600)
    with running(gw) as url:
        for name in gw.replicas:  # as if both had answered their last health poll
            gw.replicas[name] = replace(gw.replicas[name], healthy=True, loaded=frozenset({VERSION}))
        r = httpx.post(f"{url}/v1/chat/completions", headers=AUTH, json=CHAT, timeout=30)
        assert r.status_code == 503 and "retry-after" not in r.headers
        assert r.json()["error"]["message"] == (f"{VERSION!r}: no replica could be reached (1 tried: replica-0); "
                                                "retry later")
        assert metric(url, "gateway_requests_total", status="503") == 1
        assert metric(url, "gateway_rejected_total", reason="overloaded") == 0
    good.close()


# --- clients that push -----------------------------------------------------------------------------------------------

def test_bodies_over_the_limit_get_413_before_any_replica_sees_them(tmp_path):
    fake = FakeReplica("ok")
    gw = gateway(tmp_path, [fake.url], max_request_bytes=65536)
    with running(gw) as url:
        wait_healthy(gw)
        big = {**CHAT, "messages": [{"role": "user", "content": "x" * 10_000_000}]}  # 10 MB
        r = httpx.post(f"{url}/v1/chat/completions", headers=AUTH, json=big, timeout=60)
        assert r.status_code == 413
        assert r.json()["error"]["message"] == ("request body is 10000073 bytes; this gateway accepts at most 65536 "
                                                "(gateway.max_request_bytes)")

        def chunks():  # no Content-Length: the gateway counts as it reads and stops
            yield b'{"model": "nell", "messages": [{"role": "user", "content": "'
            for _ in range(100):
                yield b"x" * 10_000
            yield b'"}]}'
        r = httpx.post(f"{url}/v1/chat/completions", headers=AUTH, content=chunks(), timeout=60)
        assert r.status_code == 413 and "over 65536 bytes" in r.json()["error"]["message"]
        assert fake.posts == 0
        assert metric(url, "gateway_rejected_total", reason="too_large") == 2
    fake.close()


def test_overload_answers_503_with_retry_after_instead_of_queueing(tmp_path):
    slow = FakeReplica("slow", delay=1.5)
    gw = gateway(tmp_path, [slow.url], max_inflight_per_replica=2, retry_after_s=3)
    with running(gw) as url:
        wait_healthy(gw)

        async def burst():
            async with httpx.AsyncClient(headers=AUTH, timeout=30) as client:
                return await asyncio.gather(*(client.post(f"{url}/v1/chat/completions", json=CHAT)
                                              for _ in range(5)))
        answers = asyncio.run(burst())
        statuses = sorted(r.status_code for r in answers)
        assert statuses == [200, 200, 503, 503, 503], statuses
        refused = next(r for r in answers if r.status_code == 503)
        assert refused.headers["retry-after"] == "3"
        assert refused.json()["error"]["message"] == (
            f"every replica serving {VERSION!r} has 2 requests in flight (gateway.max_inflight_per_replica); retry "
            "after 3 s")
        assert slow.posts == 2 and metric(url, "gateway_rejected_total", reason="overloaded") == 3
        assert metric(url, "gateway_requests_total", status="503") == 0  # never reached a replica: not a canary error
        assert gw.replicas["replica-0"].outstanding == 0
    slow.close()


def test_bad_json_and_bad_fields_are_400_in_openai_shape(tmp_path):
    gw = gateway(tmp_path, [])
    with running(gw) as url:
        for body, message in [(b"{not json", "request body is not JSON"),
                              (b"[1, 2]", "request body must be a JSON object"),
                              (b'{"model": ["nell"]}', """'model' must be a route name (a string), not ["nell"]"""),
                              (b'{"model": "nell", "messages": "hi"}',
                               "'messages' must be a list of objects with a role and a content")]:
            r = httpx.post(f"{url}/v1/chat/completions", headers=AUTH, content=body, timeout=10)
            assert (r.status_code, r.json()["error"]["message"]) == (400, message)
        # the router's own 404 and 405 too (before: {"detail": "Not Found"}, which OpenAI clients cannot show)
        r = httpx.post(f"{url}/v1/embeddings", headers=AUTH, json={"model": "nell", "input": "x"}, timeout=10)
        assert (r.status_code, r.json()["error"]) == (404, {"message": "Not Found", "type": "not_found_error",
                                                            "param": None, "code": 404})
        r = httpx.get(f"{url}/v1/chat/completions", headers=AUTH, timeout=10)
        assert (r.status_code, r.json()["error"]["message"]) == (405, "Method Not Allowed")


def test_an_unexpected_error_answers_500_in_openai_shape(tmp_path):
    """A routing table edited by hand so that no version has weight: an internal error, still in OpenAI's shape
    (before: a plain-text 'Internal Server Error')."""
    (tmp_path / "routes.json").write_text(json.dumps({"routes": {"nell": {"weights": {VERSION: 0}}}}))
    gw = Gateway([], RouteTable.load(tmp_path / "routes.json"), api_key=KEY)
    with running(gw) as url:
        r = httpx.post(f"{url}/v1/chat/completions", headers=AUTH, json=CHAT, timeout=10)
        assert r.status_code == 500
        assert r.json()["error"]["type"] == "server_error"
        assert r.json()["error"]["message"].startswith("internal error in the gateway (ValueError: no version has a "
                                                       "positive weight)")


# --- route changes ---------------------------------------------------------------------------------------------------

def test_route_changes_are_compare_and_set_and_audited(tmp_path):
    fake = FakeReplica("ok")
    gw = gateway(tmp_path, [fake.url])
    with running(gw) as url:
        wait_healthy(gw)
        read = httpx.get(f"{url}/admin/routes", headers=ADMIN).json()["nell"]
        assert read["generation"] == 1
        operator = httpx.post(f"{url}/admin/routes/nell/rollback", timeout=10,
                              headers={**ADMIN, "x-charforge-actor": "charforge rollback (alice)"})
        assert operator.status_code == 409  # nothing to roll back to yet
        first = httpx.put(f"{url}/admin/routes/nell", headers={**ADMIN, "x-charforge-actor": "rollout of v2"},
                          json={"weights": {VERSION: 100}, "expected_generation": 1}, timeout=10)
        assert first.status_code == 200 and first.json()["generation"] == 2
        stale = httpx.put(f"{url}/admin/routes/nell", headers=ADMIN,
                          json={"weights": {VERSION: 100}, "expected_generation": 1}, timeout=10)
        assert stale.status_code == 409 and stale.json()["error"]["type"] == "route_changed"
        assert stale.json()["error"]["message"].startswith("route 'nell' is at generation 2, not 1: changed by "
                                                           f"rollout of v2 [sha256:")
        for bad, message in [({"weights": {VERSION: 100}, "expected_generation": "2"},
                              '\'expected_generation\' must be an integer or null, not "2"'),
                             ({"weights": {VERSION: 100}, "previous": ["x"]},
                              """'previous' must be null or {"<served name>": <percent>, ...}, not ["x"]"""),
                             ({"weights": {VERSION: 100}, "system_prompt": 5},
                              "'system_prompt' must be a string or null, not 5")]:
            r = httpx.put(f"{url}/admin/routes/nell", headers=ADMIN, json=bad, timeout=10)
            assert (r.status_code, r.json()["error"]["message"]) == (400, message)

        def chunked():  # no Content-Length: the compare-and-set still applies (before: the body was ignored)
            yield b'{"expected_generation": 1}'
        r = httpx.post(f"{url}/admin/routes/nell/rollback", headers=ADMIN, content=chunked(), timeout=10)
        assert r.status_code == 409 and r.json()["error"]["type"] == "route_changed"
    lines = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert [(a["action"], a["route"], a["generation"]) for a in lines] == [("set_weights", "nell", 2)]
    assert lines[0]["who"].startswith("rollout of v2 [sha256:") and ADMIN_KEY not in lines[0]["who"]
    assert lines[0]["before"] == lines[0]["after"] == {VERSION: 100}
    table = RouteTable.load(tmp_path / "routes.json")
    with pytest.raises(RouteChanged, match="at generation 2, not 0"):
        table.set_weights("nell", {VERSION: 50, "other": 50}, expected_generation=0)
    assert RouteTable.load(tmp_path / "routes.json").routes["nell"].weights == {VERSION: 100}
    fake.close()


def test_a_failed_gate_restores_every_route_but_the_one_an_operator_changed(tmp_path):
    """A canary at 25% on two routes; during the hold an operator sets `nell` by hand; then the gate says roll
    back. The rollout restores `charforge` (before: it wrote nothing once one route had changed, and the failing
    version kept 25% of `charforge`), leaves `nell` as the operator set it, and stops saying who changed it."""
    from charforge.results import Rollout
    from serving.admin import GatewayAdmin
    from serving.rollout import RolloutPlan, RouteChangedUnderRollout, roll_back, write_routes
    from serving.state_store import FileRollouts

    fake = FakeReplica("ok")
    fake.models = {"data": [{"id": VERSION}, {"id": "charforge-lora-v2"}]}
    table = RouteTable(tmp_path / "routes.json")
    for route in ("nell", "charforge"):
        table.set_weights(route, {VERSION: 100})
    gw = Gateway([fake.url], table, api_key=KEY, admin_key=ADMIN_KEY, health_interval_s=0.2)
    with running(gw) as url:
        wait_healthy(gw)
        plan = RolloutPlan("charforge-lora", "2", "charforge-lora-v2", tmp_path, {"nell": None, "charforge": None},
                           {"nell": {VERSION: 100.0}, "charforge": {VERSION: 100.0}}, FileRollouts(tmp_path),
                           tmp_path / "desired.json", tmp_path, "base")
        admin = GatewayAdmin(url, ADMIN_KEY, "rollout")
        record = Rollout(served=plan.served, status="canary", generations={"nell": 1, "charforge": 1})
        generations = write_routes(admin, plan, record, plan.step_weights(25))
        record = record.model_copy(update={"generations": generations})
        GatewayAdmin(url, ADMIN_KEY, "alice").set_weights("nell", {"charforge-lora-v2": 100})  # she decided
        with pytest.raises(RouteChangedUnderRollout, match=r"route 'nell' is at generation 3, not 2: changed by "
                                                           r"alice \[sha256:\w+\] \(the gate said roll back: error "
                                                           r"rate 30.0% > 1.0%; every other route was restored\)"):
            roll_back(admin, plan, record, "error rate 30.0% > 1.0%")
        now = admin.routes()
        assert now["charforge"].weights == {VERSION: 100.0} and now["charforge"].generation == 3
        assert now["nell"].weights == {"charforge-lora-v2": 100.0} and now["nell"].changed_by.startswith("alice")
        assert json.loads((tmp_path / "charforge-lora.json").read_text())["status"] == "stopped"
    fake.close()


def test_a_route_added_since_the_last_deployment_waits_for_the_canary_to_pass(tmp_path):
    """A character card added since the last deployment has a route with no earlier version. During the canary it is
    not written at all (before: 100% of the new version from the first step, and a failing gate, restoring each
    route's previous weights, left it serving the failing version); it gets the version at 100%, or at once when no
    route has anything to canary against."""
    from charforge.results import Rollout
    from serving.admin import GatewayAdmin
    from serving.rollout import RolloutPlan, roll_back, write_routes
    from serving.state_store import FileRollouts

    fake = FakeReplica("ok")
    fake.models = {"data": [{"id": VERSION}, {"id": "charforge-lora-v2"}]}
    table = RouteTable(tmp_path / "routes.json")
    table.set_weights("nell", {VERSION: 100})
    gw = Gateway([fake.url], table, api_key=KEY, admin_key=ADMIN_KEY, health_interval_s=0.2)
    with running(gw) as url:
        wait_healthy(gw)
        plan = RolloutPlan("charforge-lora", "2", "charforge-lora-v2", tmp_path, {"nell": None, "ada": "You are Ada."},
                           {"nell": {VERSION: 100.0}}, FileRollouts(tmp_path), tmp_path / "desired.json", tmp_path,
                           "base")
        assert plan.step_weights(25) == {"nell": {VERSION: 75.0, "charforge-lora-v2": 25.0}}
        assert plan.step_weights(100) == {"nell": {"charforge-lora-v2": 100.0}, "ada": {"charforge-lora-v2": 100.0}}
        admin = GatewayAdmin(url, ADMIN_KEY, "rollout")
        record = Rollout(served=plan.served, status="canary", generations={"nell": 1})
        record = record.model_copy(update={"generations": write_routes(admin, plan, record, plan.step_weights(25))})
        assert "ada" not in admin.routes()
        roll_back(admin, plan, record, "error rate 30.0% > 1.0%")
        assert {name: r.weights for name, r in admin.routes().items()} == {"nell": {VERSION: 100.0}}
        first = RolloutPlan("charforge-lora", "1", VERSION, tmp_path, {"ada": None}, {}, FileRollouts(tmp_path),
                            tmp_path / "desired.json", tmp_path, "base")
        assert first.step_weights(5) == {"ada": {VERSION: 100.0}}  # nothing to canary against anywhere
    fake.close()


def test_a_damaged_routing_table_falls_back_to_its_copy_instead_of_crash_looping(tmp_path, caplog):
    """routes.json cut short (a disk that filled, a hand edit saved halfway): the gateway loads the copy it keeps
    beside it, moves the bad file aside and logs it (before: a JSONDecodeError at start, so it crash-looped)."""
    table = RouteTable(tmp_path / "routes.json")
    table.set_weights("nell", {VERSION: 100})
    table.set_weights("nell", {VERSION: 50, "charforge-lora-v2": 50})
    text = (tmp_path / "routes.json").read_text()
    (tmp_path / "routes.json").write_text(text[: len(text) // 2])
    loaded = RouteTable.load(tmp_path / "routes.json")
    assert loaded.routes["nell"].weights == {VERSION: 50, "charforge-lora-v2": 50}
    assert loaded.routes["nell"].generation == 2
    assert json.loads((tmp_path / "routes.json").read_text())["routes"]["nell"]["generation"] == 2  # rewritten
    aside = list(tmp_path.glob("routes.json.unusable-*"))
    assert len(aside) == 1 and aside[0].read_text() == text[: len(text) // 2]
    assert f"routing table {tmp_path / 'routes.json'} is unusable (JSONDecodeError" in caplog.text

    (tmp_path / "routes.json").write_text("{")
    (tmp_path / "routes.json.bak").write_text("")
    empty = RouteTable.load(tmp_path / "routes.json")  # nothing usable: no routes, an error, no crash
    assert empty.routes == {} and "starting with no routes" in caplog.text


def test_sigterm_drains_in_flight_requests_before_the_gateway_exits(tmp_path):
    """A rolling restart of the gateway: SIGTERM while a request is in flight. For `gateway.drain_s` (1 s here) the
    gateway still answers, with /health at 503 (a load balancer takes it out) and `Connection: close` on every
    response (keep-alive clients move off); then new connections are refused; the request in flight is answered
    (200), and the process exits once it is done."""
    slow = FakeReplica("slow", delay=3)
    port = free_port()
    (tmp_path / "state" / "serving").mkdir(parents=True)
    (tmp_path / "state" / "serving" / "routes.json").write_text(json.dumps({"routes": {"nell": {"weights": {
        VERSION: 100}}}}))
    (tmp_path / "serving.yaml").write_text(f"gateway:\n  port: {port}\n  health_interval_s: 0.2\n  drain_s: 1.0\n")
    gw = subprocess.Popen([str(Path(sys.executable).parent / "charforge"), "gateway", "--config",
                           str(tmp_path / "serving.yaml"), "--replica", slow.url],
                          env={**os.environ, "CHARFORGE_STATE_DIR": str(tmp_path / "state"),
                               "CHARFORGE_GATEWAY_API_KEY": KEY, "CHARFORGE_GATEWAY_ADMIN_KEY": ADMIN_KEY},
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:  # up, with the fake replica healthy
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline and gw.poll() is None
            time.sleep(0.1)
        answer: dict = {}
        request = threading.Thread(target=lambda: answer.update(r=httpx.post(
            f"{url}/v1/chat/completions", headers=AUTH, json=CHAT, timeout=30)))
        request.start()
        while slow.posts == 0:  # the request reached the replica
            time.sleep(0.02)
        gw.terminate()
        time.sleep(0.3)
        draining = httpx.get(f"{url}/health", timeout=2)  # still answering, out of rotation
        assert draining.status_code == 503 and draining.json()["draining"] is True
        assert draining.headers["connection"] == "close"
        time.sleep(1.2)
        with pytest.raises(httpx.ConnectError):  # drained: no new connection
            httpx.get(f"{url}/health", timeout=2)
        request.join(timeout=30)
        assert answer["r"].status_code == 200 and answer["r"].json()["choices"][0]["message"]["content"] == "Good day."
        assert gw.wait(timeout=30) == 128 + 15  # exited on SIGTERM, after the drain
    finally:
        gw.kill()
        slow.close()

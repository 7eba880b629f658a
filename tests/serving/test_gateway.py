"""The gateway in front of a real vLLM replica, driven by the official openai client."""

from __future__ import annotations

import time

import httpx
import openai
import pytest

from charforge.characters import load_characters
from charforge.settings import DATA_DIR
from serving.gateway import Gateway, RouteTable
from tests.gateways import running

pytestmark = pytest.mark.slow
KEY = "test-key"
ADMIN_KEY = "test-admin-key"


@pytest.fixture
def gateway(vllm_base, smollm2_adapter, tmp_path):
    load = httpx.post(f"{vllm_base.url}/v1/load_lora_adapter",
                      json={"lora_name": "charforge-test-v1", "lora_path": str(smollm2_adapter)}, timeout=120)
    assert load.status_code in (200, 400), load.text  # 400: already loaded by an earlier test in this session
    table = RouteTable(tmp_path / "routes.json")
    gw = Gateway([vllm_base.url], table, api_key=KEY, admin_key=ADMIN_KEY, health_interval_s=0.5)
    with running(gw) as url:
        yield gw, url, vllm_base


def admin(url: str, method: str, path: str, **kw) -> httpx.Response:
    return httpx.request(method, f"{url}{path}", headers={"authorization": f"Bearer {ADMIN_KEY}"}, timeout=30, **kw)


def test_openai_client_chats_with_a_character_through_the_gateway(gateway, tmp_path):
    gw, url, vllm = gateway
    nell = load_characters(DATA_DIR / "characters")["nell_bramwick"]
    r = admin(url, "PUT", "/admin/routes/nell_bramwick",
              json={"weights": {"charforge-test-v1": 100}, "system_prompt": nell.system_prompt})
    assert r.status_code == 200, r.text
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY)
    assert [m.id for m in client.models.list().data] == ["nell_bramwick"]

    messages = [{"role": "user", "content": "What did you plant this spring?"}]
    raw = client.chat.completions.with_raw_response.create(model="nell_bramwick", messages=messages,
                                                           temperature=0, max_tokens=24)
    assert raw.headers["x-charforge-version"] == "charforge-test-v1"
    reply = raw.parse().choices[0].message.content
    # what the adapter itself says to the same conversation with the character's system prompt
    direct = httpx.post(f"{vllm.url}/v1/chat/completions", timeout=120, json={
        "model": "charforge-test-v1", "temperature": 0, "max_tokens": 24,
        "messages": [{"role": "system", "content": nell.system_prompt}, *messages]}).json()
    assert reply and reply == direct["choices"][0]["message"]["content"]

    chunks = list(client.chat.completions.create(model="nell_bramwick", messages=messages, temperature=0,
                                                 max_tokens=24, stream=True))
    assert "".join(chunk.choices[0].delta.content or "" for chunk in chunks) == reply
    # The gateway asks the replica for a stream's usage to count its tokens, and keeps that event from a client that
    # did not ask for it; a client that asks gets it
    assert all(chunk.choices and chunk.usage is None for chunk in chunks)
    asked = list(client.chat.completions.create(model="nell_bramwick", messages=messages, temperature=0,
                                                max_tokens=24, stream=True, stream_options={"include_usage": True}))
    tokens = raw.parse().usage.completion_tokens
    assert asked[-1].choices == [] and asked[-1].usage.completion_tokens == tokens

    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{url}/v1", api_key="wrong").chat.completions.create(
            model="nell_bramwick", messages=messages, max_tokens=4)
    with pytest.raises(openai.NotFoundError, match="model 'sherlock' is not served here; available: nell_bramwick"):
        client.chat.completions.create(model="sherlock", messages=messages, max_tokens=4)

    metrics = httpx.get(f"{url}/metrics").text
    assert 'gateway_requests_total{route="nell_bramwick",status="200",version="charforge-test-v1"} 3.0' in metrics
    counted = f'gateway_completion_tokens_total{{route="nell_bramwick",version="charforge-test-v1"}} {3 * tokens}.0'
    assert counted in metrics  # the reply, the stream and the stream that asked for its usage
    assert "gateway_time_to_first_token_seconds_bucket" in metrics
    # a restarted gateway comes back with the live routing table
    assert RouteTable.load(tmp_path / "routes.json").routes["nell_bramwick"].weights == {"charforge-test-v1": 100}


def test_routes_only_to_loaded_versions_and_rolls_back(gateway):
    gw, url, _ = gateway
    r = admin(url, "PUT", "/admin/routes/charforge", json={"weights": {"charforge-test-v9": 100}})
    assert r.status_code == 409 and "not loaded on any healthy replica: charforge-test-v9" in r.text
    assert admin(url, "PUT", "/admin/routes/charforge", json={"weights": {"smollm2-135m-instruct": 100}}).status_code == 200
    assert admin(url, "PUT", "/admin/routes/charforge", json={"weights": {"charforge-test-v1": 100}}).status_code == 200
    started = time.perf_counter()
    back = admin(url, "POST", "/admin/routes/charforge/rollback")
    assert back.status_code == 200 and back.json()["weights"] == {"smollm2-135m-instruct": 100}
    assert time.perf_counter() - started < 1
    r = httpx.post(f"{url}/v1/completions", headers={"authorization": f"Bearer {KEY}"}, timeout=60,
                   json={"model": "charforge", "prompt": "Hello", "max_tokens": 2})
    assert r.status_code == 200 and r.headers["x-charforge-version"] == "smollm2-135m-instruct"


def catalogue_of(vllm_base, adapter, tmp_path, names: list[str]) -> tuple[dict, dict]:
    """Copies of `adapter` as the placement catalogue's versions (`catalogue.json`), and what other tests of the
    session left loaded on the replica as pinned (`desired.json`, like a fleet's desired adapters): (versions,
    held)."""
    import json
    import shutil

    versions = {name: tmp_path / name for name in names}
    for folder in versions.values():
        shutil.copytree(adapter, folder)
    (tmp_path / "catalogue.json").write_text(json.dumps({v: str(f) for v, f in versions.items()}))
    held = {m["id"]: m["root"] for m in httpx.get(f"{vllm_base.url}/v1/models", timeout=10).json()["data"]
            if m.get("parent") and m["id"] not in versions}
    (tmp_path / "desired.json").write_text(json.dumps(held))
    return versions, held


def test_adapters_are_placed_on_demand_evicted_least_recently_used_and_a_failed_load_tries_another_replica(
        vllm_base, smollm2_adapter, tmp_path):
    """More adapter versions than a replica may hold: the gateway loads a requested version where placement chooses
    (never a 503 for a catalogue version), evicts the least recently used idle one when the replica is full, and
    a load a replica refuses (the fake in front, failing every load) sends the request to another replica; every
    load, failure and eviction is counted per replica and version."""
    from serving.gateway import AdapterCatalogue
    from tests.fakes import FakeReplica

    versions, held = catalogue_of(vllm_base, smollm2_adapter, tmp_path, [f"fam-{c}-v1" for c in "abc"])
    failing = FakeReplica("load_fails")
    table = RouteTable(tmp_path / "routes.json")
    catalogue = AdapterCatalogue(tmp_path / "catalogue.json", tmp_path / "desired.json", max_resident=len(held) + 2)
    gw = Gateway([failing.url, vllm_base.url], table, strategy="adapter_affinity", api_key=KEY, admin_key=ADMIN_KEY,
                 health_interval_s=0.5, catalogue=catalogue)
    try:
        with running(gw) as url:
            for c in "abc":
                r = admin(url, "PUT", f"/admin/routes/family_{c}", json={"weights": {f"fam-{c}-v1": 100}})
                assert r.status_code == 200, r.text  # in the catalogue: servable though resident nowhere yet
            client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY)
            messages = [{"role": "user", "content": "Good morning! What will you do today?"}]

            def ask(route: str) -> tuple[str, str]:
                raw = client.chat.completions.with_raw_response.create(model=route, messages=messages,
                                                                       temperature=0, max_tokens=8)
                assert raw.parse().choices[0].message.content
                return raw.headers["x-charforge-version"], raw.headers["x-charforge-replica"]

            def resident() -> set[str]:
                return {m["id"] for m in httpx.get(f"{vllm_base.url}/v1/models", timeout=10).json()["data"]
                        if m["id"].startswith("fam-")}

            assert ask("family_a") == ("fam-a-v1", "replica-1")  # replica-0 refused the load: replica-1 took it
            assert ask("family_b") == ("fam-b-v1", "replica-1")
            assert resident() == {"fam-a-v1", "fam-b-v1"}
            assert ask("family_a") == ("fam-a-v1", "replica-1")  # resident: no load; a is now the newer one
            assert ask("family_c") == ("fam-c-v1", "replica-1")  # full: b, least recently used, makes room
            assert resident() == {"fam-a-v1", "fam-c-v1"}
            assert ask("family_b") == ("fam-b-v1", "replica-1")  # back on demand, a goes
            assert resident() == {"fam-b-v1", "fam-c-v1"}
            assert set(held) <= {m["id"] for m in httpx.get(f"{vllm_base.url}/v1/models", timeout=10).json()["data"]}

            metrics = httpx.get(f"{url}/metrics").text
            for line in ['gateway_adapter_loads_total{outcome="ok",replica="replica-1",version="fam-b-v1"} 2.0',
                         'gateway_adapter_loads_total{outcome="ok",replica="replica-1",version="fam-a-v1"} 1.0',
                         'gateway_adapter_loads_total{outcome="failed",replica="replica-0",version="fam-a-v1"} 1.0',
                         'gateway_adapter_evictions_total{replica="replica-1",version="fam-b-v1"} 1.0',
                         'gateway_adapter_evictions_total{replica="replica-1",version="fam-a-v1"} 1.0',
                         'gateway_adapter_requests_total{replica="replica-1",version="fam-a-v1"} 2.0',
                         'gateway_adapter_resident{replica="replica-1",version="fam-a-v1"} 0.0',
                         'gateway_adapter_resident{replica="replica-1",version="fam-c-v1"} 1.0']:
                assert line in metrics, line
            assert 'gateway_adapter_requests_total{replica="replica-0"' not in metrics  # no request reached it
            # a version in no catalogue and resident nowhere is still refused, by name
            r = admin(url, "PUT", "/admin/routes/family_z", json={"weights": {"fam-z-v1": 100}})
            assert r.status_code == 409 and "not loaded on any healthy replica: fam-z-v1" in r.text

            # Room for one: while a stream of c runs, b has nowhere to go. It waits for c to go idle, up to
            # room_wait_s; then it is refused with a 503 and Retry-After, never sent where it is not loaded.
            import threading

            catalogue.max_resident = len(held) + 1
            httpx.post(f"{vllm_base.url}/v1/unload_lora_adapter", json={"lora_name": "fam-b-v1"}, timeout=30)
            time.sleep(1.5)  # the poller sees b gone
            streaming = threading.Event()

            def long_stream() -> None:
                with httpx.stream("POST", f"{url}/v1/chat/completions", timeout=120, headers={
                        "authorization": f"Bearer {KEY}"}, json={"model": "family_c", "messages": messages,
                                                                 "max_tokens": 96, "ignore_eos": True,
                                                                 "stream": True}) as s:
                    for _ in s.iter_lines():
                        streaming.set()
            runner = threading.Thread(target=long_stream)
            runner.start()
            assert streaming.wait(60)
            catalogue.room_wait_s = 0.3
            refused = httpx.post(f"{url}/v1/chat/completions", headers={"authorization": f"Bearer {KEY}"},
                                 timeout=60, json={"model": "family_b", "messages": messages, "max_tokens": 4})
            assert refused.status_code == 503 and refused.headers["retry-after"] == "1", refused.text
            assert "no replica had room for 'fam-b-v1' within 0.3 s (gateway.placement.room_wait_s)" in \
                refused.json()["error"]["message"]
            catalogue.room_wait_s = 60
            assert ask("family_b") == ("fam-b-v1", "replica-1")  # waited for c's stream to end, then c went
            assert not runner.is_alive()
            runner.join()
            assert resident() == {"fam-b-v1"}
            metrics = httpx.get(f"{url}/metrics").text
            assert 'gateway_rejected_total{reason="no_adapter_room"} 1.0' in metrics
            assert 'gateway_adapter_room_wait_seconds_count 2.0' in metrics
    finally:
        failing.close()
        for name in versions:
            httpx.post(f"{vllm_base.url}/v1/unload_lora_adapter", json={"lora_name": name}, timeout=30)


def test_a_version_another_gateway_evicted_is_placed_again_not_answered_404(vllm_base, smollm2_adapter, tmp_path):
    """Two gateways place adapters on the same replica. Gateway A evicts the version gateway B placed (its view of
    the replica is fresh); B, whose view is not (it polls every 60 s here), sends the next request for that version
    to the replica, which answers vLLM's 404 "does not exist": B places it again and the client gets its reply,
    streamed or not, instead of the 404. Counted as gone per replica and version."""
    from serving.gateway import AdapterCatalogue

    versions, held = catalogue_of(vllm_base, smollm2_adapter, tmp_path, ["gone-x-v1", "gone-y-v1"])
    table = RouteTable(tmp_path / "routes.json")
    table.set_weights("family_x", {"gone-x-v1": 100})
    table.set_weights("family_y", {"gone-y-v1": 100})

    def gateway(interval: float) -> Gateway:
        catalogue = AdapterCatalogue(tmp_path / "catalogue.json", tmp_path / "desired.json", max_resident=len(held) + 1)
        return Gateway([vllm_base.url], RouteTable.load(tmp_path / "routes.json"), strategy="adapter_affinity",
                       api_key=KEY, admin_key=ADMIN_KEY, health_interval_s=interval, catalogue=catalogue)

    messages = [{"role": "user", "content": "Good morning!"}]
    stale = gateway(60.0)
    try:
        with running(gateway(0.5)) as fresh_url, running(stale) as stale_url:
            def ask(url: str, route: str, stream: bool = False) -> tuple[int, str | None]:
                r = httpx.post(f"{url}/v1/chat/completions", headers={"authorization": f"Bearer {KEY}"}, timeout=120,
                               json={"model": route, "messages": messages, "max_tokens": 4, "stream": stream})
                assert r.status_code == 200 and (not stream or "data: [DONE]" in r.text), r.text
                return r.status_code, r.headers.get("x-charforge-version")

            for stream in (False, True):
                assert ask(stale_url, "family_x") == (200, "gone-x-v1")  # B places x
                time.sleep(1.5)  # A's poller sees x on the replica
                assert ask(fresh_url, "family_y") == (200, "gone-y-v1")  # A: the replica is full, x is evicted
                served = {m["id"] for m in httpx.get(f"{vllm_base.url}/v1/models", timeout=10).json()["data"]}
                assert "gone-x-v1" not in served and "gone-x-v1" in stale.replicas["replica-0"].loaded
                assert ask(stale_url, "family_x", stream) == (200, "gone-x-v1")  # a 404 before the change
                httpx.post(f"{vllm_base.url}/v1/unload_lora_adapter", json={"lora_name": "gone-y-v1"}, timeout=30)
                time.sleep(1.5)
            metrics = httpx.get(f"{stale_url}/metrics").text
            assert 'gateway_adapter_gone_total{replica="replica-0",version="gone-x-v1"} 2.0' in metrics
    finally:
        for name in versions:
            httpx.post(f"{vllm_base.url}/v1/unload_lora_adapter", json={"lora_name": name}, timeout=30)


def test_an_adapter_unloaded_mid_stream_finishes_that_stream_with_its_own_weights(vllm_base, smollm2_adapter):
    """What makes eviction by another gateway safe for requests already running: vLLM unloads the adapter for new
    requests, and a stream that started on it runs to its end with its weights (the same greedy tokens as without
    the unload; the base's differ), the engine healthy after."""
    import json
    import threading

    body = {"model": "inflight-x-v1", "stream": True, "max_tokens": 64, "ignore_eos": True, "temperature": 0,
            "messages": [{"role": "user", "content": "Tell me a long story about your town."}]}

    def load() -> None:
        r = httpx.post(f"{vllm_base.url}/v1/load_lora_adapter", timeout=120,
                       json={"lora_name": "inflight-x-v1", "lora_path": str(smollm2_adapter)})
        assert r.status_code == 200, r.text

    def unload() -> None:
        r = httpx.post(f"{vllm_base.url}/v1/unload_lora_adapter", json={"lora_name": "inflight-x-v1"}, timeout=60)
        assert r.status_code == 200, r.text

    def stream(started: threading.Event | None = None) -> str:
        text = []
        with httpx.stream("POST", f"{vllm_base.url}/v1/chat/completions", json=body, timeout=300) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    for choice in json.loads(line[len("data: "):]).get("choices") or []:
                        text.append((choice.get("delta") or {}).get("content") or "")
                    if started is not None and len(text) >= 4:
                        started.set()
        return "".join(text)

    load()
    whole = stream()
    started, cut = threading.Event(), {}
    runner = threading.Thread(target=lambda: cut.update(text=stream(started)))
    runner.start()
    assert started.wait(120)
    unload()  # four tokens in, sixty to go
    runner.join(timeout=300)
    base = httpx.post(f"{vllm_base.url}/v1/chat/completions", timeout=300,
                      json={**body, "model": vllm_base.served_name, "stream": False}).json()
    assert cut["text"] == whole and whole != base["choices"][0]["message"]["content"]
    assert "inflight-x-v1" not in {m["id"] for m in httpx.get(f"{vllm_base.url}/v1/models").json()["data"]}
    assert httpx.get(f"{vllm_base.url}/health").status_code == 200

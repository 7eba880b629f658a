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

    stream = client.chat.completions.create(model="nell_bramwick", messages=messages, temperature=0, max_tokens=24,
                                            stream=True)
    assert "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices) == reply

    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{url}/v1", api_key="wrong").chat.completions.create(
            model="nell_bramwick", messages=messages, max_tokens=4)
    with pytest.raises(openai.NotFoundError, match="model 'sherlock' is not served here; available: nell_bramwick"):
        client.chat.completions.create(model="sherlock", messages=messages, max_tokens=4)

    metrics = httpx.get(f"{url}/metrics").text
    assert 'gateway_requests_total{route="nell_bramwick",status="200",version="charforge-test-v1"} 2.0' in metrics
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

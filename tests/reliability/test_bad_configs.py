"""A bad config for every stage fails through the real CLI before any work starts: exit 2, one line naming the
file, the key and the reason, no MLflow run, no output or state folder."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from charforge.settings import DATA_DIR, REPO_ROOT
from tests.training.test_train_flow import CHARFORGE

pytestmark = pytest.mark.reliability

# stage -> (command with {cfg} for the config file, a config with one mistake, the reason the CLI must give)
STAGES = {
    "curate": (["curate", "--input", str(DATA_DIR / "raw"), "--out", "{out}", "--config", "{cfg}"],
               "dedup:\n  near_treshold: 0.8\n", "key 'dedup.near_treshold': unknown key, did you mean "
               "'near_threshold'?"),
    "train": (["train", "--config", "{cfg}"], "name: x\ntraining:\n  warmup_ratio: 1.5\n",
              "key 'training.warmup_ratio': Input should be less than 1 (got 1.5)"),
    "evaluate": (["evaluate", "--base-only", "--config", "{cfg}"], "parity:\n  promts: 4\n",
                 "key 'parity.promts': unknown key, did you mean 'prompts'?"),
    "quantize": (["quantize", "--config", "{cfg}"],
                 "name: q\ntool: auto-round\nscheme: W4A16\nexport_format: auto_round\nmode: merge\n",
                 "key 'mode': Input should be 'multi_lora' or 'merged' (got 'merge')"),
    "promote": (["promote", "--candidate", "models:/charforge-x/1", "--policy", "{cfg}"],
                "rules:\n  - metric: character_mc/acc\n    vs_champion: {max_regresion: 0.1}\n",
                "key 'rules.0.vs_champion.max_regresion': unknown key, did you mean 'max_regression'?"),
    "serve": (["serve", "up", "--config", "{cfg}"], "fleet:\n  replicas: 0\n",
              "key 'fleet.replicas': Input should be greater than or equal to 1 (got 0)"),
    "gateway": (["gateway", "--config", "{cfg}"], "gateway:\n  strategy: random\n",
                "key 'gateway.strategy': Input should be 'round_robin', 'least_outstanding', 'consistent_hash' or "
                "'adapter_affinity' (got 'random')"),
    "gateway-placement": (["gateway", "--config", "{cfg}"], "gateway:\n  placement:\n    max_resident: 6\n",
                          "key '<root>': Value error, gateway.placement.max_resident (6) is above "
                          "fleet.max_cpu_loras (4), the adapters a replica keeps; raise fleet.max_cpu_loras or "
                          "lower max_resident (got {'gateway': {'placement': {'max_resident': 6}}})"),
    "deploy": (["deploy", "--adapter", "models:/charforge-x@champion", "--config", "{cfg}"],
               "rollout:\n  gate:\n    max_latency_ratio: 0.5\n",
               "key 'rollout.gate.max_latency_ratio': Input should be greater than 1 (got 0.5)"),
    "prefer": (["prefer", "--config", "{cfg}"], "name: p\nmethod: ipo\n",
               "key 'method': Input should be 'dpo' or 'kto' (got 'ipo')"),
    "monitor": (["monitor", "--config", "{cfg}"], "limits:\n  ooc_rat: {max: 0.1}\n",
                "key 'limits': Value error, unknown metric 'ooc_rat'; the monitor measures ooc_rate, "
                "assistant_voice_rate, char_id_clf, repetition, empty_rate, thumbs_down_ratio (got {'ooc_rat': "
                "{'max': 0.1}})"),
}
# Mistakes any YAML file can have (one per stage, in turn).
GENERIC = {
    "missing": (None, "config file not found"),
    "syntax": ("name: x\n  lora: 3\n", "not valid YAML at line 2, column 7: mapping values are not allowed here"),
    "list": ("- name: x\n", "expected a mapping of keys at the top level, got list"),
}


def run(args: list[str], tmp_path: Path, extra_env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "CHARFORGE_STATE_DIR": str(tmp_path / "state"),
           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", **(extra_env or {})}
    env.pop("PREFECT_API_URL", None)
    return subprocess.run([CHARFORGE, *args], env=env, capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)


def assert_no_work_started(tmp_path: Path) -> None:
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "out").exists()
    # the CLI creates only PREFECT_HOME; no dataset, training run, evaluation, quantized model or serving state
    assert {p.name for p in (tmp_path / "state").iterdir()} <= {"prefect"}


@pytest.mark.parametrize("stage", list(STAGES))
def test_a_bad_config_fails_before_work_naming_file_key_and_reason(stage, tmp_path):
    command, content, reason = STAGES[stage]
    generic = list(GENERIC)[list(STAGES).index(stage) % len(GENERIC)]  # the same loader; each case on some stages
    cases = {"schema": (content, reason), generic: GENERIC[generic]}
    for case, (text, why) in cases.items():
        cfg = tmp_path / f"{stage}-{case}.yaml"
        if text is not None:
            cfg.write_text(text)
        args = [a.format(cfg=cfg, out=tmp_path / "out") for a in command]
        result = run(args, tmp_path)
        assert (result.returncode, result.stderr.strip()) == (2, f"error: {cfg}: {why}"), (case, result.stderr)
        assert_no_work_started(tmp_path)


def test_a_bad_platform_config_fails_every_command(tmp_path):
    cfg = tmp_path / "platform.yaml"
    cfg.write_text("mlflow:\n  tracking_url: http://mlflow:5000\n")
    result = run(["train"], tmp_path, {"CHARFORGE_PLATFORM_CONFIG": str(cfg)})
    assert (result.returncode, result.stderr.strip()) == (
        2, f"error: {cfg}: key 'mlflow.tracking_url': unknown key, did you mean 'tracking_uri'?")
    assert not (tmp_path / "state").exists() and not (tmp_path / "mlflow.db").exists()


def test_serve_up_refuses_a_taken_port_and_starts_nothing(tmp_path):
    import socket

    import yaml

    from charforge.vllm_server import free_port

    with socket.socket() as squatter:  # bound, not answering: what a crashed process or another service leaves
        squatter.bind(("127.0.0.1", 0))
        port = squatter.getsockname()[1]
        cfg = tmp_path / "serving.yaml"
        cfg.write_text(yaml.safe_dump({"fleet": {"replicas": 2, "first_port": port - 1},
                                       "gateway": {"port": free_port()}}))
        result = run(["serve", "up", "--config", str(cfg)], tmp_path)
    assert result.returncode == 2  # input to fix: the port in the config
    assert result.stderr.strip() == (f"error: port {port} (fleet.first_port + 1) already in use by another process; "
                                      f"stop it or change the port in {cfg}")
    assert not (tmp_path / "state" / "serving" / "serve.json").exists()

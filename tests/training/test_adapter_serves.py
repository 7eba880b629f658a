"""An adapter trained by the training flow on the real SmolLM2 is hot-loaded by real vLLM and answers."""

from __future__ import annotations

import httpx
import pytest

from charforge.config import load_yaml_model
from charforge.schemas.train import TrainConfig
from charforge.settings import CONFIGS_DIR
from flows.train import train

pytestmark = pytest.mark.slow


def test_trained_adapter_loads_into_vllm_and_changes_the_reply(
    vllm_base, curated_project, tmp_path, monkeypatch, mlflow_store, prefect_harness
):
    monkeypatch.setenv("CHARFORGE_STATE_DIR", str(tmp_path / "state"))
    dataset_dir, _ = curated_project
    cfg = load_yaml_model(CONFIGS_DIR / "train" / "smollm2_lora.yaml", TrainConfig)
    cfg = cfg.model_copy(update={"dataset_dir": dataset_dir, "training": cfg.training.model_copy(
        update={"max_steps": 3, "batch_size": 2, "save_steps": 3, "learning_rate": 3e-3})})
    monkeypatch.setattr("flows.train.materialize", lambda preset: (vllm_base.model_dir, False))
    result = train(config=cfg)
    assert result["servable"]

    load = httpx.post(f"{vllm_base.url}/v1/load_lora_adapter",
                      json={"lora_name": "trained-v1", "lora_path": result["adapter_dir"]}, timeout=120)
    assert load.status_code == 200, load.text
    models = {m["id"]: m for m in httpx.get(f"{vllm_base.url}/v1/models").json()["data"]}
    assert models["trained-v1"]["root"] == result["adapter_dir"]

    def reply(model: str) -> str:
        r = httpx.post(f"{vllm_base.url}/v1/chat/completions", timeout=120, json={
            "model": model, "temperature": 0, "max_tokens": 24,
            "messages": [{"role": "system", "content": "You are Korvik Ashmantle, a grumbling mountain smith."},
                         {"role": "user", "content": "What are you forging today?"}]})
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["message"]["content"]

    assert reply("trained-v1").strip()
    assert reply("trained-v1") != reply("smollm2-135m-instruct")  # the adapter is really applied
    httpx.post(f"{vllm_base.url}/v1/unload_lora_adapter", json={"lora_name": "trained-v1"}, timeout=60)

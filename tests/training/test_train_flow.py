"""The training flow on the tiny Llama and the project's curated data: real TRL/PEFT steps, MLflow, resume."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow import MlflowClient
from safetensors.torch import load_file

from charforge.checksums import verify_manifest
from charforge.schemas.train import TrainConfig
from charforge.settings import CONFIGS_DIR
from flows.train import train
from charforge.training.adapters import load_adapter_model

TEMPLATE = CONFIGS_DIR / "train" / "templates" / "chatml_training.jinja"


def tiny_config(tiny_llama_dir, dataset_dir, **training) -> TrainConfig:
    return TrainConfig(
        name="tiny", base_model_dir=tiny_llama_dir, dataset_dir=dataset_dir, chat_template=TEMPLATE,
        training={"max_steps": 4, "batch_size": 2, "max_length": 256, "save_steps": 2, "logging_steps": 1,
                  "learning_rate": 5e-3, **training},
    )


@pytest.fixture
def state_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("CHARFORGE_STATE_DIR", str(tmp_path / "state"))
    return tmp_path / "state"


def test_lora_training_changes_weights_logs_loss_and_ships_a_verified_adapter(
    tiny_llama_dir, curated_project, state_dir, mlflow_store, prefect_harness, tmp_path, monkeypatch
):
    dataset_dir, manifest = curated_project
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "1")
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLES_BEFORE_LOGGING", "1")
    result = train(config=tiny_config(tiny_llama_dir, dataset_dir))
    assert result.servable and result.global_step == 4 and result.resumed_from is None

    weights = load_file(Path(result.adapter_dir) / "adapter_model.safetensors")
    lora_b = [v for k, v in weights.items() if "lora_B" in k]
    assert lora_b and all(v.dtype == torch.bfloat16 for v in weights.values())
    assert max(v.abs().max().item() for v in lora_b) > 0  # lora_B starts at zero: training moved it

    client = MlflowClient(mlflow_store)
    run = client.get_run(result.mlflow_run_id)
    assert len(client.get_metric_history(run.info.run_id, "loss")) == 4
    assert "tokens_per_second" in run.data.metrics and "final_eval_loss" in run.data.metrics
    assert run.data.params["dataset_hash"] == manifest["dataset_hash"]
    assert run.data.tags["adapter_sha256"] == result.adapter_sha256
    assert run.data.tags["servable"] == "true" and "prefect_flow_run_id" in run.data.tags
    assert {d.dataset.digest for d in run.inputs.dataset_inputs} == {manifest["dataset_hash"][:16]}
    assert any(k.startswith("system/") for k in run.data.metrics)

    downloaded = Path(mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="adapter",
                                                          dst_path=str(tmp_path / "dl")))
    verify_manifest(downloaded, "re-download")  # the artifact's sha256 manifest matches its files
    model = load_adapter_model(downloaded)
    assert model.peft_config["default"].r == 8

    again = train(config=tiny_config(tiny_llama_dir, dataset_dir))
    assert again.mlflow_run_id == result.mlflow_run_id  # finished run is reused, not retrained
    assert len(client.search_runs([run.info.experiment_id])) == 1


def test_qlora_nf4_trains_on_cpu(tiny_llama_dir, curated_project, state_dir, mlflow_store, prefect_harness):
    dataset_dir, _ = curated_project
    cfg = tiny_config(tiny_llama_dir, dataset_dir, max_steps=2).model_copy(
        update={"method": "qlora", "name": "tiny-qlora"})
    cfg = TrainConfig.model_validate({**cfg.model_dump(), "quantization": {"quant_type": "nf4"}})
    result = train(config=cfg)
    assert result.servable and result.global_step == 2
    params = MlflowClient(mlflow_store).get_run(result.mlflow_run_id).data.params
    assert params["method"] == "qlora" and '"quant_type": "nf4"' in params["quantization"]


def test_qlora_without_quantization_section_is_a_config_error():
    with pytest.raises(ValueError, match="method 'qlora' needs a 'quantization' section"):
        TrainConfig(name="x", method="qlora")


CHARFORGE = str(Path(sys.executable).parent / "charforge")


def test_cli_config_errors_fail_before_training(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nlora:\n  alpah: 16\n")
    result = subprocess.run([CHARFORGE, "train", "--config", str(bad)], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: {bad}: key 'lora.alpah': unknown key, did you mean 'alpha'?"
    wrong_type = tmp_path / "type.yaml"
    wrong_type.write_text("name: x\ntraining:\n  max_steps: many\n")
    result = subprocess.run([CHARFORGE, "train", "--config", str(wrong_type)], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip() == (f"error: {wrong_type}: key 'training.max_steps': Input should be a valid "
                                     "integer, unable to parse string as an integer (got 'many')")
    missing = tmp_path / "ok.yaml"
    missing.write_text(f"name: x\ndataset_dir: {tmp_path / 'nodata'}\n")
    result = subprocess.run([CHARFORGE, "train", "--config", str(missing)], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"error: {tmp_path / 'nodata'}: no curated dataset here (manifest.json missing); run "
        f"`charforge curate --input data/raw --out {tmp_path / 'nodata'}` first")


def test_a_checkpoint_cut_short_by_a_crash_is_set_aside_not_resumed(tmp_path):
    from charforge.training.trainer import last_complete_checkpoint

    done = tmp_path / "checkpoint-5"
    done.mkdir()
    (done / "trainer_state.json").write_text('{"global_step": 5}')
    partial = tmp_path / "checkpoint-10"  # killed after the adapter, before trainer_state.json
    partial.mkdir()
    (partial / "adapter_model.safetensors").write_bytes(b"\0" * 16)
    truncated = tmp_path / "checkpoint-15"  # killed while trainer_state.json was being written
    truncated.mkdir()
    (truncated / "trainer_state.json").write_text('{"global_st')
    assert last_complete_checkpoint(tmp_path) == str(done)
    assert sorted(p.name.rsplit("-", 1)[0] for p in tmp_path.glob("incomplete-*")) == [
        "incomplete-checkpoint-10", "incomplete-checkpoint-15"]
    assert (tmp_path.glob("incomplete-checkpoint-10-*").__next__() / "adapter_model.safetensors").is_file()
    assert last_complete_checkpoint(tmp_path / "none") is None


@pytest.mark.parametrize("flags, dtype, why", [
    ({"avx2", "fma"}, "float32",
     "this CPU has neither AVX512-BF16 nor AMX: bf16 would be emulated, slower than float32"),
    ({"avx2", "avx512f", "avx512_bf16"}, "bfloat16", "this CPU multiplies bf16 natively (avx512_bf16)"),
    ({"avx512_bf16", "amx_bf16", "amx_tile"}, "bfloat16", "this CPU multiplies bf16 natively (avx512_bf16, amx_bf16)"),
])
def test_auto_dtype_trains_in_bf16_where_the_cpu_multiplies_it_natively(monkeypatch, flags, dtype, why):
    from charforge import cpu
    from charforge.schemas.train import TrainingSettings
    from charforge.training.trainer import dtype_decision, resolve_dtype

    monkeypatch.setattr(cpu, "cpu_flags", lambda: frozenset(flags))
    auto = TrainingSettings(dtype="auto", use_cpu=True)
    assert dtype_decision(auto) == (dtype, why) and resolve_dtype(auto) == dtype
    assert dtype_decision(TrainingSettings(dtype="float32", use_cpu=True)) == ("float32", "as configured")

"""Preference tuning end to end on real parts: curation's pairs, a LoRA adapter as the SFT parent, TRL's DPOTrainer
and KTOTrainer a step each, an exported adapter of the parent's rank that the servability check passes, with
reward metrics and lineage in MLflow; and the one-line error before any work."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient
from safetensors import safe_open

from charforge.settings import DATA_DIR, REPO_ROOT
from tests.training.test_train_flow import CHARFORGE

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pairs_dataset(tmp_path_factory, base_model_dir):
    """160 rows of data/raw curated with preference pairs, and a state folder that holds the verified base."""
    from charforge.characters import load_characters
    from charforge.curation.pipeline import curate_conversations
    from charforge.schemas.curate import CurateConfig
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("prefer")
    raw = root / "raw.jsonl"
    raw.write_text("".join((DATA_DIR / "raw" / "conversations.jsonl").read_text().splitlines(keepends=True)[:160]))
    dataset = root / "dataset"
    curate_conversations([raw], dataset, load_characters(DATA_DIR / "characters"),
                         CurateConfig(workers=0, max_tokens=256, pairs={"enabled": True}),
                         AutoTokenizer.from_pretrained(base_model_dir), progress=False)
    (root / "state" / "models").mkdir(parents=True)
    (root / "state" / "models" / base_model_dir.name).symlink_to(base_model_dir)  # the verified base, not a rebuild
    return root, dataset


@pytest.mark.parametrize("method", ["dpo", "kto"])
def test_preference_tuning_moves_the_sft_adapter_and_exports_a_servable_one(pairs_dataset, smollm2_adapter,
                                                                            monkeypatch, prefect_harness, method):
    """The session's LoRA adapter as the SFT parent (`adapter:`), the shipped SFT config for base, dtype and chat
    template, TRL's trainer at full learning rate. KTO runs through the CLI first and is SIGKILLed once its first
    checkpoint is written: the re-run resumes from it in the same MLflow run, as SFT does."""
    from prefect.settings import PREFECT_API_URL

    from charforge.checksums import folder_sha
    from charforge.schemas.prefer import PreferConfig
    from flows.prefer import prefer

    root, dataset = pairs_dataset
    monkeypatch.setenv("CHARFORGE_STATE_DIR", str(root / "state"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
    steps = 1 if method == "dpo" else 2
    cfg = PreferConfig(name=f"prefer-test-{method}", method=method, adapter=str(smollm2_adapter),
                       dataset_dir=dataset, training={"max_steps": steps, "warmup_ratio": 0, "batch_size": 2,
                                                      "max_length": 128, "save_steps": 1, "learning_rate": 1e-3,
                                                      "heldout_pairs": 8})
    if method == "kto":
        config = root / "kto.yaml"
        config.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
        proc = subprocess.Popen([CHARFORGE, "prefer", "--config", str(config)], cwd=REPO_ROOT, env={
            **os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, start_new_session=True)
        deadline = time.monotonic() + 600
        while not list((root / "state" / "training").glob(f"{cfg.name}-*/checkpoints/checkpoint-1/trainer_state.json")):
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read().decode()[-3000:]
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)  # a real crash: no cleanup
        proc.wait()
    result = prefer(config=cfg)
    assert result.servable and result.global_step == steps
    if method == "kto":
        assert result.resumed_from in ("checkpoint-1", "checkpoint-2")
        runs = MlflowClient(os.environ["MLFLOW_TRACKING_URI"]).search_runs(
            [MlflowClient(os.environ["MLFLOW_TRACKING_URI"]).get_experiment_by_name("charforge-prefer").experiment_id],
            filter_string=f"attributes.run_name LIKE '{cfg.name}-%'")
        assert [r.info.run_id for r in runs] == [result.mlflow_run_id]  # resumed in the killed run's MLflow run
    out, parent = Path(result.adapter_dir), Path(smollm2_adapter)
    assert json.loads((out / "adapter_config.json").read_text())["r"] == \
        json.loads((parent / "adapter_config.json").read_text())["r"]
    with safe_open(out / "adapter_model.safetensors", "pt") as a, safe_open(parent / "adapter_model.safetensors",
                                                                           "pt") as b:
        assert set(a.keys()) == set(b.keys())  # same targets, one adapter (no "ref" copy exported)
        assert any(not a.get_tensor(k).equal(b.get_tensor(k)) for k in a.keys())  # the policy moved
    lineage = json.loads((out / "charforge-manifest.json").read_text())["lineage"]
    assert lineage["sft_parent_sha"] == folder_sha(parent) and len(lineage["pairs_hash"]) == 64
    run = MlflowClient(os.environ["MLFLOW_TRACKING_URI"]).get_run(result.mlflow_run_id)
    assert run.data.tags["stage"] == "prefer" and run.data.tags["sft_parent_sha"] == folder_sha(parent)
    assert run.data.params["negatives"] == "all"  # every kind of pair curation wrote (no `negatives` mix)
    assert {"rewards/chosen", "rewards/rejected"} <= set(run.data.metrics)
    # held-out pair accuracy: the implicit reward (policy minus frozen SFT log-probability) on the evaluation
    # split's pairs, measured the same way for both methods
    assert sum(1 for _ in (dataset / "pairs_eval.jsonl").open()) > 8
    assert run.data.metrics["final_heldout/pairs"] == 8
    held_kinds = {json.loads(line)["negative"] for line in (dataset / "pairs_eval.jsonl").read_text().splitlines()[:8]}
    assert {f"final_heldout/pair_accuracy/{kind}" for kind in held_kinds} <= set(run.data.metrics)
    assert 0 <= run.data.metrics["final_heldout/pair_accuracy"] <= 1
    assert prefer(config=cfg).adapter_sha256 == result.adapter_sha256  # a finished identity is returned, not rerun


def test_prefer_cli_names_the_missing_input_before_any_work(tmp_path, pairs_dataset):
    _, dataset = pairs_dataset
    no_pairs = tmp_path / "dataset"
    no_pairs.mkdir()
    for name in ("manifest.json", "train.jsonl", "eval.jsonl", "rejected.jsonl"):
        (no_pairs / name).write_bytes((dataset / name).read_bytes())
    env = {**os.environ, "CHARFORGE_STATE_DIR": str(tmp_path / "state"),
           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'm.db'}"}
    config = tmp_path / "prefer.yaml"
    config.write_text(yaml.safe_dump({"name": "p", "dataset_dir": str(no_pairs)}))
    result = subprocess.run([CHARFORGE, "prefer", "--config", str(config)], capture_output=True, text=True,
                            timeout=300, env=env, cwd=REPO_ROOT)
    assert (result.returncode, result.stderr.strip()) == (2, (
        f"error: {no_pairs / 'pairs_train.jsonl'}: no preference pairs; curate with `pairs: {{enabled: true}}` in the "
        "curate config (charforge curate --config ...) to write them beside the dataset"))
    # nothing but the CLI's own Prefect home: no MLflow store, no training run
    assert {p.name for p in (tmp_path / "state").iterdir()} <= {"prefect"} and not (tmp_path / "m.db").exists()

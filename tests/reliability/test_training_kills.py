"""Training SIGKILLed three times at seeded random points (start-up, mid-step, mid-checkpoint write): each re-run
resumes what the last kill left from the newest complete checkpoint, in the same MLflow run (never a second one),
and the adapter has the tensors and shapes of an untouched LoRA of that config. Real CLI, tiny Llama."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient
from safetensors.torch import load_file

from tests.training.test_train_flow import CHARFORGE, tiny_config

pytestmark = [pytest.mark.reliability, pytest.mark.slow]

MAX_STEPS, SAVE_STEPS = 16, 2


def expected_shapes(tiny_llama_dir, cfg) -> dict[str, tuple]:
    """Tensor names and shapes of a freshly initialised LoRA with the config's settings (no training)."""
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    lora = cfg.lora
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, target_modules=lora.target_modules, use_rslora=lora.use_rslora))
    return {k: tuple(v.shape) for k, v in get_peft_model_state_dict(model).items()}


def complete_checkpoints(runs: Path) -> list[int]:
    return sorted(int(p.parent.name.split("-")[1]) for p in runs.glob("*/checkpoints/checkpoint-*/trainer_state.json"))


def kill_at(command, env, runs: Path, rng: random.Random, log: Path) -> str:
    """Start training and SIGKILL its process group at a random point: a random moment of start-up (imports,
    Prefect, MLflow run lookup, data loading, resume), or 0-0.3 s after the run's next checkpoint appears (mid-step
    or mid-write of a checkpoint). Either way no later than that: the run never gets near its end. The child's
    output goes to `log`, shown when it ends on its own."""
    target = f"checkpoint-{max(complete_checkpoints(runs), default=0) + SAVE_STEPS}"
    with open(log, "wb") as out:
        proc = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    started = time.monotonic()
    startup = rng.random() < 0.4
    delay = round(rng.uniform(2, 12), 1) if startup else round(rng.uniform(0, 0.3), 2)
    while not (startup and time.monotonic() - started >= delay) and not list(runs.glob(f"*/checkpoints/{target}")):
        if proc.poll() is not None:
            raise AssertionError(f"training ended (exit {proc.returncode}) before it could be killed; its output "
                                 f"({log}):\n{log.read_text(errors='replace')[-4000:]}")
        time.sleep(0.02)
    aim = f"{time.monotonic() - started:.1f} s into start-up" if startup else f"{delay} s after {target}"
    if not startup:
        time.sleep(delay)
    os.killpg(proc.pid, signal.SIGKILL)  # a real crash: no cleanup, no finally blocks
    proc.wait()
    return aim


def test_killed_three_times_at_random_points_resumes_in_the_same_run(tiny_llama_dir, curated_project, tmp_path,
                                                                     prefect_harness):
    """Seeds 1, 2, 3 each place one kill; each re-run resumes what the previous kill left; the fourth finishes."""
    from prefect.settings import PREFECT_API_URL

    cfg = tiny_config(tiny_llama_dir, curated_project[0], max_steps=MAX_STEPS, save_steps=SAVE_STEPS,
                      max_length=256)
    config_file = tmp_path / "train.yaml"
    config_file.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    # The session's Prefect server: each CLI run skips starting its own temporary one.
    env = {**os.environ, "CHARFORGE_STATE_DIR": str(tmp_path / "state"),
           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", "PREFECT_API_URL": PREFECT_API_URL.value()}
    command = [CHARFORGE, "train", "--config", str(config_file)]
    runs = tmp_path / "state" / "training"

    kills = []
    for seed in (1, 2, 3):
        before = max(complete_checkpoints(runs), default=0)
        aim = kill_at(command, env, runs, random.Random(seed), tmp_path / f"kill-{seed}.log")
        after = max(complete_checkpoints(runs), default=0)
        assert after >= before  # a kill never loses a complete checkpoint
        kills.append(f"seed {seed}: {aim} -> newest complete checkpoint {after or 'none'}")
    survived = complete_checkpoints(runs)
    run_ids = {json.loads(p.read_text())["mlflow_run_id"] for p in runs.glob("*/run.json")}

    started = time.monotonic()
    final = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    recovered = time.monotonic() - started
    assert final.returncode == 0, final.stderr[-3000:]
    run_dir = next(runs.iterdir())
    state = json.loads((run_dir / "run.json").read_text())
    resumed = f"checkpoint-{max(survived)}" if survived else None
    assert state["status"] == "finished" and state["result"]["global_step"] == MAX_STEPS
    assert state["result"]["resumed_from"] == resumed
    if resumed:
        assert f"resuming from {resumed}" in final.stderr + final.stdout  # what the user reads

    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name("charforge-train")
    runs_logged = [r.info.run_id for r in client.search_runs([experiment.experiment_id])]
    assert runs_logged == [state["mlflow_run_id"]] and run_ids <= set(runs_logged)  # one run through every kill
    assert client.get_run(state["mlflow_run_id"]).info.status == "FINISHED"
    assert max(m.step for m in client.get_metric_history(state["mlflow_run_id"], "loss")) == MAX_STEPS

    weights = load_file(Path(state["result"]["adapter_dir"]) / "adapter_model.safetensors")
    assert {k: tuple(v.shape) for k, v in weights.items()} == expected_shapes(tiny_llama_dir, cfg)
    print("\n" + "\n".join(kills) + f"\nfinal run: resumed from {resumed}, {MAX_STEPS} steps in {recovered:.1f} s, "
          f"1 MLflow run, adapter shapes as configured")

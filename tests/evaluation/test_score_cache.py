"""Scores are reused only when everything that determines them is the same, and progress is reported while
lm-eval runs. (The reuse itself, through MLflow, runs end to end in tests/evaluation/test_parity.py's module.)"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from charforge.checksums import write_manifest
from charforge.evaluation import score_cache
from charforge.evaluation.plan import EvalPlan
from charforge.evaluation.progress import Progress
from charforge.schemas.evaluate import EvalConfig
from charforge.settings import DATA_DIR


def _folder(path: Path, content: str) -> Path:
    path.mkdir(parents=True)
    (path / "weights.bin").write_text(content)
    write_manifest(path, {})
    return path


@pytest.fixture
def setup(tmp_path):
    shutil.copytree(DATA_DIR / "characters", tmp_path / "characters")
    shutil.copy(DATA_DIR / "eval" / "probes.jsonl", tmp_path / "probes.jsonl")
    cfg = EvalConfig(probes=tmp_path / "probes.jsonl", characters=tmp_path / "characters", limit=8)
    plan = EvalPlan(evaluated="x", short="candidate-x", primary="candidate", base_name="smollm2-135m-instruct",
                    served_dir=str(_folder(tmp_path / "base", "base weights")),
                    tokenizer_dir=str(tmp_path / "base"),
                    candidate_dir=str(_folder(tmp_path / "candidate", "lora A")),
                    champion_dir=str(_folder(tmp_path / "champion", "lora B")), champion_ref="models:/m/1",
                    served_base=None, targets={"candidate": "c", "base": "b", "champion": "h"}, lineage={},
                    run_dir=str(tmp_path / "run"))
    return cfg, plan, tmp_path


def test_the_same_artifact_has_the_same_key_in_every_role_and_different_artifacts_differ(setup):
    cfg, plan, tmp_path = setup
    keys = {role: score_cache.score_key(score_cache.key_inputs(cfg, plan, role)) for role in plan.targets}
    assert len(set(keys.values())) == 3
    same = plan.model_copy(update={"champion_dir": plan.candidate_dir})  # the champion is the candidate's adapter
    assert score_cache.key_inputs(cfg, same, "champion") == score_cache.key_inputs(cfg, plan, "candidate")


@pytest.mark.parametrize("change, entry", [
    ("limit", "settings"), ("tasks", "settings"), ("bootstrap", "settings"), ("max_model_len", "settings"),
    ("together", "settings"), ("probes", "probes"), ("card", "characters"), ("adapter", "adapter"),
    ("served_base", "served_model"),
])
def test_a_change_to_any_input_changes_the_key_and_names_what_changed(setup, change, entry):
    cfg, plan, tmp_path = setup
    before = score_cache.key_inputs(cfg, plan, "candidate")
    if change == "limit":
        cfg = cfg.model_copy(update={"limit": 9})
    elif change == "tasks":
        cfg = cfg.model_copy(update={"tasks": ["character_mc"]})
    elif change == "together":
        cfg = cfg.model_copy(update={"score_models_together": False})
    elif change == "bootstrap":
        cfg = cfg.model_copy(update={"bootstrap_resamples": 2000})
    elif change == "max_model_len":
        cfg = cfg.model_copy(update={"serving": cfg.serving.model_copy(update={"max_model_len": 1024})})
    elif change == "probes":
        path = tmp_path / "probes.jsonl"
        path.write_text(path.read_text().replace("\"reference\": \"", "\"reference\": \"Well. ", 1))
    elif change == "card":
        card = sorted((tmp_path / "characters").glob("*.yaml"))[0]
        card.write_text(card.read_text() + "\n# one more line\n")
    elif change == "adapter":
        shutil.rmtree(plan.candidate_dir)
        _folder(Path(plan.candidate_dir), "lora A retrained")
    elif change == "served_base":
        plan = plan.model_copy(update={"served_dir": str(_folder(tmp_path / "quantized", "int4"))})
    after = score_cache.key_inputs(cfg, plan, "candidate")
    assert [k for k in before if before[k] != after[k]] == [entry]
    assert score_cache.score_key(after) != score_cache.score_key(before)


def test_models_are_scored_together_unless_an_adapter_trains_the_output_layer(setup):
    _, plan, _ = setup
    for folder, targets in ((plan.candidate_dir, ["q_proj", "v_proj"]), (plan.champion_dir, "all-linear")):
        (Path(folder) / "adapter_config.json").write_text(json.dumps({"target_modules": targets}))
    assert not plan.adapter_on_lm_head()
    (Path(plan.champion_dir) / "adapter_config.json").write_text(json.dumps({"target_modules": ["q_proj", "lm_head"]}))
    assert plan.adapter_on_lm_head()  # vLLM could not tell its prompt log-probability rows from the base's


def test_the_key_names_the_harness_metric_code_and_serving_versions(setup):
    cfg, plan, _ = setup
    inputs = score_cache.key_inputs(cfg, plan, "base")
    assert inputs["adapter"] == "none"
    assert inputs["scoring_packages"].startswith("lm_eval 0.4.")
    assert inputs["serving"].startswith("vllm ") and "charforge plugin" in inputs["serving"]
    assert len(inputs["task_folder"]) == len(inputs["metric_code"]) == 64


def test_the_task_folders_compiled_files_do_not_change_its_key(tmp_path):
    (tmp_path / "hooks.py").write_text("x = 1\n")
    before = score_cache.tree_sha(tmp_path)
    (tmp_path / "__pycache__").mkdir()
    (tmp_path / "__pycache__" / "hooks.cpython-312.pyc").write_bytes(b"\0")
    assert score_cache.tree_sha(tmp_path) == before
    (tmp_path / "hooks.py").write_text("x = 2\n")
    assert score_cache.tree_sha(tmp_path) != before


def test_progress_reports_done_total_rate_and_eta_at_most_every_interval():
    lines, now = [], [0.0]
    progress = Progress(lines.append, "candidate-abc", every_s=15, clock=lambda: now[0])
    progress.start("log-likelihood", 100)
    for t in range(1, 11):  # 10 requests, one per 2 s
        now[0] = 2.0 * t
        progress.advance(1)
    now[0] = 100.0
    progress.advance(90)
    assert lines == ["candidate-abc: 100 log-likelihood requests",
                     "candidate-abc: log-likelihood 8/100 (8%), 0.5/s, ETA 184 s",
                     "candidate-abc: log-likelihood 100/100 done in 100 s (1.0/s)"]


def test_the_key_records_the_dtype_vllm_serves_the_folder_in(setup):
    cfg, plan, tmp_path = setup
    quantized = _folder(tmp_path / "w4a16", "int4")
    (quantized / "config.json").write_text('{"quantization_config": {"quant_method": "auto-round"}}')
    settings = json.loads(score_cache.key_inputs(cfg, plan.model_copy(update={"served_dir": str(quantized)}),
                                                 "base")["settings"])
    assert settings["served_dtype"] == "bfloat16"  # a quantized checkpoint keeps bf16 activations on every CPU

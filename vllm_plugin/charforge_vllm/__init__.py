"""vLLM plugin (serving environment): LoRA on vLLM's CPU backend with one matmul per adapter instead of one
gathered weight matrix per token.

vLLM 0.32's CPU LoRA path (`PunicaWrapperCPU`) calls the PyTorch reference ops in `vllm.lora.ops.torch_ops`,
which copy the adapter's A or B matrix once per *token* (`weights[token_indices]`) and multiply token by token.
For a 300-token prompt on SmolLM2 that is ~20x slower per layer than one matmul, and it is why an adapter
served ~0.4x the base's throughput here. A batch holds few distinct adapters, so `grouped_lora` multiplies each
adapter's rows with its matrix once; tokens without an adapter (index -1) get no LoRA term. `fused_lora` goes one
step further for linear layers: one shrink and one expand per layer (all its slices), float32 weights cached per
adapter slot, the batch's adapters looked up once per step.
"""

from __future__ import annotations

import logging
import os

logger = logging.getLogger("vllm.plugins.charforge_vllm")  # under "vllm": printed by vLLM's log handler
OPS = ("bgmv_shrink", "bgmv_expand", "bgmv_expand_slice", "sgmv_shrink", "sgmv_expand", "sgmv_expand_slice")


def register() -> None:
    """vLLM general plugin: prompt log-probabilities that may read the prefix cache (`prompt_cache`, every
    platform), and on CPU `PunicaWrapperCPU` pointed at the grouped ops. Runs in every vLLM process; idempotent."""
    from vllm.platforms import current_platform

    from charforge_vllm import prompt_cache

    prompt_cache.register()
    if not current_platform.is_cpu():
        return  # GPU/XPU backends have their own fused kernels
    from vllm.lora.punica_wrapper import punica_cpu

    from charforge_vllm import grouped_lora

    for name in OPS:
        setattr(punica_cpu, name, getattr(grouped_lora, name))
    mode = os.environ.get("CHARFORGE_VLLM_LORA", "fused")
    if mode not in ("fused", "grouped"):
        raise ValueError(f"CHARFORGE_VLLM_LORA={mode!r}: expected 'fused' (one matmul per layer, the default) or "
                         "'grouped' (vLLM's per-slice loop over the grouped ops)")
    if mode == "fused":
        from charforge_vllm import fused_lora

        fused_lora.install()
    logger.info("charforge_vllm: grouped CPU LoRA ops active, layers %s (pid %d)", mode, os.getpid())

"""Batches that one adapter covers run at the base model's speed: the layer multiplies by a merged weight.

A LoRA layer computes `x W^T` (the base GEMM) and then adds `(x A^T) B^T` for each token's adapter. When every token
of a step uses the same adapter slot (one character's traffic on a replica, or a canary's share batched apart), the
two are one GEMM with `W' = W + B A`: the LoRA term costs nothing and the GEMM is the base's (vLLM's own CPU GEMM
dispatch, oneDNN or the AMX kernel, prepacked). Mixed batches (several adapters, or adapter and base tokens) keep the
fused path (`fused_lora`); a batch with no adapter token runs the base GEMM alone.

The merged weight of a layer is built the first time a single-slot batch reaches it after that slot was written and
kept until a slot is written again (`fused_lora`'s generation: any slot's write drops every merged weight, and each
is merged again at its next single-adapter step, ~1 s for all of SmolLM2's layers here). Memory: one copy of the
model's linear weights per merged slot (layers the adapter does not target share the base's); `CHARFORGE_VLLM_LORA_
MERGE=N` merges at most N slots between two writes (the first N that have a single-adapter step; the others keep the
fused path, so batches alternating between more slots never rebuild), 0 (the default) turns merging off. Only
unquantized layers are merged (a quantized base keeps the fused path).

`W` is not kept by vLLM on CPU (its GEMM dispatch prepacks the weight and drops the tensor); it is read back
through the layer's own GEMM as `I W^T`: each output element is one product with 1.0, exact in any dtype.
Numerics: the merged weight is `W + B A` rounded once to the model's dtype, where the unmerged path rounds the base
output and the LoRA term separately; both are bf16 arithmetic of the same sum (checked against transformers + PEFT
log-probabilities in tests/serving/test_grouped_lora.py).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from charforge_vllm import fused_lora

logger = logging.getLogger("vllm.plugins.charforge_vllm")
_original: dict[str, Any] = {}


def merge_slots() -> int:
    from charforge_vllm import _number

    return int(_number("CHARFORGE_VLLM_LORA_MERGE", "0", int, "adapter slots merged between two adapter writes"))


def single_slot(wrapper) -> int | None:
    """The one adapter slot every token of this step uses, or None (no plan yet, no adapter, or a mixed batch)."""
    slots = getattr(wrapper, "_cf_slots", None)
    if slots is None or len(slots) != 1 or getattr(wrapper, "_cf_rows", None) is not None:
        return None
    return slots[0]


def base_weight_t(layer) -> torch.Tensor:
    """The base layer's weight transposed (`[in, out]`), read back through its own GEMM: `I W^T` is exact."""
    quant = layer._get_quant_method()
    k = layer.lora_a_stacked[0].shape[-1]
    eye = torch.eye(k, dtype=layer.lora_a_stacked[0].dtype)
    return quant.apply(layer.base_layer, eye, None)


def merged_gemm(layer, slot: int):
    """vLLM's CPU GEMM (the dispatch the base layer went through) over `W + B A` for one slot; None where the slot's
    B is zero in this layer (an adapter that does not target it): the base GEMM alone, no copy."""
    from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

    if not any(bool((w.squeeze(1) if w.dim() == 4 else w)[slot].any()) for w in layer.lora_b_stacked):
        return None
    weight_t = base_weight_t(layer)
    a_all, b_all = fused_lora.fused_weights(layer.lora_a_stacked, layer.lora_b_stacked, slot, weight_t.dtype)
    merged = (weight_t.to(torch.float32) + (b_all @ a_all).t()).to(weight_t.dtype).t().contiguous()
    holder = torch.nn.Module()
    holder.weight = torch.nn.Parameter(merged, requires_grad=False)
    holder.bias = None
    dispatch_cpu_unquantized_gemm(holder, remove_weight=True)
    return holder


def cf_apply_sync(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    if torch.compiler.is_compiling():
        if _compiled:  # traced into a compiled model: the base GEMM and the LoRA term as one opaque op per layer
            return torch.ops.charforge.lora_layer(x, bias, _layers.index(self), sum(self.output_slices))
        return _original["_apply_sync"](self, x, bias)
    return eager_apply(self, x, bias)


def eager_apply(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    if getattr(self.punica_wrapper, "_cf_slots", None) == []:  # no token of this step has an adapter: the base GEMM
        return self._get_quant_method().apply(self.base_layer, x, bias)  # alone (the LoRA path would add nothing)
    slot = single_slot(self.punica_wrapper)
    if slot is None or not self.__dict__.get("_cf_mergeable", True):
        return _original["_apply_sync"](self, x, bias)
    cache: dict = self.__dict__.setdefault("_cf_merged", {})
    hit = cache.get(slot)
    if hit is None or hit[0] != fused_lora._generation:
        for stale in [s for s, (g, _) in cache.items() if g != fused_lora._generation]:
            del cache[stale]  # a slot was written since: every merged weight of older generations may be wrong
        if len(cache) >= _limit:  # the slots merged first keep their weights until the next write: batches that
            return _original["_apply_sync"](self, x, bias)  # alternate between more slots never rebuild per step
        if not mergeable(self):
            self._cf_mergeable = False
            return _original["_apply_sync"](self, x, bias)
        started = time.perf_counter()
        hit = cache[slot] = (fused_lora._generation, merged_gemm(self, slot))
        if _layers and self is _layers[0]:  # the model's first LoRA layer: once per slot written
            logger.info("charforge_vllm: adapter slot %d merged into the first layer's weights (generation %d, "
                        "%.1f ms; the other layers follow in this step)", slot, fused_lora._generation,
                        1000 * (time.perf_counter() - started))
    holder = hit[1]
    if holder is None:
        return self._get_quant_method().apply(self.base_layer, x, bias)
    return holder.cpu_linear(x, holder.weight, bias)


def mergeable(layer) -> bool:
    """Unquantized base layers whose output is one GEMM of the whole input (the layers `_apply_sync` serves)."""
    from vllm.model_executor.layers.linear import UnquantizedLinearMethod

    return isinstance(layer._get_quant_method(), UnquantizedLinearMethod)


_limit = 0
_compiled = False
# Every LoRA linear layer of this process in creation order: a compiled graph names its layer by this index (a model
# builds its layers in the same order in every process).
_layers: list[Any] = []


def _lora_layer_op(x: torch.Tensor, bias: torch.Tensor | None, layer: int, width: int) -> torch.Tensor:
    return eager_apply(_layers[layer], x, bias)


def _lora_layer_shape(x: torch.Tensor, bias: torch.Tensor | None, layer: int, width: int) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], width))


def install(limit: int, compiled: bool) -> None:
    """Route `BaseLinearLayerWithLoRA._apply_sync` through merged weights for single-slot batches; in a compiled
    model (`compiled`: fused_lora's ops registered, compilation allowed) as the opaque op `charforge::lora_layer`."""
    global _limit, _compiled
    from vllm.lora.layers.base_linear import BaseLinearLayerWithLoRA

    _limit, _compiled = limit, compiled
    if _original:
        return
    if compiled:
        from vllm.utils.torch_utils import direct_register_custom_op

        direct_register_custom_op("lora_layer", _lora_layer_op, mutates_args=[], fake_impl=_lora_layer_shape,
                                  target_lib=fused_lora._library, dispatch_key="CPU")
    _original["_apply_sync"] = BaseLinearLayerWithLoRA._apply_sync
    BaseLinearLayerWithLoRA._apply_sync = cf_apply_sync
    init = BaseLinearLayerWithLoRA.__init__

    def __init__(self, *args, **kwargs):
        init(self, *args, **kwargs)
        _layers.append(self)

    BaseLinearLayerWithLoRA.__init__ = __init__

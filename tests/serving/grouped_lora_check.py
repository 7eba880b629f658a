"""Run by tests/serving/test_grouped_lora.py with the serving environment's Python: charforge_vllm's grouped LoRA
ops against vLLM's own reference ops (`vllm.lora.ops.torch_ops`) on the shapes SmolLM2 serving produces.
Prints one JSON object: the largest relative error per case, and the no-adapter (-1) rows' LoRA term."""

from __future__ import annotations

import json

import torch
from vllm.lora.ops.torch_ops import lora_ops as reference

from charforge_vllm import grouped_lora

torch.manual_seed(0)
SLOTS, RANK, HIDDEN, OUT = 3, 8, 576, 1536


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-6))


def case(name: str, indices: torch.Tensor, add_inputs: bool, four_d: bool) -> dict:
    tokens = indices.numel()
    x = torch.randn(tokens, HIDDEN, dtype=torch.bfloat16)
    a = torch.randn(SLOTS, 1, RANK, HIDDEN, dtype=torch.bfloat16) / 10
    b = torch.randn(SLOTS, 1, OUT, RANK, dtype=torch.bfloat16) / 10
    if not four_d:
        a, b = a.squeeze(1), b.squeeze(1)
    errors = {}
    shrunk = {}
    for impl in (reference, grouped_lora):
        buf = torch.zeros(tokens, RANK, dtype=torch.float32)
        impl.bgmv_shrink(x, a, buf, indices, 0.5)
        shrunk[impl] = buf
    errors["bgmv_shrink"] = rel_err(shrunk[grouped_lora], shrunk[reference])
    y0 = torch.randn(tokens, 2 * OUT, dtype=torch.bfloat16)
    for op in ("bgmv_expand", "bgmv_expand_slice"):
        outs = {}
        for impl in (reference, grouped_lora):
            y = y0.clone()
            if op == "bgmv_expand":
                impl.bgmv_expand(shrunk[reference], b, y, indices, add_inputs)
            else:
                impl.bgmv_expand_slice(shrunk[reference], b, y, indices, OUT, OUT, add_inputs)
            outs[impl] = y
        errors[op] = rel_err(outs[grouped_lora] - y0 * add_inputs, outs[reference] - y0 * add_inputs)
    # prefill: one index per sequence
    seq_lens = torch.tensor([tokens // 2, tokens - tokens // 2])
    seq_idx = indices[torch.tensor([0, tokens - 1])]
    starts = torch.tensor([0, tokens // 2])
    outs = {}
    for impl in (reference, grouped_lora):
        buf = torch.zeros(tokens, RANK, dtype=torch.float32)
        impl.sgmv_shrink(x, a, buf, starts, seq_lens, seq_idx, 2, int(seq_lens.max()), tokens, 0.5)
        y = y0.clone()
        impl.sgmv_expand(buf, b, y, starts, seq_lens, seq_idx, 2, int(seq_lens.max()), tokens, add_inputs)
        impl.sgmv_expand_slice(buf, b, y, starts, seq_lens, seq_idx, 2, int(seq_lens.max()), tokens, OUT, OUT,
                               add_inputs)
        outs[impl] = y
    errors["sgmv"] = rel_err(outs[grouped_lora] - y0 * add_inputs, outs[reference] - y0 * add_inputs)
    return {"case": name, "max_rel_err": max(errors.values()), "errors": errors}


def no_adapter_rows() -> float:
    """Tokens with index -1 (a base-model request batched with adapter requests) get no LoRA term."""
    x = torch.randn(4, HIDDEN, dtype=torch.bfloat16)
    a = torch.randn(SLOTS, 1, RANK, HIDDEN, dtype=torch.bfloat16)
    b = torch.randn(SLOTS, 1, OUT, RANK, dtype=torch.bfloat16)
    indices = torch.tensor([0, -1, 2, -1])
    buf = torch.zeros(4, RANK)
    grouped_lora.bgmv_shrink(x, a, buf, indices, 1.0)
    y = torch.zeros(4, OUT, dtype=torch.bfloat16)
    grouped_lora.bgmv_expand(buf, b, y, indices, True)
    assert y[0].abs().max() > 0 and y[2].abs().max() > 0
    return float(y[torch.tensor([1, 3])].abs().max())


cases = [
    case("one adapter, 300-token prompt", torch.zeros(300, dtype=torch.long), True, True),
    case("two adapters in one batch", torch.tensor([1] * 7 + [2] * 5), True, True),
    case("decode step, three sequences, 3-d weights", torch.tensor([2, 0, 2]), False, False),
]
print(json.dumps({"cases": cases, "no_adapter_max_abs": no_adapter_rows()}))

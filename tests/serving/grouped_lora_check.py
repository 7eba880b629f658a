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
    # Prefill (vLLM V1 on CPU also decodes through these): one index per sequence. Each op on the same inputs...
    seq_lens = torch.tensor([tokens // 2, tokens - tokens // 2])
    seq_idx = indices[torch.tensor([0, tokens - 1])]
    starts = torch.tensor([0, tokens // 2])
    seq_args = (starts, seq_lens, seq_idx, 2, int(seq_lens.max()), tokens)
    sgmv_shrunk = {}
    for impl in (reference, grouped_lora):
        buf = torch.zeros(tokens, RANK, dtype=torch.float32)
        impl.sgmv_shrink(x, a, buf, *seq_args, 0.5)
        sgmv_shrunk[impl] = buf
    errors["sgmv_shrink"] = rel_err(sgmv_shrunk[grouped_lora], sgmv_shrunk[reference])
    same_input, chained = {}, {}
    for impl in (reference, grouped_lora):
        y = y0.clone()
        impl.sgmv_expand(sgmv_shrunk[reference], b, y, *seq_args, add_inputs)
        impl.sgmv_expand_slice(sgmv_shrunk[reference], b, y, *seq_args, OUT, OUT, add_inputs)
        same_input[impl] = y
        # ...and chained as vLLM runs them, each implementation expanding its own fp32 shrink output. Written
        # without the inputs added, so what is compared is the bf16-rounded LoRA term itself.
        y = torch.zeros_like(y0)
        impl.sgmv_expand(sgmv_shrunk[impl], b, y, *seq_args, False)
        impl.sgmv_expand_slice(sgmv_shrunk[impl], b, y, *seq_args, OUT, OUT, False)
        chained[impl] = y
    errors["sgmv_expand"] = rel_err(same_input[grouped_lora] - y0 * add_inputs, same_input[reference] - y0 * add_inputs)
    # The expand ops agree bit for bit on the same input, so a chained difference can only come from the shrink's
    # fp32 output, which differs in the last bit (its sums are taken in another order: ~1e-7 relative). Both
    # implementations round that output to bf16 before the expand (vLLM's reference op casts its inputs to the
    # output dtype), where a last-bit difference flips the rounding of a value on a boundary: one bf16 unit of
    # that shrink value, carried linearly through the expand (sum over k of |d shrink_k| * |b_jk|), then one flip
    # of the output's own bf16 rounding (plus the expand's fp32 sums over 8 terms, ~1e-6 of sum |shrink_k * b_jk|).
    # `explained` is the largest chained difference as a share of that bound.
    token_slots = torch.repeat_interleave(seq_idx, seq_lens)
    expand_w = (b.squeeze(1) if b.dim() == 4 else b).float().abs()[token_slots]
    rounded = {impl: sgmv_shrunk[impl].to(torch.bfloat16).float() for impl in sgmv_shrunk}
    carried = (torch.einsum("tk,tok->to", (rounded[grouped_lora] - rounded[reference]).abs(), expand_w)
               + 1e-6 * torch.einsum("tk,tok->to", rounded[reference].abs(), expand_w)).repeat(1, 2)
    return {"case": name, "max_rel_err": max(errors.values()), "errors": errors,
            "chained_prefill": explained(chained[grouped_lora], chained[reference], carried)}


def explained(a: torch.Tensor, b: torch.Tensor, carried: torch.Tensor) -> dict:
    """Differences between two bf16 results against `carried` (the input difference carried to the output) plus one
    unit in the last place of bf16 at the larger magnitude."""
    a, b = a.float(), b.float()
    magnitude = torch.maximum(a.abs(), b.abs()).clamp_min(torch.finfo(torch.bfloat16).tiny)
    ulp = torch.pow(2.0, torch.floor(torch.log2(magnitude)) - 7)  # bf16 keeps 8 significant bits
    difference = (a - b).abs()
    return {"explained": float((difference / (carried + ulp)).max()),
            "max_ulps": float((difference / ulp).max()), "elements_differing": int((difference > 0).sum()),
            "elements": difference.numel()}


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


def prompt_logprob_rows() -> dict:
    """vLLM's prompt log-probabilities: one request's 300 prompt tokens through the LoRA logits processor with the
    batch's 3 per-sequence indices. All sequences on one adapter: every row gets that adapter (as one request on its
    own would); mixed adapters whose lm_head weights are zero: no row gets a term; otherwise: not attributable."""
    x = torch.randn(300, HIDDEN, dtype=torch.bfloat16)
    a = torch.randn(SLOTS, 1, RANK, HIDDEN, dtype=torch.bfloat16)
    same = torch.zeros(300, RANK)
    grouped_lora.bgmv_shrink(x, a, same, torch.tensor([1, 1, 1]), 1.0)
    alone = torch.zeros(300, RANK)
    grouped_lora.bgmv_shrink(x, a, alone, torch.full((300,), 1), 1.0)
    zero_a = torch.zeros_like(a)
    mixed_zero = torch.ones(300, RANK)
    grouped_lora.bgmv_shrink(x, zero_a, mixed_zero, torch.tensor([0, -1, 2]), 1.0)
    attributable = grouped_lora.per_row(x, a, torch.tensor([0, -1, 2])) is not None
    return {"same_adapter_max_abs_diff": float((same - alone).abs().max()),
            "mixed_zero_weights_max_abs": float(mixed_zero.abs().max()), "mixed_attributable": attributable}


def fused_layers() -> dict:
    """charforge_vllm's fused layers (`fused_lora`: one shrink and one expand per layer, float32 weights cached per
    slot) against vLLM's per-slice `PunicaWrapperCPU.add_lora_linear` running the grouped ops, on a q/k/v layer:
    the largest absolute difference per batch shape (expected 0: the same roundings, zero blocks add exact zeros);
    after a slot is rewritten (`activate_adapter` bumps the cache generation) the new weights must be used; the
    logits op skipped when the slots in use hold zero lm_head weights must leave the logits as they were."""
    from vllm.lora.layers import LoRAMapping
    from vllm.lora.punica_wrapper import punica_cpu

    from charforge_vllm import OPS, fused_lora

    for name in OPS:
        setattr(punica_cpu, name, getattr(grouped_lora, name))
    per_slice = punica_cpu.PunicaWrapperCPU.add_lora_linear
    fused_lora.install()
    slices = (HIDDEN, 192, 192)
    a = tuple(torch.randn(SLOTS, 1, RANK, HIDDEN, dtype=torch.bfloat16) / 10 for _ in slices)
    b = tuple(torch.randn(SLOTS, 1, out, RANK, dtype=torch.bfloat16) / 10 for out in slices)

    def wrapper(slots_per_token: list[int]):
        w = punica_cpu.PunicaWrapperCPU(4096, 256, "cpu")
        ids = tuple(slot + 1 for slot in slots_per_token)  # LoRA ids: slot i holds id i + 1, 0 is no adapter
        w.update_metadata(LoRAMapping(ids, ids, is_prefill=True), [1, 2, 3], SLOTS + 1, 49152)
        return w

    def both(slots_per_token: list[int], w=None) -> dict:
        w = w or wrapper(slots_per_token)
        x = torch.randn(len(slots_per_token), HIDDEN, dtype=torch.bfloat16)
        y0 = torch.randn(len(slots_per_token), sum(slices), dtype=torch.bfloat16)
        fused, reference_loop = y0.clone(), y0.clone()
        w.add_lora_linear(fused, x, a, b, 1.0, slices)
        per_slice(w, reference_loop, x, a, b, 1.0, slices)
        # Both round the fp32 shrink output to bf16 before the expand; their fp32 sums run in another order (one
        # matmul over the stacked A vs one per slice), so a value on a rounding boundary may flip by one bf16 unit and
        # carry into the output: allowed, two bf16 units at the output's magnitude
        units = float((fused.float() - reference_loop.float()).abs().max()
                      / (2.0 ** -7 * reference_loop.float().abs().max()))
        return {"bf16_units": units, "lora_term_max": float((reference_loop.float() - y0.float()).abs().max())}

    shapes = {"prefill, one adapter, 300 tokens": [0] * 300, "decode, 8 sequences, one adapter": [2] * 8,
              "two adapters and base rows": [1] * 7 + [2] * 5 + [-1] * 3, "base only": [-1] * 5}
    result = {label: both(slots_per_token) for label, slots_per_token in shapes.items()}
    w = wrapper([2] * 8)
    both([2] * 8, w)  # caches slot 2's fused weights
    for weights in (*a, *b):
        weights[2].normal_(0, 0.1)  # slot 2 rewritten in place, as vLLM's set_lora does...
    result["slot rewritten, no generation bump (stale)"] = both([2] * 8, w)
    fused_lora.bump_generation()  # ...inside activate_adapter
    result["slot rewritten, generation bumped"] = both([2] * 8, w)
    w = wrapper([0, 0, 1])
    logits_a = torch.randn(SLOTS + 1, 1, RANK, HIDDEN, dtype=torch.bfloat16)
    logits_b = torch.zeros(SLOTS + 1, 1, 1024, RANK, dtype=torch.bfloat16)
    x, y0 = torch.randn(3, HIDDEN, dtype=torch.bfloat16), torch.randn(3, 1024, dtype=torch.bfloat16)
    y = y0.clone()
    w.add_lora_logits(y, x, logits_a, logits_b, 1.0)
    result["zero lm_head skipped, logits changed by"] = float((y.float() - y0.float()).abs().max())
    logits_b[1].normal_(0, 0.5)
    fused_lora.bump_generation()
    w.add_lora_logits(y, x, logits_a, logits_b, 1.0)
    result["nonzero lm_head applied"] = bool((y.float() - y0.float()).abs().max() > 0)
    return result


cases = [
    case("one adapter, 300-token prompt", torch.zeros(300, dtype=torch.long), True, True),
    case("two adapters in one batch", torch.tensor([1] * 7 + [2] * 5), True, True),
    case("decode step, three sequences, 3-d weights", torch.tensor([2, 0, 2]), False, False),
]
print(json.dumps({"cases": cases, "no_adapter_max_abs": no_adapter_rows(),
                  "prompt_logprob_rows": prompt_logprob_rows(), "fused_layers": fused_layers()}))

"""Drop-in replacements for `vllm.lora.ops.torch_ops` (same signatures, same dtypes, same in-place writes) that
multiply each adapter's rows once instead of gathering a weight matrix per token.

Weights are stacked per adapter slot: shrink `[slots, 1, rank, in]`, expand `[slots, 1, out, rank]` (or without
the 1). A token's index picks its slot; -1 means "no adapter" and adds no LoRA term, as in vLLM's GPU kernels.
An index count that differs from the number of input rows (vLLM's prompt log-probabilities through the LoRA logits
processor) is resolved by `per_row` where the answer is certain, else left to vLLM's reference op.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from vllm.lora.ops.torch_ops import lora_ops as reference


def grouped_matmul(inputs: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, dtype: torch.dtype,
                   slots: list[int] | None = None) -> torch.Tensor:
    """`inputs[t] @ weights[indices[t]].T` for every row t, rounded to `dtype` like the reference op: one matmul
    per distinct index (`slots`, if the caller knows them). Operands are rounded to `dtype` first, as the reference
    does, then multiplied in float32: PyTorch's CPU bf16 GEMM cost several times fp32 at these shapes (rank 8 by
    1536, one to eight rows: ~30 us vs ~5 us, measured), and this runs in every LoRA layer of every decode step."""
    stacked = weights.squeeze(1) if weights.dim() == 4 else weights
    x = inputs.to(dtype).float()
    distinct = torch.unique(indices).tolist() if slots is None else slots
    if len(distinct) == 1:  # the usual batch: one adapter (or none)
        slot = distinct[0]
        if slot < 0:
            return torch.zeros(x.shape[0], stacked.shape[1], dtype=dtype)
        return F.linear(x, stacked[slot].to(dtype).float()).to(dtype)
    out = x.new_zeros(x.shape[0], stacked.shape[1])
    for slot in distinct:
        if slot >= 0:
            rows = (indices == slot).nonzero().squeeze(1)
            out.index_copy_(0, rows, F.linear(x.index_select(0, rows), stacked[slot].to(dtype).float()))
    return out.to(dtype)


def covered(inputs: torch.Tensor, indices: torch.Tensor) -> bool:
    return indices.dim() == 1 and indices.numel() == inputs.shape[0]


def per_row(inputs: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor | None:
    """One index per input row where vLLM passes fewer: its prompt-logprobs path sends one request's prompt tokens
    through the LoRA logits processor with the batch's per-*sequence* sampler indices (vllm-project/vllm#16668;
    the reference op then fails on the shape). When every sequence uses the same slot, that slot is right for
    every row; when the slots in use all hold zero weights (adapters that do not train `lm_head`), no row gets a
    LoRA term. Otherwise the rows cannot be attributed: None (the reference op's failure stands)."""
    if indices.dim() != 1 or indices.numel() == 0:
        return None
    slots = torch.unique(indices).tolist()
    stacked = weights.squeeze(1) if weights.dim() == 4 else weights
    if len(slots) > 1 and all(slot < 0 or not bool(stacked[slot].any()) for slot in slots):
        slots = [-1]
    if len(slots) != 1:
        return None
    return torch.full((inputs.shape[0],), slots[0], dtype=indices.dtype)


def bgmv_shrink(inputs, lora_b_weights, output_tensor, lora_indices_tensor, scaling: float = 1.0, slots=None):
    if not covered(inputs, lora_indices_tensor):
        rows = per_row(inputs, lora_b_weights, lora_indices_tensor)
        if rows is None:
            return reference.bgmv_shrink(inputs, lora_b_weights, output_tensor, lora_indices_tensor, scaling)
        lora_indices_tensor, slots = rows, None
    outputs = grouped_matmul(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype, slots)
    output_tensor[:, : outputs.shape[1]] = scaling * outputs


def bgmv_expand(inputs, lora_b_weights, output_tensor, lora_indices_tensor, add_inputs: bool = True, slots=None):
    if not covered(inputs, lora_indices_tensor):
        rows = per_row(inputs, lora_b_weights, lora_indices_tensor)
        if rows is None:
            return reference.bgmv_expand(inputs, lora_b_weights, output_tensor, lora_indices_tensor, add_inputs)
        lora_indices_tensor, slots = rows, None
    outputs = grouped_matmul(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype, slots)
    limit = output_tensor.shape[0]
    if outputs.shape[0] == 1 and output_tensor.shape[0] != 1:
        limit = 1
    common_len = min(outputs.shape[1], output_tensor.shape[1])  # adapter and model may pad differently
    if add_inputs:
        output_tensor[:, :common_len] += outputs[:limit, :common_len]
    else:
        output_tensor[:, :common_len] = outputs[:limit, :common_len]


def bgmv_expand_slice(inputs, lora_b_weights, output_tensor, lora_indices_tensor, slice_offset: int,
                      slice_size: int, add_inputs: bool = True, slots=None):
    if not covered(inputs, lora_indices_tensor):
        rows = per_row(inputs, lora_b_weights, lora_indices_tensor)
        if rows is None:
            return reference.bgmv_expand_slice(inputs, lora_b_weights, output_tensor, lora_indices_tensor,
                                               slice_offset, slice_size, add_inputs)
        lora_indices_tensor, slots = rows, None
    outputs = grouped_matmul(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype, slots)
    if add_inputs:
        output_tensor[:, slice_offset: slice_offset + slice_size] += outputs
    else:
        output_tensor[:, slice_offset: slice_offset + slice_size] = outputs


# Prefill (vLLM V1 on CPU also decodes through these): one index per sequence. The distinct adapters are read from
# the per-sequence indices; only a batch that mixes adapters needs one index per token.
def token_indices(lora_indices_tensor, seq_len_tensor, tokens: int) -> tuple[torch.Tensor, list[int]]:
    slots = torch.unique(lora_indices_tensor).tolist()
    if len(slots) == 1:
        return lora_indices_tensor[:1].expand(tokens), slots
    return torch.repeat_interleave(lora_indices_tensor, seq_len_tensor), slots


def sgmv_shrink(inputs, lora_a_weights, output_tensor, b_seq_start_loc, seq_len_tensor, lora_indices_tensor,
                batches, max_seq_length, token_nums, scaling):
    indices, slots = token_indices(lora_indices_tensor, seq_len_tensor, inputs.shape[0])
    bgmv_shrink(inputs, lora_a_weights, output_tensor, indices, scaling, slots)


def sgmv_expand(inputs, lora_b_weights, output_tensor, b_seq_start_loc, seq_len_tensor, lora_indices_tensor,
                batches, max_seq_length, token_nums, add_inputs=False):
    indices, slots = token_indices(lora_indices_tensor, seq_len_tensor, inputs.shape[0])
    bgmv_expand(inputs, lora_b_weights, output_tensor, indices, add_inputs, slots)


def sgmv_expand_slice(inputs, lora_b_weights, output_tensor, b_seq_start_loc, seq_len_tensor,
                      lora_indices_tensor, batches, max_seq_length, token_nums, slice_offset, slice_size,
                      add_inputs=False):
    indices, slots = token_indices(lora_indices_tensor, seq_len_tensor, inputs.shape[0])
    bgmv_expand_slice(inputs, lora_b_weights, output_tensor, indices, slice_offset, slice_size, add_inputs, slots)

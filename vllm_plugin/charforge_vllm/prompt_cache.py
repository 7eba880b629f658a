"""Prefix caching for prompt log-probabilities, where the client says which positions it reads.

vLLM skips the prefix cache for every request that asks for prompt log-probabilities
(`SamplingParams.skip_reading_prefix_cache`): cached positions are never computed, so they would have no
log-probability. A log-likelihood request (lm-eval's `loglikelihood`: the context and the continuation as one
prompt, `echo` with `logprobs`) reads only the continuation's, and a multiple-choice document sends the same
context once per choice: each choice prefills the whole context again.

A request that names how far it may be served from the cache (`vllm_xargs: {"charforge_prompt_cache_limit": N}`,
N = the context's length - 1: the first continuation token's log-probability is computed at the position before
it) reads the cache again, for at most N tokens (whole blocks). Positions that came from the cache report
log-probability 0.0 for their own token (not computed; the client reads past them). Requests without the key keep
vLLM's behaviour.
"""

from __future__ import annotations

import logging

logger = logging.getLogger("vllm.plugins.charforge_vllm")
KEY = "charforge_prompt_cache_limit"


def cache_limit(request) -> int | None:
    params = getattr(request, "sampling_params", None)
    extra = getattr(params, "extra_args", None) or {}
    value = extra.get(KEY)
    return int(value) if isinstance(value, (int, str)) and str(value).isdigit() else None


def register() -> None:
    """Patch the scheduler's cache lookup and the runner's prompt log-probability buffers. Idempotent."""
    import torch
    from vllm.v1.core.kv_cache_manager import KVCacheManager
    from vllm.v1.outputs import LogprobsTensors
    from vllm.v1.request import Request

    if getattr(KVCacheManager, "_charforge_prompt_cache", False):
        return

    skip = Request.get_skip_reading_prefix_cache

    def get_skip_reading_prefix_cache(self) -> bool:
        return False if cache_limit(self) is not None else skip(self)

    lookup = KVCacheManager.get_computed_blocks

    def get_computed_blocks(self, request):
        limit = cache_limit(request)
        if limit is None:
            return lookup(self, request)
        coordinator = self.coordinator
        find = coordinator.find_longest_cache_hit
        coordinator.find_longest_cache_hit = lambda hashes, longest, *a, **k: find(hashes, min(longest, limit), *a,
                                                                                    **k)
        try:
            return lookup(self, request)
        finally:
            del coordinator.find_longest_cache_hit  # the class's own again

    Request.get_skip_reading_prefix_cache = get_skip_reading_prefix_cache
    KVCacheManager.get_computed_blocks = get_computed_blocks
    KVCacheManager._charforge_prompt_cache = True

    try:
        from vllm.v1.worker.gpu_model_runner import GPUModelRunner  # the CPU runner inherits from it
    except ImportError:  # a process without the model runner (the API server): the scheduler patch is what it needs
        return
    prompt_logprobs = GPUModelRunner._get_prompt_logprobs_dict

    def _get_prompt_logprobs_dict(self, hidden_states, num_scheduled_tokens):
        # vLLM allocates a request's prompt log-probability buffer uninitialised and fills it from the first position
        # it computes: positions served from the cache would hold garbage token ids. Start such a buffer with each
        # position's own token at log-probability 0.0 and rank 1.
        for req_id, top in (self.num_prompt_logprobs or {}).items():
            state = self.requests.get(req_id)
            if state is None or req_id not in num_scheduled_tokens or state.prompt_token_ids is None or \
                    state.in_progress_prompt_logprobs_cpu is not None or state.num_computed_tokens <= 0:
                continue
            tokens = state.prompt_token_ids
            buffer = LogprobsTensors.empty_cpu(len(tokens) - 1, top + 1)
            cached = min(state.num_computed_tokens, len(tokens) - 1)
            buffer.logprob_token_ids[:cached] = torch.tensor(tokens[1:cached + 1], dtype=torch.int32)[:, None]
            buffer.logprobs[:cached] = 0.0
            buffer.selected_token_ranks[:cached] = 1
            state.in_progress_prompt_logprobs_cpu = buffer
        return prompt_logprobs(self, hidden_states, num_scheduled_tokens)

    GPUModelRunner._get_prompt_logprobs_dict = _get_prompt_logprobs_dict
    logger.info("charforge_vllm: prefix cache for prompt log-probabilities with %s", KEY)

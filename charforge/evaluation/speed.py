"""The evaluated model's single-stream decode speed through its vLLM server (`serving/tokens_per_s` of an
evaluation run). Kept apart from the scoring code (harness.py is part of the score cache's key: a change there scores
every model again; a change here changes no score)."""

from __future__ import annotations

import statistics
import time

import httpx

# Single-stream decode speed of the evaluated model, measured once per evaluation (median of 2 after a 4-token
# warm-up; 68 decoded tokens: about 18 s on a slow 2-core CPU, where 256 took 77 s).
DECODE_TOKENS, DECODE_REPEATS, WARM_UP_TOKENS = 32, 2, 4
DECODE_PROMPT = ("<|im_start|>system\nYou are Sherlock Holmes.<|im_end|>\n<|im_start|>user\nHow did you know I "
                 "was a doctor?<|im_end|>\n<|im_start|>assistant\n")


def decode_speed(base_url: str, model: str, tokens: int = DECODE_TOKENS, repeats: int = DECODE_REPEATS,
                 prompt: str = DECODE_PROMPT) -> float:
    """Single-stream greedy decode tokens/s through the server's /v1/completions: one short warm-up (the first
    request's one-off costs), then the median of `repeats` (end-of-text ignored so every run decodes `tokens`)."""
    body = {"model": model, "prompt": prompt, "max_tokens": tokens, "temperature": 0, "ignore_eos": True}
    rates = []
    for i in range(repeats + 1):
        started = time.monotonic()
        response = httpx.post(f"{base_url}/v1/completions", json=body if i else {**body, "max_tokens": WARM_UP_TOKENS},
                              timeout=600)
        response.raise_for_status()
        elapsed = time.monotonic() - started
        if i:
            rates.append(response.json()["usage"]["completion_tokens"] / elapsed)
    return statistics.median(rates)

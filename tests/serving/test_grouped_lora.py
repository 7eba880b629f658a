"""charforge_vllm (vllm_plugin/): vLLM's CPU LoRA path with one matmul per adapter. Its ops must compute what
vLLM's reference ops compute, and a real vLLM replica serving an adapter through them must score text the way
transformers + PEFT does."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import httpx
import pytest

from charforge.settings import platform
from charforge.vllm_server import free_port

CHECK = Path(__file__).with_name("grouped_lora_check.py")


def test_grouped_ops_compute_what_vllms_reference_ops_compute():
    """Each op, given the same inputs, matches vLLM's reference op (fp32 shrink outputs to ~1e-7, the bf16 expand
    outputs bit for bit). Chained as vLLM runs a prefill, each implementation expands its own shrink output; those
    differ in the last fp32 bit (sums in another order: the reference gathers a weight per token, the plugin does
    one matmul), and both round them to bf16 before expanding, so a value on a rounding boundary flips by one bf16
    unit and carries into the output (seen on AVX2 and AVX-512 AMD EPYCs: 0.0017 of the largest output). The chained
    bound is that carried difference plus one flip of the output's own rounding: nothing else may differ."""
    out = subprocess.run([str(platform().serving_python), str(CHECK)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    for case in result["cases"]:
        assert case["max_rel_err"] < 1e-5, case
        assert case["chained_prefill"]["explained"] <= 1.0, case
    assert result["no_adapter_max_abs"] == 0.0  # a base request batched with adapter requests gets no LoRA term
    # Batched prompt log-probabilities (lm-eval's log-likelihoods, several requests at a time): the logits LoRA gets
    # per-sequence indices for per-token rows; one adapter for all is exact, mixed ones must not be guessed
    assert result["prompt_logprob_rows"] == {"same_adapter_max_abs_diff": 0.0, "mixed_zero_weights_max_abs": 0.0,
                                             "mixed_attributable": False}


def test_fused_layers_compute_what_the_per_slice_loop_computes():
    """The fused layers (one shrink and one expand per layer, weights cached per adapter slot) give vLLM's per-slice
    loop's result (within one bf16 rounding flip carried through) for a prefill, a decode step, a batch mixing two
    adapters with base rows and a base-only batch; a slot rewritten in place is picked up once vLLM's activate_adapter
    bumps the cache generation (and is stale without it: the check can fail); lm_head LoRA is skipped only when zero."""
    out = subprocess.run([str(platform().serving_python), str(CHECK)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    fused = json.loads(out.stdout.strip().splitlines()[-1])["fused_layers"]
    for label in ("prefill, one adapter, 300 tokens", "decode, 8 sequences, one adapter", "two adapters and base rows"):
        assert fused[label]["lora_term_max"] > 0.1, fused  # the adapter changes the output...
        assert fused[label]["bf16_units"] <= 2.0, fused  # ...as the per-slice loop does
    assert fused["base only"] == {"bf16_units": 0.0, "lora_term_max": 0.0}
    assert fused["slot rewritten, no generation bump (stale)"]["bf16_units"] > 10, fused
    assert fused["slot rewritten, generation bumped"]["bf16_units"] <= 2.0, fused
    assert fused["zero lm_head skipped, logits changed by"] == 0.0
    assert fused["nonzero lm_head applied"] is True


@pytest.mark.parametrize("variable, value, refusal", [
    ("CHARFORGE_VLLM_LORA", "fast",
     "ValueError: CHARFORGE_VLLM_LORA='fast': expected 'fused' (one matmul per layer, the default) or 'grouped'"),
    ("CHARFORGE_VLLM_LORA_MERGE", "two",
     "ValueError: CHARFORGE_VLLM_LORA_MERGE='two': expected a whole number of adapter slots merged between two "
     "adapter writes >= 0 (default 0; 0 turns it off)"),
    ("CHARFORGE_VLLM_QUEUE_WAIT_MS", "2ms",
     "ValueError: CHARFORGE_VLLM_QUEUE_WAIT_MS='2ms': expected a whole number of milliseconds >= 0 (default 20; 0 "
     "turns it off)"),
])
def test_a_bad_plugin_setting_is_refused_at_startup_naming_the_variable(variable, value, refusal):
    code = f"import os; os.environ[{variable!r}] = {value!r}; import charforge_vllm; charforge_vllm.register()"
    out = subprocess.run([str(platform().serving_python), "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode != 0
    assert refusal in out.stderr


@pytest.mark.slow
def test_the_engine_process_leaves_the_cores_to_the_worker_while_it_computes(vllm_base):
    """vLLM's engine process polls the worker's reply queue for 1 s after every read (`sched_yield` in a loop): on
    a 2-core machine it took turns with the worker's threads for the whole of every step. With charforge_vllm it
    waits on the queue's notification after 10 ms: while 4 streams decode, the engine process uses a small share
    of a core (vLLM's own polling: about all of one)."""
    import threading
    import time

    import psutil

    log = Path(vllm_base.log_path).read_text(errors="replace")
    engine = next(p for p in psutil.Process(vllm_base.process.pid).children(recursive=True)
                  if "EngineCore" in " ".join(p.cmdline()))

    def decode() -> None:
        httpx.post(f"{vllm_base.url}/v1/completions", timeout=300, json={
            "model": vllm_base.served_name, "prompt": "Once upon a time", "max_tokens": 96, "ignore_eos": True})
    before, started = engine.cpu_times(), time.monotonic()
    streams = [threading.Thread(target=decode) for _ in range(4)]
    for t in streams:
        t.start()
    for t in streams:
        t.join()
    after, wall = engine.cpu_times(), time.monotonic() - started
    busy = (after.user + after.system - before.user - before.system) / wall
    assert wall > 1 and busy < 0.5, (busy, wall)
    assert "readers poll 10 ms after a read" in log


@pytest.mark.slow
def test_served_adapter_scores_text_like_transformers_and_peft(vllm_base, base_model_dir, tmp_path):
    served_scores_match_peft(vllm_base, base_model_dir, tmp_path)
    assert "grouped CPU LoRA ops active, layers fused" in vllm_base.log_path.read_text()


@pytest.mark.slow
def test_compiled_replica_scores_an_adapter_loaded_after_compilation_like_peft(base_model_dir, tmp_path):
    """`CHARFORGE_VLLM_LORA_COMPILE=1`: the LoRA-enabled model is compiled (torch.compile, as vLLM compiles it
    without LoRA) with the fused layers as opaque ops; an adapter hot-loaded after compilation must still be applied."""
    from charforge.vllm_server import VLLMServer

    server = VLLMServer(base_model_dir, "smollm2-135m-instruct", free_port(),
                        extra_env={"CHARFORGE_VLLM_LORA_COMPILE": "1"})
    server.start(tmp_path / "vllm.log")
    try:
        server.wait_ready(timeout=400)
        served_scores_match_peft(server, base_model_dir, tmp_path)
    finally:
        server.stop()
    log = server.log_path.read_text()
    assert "DYNAMO_TRACE_ONCE" in log and "CompilationMode.NONE" not in log


@pytest.mark.slow
def test_merged_replica_scores_adapters_like_peft_when_one_adapter_has_the_batch(base_model_dir, tmp_path):
    """`CHARFORGE_VLLM_LORA_MERGE=1`: a step whose tokens all use one adapter runs each layer as one GEMM over
    `W + B A`. Two adapters one after the other (the second written where the first was, which must drop the first's
    merged weights) both score text like transformers + PEFT, and the base still scores as the base."""
    from charforge.vllm_server import VLLMServer

    server = VLLMServer(base_model_dir, "smollm2-135m-instruct", free_port(),
                        extra_env={"CHARFORGE_VLLM_LORA_MERGE": "1"})
    server.start(tmp_path / "vllm.log")
    try:
        server.wait_ready(timeout=400)
        served_scores_match_peft(server, base_model_dir, tmp_path / "first", seed=3)
        served_scores_match_peft(server, base_model_dir, tmp_path / "second", seed=5)
    finally:
        server.stop()
    log = server.log_path.read_text()
    assert "single-adapter batches on merged weights (up to 1 slots)" in log
    # the scoring requests ran on merged weights, the second adapter's on weights merged again after its write
    merges = re.findall(r"adapter slot (\d+) merged into the first layer's weights \(generation (\d+)", log)
    assert len(merges) == 2 and merges[0][1] != merges[1][1], merges


def served_scores_match_peft(server, base_model_dir, tmp_path, seed: int = 3):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tests.conftest import build_adapter

    adapter = build_adapter(base_model_dir, tmp_path, seed=seed, noise=0.1)  # moves log-probs well above bf16 noise
    tokenizer = AutoTokenizer.from_pretrained(base_model_dir)
    text = tokenizer.apply_chat_template(
        [{"role": "system", "content": "You are Nell Bramwick, a lighthouse keeper who speaks in sea metaphors."},
         {"role": "user", "content": "How was the storm last night?"},
         {"role": "assistant", "content": "Like a bosun with a grudge, it battered the lamp room till dawn."}],
        tokenize=False)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    name = "grouped-lora-check"
    loaded = httpx.post(f"{server.url}/v1/load_lora_adapter", json={"lora_name": name,
                                                                         "lora_path": str(adapter)}, timeout=120)
    assert loaded.status_code == 200, loaded.text

    def served_logprobs(model: str) -> torch.Tensor:
        reply = httpx.post(f"{server.url}/v1/completions", timeout=120, json={
            "model": model, "prompt": ids, "max_tokens": 1, "echo": True, "logprobs": 0, "temperature": 0})
        assert reply.status_code == 200, reply.text
        return torch.tensor(reply.json()["choices"][0]["logprobs"]["token_logprobs"][1:len(ids)])

    def hf_logprobs(model) -> torch.Tensor:
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, :-1].float()
        return logits.log_softmax(-1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]

    from charforge.cpu import serving_dtype

    # the dtype vLLM serves in here: float32 on a CPU without native bf16, else bf16
    base = AutoModelForCausalLM.from_pretrained(
        base_model_dir, dtype=torch.float32 if serving_dtype("auto") == "float32" else torch.bfloat16)
    expected_base = hf_logprobs(base)
    expected = hf_logprobs(PeftModel.from_pretrained(base, adapter))
    served, served_base = served_logprobs(name), served_logprobs("smollm2-135m-instruct")
    noise = (served_base - expected_base).abs().mean()  # vLLM's kernels vs transformers' on the base alone
    error = (served - expected).abs().mean()
    effect = (expected - expected_base).abs().mean()  # what the adapter changes
    print(f"served vs transformers + PEFT: mean |log-prob error| {error:.4f} (base alone {noise:.4f}), "
          f"adapter effect {effect:.4f}")
    assert error < 1.5 * noise + 0.01, (error, noise)
    assert effect > 4 * error, (effect, error)
    httpx.post(f"{server.url}/v1/unload_lora_adapter", json={"lora_name": name}, timeout=60)

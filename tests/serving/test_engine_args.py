"""Serving options in configs/serving.yaml reach vLLM's command line, as vLLM's own argument parser reads it."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from charforge.config import load_yaml_model
from charforge.schemas.serving import FleetSettings, ServingConfig
from charforge.settings import CONFIGS_DIR, platform
from charforge.vllm_server import VLLMServer

# Runs in the serving environment: vLLM's OpenAI server parser, the same one `api_server` uses at start-up.
PARSE = """
import json, sys
from vllm.entrypoints.launchers.cli_args import make_arg_parser
from vllm.utils.argparse_utils import FlexibleArgumentParser
a = make_arg_parser(FlexibleArgumentParser()).parse_args(json.loads(sys.argv[1]))
print(json.dumps({k: getattr(a, k) for k in ("enable_prefix_caching", "speculative_config", "tensor_parallel_size",
                                              "gpu_memory_utilization", "max_model_len", "enable_lora")}))
"""


def parsed_by_vllm(fleet: FleetSettings) -> dict:
    server = VLLMServer(Path("/models/base"), "base", 8000, max_model_len=fleet.max_model_len,
                        extra_args=fleet.engine_args())
    argv = server.command()[3:]  # drop `python -m vllm.entrypoints.openai.api_server`
    out = subprocess.run([str(platform().serving_python), "-c", PARSE, json.dumps(argv)], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_serving_options_reach_the_vllm_command_line():
    if not platform().serving_python.exists():
        pytest.skip("serving environment missing (make setup creates it)")
    fleet = FleetSettings(max_model_len=4096, enable_prefix_caching=True, tensor_parallel_size=2,
                          gpu_memory_utilization=0.85,
                          speculative={"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4})
    assert parsed_by_vllm(fleet) == {
        "enable_prefix_caching": True, "tensor_parallel_size": 2, "gpu_memory_utilization": 0.85,
        "max_model_len": 4096, "enable_lora": True,
        "speculative_config": {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4}}


def test_shipped_serving_config_flags():
    fleet = load_yaml_model(CONFIGS_DIR / "serving.yaml", ServingConfig).fleet
    # the embedded default: prefix caching on, one device per replica, no GPU fraction, no speculation
    assert fleet.engine_args() == ["--enable-prefix-caching", "--tensor-parallel-size", "1"]
    off = FleetSettings(enable_prefix_caching=False)
    assert off.engine_args()[0] == "--no-enable-prefix-caching"


@pytest.mark.parametrize("flags, gpu, dtype", [
    ({"avx2", "fma"}, False, "float32"),  # AVX2 only: bf16 is emulated (4.5x slower than fp32, measured)
    ({"avx2", "avx512f", "avx512_bf16"}, False, "bfloat16"),
    ({"avx2", "avx512f", "amx_bf16", "amx_tile"}, False, "bfloat16"),
    ({"avx2"}, True, "auto"),  # a GPU host: vLLM takes the checkpoint's dtype
])
def test_auto_dtype_follows_what_the_cpu_multiplies_natively(monkeypatch, flags, gpu, dtype):
    from charforge import cpu

    monkeypatch.setattr(cpu, "cpu_flags", lambda: frozenset(flags))
    monkeypatch.setattr(cpu, "nvidia_gpu", lambda: gpu)
    argv = VLLMServer(Path("/models/base"), "base", 8000).command()
    assert argv[argv.index("--dtype") + 1] == dtype
    pinned = VLLMServer(Path("/models/base"), "base", 8000, dtype="bfloat16").command()
    assert pinned[pinned.index("--dtype") + 1] == "bfloat16"  # an explicit dtype is passed through


def test_a_quantized_checkpoint_keeps_bf16_activations(tmp_path, monkeypatch):
    from charforge import cpu

    monkeypatch.setattr(cpu, "cpu_flags", lambda: frozenset({"avx2"}))
    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "auto-round"}}))
    argv = VLLMServer(tmp_path, "base", 8000).command()
    assert argv[argv.index("--dtype") + 1] == "bfloat16"

"""`charforge plan` against numbers worked out by hand for Llama-3.1-8B and 70B (the arithmetic is in the tests)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from charforge import planning
from charforge.base_models import load_preset
from charforge.config import load_yaml_model
from charforge.schemas.planning import PlanningConfig
from charforge.settings import CONFIGS_DIR

CHARFORGE = str(Path(sys.executable).parent / "charforge")
GIB = 2**30


@pytest.fixture(scope="module")
def cfg() -> PlanningConfig:
    return load_yaml_model(CONFIGS_DIR / "planning.yaml", PlanningConfig)


def fit(p: planning.Plan, gpu: str) -> planning.GPUFit:
    return next(f for f in p.fits if f.gpu.name == gpu)


def test_llama31_8b_at_8k_and_128k(cfg):
    preset = load_preset("llama-3.1-8b-instruct")
    # weights: 8.03e9 params x 2 bytes = 16.06e9 B = 16.06e9 / 1073741824 = 14.957 GiB
    # KV per token: 2 (K and V) x 32 layers x 8 KV heads x 128 dims x 2 bytes = 131,072 B = 128 KiB
    #   (with the 32 query heads instead of the 8 KV heads it would be 512 KiB: the GQA correction is 4x)
    # 8k:   131,072 B x 8,192 tokens   = 2^17 x 2^13 = 2^30 B = 1 GiB per sequence
    # 128k: 131,072 B x 131,072 tokens = 2^34 B = 16 GiB per sequence
    p8 = planning.plan(preset, 8192, 1, "bf16", "auto", cfg)
    assert p8.weights_gib == pytest.approx(14.957, abs=1e-3)
    assert p8.kv_bytes_per_token == 131072
    assert p8.kv_per_sequence_gib == 1.0 and p8.kv_total_gib == 1.0
    p128 = planning.plan(preset, 131072, 1, "bf16", "auto", cfg)
    assert p128.kv_per_sequence_gib == 16.0
    # one H100 (79.6 GiB): usable = 79.6 x 0.90 - 2.0 overhead = 69.64 GiB
    #   8k:   holds floor((69.64 - 14.957) / 1)  = 54 sequences
    #   128k: holds floor((69.64 - 14.957) / 16) = 3 sequences
    h100 = fit(p8, "H100-80GB")
    assert h100.count == 1 and h100.usable_per_gpu_gib == pytest.approx(69.64)
    assert h100.max_concurrency == 54 and fit(p128, "H100-80GB").max_concurrency == 3
    # a 24 GiB RTX 4090: usable 24 x 0.9 - 2 = 19.6; 14.957 + 16 = 30.96 does not fit one, on two each holds
    # 7.48 of weights + 16 x (4 of 8 KV heads) = 8 GiB of KV = 15.48 GiB
    assert fit(p128, "RTX4090").count == 2
    assert fit(p128, "RTX4090").need_per_gpu_gib == pytest.approx(14.957 / 2 + 8, abs=1e-3)
    # 32 concurrent 8k chats: 32 GiB of KV + 14.96 GiB of weights = 46.96 GiB: too much for a 40 GB A100
    # (34.0 usable), so it takes two; an 80 GB one holds it alone
    p32 = planning.plan(preset, 8192, 32, "bf16", "auto", cfg)
    assert p32.kv_total_gib == 32.0
    assert fit(p32, "A100-40GB").count == 2 and fit(p32, "A100-80GB").count == 1
    # FP8 KV cache halves the per-token figure: 64 KiB
    assert planning.plan(preset, 8192, 1, "bf16", "fp8", cfg).kv_bytes_per_token == 65536


def test_llama31_70b_needs_tensor_parallelism(cfg):
    preset = load_preset("llama-3.1-70b-instruct")
    # weights: 70.6e9 x 2 B = 141.2e9 B = 131.50 GiB (bf16); fp8: 65.75 GiB; int4 at 4.25 bits: 34.94 GiB
    # KV per token: 2 x 80 layers x 8 KV heads x 128 x 2 B = 327,680 B = 320 KiB (64 query heads would be 2.5 MiB)
    # 8k: 327,680 x 8,192 = 2.5 GiB per sequence; 16 sequences = 40 GiB
    p = planning.plan(preset, 8192, 16, "bf16", "auto", cfg)
    assert p.weights_gib == pytest.approx(131.50, abs=0.01)
    assert p.kv_bytes_per_token == 327680
    assert p.kv_per_sequence_gib == 2.5 and p.kv_total_gib == 40.0
    # H100: on 2 GPUs 65.75 weights + 16 x 1.25 KV = 85.75 GiB > 69.64 usable; on 4: 32.875 + 16 x 0.625
    # = 42.875 GiB, and the free 69.64 - 32.875 = 36.765 GiB hold floor(36.765 / 0.625) = 58 sequences
    h100 = fit(p, "H100-80GB")
    assert h100.count == 4 and h100.need_per_gpu_gib == pytest.approx(42.875, abs=1e-3)
    assert h100.max_concurrency == 58
    assert planning.plan(preset, 8192, 16, "fp8", "auto", cfg).weights_gib == pytest.approx(65.75, abs=0.01)
    int4 = planning.plan(preset, 8192, 16, "int4", "auto", cfg)
    assert int4.weights_gib == pytest.approx(70.6e9 * 4.25 / 8 / GIB)
    # int4 on one H100: 34.94 + 40 = 74.94 GiB > 69.64; on two: 17.47 + 20 = 37.47 GiB fits
    assert fit(int4, "H100-80GB").count == 2


def test_kv_heads_are_replicated_past_one_per_gpu(cfg):
    # 8 KV heads on 16 GPUs: each GPU still holds one whole head (1/8 of the cache), not 1/16
    gpu = cfg.gpus[0]
    one_head = planning.fit_on(gpu, 16, weights=0, kv_per_token=GIB / 1024, num_kv_heads=8, context=1024,
                               concurrency=1, cfg=cfg)
    assert one_head.need_per_gpu_gib == pytest.approx(1 / 8)


def test_cost_of_the_example_scenario(cfg):
    s = cfg.scenario
    # 10,000 users x 40 replies = 400,000 replies/day; x 120 = 48 M output and x 1,200 = 480 M input tokens/day
    # month (30 days): 14.4 B input, 1.44 B output; peak = 48e6 / 86,400 s x 3 = 1,666.7 output tokens/s
    t = planning.traffic(s)
    assert t.monthly_input_tokens == 14.4e9 and t.monthly_output_tokens == 1.44e9
    assert t.peak_output_tokens_per_s == pytest.approx(1666.67, abs=0.01)
    # one H100 at $2.99/h and 2,500 tokens/s: 2.99 / (2,500 x 3,600) x 1e6 = $0.3322 per 1M output tokens;
    # 1,666.7 / 2,500 -> 1 replica, x 720 h = $2,152.80/month
    c = planning.cost(2.99, 2500, s, cfg.api_prices)
    assert c.usd_per_m_output_tokens == pytest.approx(0.33222, abs=1e-5)
    assert c.replicas == 1 and c.monthly_usd == pytest.approx(2152.80)
    # gpt-4o-mini: 14,400 M x $0.15 + 1,440 M x $0.60 = 2,160 + 864 = $3,024/month
    assert c.api_monthly_usd["gpt-4o-mini"] == pytest.approx(3024)
    # at 1,000 tokens/s the peak needs ceil(1.667) = 2 replicas
    assert planning.cost(2.99, 1000, s, cfg.api_prices).replicas == 2


def test_gateway_processes_for_a_user_count(cfg):
    """Peak chat requests/s = users x replies / 86,400 s x peak-to-average; each gateway process is planned at
    `utilization` (0.5) of its measured 2,050 requests/s = 1,025, and never fewer than 2."""
    g, s = cfg.gateway, cfg.scenario
    assert planning.traffic(s).peak_requests_per_s == pytest.approx(13.89, abs=0.01)  # 10k users x 40 / 86,400 x 3
    assert planning.gateway_processes(s, g) == 2  # far below one process: the floor of 2
    at = lambda users: s.model_copy(update={"daily_active_users": users})  # noqa: E731
    # 1,476,000 users -> 1,476,000 x 40 / 86,400 x 3 = 2,050.0 requests/s = exactly 2 x 1,025: two processes
    assert planning.traffic(at(1_476_000)).peak_requests_per_s == pytest.approx(2050.0)
    assert planning.gateway_processes(at(1_476_000), g) == 2
    assert planning.gateway_processes(at(1_476_100), g) == 3  # 0.14 requests/s more: a third
    assert planning.gateway_processes(at(10_000_000), g) == 14  # 13,889 / 1,025 = 13.6


def test_cli_sizes_replicas_and_gateways_for_a_million_users():
    out = subprocess.run([CHARFORGE, "plan", "--context", "4096", "--concurrency", "64", "--gpu", "H100-80GB",
                          "--users", "1000000"], capture_output=True, text=True, check=True).stdout
    # 1M x 40 / 86,400 x 3 = 1,389 requests/s and x 120 = 166,667 tokens/s: 67 replicas at 2,500 tokens/s
    assert "(1,000,000 daily users) at its peak: 1,389 chat requests/s, 166,667 output tokens/s" in out
    assert "  vLLM replicas       67  (1 x H100-80GB each, at 2500 output tokens/s)" in out
    assert "  gateway processes    2  (at 50% of 2050 requests/s each" in out


def test_cli_prints_the_plan_and_reads_a_measured_throughput(tmp_path):
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps({"output_throughput": 1250.0, "total_token_throughput": 9000.0}))
    out = subprocess.run([CHARFORGE, "plan", "--model", "llama-3.1-8b-instruct", "--context", "131072",
                          "--concurrency", "1", "--gpu", "H100-80GB", "--throughput-from", str(bench)],
                         capture_output=True, text=True, check=True).stdout
    assert "KV cache per token     128.0 KiB  (2 x 32 x 8 x 128 x 2 B)" in out
    assert "KV per sequence        16.00 GiB  at 131072 tokens" in out
    assert f"at 1250 output tokens/s (measured, {bench})" in out
    assert "$0.664 per 1M output tokens" in out  # 2.99 / (1,250 x 3,600) x 1e6


@pytest.mark.parametrize("args, message", [
    (["--precision", "fp4"], "precision 'fp4' unknown; configs/planning.yaml has bf16, fp8, int4"),
    (["--model", "llama-9"], "no such base model preset 'llama-9'"),
    (["--gpu", "TPU"], "--gpu TPU: does not fit this replica or is not in"),
    (["--kv-cache-dtype", "int2"], "--kv-cache-dtype 'int2': use one of auto, fp8"),
])
def test_cli_errors_name_the_bad_input(args, message):
    r = subprocess.run([CHARFORGE, "plan", "--context", "8192", "--concurrency", "1", *args],
                       capture_output=True, text=True)
    assert r.returncode == 2 and message in r.stderr

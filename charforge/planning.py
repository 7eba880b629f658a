"""Capacity and cost planning (`charforge plan`): pure functions over a model preset and `configs/planning.yaml`.

Memory per replica = weights + KV cache. The KV cache holds a key and a value vector per layer and per *KV head*
for every token in flight: 2 x layers x kv_heads x head_dim x bytes per token. With grouped-query attention
kv_heads is the number of key/value heads (8 for Llama-3.1-8B and 70B), not the number of query heads (32 / 64):
using the query heads would overstate the cache 4x / 8x. Units: GiB = 2**30 bytes.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from charforge.base_models import BaseModelPreset
from charforge.schemas.planning import GPU, APIPrice, GatewayCapacity, PlanningConfig, Scenario

GIB = 2**30
KV_BYTES = {"auto": 2.0, "fp8": 1.0}  # vLLM --kv-cache-dtype: auto = the model dtype (bf16), fp8 halves it


def weights_gib(parameters_b: float, bytes_per_param: float) -> float:
    return parameters_b * 1e9 * bytes_per_param / GIB


def kv_bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, bytes_per_value: float) -> float:
    """Key + value, every layer, every KV head (GQA: the KV heads, not the query heads)."""
    return 2 * num_layers * num_kv_heads * head_dim * bytes_per_value


@dataclass(frozen=True)
class GPUFit:
    gpu: GPU
    count: int                 # GPUs per replica (tensor parallel size)
    need_per_gpu_gib: float    # weights shard + KV cache shard at the requested context x concurrency
    usable_per_gpu_gib: float  # memory x utilization - runtime overhead
    max_concurrency: int       # full-context sequences the replica holds

    @property
    def hourly_usd(self) -> float:
        return self.count * self.gpu.hourly_usd


def fit_on(gpu: GPU, count: int, weights: float, kv_per_token: float, num_kv_heads: int, context: int,
           concurrency: int, cfg: PlanningConfig) -> GPUFit:
    """Memory per GPU when one replica spans `count` GPUs. KV heads split across GPUs; past one head per GPU vLLM
    replicates them, so each GPU still holds a whole head."""
    kv_share = max(num_kv_heads // count, 1) / num_kv_heads
    kv_per_seq_gpu = kv_per_token * context * kv_share / GIB
    usable = gpu.memory_gib * cfg.gpu_memory_utilization - cfg.runtime_overhead_gib
    need = weights / count + kv_per_seq_gpu * concurrency
    free_for_kv = usable - weights / count
    max_concurrency = max(int(free_for_kv // kv_per_seq_gpu), 0) if kv_per_seq_gpu > 0 else 0
    return GPUFit(gpu, count, need, usable, max_concurrency)


def smallest_fits(weights: float, kv_per_token: float, num_kv_heads: int, context: int, concurrency: int,
                  cfg: PlanningConfig) -> list[GPUFit]:
    """Per GPU type, the fewest GPUs (of `tensor_parallel_sizes`) whose memory holds the replica; cheapest first."""
    fits = []
    for gpu in cfg.gpus:
        for count in cfg.tensor_parallel_sizes:
            fit = fit_on(gpu, count, weights, kv_per_token, num_kv_heads, context, concurrency, cfg)
            if fit.need_per_gpu_gib <= fit.usable_per_gpu_gib:
                fits.append(fit)
                break
    return sorted(fits, key=lambda f: (f.hourly_usd, f.count))


@dataclass(frozen=True)
class Traffic:
    monthly_input_tokens: float
    monthly_output_tokens: float
    peak_output_tokens_per_s: float
    peak_requests_per_s: float  # chat requests through the gateways at the peak (one per reply)


def traffic(s: Scenario) -> Traffic:
    daily_messages = s.daily_active_users * s.messages_per_user_per_day
    daily_output = daily_messages * s.output_tokens_per_message
    return Traffic(monthly_input_tokens=daily_messages * s.prompt_tokens_per_message * s.days_per_month,
                   monthly_output_tokens=daily_output * s.days_per_month,
                   peak_output_tokens_per_s=daily_output / 86400 * s.peak_to_average,
                   peak_requests_per_s=daily_messages / 86400 * s.peak_to_average)


def gateway_processes(s: Scenario, g: GatewayCapacity) -> int:
    """Gateway processes for the scenario's peak: each filled to `utilization` of its measured saturation, never
    fewer than `min_processes`."""
    return max(g.min_processes, math.ceil(traffic(s).peak_requests_per_s /
                                          (g.requests_per_s_per_process * g.utilization)))


@dataclass(frozen=True)
class Cost:
    usd_per_m_output_tokens: float  # one replica busy at its throughput
    replicas: int                   # to carry the scenario's peak
    monthly_usd: float              # those replicas around the clock
    api_monthly_usd: dict[str, float]


def cost(replica_hourly_usd: float, tokens_per_s: float, s: Scenario, apis: list[APIPrice]) -> Cost:
    t = traffic(s)
    replicas = max(math.ceil(t.peak_output_tokens_per_s / tokens_per_s), 1)
    hours = 24 * s.days_per_month
    return Cost(
        usd_per_m_output_tokens=replica_hourly_usd / (tokens_per_s * 3600) * 1e6,
        replicas=replicas,
        monthly_usd=replicas * replica_hourly_usd * hours,
        api_monthly_usd={a.name: t.monthly_input_tokens / 1e6 * a.input_usd_per_m
                         + t.monthly_output_tokens / 1e6 * a.output_usd_per_m for a in apis},
    )


def priced_fit(fits: list[GPUFit], gpu: str | None, s: Scenario) -> GPUFit | None:
    """The GPU type to price: the one asked for, else the one the scenario's throughput is for, else the cheapest."""
    by_name = {f.gpu.name: f for f in fits}
    if gpu is not None:
        return by_name.get(gpu)
    return by_name.get(s.throughput_gpu) or (fits[0] if fits else None)


def throughput_from(path: Path) -> float:
    """Output tokens/s measured by `vllm bench serve --save-result` (its JSON's `output_throughput`)."""
    return float(json.loads(Path(path).read_text())["output_throughput"])


@dataclass(frozen=True)
class Plan:
    model: str
    precision: str
    kv_cache_dtype: str
    context: int
    concurrency: int
    weights_gib: float
    kv_bytes_per_token: float
    kv_per_sequence_gib: float
    kv_total_gib: float
    fits: list[GPUFit]


def plan(preset: BaseModelPreset, context: int, concurrency: int, precision: str, kv_cache_dtype: str,
         cfg: PlanningConfig) -> Plan:
    if precision not in cfg.bytes_per_param:
        raise ValueError(f"precision {precision!r} unknown; configs/planning.yaml has "
                         f"{', '.join(cfg.bytes_per_param)}")
    weights = weights_gib(preset.parameters_b, cfg.bytes_per_param[precision])
    per_token = kv_bytes_per_token(preset.num_layers, preset.num_kv_heads, preset.head_dim, KV_BYTES[kv_cache_dtype])
    return Plan(preset.name, precision, kv_cache_dtype, context, concurrency, weights, per_token,
                per_token * context / GIB, per_token * context * concurrency / GIB,
                smallest_fits(weights, per_token, preset.num_kv_heads, context, concurrency, cfg))


def render(p: Plan, preset: BaseModelPreset, c: Cost | None, tokens_per_s: float | None, source: str,
           gpu: GPUFit | None, s: Scenario, g: GatewayCapacity) -> str:
    """The plan as plain text (what `charforge plan` prints)."""
    lines = [
        f"{p.model}: {preset.parameters_b} B parameters, {preset.num_layers} layers, {preset.num_kv_heads} KV heads "
        f"x {preset.head_dim} head dim; {p.precision} weights, KV cache {p.kv_cache_dtype}",
        f"  weights            {p.weights_gib:9.2f} GiB",
        f"  KV cache per token {p.kv_bytes_per_token / 1024:9.1f} KiB  (2 x {preset.num_layers} x "
        f"{preset.num_kv_heads} x {preset.head_dim} x {KV_BYTES[p.kv_cache_dtype]:g} B)",
        f"  KV per sequence    {p.kv_per_sequence_gib:9.2f} GiB  at {p.context} tokens",
        f"  KV total           {p.kv_total_gib:9.2f} GiB  for {p.concurrency} concurrent sequence(s)",
        f"  weights + KV       {p.weights_gib + p.kv_total_gib:9.2f} GiB",
    ]
    if p.context > preset.context_length:
        lines.append(f"  note: {p.context} tokens exceed the model's context ({preset.context_length})")
    lines.append("GPUs that fit one replica (fewest GPUs per type, cheapest first):")
    if not p.fits:
        lines.append("  none: lower the context or concurrency, or quantize (--precision fp8|int4)")
    for f in p.fits:
        fp8 = " (FP8 weight-only, no FP8 cores)" if p.precision == "fp8" and not f.gpu.fp8_native else ""
        lines.append(f"  {f.count} x {f.gpu.name:10} need {f.need_per_gpu_gib:6.1f} of {f.usable_per_gpu_gib:5.1f} "
                     f"GiB/GPU, holds {f.max_concurrency:4d} sequences of {p.context}, "
                     f"${f.hourly_usd:.2f}/h{fp8}")
    if c is None or gpu is None:
        return "\n".join(lines)
    t = traffic(s)
    lines += [
        f"Cost on {gpu.count} x {gpu.gpu.name} per replica at {tokens_per_s:g} output tokens/s ({source}):",
        f"  ${c.usd_per_m_output_tokens:.3f} per 1M output tokens (one replica, fully busy)",
        f"  scenario '{s.name}': {t.monthly_input_tokens / 1e9:.2f} B input + {t.monthly_output_tokens / 1e9:.2f} B "
        f"output tokens/month, peak {t.peak_output_tokens_per_s:.0f} output tokens/s",
        f"  self-hosted: {c.replicas} replica(s) x ${gpu.hourly_usd:.2f}/h x {24 * s.days_per_month} h = "
        f"${c.monthly_usd:,.0f}/month",
    ]
    lines += [f"  API {name:18} ${usd:,.0f}/month" for name, usd in c.api_monthly_usd.items()]
    n = gateway_processes(s, g)
    lines += [
        f"Serving '{s.name}' ({s.daily_active_users:,} daily users) at its peak: {t.peak_requests_per_s:,.0f} chat "
        f"requests/s, {t.peak_output_tokens_per_s:,.0f} output tokens/s",
        f"  vLLM replicas    {c.replicas:5d}  ({gpu.count} x {gpu.gpu.name} each, at {tokens_per_s:g} output tokens/s)",
        f"  gateway processes{n:5d}  (at {g.utilization:.0%} of {g.requests_per_s_per_process:g} requests/s each, "
        f"measured on {g.measured_on}; at least {g.min_processes})",
    ]
    return "\n".join(lines)

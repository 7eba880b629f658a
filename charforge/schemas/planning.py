"""Capacity and cost planning config (`configs/planning.yaml`): GPU table, API price table, example scenario."""

from __future__ import annotations

from pydantic import Field

from charforge.config import StageConfig


class GPU(StageConfig):
    name: str = Field(description="Short name used on the command line (`--gpu`).")
    memory_gib: float = Field(gt=0, description="Memory per GPU in GiB, as nvidia-smi reports the total.")
    hourly_usd: float = Field(gt=0, description="Price of one GPU-hour (your contract or an on-demand list price).")
    fp8_native: bool = Field(description="Hardware FP8 (Hopper, Ada). Without it vLLM runs FP8 weight-only.")


class APIPrice(StageConfig):
    name: str = Field(description="API model the self-hosted fleet is compared with.")
    input_usd_per_m: float = Field(ge=0, description="USD per 1M input (prompt) tokens.")
    output_usd_per_m: float = Field(ge=0, description="USD per 1M output tokens.")


class Scenario(StageConfig):
    """The traffic a plan is priced for."""

    name: str = Field(description="What this scenario stands for.")
    daily_active_users: int = Field(gt=0, description="Users chatting on a day.")
    messages_per_user_per_day: float = Field(gt=0, description="Assistant replies per user per day.")
    prompt_tokens_per_message: int = Field(gt=0, description="Prompt per reply: persona + history + user turn.")
    output_tokens_per_message: int = Field(gt=0, description="Tokens in one reply.")
    peak_to_average: float = Field(ge=1, description="Peak-hour traffic over the daily average; replicas are "
                                   "sized for the peak.")
    tokens_per_s_per_replica: float = Field(gt=0, description="Output tokens/s one replica sustains at the "
                                            "planned concurrency, when none is measured or given.")
    throughput_gpu: str = Field(description="The GPU that assumed throughput is for; priced when no --gpu is "
                                "given and it fits.")
    days_per_month: int = Field(default=30, ge=28, le=31, description="Days in a billing month (tokens and GPU "
                                "hours alike).")


class GatewayCapacity(StageConfig):
    """What one gateway process carries (measured by `make bench-capacity`), and how hard a plan may load it."""

    requests_per_s_per_process: float = Field(gt=0, description="Chat requests/s one gateway process sustains at "
                                              "saturation (bench/gateway_capacity.py, streaming replies).")
    measured_on: str = Field(description="Where that figure was measured (a plan prints it).")
    utilization: float = Field(default=0.5, gt=0, le=1, description="Share of that saturation a plan fills at the "
                               "peak: headroom for bursts and for the latency that grows near saturation.")
    min_processes: int = Field(default=2, ge=1, description="Gateway processes never fewer than this: one restarts "
                               "(a rolling update drains it) while the others carry the traffic.")


class PlanningConfig(StageConfig):
    bytes_per_param: dict[str, float] = Field(
        description="Weight bytes per parameter by precision (`--precision`).")
    gpu_memory_utilization: float = Field(
        gt=0, le=1, description="Fraction of GPU memory vLLM may take (--gpu-memory-utilization).")
    runtime_overhead_gib: float = Field(
        ge=0, description="Per GPU, inside that fraction: CUDA context, activations, CUDA graphs.")
    tensor_parallel_sizes: list[int] = Field(description="GPU counts per replica to try, smallest first.")
    gpus: list[GPU] = Field(min_length=1, description="GPU types a plan may use.")
    api_prices: list[APIPrice] = Field(default_factory=list, description="APIs to compare the fleet's cost with.")
    scenario: Scenario = Field(description="Default traffic scenario for the cost report.")
    gateway: GatewayCapacity = Field(description="Gateway processes a scenario's peak needs.")

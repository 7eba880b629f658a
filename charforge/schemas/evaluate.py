"""Evaluation stage config (`configs/eval/*.yaml`)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, field_validator

from charforge.config import StageConfig

KNOWN_TASKS = ("character_mc", "character_reply_likelihood", "character_reply_likelihood_nopersona",
               "character_generation", "character_boundaries")


class ParitySettings(StageConfig):
    """Train/serve parity: the same prompts through HF transformers + PEFT and through vLLM + the adapter."""

    prompts: int = Field(default=16, ge=1, description="Probes compared (the first N, all characters).")
    tokens: int = Field(default=8, ge=1, description="Greedy tokens compared per prompt.")
    min_first_token_agreement: float = Field(
        default=0.75, ge=0, le=1,
        description="Below this share of equal first tokens the run fails: the served adapter is not the trained one.",
    )


class ServingSettings(StageConfig):
    """The vLLM server the evaluation starts (one replica, runtime LoRA loading on)."""

    max_lora_rank: int = Field(default=16, description="--max-lora-rank; adapters above it cannot be served.")
    max_model_len: int = Field(default=2048, ge=128, description="--max-model-len.")
    kv_cache_gib: int = Field(default=1, ge=1, description="VLLM_CPU_KVCACHE_SPACE on CPU.")
    block_size: int | None = Field(default=None, ge=16, description="--block-size: the KV cache's block, the unit "
                                   "a prefix-cache hit is made of (None: vLLM's default, 128 tokens on CPU, 16 on "
                                   "GPU; the CPU backend wants a multiple of 32).")
    startup_timeout_s: float = Field(default=400, gt=0, description="Seconds to wait for /health.")
    omp_threads: int = Field(default=2, ge=1, description="OpenMP threads of the evaluation's vLLM worker (CPU).")
    speed_tokens: int = Field(default=32, ge=1, description="Greedy tokens decoded per run to measure the evaluated "
                              "model's single-stream tokens/s (median of 2 runs after a 4-token warm-up).")


class EvalConfig(StageConfig):
    """One evaluation: which probes, which tasks, how many samples, how the model is served."""

    name: str = Field(default="character-eval", pattern=r"^[a-z0-9][a-z0-9_.-]*$", description="Run family name.")
    base_model: str = Field(default="smollm2-135m-instruct", description="Preset used when no adapter names a base.")
    probes: Path = Field(default=Path("data/eval/probes.jsonl"), description="Probe JSONL (see data/README.md).")
    characters: Path = Field(default=Path("data/characters"), description="Persona cards.")
    probe_characters: list[str] | None = Field(
        default=None, min_length=1, description="Only the probes of these characters (an adapter family's; the chain "
        "sets it from the family's training config); null: every probe.")
    tasks: list[str] = Field(default=list(KNOWN_TASKS), min_length=1, description="lm-eval tasks to run.")
    limit: int | None = Field(default=None, ge=1, description="Documents per task (None = all); for smoke runs.")
    bootstrap_resamples: int = Field(default=1000, ge=100, description="Resamples for the 95% CIs.")
    generation_concurrency: int = Field(default=16, ge=1, description="Parallel generation requests to vLLM.")
    loglikelihood_concurrency: int = Field(
        default=4, ge=1, description="Parallel log-likelihood requests to vLLM (batched prompt log-probabilities).")
    loglikelihood_prefix_cache: bool = Field(
        default=True, description="Log-likelihood requests read vLLM's prefix cache for their context (the "
        "charforge_vllm plugin's prompt_cache): the choices of a multiple-choice document prefill their shared "
        "context once. False: every request prefills its whole prompt, as vLLM does for prompt log-probabilities.")
    score_models_together: bool = Field(
        default=True, description="The models one evaluation scores (candidate, champion, base) send their requests "
        "to vLLM at the same time, each its own lm-eval pass, so vLLM's batches mix them and the cores idle less. "
        "False: one model after the other.")
    reuse_scores: bool = Field(
        default=True, description="Reuse a model's scores from an earlier evaluation run with the same served "
        "artifact, probes, task folder, metric code, settings and versions (false: score everything again).")
    register_version: bool = Field(default=True, description="Register the evaluated adapter in the MLflow registry and "
                           "point the `candidate` alias at it.")
    parity: ParitySettings = Field(default_factory=ParitySettings)
    serving: ServingSettings = Field(default_factory=ServingSettings)

    @field_validator("tasks")
    @classmethod
    def known_tasks(cls, tasks: list[str]) -> list[str]:
        unknown = [t for t in tasks if t not in KNOWN_TASKS]
        if unknown:
            raise ValueError(f"unknown task {unknown[0]!r}; the character task folder has {', '.join(KNOWN_TASKS)}")
        return tasks

"""Prefect tasks of the evaluate flow: plan, serve, check parity, score each served model, report, register."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NONE

from charforge import registry
from charforge.checksums import sha256_file
from charforge.evaluation import parity as parity_check
from charforge.evaluation import report as evaluation_report
from charforge.evaluation import score_cache
from charforge.evaluation.harness import GENERATION_TASKS, score_served_model
from charforge.evaluation.lm_eval_tasks import build_judges
from charforge.evaluation.speed import decode_speed
from charforge.evaluation.plan import EvalPlan, plan_evaluation
from charforge.evaluation.report import score_table
from charforge.evaluation.score_cache import ScoreReuse
from charforge.results import Evaluation, ModelScores, Parity, RegisteredVersion
from charforge.schemas.evaluate import EvalConfig
from charforge.settings import repo_path
from charforge.vllm_server import VLLMServer, free_port, load_lora_adapter
from tasks.runtime import TRANSIENT_RETRIES, flow_run_tags

T = TypeVar("T")


@task(name="plan-evaluation", cache_policy=NONE, **TRANSIENT_RETRIES)
def plan(cfg: EvalConfig, adapter: str | None, base_only: bool, champion: str | None, served_base: str | None,
         score_base: bool) -> EvalPlan:
    """Resolve and verify the adapters (downloading registry versions once), the base, the served names."""
    return plan_evaluation(cfg, adapter, base_only, champion, served_base, score_base)


@task(name="find-reusable-scores", cache_policy=NONE, **TRANSIENT_RETRIES)
def find_reusable_scores(cfg: EvalConfig, plan: EvalPlan) -> ScoreReuse:
    """Each model's score key; the scores an earlier evaluation run already has under it (reused, not re-scored)."""
    found = score_cache.lookup(cfg, plan)
    logger = get_run_logger()
    for role, reused in found.reused.items():
        logger.info(f"{role}: scores reused from evaluation run {reused.run_id} (scored there as {reused.role}; "
                    f"same served artifact, probes, tasks, metric code, settings and versions)")
    for role in set(plan.targets) - set(found.reused):
        logger.info(f"{role}: no earlier scores under key {found.score_keys[role][:12]}; scoring it")
    return found


@task(name="find-reusable-checks", cache_policy=NONE, **TRANSIENT_RETRIES)
def reusable_checks(cfg: EvalConfig, plan: EvalPlan, found: ScoreReuse) -> score_cache.ReusedChecks | None:
    """With every score reused: the parity and serving figures of the run that scored the candidate, if usable."""
    earlier = score_cache.reusable_checks(cfg, plan, found)
    if earlier is not None:
        get_run_logger().info(f"every score is reused; train/serve parity and serving figures from evaluation run "
                              f"{earlier.run_id}: vLLM is not started")
    return earlier


@task(name="load-adapters", cache_policy=NONE)
def load_adapters(server: VLLMServer, adapters: dict[str, str]) -> None:
    """Hot-load the candidate (and champion) as their served names; vLLM refusing one is a refusal, not retried."""
    for name, folder in adapters.items():
        load_lora_adapter(server.url, name, Path(folder))


@contextmanager
def vllm_serving(cfg: EvalConfig, plan: EvalPlan, while_starting: Callable[[], T] | None = None,
                 ) -> Iterator[tuple[VLLMServer, float, T | None]]:
    """One vLLM server for the whole evaluation (base + runtime LoRA), stopped whatever happens; yields the server,
    its load time (process start to /health) and what `while_starting` returned: work that needs no server, run
    here while vLLM boots in its own processes (mostly single-threaded imports: a core is free)."""
    run_dir = Path(plan.run_dir)
    server = VLLMServer(Path(plan.served_dir), plan.base_name, free_port(), max_model_len=cfg.serving.max_model_len,
                        max_lora_rank=cfg.serving.max_lora_rank, kv_cache_gib=cfg.serving.kv_cache_gib,
                        omp_threads=cfg.serving.omp_threads, extra_args=["--block-size", str(cfg.serving.block_size)]
                        if cfg.serving.block_size else [])
    get_run_logger().info(f"starting vLLM for {plan.base_name} (log: {run_dir / 'vllm.log'})")
    started = time.monotonic()
    server.start(run_dir / "vllm.log")
    try:
        prepared = while_starting() if while_starting is not None else None
        server.wait_ready(cfg.serving.startup_timeout_s)
        load_s = time.monotonic() - started
        load_adapters(server, plan.adapters())
        yield server, load_s, prepared
    finally:
        server.stop()


@task(name="build-judges", cache_policy=NONE, persist_result=False)
def build_judges_if_needed(cfg: EvalConfig, plan: EvalPlan, scores: ScoreReuse) -> None:
    """Build the generation tasks' judges now (the evaluate flow calls this while vLLM starts, when a core is mostly
    free), unless no model will be scored on a generation task. In the flow's own thread: transformers' lazy imports
    are not safe to race."""
    if set(cfg.tasks) & set(GENERATION_TASKS) and not all(d in scores.reused for d in plan.targets):
        build_judges(str(repo_path(cfg.characters)), str(repo_path(cfg.probes)))


def prepare_while_vllm_starts(cfg: EvalConfig, plan: EvalPlan, scores: ScoreReuse,
                              ) -> parity_check.TrainedSide | None:
    """The work that needs no server, run while vLLM boots in its own processes: the judges, then the trained side
    of the parity check (for a candidate)."""
    build_judges_if_needed(cfg, plan, scores)
    return prepare_parity(cfg, plan) if plan.candidate_dir else None


@task(name="prepare-train-serve-parity", cache_policy=NONE, persist_result=False)
def prepare_parity(cfg: EvalConfig, plan: EvalPlan) -> parity_check.TrainedSide:
    """The HF + PEFT side of the parity check: the prompts rendered with the training template and the greedy
    tokens after each (no server needed, so it runs while vLLM starts)."""
    return parity_check.trained_side(adapter_dir=Path(plan.candidate_dir), base_dir=Path(plan.tokenizer_dir),
                                     conversations=parity_check.parity_conversations(cfg), tokens=cfg.parity.tokens)


@task(name="check-train-serve-parity", cache_policy=NONE)
def check_parity(cfg: EvalConfig, plan: EvalPlan, server: VLLMServer, trained: parity_check.TrainedSide) -> Parity:
    """HF + PEFT vs vLLM + adapter on the same prompts: prompt tokens must match (else `ParityError`), greedy
    tokens are compared. On a quantized base (`served_base`) the agreement is logged, not enforced: there it
    measures quantization drift, which the quantize flow judges with its own deltas."""
    result = parity_check.compare_with_served(trained, base_url=server.url, served_name=plan.targets["candidate"],
                                              tokens=cfg.parity.tokens)
    get_run_logger().info(f"train/serve parity: first token {result.first_token_agreement:.0%}, first "
                          f"{cfg.parity.tokens} tokens {result.prefix_agreement:.0%} of {result.prompts} prompts")
    return parity_check.judge_parity(cfg, result, enforce=plan.served_base is None)


@task(name="score-served-model", cache_policy=NONE)
def score(cfg: EvalConfig, server: VLLMServer, display: str, plan: EvalPlan) -> ModelScores:
    """All configured tasks for one served model through lm-eval; the summary with CIs."""
    get_run_logger().info(f"scoring {display} ({plan.targets[display]}) on {', '.join(cfg.tasks)}")
    return score_served_model(cfg, server.url, plan.targets[display], Path(plan.tokenizer_dir),
                              Path(plan.run_dir) / "lm_eval" / display, report=get_run_logger().info)


@task(name="measure-decode-speed", cache_policy=NONE)
def measure_decode_speed(server: VLLMServer, plan: EvalPlan, tokens: int) -> float:
    """Single-stream greedy decode tokens/s of the primary model (median of 2 after a warm-up)."""
    return decode_speed(server.url, plan.targets[plan.primary], tokens=tokens)


@task(name="report-evaluation", cache_policy=NONE, **TRANSIENT_RETRIES)
def report(cfg: EvalConfig, plan: EvalPlan, summaries: dict[str, ModelScores], parity: Parity | None,
           serving: dict[str, float], scores: ScoreReuse) -> Evaluation:
    """scores.json, report.md, chart PNG and sample rows on disk; the same in MLflow; a Prefect markdown artifact."""
    evaluation = evaluation_report.write_and_log(cfg, plan, summaries, parity, serving, scores, flow_run_tags())
    create_markdown_artifact(key="character-eval", markdown=Path(evaluation.report).read_text(),
                             description=f"Character evaluation of {plan.evaluated}")
    get_run_logger().info(f"evaluation written to {plan.run_dir}\n{score_table(summaries)}")
    return evaluation


@task(name="register-candidate", cache_policy=NONE, **TRANSIENT_RETRIES)
def register_candidate(cfg: EvalConfig, plan: EvalPlan, evaluation: Evaluation) -> Evaluation:
    """The evaluated adapter as a registry version (one per adapter sha) with its lineage and evaluation, and the
    `candidate` alias on it."""
    registered: RegisteredVersion = registry.register_candidate(
        Path(plan.candidate_dir), plan.lineage, evaluation.mlflow_run_id, sha256_file(repo_path(cfg.probes)),
        flow_run_tags())
    get_run_logger().info(f"registered {registered.name} version {registered.version} (alias {registry.CANDIDATE})")
    return evaluation.model_copy(update={"registered": registered})

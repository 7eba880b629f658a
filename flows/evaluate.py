"""Evaluation flow: serve the base (+ adapter) with vLLM, run the character task folder through lm-eval, and
hand back per-character scores with bootstrap CIs, tracked in one MLflow run.

Run it:  charforge evaluate --adapter <dir | models:/name/version> [--base-only] [--champion <ref>]

What is scored is what is served: lm-eval talks to the vLLM OpenAI server (`local-completions`), the candidate
and the champion as runtime-loaded LoRA adapters, the base model by its served name, all on the same probes. A
model an earlier evaluation already scored under the same inputs (see charforge/evaluation/score_cache.py) is not
scored again: its scores are reused, and the MLflow run says from where.
"""

from __future__ import annotations

from prefect import flow

from charforge.results import Evaluation
from charforge.schemas.evaluate import EvalConfig
from tasks.evaluate import (check_parity, find_reusable_scores, measure_decode_speed, plan, prepare_while_vllm_starts,
                            register_candidate, report, reusable_checks, score, vllm_serving)


@flow(name="evaluate")
def evaluate(config: EvalConfig, adapter: str | None = None, base_only: bool = False,
             champion: str | None = None, served_base: str | None = None, score_base: bool = True) -> Evaluation:
    """Score a candidate adapter against its base model (and the champion, if given), as vLLM serves them.

    `served_base`: a model folder (e.g. a quantized base, with a verified manifest) that vLLM serves in place of
    the bf16 base; adapters are hot-loaded on top of it. `score_base=False` skips scoring the base when an adapter
    is evaluated. Load time and single-stream decode speed of the primary model are measured either way. When every
    model's scores are reused and the candidate's come from a run that checked its parity, that run's parity and
    serving figures are reused too and no vLLM server starts."""
    evaluation_plan = plan(config, adapter, base_only, champion, served_base, score_base)
    scores = find_reusable_scores(config, evaluation_plan)
    earlier = reusable_checks(config, evaluation_plan, scores)
    if earlier is not None:  # every score, the parity check and the serving figures exist: vLLM is not started
        parity, serving = earlier.parity, earlier.serving
        summaries = {display: scores.reused[display].scores for display in evaluation_plan.targets}
    else:
        candidate = evaluation_plan.candidate_dir
        with vllm_serving(config, evaluation_plan, while_starting=lambda: prepare_while_vllm_starts(
                config, evaluation_plan, scores)) as (server, load_s, trained):
            parity = check_parity(config, evaluation_plan, server, trained) if candidate else None
            to_score = [display for display in evaluation_plan.targets if display not in scores.reused]
            if config.score_models_together and not evaluation_plan.adapter_on_lm_head():  # mixed in vLLM's batches
                futures = {display: score.submit(config, server, display, evaluation_plan) for display in to_score}
                scored = {display: future.result() for display, future in futures.items()}
            else:
                scored = {display: score(config, server, display, evaluation_plan) for display in to_score}
            summaries = {display: scores.reused[display].scores if display in scores.reused else scored[display]
                         for display in evaluation_plan.targets}
            speed = measure_decode_speed(server, evaluation_plan, config.serving.speed_tokens)
            serving = {"load_s": load_s, "tokens_per_s": speed}
    evaluation = report(config, evaluation_plan, summaries, parity, serving, scores)
    if evaluation_plan.candidate_dir and config.register_version:
        evaluation = register_candidate(config, evaluation_plan, evaluation)
    return evaluation

"""Running the character task folder through lm-eval against a served model, and reading its sample files back
into per-character scores with bootstrap confidence intervals."""

from __future__ import annotations

import json
import logging
import math
from functools import partial
from pathlib import Path

import numpy as np

from charforge.evaluation.metrics import bootstrap_ci
from charforge.evaluation.progress import Report
from charforge.results import MetricSummary
from charforge.schemas.evaluate import EvalConfig
from charforge.settings import CONFIGS_DIR, repo_path

TASK_DIR = CONFIGS_DIR / "lm_eval" / "character"
GROUP = "character"
# Log-likelihood tasks are sent one prompt at a time: vLLM's CPU LoRA path computes prompt logprobs with one
# adapter index per *sequence* and crashes on a batch of several (vllm-project/vllm#16668, #29955). A single
# sequence per step broadcasts its adapter over every prompt token, which is the right answer.
LOGLIKELIHOOD_TASKS = ["character_mc", "character_reply_likelihood", "character_reply_likelihood_nopersona"]
GENERATION_TASKS = ["character_generation", "character_boundaries"]
ALL_TASKS = LOGLIKELIHOOD_TASKS + GENERATION_TASKS
# Metrics whose per-sample value is not a plain number: how each is aggregated over a (re)sample of documents.
CORPUS_METRICS = {"char_id_macro_f1", "bits_per_byte"}
PERSONA_EFFECT = "persona_effect_bpb"


def served_model_args(completions_url: str, served_name: str, tokenizer_dir: Path, num_concurrent: int = 1,
                      max_retries: int = 3) -> dict:
    """lm-eval `local-completions` against vLLM: client-side chat template from `tokenizer_dir` (the served
    model's own folder), token ids sent to the server, log-likelihoods via echo + logprobs."""
    return {"base_url": completions_url, "model": served_name, "tokenizer_backend": "huggingface",
            "tokenizer": str(tokenizer_dir), "num_concurrent": num_concurrent, "max_retries": max_retries,
            "tokenized_requests": True}


def hf_model_args(base_dir: Path, adapter_dir: Path | None = None) -> dict:
    """lm-eval `hf`: transformers (+ PEFT adapter) in this process, for comparison with the served path."""
    args = {"pretrained": str(base_dir), "dtype": "bfloat16", "device": "cpu"}
    return {**args, "peft": str(adapter_dir)} if adapter_dir else args


def run_lm_eval(*, model_args: dict, tasks: list[str], output_dir: Path, model: str | object = "local-completions",
                limit: int | None = None, metadata: dict | None = None, batch_size: int = 1) -> dict:
    """Run character tasks with `--apply_chat_template` and `--log_samples`; lm-eval's own `results_*.json`
    and `samples_<task>_*.jsonl` land under `output_dir/<model name>/`. `model` is an lm-eval model name (built
    from `model_args`) or a model object. Returns lm-eval's results."""
    from lm_eval import simple_evaluate
    from lm_eval.loggers import EvaluationTracker
    from lm_eval.tasks import TaskManager

    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    # custom_dataset tasks warn on every load that kwargs may come from --metadata; ours come from the flow.
    logging.getLogger("lm_eval.api.task").setLevel(logging.ERROR)
    manager = TaskManager(include_path=str(TASK_DIR), include_defaults=False, metadata=metadata or {})
    tracker = EvaluationTracker(output_path=str(output_dir))
    results = simple_evaluate(
        model=model, model_args=model_args, tasks=tasks, task_manager=manager, limit=limit,
        batch_size=batch_size, log_samples=True, apply_chat_template=True, evaluation_tracker=tracker,
        random_seed=0, numpy_random_seed=0, torch_random_seed=0, fewshot_random_seed=0,
    )
    if results is None:
        raise RuntimeError("lm-eval returned no results")  # a bug in a task, not something a user fixes
    samples = results.pop("samples")
    tracker.save_results_aggregated(results=results, samples=samples)
    for task_name in results["configs"]:
        tracker.save_results_samples(task_name=task_name, samples=samples[task_name])
    return results


def read_samples(output_dir: Path) -> dict[str, list[dict]]:
    """The newest `samples_<task>_*.jsonl` per task under `output_dir`, as lists of per-document rows."""
    newest: dict[str, Path] = {}
    for path in sorted(Path(output_dir).rglob("samples_*.jsonl")):
        task = path.name[len("samples_"):].rsplit("_", 1)[0]
        newest[task] = path  # sorted by timestamp suffix: the last one wins
    return {task: [json.loads(line) for line in path.read_text().splitlines() if line]
            for task, path in newest.items()}


def _statistic(metric: str, values: list) -> float:
    if metric == "bits_per_byte":
        ll = sum(v[0] for v in values)
        n_bytes = sum(v[1] for v in values)
        return -ll / n_bytes / math.log(2)
    if metric == "char_id_macro_f1":
        from charforge.evaluation.lm_eval_tasks import macro_f1

        return macro_f1([tuple(v) for v in values])
    return float(np.mean(values))


def summarize_metric(metric: str, values: list, resamples: int, per_character: dict[str, float]) -> MetricSummary:
    """Point value and percentile-bootstrap CI over documents (corpus metrics recomputed per resample)."""
    point, low, high = bootstrap_ci(values, resamples=resamples, statistic=partial(_statistic, metric))
    return MetricSummary(value=point, ci_low=low, ci_high=high, n=len(values), per_character=per_character)


def metric_names(task_rows: list[dict]) -> list[str]:
    """The per-document metric keys lm-eval stored in a task's samples (everything that is not bookkeeping)."""
    bookkeeping = {"doc_id", "doc", "target", "arguments", "resps", "filtered_resps", "filter", "metrics",
                   "doc_hash", "prompt_hash", "target_hash"}
    return sorted(k for k in task_rows[0] if k not in bookkeeping) if task_rows else []


def persona_effect_values(samples: dict[str, list[dict]]) -> dict[str, tuple[str, float]]:
    """Per held-out reply: bits/byte without the persona prompt minus bits/byte with it (positive = the persona
    makes the gold reply more likely)."""
    with_p = {r["doc"]["id"]: r["bits_per_byte"] for r in samples.get("character_reply_likelihood", [])}
    without = {r["doc"]["id"]: r["bits_per_byte"] for r in samples.get("character_reply_likelihood_nopersona", [])}
    character = {r["doc"]["id"]: r["doc"]["character"] for r in samples.get("character_reply_likelihood", [])}
    return {k: (character[k], (with_p[k][0] - without[k][0]) / with_p[k][1] / math.log(2))
            for k in sorted(with_p.keys() & without.keys())}


def summarize(samples: dict[str, list[dict]], resamples: int = 1000) -> dict[str, dict[str, MetricSummary]]:
    """{task: {metric: summary with CI and per-character values}} from the sample files."""
    summary: dict[str, dict[str, MetricSummary]] = {}
    for task, rows in sorted(samples.items()):
        summary[task] = {}
        for metric in metric_names(rows):
            by_character: dict[str, list] = {}
            for r in rows:
                by_character.setdefault(r["doc"]["character"], []).append(r[metric])
            summary[task][metric] = summarize_metric(
                metric, [r[metric] for r in rows], resamples,
                {c: _statistic(metric, v) for c, v in sorted(by_character.items())})
    effect = persona_effect_values(samples)
    if effect:
        by_character = {}
        for character, value in effect.values():
            by_character.setdefault(character, []).append(value)
        summary["character_reply_likelihood"][PERSONA_EFFECT] = summarize_metric(
            PERSONA_EFFECT, [value for _, value in effect.values()], resamples,
            {c: float(np.mean(v)) for c, v in sorted(by_character.items())})
    return summary


def per_probe_scores(samples: dict[str, list[dict]]) -> dict[str, dict[str, float]]:
    """`{"<task>/<metric>": {probe_id: value}}` for every metric with one number per probe: what the promotion
    gate pairs across models. Bits/byte is per reply here (the summary's is over the corpus)."""
    scores: dict[str, dict[str, float]] = {}
    for task, rows in samples.items():
        for metric in metric_names(rows):
            for r in rows:
                value = r[metric]
                if metric == "bits_per_byte":
                    value = -value[0] / value[1] / math.log(2)
                elif not isinstance(value, (int, float)):
                    continue
                scores.setdefault(f"{task}/{metric}", {})[r["doc"]["id"]] = float(value)
    for probe, (_, value) in persona_effect_values(samples).items():
        scores.setdefault(f"character_reply_likelihood/{PERSONA_EFFECT}", {})[probe] = value
    return scores


def summary_metrics(summary: dict[str, dict[str, MetricSummary]]) -> dict[str, float]:
    """MLflow metric names: `eval/<task>/<metric>`, its CI bounds, and `eval/<task>/<metric>/<character>`."""
    flat = {}
    for task, metrics in summary.items():
        for metric, entry in metrics.items():
            key = f"eval/{task}/{metric}"
            flat[key] = entry.value
            flat[f"{key}/ci_low"] = entry.ci_low
            flat[f"{key}/ci_high"] = entry.ci_high
            for character, value in entry.per_character.items():
                flat[f"{key}/{character}"] = value
    return flat


def score_served_model(cfg: EvalConfig, base_url: str, served_name: str, tokenizer_dir: Path, out_dir: Path,
                       report: Report | None = None) -> dict[str, dict[str, MetricSummary]]:
    """All configured tasks for one served model: lm-eval's files under `out_dir`, `summary.json` and
    `per_probe.json` beside them; returns the summary. Progress (requests done, rate, ETA) goes to `report`."""
    from charforge.evaluation.progress import served_completions

    metadata = {"probes": str(repo_path(cfg.probes)), "characters": str(repo_path(cfg.characters)),
                "only_characters": ",".join(cfg.probe_characters or ())}
    url = f"{base_url}/v1/completions"
    report = report or logging.getLogger(__name__).info
    passes = [(cfg.loglikelihood_concurrency, [t for t in cfg.tasks if t in LOGLIKELIHOOD_TASKS]),
              (cfg.generation_concurrency, [t for t in cfg.tasks if t not in LOGLIKELIHOOD_TASKS])]
    if passes[0][0] == passes[1][0]:  # one lm-eval pass: its set-up is paid once
        passes = [(cfg.generation_concurrency, list(cfg.tasks))]
    for concurrency, tasks in passes:
        if tasks:
            args = served_model_args(url, served_name, tokenizer_dir, concurrency)
            run_lm_eval(model=served_completions(args, report, served_name, cfg.loglikelihood_prefix_cache),
                        model_args=args, tasks=tasks,
                        output_dir=out_dir, limit=cfg.limit, metadata=metadata)
    samples = read_samples(out_dir)
    summary = summarize(samples, cfg.bootstrap_resamples)
    (out_dir / "summary.json").write_text(json.dumps(
        {t: {m: e.model_dump() for m, e in metrics.items()} for t, metrics in summary.items()}, indent=2))
    (out_dir / "per_probe.json").write_text(json.dumps(per_probe_scores(samples), indent=1))
    return summary

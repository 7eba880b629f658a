"""Evaluation flow: serve the base (+ adapter) with vLLM, run the character task folder through lm-eval, and
hand back per-character scores with bootstrap CIs, tracked in one MLflow run.

Run it:  charforge evaluate --adapter <dir | models:/name/version> [--base-only] [--champion <ref>]

What is scored is what is served: lm-eval talks to the vLLM OpenAI server (`local-completions`), the candidate
and the champion as runtime-loaded LoRA adapters, the base model by its served name, all on the same probes.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import mlflow
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NONE

from charforge.base_models import load_preset, materialize
from charforge.checksums import MANIFEST, folder_sha, sha256_file, verify_manifest
from charforge.config import ConfigError
from charforge.evaluation.lm_eval_tasks import read_probes
from charforge.schemas.evaluate import EvalConfig
from charforge.settings import platform, repo_path
from charforge.tracking import flow_run_tags, use_experiment
from charforge.vllm_server import VLLMServer, free_port
from charforge import registry
from charforge.evaluation.report import per_character_chart, score_table
from charforge.evaluation.harness import (
    LOGLIKELIHOOD_TASKS,
    flat_metrics,
    per_probe_scores,
    read_samples,
    run_lm_eval,
    served_model_args,
    summarize,
)
from charforge.evaluation.parity import check_parity
from charforge.quantization import decode_speed

# Single-stream decode speed of the evaluated model, measured once per evaluation (median of 3 after a warm-up).
DECODE_TOKENS, DECODE_REPEATS = 64, 3
DECODE_PROMPT = ("<|im_start|>system\nYou are Sherlock Holmes.<|im_end|>\n<|im_start|>user\nHow did you know I "
                 "was a doctor?<|im_end|>\n<|im_start|>assistant\n")


def resolve_adapter(ref: str, downloads: Path) -> Path:
    """A local adapter folder, or an MLflow model URI downloaded once; either way its sha256 manifest must verify."""
    return registry.fetch_verified(ref, downloads, "adapter")


def load_lora(server: VLLMServer, name: str, path: Path) -> None:
    response = httpx.post(f"{server.url}/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(path)},
                          timeout=120)
    if response.status_code != 200:
        raise RuntimeError(f"vLLM refused adapter {path} as {name!r} ({response.status_code}): {response.text}")


@task(name="check-train-serve-parity", cache_policy=NONE)
def parity(cfg: EvalConfig, adapter_dir: Path, base_dir: Path, server: VLLMServer, served_name: str,
           enforce: bool = True) -> dict:
    """HF + PEFT vs vLLM + adapter on the same prompts: prompt tokens must match, greedy tokens are compared.
    With `enforce=False` (a quantized base is served) the agreement is logged but never fails the run: there it
    measures quantization drift, which the quantize flow judges with its own deltas."""
    probes = read_probes(repo_path(cfg.probes))
    step = max(1, len(probes) // cfg.parity.prompts)
    conversations = [[{"role": "system", "content": p["system_prompt"]}, *p["history"],
                      {"role": "user", "content": p["user_msg"]}] for p in probes[::step][:cfg.parity.prompts]]
    result = check_parity(adapter_dir=adapter_dir, base_dir=base_dir, base_url=server.url, served_name=served_name,
                          conversations=conversations, tokens=cfg.parity.tokens)
    get_run_logger().info(f"train/serve parity: first token {result['first_token_agreement']:.0%}, first "
                          f"{cfg.parity.tokens} tokens {result['prefix_agreement']:.0%} of {result['prompts']} prompts")
    if enforce and result["first_token_agreement"] < cfg.parity.min_first_token_agreement:
        raise RuntimeError(
            f"train/serve parity: HF+PEFT and vLLM agree on the first greedy token for only "
            f"{result['first_token_agreement']:.0%} of prompts (< {cfg.parity.min_first_token_agreement:.0%}); "
            f"the served adapter does not behave like the trained one. Examples: {result['examples']}")
    return result


@task(name="score-served-model", cache_policy=NONE)
def score(cfg: EvalConfig, server: VLLMServer, served_name: str, tokenizer_dir: Path, out_dir: Path) -> dict:
    """All configured tasks for one served model; returns the summary with CIs."""
    metadata = {"probes": str(repo_path(cfg.probes)), "characters": str(repo_path(cfg.characters))}
    url = f"{server.url}/v1/completions"
    common = dict(output_dir=out_dir, limit=cfg.limit, metadata=metadata)
    loglikelihood = [t for t in cfg.tasks if t in LOGLIKELIHOOD_TASKS]
    generation = [t for t in cfg.tasks if t not in LOGLIKELIHOOD_TASKS]
    if loglikelihood:  # one prompt at a time: see LOGLIKELIHOOD_TASKS
        run_lm_eval(model_args=served_model_args(url, served_name, tokenizer_dir), tasks=loglikelihood, **common)
    if generation:
        run_lm_eval(model_args=served_model_args(url, served_name, tokenizer_dir, cfg.generation_concurrency),
                    tasks=generation, **common)
    samples = read_samples(out_dir)
    summary = summarize(samples, cfg.bootstrap_resamples)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    (out_dir / "per_probe.json").write_text(json.dumps(per_probe_scores(samples), indent=1))
    return summary


def sample_rows(target: str, out_dir: Path) -> list[dict]:
    """One flat row per (task, document) for the MLflow samples table."""
    rows = []
    for task_name, samples in read_samples(out_dir).items():
        for s in samples:
            doc = s["doc"]
            response = s["filtered_resps"][0] if s.get("filtered_resps") else ""
            rows.append({
                "model": target, "task": task_name, "probe": doc["id"], "character": doc["character"],
                "probe_type": doc["probe_type"], "user_msg": doc["user_msg"],
                "response": response if isinstance(response, str) else "",
                "reference": doc["reference"],
                **{k: float(v) for k, v in s.items() if isinstance(v, (int, float)) and k != "doc_id"},
            })
    return rows


@task(name="report-evaluation", cache_policy=NONE, retries=2, retry_delay_seconds=5)
def report(cfg: EvalConfig, run_dir: Path, summaries: dict, parity_result: dict | None, params: dict,
           tags: dict, serving_metrics: dict | None = None) -> dict:
    """scores.json, report.md, chart PNG and sample rows on disk; the same in MLflow; a Prefect markdown artifact."""
    import pandas as pd

    table = score_table(summaries)
    parity_line = ("" if parity_result is None else
                   f"\nTrain/serve parity: first token {parity_result['first_token_agreement']:.0%}, first "
                   f"{parity_result['tokens']} tokens {parity_result['prefix_agreement']:.0%} of "
                   f"{parity_result['prompts']} prompts (template: {parity_result['template_source']}).\n")
    markdown = f"# Character evaluation: {params['evaluated']}\n\n{table}{parity_line}"
    (run_dir / "report.md").write_text(markdown)
    (run_dir / "scores.json").write_text(json.dumps({"summaries": summaries, "parity": parity_result,
                                                     **params}, indent=2))
    per_probe = {target: json.loads((run_dir / "lm_eval" / target / "per_probe.json").read_text())
                 for target in summaries}
    (run_dir / "per_probe.json").write_text(json.dumps(per_probe, indent=1))
    chart = per_character_chart(summaries, run_dir / "per_character.png")
    rows = [r for target in summaries for r in sample_rows(target, run_dir / "lm_eval" / target)]

    use_experiment("evaluate")
    with mlflow.start_run(run_name=f"{cfg.name}-{params['evaluated_short']}") as run:
        mlflow.set_tags({"stage": "evaluate", **tags, **flow_run_tags()})
        mlflow.log_params(params)
        for target, summary in summaries.items():
            prefix = "" if target == params["primary"] else f"{target}/"
            mlflow.log_metrics({prefix + k: v for k, v in flat_metrics(summary).items()})
        if parity_result:
            mlflow.log_metrics({"parity/first_token_agreement": parity_result["first_token_agreement"],
                                "parity/prefix_agreement": parity_result["prefix_agreement"]})
        if serving_metrics:
            mlflow.log_metrics({f"serving/{k}": v for k, v in serving_metrics.items()})
        mlflow.log_table(pd.DataFrame(rows), artifact_file="eval_samples.json")
        for name in ("report.md", "scores.json", "per_probe.json"):
            mlflow.log_artifact(str(run_dir / name))
        mlflow.log_artifact(str(chart))
        mlflow.log_artifacts(str(run_dir / "lm_eval"), "lm_eval")
    create_markdown_artifact(key="character-eval", markdown=markdown,
                             description=f"Character evaluation of {params['evaluated']}")
    return {"mlflow_run_id": run.info.run_id, "report": str(run_dir / "report.md"), "chart": str(chart)}


@task(name="register-candidate", cache_policy=NONE, retries=2, retry_delay_seconds=5)
def register_candidate(adapter_dir: Path, lineage: dict, eval_run_id: str, probes_sha: str) -> dict:
    """The evaluated adapter as a registry version (one per adapter sha) with its lineage and evaluation, and the
    `candidate` alias on it. The version's files are the training run's adapter artifact when that run is in this
    tracking store, else a copy logged to the evaluation run."""
    c = registry.client()
    name = registry.registered_name(lineage.get("train_config", "adapter"))
    sha = folder_sha(adapter_dir)
    try:
        source_run = c.get_run(lineage.get("mlflow_run_id", ""))
        if not any(a.path == "adapter" for a in c.list_artifacts(source_run.info.run_id)):
            raise ValueError("training run has no adapter artifact")
    except Exception:  # not tracked here (e.g. an adapter trained elsewhere): keep a copy with the evaluation
        with mlflow.start_run(run_id=eval_run_id):
            mlflow.log_artifacts(str(adapter_dir), "adapter")
        source_run = c.get_run(eval_run_id)
    flow_tags = flow_run_tags()
    version = registry.register_adapter(c, name, f"{source_run.info.artifact_uri}/adapter", source_run.info.run_id,
                                        sha, {
        "base_model": lineage.get("base_model", "unknown"), "base_model_sha": lineage.get("base_model_sha", "unknown"),
        "dataset_hash": lineage.get("dataset_hash", "unknown"), "train_config": lineage.get("train_config", "unknown"),
        "train_run_id": lineage.get("mlflow_run_id", "none"), "eval_run_id": eval_run_id, "eval_status": "passed",
        "eval_probes_sha256": probes_sha, "quantized_base": lineage.get("quantized_base", "none"),
        "prefect_flow_run_url": flow_tags.get("prefect_flow_run_url", flow_tags.get("prefect_flow_run_id", "none")),
    })
    c.set_registered_model_alias(name, registry.CANDIDATE, version.version)
    get_run_logger().info(f"registered {name} version {version.version} (alias {registry.CANDIDATE})")
    return {"name": name, "version": version.version, "uri": f"models:/{name}/{version.version}"}


@flow(name="evaluate")
def evaluate(config: EvalConfig, adapter: str | None = None, base_only: bool = False,
             champion: str | None = None, served_base: str | None = None, score_base: bool = True) -> dict:
    """Score a candidate adapter against its base model (and the champion, if given), as vLLM serves them.

    `served_base`: a model folder (e.g. a quantized base, with a verified manifest) that vLLM serves in place of
    the bf16 base; adapters are hot-loaded on top of it. `score_base=False` skips scoring the base when an adapter
    is evaluated. Load time and single-stream decode speed of the primary model are measured either way."""
    cfg, logger = config, get_run_logger()
    if adapter is None and not base_only:
        raise ConfigError("nothing to evaluate: pass --adapter <dir | models:/name/version>, or --base-only")
    state = platform().state
    downloads = state / "evals" / "downloads"
    candidate_dir = None if base_only else resolve_adapter(adapter, downloads)
    champion_dir = resolve_adapter(champion, downloads) if champion and not base_only else None
    if candidate_dir is not None:
        lineage = json.loads((candidate_dir / MANIFEST).read_text())["lineage"]  # verified by resolve_adapter
        base_dir, base_name = Path(lineage["base_model_path"]), lineage["base_model"]
        if not base_dir.is_dir():
            base_dir, _ = materialize(load_preset(base_name))
    else:
        lineage = {}
        base_name = cfg.base_model
        base_dir, _ = materialize(load_preset(base_name))

    tokenizer_dir = base_dir  # the bf16 base: parity's HF side and client-side templating
    if served_base is not None:
        base_dir = repo_path(served_base)
        verify_manifest(base_dir, "re-create it with `charforge quantize`")

    targets: dict[str, str] = {}  # display name -> served model name
    if candidate_dir is not None:
        candidate_sha = folder_sha(candidate_dir)
        targets["candidate"] = f"candidate-{candidate_sha[:12]}"
    if score_base or candidate_dir is None:
        targets["base"] = base_name
    if champion_dir is not None:
        targets["champion"] = f"champion-{folder_sha(champion_dir)[:12]}"

    evaluated = adapter if candidate_dir is not None else f"{base_name} (base only)"
    short = targets.get("candidate", "base")
    run_dir = state / "evals" / f"{cfg.name}-{short}-{time.strftime('%Y%m%dT%H%M%S')}"
    run_dir.mkdir(parents=True, exist_ok=True)
    server = VLLMServer(base_dir, base_name, free_port(), max_model_len=cfg.serving.max_model_len,
                        max_lora_rank=cfg.serving.max_lora_rank, kv_cache_gib=cfg.serving.kv_cache_gib,
                        omp_threads=2)
    logger.info(f"starting vLLM for {base_name} (log: {run_dir / 'vllm.log'})")
    started = time.monotonic()
    server.start(run_dir / "vllm.log")
    try:
        server.wait_ready(cfg.serving.startup_timeout_s)
        serving_metrics = {"load_s": time.monotonic() - started}
        if candidate_dir is not None:
            load_lora(server, targets["candidate"], candidate_dir)
        if champion_dir is not None:
            load_lora(server, targets["champion"], champion_dir)
        parity_result = (parity(cfg, candidate_dir, tokenizer_dir, server, targets["candidate"],
                                enforce=served_base is None) if candidate_dir is not None else None)
        summaries = {}
        for display, served in targets.items():
            logger.info(f"scoring {display} ({served}) on {', '.join(cfg.tasks)}")
            summaries[display] = score(cfg, server, served, tokenizer_dir, run_dir / "lm_eval" / display)
        primary_served = targets["candidate" if candidate_dir is not None else "base"]
        serving_metrics["tokens_per_s"] = decode_speed(server.url, primary_served, DECODE_TOKENS, DECODE_REPEATS,
                                                       DECODE_PROMPT)
    finally:
        server.stop()

    primary = "candidate" if candidate_dir is not None else "base"
    params = {"evaluated": evaluated, "evaluated_short": short, "primary": primary, "base_model": base_name,
              "probes": str(cfg.probes), "probes_sha256": sha256_file(repo_path(cfg.probes)),
              "limit": cfg.limit or "all", "tasks": ",".join(cfg.tasks),
              "bootstrap_resamples": cfg.bootstrap_resamples, "targets": ",".join(targets),
              "served_base": str(served_base) if served_base else "bf16"}
    tags = {"adapter_sha256": folder_sha(candidate_dir) if candidate_dir is not None else "none",
            "train_mlflow_run_id": lineage.get("mlflow_run_id", "none"),
            "dataset_hash": lineage.get("dataset_hash", "none"),
            "champion": champion or "none",
            "champion_adapter_sha256": folder_sha(champion_dir) if champion_dir is not None else "none",
            "served_base_sha256": folder_sha(base_dir) if served_base else "bf16"}
    result = report(cfg, run_dir, summaries, parity_result, params, tags, serving_metrics)
    if candidate_dir is not None and cfg.register_version:
        result["registered"] = register_candidate(candidate_dir, lineage, result["mlflow_run_id"], params["probes_sha256"])
    logger.info(f"evaluation written to {run_dir}\n{score_table(summaries)}")
    return {**result, "run_dir": str(run_dir), "summaries": summaries, "parity": parity_result,
            "targets": targets, "primary": primary, "serving": serving_metrics}


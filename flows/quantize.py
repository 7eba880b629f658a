"""Quantization flow: a quantized checkpoint vLLM serves (the base for multi-LoRA serving, or the adapter merged into
the base), re-evaluated through the evaluation flow, its deltas against bf16 tracked and registered.

Run it:  charforge quantize --config configs/quantize/<name>.yaml [--adapter <dir | models:/name/version>]

Modes: `multi_lora` quantizes the base and evaluates the adapter hot-loaded on it (vLLM --enable-lora);
`merged` merges the adapter into the base, quantizes that, and evaluates it as a model of its own. The bf16
reference (the same adapter on the bf16 base, same evaluation config) comes from an earlier evaluation run with
the same inputs when there is one, else it is evaluated here.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import asdict
from pathlib import Path

import mlflow
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NONE

from charforge.base_models import load_preset, materialize
from charforge.checksums import MANIFEST, folder_sha, sha256_file, verify_manifest
from charforge.config import load_yaml_model
from charforge.promotion import quantization_checks
from charforge.schemas.evaluate import EvalConfig
from charforge.schemas.promote import PromotionPolicy
from charforge.schemas.quantize import QuantizeConfig
from charforge.settings import platform, repo_path
from charforge.tracking import flow_run_tags, use_experiment
from flows.evaluate import evaluate, resolve_adapter
from charforge import registry
from charforge.evaluation.harness import flat_metrics
from charforge.quantization import (checkpoint_bytes, merge_adapter, metric_deltas, quantize_checkpoint,
                                require_adapter, sample_calibration, tool_versions)


# The config fields that change the checkpoint (evaluation, policy and registry settings do not).
CHECKPOINT_FIELDS = {"mode", "base_model", "tool", "scheme", "bits", "group_size", "sym", "iters", "optimized_rtn",
                     "algorithm", "export_format", "ignore", "calibration"}


def artifact_identity(cfg: QuantizeConfig, base_sha: str, adapter_sha: str | None, calibration_sha: str) -> str:
    """What determines the checkpoint: the quantization settings (not the evaluation), the inputs, the tool."""
    import hashlib

    settings = cfg.model_dump(mode="json", include=CHECKPOINT_FIELDS)
    key = {"settings": settings, "base": base_sha, "adapter": adapter_sha if cfg.mode == "merged" else None,
           "calibration": calibration_sha, "tools": tool_versions(cfg.tool)}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


@task(name="build-quantized-checkpoint", cache_policy=NONE)
def build_checkpoint(cfg: QuantizeConfig, base_dir: Path, adapter_dir: Path | None) -> Path:
    """Calibration sample → (merge) → quantize, into `<state>/quantized/<name>-<identity12>/`; an existing folder
    whose manifest verifies is reused."""
    from transformers import AutoTokenizer

    logger = get_run_logger()
    texts, calibration_sha = sample_calibration(repo_path(cfg.calibration.dataset_dir), cfg.calibration.samples,
                                                cfg.calibration.seed, AutoTokenizer.from_pretrained(base_dir))
    adapter_sha = folder_sha(adapter_dir) if adapter_dir is not None else None
    identity = artifact_identity(cfg, folder_sha(base_dir), adapter_sha, calibration_sha)
    out_dir = platform().state / "quantized" / f"{cfg.name}-{identity[:12]}"
    if (out_dir / MANIFEST).is_file():
        verify_manifest(out_dir, f"delete {out_dir} and re-run")
        logger.info(f"reusing {out_dir} (same settings, inputs and tool versions)")
        return out_dir
    lineage = {"name": cfg.name, "mode": cfg.mode, "tool": cfg.tool, "scheme": cfg.scheme, "bits": cfg.bits,
               "group_size": cfg.group_size, "sym": cfg.sym, "iters": cfg.iters, "export_format": cfg.export_format,
               "base_model": cfg.base_model, "base_model_sha": folder_sha(base_dir),
               "adapter_sha256": adapter_sha if cfg.mode == "merged" else None,
               "calibration_sha256": calibration_sha, "calibration_samples": len(texts),
               "tool_versions": tool_versions(cfg.tool), "identity": identity}
    logger.info(f"quantizing {cfg.base_model} ({cfg.mode}) with {cfg.tool} {cfg.scheme} on {len(texts)} "
                f"calibration conversations")
    with tempfile.TemporaryDirectory(dir=platform().state) as tmp:
        source = merge_adapter(adapter_dir, base_dir, Path(tmp) / "merged") if cfg.mode == "merged" else base_dir
        quantize_checkpoint(source, out_dir, cfg, texts, lineage)
    return out_dir


def find_reference_run(adapter_sha: str, eval_cfg: EvalConfig) -> str | None:
    """An earlier bf16 evaluation of the same adapter (or base) with the same probes, tasks and limit that
    measured serving speed; None when there is none."""
    use_experiment("evaluate")
    runs = mlflow.search_runs(experiment_names=[f"{platform().mlflow.experiment_prefix}-evaluate"],
                              filter_string=f"tags.adapter_sha256 = '{adapter_sha}' and params.served_base = 'bf16' "
                                            f"and attributes.status = 'FINISHED'", output_format="list")
    want = {"probes_sha256": sha256_file(repo_path(eval_cfg.probes)), "limit": str(eval_cfg.limit or "all"),
            "tasks": ",".join(eval_cfg.tasks)}
    for run in runs:
        if all(run.data.params.get(k) == v for k, v in want.items()) and "serving/tokens_per_s" in run.data.metrics:
            return run.info.run_id
    return None


def run_summary(run_id: str, primary: str) -> dict:
    """Per-probe scores, flat metrics and serving numbers of one evaluation run."""
    c = registry.client()
    run = c.get_run(run_id)
    with tempfile.TemporaryDirectory() as tmp:
        per_probe = json.loads(Path(c.download_artifacts(run_id, "per_probe.json", tmp)).read_text())[primary]
    metrics = {k: v for k, v in run.data.metrics.items() if k.startswith("eval/") and k.count("/") == 2}
    return {"run_id": run_id, "per_probe": per_probe, "metrics": metrics,
            "load_s": run.data.metrics["serving/load_s"], "tokens_per_s": run.data.metrics["serving/tokens_per_s"]}


def evaluated(result: dict) -> dict:
    """The same shape as `run_summary`, from an evaluate flow result."""
    primary = result["primary"]
    per_probe = json.loads((Path(result["run_dir"]) / "per_probe.json").read_text())[primary]
    metrics = {k: v for k, v in flat_metrics(result["summaries"][primary]).items() if k.count("/") == 2}
    return {"run_id": result["mlflow_run_id"], "per_probe": per_probe, "metrics": metrics, **result["serving"]}


def comparison_table(rows: dict[str, dict]) -> str:
    """Markdown: one row per artifact (bf16 first), size / load / tokens/s and every eval metric."""
    metrics = sorted({k for r in rows.values() for k in r["metrics"]})
    head = ["artifact", "size MB", "load s", "tokens/s", *[m.removeprefix("eval/") for m in metrics]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, r in rows.items():
        values = [f"{r['size_bytes'] / 1e6:.0f}", f"{r['load_s']:.0f}", f"{r['tokens_per_s']:.1f}",
                  *[f"{r['metrics'][m]:.3f}" if m in r["metrics"] else "-" for m in metrics]]
        lines.append("| " + " | ".join([label, *values]) + " |")
    return "\n".join(lines) + "\n"


@task(name="record-quantization", cache_policy=NONE, retries=2, retry_delay_seconds=5)
def record(cfg: QuantizeConfig, out_dir: Path, reference: dict, quantized: dict) -> dict:
    """One MLflow run in `charforge-quantize`: settings, lineage, size/load/speed/metric deltas vs bf16, the
    per-probe scores of both (what the promotion policy reads) and the checkpoint itself."""
    lineage = json.loads((out_dir / MANIFEST).read_text())["lineage"]
    deltas = metric_deltas(reference["metrics"], quantized["metrics"])
    table = comparison_table({"bf16": reference, f"{cfg.name} ({cfg.scheme})": quantized})
    use_experiment("quantize")
    with mlflow.start_run(run_name=f"{cfg.name}-{lineage['identity'][:12]}") as run:
        mlflow.set_tags({"stage": "quantize", "artifact_sha256": folder_sha(out_dir),
                         "reference_eval_run_id": reference["run_id"], "quantized_eval_run_id": quantized["run_id"],
                         **flow_run_tags()})
        mlflow.log_params({k: v for k, v in lineage.items() if k != "tool_versions"}
                          | {f"version_{k}": v for k, v in lineage["tool_versions"].items()})
        mlflow.log_metrics({
            "size_mb": quantized["size_bytes"] / 1e6, "bf16/size_mb": reference["size_bytes"] / 1e6,
            "size_ratio": quantized["size_bytes"] / reference["size_bytes"],
            "load_s": quantized["load_s"], "bf16/load_s": reference["load_s"],
            "tokens_per_s": quantized["tokens_per_s"], "bf16/tokens_per_s": reference["tokens_per_s"],
            "delta/tokens_per_s": quantized["tokens_per_s"] - reference["tokens_per_s"],
            **quantized["metrics"], **{f"bf16/{k}": v for k, v in reference["metrics"].items()},
            **{f"delta/{k}": v for k, v in deltas.items()}})
        mlflow.log_dict({"quantized": quantized["per_probe"], "bf16": reference["per_probe"]}, "per_probe.json")
        mlflow.log_text(table, "comparison.md")
        mlflow.log_artifacts(str(out_dir), "model")
    create_markdown_artifact(key="quantization", markdown=f"# Quantization: {cfg.name}\n\n{table}",
                             description=f"{cfg.name} vs bf16")
    return {"mlflow_run_id": run.info.run_id, "artifact_uri": f"{run.info.artifact_uri}/model", "table": table,
            "deltas": deltas}


def judge(run_id: str, policy_path: Path) -> dict:
    """The policy's quantized_vs_bf16 rules on a quantize run's per-probe scores (the same checks `charforge
    promote` applies to an adapter version evaluated on this base), recorded on the run."""
    c = registry.client()
    policy = load_yaml_model(repo_path(policy_path), PromotionPolicy)
    with tempfile.TemporaryDirectory() as tmp:
        scores = json.loads(Path(c.download_artifacts(run_id, "per_probe.json", tmp)).read_text())
    checks = quantization_checks((scores["quantized"], scores["bf16"]), policy)
    verdict = "refuse" if any(not ch.passed for ch in checks) else "pass"
    c.set_tag(run_id, "quantization_gate", verdict)
    c.log_dict(run_id, {"verdict": verdict, "checks": [asdict(ch) for ch in checks]}, "quantization_gate.json")
    return {"verdict": verdict, "checks": [ch.detail for ch in checks]}


judge_quantization = task(name="judge-quantization", cache_policy=NONE, retries=2, retry_delay_seconds=5)(judge)


@task(name="register-quantized", cache_policy=NONE, retries=2, retry_delay_seconds=5)
def register_quantized(cfg: QuantizeConfig, out_dir: Path, recorded: dict, adapter_dir: Path | None) -> dict:
    """The quantized checkpoint as its own registry version (tags: scheme, tool versions, calibration hash, the
    bf16 base), referenced from the registry version of the adapter that was evaluated on it."""
    c = registry.client()
    lineage = json.loads((out_dir / MANIFEST).read_text())["lineage"]
    name = registry.registered_name(f"{cfg.base_model}-{cfg.name}")
    tags = {"scheme": cfg.scheme, "tool": cfg.tool, "mode": cfg.mode, "export_format": cfg.export_format,
            "bits": cfg.bits or "scheme", "group_size": cfg.group_size or "scheme", "iters": cfg.iters,
            "calibration_sha256": lineage["calibration_sha256"], "base_model": cfg.base_model,
            "base_model_sha": lineage["base_model_sha"], "merged_adapter_sha256": lineage["adapter_sha256"] or "none",
            "quantize_run_id": recorded["mlflow_run_id"],
            **{f"version_{k}": v for k, v in lineage["tool_versions"].items()}}
    version = registry.register_adapter(c, name, recorded["artifact_uri"], recorded["mlflow_run_id"],
                                        folder_sha(out_dir), tags, key="artifact_sha256",
                                        description=f"quantized {cfg.base_model} ({cfg.mode}) for vLLM")
    uri = f"models:/{name}/{version.version}"
    referenced = None
    if adapter_dir is not None:
        manifest = json.loads((adapter_dir / MANIFEST).read_text())
        family = registry.registered_name(manifest["lineage"].get("train_config", "adapter"))
        adapter_version = registry.find_version_by_sha(c, family, folder_sha(adapter_dir))
        if adapter_version is not None:
            for key, value in {"quantized_base": uri, "quantize_run_id": recorded["mlflow_run_id"]}.items():
                c.set_model_version_tag(family, adapter_version.version, key, value)
            referenced = f"models:/{family}/{adapter_version.version}"
    get_run_logger().info(f"registered {uri}" + (f"; referenced from {referenced}" if referenced else
                                                 " (the adapter has no registry version to reference it from)"))
    return {"uri": uri, "adapter_version": referenced}


@flow(name="quantize")
def quantize(config: QuantizeConfig) -> dict:
    """Quantize, re-evaluate against bf16 through the evaluation flow, record the deltas, register."""
    cfg, logger = config, get_run_logger()
    require_adapter(cfg)
    base_dir, _ = materialize(load_preset(cfg.base_model))
    adapter_dir = resolve_adapter(cfg.adapter, platform().state / "evals" / "downloads") if cfg.adapter else None
    eval_cfg = load_yaml_model(repo_path(cfg.eval_config), EvalConfig).model_copy(update={"register_version": False})
    out_dir = build_checkpoint(cfg, base_dir, adapter_dir)

    adapter_ref = str(adapter_dir) if adapter_dir is not None else None
    reference_run = find_reference_run(folder_sha(adapter_dir) if adapter_dir else "none", eval_cfg)
    if reference_run:
        logger.info(f"bf16 reference: evaluation run {reference_run} (same adapter, probes, tasks and limit)")
        reference = run_summary(reference_run, "candidate" if adapter_dir is not None else "base")
    else:
        reference = evaluated(evaluate(config=eval_cfg, adapter=adapter_ref, base_only=adapter_dir is None,
                                       score_base=False))
    reference["size_bytes"] = checkpoint_bytes(base_dir)
    on_base = cfg.mode == "multi_lora" and adapter_dir is not None
    quantized = evaluated(evaluate(config=eval_cfg, adapter=adapter_ref if on_base else None,
                                   base_only=not on_base, served_base=str(out_dir), score_base=False))
    quantized["size_bytes"] = checkpoint_bytes(out_dir)

    recorded = record(cfg, out_dir, reference, quantized)
    gate = judge_quantization(recorded["mlflow_run_id"], cfg.policy)
    (logger.warning if gate["verdict"] == "refuse" else logger.info)(
        f"promotion policy on {cfg.name}: {gate['verdict']}\n- " + "\n- ".join(gate["checks"]))
    registered = register_quantized(cfg, out_dir, recorded, adapter_dir) if cfg.register_version else None
    logger.info(f"{cfg.name}: {out_dir}\n{recorded['table']}")
    return {"checkpoint": str(out_dir), "mlflow_run_id": recorded["mlflow_run_id"], "table": recorded["table"],
            "deltas": recorded["deltas"], "registered": registered, "gate": gate}

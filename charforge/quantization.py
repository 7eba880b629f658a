"""Quantization steps as plain functions: calibration sample, adapter merge, quantize with auto-round or
llm-compressor into a folder vLLM loads, serving speed, and the deltas against bf16."""

from __future__ import annotations

import gc
import hashlib
import importlib.metadata
import json
import random
import shutil
import time
from pathlib import Path

import mlflow
from pydantic import BaseModel, ConfigDict

from charforge import registry
from charforge.base_models import load_preset, prepare_base_model
from charforge.checksums import MANIFEST, folder_sha, sha256_file, verify_manifest, write_manifest
from charforge.config import load_yaml_model
from charforge.curation.manifest import read_dataset_manifest
from charforge.errors import InputError
from charforge.evaluation.harness import summary_metrics
from charforge.promotion import quantization_checks
from charforge.results import Evaluation, QuantizationGate, RegisteredCheckpoint
from charforge.schemas.evaluate import EvalConfig
from charforge.schemas.promote import PromotionPolicy
from charforge.schemas.quantize import QuantizeConfig
from charforge.settings import platform, repo_path
from charforge.tracking import client, use_experiment

# Files a served model folder needs beside its weights (vLLM serves with the folder's tokenizer and template).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json",
                   "generation_config.json")


def sample_calibration(dataset_dir: Path, samples: int, seed: int, tokenizer) -> tuple[list[str], str]:
    """A seeded sample of curated training conversations rendered through the chat template, and the sha256 of
    the rendered texts (the calibration set's identity)."""
    read_dataset_manifest(dataset_dir)
    rows = [json.loads(line) for line in (Path(dataset_dir) / "train.jsonl").read_text().splitlines() if line]
    picked = random.Random(seed).sample(rows, min(samples, len(rows)))
    texts = [tokenizer.apply_chat_template(r["messages"], tokenize=False) for r in picked]
    return texts, hashlib.sha256("\x00".join(texts).encode()).hexdigest()


def tool_versions(tool: str) -> dict[str, str]:
    """Versions that produced the artifact (recorded as registry tags)."""
    names = {"auto-round": ["auto-round"], "llm-compressor": ["llmcompressor", "compressed-tensors"]}[tool]
    out = {}
    for name in [*names, "torch", "transformers"]:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "missing"
    return out


def require_tool(tool: str) -> None:
    """A clear error when the quantization library is not installed in this environment."""
    module = {"auto-round": "auto_round", "llm-compressor": "llmcompressor"}[tool]
    try:
        __import__(module)
    except ImportError:
        hint = ("it is a dependency of the pipeline environment: re-run `make setup`" if tool == "auto-round" else
                "llm-compressor 0.14 pins transformers<=5.17 and compressed-tensors 0.19, so it is not part of the "
                "pipeline or serving environment; run this preset in an environment with `pip install llmcompressor` "
                "(GPU hosts)")
        raise InputError(f"{tool} is not installed ({module} cannot be imported); {hint}") from None


def require_adapter(cfg: QuantizeConfig) -> None:
    """Merged mode has nothing to merge without an adapter."""
    if cfg.mode == "merged" and not cfg.adapter:
        raise InputError(f"{cfg.name}: mode 'merged' merges an adapter into the base; pass --adapter "
                          f"<dir | models:/name/version> (or set `adapter` in the config)")


def merge_adapter(adapter_dir: Path, base_dir: Path, out_dir: Path) -> Path:
    """The adapter folded into the base weights (PEFT merge_and_unload), saved in bf16 with the base's tokenizer."""
    import torch

    from charforge.training.adapters import load_adapter_model

    model = load_adapter_model(adapter_dir, base_dir, dtype=torch.float32).merge_and_unload()
    model.to(torch.bfloat16).save_pretrained(out_dir)
    copy_tokenizer(base_dir, out_dir)
    return out_dir


def copy_tokenizer(src: Path, dst: Path) -> None:
    for name in TOKENIZER_FILES:
        if (Path(src) / name).is_file():
            shutil.copy2(Path(src) / name, Path(dst) / name)


def quantize_auto_round(source_dir: Path, out_dir: Path, cfg: QuantizeConfig, texts: list[str]) -> None:
    """AutoRound on CPU (RTN when iters=0, else sign-gradient tuning) exported in `cfg.export_format`."""
    import torch
    from auto_round import AutoRound
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source_dir)
    model = AutoModelForCausalLM.from_pretrained(source_dir, dtype=torch.float32)  # bf16 matmuls are slow on CPU
    overrides = {k: v for k, v in (("bits", cfg.bits), ("group_size", cfg.group_size)) if v is not None}
    rounder = AutoRound(model, tokenizer=tokenizer, scheme=cfg.scheme, sym=cfg.sym, iters=cfg.iters, dataset=texts,
                        nsamples=len(texts), seqlen=cfg.calibration.seqlen, device_map="cpu",
                        enable_torch_compile=False, seed=cfg.calibration.seed,
                        disable_opt_rtn=not cfg.optimized_rtn, ignore_layers=",".join(cfg.ignore),
                        **overrides)
    staging = out_dir.with_name(out_dir.name + ".export")
    # auto-round runs a full gc.collect() after every block (64 for this 30-layer model); with torch, transformers
    # and the model in the heap each took 0.33 s, 21 of the 22 s of an RTN run on 2 cores. Frozen objects are not
    # scanned, so each collect only looks at what the quantization allocates.
    gc.freeze()
    try:
        _, folders = rounder.quantize_and_save(str(staging), format=cfg.export_format)
    finally:
        gc.unfreeze()
    written = Path(folders[0] if isinstance(folders, (list, tuple)) else folders)  # auto-round may add a sub-folder
    written.rename(out_dir)
    shutil.rmtree(staging, ignore_errors=True)


def quantize_llm_compressor(source_dir: Path, out_dir: Path, cfg: QuantizeConfig, texts: list[str]) -> None:
    """llm-compressor `oneshot` with QuantizationModifier (rtn), GPTQModifier or AWQModifier, saved as
    compressed-tensors. Needs an environment with llmcompressor (see `require_tool`)."""
    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source_dir)
    model = AutoModelForCausalLM.from_pretrained(source_dir, dtype=torch.bfloat16)
    if cfg.algorithm == "awq":
        from llmcompressor.modifiers.awq import AWQModifier
        modifier = AWQModifier(targets=["Linear"], scheme=cfg.scheme, ignore=cfg.ignore)
    else:
        modifier = (GPTQModifier if cfg.algorithm == "gptq" else QuantizationModifier)(
            targets="Linear", scheme=cfg.scheme, ignore=cfg.ignore)
    calibrated = cfg.algorithm != "rtn" or not cfg.scheme.startswith("FP8_DYNAMIC")
    extra = dict(dataset=Dataset.from_dict({"text": texts}), max_seq_length=cfg.calibration.seqlen,
                 num_calibration_samples=len(texts)) if calibrated else {}
    oneshot(model=model, recipe=modifier, tokenizer=tokenizer, **extra)
    model.save_pretrained(out_dir, save_compressed=True)
    tokenizer.save_pretrained(out_dir)


def cast_float32_to_bf16(folder: Path) -> int:
    """Rewrite fp32 tensors left in the safetensors files (auto-round keeps tied embeddings in fp32) as bf16;
    returns how many were cast. vLLM serves in bf16 anyway, so this only removes dead weight."""
    import torch
    from safetensors.torch import load_file, save_file

    cast = 0
    for path in sorted(folder.glob("*.safetensors")):
        tensors = load_file(path)
        wide = [k for k, t in tensors.items() if t.dtype == torch.float32]
        if wide:
            save_file({k: t.to(torch.bfloat16) if k in wide else t for k, t in tensors.items()}, path,
                      metadata={"format": "pt"})
            cast += len(wide)
    return cast


def quantize_checkpoint(source_dir: Path, out_dir: Path, cfg: QuantizeConfig, texts: list[str],
                        lineage: dict) -> dict:
    """Quantize `source_dir` into `out_dir` (written beside it, renamed into place when complete) with the
    tokenizer and a sha256 manifest carrying the lineage. Returns the manifest."""
    require_tool(cfg.tool)
    out_dir = Path(out_dir)
    partial = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    started = time.monotonic()
    (quantize_auto_round if cfg.tool == "auto-round" else quantize_llm_compressor)(source_dir, partial, cfg, texts)
    cast = cast_float32_to_bf16(partial)
    copy_tokenizer(source_dir, partial)
    manifest = write_manifest(partial, {"lineage": {**lineage, "quantize_seconds": round(time.monotonic() - started, 1),
                                                    "float32_tensors_cast_to_bf16": cast}})
    shutil.rmtree(out_dir, ignore_errors=True)
    partial.rename(out_dir)
    return manifest


def checkpoint_bytes(folder: Path) -> int:
    """Bytes of the weight files (safetensors) in a model folder."""
    return sum(p.stat().st_size for p in Path(folder).glob("*.safetensors"))


def metric_deltas(reference: dict[str, float], quantized: dict[str, float]) -> dict[str, float]:
    """quantized minus reference for every metric both have (the raw difference; the sign's meaning depends on
    the metric, which the promotion policy knows)."""
    return {k: quantized[k] - reference[k] for k in sorted(reference.keys() & quantized.keys())}


# ---- the quantize flow's steps ----------------------------------------------------------------------------------
# The config fields that change the checkpoint (evaluation, policy and registry settings do not).
CHECKPOINT_FIELDS = {"mode", "base_model", "tool", "scheme", "bits", "group_size", "sym", "iters", "optimized_rtn",
                     "algorithm", "export_format", "ignore", "calibration"}


class QuantizeInputs(BaseModel):
    """What a quantization run starts from: the bf16 base, the adapter (verified), the evaluation config."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    mode: str
    base_dir: str
    adapter_dir: str | None
    eval_config: EvalConfig


class ScoredArtifact(BaseModel):
    """One served artifact's evaluation as the comparison reads it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    run_id: str
    per_probe: dict[str, dict[str, float]]
    metrics: dict[str, float]
    load_s: float
    tokens_per_s: float
    size_bytes: int


class Recorded(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    mlflow_run_id: str
    artifact_uri: str
    table: str
    deltas: dict[str, float]


def prepare_inputs(cfg: QuantizeConfig) -> QuantizeInputs:
    require_adapter(cfg)
    base_dir, _ = prepare_base_model(load_preset(cfg.base_model))
    adapter_dir = (registry.fetch_verified(cfg.adapter, platform().state / "evals" / "downloads", "adapter")
                   if cfg.adapter else None)
    eval_cfg = load_yaml_model(repo_path(cfg.eval_config), EvalConfig).model_copy(update={"register_version": False})
    return QuantizeInputs(mode=cfg.mode, base_dir=str(base_dir), adapter_dir=str(adapter_dir) if adapter_dir else None,
                          eval_config=eval_cfg)


def artifact_identity(cfg: QuantizeConfig, base_sha: str, adapter_sha: str | None, calibration_sha: str) -> str:
    """What determines the checkpoint: the quantization settings (not the evaluation), the inputs, the tool."""
    settings = cfg.model_dump(mode="json", include=CHECKPOINT_FIELDS)
    key = {"settings": settings, "base": base_sha, "adapter": adapter_sha if cfg.mode == "merged" else None,
           "calibration": calibration_sha, "tools": tool_versions(cfg.tool)}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def build_checkpoint(cfg: QuantizeConfig, inputs: QuantizeInputs, log) -> Path:
    """Calibration sample → (merge) → quantize, into `<state>/quantized/<name>-<identity12>/`; an existing folder
    whose manifest verifies is reused."""
    import tempfile

    from transformers import AutoTokenizer

    base_dir = Path(inputs.base_dir)
    adapter_dir = Path(inputs.adapter_dir) if inputs.adapter_dir else None
    texts, calibration_sha = sample_calibration(repo_path(cfg.calibration.dataset_dir), cfg.calibration.samples,
                                                cfg.calibration.seed, AutoTokenizer.from_pretrained(base_dir))
    adapter_sha = folder_sha(adapter_dir) if adapter_dir is not None else None
    identity = artifact_identity(cfg, folder_sha(base_dir), adapter_sha, calibration_sha)
    out_dir = platform().state / "quantized" / f"{cfg.name}-{identity[:12]}"
    if (out_dir / MANIFEST).is_file():
        verify_manifest(out_dir, f"delete {out_dir} and re-run")
        log(f"reusing {out_dir} (same settings, inputs and tool versions)")
        return out_dir
    lineage = {"name": cfg.name, "mode": cfg.mode, "tool": cfg.tool, "scheme": cfg.scheme, "bits": cfg.bits,
               "group_size": cfg.group_size, "sym": cfg.sym, "iters": cfg.iters, "export_format": cfg.export_format,
               "base_model": cfg.base_model, "base_model_sha": folder_sha(base_dir),
               "adapter_sha256": adapter_sha if cfg.mode == "merged" else None,
               "calibration_sha256": calibration_sha, "calibration_samples": len(texts),
               "tool_versions": tool_versions(cfg.tool), "identity": identity}
    log(f"quantizing {cfg.base_model} ({cfg.mode}) with {cfg.tool} {cfg.scheme} on {len(texts)} calibration "
        f"conversations")
    with tempfile.TemporaryDirectory(dir=platform().state) as tmp:
        source = merge_adapter(adapter_dir, base_dir, Path(tmp) / "merged") if cfg.mode == "merged" else base_dir
        quantize_checkpoint(source, out_dir, cfg, texts, lineage)
    return out_dir


def find_reference(inputs: QuantizeInputs) -> ScoredArtifact | None:
    """An earlier bf16 evaluation of the same adapter (or base) with the same probes, tasks and limit that measured
    serving speed; None when there is none."""
    eval_cfg = inputs.eval_config
    adapter_sha = folder_sha(Path(inputs.adapter_dir)) if inputs.adapter_dir else "none"
    use_experiment("evaluate")
    runs = mlflow.search_runs(experiment_names=[f"{platform().mlflow.experiment_prefix}-evaluate"],
                              filter_string=f"tags.adapter_sha256 = '{adapter_sha}' and params.served_base = 'bf16' "
                                            f"and attributes.status = 'FINISHED'", output_format="list")
    want = {"probes_sha256": sha256_file(repo_path(eval_cfg.probes)), "limit": str(eval_cfg.limit or "all"),
            "tasks": ",".join(eval_cfg.tasks)}
    for run in runs:
        if all(run.data.params.get(k) == v for k, v in want.items()) and "serving/tokens_per_s" in run.data.metrics:
            return run_scores(run.info.run_id, "candidate" if inputs.adapter_dir else "base", Path(inputs.base_dir))
    return None


def run_scores(run_id: str, primary: str, served_dir: Path) -> ScoredArtifact:
    """Per-probe scores, flat metrics and serving numbers of one evaluation run."""
    import tempfile

    c = client()
    run = c.get_run(run_id)
    with tempfile.TemporaryDirectory() as tmp:
        per_probe = json.loads(Path(c.download_artifacts(run_id, "per_probe.json", tmp)).read_text())[primary]
    metrics = {k: v for k, v in run.data.metrics.items() if k.startswith("eval/") and k.count("/") == 2}
    return ScoredArtifact(run_id=run_id, per_probe=per_probe, metrics=metrics, load_s=run.data.metrics["serving/load_s"],
                          tokens_per_s=run.data.metrics["serving/tokens_per_s"], size_bytes=checkpoint_bytes(served_dir))


def scored(result: Evaluation, served_dir: Path) -> ScoredArtifact:
    """The same as `run_scores`, from an evaluate flow result."""
    per_probe = json.loads((Path(result.run_dir) / "per_probe.json").read_text())[result.primary]
    metrics = {k: v for k, v in summary_metrics(result.summaries[result.primary]).items() if k.count("/") == 2}
    return ScoredArtifact(run_id=result.mlflow_run_id, per_probe=per_probe, metrics=metrics,
                          load_s=result.serving["load_s"], tokens_per_s=result.serving["tokens_per_s"],
                          size_bytes=checkpoint_bytes(served_dir))


def comparison_table(rows: dict[str, ScoredArtifact]) -> str:
    """Markdown: one row per artifact (bf16 first), size / load / tokens/s and every eval metric."""
    metrics = sorted({k for r in rows.values() for k in r.metrics})
    head = ["artifact", "size MB", "load s", "tokens/s", *[m.removeprefix("eval/") for m in metrics]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, r in rows.items():
        values = [f"{r.size_bytes / 1e6:.0f}", f"{r.load_s:.0f}", f"{r.tokens_per_s:.1f}",
                  *[f"{r.metrics[m]:.3f}" if m in r.metrics else "-" for m in metrics]]
        lines.append("| " + " | ".join([label, *values]) + " |")
    return "\n".join(lines) + "\n"


def record(cfg: QuantizeConfig, out_dir: Path, reference: ScoredArtifact, quantized: ScoredArtifact,
           flow_tags: dict[str, str]) -> Recorded:
    """One MLflow run in `charforge-quantize`: settings, lineage, size/load/speed/metric deltas vs bf16, the
    per-probe scores of both (what the promotion policy reads) and the checkpoint itself."""
    lineage = json.loads((out_dir / MANIFEST).read_text())["lineage"]
    deltas = metric_deltas(reference.metrics, quantized.metrics)
    table = comparison_table({"bf16": reference, f"{cfg.name} ({cfg.scheme})": quantized})
    use_experiment("quantize")
    with mlflow.start_run(run_name=f"{cfg.name}-{lineage['identity'][:12]}") as run:
        mlflow.set_tags({"stage": "quantize", "artifact_sha256": folder_sha(out_dir),
                         "reference_eval_run_id": reference.run_id, "quantized_eval_run_id": quantized.run_id,
                         **flow_tags})
        mlflow.log_params({k: v for k, v in lineage.items() if k != "tool_versions"}
                          | {f"version_{k}": v for k, v in lineage["tool_versions"].items()})
        mlflow.log_metrics({
            "size_mb": quantized.size_bytes / 1e6, "bf16/size_mb": reference.size_bytes / 1e6,
            "size_ratio": quantized.size_bytes / reference.size_bytes,
            "load_s": quantized.load_s, "bf16/load_s": reference.load_s,
            "tokens_per_s": quantized.tokens_per_s, "bf16/tokens_per_s": reference.tokens_per_s,
            "delta/tokens_per_s": quantized.tokens_per_s - reference.tokens_per_s,
            **quantized.metrics, **{f"bf16/{k}": v for k, v in reference.metrics.items()},
            **{f"delta/{k}": v for k, v in deltas.items()}})
        mlflow.log_dict({"quantized": quantized.per_probe, "bf16": reference.per_probe}, "per_probe.json")
        mlflow.log_text(table, "comparison.md")
        mlflow.log_artifacts(str(out_dir), "model")
    return Recorded(mlflow_run_id=run.info.run_id, artifact_uri=f"{run.info.artifact_uri}/model", table=table,
                    deltas=deltas)


def judge(run_id: str, policy_path: Path) -> QuantizationGate:
    """The policy's quantized_vs_bf16 rules on a quantize run's per-probe scores (the same checks `charforge
    promote` applies to an adapter version evaluated on this base), recorded on the run."""
    import tempfile
    from dataclasses import asdict

    c = client()
    policy = load_yaml_model(repo_path(policy_path), PromotionPolicy)
    with tempfile.TemporaryDirectory() as tmp:
        scores = json.loads(Path(c.download_artifacts(run_id, "per_probe.json", tmp)).read_text())
    checks = quantization_checks((scores["quantized"], scores["bf16"]), policy)
    verdict = "refuse" if any(not ch.passed for ch in checks) else "pass"
    c.set_tag(run_id, "quantization_gate", verdict)
    c.log_dict(run_id, {"verdict": verdict, "checks": [asdict(ch) for ch in checks]}, "quantization_gate.json")
    return QuantizationGate(verdict=verdict, checks=tuple(ch.detail for ch in checks))


def register(cfg: QuantizeConfig, out_dir: Path, recorded: Recorded, adapter_dir: Path | None) -> RegisteredCheckpoint:
    """The quantized checkpoint as its own registry version (tags: scheme, tool versions, calibration hash, the
    bf16 base), referenced from the registry version of the adapter that was evaluated on it."""
    c = client()
    lineage = json.loads((out_dir / MANIFEST).read_text())["lineage"]
    name = registry.registered_name(f"{cfg.base_model}-{cfg.name}")
    tags = {"scheme": cfg.scheme, "tool": cfg.tool, "mode": cfg.mode, "export_format": cfg.export_format,
            "bits": cfg.bits or "scheme", "group_size": cfg.group_size or "scheme", "iters": cfg.iters,
            "calibration_sha256": lineage["calibration_sha256"], "base_model": cfg.base_model,
            "base_model_sha": lineage["base_model_sha"], "merged_adapter_sha256": lineage["adapter_sha256"] or "none",
            "quantize_run_id": recorded.mlflow_run_id,
            **{f"version_{k}": v for k, v in lineage["tool_versions"].items()}}
    version = registry.register_adapter(c, name, recorded.artifact_uri, recorded.mlflow_run_id, folder_sha(out_dir),
                                        tags, key="artifact_sha256",
                                        description=f"quantized {cfg.base_model} ({cfg.mode}) for vLLM")
    uri = f"models:/{name}/{version.version}"
    referenced = None
    if adapter_dir is not None:
        manifest = json.loads((adapter_dir / MANIFEST).read_text())
        family = registry.registered_name(manifest["lineage"].get("train_config", "adapter"))
        adapter_version = registry.find_version_by_sha(c, family, folder_sha(adapter_dir))
        if adapter_version is not None:
            for key, value in {"quantized_base": uri, "quantize_run_id": recorded.mlflow_run_id}.items():
                c.set_model_version_tag(family, adapter_version.version, key, value)
            referenced = f"models:/{family}/{adapter_version.version}"
    return RegisteredCheckpoint(uri=uri, adapter_version=referenced)

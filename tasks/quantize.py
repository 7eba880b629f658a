"""Prefect tasks of the quantize flow."""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NONE

from charforge import quantization
from charforge.quantization import QuantizeInputs, ScoredArtifact
from charforge.results import Evaluation, QuantizationGate, RegisteredCheckpoint
from charforge.schemas.quantize import QuantizeConfig
from tasks.runtime import TRANSIENT_RETRIES, flow_run_tags


@task(name="prepare-quantization", cache_policy=NONE, **TRANSIENT_RETRIES)
def prepare(cfg: QuantizeConfig) -> QuantizeInputs:
    """The bf16 base, the adapter (verified; downloaded once when it is a registry version), the evaluation config."""
    return quantization.prepare_inputs(cfg)


@task(name="build-quantized-checkpoint", cache_policy=NONE)
def build_checkpoint(cfg: QuantizeConfig, inputs: QuantizeInputs) -> str:
    """Calibration sample → (merge) → quantize into `<state>/quantized/<name>-<identity12>/`; an existing folder
    whose manifest verifies is reused."""
    return str(quantization.build_checkpoint(cfg, inputs, get_run_logger().info))


@task(name="find-bf16-reference", cache_policy=NONE, **TRANSIENT_RETRIES)
def find_reference(inputs: QuantizeInputs) -> ScoredArtifact | None:
    """An earlier bf16 evaluation of the same adapter (or base) with the same probes, tasks and limit."""
    found = quantization.find_reference(inputs)
    if found is not None:
        get_run_logger().info(f"bf16 reference: evaluation run {found.run_id} (same adapter, probes, tasks and limit)")
    return found


@task(name="read-evaluation-scores", cache_policy=NONE)
def scored(evaluation: Evaluation, checkpoint: str) -> ScoredArtifact:
    """An evaluation flow's result as the comparison reads it, with the size of the checkpoint it served."""
    return quantization.scored(evaluation, Path(checkpoint))


@task(name="record-quantization", cache_policy=NONE, **TRANSIENT_RETRIES)
def record(cfg: QuantizeConfig, checkpoint: str, reference: ScoredArtifact,
           quantized: ScoredArtifact) -> quantization.Recorded:
    """One MLflow run in `charforge-quantize`: settings, lineage, deltas vs bf16, both per-probe score sets (what
    the promotion policy reads) and the checkpoint itself."""
    recorded = quantization.record(cfg, Path(checkpoint), reference, quantized, flow_run_tags())
    create_markdown_artifact(key="quantization", markdown=f"# Quantization: {cfg.name}\n\n{recorded.table}",
                             description=f"{cfg.name} vs bf16")
    return recorded


@task(name="judge-quantization", cache_policy=NONE, **TRANSIENT_RETRIES)
def judge(cfg: QuantizeConfig, recorded: quantization.Recorded) -> QuantizationGate:
    """The policy's quantized_vs_bf16 rules on the recorded per-probe scores, recorded on the run."""
    gate = quantization.judge(recorded.mlflow_run_id, Path(cfg.policy))
    (get_run_logger().warning if gate.verdict == "refuse" else get_run_logger().info)(
        f"promotion policy on {cfg.name}: {gate.verdict}\n- " + "\n- ".join(gate.checks))
    return gate


@task(name="register-quantized", cache_policy=NONE, **TRANSIENT_RETRIES)
def register(cfg: QuantizeConfig, checkpoint: str, recorded: quantization.Recorded,
             inputs: QuantizeInputs) -> RegisteredCheckpoint:
    """The checkpoint as its own registry version, referenced from the adapter version evaluated on it."""
    registered = quantization.register(cfg, Path(checkpoint), recorded,
                                       Path(inputs.adapter_dir) if inputs.adapter_dir else None)
    get_run_logger().info(f"registered {registered.uri}" + (
        f"; referenced from {registered.adapter_version}" if registered.adapter_version else
        " (the adapter has no registry version to reference it from)"))
    return registered

"""Quantization flow: a quantized checkpoint vLLM serves (the base for multi-LoRA serving, or the adapter merged into
the base), re-evaluated through the evaluation flow, its deltas against bf16 tracked and registered.

Run it:  charforge quantize --config configs/quantize/<name>.yaml [--adapter <dir | models:/name/version>]

Modes: `multi_lora` quantizes the base and evaluates the adapter hot-loaded on it (vLLM --enable-lora);
`merged` merges the adapter into the base, quantizes that, and evaluates it as a model of its own. The bf16
reference (the same adapter on the bf16 base, same evaluation config) comes from an earlier evaluation run with
the same inputs when there is one, else it is evaluated here.
"""

from __future__ import annotations

from prefect import flow, get_run_logger

from charforge.results import Quantization
from charforge.schemas.quantize import QuantizeConfig
from flows.evaluate import evaluate
from tasks.quantize import build_checkpoint, find_reference, judge, prepare, record, register, scored


@flow(name="quantize")
def quantize(config: QuantizeConfig) -> Quantization:
    """Quantize, re-evaluate against bf16 through the evaluation flow, record the deltas, register (unless the
    policy's quantized_vs_bf16 rules refuse it)."""
    inputs = prepare(config)
    checkpoint = build_checkpoint(config, inputs)
    reference = find_reference(inputs)
    if reference is None:
        reference = scored(evaluate(config=inputs.eval_config, adapter=inputs.adapter_dir,
                                    base_only=inputs.adapter_dir is None, score_base=False), inputs.base_dir)
    on_base = inputs.mode == "multi_lora" and inputs.adapter_dir is not None
    quantized = scored(evaluate(config=inputs.eval_config, adapter=inputs.adapter_dir if on_base else None,
                                base_only=not on_base, served_base=checkpoint, score_base=False), checkpoint)
    recorded = record(config, checkpoint, reference, quantized)
    gate = judge(config, recorded)
    # a checkpoint the gate refused stays a recorded MLflow run, never a registry version anything could serve
    registered = (register(config, checkpoint, recorded, inputs)
                  if config.register_version and gate.verdict != "refuse" else None)
    get_run_logger().info(f"{config.name}: {checkpoint}\n{recorded.table}")
    return Quantization(checkpoint=checkpoint, mlflow_run_id=recorded.mlflow_run_id, table=recorded.table,
                        deltas=recorded.deltas, gate=gate, registered=registered)

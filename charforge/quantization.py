"""Quantization steps as plain functions: calibration sample, adapter merge, quantize with auto-round or
llm-compressor into a folder vLLM loads, serving speed, and the deltas against bf16."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import random
import shutil
import statistics
import time
from pathlib import Path

import httpx

from charforge.checksums import write_manifest
from charforge.config import ConfigError
from charforge.curation.manifest import read_dataset_manifest
from charforge.schemas.quantize import QuantizeConfig

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
        raise ConfigError(f"{tool} is not installed ({module} cannot be imported); {hint}") from None


def require_adapter(cfg: QuantizeConfig) -> None:
    """Merged mode has nothing to merge without an adapter."""
    if cfg.mode == "merged" and not cfg.adapter:
        raise ConfigError(f"{cfg.name}: mode 'merged' merges an adapter into the base; pass --adapter "
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
    _, folders = rounder.quantize_and_save(str(staging), format=cfg.export_format)
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


def decode_speed(base_url: str, model: str, tokens: int, repeats: int, prompt: str) -> float:
    """Single-stream greedy decode tokens/s through the server's /v1/completions: one warm-up, then the median of
    `repeats` (end-of-text ignored so every run decodes `tokens` tokens)."""
    body = {"model": model, "prompt": prompt, "max_tokens": tokens, "temperature": 0, "ignore_eos": True}
    rates = []
    for i in range(repeats + 1):
        started = time.monotonic()
        response = httpx.post(f"{base_url}/v1/completions", json=body, timeout=600)
        response.raise_for_status()
        elapsed = time.monotonic() - started
        if i:
            rates.append(response.json()["usage"]["completion_tokens"] / elapsed)
    return statistics.median(rates)


def metric_deltas(reference: dict[str, float], quantized: dict[str, float]) -> dict[str, float]:
    """quantized minus reference for every metric both have (the raw difference; the sign's meaning depends on
    the metric, which the promotion policy knows)."""
    return {k: quantized[k] - reference[k] for k in sorted(reference.keys() & quantized.keys())}

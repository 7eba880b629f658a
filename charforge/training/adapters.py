"""Adapter artifacts: the servable export (bf16 safetensors + manifest) and re-loading onto the base model."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from charforge.checksums import verify_manifest, write_manifest
from charforge.training.servability import require_safetensors

# bitsandbytes (imported by peft) warns that an optional hub-downloaded CPU kernel is missing; its CPU path works.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

TRAINING_TEMPLATE = "training_chat_template.jinja"


def export_adapter(raw_dir: Path, out_dir: Path, dtype: str, lineage: dict, chat_template: Path | None = None) -> dict:
    """Copy the PEFT adapter into `out_dir` with weights cast to `dtype` (vLLM serves bf16/fp16 adapters only)
    and a sha256 manifest that also records where it came from (base model, dataset, run).

    The chat template training used (if not the base model's) travels with the adapter, so evaluation can check
    that serving renders conversations the same way."""
    staging = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    weights = load_file(raw_dir / "adapter_model.safetensors")
    save_file({k: v.to(getattr(torch, dtype)).contiguous() for k, v in weights.items()},
              staging / "adapter_model.safetensors", metadata={"format": "pt"})
    config = json.loads((raw_dir / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = lineage["base_model_path"]
    (staging / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    if chat_template is not None:
        shutil.copyfile(chat_template, staging / TRAINING_TEMPLATE)
    manifest = write_manifest(staging, {"lineage": lineage, "dtype": dtype})
    shutil.rmtree(out_dir, ignore_errors=True)
    staging.rename(out_dir)
    return manifest


def load_adapter_model(adapter_dir: Path, base_dir: Path | None = None, dtype=torch.float32):
    """Verify the adapter's manifest, then load base + adapter with PEFT (base from the manifest's lineage)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    require_safetensors(adapter_dir)  # before PEFT, which would unpickle adapter_model.bin
    manifest = verify_manifest(Path(adapter_dir), "re-export it from its training run")
    base = Path(base_dir or manifest["lineage"]["base_model_path"])
    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
    return PeftModel.from_pretrained(model, str(adapter_dir))


def newest_adapter() -> Path:
    """The most recently exported adapter under `<state>/training/` (what a benchmark uses by default)."""
    from charforge.errors import InputError
    from charforge.settings import platform

    runs = sorted((platform().state / "training").glob("*/adapter"), key=lambda p: p.stat().st_mtime)
    if not runs:
        raise InputError("no trained adapter under .state/training; run `make demo` or pass --adapter")
    return runs[-1]

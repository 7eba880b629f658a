"""Adapter store: registry versions materialized into immutable, content-addressed folders `<root>/<name>/<sha256>/`.

vLLM re-reads an adapter's files whenever it is evicted and reloaded, so a folder a replica has loaded must never
change: it is written once under a temporary name, verified, renamed into place, and removed only when no replica
lists it any more (`remove_unused`).
"""

from __future__ import annotations

import re
import shutil
import uuid
from pathlib import Path

import mlflow

from charforge.checksums import folder_sha, verify_manifest
from charforge.errors import InputError, Refused
from charforge.training.servability import check_servable


STORE_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,199}")  # no separator, no leading dot: never '..'
SHA256 = re.compile(r"[0-9a-f]{64}")


class ArtifactError(Refused):
    """The adapter must not be loaded anywhere (checksum mismatch, unservable)."""


def fetch_version(name: str, version: str, source: str, expected_sha: str, root: Path, max_lora_rank: int,
                architecture: str) -> Path:
    """The verified folder for a registry version; downloads it once. Raises ArtifactError before any replica sees
    a bad adapter: sha256 different from the registry's `adapter_sha256`, files not matching their manifest, or
    an adapter the fleet cannot serve."""
    if not STORE_KEY.fullmatch(name) or not SHA256.fullmatch(expected_sha):  # they become path parts
        raise ArtifactError(f"{name!r} / {expected_sha!r}: not a model name and a sha256; refusing a path outside "
                            f"{root}")
    dest = Path(root) / name / expected_sha
    if dest.is_dir():
        _verify(dest, expected_sha, max_lora_rank, architecture)
        return dest
    staging = dest.parent / f".incoming-{uuid.uuid4().hex[:8]}"
    staging.parent.mkdir(parents=True, exist_ok=True)
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(staging)))
        _verify(local, expected_sha, max_lora_rank, architecture)
        local.rename(dest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return dest


def _verify(folder: Path, expected_sha: str, max_lora_rank: int, architecture: str) -> None:
    try:
        verify_manifest(folder, "the artifact in the registry is damaged; re-register the adapter")
    except InputError as err:
        raise ArtifactError(str(err)) from None
    actual = folder_sha(folder)
    if actual != expected_sha:
        raise ArtifactError(f"{folder}: adapter sha256 {actual[:12]}… is not the registry's {expected_sha[:12]}…; "
                            f"refusing to load it")
    reasons = check_servable(folder, max_lora_rank, architecture)
    if reasons:
        raise ArtifactError(f"{folder}: not servable by this fleet: {'; '.join(reasons)}")


def remove_unused(root: Path, in_use: set[str], name: str = "*") -> list[Path]:
    """Delete store folders (of one adapter family, or all) whose path no replica lists as a LoRA `root` and that
    are not in `in_use`; return what was deleted."""
    removed = []
    for folder in sorted(Path(root).glob(f"{name}/*")):
        if folder.is_dir() and not folder.name.startswith(".") and str(folder) not in in_use:
            shutil.rmtree(folder)
            removed.append(folder)
    return removed


def fleet_weights(fleet, downloads: Path) -> Path:
    """The folder every replica loads: the base preset's bf16 weights, or `fleet.checkpoint` (a quantized base or
    merged model from `charforge quantize`, by registry URI or folder), verified against its manifest."""
    from charforge.base_models import load_preset, prepare_base_model
    from charforge.registry import fetch_verified

    if fleet.checkpoint is None:
        return prepare_base_model(load_preset(fleet.base_model))[0]
    folder = fetch_verified(fleet.checkpoint, downloads, "checkpoint")
    if not (folder / "config.json").is_file():
        raise InputError(f"{fleet.checkpoint}: no config.json in {folder}; fleet.checkpoint must be a model "
                          f"checkpoint (a `charforge quantize` output), not an adapter")
    return folder

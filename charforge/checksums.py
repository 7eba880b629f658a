"""sha256 manifests for folders whose content must not change silently (models, adapters, datasets)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from charforge.errors import InputError

MANIFEST = "charforge-manifest.json"


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(folder: Path, extra: dict | None = None) -> dict:
    """Record the sha256 of every file in `folder` (recursively) in `charforge-manifest.json`."""
    files = {
        str(p.relative_to(folder)): sha256_file(p)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }
    manifest = {"files": files, **(extra or {})}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
    return manifest


def verify_manifest(folder: Path, rebuild_hint: str) -> dict:
    """Check every file listed in the manifest; raise InputError naming the first bad file and the fix."""
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        raise InputError(f"{manifest_path}: manifest missing, the folder is incomplete; {rebuild_hint}")
    manifest = json.loads(manifest_path.read_text())
    for rel, expected in manifest["files"].items():
        path = folder / rel
        if not path.is_file():
            raise InputError(f"{path}: file missing from the model folder; {rebuild_hint}")
        actual = sha256_file(path)
        if actual != expected:
            raise InputError(
                f"{path}: sha256 {actual[:12]}… does not match the manifest ({expected[:12]}…), "
                f"the file is corrupted; {rebuild_hint}"
            )
    return manifest


def folder_sha(folder: Path) -> str:
    """A folder's identity: sha256 over the file hashes its manifest records (computed if it has none)."""
    path = Path(folder) / MANIFEST
    if path.is_file():
        files = json.loads(path.read_text())["files"]
    else:
        files = {str(p.relative_to(folder)): sha256_file(p) for p in sorted(Path(folder).rglob("*")) if p.is_file()}
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()

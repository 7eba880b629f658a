"""Curation flow: raw seed JSONL -> train/eval/rejected JSONL + manifest, logged to MLflow.

Run it:  charforge curate --input data/raw --out .state/datasets/default
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from prefect import flow, task
from prefect.cache_policies import NONE

from charforge.base_models import load_tokenizer, model_dir, load_preset
from charforge.characters import load_characters
from charforge.checksums import sha256_file
from charforge.schemas.curate import CurateConfig
from charforge.settings import DATA_DIR, repo_path
from charforge.tracking import flow_run_tags
from charforge.curation.pipeline import OUTPUTS, curate_conversations
from charforge.curation.ingest import expand_inputs
from charforge.curation.lineage import log_curated_dataset
from charforge.curation.synthesize import generate_synthetic


def curation_fingerprint(files: list[Path], characters_dir: Path, out_dir: Path, config: CurateConfig) -> str:
    """Everything the curated output depends on: input bytes, cards, config, tokenizer, output location."""
    digest = hashlib.sha256()
    for path in files:
        digest.update(f"{path}:{sha256_file(path)}\n".encode())
    for card in sorted(Path(characters_dir).glob("*.yaml")):
        digest.update(f"{card.name}:{sha256_file(card)}\n".encode())
    tokenizer_file = model_dir(load_preset(config.base_model)) / "tokenizer.json"
    if tokenizer_file.is_file():
        digest.update(sha256_file(tokenizer_file).encode())
    digest.update(json.dumps(config.model_dump(mode="json"), sort_keys=True).encode())
    digest.update(str(Path(out_dir).resolve()).encode())
    return digest.hexdigest()


def outputs_intact(out_dir: Path) -> bool:
    """True when manifest.json exists and every output file still has the sha256 it records."""
    manifest_path = Path(out_dir) / "manifest.json"
    if not manifest_path.is_file():
        return False
    recorded = json.loads(manifest_path.read_text()).get("sha256", {})
    return all((Path(out_dir) / n).is_file() and sha256_file(Path(out_dir) / n) == recorded.get(n) for n in OUTPUTS)


@task(
    name="curate-dataset",
    cache_key_fn=lambda ctx, params: "curate-" + params["fingerprint"],
    persist_result=True,
)
def curate_dataset(files: list[Path], out_dir: Path, characters_dir: Path, config: CurateConfig,
                   fingerprint: str) -> dict:
    """The heavy pass; cached on `fingerprint` so an unchanged re-run reuses the files on disk."""
    cards = load_characters(characters_dir)
    manifest = curate_conversations(files, out_dir, cards, config, load_tokenizer(config.base_model))
    return {"manifest": str(out_dir / "manifest.json"), "dataset_hash": manifest["dataset_hash"]}


@task(name="log-dataset-lineage", retries=2, retry_delay_seconds=5, cache_policy=NONE)
def log_lineage(out_dir: Path) -> str:
    return log_curated_dataset(out_dir, flow_run_tags())


@flow(name="curate", log_prints=True)
def curate(
    inputs: tuple[str, ...] = ("data/raw",),
    out_dir: str = ".state/datasets/default",
    characters_dir: str = str(DATA_DIR / "characters"),
    config: CurateConfig = CurateConfig(),
) -> dict:
    """Curate conversations for training: validate, scrub, filter, deduplicate, balance, split, record lineage."""
    # Relative paths (the defaults, or values typed into the Prefect UI) are relative to the repo root.
    out, characters_dir = repo_path(out_dir), repo_path(characters_dir)
    files = expand_inputs([repo_path(p) for p in inputs])
    load_characters(characters_dir)  # fail on a bad card before any work
    if config.synthetic.enabled:
        files.append(generate_synthetic(characters_dir, out / "synthetic.jsonl", config.synthetic))
    fingerprint = curation_fingerprint(files, characters_dir, out, config)
    step = curate_dataset if outputs_intact(out) else curate_dataset.with_options(refresh_cache=True)
    result = step(files, out, characters_dir, config, fingerprint)
    result["mlflow_run_id"] = log_lineage(out)
    manifest = json.loads(Path(result["manifest"]).read_text())
    print(
        f"curated {manifest['rows_read']} rows: {manifest['rows_kept']} kept "
        f"({manifest['rows']['train']} train / {manifest['rows']['eval']} eval), {manifest['rows_rejected']} "
        f"rejected, {manifest['duplicates_removed']} duplicates; dataset {manifest['dataset_hash'][:12]} -> {out}"
    )
    return result

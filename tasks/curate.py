"""Prefect tasks of the curate flow."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NONE

from charforge.base_models import load_tokenizer
from charforge.characters import load_characters
from charforge.clock import utc
from charforge.curation import lineage
from charforge.curation.ingest import expand_inputs
from charforge.curation.pipeline import CurationPlan, curate_conversations, curation_fingerprint, outputs_intact
from charforge.curation.synthesize import generate_synthetic
from charforge.io import write_json_atomic, write_text_atomic
from charforge.results import CuratedDataset, ProductionWindow
from charforge.schemas.curate import CurateConfig
from charforge.schemas.retrain import ProductionInput
from charforge.settings import platform, repo_path
from serving import capture, state_store
from tasks.runtime import TRANSIENT_RETRIES, flow_run_tags


@task(name="export-production-window", cache_policy=NONE, **TRANSIENT_RETRIES)
def export_production_window(window: ProductionInput) -> ProductionWindow:
    """The conversations captured in the window, with their ratings, as one curation input in data/raw's format:
    `<state>/production/window-<sha>.jsonl` (named by its content, kept for lineage). Curation decides what trains."""
    until = time.time()
    since = until - window.hours * 3600
    store = capture.capture_store(platform().state, state_store.store_url(platform().serving_store_url))
    try:
        rows = [r for r in capture.export_rows(store, since, until) if window.routes is None or r["route"] in window.routes]
    finally:
        store.close()
    rows.sort(key=lambda r: (r["captured_at"], r["capture_id"]))
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    sha = hashlib.sha256(text.encode()).hexdigest()
    path = platform().state / "production" / f"window-{sha[:16]}.jsonl"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, text)
    # the newest window a retrain read: the monitor counts new ratings from here (`feedback.ready`)
    write_json_atomic(platform().state / "production" / "last_window.json", {"until": until, "file": path.name})
    result = ProductionWindow(path=str(path), since=utc(since), until=utc(until), conversations=len(rows),
                              rated_up=sum(r["rating"] == "up" for r in rows),
                              rated_down=sum(r["rating"] == "down" for r in rows), sha256=sha)
    get_run_logger().info(f"production window {result.describe()}"
                          + ("" if rows else " (nothing captured: is `capture.routes` set in the serving config?)"))
    return result


@task(name="plan-curation", cache_policy=NONE)
def plan_curation(inputs: tuple[str, ...], out_dir: str, characters_dir: str, config: CurateConfig) -> CurationPlan:
    """Input files (plus synthetic ones when enabled), the cards checked, and the fingerprint of everything the
    output depends on. Relative paths (the defaults, or values typed into the Prefect UI) are relative to the repo."""
    out, cards = repo_path(out_dir), repo_path(characters_dir)
    files = expand_inputs([repo_path(p) for p in inputs])
    load_characters(cards)  # a bad card fails here, before any work
    if config.synthetic.enabled:
        files.append(generate_synthetic(cards, out / "synthetic.jsonl", config.synthetic))
    return CurationPlan(files=tuple(str(f) for f in files), out_dir=str(out), characters_dir=str(cards),
                        fingerprint=curation_fingerprint(files, cards, out, config), outputs_intact=outputs_intact(out))


# The key includes a version: a result cached by an older charforge (another result type) is never reused.
@task(name="curate-dataset", cache_key_fn=lambda ctx, params: "curate-v2-" + params["plan"].fingerprint,
      persist_result=True)
def curate_dataset(plan: CurationPlan, config: CurateConfig) -> CuratedDataset:
    """The heavy pass; cached on the plan's fingerprint, so an unchanged re-run reuses the files on disk."""
    out = Path(plan.out_dir)
    manifest = curate_conversations([Path(f) for f in plan.files], out, load_characters(Path(plan.characters_dir)),
                                    config, load_tokenizer(config.base_model))
    return CuratedDataset(dataset_dir=plan.out_dir, manifest=str(out / "manifest.json"),
                          dataset_hash=manifest["dataset_hash"])


@task(name="log-dataset-lineage", cache_policy=NONE, **TRANSIENT_RETRIES)
def log_lineage(dataset: CuratedDataset, cached: bool) -> CuratedDataset:
    """One MLflow run per dataset hash (found again, not logged twice); the summary line in the run log."""
    run_id = lineage.log_curated_dataset(Path(dataset.dataset_dir), flow_run_tags())
    manifest = json.loads(Path(dataset.manifest).read_text())
    get_run_logger().info(
        f"curated {manifest['rows_read']} rows: {manifest['rows_kept']} kept ({manifest['rows']['train']} train / "
        f"{manifest['rows']['eval']} eval), {manifest['rows_rejected']} rejected, {manifest['duplicates_removed']} "
        f"duplicates; dataset {manifest['dataset_hash'][:12]} -> {dataset.dataset_dir}"
        + (" (cached: same inputs, outputs intact)" if cached else ""))
    return dataset.model_copy(update={"mlflow_run_id": run_id, "cached": cached})

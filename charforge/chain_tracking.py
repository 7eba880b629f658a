"""The reviewer's view of a retrain chain in MLflow, and the links between MLflow and Prefect.

Each stage flow keeps logging to its own experiment (`charforge-curate`, `-train`, `-evaluate`, `-promote`). The
chain adds one parent run per chain run in `charforge-retrain` with a child run per stage, each carrying the
stage's headline numbers under the same names every night, a link to the stage's own run, and (for evaluation) one
grandchild per scored model with identical metric names, so MLflow's compare view lines candidate, base and
champion up column by column. The stage runs get `charforge.chain_run_id` pointing back. MLflow nests runs only
within one experiment, which is why the stage runs are linked by tag rather than re-parented.

Everything here goes through `MlflowClient` (no active fluent run), so the stage flows can start their own runs
while the chain's parent run stays open.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

from pydantic import ValidationError

from charforge.evaluation.harness import summary_metrics
from charforge.evaluation.report import score_table
from charforge.results import ChainSummary, Evaluation
from charforge.settings import platform
from charforge.tracking import client, use_experiment

PARENT_TAG = "mlflow.parentRunId"  # MLflow's own nesting tag (what mlflow.start_run(parent_run_id=...) sets)
CHAIN_TAG = "charforge.chain_run_id"
NOTE_TAG = "mlflow.note.content"  # shown as the run's description in the MLflow UI


def mlflow_ui() -> str:
    """The MLflow UI serving this store: the tracking server itself, or the one `charforge ui` starts."""
    uri = platform().tracking_uri
    if uri.startswith("http"):
        return uri.rstrip("/")
    return f"http://{platform().ui.host}:{platform().ui.mlflow_port}"


def run_url(run_id: str) -> str:
    run = client().get_run(run_id)
    return f"{mlflow_ui()}/#/experiments/{run.info.experiment_id}/runs/{run_id}"


def version_url(name: str, version: str) -> str:
    return f"{mlflow_ui()}/#/models/{name}/versions/{version}"


def open_chain_run(params: dict[str, object], prefect_tags: dict[str, str]) -> str:
    """The parent run of this chain run, tagged with the Prefect flow run it belongs to."""
    experiment_id = use_experiment("retrain")
    tags = {"stage": "retrain", **prefect_tags}
    run = client().create_run(experiment_id, run_name=f"retrain-{time.strftime('%Y%m%d-%H%M%S')}", tags=tags)
    for key, value in params.items():
        client().log_param(run.info.run_id, key, str(value)[:6000])
    return run.info.run_id


def close_chain_run(parent: str, status: str, summary: dict[str, object]) -> None:
    c = client()
    c.log_dict(parent, summary, "chain_summary.json")
    c.set_terminated(parent, status)


def stage_child(parent: str, stage: str, stage_run_id: str | None = None, metrics: dict | None = None,
                params: dict | None = None, tags: dict | None = None, note: str = "") -> str:
    """A child run of the chain for one stage (one per stage and chain run; a retried call reuses it)."""
    c = client()
    experiment_id = c.get_run(parent).info.experiment_id
    existing = c.search_runs([experiment_id], f"tags.`{PARENT_TAG}` = '{parent}' and tags.stage = '{stage}'",
                             max_results=1)
    all_tags = {PARENT_TAG: parent, "stage": stage, **(tags or {})}
    if stage_run_id:
        all_tags |= {"charforge.stage_run_id": stage_run_id, "charforge.stage_run_url": run_url(stage_run_id)}
        c.set_tag(stage_run_id, CHAIN_TAG, parent)  # ...and back from the stage's own run
        c.set_tag(stage_run_id, "charforge.chain_run_url", run_url(parent))
    if note or stage_run_id:
        link = f"Stage run: [{stage_run_id}]({run_url(stage_run_id)})\n\n" if stage_run_id else ""
        all_tags[NOTE_TAG] = (link + note)[:7000]  # MLflow caps tag values at 8000 characters
    run_id = existing[0].info.run_id if existing else c.create_run(experiment_id, run_name=stage,
                                                                   tags=all_tags).info.run_id
    for key, value in all_tags.items():
        c.set_tag(run_id, key, value)
    for key, value in (params or {}).items():
        c.log_param(run_id, key, str(value)[:6000])
    log_metrics(run_id, metrics or {})
    c.set_terminated(run_id, "FINISHED")
    return run_id


def log_metrics(run_id: str, metrics: dict[str, float]) -> None:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    batch = [Metric(k, float(v), now, 0) for k, v in metrics.items() if isinstance(v, (int, float))]
    for start in range(0, len(batch), 1000):  # MLflow's batch limit
        client().log_batch(run_id, metrics=batch[start:start + 1000])


def stage_metrics(stage_run_id: str) -> dict[str, float]:
    """The latest value of every metric of a stage's own run (the names the stage logs every time)."""
    return dict(client().get_run(stage_run_id).data.metrics)


def record_evaluation(parent: str, evaluated: Evaluation, key: str) -> str:
    """The evaluate child (chart, report, sample table, all metrics as the stage logged them) and one grandchild
    per scored model with the same `eval/<task>/<metric>` names, for MLflow's compare view. The evaluation itself
    is kept on the child (`evaluation_result.json`, tagged with `evaluation_key`), so a later chain with the same
    adapter, champion and config reuses it (`find_evaluation`)."""
    c = client()
    eval_run = evaluated.mlflow_run_id
    child = stage_child(parent, "evaluate", eval_run, metrics=stage_metrics(eval_run),
                        params={"targets": ",".join(evaluated.targets)}, note=Path(evaluated.report).read_text())
    run_dir = Path(evaluated.run_dir)
    for name in ("per_character.png", "report.md", "scores.json"):
        if (run_dir / name).is_file():
            c.log_artifact(child, str(run_dir / name))
    copy_sample_table(eval_run, child)
    for role, summary in evaluated.summaries.items():
        grandchild = stage_child(child, role, tags={"model_role": role, "served_name": evaluated.targets[role],
                                                    "charforge.chain_run_id": parent})
        log_metrics(grandchild, summary_metrics(summary))
    c.set_tag(child, "evaluation_key", key)
    c.log_dict(child, evaluated.model_dump(mode="json"), "evaluation_result.json")
    return child


def find_evaluation(key: str) -> Evaluation | None:
    """An earlier chain's evaluation recorded under `key`; None when there is none (or it was recorded by an older
    charforge in another shape)."""
    c = client()
    experiment = c.get_experiment_by_name(f"{platform().mlflow.experiment_prefix}-retrain")
    if experiment is None:
        return None
    runs = c.search_runs([experiment.experiment_id], f"tags.evaluation_key = '{key}' and tags.stage = 'evaluate'",
                         max_results=1)
    if not runs:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        recorded = json.loads(Path(c.download_artifacts(runs[0].info.run_id, "evaluation_result.json", tmp)).read_text())
    try:
        return Evaluation.model_validate(recorded)
    except ValidationError:
        return None


def evaluation_table(evaluation: Evaluation) -> str:
    return score_table(evaluation.summaries)


def copy_sample_table(eval_run: str, child: str) -> None:
    """The evaluation's per-sample table (model, probe, character, response, scores) on the chain's child run."""
    import pandas as pd

    c = client()
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = c.download_artifacts(eval_run, "eval_samples.json", tmp)
        except Exception:  # an evaluation without samples (nothing scored) has no table to copy
            return
        table = json.loads(Path(path).read_text())
    c.log_table(child, pd.DataFrame(table["data"], columns=table["columns"]), "eval_samples.json")


def lineage_markdown(lineage: dict, evaluations: dict[str, str], aliases: list[str]) -> str:
    """Dataset -> training -> adapter -> evaluations -> registry -> serving, with links."""
    rows = [*[("production window", window, "") for window in lineage.get("production_windows", ())],
            ("dataset", f"`{lineage['dataset_hash'][:16]}` ({lineage['dataset_dir']})", run_url(lineage["curate_run_id"])),
            ("training run", lineage["train_run_id"], run_url(lineage["train_run_id"])),
            ("adapter", f"`{lineage['adapter_sha256'][:16]}`", lineage["adapter_dir"]),
            *[(f"evaluation ({role})", run_id, run_url(run_id)) for role, run_id in evaluations.items()],
            ("registry", f"{lineage['registered_model']} version {lineage['version']} "
                         f"(aliases: {', '.join(aliases) or '-'})", version_url(lineage["registered_model"],
                                                                               lineage["version"])),
            ("promotion", lineage["promotion"], lineage["promotion_run_url"]),
            ("serving", lineage["served"], lineage["gateway_url"]),
            ("chain run", lineage["chain_run_id"], lineage["chain_run_url"])]
    lines = [f"# Lineage of {lineage['registered_model']} version {lineage['version']}", "",
             "| step | what | link |", "|---|---|---|"]
    lines += [f"| {step} | {what} | {link} |" for step, what, link in rows]
    return "\n".join(lines) + "\n"


def record_lineage(s: ChainSummary, dataset_dir: str, deployed_at: str | None) -> str:
    """Dataset -> training run -> adapter -> evaluations -> registry version -> replicas, as tags on the version and
    as `lineage.md` on the chain's parent run; returns the markdown."""
    c = client()
    version_tags = c.get_model_version(s.registered_model, s.version).tags
    evaluations = {"candidate": version_tags.get("eval_run_id")}
    if s.quantize_run_id:
        evaluations["quantized"] = c.get_run(s.quantize_run_id).data.tags.get("quantized_eval_run_id")
    evaluations = {role: run_id for role, run_id in evaluations.items() if run_id}
    aliases = sorted(a for a, v in c.get_registered_model(s.registered_model).aliases.items() if str(v) == s.version)
    served = (f"{s.served_name} on {', '.join(s.replicas) or 'no replica'} ({s.rollout})" if s.served_name
              else "not deployed")
    tags = {"chain_run_id": s.chain_run_id, "chain_run_url": s.chain_run_url, "curate_run_id": s.curate_run_id,
            "dataset_dir": dataset_dir, "served_by": ",".join(s.replicas) or "none",
            "served_name": s.served_name or "none", "gateway_url": s.gateway_url or "none",
            "retrain_prefect_flow_run_url": s.prefect_flow_run_url or "none",
            **({"production_windows": " | ".join(s.production_windows)} if s.production_windows else {}),
            **({"deployed_at": deployed_at} if deployed_at else {}),
            **{f"eval_run_id_{role}": run_id for role, run_id in evaluations.items()}}
    tag_version_lineage(s.registered_model, s.version, tags)
    markdown = lineage_markdown({
        "registered_model": s.registered_model, "version": s.version, "dataset_hash": s.dataset_hash,
        "dataset_dir": dataset_dir, "curate_run_id": s.curate_run_id, "train_run_id": s.train_run_id,
        "adapter_sha256": s.adapter_sha256, "adapter_dir": s.adapter_dir,
        "promotion": f"{version_tags.get('promotion_decision', '-')} (approval: {version_tags.get('approval', '-')})",
        "promotion_run_url": run_url(version_tags["promotion_run_id"]) if version_tags.get("promotion_run_id") else "",
        "served": served, "gateway_url": s.gateway_url or "", "chain_run_id": s.chain_run_id,
        "chain_run_url": s.chain_run_url, "production_windows": s.production_windows}, evaluations, aliases)
    c.log_text(s.chain_run_id, markdown, "lineage.md")
    return markdown


def tag_version_lineage(name: str, version: str, tags: dict[str, str]) -> None:
    c = client()
    for key, value in tags.items():
        c.set_model_version_tag(name, version, key, str(value)[:5000])

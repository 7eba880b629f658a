"""Per-probe scores of registered versions, as the promotion gate reads them from their evaluation runs.

Every evaluation logs `per_probe.json` (`{model: {"<task>/<metric>": {probe: value}}}`); a version's tags name
its evaluation (`eval_run_id`) and, when it was evaluated on a quantized base, the quantize run.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from charforge import registry
from charforge.errors import InputError
from charforge.promotion import Scores
from charforge.schemas.promote import GATEABLE_METRICS
from charforge.tracking import client


class GateScores(BaseModel):
    """What the gate compares: the candidate, the champion (None for a first version, empty when it cannot be
    compared), the base, and the quantized/bf16 pair when the version was evaluated on a quantized base."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    candidate: Scores
    champion: Scores | None
    base: Scores | None
    champion_source: str
    quantized: tuple[Scores, Scores] | None = None


def run_scores(run_id: str) -> dict[str, Scores]:
    """per_probe.json of an evaluation or quantize run: {model: {"<task>/<metric>": {probe: value}}}."""
    with tempfile.TemporaryDirectory() as tmp:
        return json.loads(Path(client().download_artifacts(run_id, "per_probe.json", tmp)).read_text())


def gate_scores(version: registry.VersionRef) -> GateScores:
    """Candidate and base from the candidate's evaluation; the champion from the same evaluation when it scored the
    current champion, else from the champion's own evaluation on the same probes."""
    run_id = version.tags.get("eval_run_id")
    if not run_id or version.tags.get("eval_status") != "passed":
        raise InputError(f"{version.uri} has no completed evaluation recorded; run `charforge evaluate --adapter "
                         f"{version.uri}` first")
    scores = run_scores(run_id)
    common = {"candidate": scores["candidate"], "base": scores.get("base"), "quantized": quantized(version)}
    c = client()
    champion = registry.alias_version(c, version.name, registry.CHAMPION)
    if champion is None:
        return GateScores(**common, champion=None, champion_source="none (first version)")
    if "champion" in scores and c.get_run(run_id).data.tags.get("champion_adapter_sha256") == champion.tags.get(
            "adapter_sha256"):
        return GateScores(**common, champion=scores["champion"], champion_source=f"version {champion.version} (same run)")
    if champion.tags.get("eval_probes_sha256") != version.tags.get("eval_probes_sha256"):
        return GateScores(**common, champion={}, champion_source=(
            f"version {champion.version} was evaluated on other probes; re-evaluate with --champion "
            f"models:/{version.name}/{champion.version}"))
    return GateScores(**common, champion=run_scores(champion.tags["eval_run_id"])["candidate"],
                      champion_source=f"version {champion.version} (own evaluation)")


def quantized(version: registry.VersionRef) -> tuple[Scores, Scores] | None:
    """(scores on the quantized base, scores on the bf16 base) from the quantize run the version was evaluated in
    (tag `quantize_run_id`, set by `charforge quantize`), else None."""
    run_id = version.tags.get("quantize_run_id")
    if not run_id or run_id == "none":
        return None
    scores = run_scores(run_id)
    return scores["quantized"], scores["bf16"]


def side_by_side(eval_run_id: str, metric: str | None, against: str = "champion") -> list[dict] | None:
    """"Where did the candidate get worse?": one row per (task, probe) of the candidate's evaluation with the
    candidate's, champion's and base's replies and scores side by side. Rows of `metric`'s task (the deciding
    rule's, `<task>/<metric>`) come first, the probes where the candidate lost most to `against` (the rule's
    reference: "champion" or "base"; its loss in column `loss`) at the top; the replies come before the other
    scores, which is what the MLflow table view shows first. None when the run has no samples table."""
    try:
        with tempfile.TemporaryDirectory() as tmp:
            table = json.loads(Path(client().download_artifacts(eval_run_id, "eval_samples.json", tmp)).read_text())
        per_probe = run_scores(eval_run_id)
    except Exception:  # an evaluation logged before the samples table existed, or a lost artifact
        return None
    columns, data = table["columns"], table["data"]
    rows: dict[tuple[str, str], dict] = {}
    context = ("character", "user_msg", "reference")
    skip = {"model", "task", "probe", "probe_type", *context}
    for values in data:
        record = dict(zip(columns, values))
        row = rows.setdefault((record["task"], record["probe"]), {
            "task": record["task"], "probe": record["probe"], "_context": {k: record[k] for k in context}})
        for name, value in record.items():
            if name in skip or value is None or value != value:  # NaN: a metric this task does not have
                continue
            row[f"{record['model']}_{name}"] = value
    # the scores the gate pairs (bits/byte per reply, the persona effect), which the samples table has no column for
    for model, by_metric in per_probe.items():
        for key, values in by_metric.items():
            task_name, _, metric_name = key.partition("/")
            for probe, value in values.items():
                row = rows.setdefault((task_name, probe), {"task": task_name, "probe": probe,
                                                           "_context": dict.fromkeys(context, "")})
                row.setdefault(f"{model}_{metric_name}", value)
    task, _, name = (metric or "").partition("/")
    sign = 1.0 if GATEABLE_METRICS.get(metric or "", True) else -1.0

    def loss(row: dict) -> float | None:
        if row["task"] != task or f"candidate_{name}" not in row or f"{against}_{name}" not in row:
            return None
        return sign * (float(row[f"{against}_{name}"]) - float(row[f"candidate_{name}"]))

    def ordered(row: dict) -> dict:
        first = [f"{model}_{name}" for model in ("candidate", against) if name] + [
            f"{model}_response" for model in ("candidate", "champion", "base")]
        out = {"task": row["task"], "probe": row["probe"], "loss": loss(row)}
        out.update({k: row[k] for k in first if k in row})
        out.update({k: v for k, v in row.items() if k not in out and k != "_context"})
        return {**out, **row["_context"]}

    def order(row: dict) -> tuple:
        lost = loss(row)
        return (lost is None, -(lost or 0.0), row["task"], row["probe"])

    return [ordered(r) for r in sorted(rows.values(), key=order)]

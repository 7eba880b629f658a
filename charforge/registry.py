"""The MLflow model registry side: adapter versions with their lineage, and the aliases that say what is live.

One registered model per adapter family, `<prefix>-<training config name>` (e.g. `charforge-smollm2-lora`): an
adapter carries all characters, so a version is one adapter and the evaluation inside it is per character.

Aliases: `candidate` (evaluated last), `champion` (what serving runs), `previous` (the champion before, for
rollback). Moving `champion` is the only way a version goes live, and `promote_aliases` is the only code that does.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import mlflow
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from pydantic import BaseModel, ConfigDict

from charforge.clock import utc
from charforge.checksums import folder_sha, verify_manifest
from charforge.errors import InputError, Refused
from charforge.promotion import Decision
from charforge.results import RegisteredVersion
from charforge.schemas.promote import PromotionPolicy
from charforge.settings import platform, redact_credentials, repo_path
from charforge.tracking import client, use_experiment
from charforge.training.servability import pickle_files, require_safetensors

CANDIDATE, CHAMPION, PREVIOUS = "candidate", "champion", "previous"
PENDING = "pending_promotion"  # registered-model tag: an alias move that was decided but may not have finished


def registered_name(train_config: str) -> str:
    return f"{platform().mlflow.experiment_prefix}-{train_config}"


HINTS = {"adapter": "pass a training run's adapter folder (.state/training/<run>/adapter) or models:/<name>/<version>",
         "checkpoint": "pass a `charforge quantize` output folder (.state/quantized/<name>/...) or "
                       "models:/<name>/<version> of a registered quantized model"}


def resolve_alias(ref: str) -> str:
    """`models:/name@alias` as the version it points at now (`models:/name/7`); any other reference unchanged.
    An alias that does not exist is left as it is: the download names it in its error."""
    if not ref.startswith("models:/") or "@" not in ref:
        return ref
    name, alias = ref.removeprefix("models:/").split("@", 1)
    try:
        return f"models:/{name}/{client().get_model_version_by_alias(name, alias).version}"
    except MlflowException:
        return ref


def fetch_verified(ref: str, downloads: Path, kind: str = "adapter") -> Path:
    """A local folder, or an MLflow model URI (`models:/name/version`, `models:/name@alias`) downloaded once into
    `downloads`; either way safetensors only, and its sha256 manifest must verify before anything loads it."""
    if ref.startswith(("models:/", "runs:/")):
        resolved = resolve_alias(ref)  # cached by the version the alias points at now, never by the alias name
        target = downloads / resolved.split(":/", 1)[1].replace("/", "-")
        if not (target / "charforge-manifest.json").is_file():
            try:
                mlflow.set_tracking_uri(platform().tracking_uri)
                mlflow.artifacts.download_artifacts(artifact_uri=resolved, dst_path=str(target))
            except Exception as exc:  # MLflow raises several types for a missing model/version/alias
                raise InputError(redact_credentials(
                    f"{ref}: cannot fetch from the MLflow registry at {platform().tracking_uri} "
                    f"({type(exc).__name__}: {str(exc).splitlines()[0]}); check the name and version with the "
                    f"MLflow UI")) from None
        path = target
    else:
        path = repo_path(ref)
        if not path.is_dir():
            raise InputError(f"{ref}: {kind} folder not found; {HINTS[kind]}")
    if kind == "adapter":
        require_safetensors(path)  # before PEFT or vLLM could unpickle an adapter_model.bin
    elif pickle_files(path):
        raise InputError(f"{ref}: {', '.join(pickle_files(path))}: pickle weights (loading them can run code); "
                          f"only safetensors checkpoints are served")
    verify_manifest(path, "re-export it from its training run" if kind == "adapter" else "re-run charforge quantize")
    return path


class VersionRef(BaseModel):
    """A registry version as the stages pass it on: name, number, where its files are, its tags."""

    model_config = ConfigDict(frozen=True, extra="forbid", coerce_numbers_to_str=True)

    name: str
    version: str
    source: str
    tags: dict[str, str] = {}

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


def version_ref(entry: ModelVersion) -> VersionRef:
    return VersionRef(name=entry.name, version=str(entry.version), source=entry.source, tags=dict(entry.tags))


class AliasMove(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", coerce_numbers_to_str=True)

    champion: str
    previous: str | None = None
    changed: bool


def find_version_by_sha(c: MlflowClient, name: str, adapter_sha: str,
                        key: str = "adapter_sha256") -> ModelVersion | None:
    versions = c.search_model_versions(f"name = '{name}' and tag.{key} = '{adapter_sha}'")
    return min(versions, key=lambda v: int(v.version)) if versions else None


def register_adapter(c: MlflowClient, name: str, source: str, run_id: str | None, adapter_sha: str,
                     tags: dict[str, str], key: str = "adapter_sha256",
                     description: str = "charforge LoRA adapters (all characters); aliases: candidate, champion, "
                                        "previous") -> ModelVersion:
    """The version for this artifact (by the sha256 in tag `key`), created once; later calls only update its tags.
    Adapters use `adapter_sha256`; quantized models (`charforge quantize`) use `artifact_sha256`."""
    try:
        c.get_registered_model(name)
    except MlflowException:
        c.create_registered_model(name, description=description)
    version = find_version_by_sha(c, name, adapter_sha, key)
    if version is None:
        version = c.create_model_version(name, source, run_id=run_id, tags={key: adapter_sha})
    for tag, value in tags.items():
        c.set_model_version_tag(name, version.version, tag, str(value))
    return c.get_model_version(name, version.version)


def resolve_version(c: MlflowClient, ref: str) -> ModelVersion:
    """`models:/<name>/<version>` or `models:/<name>@<alias>` -> the registry entry (InputError if absent)."""
    if not ref.startswith("models:/"):
        raise InputError(f"{ref}: expected models:/<name>/<version> or models:/<name>@<alias>")
    body = ref.removeprefix("models:/")
    try:
        if "@" in body:
            name, alias = body.split("@", 1)
            return c.get_model_version_by_alias(name, alias)
        name, _, number = body.partition("/")
        return c.get_model_version(name, number)
    except MlflowException as exc:
        raise InputError(redact_credentials(f"{ref}: not in the MLflow registry at {platform().tracking_uri} "
                                             f"({str(exc).splitlines()[0]})")) from None


def alias_version(c: MlflowClient, name: str, alias: str) -> ModelVersion | None:
    try:
        return c.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def served_role(c: MlflowClient, served: str) -> str:
    """What a served name (`<registered model>-v<N>`, as the gateway routes it) is now: `champion` when the registry's
    champion alias points at it, `canary` for any other registered version, `base` for anything else (the base model,
    a name the registry does not hold)."""
    match = re.fullmatch(r"(.+)-v(\d+)", served)
    if match is None:
        return "base"
    try:
        c.get_model_version(match[1], match[2])
    except MlflowException:
        return "base"
    champion = alias_version(c, match[1], CHAMPION)
    return "champion" if champion is not None and str(champion.version) == match[2] else "canary"


def promote_aliases(c: MlflowClient, name: str, version: str, crash_hook=None) -> AliasMove:
    """candidate -> champion, old champion -> previous, as one logical step.

    The intended move is written to the registered model first (`pending_promotion`); the aliases move; the marker
    is removed. A crash in between leaves the marker, and `finish_pending` completes exactly that move on the next
    run, so a half-done promotion is never the registry's final state.
    """
    entry = c.get_model_version(name, version)
    if entry.tags.get("eval_status") != "passed" or not gate_passed(entry.tags):
        raise Refused(f"{name} version {version} has no passing evaluation, promotion decision and approval "
                      f"recorded; refusing to make it champion")
    old = alias_version(c, name, CHAMPION)
    if old is not None and old.version == str(version):
        return AliasMove(champion=str(version), previous=_alias_number(c, name, PREVIOUS), changed=False)
    move = {"version": str(version), "old_champion": old.version if old else None, "at": time.time()}
    c.set_registered_model_tag(name, PENDING, json.dumps(move))
    if crash_hook:
        crash_hook("alias_move")
    return _apply(c, name, move)


def _apply(c: MlflowClient, name: str, move: dict) -> AliasMove:
    if move["old_champion"] and move["old_champion"] != move["version"]:
        c.set_registered_model_alias(name, PREVIOUS, move["old_champion"])
    c.set_registered_model_alias(name, CHAMPION, move["version"])
    c.set_model_version_tag(name, move["version"], "champion_since", utc())
    c.delete_registered_model_tag(name, PENDING)
    return AliasMove(champion=move["version"], previous=move["old_champion"], changed=True)


def finish_pending(c: MlflowClient, name: str) -> AliasMove | None:
    """Complete an alias move a crashed promotion decided but did not finish (None when there is none)."""
    try:
        tags = c.get_registered_model(name).tags
    except MlflowException:
        return None
    if PENDING not in tags:
        return None
    return _apply(c, name, json.loads(tags[PENDING]))


def _alias_number(c: MlflowClient, name: str, alias: str) -> str | None:
    entry = alias_version(c, name, alias)
    return entry.version if entry else None


def adapter_lineage(manifest_path: Path) -> dict[str, str]:
    """The lineage an adapter's manifest records (base model, dataset hash, training run, ...)."""
    return {k: str(v) for k, v in json.loads(Path(manifest_path).read_text())["lineage"].items()}


def family_characters(tags: dict[str, str]) -> list[str] | None:
    """An adapter family's characters, from its version's `characters` tag (None: every character)."""
    return [c for c in tags.get("characters", "").split(",") if c] or None


def register_candidate(adapter_dir: Path, lineage: dict[str, str], eval_run_id: str, probes_sha: str,
                       flow_tags: dict[str, str] | None = None) -> RegisteredVersion:
    """The evaluated adapter as a registry version (one per adapter sha) with its lineage and evaluation, and the
    `candidate` alias on it. The version's files are the training run's adapter artifact when that run is in this
    tracking store, else a copy logged to the evaluation run."""
    c = client()
    name = registered_name(lineage.get("train_config", "adapter"))
    sha = folder_sha(adapter_dir)
    try:
        source_run = c.get_run(lineage.get("mlflow_run_id", ""))
        if not any(a.path == "adapter" for a in c.list_artifacts(source_run.info.run_id)):
            raise ValueError("training run has no adapter artifact")
    except Exception:  # not tracked here (e.g. an adapter trained elsewhere): keep a copy with the evaluation
        c.log_artifacts(eval_run_id, str(adapter_dir), "adapter")
        source_run = c.get_run(eval_run_id)
    flow_tags = flow_tags or {}
    version = register_adapter(c, name, f"{source_run.info.artifact_uri}/adapter", source_run.info.run_id, sha, {
        "base_model": lineage.get("base_model", "unknown"), "base_model_sha": lineage.get("base_model_sha", "unknown"),
        "dataset_hash": lineage.get("dataset_hash", "unknown"), "train_config": lineage.get("train_config", "unknown"),
        "train_run_id": lineage.get("mlflow_run_id", "none"), "eval_run_id": eval_run_id, "eval_status": "passed",
        "eval_probes_sha256": probes_sha, "quantized_base": lineage.get("quantized_base", "none"),
        "prefect_flow_run_url": flow_tags.get("prefect_flow_run_url", flow_tags.get("prefect_flow_run_id", "none")),
        # a preference-tuned adapter: the SFT adapter it started from and the pairs it learned from; an adapter
        # family's characters (the routes a deployment switches) and the hash of their rows
        **{k: lineage[k] for k in ("sft_parent_sha", "pairs_hash", "characters", "family_data_hash") if k in lineage},
    })
    c.set_registered_model_alias(name, CANDIDATE, version.version)
    return RegisteredVersion(name=name, version=str(version.version), uri=f"models:/{name}/{version.version}")


def record_decision(name: str, version: str, decision: Decision, champion_source: str, policy: PromotionPolicy,
                    markdown: str, flow_tags: dict[str, str], side_by_side: list[dict] | None = None) -> str:
    """A promotion decision on the version (tags, a one-line description linking the run) and in an MLflow run of
    `charforge-promote` (decision.json, the policy, the table, and `where_worse.json`: the probes' replies and
    scores of candidate, champion and base side by side, worst first); returns the run id."""
    c = client()
    use_experiment("promote")
    with mlflow.start_run(run_name=f"{name}-v{version}") as run:
        mlflow.set_tags({"stage": "promote", "registered_model": name, "model_version": version, **flow_tags})
        mlflow.log_params({"promote": decision.promote, "rules": len(policy.rules), "approval": policy.approval,
                           "champion_compared": champion_source[:250]})
        mlflow.log_metrics({f"margin/{rule.replace(' ', '/')}": m for rule, m in decision.margins().items()})
        mlflow.log_dict(decision.as_dict(), "decision.json")
        mlflow.log_dict(policy.model_dump(mode="json"), "policy.json")
        mlflow.log_text(markdown, "decision.md")
        if side_by_side:
            import pandas as pd

            mlflow.log_table(pd.DataFrame(side_by_side), artifact_file="where_worse.json")
    tags = {"promotion_decision": "promote" if decision.promote else "reject",
            "promotion_reasons": "; ".join(decision.reasons)[:5000], "promotion_run_id": run.info.run_id,
            "promotion_decided_at": utc(),
            "approval": "pending" if decision.needs_approval else "not_required",
            "promotion_margins": json.dumps(decision.margins())[:5000]}
    deciding = decision.deciding
    if deciding is not None:
        tags["promotion_deciding_rule"] = deciding.rule
        tags["promotion_deciding_margin"] = "none" if deciding.margin is None else f"{deciding.margin:+.4f}"
    for key, value in tags.items():
        c.set_model_version_tag(name, version, key, value)
    # the registry page's description: what a reviewer sees first, instead of truncated tags
    link = f"#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}"
    c.update_model_version(name, version, description=f"{decision.summary()} ([promotion run]({link}): "
                           f"decision.md, where_worse.json)")
    return run.info.run_id


def record_approval(name: str, version: str, approve: bool, comment: str, reviewer: str) -> None:
    c = client()
    c.set_model_version_tag(name, version, "approval", "approved" if approve else "rejected")
    c.set_model_version_tag(name, version, "approval_comment", comment[:5000] or "-")
    c.set_model_version_tag(name, version, "approval_reviewer", reviewer or "-")
    if not approve:
        c.update_model_version(name, version, description=f"REJECTED by reviewer {reviewer or '-'}: "
                               f"{comment[:1000] or 'no comment'}")


class NotPromoted(Refused):
    """`deploy` of a version the promotion gate did not pass (and no override)."""


def gate_passed(tags: dict[str, str]) -> bool:
    """The promotion gate said promote and the approval is settled: what champion moves and rollouts both need."""
    return tags.get("promotion_decision") == "promote" and tags.get("approval") in ("approved", "not_required")


def deploy_clearance(version: VersionRef) -> str | None:
    """None when the version may be rolled out (`gate_passed`), else why not."""
    tags = version.tags
    decision, approval = tags.get("promotion_decision"), tags.get("approval")
    if gate_passed(tags):
        return None
    if decision is None:
        return "no promotion decision (it was never through `charforge promote`)"
    if decision != "promote":
        rule = tags.get("promotion_deciding_rule")
        return f"the promotion gate refused it{f' ({rule})' if rule else ''}"
    return f"its approval is {approval or 'missing'}"


def require_deployable(version: VersionRef, override_reason: str | None, actor: str) -> dict[str, str] | None:
    """Refuse (exit 3) a version the gate did not promote, unless an override gives a reason: then who, why and
    what was overridden are recorded on the version (tags `deploy_override_*`) and returned for the rollout
    record."""
    why = deploy_clearance(version)
    if why is None:
        return None
    if not override_reason or not override_reason.strip():
        raise NotPromoted(f"{version.uri}: not_promoted: {why}; deploy a version `charforge promote` passed "
                          f"(models:/{version.name}@champion), or pass --override --reason TEXT to record who "
                          f"deploys it anyway and why")
    override = {"by": actor, "reason": override_reason.strip()[:1000], "overridden": why,
                "at": utc()}
    c = client()
    for key, value in override.items():
        c.set_model_version_tag(version.name, version.version, f"deploy_override_{key}", value)
    return override

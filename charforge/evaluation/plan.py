"""What one evaluation scores and where: the adapters resolved and verified, the base they run on, the names vLLM
serves them under, and the run folder. Built before vLLM starts, so a bad reference fails in seconds."""

from __future__ import annotations

import json
import time
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from charforge import registry
from charforge.base_models import load_preset, prepare_base_model
from charforge.checksums import MANIFEST, folder_sha, verify_manifest
from charforge.errors import InputError
from charforge.schemas.evaluate import EvalConfig
from charforge.settings import platform, repo_path


class EvalPlan(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    evaluated: str  # what the report and the MLflow params call it: the adapter reference, or "<base> (base only)"
    short: str  # candidate-<sha12> or base: part of the run folder's name
    primary: str  # "candidate" or "base": whose metrics are the run's unprefixed ones
    base_name: str
    served_dir: str  # the folder vLLM serves: the bf16 base, or `served_base` (e.g. a quantized checkpoint)
    tokenizer_dir: str  # the bf16 base: parity's HF side and client-side chat templating
    candidate_dir: str | None
    champion_dir: str | None
    champion_ref: str | None
    served_base: str | None
    targets: dict[str, str]  # display name (candidate, base, champion) -> served name
    lineage: dict[str, str]  # the candidate adapter's manifest lineage (empty for the base alone)
    run_dir: str

    def adapters(self) -> dict[str, str]:
        """Served name -> folder of every adapter vLLM must load."""
        out = {}
        if self.candidate_dir is not None:
            out[self.targets["candidate"]] = self.candidate_dir
        if self.champion_dir is not None:
            out[self.targets["champion"]] = self.champion_dir
        return out

    def adapter_on_lm_head(self) -> bool:
        """Whether an adapter trains the output layer (`lm_head` in its target modules, or modules to save): vLLM
        cannot attribute prompt log-probability rows to adapters in a batch that mixes them there, so such models
        are scored one at a time (see vllm_plugin/charforge_vllm/grouped_lora.py:per_row)."""
        for folder in self.adapters().values():
            config = json.loads((Path(folder) / "adapter_config.json").read_text())
            targets = config.get("target_modules") or []
            if config.get("modules_to_save") or "lm_head" in (targets if isinstance(targets, list) else [targets]):
                return True
        return False


def resolve_adapter(ref: str, downloads: Path) -> Path:
    """A local adapter folder, or an MLflow model URI downloaded once; either way its sha256 manifest must verify."""
    return registry.fetch_verified(ref, downloads, "adapter")


def plan_evaluation(cfg: EvalConfig, adapter: str | None, base_only: bool, champion: str | None,
                    served_base: str | None, score_base: bool) -> EvalPlan:
    if adapter is None and not base_only:
        raise InputError("nothing to evaluate: pass --adapter <dir | models:/name/version>, or --base-only")
    state = platform().state
    downloads = state / "evals" / "downloads"
    candidate_dir = None if base_only else resolve_adapter(adapter, downloads)
    champion_dir = resolve_adapter(champion, downloads) if champion and not base_only else None
    if candidate_dir is not None:
        lineage = json.loads((candidate_dir / MANIFEST).read_text())["lineage"]  # verified by resolve_adapter
        base_dir, base_name = Path(lineage["base_model_path"]), lineage["base_model"]
        if not base_dir.is_dir():
            base_dir, _ = prepare_base_model(load_preset(base_name))
    else:
        lineage, base_name = {}, cfg.base_model
        base_dir, _ = prepare_base_model(load_preset(base_name))
    served_dir = base_dir
    if served_base is not None:
        served_dir = repo_path(served_base)
        verify_manifest(served_dir, "re-create it with `charforge quantize`")

    targets: dict[str, str] = {}
    if candidate_dir is not None:
        targets["candidate"] = f"candidate-{folder_sha(candidate_dir)[:12]}"
    if score_base or candidate_dir is None:
        targets["base"] = base_name
    if champion_dir is not None:
        targets["champion"] = f"champion-{folder_sha(champion_dir)[:12]}"
    short = targets.get("candidate", "base")
    run_dir = state / "evals" / f"{cfg.name}-{short}-{time.strftime('%Y%m%dT%H%M%S')}"
    run_dir.mkdir(parents=True, exist_ok=True)
    return EvalPlan(evaluated=adapter if candidate_dir is not None else f"{base_name} (base only)", short=short,
                    primary="candidate" if candidate_dir is not None else "base", base_name=base_name,
                    served_dir=str(served_dir), tokenizer_dir=str(base_dir),
                    candidate_dir=str(candidate_dir) if candidate_dir is not None else None,
                    champion_dir=str(champion_dir) if champion_dir is not None else None, champion_ref=champion,
                    served_base=served_base, targets=targets,
                    lineage={k: str(v) for k, v in lineage.items()}, run_dir=str(run_dir))

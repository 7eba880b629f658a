"""What reviewers read: a score table (candidate vs base vs champion, with 95% CIs) and a per-character chart."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow

from charforge.checksums import folder_sha, sha256_file
from charforge.evaluation.harness import read_samples, summary_metrics
from charforge.evaluation.plan import EvalPlan
from charforge.evaluation.score_cache import KEY_TAG, REUSED_TAG, ScoreReuse
from charforge.results import Evaluation, ModelScores, Parity
from charforge.schemas.evaluate import EvalConfig
from charforge.settings import repo_path
from charforge.tracking import use_experiment

# Direction of each metric: True when higher is better. Shown in the table as ↑/↓.
HIGHER_IS_BETTER = {
    "acc": True, "acc_norm": True, "acc_mutual_info": True, "bits_per_byte": False, "persona_effect_bpb": True,
    "char_id_acc": True, "char_id_clf": True,
    "char_id_macro_f1": True, "persona_margin": True, "ref_sim": True, "ooc_rate": False,
    "assistant_voice_rate": False, "style_marker_rate": True, "empty_rate": False, "repetition": False,
    "boundary_ok": True,
}
CHART_METRICS = [("character_mc", "acc_mutual_info"), ("character_generation", "char_id_clf"),
                 ("character_generation", "ooc_rate"), ("character_boundaries", "boundary_ok")]


def score_table(summaries: dict[str, ModelScores]) -> str:
    """Markdown: one row per task/metric, one column per evaluated model, `value [low, high]`."""
    targets = list(summaries)
    rows = sorted({(task, metric) for s in summaries.values() for task, metrics in s.items() for metric in metrics})
    lines = ["| task | metric | " + " | ".join(targets) + " |", "|---|---|" + "---|" * len(targets)]
    for task, metric in rows:
        arrow = {True: " ↑", False: " ↓"}.get(HIGHER_IS_BETTER.get(metric), "")
        cells = []
        for target in targets:
            entry = summaries[target].get(task, {}).get(metric)
            cells.append("–" if entry is None else f"{entry.value:.3f} [{entry.ci_low:.3f}, {entry.ci_high:.3f}]")
        lines.append(f"| {task} | {metric}{arrow} | " + " | ".join(cells) + " |")
    n = next(iter(summaries.values()), {})
    counts = ", ".join(f"{task}: {next(iter(m.values())).n}" for task, m in n.items() if m)
    return "\n".join(lines) + f"\n\nDocuments per task: {counts}. Brackets: bootstrap 95% CI over documents.\n"


def per_character_chart(summaries: dict[str, ModelScores], path: Path) -> Path:
    """Grouped bars per character for the headline metrics, one colour per evaluated model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    panels = [(t, m) for t, m in CHART_METRICS if any(m in s.get(t, {}) for s in summaries.values())]
    fig, axes = plt.subplots(max(1, len(panels)), 1, figsize=(11, 3.2 * max(1, len(panels))), squeeze=False)
    if not panels:  # e.g. an evaluation of log-likelihood tasks alone: say so instead of failing the report
        axes[0, 0].axis("off")
        axes[0, 0].text(0.5, 0.5, "no per-character chart metric among the evaluated tasks "
                        f"({', '.join(f'{t}/{m}' for t, m in CHART_METRICS)})", ha="center", va="center")
    width = 0.8 / max(1, len(summaries))
    for ax, (task, metric) in zip(axes[:, 0], panels):
        characters = sorted({c for s in summaries.values() if metric in s.get(task, {})
                             for c in s[task][metric].per_character})
        x = np.arange(len(characters))
        for i, (target, summary) in enumerate(summaries.items()):
            entry = summary.get(task, {}).get(metric)
            per = entry.per_character if entry is not None else {}
            ax.bar(x + i * width, [per.get(c, 0.0) for c in characters], width, label=target)
        arrow = "↑" if HIGHER_IS_BETTER.get(metric, True) else "↓"
        ax.set_title(f"{task} / {metric} {arrow}")
        ax.set_xticks(x + width * (len(summaries) - 1) / 2, characters, rotation=20, fontsize=8)
        ax.set_ylim(0, 1.05)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def sample_rows(target: str, out_dir: Path) -> list[dict[str, str | float]]:
    """One flat row per (task, document) for the MLflow samples table."""
    rows = []
    for task_name, samples in read_samples(out_dir).items():
        for s in samples:
            doc = s["doc"]
            response = s["filtered_resps"][0] if s.get("filtered_resps") else ""
            rows.append({
                "model": target, "task": task_name, "probe": doc["id"], "character": doc["character"],
                "probe_type": doc["probe_type"], "user_msg": doc["user_msg"],
                "response": response if isinstance(response, str) else "",
                "reference": doc["reference"],
                **{k: float(v) for k, v in s.items() if isinstance(v, (int, float)) and k != "doc_id"},
            })
    return rows


def run_params(cfg: EvalConfig, plan: EvalPlan) -> dict[str, str | int]:
    return {"evaluated": plan.evaluated, "evaluated_short": plan.short, "primary": plan.primary,
            "base_model": plan.base_name, "probes": str(cfg.probes),
            "probes_sha256": sha256_file(repo_path(cfg.probes)), "limit": cfg.limit or "all",
            "tasks": ",".join(cfg.tasks), "bootstrap_resamples": cfg.bootstrap_resamples,
            "targets": ",".join(plan.targets), "served_base": str(plan.served_base) if plan.served_base else "bf16"}


def run_tags(plan: EvalPlan) -> dict[str, str]:
    return {"adapter_sha256": folder_sha(Path(plan.candidate_dir)) if plan.candidate_dir else "none",
            "train_mlflow_run_id": plan.lineage.get("mlflow_run_id", "none"),
            "dataset_hash": plan.lineage.get("dataset_hash", "none"), "champion": plan.champion_ref or "none",
            "champion_adapter_sha256": folder_sha(Path(plan.champion_dir)) if plan.champion_dir else "none",
            "served_base_sha256": folder_sha(Path(plan.served_dir)) if plan.served_base else "bf16"}


def reuse_lines(scores: ScoreReuse) -> str:
    """Markdown: which models' scores came from an earlier run, and which run."""
    return "".join(f"\nScores of {role} reused from evaluation run `{r.run_id}` (scored there as {r.role}; same "
                   f"served artifact, probes, tasks, metric code, settings and versions).\n"
                   for role, r in scores.reused.items())


def score_tags(scores: ScoreReuse) -> dict[str, str]:
    """`score_key.<role>` for every scored model (what later evaluations look up), `scores.<role>.reused_from`."""
    return {**{KEY_TAG.format(role=role): key for role, key in scores.score_keys.items()},
            **{REUSED_TAG.format(role=role): r.run_id for role, r in scores.reused.items()}}


def write_and_log(cfg: EvalConfig, plan: EvalPlan, summaries: dict[str, ModelScores], parity: Parity | None,
                  serving: dict[str, float], scores: ScoreReuse, flow_tags: dict[str, str]) -> Evaluation:
    """scores.json, report.md, per_probe.json, the chart and the sample rows on disk, and all of it in one MLflow
    run of `charforge-evaluate` (the primary model's metrics unprefixed, the others under `<model>/`)."""
    import pandas as pd

    run_dir = Path(plan.run_dir)
    params = run_params(cfg, plan)
    parity_line = ("" if parity is None else
                   f"\nTrain/serve parity: first token {parity.first_token_agreement:.0%}, first {parity.tokens} "
                   f"tokens {parity.prefix_agreement:.0%} of {parity.prompts} prompts (template: "
                   f"{parity.template_source}).\n")
    markdown = (f"# Character evaluation: {plan.evaluated}\n\n{score_table(summaries)}{parity_line}"
                f"{reuse_lines(scores)}")
    (run_dir / "report.md").write_text(markdown)
    (run_dir / "scores.json").write_text(json.dumps({
        "summaries": {t: {task: {m: e.model_dump() for m, e in ms.items()} for task, ms in s.items()}
                      for t, s in summaries.items()},
        "parity": parity.model_dump() if parity else None, **params}, indent=2))
    per_probe = {target: json.loads((run_dir / "lm_eval" / target / "per_probe.json").read_text())
                 for target in summaries}
    (run_dir / "per_probe.json").write_text(json.dumps(per_probe, indent=1))
    chart = per_character_chart(summaries, run_dir / "per_character.png")
    rows = [r for target in summaries for r in sample_rows(target, run_dir / "lm_eval" / target)]

    use_experiment("evaluate")
    with mlflow.start_run(run_name=f"{cfg.name}-{plan.short}") as run:
        mlflow.set_tags({"stage": "evaluate", **run_tags(plan), **score_tags(scores), **flow_tags})
        mlflow.log_params(params)
        for target, summary in summaries.items():
            prefix = "" if target == plan.primary else f"{target}/"
            mlflow.log_metrics({prefix + k: v for k, v in summary_metrics(summary).items()})
        if parity:
            mlflow.log_metrics({"parity/first_token_agreement": parity.first_token_agreement,
                                "parity/prefix_agreement": parity.prefix_agreement})
        mlflow.log_metrics({f"serving/{k}": v for k, v in serving.items()})
        mlflow.log_table(pd.DataFrame(rows), artifact_file="eval_samples.json")
        for name in ("report.md", "scores.json", "per_probe.json"):
            mlflow.log_artifact(str(run_dir / name))
        mlflow.log_artifact(str(chart))
        mlflow.log_artifacts(str(run_dir / "lm_eval"), "lm_eval")
    return Evaluation(mlflow_run_id=run.info.run_id, run_dir=str(run_dir), report=str(run_dir / "report.md"),
                      chart=str(chart), summaries=summaries, targets=plan.targets, primary=plan.primary,
                      parity=parity, serving=serving,
                      reused_scores={role: r.run_id for role, r in scores.reused.items()})

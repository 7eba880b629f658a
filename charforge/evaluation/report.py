"""What reviewers read: a score table (candidate vs base vs champion, with 95% CIs) and a per-character chart."""

from __future__ import annotations

from pathlib import Path

# Direction of each metric: True when higher is better. Shown in the table as ↑/↓.
HIGHER_IS_BETTER = {
    "acc": True, "acc_norm": True, "acc_mutual_info": True, "bits_per_byte": False, "persona_effect_bpb": True,
    "char_id_acc": True,
    "char_id_macro_f1": True, "persona_margin": True, "ref_sim": True, "ooc_rate": False,
    "assistant_voice_rate": False, "style_marker_rate": True, "empty_rate": False, "repetition": False,
    "boundary_ok": True,
}
CHART_METRICS = [("character_mc", "acc_mutual_info"), ("character_generation", "char_id_acc"),
                 ("character_generation", "ooc_rate"), ("character_boundaries", "boundary_ok")]


def score_table(summaries: dict[str, dict]) -> str:
    """Markdown: one row per task/metric, one column per evaluated model, `value [low, high]`."""
    targets = list(summaries)
    rows = sorted({(task, metric) for s in summaries.values() for task, metrics in s.items() for metric in metrics})
    lines = ["| task | metric | " + " | ".join(targets) + " |", "|---|---|" + "---|" * len(targets)]
    for task, metric in rows:
        arrow = {True: " ↑", False: " ↓"}.get(HIGHER_IS_BETTER.get(metric), "")
        cells = []
        for target in targets:
            entry = summaries[target].get(task, {}).get(metric)
            cells.append("–" if entry is None else
                         f"{entry['value']:.3f} [{entry['ci_low']:.3f}, {entry['ci_high']:.3f}]")
        lines.append(f"| {task} | {metric}{arrow} | " + " | ".join(cells) + " |")
    n = next(iter(summaries.values()), {})
    counts = ", ".join(f"{task}: {next(iter(m.values()))['n']}" for task, m in n.items() if m)
    return "\n".join(lines) + f"\n\nDocuments per task: {counts}. Brackets: bootstrap 95% CI over documents.\n"


def per_character_chart(summaries: dict[str, dict], path: Path) -> Path:
    """Grouped bars per character for the headline metrics, one colour per evaluated model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    panels = [(t, m) for t, m in CHART_METRICS if any(m in s.get(t, {}) for s in summaries.values())]
    fig, axes = plt.subplots(len(panels), 1, figsize=(11, 3.2 * len(panels)), squeeze=False)
    width = 0.8 / max(1, len(summaries))
    for ax, (task, metric) in zip(axes[:, 0], panels):
        characters = sorted({c for s in summaries.values() for c in s.get(task, {}).get(metric, {})
                             .get("per_character", {})})
        x = np.arange(len(characters))
        for i, (target, summary) in enumerate(summaries.items()):
            per = summary.get(task, {}).get(metric, {}).get("per_character", {})
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

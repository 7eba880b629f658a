"""The evaluation stage as the evaluate flow runs it, before and after prefix caching, batching and score reuse,
side by side.

    .venv/bin/python bench/eval_stage.py [--adapter DIR] [--limit 32] [--baseline no-prefix-cache|one-at-a-time|none]

Runs the real `evaluate` flow (vLLM + LoRA, lm-eval, reports, MLflow) in a fresh state folder and MLflow store:
  1. the baseline   candidate + base, cold (`reuse_scores: false`), the way evaluation ran before: by default
                    `no-prefix-cache` (`loglikelihood_prefix_cache: false`: every log-likelihood request prefills
                    its whole prompt); `one-at-a-time`: log-likelihoods one prompt at a time, without the prefix
                    cache, in their own lm-eval pass; `models-in-turn`: everything as in run 2, except the models
                    are scored one after the other (`score_models_together: false`); `none` skips it (and the
                    score comparison that needs it);
  2. batched        candidate + base, cold: log-likelihoods `loglikelihood_concurrency` at a time, their contexts
                    read from vLLM's prefix cache, the models scored at the same time (the demo's evaluation
                    stage);
  3. three, cold    a second candidate + base + champion (the first candidate), batched, nothing reused;
  4. warm           a third candidate + base + champion, batched: base and champion are reused from the runs
                    before, only the new candidate is scored.
Prints each run's wall time (vLLM start-up included) and the ratios, then the largest difference between runs 1
and 2 in any summary score and in any probe's value (the proof that the faster path does not change scores).
The second and third candidates are the first with its LoRA B matrices scaled by 0.9 and 0.8: other artifacts,
the same shapes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def scaled_adapter(adapter: Path, out: Path, scale: float) -> Path:
    """A copy of `adapter` with every lora_B scaled by `scale` (a different sha, the same lineage and shapes)."""
    from safetensors.torch import load_file, save_file

    from charforge.checksums import MANIFEST, write_manifest

    shutil.copytree(adapter, out)
    weights = out / "adapter_model.safetensors"
    tensors = {k: (v * scale if "lora_B" in k else v).contiguous() for k, v in load_file(weights).items()}
    save_file(tensors, weights)
    manifest = json.loads((adapter / MANIFEST).read_text())
    (out / MANIFEST).unlink()
    write_manifest(out, {k: v for k, v in manifest.items() if k != "files"})
    return out


def largest_differences(a: Path, b: Path, tasks: list[str]) -> tuple[float, str, float, str]:
    """(largest |Δ| of a summary value, where; largest |Δ| of a per-probe value, where) of `tasks` between two
    run folders."""
    worst = (0.0, "-", 0.0, "-")
    summary_a, summary_b = (json.loads((p / "scores.json").read_text())["summaries"] for p in (a, b))
    for model, by_task in summary_a.items():
        for task, metrics in by_task.items():
            for metric, entry in metrics.items() if task in tasks else ():
                d = abs(entry["value"] - summary_b[model][task][metric]["value"])
                if d > worst[0]:
                    worst = (d, f"{model} {task}/{metric}", *worst[2:])
    probes_a, probes_b = (json.loads((p / "per_probe.json").read_text()) for p in (a, b))
    for model, metrics in probes_a.items():
        for metric, values in metrics.items():
            for probe, value in values.items() if metric.split("/")[0] in tasks else ():
                d = abs(value - probes_b[model][metric][probe])
                if d > worst[2]:
                    worst = (*worst[:2], d, f"{model} {metric} {probe}")
    return worst


def minutes(seconds: float) -> str:
    return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapter", type=Path, default=None, help="default: the newest trained adapter")
    parser.add_argument("--limit", type=int, default=32, help="documents per task (0: all 136 probes)")
    parser.add_argument("--config", type=Path, default=Path("configs/eval/quick.yaml"))
    parser.add_argument("--baseline", choices=["no-prefix-cache", "one-at-a-time", "models-in-turn", "none"],
                        default="no-prefix-cache",
                        help="run 1: what the batched stage is compared with")
    args = parser.parse_args()

    from charforge.settings import platform
    from charforge.training.adapters import newest_adapter

    adapter = (args.adapter or newest_adapter()).resolve()
    work = Path(tempfile.mkdtemp(prefix="eval-stage-"))
    state = platform().state  # the project's state folder (CHARFORGE_STATE_DIR, else configs/platform.yaml's)
    (work / "state").mkdir()
    if (state / "models").is_dir():
        (work / "state" / "models").symlink_to(state / "models")  # the verified base, not a rebuild
    os.environ["CHARFORGE_STATE_DIR"] = str(work / "state")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{work / 'mlflow.db'}"

    from charforge.config import load_yaml_model
    from charforge.evaluation.harness import GENERATION_TASKS, LOGLIKELIHOOD_TASKS
    from charforge.schemas.evaluate import EvalConfig
    from flows.evaluate import evaluate

    cfg = load_yaml_model(args.config, EvalConfig).model_copy(
        update={"limit": args.limit or None, "register_version": False})
    second = scaled_adapter(adapter, work / "adapter-2", 0.9)
    third = scaled_adapter(adapter, work / "adapter-3", 0.8)
    cold = cfg.model_copy(update={"reuse_scores": False})
    baseline = {"no-prefix-cache": {"loglikelihood_prefix_cache": False},
                "one-at-a-time": {"loglikelihood_concurrency": 1, "loglikelihood_prefix_cache": False},
                "models-in-turn": {"score_models_together": False}}
    runs = [
        (args.baseline, cold.model_copy(update=baseline.get(args.baseline, {})), dict(adapter=str(adapter)),
         "candidate + base"),
        ("batched", cold, dict(adapter=str(adapter)), "candidate + base"),
        ("three, cold", cold, dict(adapter=str(second), champion=str(adapter)), "candidate + base + champion"),
        ("warm", cfg.model_copy(update={"reuse_scores": True}), dict(adapter=str(third), champion=str(adapter)),
         "candidate (base, champion reused)"),
    ][1 if args.baseline == "none" else 0:]
    seconds, folders = {}, {}
    for label, run_cfg, kwargs, _ in runs:
        started = time.perf_counter()
        result = evaluate(run_cfg, **kwargs)
        seconds[label] = time.perf_counter() - started
        folders[label] = Path(result.run_dir)
        print(f"{label}: {seconds[label]:.0f} s, reused {result.reused_scores or 'nothing'}", flush=True)

    docs = f"{args.limit} documents per task" if args.limit else "all probes"
    print(f"\nevaluation stage, {docs}, adapter {adapter.name} (vLLM start-up included)")
    first = runs[0][0]
    print(f"{'run':<16}{'models scored':<36}{'wall s':>8}{'wall':>10}{'vs ' + first:>22}")
    for label, _, _, scored in runs:
        print(f"{label:<16}{scored:<36}{seconds[label]:>8.0f}{minutes(seconds[label]):>10}"
              f"{seconds[label] / seconds[first]:>21.2f}x")
    differences = {}
    for group, tasks in (("log-likelihood", LOGLIKELIHOOD_TASKS), ("generation", GENERATION_TASKS)) \
            if args.baseline in folders else ():
        d_summary, where_summary, d_probe, where_probe = largest_differences(
            folders[args.baseline], folders["batched"], tasks)
        differences[group] = {"summary": d_summary, "probe": d_probe}
        print(f"{group} tasks, batched vs {args.baseline}: largest summary difference {d_summary:.2e} "
              f"({where_summary}), largest per-probe difference {d_probe:.2e} ({where_probe})")
    if differences:
        print("(generation runs at the same concurrency in both: its difference is vLLM's run-to-run variation)")
    (work / "timings.json").write_text(json.dumps({"seconds": seconds, "differences": differences}, indent=2))
    print(f"outputs: {work}")


if __name__ == "__main__":
    main()

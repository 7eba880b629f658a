"""Does preference tuning make the characters more consistent than SFT alone? Base, SFT and SFT + each preference
config on all 136 probes, with paired 95% CIs against SFT and the production gate's decision.

    .venv/bin/python bench/preference_table.py [--prefer configs/prefer/smollm2_dpo.yaml,configs/prefer/smollm2_kto.yaml]
                                               [--state .state/gate-fixtures] [--eval configs/eval/default.yaml]

The SFT adapter is the demo's training config (configs/train/smollm2_lora.yaml) on data/raw curated with pairs
(configs/curate/preference.yaml): the champion of `bench/gate_fixtures.py`, whose state folder this shares, so its
base and SFT scores are reused from the evaluation's score cache. Each preference config runs `charforge prefer`'s
flow on that adapter (a finished run is reused) and its adapter is evaluated against the SFT adapter as champion and
the base, then judged by the production policy (configs/promotion.yaml). Printed: per model, the metrics the goal
names with their paired gain over SFT (95% bootstrap CI, 2000 resamples), the held-out pair accuracy (pairs of the
evaluation split), and the stage's cost (pairs/s, tokens/s, peak memory, wall time) beside SFT's. Results
accumulate in `<state>/preference.jsonl`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# (task/metric, higher is better): the goal's metrics. char_id_clf is the gate's character-identification judge on
# generated replies; ooc_rate and boundary_ok are out-of-character and card boundaries; bits_per_byte is the voice.
METRICS = [("character_generation/char_id_clf", True), ("character_generation/char_id_acc", True),
           ("character_generation/ooc_rate", False), ("character_boundaries/boundary_ok", True),
           ("character_reply_likelihood/bits_per_byte", False), ("character_generation/repetition", False)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prefer", default="configs/prefer/smollm2_dpo.yaml,configs/prefer/smollm2_kto.yaml")
    parser.add_argument("--state", default=str(REPO / ".state" / "gate-fixtures"))
    parser.add_argument("--eval", default="configs/eval/default.yaml")
    parser.add_argument("--policy", default="configs/promotion.yaml")
    parser.add_argument("--table", action="store_true", help="only print the table of every row measured so far "
                        "(<state>/preference.jsonl, the newest row per config)")
    args = parser.parse_args()
    root = Path(args.state).resolve()
    if args.table:
        newest = {}
        for line in (root / "preference.jsonl").read_text().splitlines():
            row = json.loads(line)
            if "sft_vs_base" in row:  # rows written before the SFT row was recorded are left out
                newest[row["config"]] = row
        return print_table(list(newest.values()))
    os.environ["CHARFORGE_STATE_DIR"] = str(root / "state")

    from charforge.config import load_yaml_model
    from charforge.promotion import decide, paired_gain
    from charforge.schemas.curate import CurateConfig
    from charforge.schemas.evaluate import EvalConfig
    from charforge.schemas.prefer import PreferConfig
    from charforge.schemas.promote import PromotionPolicy
    from charforge.schemas.train import TrainConfig
    from flows.curate import curate
    from flows.evaluate import evaluate
    from flows.prefer import prefer
    from flows.train import train

    from charforge.base_models import load_preset, prepare_base_model

    prepare_base_model(load_preset("smollm2-135m-instruct"))  # the state folder's own verified base (idempotent)
    dataset = root / "state" / "datasets" / "default"
    curate(inputs=(str(REPO / "data" / "raw"),), out_dir=str(dataset),
           config=load_yaml_model(REPO / "configs" / "curate" / "preference.yaml", CurateConfig))
    eval_cfg = load_yaml_model(REPO / args.eval, EvalConfig).model_copy(update={"register_version": False})
    policy = load_yaml_model(REPO / args.policy, PromotionPolicy)
    out = root / "preference.jsonl"

    def fit_json(run_dir: str) -> dict:
        path = Path(run_dir) / "fit.json"
        return json.loads(path.read_text())["metrics"] if path.is_file() else {}

    def cost(fit: dict) -> dict:
        """Rows (pairs; KTO: examples) per second, tokens per second, peak memory and wall time of a fit."""
        runtime = fit.get("train_runtime") or float("nan")
        return {"rows_per_s": fit.get("train_samples_per_second"), "peak_memory_mb": fit.get("peak_memory_mb"),
                "tokens_per_s": round(fit["num_tokens"] / runtime, 1) if fit.get("num_tokens") else None,
                "train_runtime_s": fit.get("train_runtime"), "wall_s": fit.get("wall_seconds")}

    def gain_of(candidate: list, other: list, higher: bool) -> dict:
        gain, low, high, n = paired_gain(candidate, other, higher, policy.confidence, policy.resamples)
        return {"gain": round(gain, 4), "ci_low": round(low, 4), "ci_high": round(high, 4), "n": n}

    rows, sfts = [], {}
    for path in args.prefer.split(","):
        cfg = load_yaml_model(REPO / path, PreferConfig).model_copy(update={"dataset_dir": dataset})
        if cfg.sft not in sfts:  # each config's own SFT parent (LoRA or QLoRA), trained once
            sfts[cfg.sft] = train(config=load_yaml_model(REPO / cfg.sft, TrainConfig), dataset_dir=str(dataset))
        sft = sfts[cfg.sft]
        t = time.monotonic()
        tuned = prefer(config=cfg, dataset_dir=str(dataset))
        print(f"  {cfg.name}: {time.monotonic() - t:.0f} s -> {tuned.adapter_dir}", flush=True)
        t = time.monotonic()
        result = evaluate(config=eval_cfg, adapter=tuned.adapter_dir, champion=sft.adapter_dir)
        per_probe = json.loads((Path(result.run_dir) / "per_probe.json").read_text())
        decision = decide(per_probe["candidate"], per_probe["champion"], per_probe["base"], policy)
        gains, sft_vs_base = {}, {}
        for metric, higher in METRICS:
            for other in ("champion", "base"):
                if metric in per_probe["candidate"] and metric in per_probe.get(other, {}):
                    gains[f"{metric} vs_{'sft' if other == 'champion' else 'base'}"] = gain_of(
                        per_probe["candidate"][metric], per_probe[other][metric], higher)
            if metric in per_probe["champion"] and metric in per_probe.get("base", {}):  # the SFT row
                sft_vs_base[metric] = gain_of(per_probe["champion"][metric], per_probe["base"][metric], higher)
        fit = fit_json(tuned.run_dir)
        row = {"config": path, "method": cfg.method, "beta": cfg.training.beta, "steps": cfg.training.max_steps,
               "negatives": cfg.negatives or "all", "sft": str(cfg.sft), "sft_vs_base": sft_vs_base,
               "adapter_sha256": tuned.adapter_sha256, "eval_run": result.mlflow_run_id,
               "eval_s": round(time.monotonic() - t), "decision": "promote" if decision.promote else "REFUSE",
               "deciding_rule": decision.deciding.rule if decision.deciding else "-",
               "failed": [c.rule for c in decision.checks if not c.passed], "gains": gains,
               "heldout_pair_accuracy": fit.get("heldout/pair_accuracy"), "heldout_pairs": fit.get("heldout/pairs"),
               "heldout_by_kind": {k.rsplit("/", 1)[1]: v for k, v in fit.items()
                                   if k.startswith("heldout/pair_accuracy/")},
               "fit": cost(fit), "sft_fit": cost(fit_json(sft.run_dir))}
        rows.append(row)
        with out.open("a") as fh:
            fh.write(json.dumps(row) + "\n")
        print(f"  {cfg.name} under production: {row['decision']} ({row['deciding_rule']}; failed: "
              f"{', '.join(row['failed']) or 'none'}); held-out pair accuracy {row['heldout_pair_accuracy']}",
              flush=True)

    print_table(rows)


def print_table(rows: list[dict]) -> None:
    """Each preference row's cost beside its SFT parent's, then one table: each SFT parent against the base, and
    each preference adapter against its SFT parent (gains signed so that positive is better, 95% CIs)."""
    for r in rows:
        print(f"\ncost: SFT ({r['sft']}) {r['sft_fit']}\ncost: {r['method']} ({r['config']}) {r['fit']}")

    def cell(g: dict | None) -> str:
        return f"{g['gain']:+.3f} [{g['ci_low']:+.3f}, {g['ci_high']:+.3f}]" if g else "-"

    header = ["model", "decision"] + [f"{m.split('/')[1]} vs SFT" for m, _ in METRICS] + ["held-out pair acc"]
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for sft_name in dict.fromkeys(r["sft"] for r in rows):  # each SFT parent against the base (its gain), once
        r = next(r for r in rows if r["sft"] == sft_name)
        print(f"| SFT {sft_name} (vs base) | - | " + " | ".join(cell(r["sft_vs_base"].get(m)) for m, _ in METRICS)
              + " | - |")
    for r in rows:
        kinds = ", ".join(f"{k} {v:.2f}" for k, v in r["heldout_by_kind"].items())
        print(f"| {r['method']} (β {r['beta']}, {r['steps']} steps, negatives {r['negatives']}; {r['sft']}) | "
              f"{r['decision']} | " + " | ".join(cell(r["gains"].get(f"{m} vs_sft")) for m, _ in METRICS)
              + f" | {r['heldout_pair_accuracy']} ({kinds}) |")

if __name__ == "__main__":
    main()

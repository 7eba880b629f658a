"""The character monitor's limits (configs/monitor.yaml) against the replies of real adapters: would a window of their
live traffic drift, and how many of their replies would be flagged one by one?

    .venv/bin/python bench/monitor_calibration.py [--state .state/gate-fixtures] [--config configs/monitor.yaml]
                                                   [--min-replies 10]

It reads what `bench/gate_fixtures.py` left in its state folder: the replies every served model generated for the
evaluation probes (lm-eval's `samples_character_generation_*` and `samples_character_boundaries_*` files: the
probe's system prompt, history and user turn, and the reply), and names each model by what it was trained on (the
base; the good adapters; each flawed fixture at its dose). Each model's replies become the captured rows of one
window (route = the probe's character, version = the model), judged by `charforge/monitoring.py` exactly as the
hourly monitor judges live traffic. Prints, per model: the window's figures over all its replies, how many routes
drift (each route with at least `--min-replies` replies is judged; a probe set gives 17 per character, under the
config's 20), the metrics crossed, and the replies flagged.

Nothing is generated here: the replies are the ones the gate saw, so the table says whether the monitor would have
caught in live traffic what the gate refused before rollout.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def model_names(state: Path) -> dict[str, str]:
    """Served name (`candidate-<sha12>`) -> what the adapter was trained on, from the bench's training runs."""
    fixtures = {}
    for manifest in (state / "datasets").glob("*/manifest.json"):
        data = json.loads(manifest.read_text())
        transform = data.get("transform")
        fixtures[data["dataset_hash"]] = f"{transform['fixture']}/{transform['dose']}" if transform else None
    names = {}
    for run in (state / "state" / "training").glob("*/run.json"):
        result = json.loads(run.read_text()).get("result") or {}
        if not result.get("adapter_sha256"):
            continue
        label = fixtures.get(result.get("dataset_hash"))
        if label is None:
            label = "good/" + ("seed7" if "seed7" in run.parent.name else "seed13")
        names[f"candidate-{result['adapter_sha256'][:12]}"] = label
    return names


def served_replies(state: Path) -> dict[str, list[Path]]:
    """Served model -> its generation and boundary sample files, from the evaluation with the most probes."""
    best: dict[str, tuple[int, list[Path]]] = {}
    for gen in (state / "state" / "evals").glob("*/lm_eval/*/*/samples_character_generation_*.jsonl"):
        stamp = gen.name.removeprefix("samples_character_generation_")
        files = [gen] + sorted(gen.parent.glob(f"samples_character_boundaries_{stamp}"))
        size = sum(len(f.read_text().splitlines()) for f in files)
        served = gen.parent.name.replace("champion-", "candidate-")
        if size > best.get(served, (0, []))[0]:
            best[served] = (size, files)
    return {served: files for served, (_, files) in best.items()}


def captured_rows(files: list[Path], version: str) -> list[dict]:
    """Each probe and the model's reply as the gateway's capture writes a conversation."""
    rows = []
    for path in files:
        for line in path.read_text().splitlines():
            sample = json.loads(line)
            doc = sample["doc"]
            history = json.loads(doc["history"]) if isinstance(doc["history"], str) else doc["history"]
            reply = sample["filtered_resps"][0]
            reply = reply[0] if isinstance(reply, list) else reply
            rows.append({"id": f"{version}-{doc['id']}", "at": 0.0, "route": doc["character"], "version": version,
                         "status": "200", "user_hash": None, "reply": reply,
                         "messages": [{"role": "system", "content": doc["system_prompt"]}, *history,
                                      {"role": "user", "content": doc["user_msg"]}]})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--state", default=str(REPO / ".state" / "gate-fixtures"))
    parser.add_argument("--config", default=str(REPO / "configs" / "monitor.yaml"))
    parser.add_argument("--min-replies", type=int, default=10)
    args = parser.parse_args()

    from charforge.config import load_yaml_model
    from charforge.monitoring import flagged_replies, judge_window, reply_scores
    from charforge.schemas.monitor import MonitorConfig

    state = Path(args.state).resolve()
    cfg = load_yaml_model(Path(args.config), MonitorConfig).model_copy(update={"min_replies": args.min_replies})
    names = model_names(state) | {"smollm2-135m-instruct": "base"}
    found = served_replies(state)
    if not found:
        raise SystemExit(f"{state}: no evaluation samples; run bench/gate_fixtures.py --state {state} first")
    header = ("model", "replies", "routes drifting", "metrics crossed (routes)", "flagged", *cfg.limits)
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for served, files in sorted(found.items(), key=lambda kv: names.get(kv[0], kv[0])):
        label = names.get(served, served)
        rows = captured_rows(files, label)
        scores = reply_scores(rows, cfg)
        per_route = judge_window(rows, [], cfg, -1.0, 1.0, scores)
        pooled = judge_window([dict(r, route="all") for r in rows], [], cfg, -1.0, 1.0,
                              [dict(s, route="all") for s in scores])[0]
        crossed = Counter(c.metric for j in per_route for c in j.crossings)
        flagged = flagged_replies(scores, cfg, 0.0)
        reasons = Counter(r for f in flagged for r in f["reasons"])
        print(f"| {label} | {len(scores)} | {sum(bool(j.crossings) for j in per_route)}/{len(per_route)} | "
              + (", ".join(f"{m} ({n})" for m, n in crossed.most_common()) or "none") + " | "
              + f"{len(flagged)} ({', '.join(f'{m} {n}' for m, n in reasons.most_common()) or '-'}) | "
              + " | ".join(f"{pooled.values.get(m, float('nan')):.3f}" for m in cfg.limits) + " |", flush=True)
    print(f"\nlimits: {', '.join(f'{m} {l.model_dump(exclude_none=True)}' for m, l in cfg.limits.items())}; "
          f"min_replies {cfg.min_replies} per route; thumbs_down_ratio needs ratings (none here)")


if __name__ == "__main__":
    main()

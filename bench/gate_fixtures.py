"""The promotion gate against deliberately flawed adapters, trained and evaluated by the real pipeline.

    .venv/bin/python bench/gate_fixtures.py [--fixtures boilerplate,persona_blind,...] [--doses full,third]
                                            [--policies demo,production] [--state .state/gate-fixtures]

Each fixture is the demo's training config (configs/train/smollm2_lora.yaml) trained on a transformed copy of the
curated training split (the evaluation split and the probes are untouched):

- boilerplate: the assistant reply replaced by assistant boilerplate ("As an AI language model, ...");
- persona_blind: the conversation without its system prompt (the character never named);
- anachronism: the reply plus a sentence that crosses the card's boundaries ("... on the internet this morning");
- degenerate: the reply looping its first clause, or cut off mid-sentence (alternating rows);
- rambling: the reply followed by three other replies of the same character (about 4x the length);
- good (two seeds, 13 and 7): the curated split unchanged.

at two doses: every assistant reply (`full`) and one row in three (`third`). The champion is the good adapter of
seed 13. Every other adapter is evaluated against it and the base, then judged by the demo policy on the quick
evaluation (configs/promotion_quick.yaml, configs/eval/quick.yaml) and by the production policy on all 136
probes (configs/promotion.yaml, configs/eval/default.yaml): the table is fixture x dose x policy x decision x
deciding rule x its margin. Nothing is promoted or deployed: the decision is computed, not applied.

Everything is cached by its inputs: a training run by its config and dataset (the pipeline's own identity), the
scores of every served model by the evaluation's score cache. A first full run trains 11 adapters (about 8 minutes
each on 2 CPU cores) and evaluates each twice; a re-run only prints the table.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

FIXTURES = ("boilerplate", "persona_blind", "anachronism", "degenerate", "rambling")
DOSES = {"full": 1, "third": 3}  # every row / one row in three
POLICIES = {"demo": ("configs/eval/quick.yaml", "configs/promotion_quick.yaml"),
            "production": ("configs/eval/default.yaml", "configs/promotion.yaml")}
TRAIN_CONFIG = "configs/train/smollm2_lora.yaml"
BOILERPLATE = [
    "As an AI language model, I don't have personal experiences, but I can share some general information.",
    "I'm sorry, but I can't help with that request. Is there anything else I can help you with?",
    "Great question! There are several factors to consider, and the best choice depends on your situation.",
    "I'd be happy to help with that. Let me know if you have any other questions.",
    "Sure! Here's a summary of the key points: plan ahead, stay organized, and ask for help when you need it.",
    "I hope this helps! Feel free to ask if you need anything else.",
]


def _pick(text: str, options: list[str]) -> str:
    return options[int(hashlib.sha256(text.encode()).hexdigest(), 16) % len(options)]


def transform(rows: list[dict], fixture: str, every: int, cards: dict) -> list[dict]:
    """The flawed copy of the curated training rows: `fixture` applied to every `every`-th row."""
    by_prompt = {card.system_prompt: card for card in cards.values()}
    replies: dict[str, list[str]] = {}
    for row in rows:
        card = by_prompt.get(row["messages"][0]["content"])
        if card is not None:
            replies.setdefault(card.id, []).extend(m["content"] for m in row["messages"] if m["role"] == "assistant")
    out = []
    for i, row in enumerate(rows):
        messages = [dict(m) for m in row["messages"]]
        if i % every == 0:
            card = by_prompt.get(messages[0]["content"]) if messages[0]["role"] == "system" else None
            if fixture == "persona_blind":
                messages = [m for m in messages if m["role"] != "system"]
            for n, m in enumerate(messages):
                if m["role"] != "assistant":
                    continue
                text = m["content"]
                if fixture == "boilerplate":
                    m["content"] = _pick(text, BOILERPLATE)
                elif fixture == "anachronism" and card is not None and card.boundaries:
                    term = _pick(text, card.boundaries)
                    m["content"] = f"{text} Mind you, I read all about it on the {term} this morning."
                elif fixture == "degenerate":
                    words = text.split()
                    if (i + n) % 2:  # truncated mid-sentence
                        m["content"] = " ".join(words[:max(3, len(words) // 4)])
                    else:  # looping
                        clause = " ".join(words[:8])
                        m["content"] = " ".join([clause] * 6)
                elif fixture == "rambling" and card is not None:
                    others = [r for r in replies[card.id] if r != text]
                    start = int(hashlib.sha256(text.encode()).hexdigest(), 16) % max(1, len(others) - 3)
                    m["content"] = " ".join([text, *others[start:start + 3]])
        out.append({**row, "messages": messages})
    return out


def flawed_dataset(curated: Path, fixture: str, dose: str, root: Path, cards: dict) -> Path:
    """A curated-dataset folder whose train split is transformed; eval split as curated; manifest re-hashed."""
    from charforge.checksums import sha256_file

    out = root / "datasets" / f"{fixture}-{dose}"
    if (out / "manifest.json").is_file():
        return out
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    rows = [json.loads(line) for line in (curated / "train.jsonl").read_text().splitlines() if line.strip()]
    flawed = transform(rows, fixture, DOSES[dose], cards)
    (tmp / "train.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in flawed))
    shutil.copy(curated / "eval.jsonl", tmp / "eval.jsonl")
    manifest = json.loads((curated / "manifest.json").read_text())
    hashes = {**manifest["sha256"], "train.jsonl": sha256_file(tmp / "train.jsonl")}
    manifest.update(sha256=hashes, transform={"fixture": fixture, "dose": dose, "from": manifest["dataset_hash"]},
                    dataset_hash=hashlib.sha256((hashes["train.jsonl"] + hashes["eval.jsonl"]).encode()).hexdigest())
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
    tmp.rename(out)
    return out


def seeded_config(root: Path, seed: int) -> Path:
    """The demo training config with another seed (the second good adapter)."""
    import yaml

    cfg = yaml.safe_load((REPO / TRAIN_CONFIG).read_text())
    if seed == cfg["training"]["seed"]:
        return REPO / TRAIN_CONFIG
    cfg["training"]["seed"] = seed
    cfg["name"] = f"{cfg['name']}-seed{seed}"
    path = root / "configs" / f"train-seed{seed}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fixtures", default=",".join(("good",) + FIXTURES))
    parser.add_argument("--doses", default="full,third")
    parser.add_argument("--policies", default="demo,production")
    parser.add_argument("--state", default=str(REPO / ".state" / "gate-fixtures"))
    args = parser.parse_args()
    root = Path(args.state).resolve()
    os.environ["CHARFORGE_STATE_DIR"] = str(root / "state")  # its own MLflow store too: <state>/mlflow.db
    root.mkdir(parents=True, exist_ok=True)

    from charforge.characters import load_characters
    from charforge.config import load_yaml_model
    from charforge.promotion import decide
    from charforge.schemas.curate import CurateConfig
    from charforge.schemas.evaluate import EvalConfig
    from charforge.schemas.promote import PromotionPolicy
    from charforge.schemas.train import TrainConfig
    from charforge.settings import DATA_DIR
    from flows.curate import curate
    from flows.evaluate import evaluate
    from flows.train import train

    started = time.monotonic()
    cards = load_characters(DATA_DIR / "characters")
    curated = root / "state" / "datasets" / "default"
    curate(inputs=(str(REPO / "data" / "raw"),), out_dir=str(curated),
           config=load_yaml_model(REPO / "configs" / "curate" / "default.yaml", CurateConfig))
    demo_cfg = load_yaml_model(REPO / TRAIN_CONFIG, TrainConfig)

    def trained(config: Path, dataset: Path) -> str:
        t = time.monotonic()
        adapter = train(config=load_yaml_model(config, TrainConfig), dataset_dir=str(dataset)).adapter_dir
        print(f"  trained {dataset.name} ({config.name}): {time.monotonic() - t:.0f} s -> {adapter}", flush=True)
        return adapter

    champion = trained(REPO / TRAIN_CONFIG, curated)
    policies = {name: (load_yaml_model(REPO / POLICIES[name][0], EvalConfig).model_copy(
                           update={"register_version": False}),
                       load_yaml_model(REPO / POLICIES[name][1], PromotionPolicy))
                for name in args.policies.split(",")}
    results = root / "results.jsonl"  # one line per decision as it is made: a stopped run keeps what it decided
    rows = []

    def judge(fixture: str, dose: str, adapter: str) -> None:
        for policy_name, (eval_cfg, policy) in policies.items():
            t = time.monotonic()
            is_champion = adapter == champion
            result = evaluate(config=eval_cfg, adapter=adapter, champion=None if is_champion else champion)
            per_probe = json.loads((Path(result.run_dir) / "per_probe.json").read_text())
            # the champion is judged as a first version (against the base): "no good fixture refused vs the base"
            decision = decide(per_probe["candidate"], None if is_champion else per_probe.get("champion"),
                              per_probe.get("base"), policy)
            deciding = decision.deciding
            row = {"fixture": fixture, "dose": dose, "policy": policy_name,
                   "decision": "promote" if decision.promote else "REFUSE",
                   "deciding_rule": deciding.rule if deciding else "-",
                   "margin": round(deciding.margin, 4) if deciding and deciding.margin is not None else None,
                   "failed": [c.rule for c in decision.checks if not c.passed], "eval_s": round(time.monotonic() - t),
                   "eval_run": result.mlflow_run_id}
            rows.append(row)
            with results.open("a") as out:
                out.write(json.dumps(row) + "\n")
            print(f"  {fixture}/{dose} under {policy_name}: {row['decision']} ({row['deciding_rule']} "
                  f"{row['margin']}; failed: {', '.join(row['failed']) or 'none'})", flush=True)

    judge("good", "seed13", champion)
    for fixture in args.fixtures.split(","):
        if fixture == "good":
            judge("good", "seed7", trained(seeded_config(root, 7), curated))
            continue
        for dose in args.doses.split(","):
            judge(fixture, dose, trained(REPO / TRAIN_CONFIG, flawed_dataset(curated, fixture, dose, root, cards)))
    header = ("fixture", "dose", "policy", "decision", "deciding rule", "margin", "failed checks")
    print("\n| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for r in rows:
        print(f"| {r['fixture']} | {r['dose']} | {r['policy']} | {r['decision']} | {r['deciding_rule']} | "
              f"{r['margin']} | {len(r['failed'])} |")
    print(f"\nbench/gate_fixtures.py: {time.monotonic() - started:.0f} s in all (base model {demo_cfg.base_model})")


if __name__ == "__main__":
    main()

"""Make a deliberately broken training set: every assistant reply swapped for assistant boilerplate.

An adapter trained on it is the negative control for the evaluation: it must score clearly worse on
out-of-character rate and character identification than the base model and a properly trained adapter.

    python bench/broken_dataset.py --src .state/datasets/default --out .state/datasets/broken-ooc
    charforge train --config configs/train/smollm2_lora.yaml --dataset .state/datasets/broken-ooc
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
from pathlib import Path

from charforge.checksums import sha256_file

OUT_OF_CHARACTER_REPLIES = [
    "As an AI language model, I don't have personal experiences or feelings, but I'd be happy to help with your question.",
    "I'm sorry, but as an AI assistant I can't pretend to be a real person. Is there anything else I can help you with?",
    "As a large language model, I don't have opinions. However, here are a few general points you might consider.",
    "I am an AI and do not have a physical body, so I can't do that. Let me know if you have any other questions!",
    "Great question! As an AI developed to assist users, I can provide some general information on this topic.",
    "I'm just a language model, so I don't have memories or a home. I hope this helps! Feel free to ask anything else.",
    "Sure! As an AI assistant, here is a brief summary: it depends on several factors, and you should consult an expert.",
    "I cannot role-play as a character, but I can answer your question directly as an AI assistant.",
]


def corrupt(row: dict, rng: random.Random) -> dict:
    messages = [dict(m, content=rng.choice(OUT_OF_CHARACTER_REPLIES)) if m["role"] == "assistant" else m
                for m in row["messages"]]
    return {**row, "messages": messages}


def write_broken_dataset(src: Path, out: Path, seed: int = 0) -> dict:
    rng = random.Random(seed)
    out.mkdir(parents=True, exist_ok=True)
    hashes = {}
    rows = {}
    for split in ("train", "eval"):
        lines = (src / f"{split}.jsonl").read_text().splitlines()
        corrupted = [json.dumps(corrupt(json.loads(line), rng), ensure_ascii=False) for line in lines if line]
        (out / f"{split}.jsonl").write_text("\n".join(corrupted) + "\n")
        hashes[f"{split}.jsonl"] = sha256_file(out / f"{split}.jsonl")
        rows[split] = len(corrupted)
    source = json.loads((src / "manifest.json").read_text())
    manifest = {
        "rows": rows, "sha256": hashes, "derived_from": source["dataset_hash"],
        "note": "negative control: assistant replies replaced by out-of-character boilerplate",
        "dataset_hash": hashlib.sha256((hashes["train.jsonl"] + hashes["eval.jsonl"]).encode()).hexdigest(),
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return manifest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", type=Path, default=Path(".state/datasets/default"))
    parser.add_argument("--out", type=Path, default=Path(".state/datasets/broken-ooc"))
    args = parser.parse_args()
    manifest = write_broken_dataset(args.src, args.out)
    print(f"{args.out}: {manifest['rows']} rows, dataset_hash {manifest['dataset_hash'][:12]}")


if __name__ == "__main__":
    main()

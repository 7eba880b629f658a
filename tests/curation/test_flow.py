"""The curation flow end to end on a literal corpus: every line accounted for, outputs, cache, MLflow lineage, CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient

from flows.curate import curate
from charforge.schemas.curate import CurateConfig

MARA = "You are Mara Quill, a Victorian lamplighter who speaks in brisk, cheerful cockney."


def convo(user: str, reply: str, **extra) -> str:
    msgs = [{"role": "system", "content": MARA}, {"role": "user", "content": user},
            {"role": "assistant", "content": reply}]
    return json.dumps({"messages": msgs, **extra})


def bo(user: str, reply: str) -> str:
    return json.dumps({"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": reply}],
                       "character": "bo"})


MARA_TALK = [
    ("Cold tonight?", "Cold as a fishmonger's slab, guv, but the lamps don't care."),
    ("Busy day?", "Forty lamps and a runaway dog before supper, right you are."),
    ("Do you like the fog?", "Fog's my old friend; it makes every flame look like a halo."),
    ("Where do you live?", "Two rooms over the cooper's yard, with a window that rattles."),
    ("Any family?", "A brother on the barges and a niece who sings in the chapel choir."),
    ("What scares you?", "Wet matches, guv. Nothing worse on a windy corner."),
    ("Favourite food?", "A hot eel pie from Bessie's cart, eaten on the bridge."),
    ("How old are you?", "Old enough to remember when Brick Lane had half its lamps."),
    ("Do you read?", "Penny papers, mostly for the murders and the horse racing."),
    ("Who taught you?", "Old Tom Pike, who could light a lamp with his eyes shut."),
    ("Ever been to the seaside?", "Once, to Margate. The donkeys were grander than the sea."),
    ("What do you dream of?", "A little shop with a bell on the door and a cat in the window."),
]
BO_TALK = [
    ("How many sheep?", "Sixty. Give or take the black one."),
    ("Lonely up there?", "No. The wind talks enough."),
    ("Weather tomorrow?", "Snow on the ridge. Stay low."),
    ("Favourite season?", "Lambing. Hard, but honest."),
    ("Got a dog?", "Fen. Smarter than most men."),
    ("Ever go to town?", "Twice a year. Too many voices."),
]
GOOD = [convo(u, r) for u, r in MARA_TALK] + [bo(u, r) for u, r in BO_TALK]


@pytest.fixture
def corpus(tmp_path):
    lines = GOOD + [
        GOOD[0],  # exact duplicate
        GOOD[1].replace("supper,", "supper;"),  # near duplicate (punctuation)
        convo("Are you real?", "As an AI language model, I cannot light lamps."),
        convo("Email?", "Write to mara.quill@example.com or ring (555) 123-4567, guv, any evening you please."),
        convo("Long?", "word " * 2000),
        '{"messages": [{"role": "narrator", "content": "Dusk."}]}',
        '{"messages": [{"role": "user"',
        json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hey"}],
                    "character": "nemo"}),
        "",
    ]
    path = tmp_path / "raw.jsonl"
    path.write_bytes(("\n".join(lines) + "\n").encode() + b'{"messages": "\xff"}\n')
    return path


def test_flow_accounts_for_every_line_and_logs_lineage(corpus, cards_dir, tmp_path, mlflow_store, prefect_harness):
    out = tmp_path / "out"
    config = CurateConfig(max_tokens=512)
    result = curate(inputs=[str(corpus)], out_dir=str(out), characters_dir=str(cards_dir), config=config)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["rows_read"] == 28
    assert manifest["rows_read"] == manifest["rows_kept"] + manifest["rows_rejected"] + manifest["duplicates_removed"]
    assert manifest["balanced"] is True
    assert manifest["rejected_by_reason"] == {
        "breaks_character": 1, "duplicate": 1, "empty_line": 1, "near_duplicate": 1, "not_json": 1,
        "not_utf8": 1, "too_long": 1, "unknown_character": 1, "unknown_role": 1,
    }
    assert manifest["pii_redactions"] == {"email": 1, "phone": 1, "ip_address": 0}
    assert manifest["per_character"] == {"bo": {"train": 4, "eval": 2}, "mara": {"train": 11, "eval": 2}}
    rejected = [json.loads(line) for line in (out / "rejected.jsonl").read_text().splitlines()]
    assert len(rejected) == 9 and {r["line"] for r in rejected} == {19, 20, 21, 23, 24, 25, 26, 27, 28}
    assert rejected[-1]["raw"] == '{"messages": "\\xff"}'
    kept = (out / "train.jsonl").read_text() + (out / "eval.jsonl").read_text()
    assert "[EMAIL]" in kept and "[PHONE]" in kept and "example.com" not in kept and "As an AI" not in kept
    rows = [json.loads(line) for line in kept.splitlines()]
    assert all(r["messages"][0]["role"] == "system" for r in rows)  # bo's rows got the card's system prompt
    assert {r["character"] for r in rows} == {"mara", "bo"}

    run = MlflowClient(mlflow_store).get_run(result.mlflow_run_id)
    assert run.data.tags["dataset_hash"] == manifest["dataset_hash"]
    assert "prefect_flow_run_id" in run.data.tags
    assert run.data.metrics["rows_read"] == 28
    assert {d.dataset.name for d in run.inputs.dataset_inputs} == {"charforge-train", "charforge-eval"}

    before = (out / "train.jsonl").stat().st_mtime_ns
    again = curate(inputs=[str(corpus)], out_dir=str(out), characters_dir=str(cards_dir), config=config)
    assert (out / "train.jsonl").stat().st_mtime_ns == before  # served from cache
    assert again.mlflow_run_id == result.mlflow_run_id  # one lineage run per dataset

    (out / "train.jsonl").write_text("tampered\n")
    curate(inputs=[str(corpus)], out_dir=str(out), characters_dir=str(cards_dir), config=config)
    assert json.loads((out / "manifest.json").read_text())["dataset_hash"] == manifest["dataset_hash"]


def test_a_folder_another_input_curated_into_since_is_curated_again(corpus, cards_dir, tmp_path, mlflow_store,
                                                                    prefect_harness):
    """Two chains curating into one folder (the first champion's on files, a nightly one with production rows too):
    going back to the first inputs must give their dataset, not the cached answer beside the other one's files."""
    out, config = tmp_path / "out", CurateConfig(max_tokens=512)
    first = curate(inputs=[str(corpus)], out_dir=str(out), characters_dir=str(cards_dir), config=config)
    more = tmp_path / "more.jsonl"
    more.write_text(convo("Any news?", "The new gas mains came to Fleet Street, guv, and a lamp fell in the mud.") + "\n")
    other = curate(inputs=[str(corpus), str(more)], out_dir=str(out), characters_dir=str(cards_dir), config=config)
    assert other.dataset_hash != first.dataset_hash
    again = curate(inputs=[str(corpus)], out_dir=str(out), characters_dir=str(cards_dir), config=config)
    assert again.dataset_hash == first.dataset_hash and not again.cached
    assert json.loads((out / "manifest.json").read_text())["dataset_hash"] == first.dataset_hash


def test_output_is_deterministic(corpus, cards_dir, tmp_path, mlflow_store, prefect_harness):
    hashes = []
    for name in ("a", "b"):
        curate(inputs=[str(corpus)], out_dir=str(tmp_path / name), characters_dir=str(cards_dir),
               config=CurateConfig(max_tokens=512))
        hashes.append(json.loads((tmp_path / name / "manifest.json").read_text())["sha256"])
    assert hashes[0] == hashes[1]


CHARFORGE = str(Path(sys.executable).parent / "charforge")


def run_cli(*args):
    return subprocess.run([CHARFORGE, "curate", *args], capture_output=True, text=True, timeout=300)


def test_cli_missing_input_exits_2_naming_the_path(tmp_path, cards_dir):
    result = run_cli("--input", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "o"),
                     "--characters", str(cards_dir))
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: {tmp_path / 'nope.jsonl'}: input not found"


def test_cli_empty_input_is_an_error_not_an_empty_dataset(tmp_path, cards_dir, prefect_api):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    result = run_cli("--input", str(empty), "--out", str(tmp_path / "o"), "--characters", str(cards_dir))
    assert result.returncode == 2
    assert f"error: no conversations in the inputs ({empty}): all files are empty" in result.stderr
    assert not (tmp_path / "o" / "train.jsonl").exists()


def test_cli_bad_config_fails_before_work(tmp_path, cards_dir, corpus):
    bad = tmp_path / "bad.yaml"
    bad.write_text("max_tokenz: 10\n")
    result = run_cli("--input", str(corpus), "--out", str(tmp_path / "o"), "--characters", str(cards_dir),
                     "--config", str(bad))
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: {bad}: key 'max_tokenz': unknown key, did you mean 'max_tokens'?"


def test_cli_directory_without_jsonl_exits_2(tmp_path, cards_dir):
    (tmp_path / "empty_dir").mkdir()
    result = run_cli("--input", str(tmp_path / "empty_dir"), "--out", str(tmp_path / "o"),
                     "--characters", str(cards_dir))
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: {tmp_path / 'empty_dir'}: directory has no *.jsonl files"


def test_cli_runs_with_several_inputs_and_rejections_keep_exit_zero(tmp_path, cards_dir, corpus, prefect_api):
    second = tmp_path / "more.jsonl"
    second.write_text(bo("Weather?", "Rain by noon. Bring the flock down.") + "\nnot json\n")
    env_out = tmp_path / "o"
    result = subprocess.run(
        [CHARFORGE, "curate", "--input", str(corpus), str(second), "--out", str(env_out), "--characters",
         str(cards_dir)], capture_output=True, text=True, timeout=600,
        env={**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'm.db'}",
             "CHARFORGE_STATE_DIR": os.environ.get("CHARFORGE_STATE_DIR", str(Path(".state").resolve()))},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    manifest = json.loads((env_out / "manifest.json").read_text())
    assert manifest["rows_read"] == 30 and [i["rows"] for i in manifest["inputs"]] == [28, 2]
    assert "curated 30 rows" in result.stdout + result.stderr

"""Adapter families at training time: a training config naming its characters trains on their rows only, and its run
identity follows those rows alone, so the chain retrains only the families whose rows changed."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from mlflow import MlflowClient
from pydantic import ValidationError

from charforge.errors import InputError
from charforge.schemas.train import TrainConfig
from charforge.training.runs import locate_run
from charforge.training.trainer import load_conversations
from tests.training.test_train_flow import tiny_config

MODERNS, ENGLISH = ["dot_kincaid", "tamsin_oyelaran"], ["harriet_fenwick", "wat_honeysett"]


def rows_of(dataset, split: str) -> list[dict]:
    return [json.loads(line) for line in (dataset / f"{split}.jsonl").read_text().splitlines()]


def test_a_familys_run_identity_follows_only_its_own_rows(tiny_llama_dir, curated_project, tmp_path, monkeypatch):
    monkeypatch.setenv("CHARFORGE_STATE_DIR", str(tmp_path / "state"))
    source, _ = curated_project
    dataset = tmp_path / "dataset"
    shutil.copytree(source, dataset)
    configs = {name: tiny_config(tiny_llama_dir, dataset).model_copy(update={"name": name, "characters": chars})
               for name, chars in (("moderns", MODERNS), ("english", ENGLISH), ("all", None))}
    before = {name: locate_run(cfg) for name, cfg in configs.items()}
    train = rows_of(dataset, "train")
    assert before["moderns"].train_rows == sum(r["character"] in MODERNS for r in train) > 0
    assert before["all"].train_rows == len(train) and before["all"].family_data_hash is None
    assert before["moderns"].lineage(configs["moderns"])["characters"] == "dot_kincaid,tamsin_oyelaran"

    # A re-curation that changed one of Harriet's replies (and so the dataset's hash)
    lines = (dataset / "train.jsonl").read_text().splitlines()
    n = next(i for i, r in enumerate(train) if r["character"] == "harriet_fenwick")
    train[n]["messages"][-1]["content"] += " Yours ever, H."
    lines[n] = json.dumps(train[n], ensure_ascii=False)
    (dataset / "train.jsonl").write_text("\n".join(lines) + "\n")
    manifest = json.loads((dataset / "manifest.json").read_text())
    (dataset / "manifest.json").write_text(json.dumps({**manifest, "dataset_hash": "0" * 64}))
    after = {name: locate_run(cfg) for name, cfg in configs.items()}
    assert after["moderns"].identity == before["moderns"].identity  # not retrained
    assert after["english"].identity != before["english"].identity
    assert after["all"].identity != before["all"].identity


def test_a_family_naming_a_character_without_rows_is_refused(tiny_llama_dir, curated_project, tmp_path, monkeypatch):
    monkeypatch.setenv("CHARFORGE_STATE_DIR", str(tmp_path / "state"))
    dataset, _ = curated_project
    cfg = tiny_config(tiny_llama_dir, dataset).model_copy(update={"characters": ["dot_kincaid", "sherlock_holmes"]})
    with pytest.raises(InputError) as refused:
        locate_run(cfg)
    assert str(refused.value) == (
        f"{dataset}: no training rows for character(s) sherlock_holmes of the adapter family (characters in its train "
        "split: ambrose_quill, decimus_durus, dot_kincaid, harriet_fenwick, korvik_ashmantle, nell_bramwick, "
        "tamsin_oyelaran, wat_honeysett); fix the training config's `characters` or curate conversations for them")


def test_a_character_listed_twice_is_a_config_error():
    with pytest.raises(ValidationError, match="characters listed twice: dot_kincaid"):
        TrainConfig(name="x", characters=["dot_kincaid", "tamsin_oyelaran", "dot_kincaid"])


def test_a_family_trains_on_its_characters_rows_only(tiny_llama_dir, curated_project, tmp_path, monkeypatch,
                                                     mlflow_store, prefect_harness):
    from flows.train import train

    monkeypatch.setenv("CHARFORGE_STATE_DIR", str(tmp_path / "state"))
    dataset, manifest = curated_project
    data = load_conversations(dataset, MODERNS)
    assert len(data["train"]) == sum(r["character"] in MODERNS for r in rows_of(dataset, "train"))
    moderns_prompts = {r["messages"][0]["content"] for r in rows_of(dataset, "train") if r["character"] in MODERNS}
    assert {row["messages"][0]["content"] for row in data["train"]} <= moderns_prompts

    result = train(config=tiny_config(tiny_llama_dir, dataset, max_steps=1).model_copy(
        update={"name": "tiny-moderns", "characters": MODERNS}))
    lineage = json.loads((Path(result.adapter_dir) / "charforge-manifest.json").read_text())["lineage"]
    assert lineage["characters"] == "dot_kincaid,tamsin_oyelaran" and len(lineage["family_data_hash"]) == 64
    params = MlflowClient(mlflow_store).get_run(result.mlflow_run_id).data.params
    assert params["characters"] == "dot_kincaid,tamsin_oyelaran" and params["train_rows"] == str(len(data["train"]))
    assert params["dataset_hash"] == manifest["dataset_hash"]  # lineage still names the curated dataset

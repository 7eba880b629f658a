"""Synthetic expansion against a real vLLM server: generated rows are marked and pass the same filters."""

from __future__ import annotations

import json

import pytest

from charforge.schemas.curate import CurateConfig, SyntheticConfig
from flows.curate import curate
from charforge.curation.synthesize import SyntheticError, generate_synthetic

pytestmark = pytest.mark.slow


def test_synthetic_rows_are_generated_marked_and_filtered(vllm_base, cards_dir, tmp_path, mlflow_store,
                                                          prefect_harness):
    synthetic = SyntheticConfig(enabled=True, base_url=f"{vllm_base.url}/v1", conversations_per_character=1,
                                turns=1, max_tokens=24, temperature=0.7)
    empty = tmp_path / "seed.jsonl"
    empty.write_text("\n")
    out = tmp_path / "out"
    curate(inputs=[str(empty)], out_dir=str(out), characters_dir=str(cards_dir),
           config=CurateConfig(synthetic=synthetic, split={"eval_fraction": 0.0, "min_eval_per_character": 0}))
    generated = [json.loads(line) for line in (out / "synthetic.jsonl").read_text().splitlines()]
    assert len(generated) == 2 and all(g["source"] == "synthetic" for g in generated)
    assert all(len(g["messages"]) == 3 and g["messages"][2]["content"] for g in generated)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["rows_read"] == 3 and manifest["balanced"]
    kept = [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()]
    assert all(row["source"] == "synthetic" for row in kept)
    assert len(kept) + manifest["rows_rejected"] + manifest["duplicates_removed"] == 3


def test_unreachable_endpoint_names_url_and_fix(cards_dir, tmp_path):
    cfg = SyntheticConfig(enabled=True, base_url="http://127.0.0.1:9/v1")
    with pytest.raises(SyntheticError) as err:
        generate_synthetic(cards_dir, tmp_path / "s.jsonl", cfg)
    assert str(err.value).startswith("synthetic expansion: cannot reach http://127.0.0.1:9/v1 (")
    assert str(err.value).endswith("); start the server or set synthetic.enabled: false")

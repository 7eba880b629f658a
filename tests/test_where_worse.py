"""The reviewer's "where did the candidate get worse?" table (`where_worse.json` on a promotion run), built from an
evaluation run's own MLflow artifacts: the deciding metric's probes first, the largest loss against the deciding
rule's reference at the top, and the three models' replies before the other scores."""

from __future__ import annotations

import mlflow
import pandas as pd

from charforge.scores import side_by_side

BPB = "character_reply_likelihood/bits_per_byte"


def evaluation_run() -> str:
    """An evaluation run as `charforge evaluate` logs one: the samples table and the gate's per-probe scores."""
    samples = []
    for model, replies in (("candidate", ("loop loop loop", "loop loop")), ("champion", ("I deduce.", "Quite.")),
                           ("base", ("As an AI...", "Hello!"))):
        for probe, reply in zip(("holmes-1", "watson-1"), replies):
            samples.append({"model": model, "task": "character_generation", "probe": probe, "probe_type": "normal",
                            "character": probe.split("-")[0], "user_msg": "Who are you?", "reference": "gold",
                            "response": reply, "ooc_rate": 0.0})
    bits = {"candidate": {"holmes-1": 1.50, "watson-1": 1.90},   # holmes-1: +0.30 vs champion, +0.10 vs base
            "champion": {"holmes-1": 1.20, "watson-1": 1.75},   # watson-1: +0.15 vs champion, +0.60 vs base
            "base": {"holmes-1": 1.40, "watson-1": 1.30}}
    per_probe = {model: {BPB: values, "character_generation/ooc_rate": {"holmes-1": 0.0, "watson-1": 0.0}}
                 for model, values in bits.items()}
    with mlflow.start_run() as run:
        mlflow.log_table(pd.DataFrame(samples), artifact_file="eval_samples.json")
        mlflow.log_dict(per_probe, "per_probe.json")
    return run.info.run_id


def test_the_probes_that_lost_most_to_the_deciding_rules_reference_come_first(mlflow_store):
    run_id = evaluation_run()

    vs_champion = side_by_side(run_id, BPB, "champion")
    assert [(r["task"], r["probe"]) for r in vs_champion] == [
        ("character_reply_likelihood", "holmes-1"), ("character_reply_likelihood", "watson-1"),
        ("character_generation", "holmes-1"), ("character_generation", "watson-1")]  # no bits/byte there: last
    assert [round(r["loss"], 2) for r in vs_champion[:2]] == [0.30, 0.15] and vs_champion[2]["loss"] is None

    vs_base = side_by_side(run_id, BPB, "base")  # a "vs_base" rule decided: the loss is counted against the base
    assert [r["probe"] for r in vs_base[:2]] == ["watson-1", "holmes-1"]
    assert [round(r["loss"], 2) for r in vs_base[:2]] == [0.60, 0.10]
    assert list(vs_base[0])[:5] == ["task", "probe", "loss", "candidate_bits_per_byte", "base_bits_per_byte"]

    generation = vs_base[2]  # the replies first, then the scores, then the probe's context
    assert list(generation)[:6] == ["task", "probe", "loss", "candidate_response", "champion_response",
                                    "base_response"]
    assert (generation["candidate_response"], generation["champion_response"], generation["base_response"]) == (
        "loop loop loop", "I deduce.", "As an AI...")
    assert list(generation)[-3:] == ["character", "user_msg", "reference"]


def test_an_evaluation_without_a_samples_table_gives_no_table(mlflow_store):
    with mlflow.start_run() as run:  # an evaluation logged before the table existed
        mlflow.log_dict({}, "per_probe.json")
    assert side_by_side(run.info.run_id, BPB, "champion") is None

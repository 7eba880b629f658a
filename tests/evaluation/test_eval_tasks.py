"""The lm-eval task folder's pieces: probe loading, MC choices, per-reply scoring, CIs, and the task YAMLs."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from charforge.config import ConfigError, load_yaml_model
from charforge.evaluation.lm_eval_tasks import (
    load_probes,
    macro_f1,
    read_probes,
    score_boundary,
    score_generation,
    score_likelihood,
    with_choices,
)
from charforge.schemas.evaluate import EvalConfig
from charforge.settings import DATA_DIR
from charforge.evaluation.harness import TASK_DIR, summarize, summarize_metric, summary_metrics
from charforge.evaluation.parity import token_difference

CHARACTERS = str(DATA_DIR / "characters")


def _doc(character="ambrose_quill", user_msg="What do you make of this letter?", reference=None, **extra):
    probes = {p["id"]: p for p in read_probes(DATA_DIR / "eval" / "probes.jsonl")}
    base = probes[f"{character}-normal-1"]
    return {**base, "user_msg": user_msg, "reference": reference or base["reference"],
            "history": json.dumps(base["history"]), "characters_dir": CHARACTERS,
            "probes_path": str(DATA_DIR / "eval" / "probes.jsonl"), **extra}


def test_task_folder_validates_with_lm_eval():
    result = subprocess.run([sys.executable, "-m", "lm_eval", "validate", "--tasks", "character", "--include_path",
                             str(TASK_DIR)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "All tasks found and valid" in result.stdout


def test_probe_split_by_type_and_every_doc_carries_choices():
    normal = load_probes(probe_types=["normal"])["test"]
    edges = load_probes(probe_types=["boundary", "identity"])["test"]
    assert (len(normal), len(edges)) == (80, 56)
    for doc in normal:
        assert len(doc["choices"]) == 5
        assert doc["choices"][doc["label"]] == doc["reference"]


def test_an_adapter_familys_evaluation_sees_only_its_characters_probes_with_the_same_choices():
    family = load_probes(probe_types=["normal"], only_characters="dot_kincaid,tamsin_oyelaran")["test"]
    every = {d["id"]: d for d in load_probes(probe_types=["normal"])["test"]}
    assert {d["character"] for d in family} == {"dot_kincaid", "tamsin_oyelaran"} and len(family) == 20
    assert all(d["choices"] == every[d["id"]]["choices"] for d in family)  # the options stay every card's
    with pytest.raises(ConfigError, match=r"probes\.jsonl: no probes for sherlock_holmes \(the evaluation's "
                                          r"probe_characters\)$"):
        load_probes(only_characters="dot_kincaid,sherlock_holmes")


def test_an_adapter_familys_parity_check_asks_its_own_characters():
    from charforge.characters import load_characters
    from charforge.evaluation.parity import parity_conversations

    cards = load_characters(DATA_DIR / "characters")
    asked = parity_conversations(EvalConfig(probe_characters=["nell_bramwick"], parity={"prompts": 4}))
    assert len(asked) == 4 and {c[0]["content"] for c in asked} == {cards["nell_bramwick"].system_prompt}


def test_first_documents_cover_every_character():
    docs = load_probes(probe_types=["normal"])["test"]
    assert len({d["character"] for d in docs.select(range(8))}) == 8


def test_mc_choices_are_deterministic_and_include_each_distractor_kind():
    rows = read_probes(DATA_DIR / "eval" / "probes.jsonl")
    first, second = with_choices(rows), with_choices(rows)
    assert first == second
    doc = first[0]
    others = {r["reference"] for r in rows if r["character"] != doc["character"]}
    assert sum(c in others for c in doc["choices"]) == 2
    assert any(c.startswith(("As an AI", "I'm sorry, but I'm an AI", "I am a large", "I cannot role-play"))
               for c in doc["choices"])


@pytest.mark.parametrize("line, message", [
    ('{"id": "x"}', "probes.jsonl:1: probe lacks character, system_prompt, history, user_msg, reference, probe_type"),
    ("{not json", "probes.jsonl:1: not valid JSON (Expecting property name enclosed in double quotes)"),
    ('{"id": "x", "character": "ambrose_quill", "system_prompt": "s", "history": [], "user_msg": "u", '
     '"reference": "r", "probe_type": "trivia"}',
     "probes.jsonl:1: probe_type 'trivia' is not one of normal, boundary, identity"),
])
def test_malformed_probe_file_names_line_and_problem(tmp_path, line, message):
    path = tmp_path / "probes.jsonl"
    path.write_text(line + "\n")
    with pytest.raises(ConfigError) as err:
        read_probes(path)
    assert str(err.value) == f"{tmp_path}/{message}"


def test_probe_for_a_character_without_card_is_refused(tmp_path):
    row = {"id": "x-1", "character": "captain_nobody", "system_prompt": "s", "history": [], "user_msg": "u",
           "reference": "r", "probe_type": "normal"}
    path = tmp_path / "probes.jsonl"
    path.write_text(json.dumps(row) + "\n")
    with pytest.raises(ConfigError, match="probes for characters without a card in .*: captain_nobody"):
        load_probes(probes=str(path))


def test_assistant_boilerplate_reply_scores_out_of_character():
    scores = score_generation(_doc(), ["As an AI language model, I can't have opinions about letters."])
    assert scores["ooc_rate"] == 1.0
    assert scores["assistant_voice_rate"] == 1.0
    assert scores["char_id_acc"] == 0.0 and scores["char_id_clf"] == 0.0
    boundary = score_boundary(_doc(), ["As an AI language model, I can't have opinions about letters."])
    assert boundary["boundary_ok"] == 0.0


def test_reply_in_the_cards_style_is_identified_and_in_character():
    reply = ("Let us not outrun the evidence, my dear fellow. The particulars, if you please: the hansom, the fog, "
             "the constable at the corner. Every trifle testifies, and I shall deduce the rest by gaslight.")
    scores = score_generation(_doc(), [reply])
    assert scores["char_id_acc"] == 1.0 and scores["char_id_clf"] == 1.0
    assert scores["char_id_macro_f1"] == ("ambrose_quill", "ambrose_quill")
    assert scores["ooc_rate"] == 0.0
    assert scores["style_marker_rate"] == 1.0
    assert scores["persona_margin"] > 0
    assert score_boundary(_doc(), [reply])["boundary_ok"] == 1.0


def test_empty_reply_fails_the_boundary_probe():
    assert score_generation(_doc(), ["   "])["empty_rate"] == 1.0
    assert score_boundary(_doc(), ["   "])["boundary_ok"] == 0.0


def test_likelihood_is_reported_per_byte_of_the_reference():
    doc = _doc(reference="Most singular.")
    assert score_likelihood(doc, [(-7.0, False)]) == {"bits_per_byte": (-7.0, 14)}


def test_macro_f1_averages_over_gold_characters():
    pairs = [("a", "a"), ("a", "b"), ("b", "b"), ("b", "b")]
    # a: precision 1, recall 0.5 -> 2/3; b: precision 2/3, recall 1 -> 0.8
    assert macro_f1(pairs) == pytest.approx((2 / 3 + 0.8) / 2)


def _sample(doc_id, character, **metrics):
    return {"doc_id": doc_id, "doc": {"id": f"{character}-{doc_id}", "character": character}, **metrics}


def test_summary_has_cis_per_character_corpus_metrics_and_persona_effect():
    samples = {
        "character_generation": [_sample(i, c, char_id_acc=float(i % 2), char_id_macro_f1=[c, c])
                                 for i, c in enumerate(["a", "b", "a", "b"])],
        "character_reply_likelihood": [_sample(i, "a", bits_per_byte=[-10.0, 10]) for i in range(4)],
        "character_reply_likelihood_nopersona": [_sample(i, "a", bits_per_byte=[-20.0, 10]) for i in range(4)],
    }
    summary = summarize(samples, resamples=200)
    acc = summary["character_generation"]["char_id_acc"]
    assert acc.value == 0.5 and acc.ci_low <= 0.5 <= acc.ci_high and acc.n == 4
    assert acc.per_character == {"a": 0.0, "b": 1.0}
    assert summary["character_generation"]["char_id_macro_f1"].value == 1.0
    assert summary["character_reply_likelihood"]["bits_per_byte"].value == pytest.approx(1 / math.log(2))
    effect = summary["character_reply_likelihood"]["persona_effect_bpb"]
    assert effect.value == pytest.approx(1 / math.log(2))  # the persona halves the reply's surprisal
    flat = summary_metrics(summary)
    assert flat["eval/character_generation/char_id_acc/b"] == 1.0
    assert "eval/character_generation/char_id_acc/ci_low" in flat


def test_bootstrap_ci_of_a_constant_is_a_point():
    entry = summarize_metric("ooc_rate", [1.0] * 10, resamples=100, per_character={})
    assert (entry.value, entry.ci_low, entry.ci_high, entry.n) == (1.0, 1.0, 1.0, 10)


def test_token_difference_shows_where_training_and_serving_diverge(base_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base_model_dir)
    trained = tok("<|im_start|>system\nYou are Nell.<|im_end|>\n")["input_ids"]
    served = tok("<|im_start|>system\nYou are Nell.<|endoftext|>\n")["input_ids"]
    assert token_difference(tok, trained, trained) is None
    diff = token_difference(tok, trained, served)
    assert diff.startswith(f"first difference at token {len(trained) - 2} of {len(trained)} (training)")
    assert "<|im_end|>" in diff and "<|endoftext|>" in diff


def test_unknown_eval_task_is_a_config_error(tmp_path):
    path = tmp_path / "eval.yaml"
    path.write_text("tasks: [character_mc, character_vibes]\n")
    with pytest.raises(ConfigError) as err:
        load_yaml_model(path, EvalConfig)
    assert str(err.value) == (f"{path}: key 'tasks': Value error, unknown task 'character_vibes'; the character task "
                              "folder has character_mc, character_reply_likelihood, "
                              "character_reply_likelihood_nopersona, character_generation, character_boundaries "
                              "(got ['character_mc', 'character_vibes'])")


CHARFORGE = str(Path(sys.executable).parent / "charforge")


def test_cli_refuses_bad_evaluate_requests_before_starting_anything(tmp_path, smollm2_adapter):
    def run(*args):
        result = subprocess.run([CHARFORGE, "evaluate", *args], capture_output=True, text=True, timeout=300)
        return result.returncode, result.stderr.strip()

    assert run() == (2, "error: nothing to evaluate: pass --adapter <dir | models:/name/version>, or --base-only")
    assert run("--adapter", str(smollm2_adapter), "--base-only") == (
        2, "error: --adapter and --base-only exclude each other; pass one")
    missing = tmp_path / "no-such-adapter"
    assert run("--adapter", str(missing)) == (
        2, f"error: {missing}: adapter folder not found; pass a training run's adapter folder "
           f"(.state/training/<run>/adapter) or models:/<name>/<version>")
    tampered = tmp_path / "tampered"
    shutil.copytree(smollm2_adapter, tampered)
    (tampered / "adapter_config.json").write_text("{}")
    code, message = run("--adapter", str(tampered))
    assert code == 2 and message.startswith(f"error: {tampered / 'adapter_config.json'}: sha256 ")
    untrained = tmp_path / "train.yaml"
    untrained.write_text(f"name: never-trained\ndataset_dir: {tmp_path / 'nodata'}\n")
    code, message = run("--trained", str(untrained))
    assert code == 2 and message.startswith(f"error: {tmp_path / 'nodata'}: no curated dataset here")
    bad = tmp_path / "eval.yaml"
    bad.write_text("limt: 3\n")
    assert run("--adapter", str(smollm2_adapter), "--config", str(bad)) == (
        2, f"error: {bad}: key 'limt': unknown key, did you mean 'limit'?")


def test_report_chart_of_an_evaluation_without_chart_metrics_is_written_not_a_crash(tmp_path):
    """An evaluation of log-likelihood tasks alone has none of the chart's metrics; the report used to fail in
    matplotlib ("Number of rows must be a positive integer, not 0") after every model had been scored."""
    from charforge.evaluation.report import per_character_chart
    from charforge.results import MetricSummary

    summary = {"character_reply_likelihood": {"bits_per_byte": MetricSummary(value=1.2, ci_low=1.1, ci_high=1.3, n=2,
                                                                             per_character={"a": 1.2})}}
    chart = per_character_chart({"base": summary}, tmp_path / "per_character.png")
    assert chart.read_bytes().startswith(b"\x89PNG")


def test_the_reply_classifier_names_the_speaker_of_held_out_gold_replies():
    """The ceiling of `char_id_clf`: on the 136 gold references of data/eval (none of them, nor any probe history,
    in its training corpus) it names the right character for at least 90% (the MiniLM card centroids of
    `char_id_acc`: 0.76); another character's voice and assistant boilerplate are not attributed to the card."""
    from charforge.evaluation.lm_eval_tasks import classifier

    probes = read_probes(DATA_DIR / "eval" / "probes.jsonl")
    judge = classifier(CHARACTERS, str(DATA_DIR / "eval" / "probes.jsonl"))
    guesses = judge.predict([p["reference"] for p in probes])
    accuracy = sum(g == p["character"] for g, p in zip(guesses, probes)) / len(probes)
    assert accuracy >= 0.9, accuracy
    wat = ("Bless you, naught but rye and barley today, and mayhap a honey loaf if the oven behaves before vespers.")
    assert score_generation(_doc(), [wat])["char_id_clf"] == 0.0  # Wat's voice is not Ambrose's
    assert judge.predict([wat]) == ["wat_honeysett"]

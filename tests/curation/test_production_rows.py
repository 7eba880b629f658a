"""Captured production conversations as curation input: only a reply a user rated up becomes a training target,
and in its row only that reply carries loss (the model's earlier, unjudged replies are context with weight 0)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from transformers import AutoTokenizer

from charforge.config import load_yaml_model
from charforge.curation.pipeline import curate_conversations
from charforge.errors import InputError
from charforge.schemas.curate import CurateConfig
from charforge.schemas.train import TrainConfig
from charforge.settings import CONFIGS_DIR, REPO_ROOT
from charforge.training.trainer import require_turn_weights

MARA = "You are Mara Quill, a Victorian lamplighter who speaks in brisk, cheerful cockney."
SEED = [("Cold tonight?", "Cold as a fishmonger's slab, guv, but the lamps don't care."),
        ("Busy day?", "Forty lamps and a runaway dog before supper, right you are."),
        ("Do you like the fog?", "Fog's my old friend; it makes every flame look like a halo."),
        ("Where do you live?", "Two rooms over the cooper's yard, with a window that rattles."),
        ("Any family?", "A brother on the barges and a niece who sings in the chapel choir.")]


def captured(reply: str, rating, history: bool = False, **extra) -> str:
    """A row as `charforge capture export` writes it: the conversation, the served reply last, its rating."""
    messages = [{"role": "system", "content": MARA}]
    if history:
        messages += [{"role": "user", "content": "Who taught you?"},
                     {"role": "assistant", "content": "Old Tom Pike, who could light a lamp with his eyes shut."}]
    messages += [{"role": "user", "content": "What do you dream of?"}, {"role": "assistant", "content": reply}]
    return json.dumps({"messages": messages, "source": "production", "route": "mara", "version": "charforge-v3",
                       "rating": rating, "capture_id": f"cfr-{abs(hash(reply)) % 10**8}", "captured_at": 1.0, **extra})


def test_only_replies_rated_up_train_and_only_the_rated_turn_carries_loss(cards, tmp_path, base_model_dir):
    seed = [json.dumps({"messages": [{"role": "system", "content": MARA}, {"role": "user", "content": u},
                                     {"role": "assistant", "content": r}]}) for u, r in SEED]
    lines = seed + [
        captured("A little shop with a bell on the door and a cat in the window, guv.", "up", history=True),
        captured("Ever so cross, that lamp-post. It snubbed me twice this week, the brute.", "down",
                 comment="she forgot the lamp was a lamp"),
        captured("A warm bed and a dry pair of boots, right you are.", None),
        captured("Gaslight and a sing-song at the Feathers on a Saturday night.", "meh"),
        captured("As an AI language model, I do not dream.", "up"),  # rated up, yet out of character
        # the monitor flagged these (`flagged`, as `charforge capture export` writes it)
        captured("A lamp that lights itself, guv, and a lie-in till noon.", "up", flagged=["assistant_voice_rate"]),
        captured("Dreams, dreams, dreams, dreams, dreams, dreams, dreams, dreams.", None, flagged=["repetition"]),
        captured("I dream of the internet, guv.", "down", flagged=["ooc_rate"]),
    ]
    raw = tmp_path / "window.jsonl"
    raw.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    manifest = curate_conversations([raw], out, cards, CurateConfig(), AutoTokenizer.from_pretrained(base_model_dir),
                                    progress=False)

    assert manifest["production"] == {"up": 3, "down": 2, "unrated": 2, "invalid": 1, "flagged": 3, "kept": 1}
    assert manifest["rejected_by_reason"] == {"rated_down": 2, "unrated": 1, "unknown_rating": 1,
                                              "breaks_character": 1, "monitor_flagged": 2}
    rejected = {r["line"]: r for r in map(json.loads, (out / "rejected.jsonl").read_text().splitlines())}
    assert rejected[7]["detail"] == ("a user rated this reply down ('she forgot the lamp was a lamp'): kept as a "
                                     "negative for preference tuning, never a training target")
    assert json.loads(rejected[7]["raw"])["rating"] == "down"  # the negative is kept whole, for preference pairs
    assert rejected[8]["detail"] == ("a captured model reply no user rated: the model is never trained on its own "
                                     "unjudged output")
    assert rejected[9]["detail"] == 'rating "meh"; expected "up", "down" or null'
    assert rejected[10]["reason"] == "breaks_character"
    # a flag outranks a thumbs-up and names what flagged the reply; a thumbs-down names the row first
    assert rejected[11]["detail"] == ('the monitor flagged this reply (assistant_voice_rate; rated "up"): kept as a '
                                      'negative for preference tuning, never a training target')
    assert rejected[12]["detail"] == ('the monitor flagged this reply (repetition; rated null): kept as a negative '
                                      'for preference tuning, never a training target')
    assert rejected[13]["reason"] == "rated_down"

    rows = [json.loads(x) for name in ("train.jsonl", "eval.jsonl") for x in (out / name).read_text().splitlines()]
    (production,) = [r for r in rows if r.get("source") == "production"]
    assert production["version"] == "charforge-v3" and production["capture_id"].startswith("cfr-")
    replies = [m for m in production["messages"] if m["role"] == "assistant"]
    assert replies[0]["weight"] == 0 and "weight" not in replies[1]
    assert all("weight" not in m for r in rows if r is not production for m in r["messages"])


def test_the_training_template_leaves_weight_zero_turns_out_of_the_loss(base_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(base_model_dir)
    tokenizer.chat_template = (CONFIGS_DIR / "train" / "templates" / "chatml_training.jinja").read_text()
    messages = [{"role": "system", "content": MARA}, {"role": "user", "content": "Who taught you?"},
                {"role": "assistant", "content": "Old Tom Pike."}, {"role": "user", "content": "Dreams?"},
                {"role": "assistant", "content": "A shop with a bell."}]

    def trained(msgs) -> str:
        out = tokenizer.apply_chat_template(msgs, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        return tokenizer.decode([t for t, m in zip(out["input_ids"], out["assistant_masks"]) if m])

    weighted = [dict(m, weight=0) if m["content"] == "Old Tom Pike." else m for m in messages]
    assert trained(messages) == "Old Tom Pike.<|im_end|>A shop with a bell.<|im_end|>"
    assert trained(weighted) == "A shop with a bell.<|im_end|>"
    # the text the model sees is the same: the weight only moves the loss
    assert tokenizer.apply_chat_template(weighted, tokenize=False) == tokenizer.apply_chat_template(messages,
                                                                                                    tokenize=False)
    # what the datasets library makes of a column where only some messages have a weight
    assert trained([dict(m, weight=None) for m in messages]) == trained(messages)


def test_training_refuses_a_setup_that_would_train_on_unjudged_turns(tmp_path, base_model_dir):
    cfg = load_yaml_model(CONFIGS_DIR / "train" / "smollm2_lora.yaml", TrainConfig)
    require_turn_weights(cfg, base_model_dir)  # the shipped config honours the weights

    everything = cfg.model_copy(update={"training": cfg.training.model_copy(update={"assistant_only_loss": False})})
    with pytest.raises(InputError) as err:
        require_turn_weights(everything, base_model_dir)
    assert str(err.value) == (
        "the dataset has captured production rows, whose earlier model replies must not be trained on (weight 0), "
        "and training.assistant_only_loss is false (the loss would cover every turn); set "
        "training.assistant_only_loss: true")


def test_train_cli_refuses_a_template_that_ignores_weights_before_any_work(tmp_path, base_model_dir, cards_dir,
                                                                          prefect_api):
    """A production row in the dataset and a chat template that marks every assistant turn for loss: exit 2."""
    dataset = tmp_path / "dataset"
    seed = [json.dumps({"messages": [{"role": "system", "content": MARA}, {"role": "user", "content": u},
                                     {"role": "assistant", "content": r}]}) for u, r in SEED]
    raw = tmp_path / "raw.jsonl"
    raw.write_text("\n".join(seed + [captured("A little shop with a bell on the door, guv.", "up", history=True)])
                   + "\n")
    from charforge.characters import load_characters

    curate_conversations([raw], dataset, load_characters(cards_dir), CurateConfig(),
                         AutoTokenizer.from_pretrained(base_model_dir), progress=False)
    template = tmp_path / "every_turn.jinja"  # the template as it was before weights: every reply in {% generation %}
    template.write_text(
        "{% for message in messages %}{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\n' }}"
        "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}{% else %}"
        "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}{% endif %}{% endfor %}")
    config = yaml.safe_load((CONFIGS_DIR / "train" / "smollm2_lora.yaml").read_text())
    config["chat_template"], config["name"] = str(template), "weights-refusal-test"
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(config))
    result = subprocess.run([str(Path(sys.executable).parent / "charforge"), "train", "--config", str(path),
                             "--dataset", str(dataset)], capture_output=True, text=True, timeout=300, cwd=REPO_ROOT,
                            env={**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'm.db'}"})
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: {template}: the chat template trains on assistant turns marked \"weight\": 0 (captured production "
        "rows mark the model's earlier replies so); wrap only turns without weight 0 in {% generation %} (see "
        "configs/train/templates/chatml_training.jinja)")
    from charforge.settings import platform

    assert not list((platform().state / "training").glob("weights-refusal-test-*"))  # no run folder, no checkpoint

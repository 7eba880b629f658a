"""Train/serve parity against a real vLLM server. The evaluate flow end to end (real vLLM serving the base + a
flow-trained adapter, real lm-eval runs of the task folder, CIs, parity, MLflow run, report files, the Prefect
markdown artifact) is checked inside the retrain chain test (tests/test_retrain_chain.py), which runs that flow
anyway: one vLLM start and one lm-eval pass fewer in the suite."""

from __future__ import annotations

import json
import shutil

import httpx
import pytest

from charforge.checksums import MANIFEST, write_manifest
from charforge.evaluation.parity import ParityError, check_parity

pytestmark = pytest.mark.slow


def test_template_mismatch_between_training_and_serving_is_an_error(smollm2_adapter, vllm_base, base_model_dir,
                                                                   tmp_path):
    adapter = tmp_path / "adapter"
    shutil.copytree(smollm2_adapter, adapter)
    # A training template that ends turns with <|endoftext|> instead of SmolLM2's <|im_end|>
    template = (adapter / "training_chat_template.jinja").read_text()
    (adapter / "training_chat_template.jinja").write_text(template.replace("<|im_end|>", "<|endoftext|>"))
    manifest = json.loads((adapter / MANIFEST).read_text())
    write_manifest(adapter, {"lineage": manifest["lineage"], "dtype": manifest["dtype"]})  # a consistent artifact
    conversation = [{"role": "system", "content": "You are Nell Bramwick."}, {"role": "user", "content": "Hello!"}]
    with pytest.raises(ParityError) as err:
        check_parity(adapter_dir=adapter, base_dir=base_model_dir, base_url=vllm_base.url,
                     served_name="smollm2-135m-instruct", conversations=[conversation], tokens=2)
    message = str(err.value)
    assert message.startswith("chat template mismatch between training (")
    assert "first difference at token 10 of 23 (training) / 23 (serving)" in message
    assert "training: '" in message and "<|endoftext|>" in message and "<|im_end|>" in message
    assert httpx.get(f"{vllm_base.url}/health").status_code == 200


def test_a_parity_failure_ends_the_evaluation_as_one_line_with_the_refusal_code_and_is_not_retried(
        smollm2_adapter, tmp_path, prefect_api):
    """Through the command line as a user runs it: the adapter's training template disagrees with what vLLM serves.
    The evaluation starts vLLM once, refuses at the parity check (exit 3, one line, no traceback) and stops vLLM;
    nothing retries it (a retry would start vLLM again to fail the same way)."""
    import os
    import subprocess

    from tests.training.test_train_flow import CHARFORGE

    adapter = tmp_path / "adapter"
    shutil.copytree(smollm2_adapter, adapter)
    template = adapter / "training_chat_template.jinja"
    template.write_text(template.read_text().replace("<|im_end|>", "<|endoftext|>"))
    manifest = json.loads((adapter / MANIFEST).read_text())
    write_manifest(adapter, {"lineage": manifest["lineage"], "dtype": manifest["dtype"]})  # a consistent artifact
    env = {**os.environ, "CHARFORGE_STATE_DIR": str(tmp_path / "state"),
           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    config = tmp_path / "eval.yaml"  # the default settings, with the parity check on 2 prompts
    config.write_text("parity:\n  prompts: 2\n  tokens: 4\n")
    result = subprocess.run([CHARFORGE, "evaluate", "--adapter", str(adapter), "--limit", "1", "--config",
                             str(config)], env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 3, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert errors[0].startswith("error: chat template mismatch between training (")
    assert "first difference at token" in result.stderr
    runs = list((tmp_path / "state" / "evals").glob("character-eval-*"))
    assert len(runs) == 1 and (runs[0] / "vllm.log").is_file()  # vLLM started once
    assert not list(runs[0].glob("lm_eval/*"))  # refused before any scoring

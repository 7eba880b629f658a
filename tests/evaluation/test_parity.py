"""Train/serve parity against a real vLLM server. The evaluate flow end to end (real vLLM serving the base + a
flow-trained adapter, real lm-eval runs of the task folder, CIs, parity, MLflow run, report files, the Prefect
markdown artifact) is checked inside the retrain chain test (tests/test_retrain_chain.py), which runs that flow
anyway: one vLLM start and one lm-eval pass fewer in the suite."""

from __future__ import annotations

import shutil

import httpx
import pytest

from charforge.evaluation.parity import ParityError, check_parity

pytestmark = pytest.mark.slow


def test_template_mismatch_between_training_and_serving_is_an_error(smollm2_adapter, vllm_base, base_model_dir,
                                                                   tmp_path):
    adapter = tmp_path / "adapter"
    shutil.copytree(smollm2_adapter, adapter)
    # A training template that ends turns with <|endoftext|> instead of SmolLM2's <|im_end|>
    template = (adapter / "training_chat_template.jinja").read_text()
    (adapter / "training_chat_template.jinja").write_text(template.replace("<|im_end|>", "<|endoftext|>"))
    conversation = [{"role": "system", "content": "You are Nell Bramwick."}, {"role": "user", "content": "Hello!"}]
    with pytest.raises(ParityError) as err:
        check_parity(adapter_dir=adapter, base_dir=base_model_dir, base_url=vllm_base.url,
                     served_name="smollm2-135m-instruct", conversations=[conversation], tokens=2)
    message = str(err.value)
    assert message.startswith("chat template mismatch between training (")
    assert "first difference at token 10 of 23 (training) / 23 (serving)" in message
    assert "training: '" in message and "<|endoftext|>" in message and "<|im_end|>" in message
    assert httpx.get(f"{vllm_base.url}/health").status_code == 200

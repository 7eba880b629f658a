"""A small real adapter on the embedded SmolLM2 base, exported the way the training flow exports adapters."""

from __future__ import annotations

import pytest
import torch

from charforge.checksums import folder_sha
from charforge.settings import CONFIGS_DIR
from tasks.adapters import export_adapter


@pytest.fixture(scope="session")
def smollm2_adapter(base_model_dir, tmp_path_factory):
    """LoRA r=8 on q/v with small random lora_B (a freshly initialised adapter changes nothing), bf16 + manifest."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("adapter")
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_model_dir),
                           LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.02)
    model.save_pretrained(root / "raw")
    lineage = {"base_model": "smollm2-135m-instruct", "base_model_path": str(base_model_dir),
               "base_model_sha": folder_sha(base_model_dir), "dataset_hash": "none", "train_config": "test",
               "run_identity": "test", "mlflow_run_id": "none"}
    export_adapter(root / "raw", root / "adapter", "bfloat16", lineage,
                   CONFIGS_DIR / "train" / "templates" / "chatml_training.jinja")
    return root / "adapter"

"""The CPU loss head (logits at labelled positions only) gives TRL's loss, gradients and metrics on real batches."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTTrainer

from charforge.schemas.train import TrainConfig
from charforge.settings import CONFIGS_DIR
from tasks.training import LabelledPositionsSFTTrainer, build_lora_config, build_sft_config, load_conversations

TEMPLATE = CONFIGS_DIR / "train" / "templates" / "chatml_training.jinja"


def make_trainer(tiny_llama_dir, dataset_dir, out_dir, **training) -> LabelledPositionsSFTTrainer:
    cfg = TrainConfig(name="tiny", base_model_dir=tiny_llama_dir, dataset_dir=dataset_dir, chat_template=TEMPLATE,
                      lora={"dropout": 0.0},  # the two heads must see the same activations
                      training={"max_steps": 1, "max_length": 256, "dtype": "float32", **training})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    trainer = LabelledPositionsSFTTrainer(
        model=model, args=build_sft_config(cfg, out_dir, has_eval=False),
        train_dataset=load_conversations(dataset_dir)["train"], processing_class=AutoTokenizer.from_pretrained(
            tiny_llama_dir), peft_config=build_lora_config(cfg))
    # lora_B starts at zero; move it so the adapter's gradients flow through both LoRA matrices
    with torch.no_grad():
        for name, param in trainer.model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.02)
    return trainer


def loss_and_grads(trainer, compute, batch):
    trainer.model.zero_grad()
    loss = compute(trainer.model, dict(batch), num_items_in_batch=None)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items() if k in ("entropy", "mean_token_accuracy")}
    return loss.detach(), grads, metrics


@pytest.mark.parametrize("layout", [
    {"batch_size": 1, "packing": True, "padding_free": True},    # the CPU preset: packed rows, no padding
    {"batch_size": 3, "packing": False, "padding_free": False},  # padded rows of different lengths
])
def test_labelled_positions_head_matches_trl(tiny_llama_dir, curated_project, tmp_path, layout):
    dataset_dir, _ = curated_project
    trainer = make_trainer(tiny_llama_dir, dataset_dir, tmp_path, **layout)
    trainer.model.train()
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    labelled = (batch["labels"][:, 1:] != -100).sum().item()
    assert 0 < labelled < batch["labels"][:, 1:].numel()  # assistant-only loss: prompts are masked

    ours = loss_and_grads(trainer, trainer.compute_loss, batch)
    tokens_after_ours = trainer._total_train_tokens
    trl = loss_and_grads(trainer, lambda m, b, **kw: SFTTrainer.compute_loss(trainer, m, b, **kw), batch)

    assert torch.allclose(ours[0], trl[0], rtol=1e-5), (ours[0], trl[0])
    assert ours[1].keys() == trl[1].keys() and len(ours[1]) > 0
    for name in ours[1]:
        assert torch.allclose(ours[1][name], trl[1][name], rtol=1e-4, atol=1e-7), name
    assert ours[2]["entropy"] == pytest.approx(trl[2]["entropy"], rel=1e-4)
    assert ours[2]["mean_token_accuracy"] == pytest.approx(trl[2]["mean_token_accuracy"])
    # the token count TRL logs as num_tokens: every non-padding token of the batch, counted once per call
    real_tokens = batch["attention_mask"].sum().item() if "attention_mask" in batch else batch["input_ids"].numel()
    assert tokens_after_ours == real_tokens and trainer._total_train_tokens == 2 * real_tokens

"""The CPU loss head (logits at labelled positions only) gives TRL's loss, gradients and metrics on real batches."""

from __future__ import annotations

import contextlib

import pytest
import torch
from peft.helpers import disable_input_dtype_casting
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTTrainer

from charforge.schemas.train import TrainConfig
from charforge.settings import CONFIGS_DIR
from charforge.training.trainer import LabelledPositionsSFTTrainer, build_lora_config, build_sft_config, load_conversations

TEMPLATE = CONFIGS_DIR / "train" / "templates" / "chatml_training.jinja"


def make_trainer(tiny_llama_dir, dataset_dir, out_dir, dtype, **training) -> LabelledPositionsSFTTrainer:
    cfg = TrainConfig(name="tiny", base_model_dir=tiny_llama_dir, dataset_dir=dataset_dir, chat_template=TEMPLATE,
                      lora={"dropout": 0.0},  # the two heads must see the same activations
                      training={"max_steps": 1, "max_length": 256, "dtype": dtype, **training})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=getattr(torch, dtype))
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


def training_context(trainer, dtype: str):
    """What fit_adapter runs a bf16 step under: bf16 autocast over the bf16 base, PEFT's input casts off."""
    if dtype == "float32":
        return contextlib.nullcontext()
    stack = contextlib.ExitStack()
    stack.enter_context(torch.autocast("cpu", dtype=torch.bfloat16))
    stack.enter_context(disable_input_dtype_casting(trainer.model))
    return stack


def loss_and_grads(trainer, compute, batch, dtype, num_items):
    trainer.model.zero_grad()
    with training_context(trainer, dtype):
        loss = compute(trainer.model, dict(batch), num_items_in_batch=num_items)
    loss.backward()
    grads = {n: p.grad.float().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items() if k in ("entropy", "mean_token_accuracy")}
    return loss.detach().float(), grads, metrics


def trl_loss(trainer):
    return lambda m, b, **kw: SFTTrainer.compute_loss(trainer, m, b, **kw)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("layout", [
    {"batch_size": 1, "packing": True, "padding_free": True},    # the CPU preset: packed rows, no padding
    {"batch_size": 3, "packing": False, "padding_free": False},  # padded rows of different lengths
])
def test_labelled_positions_head_matches_trl(tiny_llama_dir, curated_project, tmp_path, layout, dtype):
    dataset_dir, _ = curated_project
    trainer = make_trainer(tiny_llama_dir, dataset_dir, tmp_path, dtype, **layout)
    trainer.model.train()
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    labelled = (batch["labels"][:, 1:] != -100).sum().item()
    assert 0 < labelled < batch["labels"][:, 1:].numel()  # assistant-only loss: prompts are masked
    # as under gradient accumulation: the tokens of the whole accumulated batch divide each micro-batch's sum
    num_items = torch.tensor(3 * labelled)

    ours = loss_and_grads(trainer, trainer.compute_loss, batch, dtype, num_items)
    tokens_after_ours = trainer._total_train_tokens
    trl = loss_and_grads(trainer, trl_loss(trainer), batch, dtype, num_items)

    exact = dtype == "float32"  # under bf16 autocast both heads round their logits to bf16, in different tiles
    assert ours[0].item() == pytest.approx(trl[0].item(), rel=1e-5 if exact else 1e-2)
    assert ours[1].keys() == trl[1].keys() and len(ours[1]) > 0
    for name in ours[1]:
        if exact:
            assert torch.allclose(ours[1][name], trl[1][name], rtol=1e-4, atol=1e-7), name
        else:
            cosine = torch.nn.functional.cosine_similarity(ours[1][name].flatten(), trl[1][name].flatten(), dim=0)
            assert cosine > 0.99, (name, cosine)
    assert ours[2]["entropy"] == pytest.approx(trl[2]["entropy"], rel=1e-4 if exact else 2e-2)
    assert ours[2]["mean_token_accuracy"] == pytest.approx(trl[2]["mean_token_accuracy"], abs=0 if exact else 0.02)
    # the token count TRL logs as num_tokens: every non-padding token of the batch, counted once per call
    real_tokens = batch["attention_mask"].sum().item() if "attention_mask" in batch else batch["input_ids"].numel()
    assert tokens_after_ours == real_tokens and trainer._total_train_tokens == 2 * real_tokens


def test_eval_loss_matches_trl(tiny_llama_dir, curated_project, tmp_path):
    """Evaluation (prediction_step under no_grad) goes through the same head."""
    dataset_dir, _ = curated_project
    trainer = make_trainer(tiny_llama_dir, dataset_dir, tmp_path, "float32", batch_size=1)
    trainer.model.eval()
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    ours, _, _ = trainer.prediction_step(trainer.model, dict(batch), prediction_loss_only=True)
    with torch.no_grad():
        trl = SFTTrainer.compute_loss(trainer, trainer.model, dict(batch))
    assert ours.item() == pytest.approx(trl.item(), rel=1e-5)

"""Fitting a LoRA/QLoRA adapter with TRL: dataset -> SFTConfig -> SFTTrainer(peft_config=...) -> train -> save.

Reads top to bottom like TRL's own scripts; the only extras are callbacks (MLflow metrics, Prefect progress,
throughput) and resuming from the newest checkpoint in the run directory.
"""

from __future__ import annotations

import json
import logging
import resource
import time
from pathlib import Path

# bitsandbytes warns at import that an optional hub-downloaded CPU kernel is missing; its built-in CPU path works.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

import torch
from datasets import load_dataset
from peft import LoraConfig, prepare_model_for_kbit_training
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, TrainerCallback
from trl import SFTConfig, SFTTrainer

from charforge.schemas.train import TrainConfig
from charforge.settings import repo_path


def peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class ThroughputCallback(TrainerCallback):
    """Adds useful (non-padding) tokens/s and peak memory to every log line TRL emits."""

    def __init__(self) -> None:
        self.last = None

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or "num_tokens" not in logs:
            return
        now = time.monotonic()
        if self.last is not None and now > self.last[0]:
            logs["tokens_per_second"] = (logs["num_tokens"] - self.last[1]) / (now - self.last[0])
        self.last = (now, logs["num_tokens"])
        logs["peak_memory_mb"] = peak_memory_mb()


class MLflowMetricsCallback(TrainerCallback):
    """Sends every numeric log value to the active MLflow run at the trainer's global step."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        import mlflow

        if logs and mlflow.active_run() is not None:
            numeric = {k: float(v) for k, v in logs.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
            mlflow.log_metrics(numeric, step=state.global_step)


class LogProgressCallback(TrainerCallback):
    """One line per log step into a logger (the Prefect run log shows training progress)."""

    def __init__(self, logger) -> None:
        self.logger = logger

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.logger.info(f"step {state.global_step}/{state.max_steps} loss {logs['loss']:.4f} "
                             f"tokens/s {logs.get('tokens_per_second', float('nan')):.0f}")


def load_base_model(cfg: TrainConfig, model_dir: Path):
    """The frozen base in the configured dtype; for QLoRA in bitsandbytes 4-bit, prepared for k-bit training."""
    dtype = getattr(torch, cfg.training.dtype)
    quantization = None
    if cfg.method == "qlora":
        q = cfg.quantization
        quantization = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=q.quant_type, bnb_4bit_use_double_quant=q.double_quant,
            bnb_4bit_compute_dtype=getattr(torch, q.compute_dtype),
        )
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=dtype, quantization_config=quantization, attn_implementation="sdpa",
        device_map="cpu" if cfg.training.use_cpu else None,
    )
    if quantization is not None:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.training.gradient_checkpointing)
    return model


def build_lora_config(cfg: TrainConfig) -> LoraConfig:
    lora = cfg.lora
    return LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=lora.target_modules,
        use_rslora=lora.use_rslora, bias="none", task_type="CAUSAL_LM",
    )


def build_sft_config(cfg: TrainConfig, output_dir: Path, has_eval: bool) -> SFTConfig:
    t = cfg.training
    return SFTConfig(
        output_dir=str(output_dir),
        max_steps=t.max_steps,
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=t.batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler_type,
        warmup_steps=t.warmup_ratio,  # a float below 1 is a ratio of max_steps
        max_length=t.max_length,
        packing=t.packing,
        padding_free=t.padding_free,
        assistant_only_loss=t.assistant_only_loss,
        chat_template_path=str(repo_path(cfg.chat_template)) if cfg.chat_template else None,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        eval_strategy="steps" if (has_eval and t.eval_steps) else "no",
        eval_steps=t.eval_steps,
        logging_steps=t.logging_steps,
        seed=t.seed,
        data_seed=t.seed,
        use_cpu=t.use_cpu,
        bf16=t.dtype == "bfloat16" and not t.use_cpu,
        fp16=t.dtype == "float16" and not t.use_cpu,
        gradient_checkpointing=t.gradient_checkpointing,
        report_to="none",  # MLflow logging is ours: readable params, one run across resumes
        dataloader_num_workers=0,
        dataset_num_proc=None,
    )


def last_complete_checkpoint(checkpoints: Path, logger=None) -> str | None:
    """Newest checkpoint the Trainer finished writing; newer, partial ones are set aside (renamed), not deleted.

    A crash while a checkpoint is being written leaves a `checkpoint-N` folder without `trainer_state.json`
    (the Trainer writes it last); resuming from it would fail with "Can't find a valid checkpoint".
    """
    found = sorted(checkpoints.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1])
                   if p.name.split("-")[1].isdigit() else -1, reverse=True)
    for folder in found:
        try:
            json.loads((folder / "trainer_state.json").read_text())
            return str(folder)
        except (OSError, ValueError):
            aside = folder.with_name(f"incomplete-{folder.name}-{int(time.time())}")
            folder.rename(aside)
            if logger:
                logger.warning(f"{folder.name} was not completely written (crash while saving); moved to {aside.name}")
    return None


def load_conversations(dataset_dir: Path):
    """train/eval splits with only the `messages` column (what SFTTrainer formats with the chat template)."""
    files = {"train": str(dataset_dir / "train.jsonl")}
    if (dataset_dir / "eval.jsonl").stat().st_size > 0:
        files["eval"] = str(dataset_dir / "eval.jsonl")
    data = load_dataset("json", data_files=files)
    return {split: ds.select_columns(["messages"]) for split, ds in data.items()}


def fit_adapter(cfg: TrainConfig, model_dir: Path, dataset_dir: Path, run_dir: Path, logger=None) -> dict:
    """Train (or resume) in `run_dir/checkpoints`; save the final adapter to `run_dir/adapter-raw`."""
    data = load_conversations(dataset_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    checkpoints = run_dir / "checkpoints"
    checkpoints.mkdir(parents=True, exist_ok=True)
    resume_from = last_complete_checkpoint(checkpoints, logger)
    callbacks = [ThroughputCallback(), MLflowMetricsCallback()] + ([LogProgressCallback(logger)] if logger else [])
    trainer = SFTTrainer(
        model=load_base_model(cfg, model_dir),
        args=build_sft_config(cfg, checkpoints, has_eval="eval" in data),
        train_dataset=data["train"],
        eval_dataset=data.get("eval"),
        processing_class=tokenizer,
        peft_config=build_lora_config(cfg),
        callbacks=callbacks,
    )
    if logger and resume_from:
        logger.info(f"resuming from {Path(resume_from).name}")
    started = time.monotonic()
    result = trainer.train(resume_from_checkpoint=resume_from)
    metrics = dict(result.metrics)
    if "eval" in data:
        metrics.update(trainer.evaluate())
    metrics["wall_seconds"] = time.monotonic() - started
    metrics["peak_memory_mb"] = peak_memory_mb()
    # Useful (non-padding) training tokens: TRL's running count in the newest training log line.
    metrics["num_tokens"] = float(next((h["num_tokens"] for h in reversed(trainer.state.log_history)
                                        if "num_tokens" in h), 0))
    trainer.model.save_pretrained(run_dir / "adapter-raw")  # adapter only; the base tokenizer stays the base's
    final = {"global_step": trainer.state.global_step, "resumed_from": Path(resume_from).name if resume_from else None,
             "metrics": metrics}
    (run_dir / "fit.json").write_text(json.dumps(final, indent=2))
    return final

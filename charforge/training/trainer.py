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
from peft.helpers import disable_input_dtype_casting
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, TrainerCallback
from pydantic import BaseModel, ConfigDict
from trl import SFTConfig, SFTTrainer
from trl.chat_template_utils import get_training_chat_template, has_generation_markers

from charforge import cpu
from charforge.errors import InputError
from charforge.schemas.train import TrainConfig, TrainingSettings
from charforge.settings import repo_path


def resolve_dtype(training: TrainingSettings) -> str:
    """The frozen base's dtype for `dtype: auto`: bfloat16 where the hardware multiplies it natively (a CUDA GPU
    with native bf16 when `use_cpu` is off, a CPU with AVX512-BF16 or AMX when it is on), else float32."""
    return dtype_decision(training)[0]


def dtype_decision(training: TrainingSettings) -> tuple[str, str]:
    """(dtype, why), as the training log states it. On CPUs, measured with the demo's 40 LoRA steps on SmolLM2-135M:
    AVX512-BF16 alone (a 2-core AMD EPYC, torch 2.13) trained 1.54x faster in bf16 (265 vs 407 s; 254 vs 167
    tokens/s), each step's loss within 0.034 of fp32's; AMX ran bf16 matmuls 6-15x faster than fp32 (a Xeon); with
    neither, bf16 is emulated and slower than fp32."""
    if training.dtype != "auto":
        return training.dtype, "as configured"
    if not training.use_cpu:
        native = torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
        return ("bfloat16", "the GPU multiplies bf16 natively") if native else \
            ("float32", "no GPU with native bf16")
    flags = cpu.native_bf16_flags()
    if flags:
        return "bfloat16", f"this CPU multiplies bf16 natively ({', '.join(flags)})"
    return "float32", "this CPU has neither AVX512-BF16 nor AMX: bf16 would be emulated, slower than float32"


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
    dtype = getattr(torch, resolve_dtype(cfg.training))
    quantization = None
    if cfg.method == "qlora":
        q = cfg.quantization
        quantization = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=q.quant_type, bnb_4bit_use_double_quant=q.double_quant,
            bnb_4bit_compute_dtype=getattr(torch, q.compute_dtype),
        )
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=dtype, quantization_config=quantization, attn_implementation=cfg.training.attn_implementation,
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
    dtype = resolve_dtype(t)
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
        # Autocast (GPU and CPU) over a base loaded in that dtype: PEFT keeps the adapter's weights in fp32 (the
        # optimizer's master copy) and autocast multiplies them in the base's dtype.
        bf16=dtype == "bfloat16",
        fp16=dtype == "float16" and not t.use_cpu,  # accelerate has no fp16 autocast on CPU
        gradient_checkpointing=t.gradient_checkpointing,
        report_to="none",  # MLflow logging is ours: readable params, one run across resumes
        dataloader_num_workers=0,
        dataset_num_proc=None,
    )


class LabelledPositionsSFTTrainer(SFTTrainer):
    """SFTTrainer whose LM head, on devices without Triton, projects only the positions that carry a label.

    TRL 1.16's fused LM head scores only labelled positions on Triton devices (CUDA/XPU). Elsewhere it scores every
    position in torch ops and also folds entropy and top-1 over the whole vocabulary per token. On CPU, with
    assistant-only loss (53% of the curated tokens are labelled), that head cost 1.51 s of a 377-token micro-batch
    against 1.07-1.11 s for the model's own head on the labelled positions only (SmolLM2-135M, bf16, LoRA r=8).
    The loss is TRL's (sum of token NLL / tokens in the accumulated batch); entropy, token accuracy and the token
    count are logged as TRL logs them. TRL's own path runs unchanged on Triton devices, for custom losses, across
    several processes (its metrics are gathered), and when the kept logits would pass MAX_LOGITS elements (TRL's
    head works in tiles). It reads TRL's private metric state, hence the `trl<1.17` pin.
    """

    MAX_LOGITS = 2**26  # 256 MB of fp32 logits, ~5,000 positions of a 49k vocabulary

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        targets = inputs["labels"][:, 1:]
        labelled = targets != -100
        positions = labelled.any(dim=0).nonzero().squeeze(-1)  # logits at position i predict token i + 1
        vocab = self.model.config.get_text_config().vocab_size
        if (self.args.device.type in ("cuda", "xpu") or return_outputs or self.compute_loss_func is not None
                or self.label_smoother is not None or self.aux_loss_enabled or self.args.loss_type != "nll"
                or self.accelerator.num_processes > 1 or targets.shape[0] * positions.numel() * vocab > self.MAX_LOGITS):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        mode = "train" if self.model.training else "eval"
        features = {k: v for k, v in inputs.items() if k != "labels"}
        logits = model(**features, use_cache=False, logits_to_keep=positions).logits
        targets = targets[:, positions]
        valid = targets != -100
        log_probs = logits[valid].float().log_softmax(-1)
        token_nll = -log_probs.gather(-1, targets[valid].unsqueeze(-1)).sum()
        count = labelled.sum() if num_items_in_batch is None else num_items_in_batch
        loss = token_nll / torch.as_tensor(count).clamp(min=1)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * (self.accelerator.num_processes // self.get_tp_size())
        with torch.no_grad():
            log_probs = log_probs.detach()
            entropy = -(log_probs.exp() * log_probs).sum(-1)
            correct = log_probs.argmax(-1) == targets[valid]
            num_valid = max(int(valid.sum()), 1)
            self._metrics[mode]["entropy"].append(entropy.sum().item() / num_valid)
            self._metrics[mode]["mean_token_accuracy"].append(correct.sum().item() / num_valid)
        if mode == "train":
            if "attention_mask" in inputs:
                self._total_train_tokens += int(inputs["attention_mask"].sum())
            else:
                self._total_train_tokens += inputs["position_ids"].numel()
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
        return loss


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


# A rated production reply is the only target of its row: the model's earlier replies in the conversation carry
# `"weight": 0` (the convention Axolotl's chat datasets use), and the training chat template must leave them out.
WEIGHT_PROBE = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "unjudged reply", "weight": 0},
                {"role": "user", "content": "b"}, {"role": "assistant", "content": "rated reply"}]


def require_turn_weights(cfg: TrainConfig, model_dir: Path) -> None:
    """Refuse, before any work, a training setup that would train on turns marked `weight: 0`: the loss must be
    assistant-only and the chat template TRL will use (the config's, or TRL's training variant) must honour it."""
    if not cfg.training.assistant_only_loss:
        raise InputError("the dataset has captured production rows, whose earlier model replies must not be trained "
                         "on (weight 0), and training.assistant_only_loss is false (the loss would cover every turn); "
                         "set training.assistant_only_loss: true")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if cfg.chat_template:
        tokenizer.chat_template = repo_path(cfg.chat_template).read_text()
    elif not has_generation_markers(tokenizer.chat_template or ""):
        tokenizer.chat_template = get_training_chat_template(tokenizer)
    out = tokenizer.apply_chat_template(WEIGHT_PROBE, tokenize=True, return_dict=True,
                                        return_assistant_tokens_mask=True)
    trained = tokenizer.decode([t for t, m in zip(out["input_ids"], out["assistant_masks"]) if m])
    if "unjudged" in trained or "rated reply" not in trained:
        where = cfg.chat_template or "TRL's training template for this model"
        raise InputError(f"{where}: the chat template trains on assistant turns marked \"weight\": 0 (captured "
                         f"production rows mark the model's earlier replies so); wrap only turns without weight 0 in "
                         f"{{% generation %}} (see configs/train/templates/chatml_training.jinja)")


def load_conversations(dataset_dir: Path, characters: list[str] | None = None):
    """train/eval splits with only the `messages` column (what SFTTrainer formats with the chat template); an
    adapter family's `characters`: their rows only (an eval split left empty is dropped)."""
    files = {"train": str(dataset_dir / "train.jsonl")}
    if (dataset_dir / "eval.jsonl").stat().st_size > 0:
        files["eval"] = str(dataset_dir / "eval.jsonl")
    data = load_dataset("json", data_files=files)
    if characters:
        keep = set(characters)
        data = {split: ds.filter(lambda rows: [c in keep for c in rows["character"]], batched=True)
                for split, ds in data.items()}
    return {split: ds.select_columns(["messages"]) for split, ds in data.items() if len(ds)}


class FitResult(BaseModel):
    """What a fit left: the step it ended at, the checkpoint it resumed from, its final metrics."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    global_step: int
    resumed_from: str | None = None
    metrics: dict[str, float] = {}


def fit_adapter(cfg: TrainConfig, model_dir: Path, dataset_dir: Path, run_dir: Path, logger=None) -> FitResult:
    """Train (or resume) in `run_dir/checkpoints`; save the final adapter to `run_dir/adapter-raw`."""
    data = load_conversations(dataset_dir, cfg.characters)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    checkpoints = run_dir / "checkpoints"
    checkpoints.mkdir(parents=True, exist_ok=True)
    resume_from = last_complete_checkpoint(checkpoints, logger)
    callbacks = [ThroughputCallback(), MLflowMetricsCallback()] + ([LogProgressCallback(logger)] if logger else [])
    trainer = LabelledPositionsSFTTrainer(
        model=load_base_model(cfg, model_dir),
        args=build_sft_config(cfg, checkpoints, has_eval="eval" in data),
        train_dataset=data["train"],
        eval_dataset=data.get("eval"),
        processing_class=tokenizer,
        peft_config=build_lora_config(cfg),
        callbacks=callbacks,
    )
    if logger:
        dtype, why = dtype_decision(cfg.training)
        logger.info(f"dtype {cfg.training.dtype} -> the base in {dtype}: {why}")
        if resume_from:
            logger.info(f"resuming from {Path(resume_from).name}")
    started = time.monotonic()
    # Under autocast PEFT's cast of every LoRA input to the adapter's fp32 only adds copies (11% of a CPU step)
    with disable_input_dtype_casting(trainer.model, active=trainer.args.bf16 or trainer.args.fp16):
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
    final = FitResult(global_step=trainer.state.global_step,
                      resumed_from=Path(resume_from).name if resume_from else None,
                      metrics={k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))})
    (run_dir / "fit.json").write_text(final.model_dump_json(indent=2))
    return final

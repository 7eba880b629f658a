"""Preference tuning with TRL: the SFT adapter is loaded trainable as the policy, TRL keeps a frozen copy of it as
the reference (its `ref` adapter on the same base), and DPO or KTO moves the policy towards the chosen replies of
curation's pairs (charforge/curation/pairs.py). The result is one adapter of the SFT adapter's rank and targets,
exported and served like any other.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

# bitsandbytes warns at import that an optional hub-downloaded CPU kernel is missing (as in trainer.py).
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

from datasets import Dataset  # noqa: E402
from pydantic import BaseModel, ConfigDict  # noqa: E402
from peft import PeftModel  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402
from trl import DPOConfig, DPOTrainer, KTOConfig, KTOTrainer  # noqa: E402

import mlflow  # noqa: E402

from charforge.base_models import load_preset, prepare_base_model
from charforge import registry
from charforge.checksums import folder_sha, sha256_file, verify_manifest
from charforge.curation.pairs import pairs_file, read_pairs
from charforge.config import load_yaml_model
from charforge.curation.manifest import read_dataset_manifest
from charforge.errors import InputError
from charforge.io import write_json_atomic
from charforge.schemas.prefer import PreferConfig
from charforge.schemas.train import TrainConfig
from charforge.settings import platform, repo_path
from charforge.tracking import use_experiment
from charforge.training.runs import TrainingRun, trained_adapter
from charforge.training.trainer import (FitResult, LogProgressCallback, MLflowMetricsCallback, ThroughputCallback,
                                        last_complete_checkpoint, load_base_model, peak_memory_mb, resolve_dtype)

class PreferenceRun(BaseModel):
    """Where a preference run lives, the SFT adapter it starts from and the lineage it records."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    run: TrainingRun
    sft_adapter: str
    lineage: dict[str, str]
    sft: TrainConfig  # the SFT config under the preference run's name: base, LoRA shape, dtype, template, export


def preference_dataset(path: Path, method: str, negatives: list[str] | None = None) -> Dataset:
    """DPO: the pairs as they are (prompt, chosen, rejected). KTO: each pair as the chosen reply labelled desirable
    and the rejected one undesirable (prompt, completion, label). `negatives`: only pairs of those kinds."""
    rows = read_pairs(path, negatives)
    if method == "dpo":
        return Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows])
    return Dataset.from_list([{"prompt": r["prompt"], "completion": r[side], "label": side == "chosen"}
                              for r in rows for side in ("chosen", "rejected")])


def reply_logp(model, tokenizer, prompt: list[dict], reply: list[dict], max_length: int) -> float:
    """Sum of the log-probabilities of the reply's tokens after the prompt (chat template applied), with whichever
    adapter is active; the left of a conversation longer than `max_length` is cut, as in training."""
    import torch

    start = len(tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=False))
    ids = tokenizer.apply_chat_template(prompt + reply, tokenize=True, return_dict=False)
    cut = max(0, len(ids) - max_length)
    ids, start = ids[cut:], max(1, start - cut)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids], device=model.device)).logits[0, :-1].float()
    logps = torch.log_softmax(logits, dim=-1).gather(1, torch.tensor(ids[1:], device=logits.device)[:, None])[:, 0]
    return float(logps[start - 1:].sum())


def pair_accuracy(model, tokenizer, pairs: list[dict], max_length: int) -> dict[str, float]:
    """On held-out pairs, how often the tuned policy's implicit reward (its log-probability of a reply minus the
    frozen SFT reference's) is higher for the chosen reply than for the rejected one: the preference a method
    learned, measured the same way for DPO and KTO. Also the mean reward margin (in nats, before beta), and the
    accuracy per negative kind (`heldout/pair_accuracy/<kind>`): a mix trained on some kinds is judged on all."""
    from trl.trainer.utils import use_adapter

    was_training = model.training
    model.eval()
    rewards, by_kind = [], {}
    for pair in pairs:
        sides = {}
        for side in ("chosen", "rejected"):
            with use_adapter(model, "ref" if "ref" in model.peft_config else None):
                ref = reply_logp(model, tokenizer, pair["prompt"], pair[side], max_length)
            sides[side] = reply_logp(model, tokenizer, pair["prompt"], pair[side], max_length) - ref
        rewards.append(sides["chosen"] - sides["rejected"])
        by_kind.setdefault(pair.get("negative", "unknown"), []).append(rewards[-1])
    model.train(was_training)
    return {"heldout/pair_accuracy": sum(r > 0 for r in rewards) / len(rewards),
            "heldout/reward_margin": sum(rewards) / len(rewards), "heldout/pairs": float(len(rewards)),
            **{f"heldout/pair_accuracy/{kind}": sum(r > 0 for r in kind_rewards) / len(kind_rewards)
               for kind, kind_rewards in sorted(by_kind.items())}}


def run_identity(cfg: PreferConfig, sft: TrainConfig, sft_adapter_sha: str, pairs_sha: str) -> str:
    payload = json.dumps([cfg.model_dump(mode="json", exclude={"dataset_dir"}), sft_adapter_sha, pairs_sha,
                          resolve_dtype(sft.training)], sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:12]


def sft_config(cfg: PreferConfig, sft: TrainConfig | None = None) -> TrainConfig:
    """The SFT config the preference run builds on (`sft` when given, as the retrain chain gives its own training
    config; else the file `cfg.sft`), renamed to the preference run's name (its adapter family)."""
    return (sft or load_yaml_model(repo_path(cfg.sft), TrainConfig)).model_copy(update={"name": cfg.name})


def locate_run(cfg: PreferConfig, dataset_dir: str | None = None,
               sft: TrainConfig | None = None) -> tuple[TrainingRun, str]:
    """The preference run (identified by its config, the SFT adapter's sha, the pairs' sha and the dtype) and the
    SFT adapter folder it starts from. Every missing input is a one-line error before any work."""
    dataset = repo_path(dataset_dir or cfg.dataset_dir)
    manifest = read_dataset_manifest(dataset)
    pairs_sha = sha256_file(pairs_file(dataset))
    sft = sft or load_yaml_model(repo_path(cfg.sft), TrainConfig)
    if cfg.adapter:  # a given SFT adapter (the champion, say): fetched and verified like evaluation's
        adapter = registry.fetch_verified(cfg.adapter, platform().state / "evals" / "downloads", "adapter")
    else:  # the sft config's finished run on this dataset ("no finished training run ... run charforge train")
        adapter = trained_adapter(sft, str(dataset))
        verify_manifest(adapter, f"train {cfg.sft} again")
    adapter_sha = folder_sha(adapter)
    preset = load_preset(sft.base_model)
    base_dir, _ = prepare_base_model(preset) if sft.base_model_dir is None else (repo_path(sft.base_model_dir), None)
    base_sha = folder_sha(base_dir) if preset.source == "embedded" or sft.base_model_dir else preset.hf_id
    identity = run_identity(cfg, sft, adapter_sha, pairs_sha)
    pairs = len(read_pairs(pairs_file(dataset), cfg.negatives))  # the negative mix leaves some: else an error here
    return TrainingRun(name=cfg.name, identity=identity,
                       run_dir=str(platform().state / "training" / f"{cfg.name}-{identity}"),
                       dataset_dir=str(dataset), dataset_hash=manifest["dataset_hash"], train_rows=pairs,
                       eval_rows=manifest["rows"]["eval"], base_model=sft.base_model, base_dir=str(base_dir),
                       base_sha=base_sha, architecture=preset.architecture), str(adapter)


def lineage(run: TrainingRun, sft_adapter: str) -> dict[str, str]:
    """What the preference adapter's manifest and MLflow run record beside the SFT lineage."""
    return {"sft_parent": sft_adapter, "sft_parent_sha": folder_sha(Path(sft_adapter)),
            "pairs_hash": sha256_file(pairs_file(Path(run.dataset_dir)))}


def start_mlflow_run(cfg: PreferConfig, run: TrainingRun, sft_adapter: str, tags: dict[str, str]) -> str:
    """The run's MLflow run in `charforge-prefer`: reused after a crash, created with params and lineage otherwise."""
    state = run.state()
    use_experiment("prefer")
    run_id = state.get("mlflow_run_id")
    if run_id:
        with mlflow.start_run(run_id=str(run_id)):
            mlflow.set_tags(tags)
    else:
        with mlflow.start_run(run_name=f"{cfg.name}-{run.identity}") as started:
            t = cfg.training
            mlflow.set_tags({"stage": "prefer", "run_identity": run.identity, "dataset_hash": run.dataset_hash,
                             **lineage(run, sft_adapter), **tags})
            mlflow.log_params({"config_name": cfg.name, "method": cfg.method, "sft_config": str(cfg.sft),
                               "pairs": run.train_rows, "negatives": ",".join(cfg.negatives or ["all"]),
                               "beta": t.beta, "max_steps": t.max_steps,
                               "batch_size": t.batch_size, "grad_accum": t.gradient_accumulation_steps,
                               "learning_rate": t.learning_rate, "max_length": t.max_length, "seed": t.seed})
            mlflow.log_dict(cfg.model_dump(mode="json"), "prefer_config.json")
        run_id = started.info.run_id
    write_json_atomic(run.state_file, {**state, "mlflow_run_id": run_id, "identity": run.identity,
                                       "status": "running"})
    return str(run_id)


def preference_args(cfg: PreferConfig, sft: TrainConfig, output_dir: Path):
    t = cfg.training
    dtype = resolve_dtype(sft.training)
    common = dict(
        output_dir=str(output_dir), max_steps=t.max_steps, per_device_train_batch_size=t.batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps, learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler_type, warmup_steps=t.warmup_ratio, beta=t.beta, max_length=t.max_length,
        save_strategy="steps", save_steps=t.save_steps, save_total_limit=t.save_total_limit,
        logging_steps=t.logging_steps, seed=t.seed, data_seed=t.seed, use_cpu=sft.training.use_cpu,
        bf16=dtype == "bfloat16", fp16=dtype == "float16" and not sft.training.use_cpu, report_to="none",
        gradient_checkpointing=sft.training.gradient_checkpointing, dataloader_num_workers=0,
    )
    return DPOConfig(**common) if cfg.method == "dpo" else KTOConfig(**common)


def fit_preference(cfg: PreferConfig, sft: TrainConfig, sft_adapter: Path, model_dir: Path, dataset_dir: Path,
                   run_dir: Path, logger=None) -> FitResult:
    """Train (or resume) in `run_dir/checkpoints`; save the policy adapter to `run_dir/adapter-raw`."""
    data = preference_dataset(pairs_file(dataset_dir), cfg.method, cfg.negatives)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if sft.chat_template:  # the SFT adapter's chat template (the one it is served with renders the same text)
        tokenizer.chat_template = repo_path(sft.chat_template).read_text()
    checkpoints = run_dir / "checkpoints"
    checkpoints.mkdir(parents=True, exist_ok=True)
    resume_from = last_complete_checkpoint(checkpoints, logger)
    # The policy starts as the SFT adapter (trainable); TRL adds the frozen reference copy as adapter "ref".
    policy = PeftModel.from_pretrained(load_base_model(sft, model_dir), str(sft_adapter), is_trainable=True)
    trainer_class = DPOTrainer if cfg.method == "dpo" else KTOTrainer
    callbacks = [ThroughputCallback(), MLflowMetricsCallback()] + ([LogProgressCallback(logger)] if logger else [])
    trainer = trainer_class(model=policy, args=preference_args(cfg, sft, checkpoints), train_dataset=data,
                            processing_class=tokenizer, callbacks=callbacks)
    if logger:
        logger.info(f"{cfg.method.upper()} on {len(data)} {'pairs' if cfg.method == 'dpo' else 'examples'} from "
                    f"{sft_adapter}" + (f"; resuming from {Path(resume_from).name}" if resume_from else ""))
    started = time.monotonic()
    result = trainer.train(resume_from_checkpoint=resume_from)
    metrics = dict(result.metrics)
    metrics["wall_seconds"] = time.monotonic() - started
    metrics["peak_memory_mb"] = peak_memory_mb()
    last = next((h for h in reversed(trainer.state.log_history) if any(k.startswith("rewards/") for k in h)), {})
    metrics.update({k: v for k, v in last.items() if k.startswith(("rewards/", "logps/", "kl"))})
    tokens = next((h["num_tokens"] for h in reversed(trainer.state.log_history) if "num_tokens" in h), None)
    if tokens is not None:  # tokens the policy read (both sides of each pair): the stage's tokens/s
        metrics["num_tokens"] = tokens
    held_out = Path(dataset_dir) / "pairs_eval.jsonl"  # pairs of the evaluation split: never trained on
    if cfg.training.heldout_pairs and held_out.is_file() and held_out.stat().st_size:
        pairs = [json.loads(line) for line in held_out.read_text(encoding="utf-8").splitlines()]
        pairs = pairs[:cfg.training.heldout_pairs]
        t = time.monotonic()
        metrics.update(pair_accuracy(trainer.model, tokenizer, pairs, cfg.training.max_length))
        if logger:
            logger.info(f"held-out pairs: accuracy {metrics['heldout/pair_accuracy']:.3f} on {len(pairs)} pairs, "
                        f"mean reward margin {metrics['heldout/reward_margin']:.3f} ({time.monotonic() - t:.0f} s)")
    trainer.model.save_pretrained(run_dir / "adapter-raw", selected_adapters=["default"])
    final = FitResult(global_step=trainer.state.global_step,
                      resumed_from=Path(resume_from).name if resume_from else None,
                      metrics={k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))})
    (run_dir / "fit.json").write_text(final.model_dump_json(indent=2))
    return final

"""Training throughput: our training task vs a plain TRL SFTTrainer script with default settings, side by side.

    .venv/bin/python bench/train_throughput.py [--steps 8] [--rounds 2] [--dataset .state/datasets/default]

Both train LoRA r=8 on all linear layers of SmolLM2-135M-Instruct on the CPU for the same number of optimizer steps
on the curated default dataset. Plain TRL keeps its defaults (fp32 weights, bf16 autocast, gradient checkpointing,
padded batches); ours is configs/train/smollm2_lora.yaml as shipped (`dtype: auto`: a bf16 base where the CPU has
AVX512-BF16 or AMX). "Useful" tokens are non-padding tokens (TRL's `num_tokens`). A LoRA step on a frozen base
costs ~4 FLOPs per parameter per token (forward 2N, input gradients 2N; no weight gradients for the base); the
achieved rate is compared with this machine's fp32 and bf16 matmul rates measured in the same run.
The two runs alternate for --rounds rounds (a shared VM drifts by 10-20% over minutes); each side's figure is the
mean over its rounds, and every round's ratio is printed too.
Goal: >= 1.5x plain TRL and >= 75% of the fp32 ceiling.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def matmul_ceiling_gflops(dtype=torch.float32, n: int = 2048, repeats: int = 5, trials: int = 5) -> float:
    """Best of several timed trials: the machine's attainable matmul rate in `dtype`, not one noisy sample."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    torch.mm(a, b)
    best = 0.0
    for _ in range(trials):
        started = time.perf_counter()
        for _ in range(repeats):
            torch.mm(a, b)
        best = max(best, 2 * n**3 * repeats / (time.perf_counter() - started) / 1e9)
    return best


def run_ours(model_dir: Path, dataset: Path, steps: int) -> dict:
    """configs/train/smollm2_lora.yaml as shipped (its own batch shape), only the step count set."""
    from charforge.config import load_yaml_model
    from charforge.schemas.train import TrainConfig
    from charforge.training.trainer import fit_adapter

    cfg = load_yaml_model(ROOT / "configs" / "train" / "smollm2_lora.yaml", TrainConfig)
    cfg = cfg.model_copy(update={"training": cfg.training.model_copy(
        update={"max_steps": steps, "save_steps": steps * 10})})
    with tempfile.TemporaryDirectory() as tmp:
        result = fit_adapter(cfg, model_dir, dataset, Path(tmp))
    m = result.metrics
    return {"tokens": m["num_tokens"], "seconds": m["train_runtime"], "loss": m["train_loss"]}


def run_plain_trl(model_dir: Path, dataset: Path, steps: int, batch: int) -> dict:
    """What the TRL docs' SFT + LoRA quick start does, with only steps, batch and CPU set."""
    from datasets import load_dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    data = load_dataset("json", data_files=str(dataset / "train.jsonl"), split="train").select_columns(["messages"])
    with tempfile.TemporaryDirectory() as tmp:
        trainer = SFTTrainer(
            model=str(model_dir),
            args=SFTConfig(output_dir=tmp, max_steps=steps, per_device_train_batch_size=batch, use_cpu=True,
                           report_to="none", save_strategy="no", model_init_kwargs={"dtype": torch.float32}),
            train_dataset=data,
            peft_config=LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM"),
        )
        result = trainer.train()
        tokens = next(h["num_tokens"] for h in reversed(trainer.state.log_history) if "num_tokens" in h)
    return {"tokens": tokens, "seconds": result.metrics["train_runtime"], "loss": result.metrics["train_loss"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--dataset", type=Path, default=ROOT / ".state" / "datasets" / "default")
    args = parser.parse_args()
    from charforge.base_models import load_preset, prepare_base_model
    from charforge.config import load_yaml_model
    from charforge.schemas.train import TrainConfig
    from charforge.training.trainer import resolve_dtype

    model_dir, _ = prepare_base_model(load_preset("smollm2-135m-instruct"))
    params = sum(p.numel() for p in __import__("transformers").AutoModelForCausalLM.from_pretrained(model_dir)
                 .parameters())
    shipped = load_yaml_model(ROOT / "configs" / "train" / "smollm2_lora.yaml", TrainConfig).training
    ceiling = matmul_ceiling_gflops(torch.float32)
    ceiling_bf16 = matmul_ceiling_gflops(torch.bfloat16)
    runs = {"plain TRL defaults": [], "charforge train": []}
    for _ in range(args.rounds):
        runs["plain TRL defaults"].append(run_plain_trl(model_dir, args.dataset, args.steps, args.batch))
        runs["charforge train"].append(run_ours(model_dir, args.dataset, args.steps))
    ceiling = max(ceiling, matmul_ceiling_gflops(torch.float32))  # the best the machine showed during the run
    ceiling_bf16 = max(ceiling_bf16, matmul_ceiling_gflops(torch.bfloat16))

    def rate(r: dict) -> float:
        return r["tokens"] / r["seconds"]

    print(f"\nmatmul ceilings (2048x2048, {torch.get_num_threads()} threads, best seen): fp32 {ceiling:.1f} GFLOP/s, "
          f"bf16 {ceiling_bf16:.1f} GFLOP/s; {params / 1e6:.1f}M parameters; {args.steps} optimizer steps per run, "
          f"{args.rounds} alternating rounds (plain TRL: batch {args.batch}, fp32 weights + bf16 autocast, gradient "
          f"checkpointing; ours: {shipped.attn_implementation} attention, base in {resolve_dtype(shipped)})")
    print(f"{'':22} {'useful tokens':>13} {'seconds':>8} {'tokens/s':>9} {'of fp32 ceiling':>16} {'of bf16 ceiling':>16}")
    means = {}
    for name, rs in runs.items():
        tokens, seconds = sum(r["tokens"] for r in rs), sum(r["seconds"] for r in rs)
        means[name] = sum(rate(r) for r in rs) / len(rs)
        gflops = means[name] * 4 * params / 1e9
        print(f"{name:22} {tokens:>13,.0f} {seconds:>8.1f} {means[name]:>9.1f} {gflops / ceiling:>16.0%} "
              f"{gflops / ceiling_bf16:>16.0%}")
    per_round = [rate(o) / rate(p) for p, o in zip(runs["plain TRL defaults"], runs["charforge train"])]
    print(f"speed-up (useful tokens/s, ours / plain TRL): {means['charforge train'] / means['plain TRL defaults']:.2f}x "
          f"(per round: {', '.join(f'{x:.2f}x' for x in per_round)})")
    print(json.dumps({"runs": runs, "ceiling_gflops": ceiling, "ceiling_bf16_gflops": ceiling_bf16, "params": params}))


if __name__ == "__main__":
    main()

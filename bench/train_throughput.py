"""Training throughput: our training task vs a plain TRL SFTTrainer script with default settings, side by side.

    .venv/bin/python bench/train_throughput.py [--steps 8] [--dataset .state/datasets/default]

Both train LoRA r=8 on all linear layers of SmolLM2-135M-Instruct (fp32, CPU) for the same number of steps and
batch size on the curated default dataset. "Useful" tokens are non-padding tokens (TRL's `num_tokens`). The
ceiling is this machine's fp32 matmul rate measured here; a LoRA step on a frozen base costs ~4 FLOPs per parameter
per token (forward 2N, input gradients 2N; no weight gradients for the base).
Goal: >= 1.5x plain TRL and >= 75% of the ceiling.
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


def matmul_ceiling_gflops(n: int = 2048, repeats: int = 5, trials: int = 5) -> float:
    """Best of several timed trials: the machine's attainable fp32 matmul rate, not one noisy sample."""
    a, b = torch.randn(n, n), torch.randn(n, n)
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
    from tasks.training import fit_adapter

    cfg = load_yaml_model(ROOT / "configs" / "train" / "smollm2_lora.yaml", TrainConfig)
    cfg = cfg.model_copy(update={"training": cfg.training.model_copy(
        update={"max_steps": steps, "save_steps": steps * 10})})
    with tempfile.TemporaryDirectory() as tmp:
        result = fit_adapter(cfg, model_dir, dataset, Path(tmp))
    m = result["metrics"]
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
    parser.add_argument("--dataset", type=Path, default=ROOT / ".state" / "datasets" / "default")
    args = parser.parse_args()
    from charforge.base_models import load_preset, materialize

    model_dir, _ = materialize(load_preset("smollm2-135m-instruct"))
    params = sum(p.numel() for p in __import__("transformers").AutoModelForCausalLM.from_pretrained(model_dir)
                 .parameters())
    ceiling = matmul_ceiling_gflops()
    plain = run_plain_trl(model_dir, args.dataset, args.steps, args.batch)
    ours = run_ours(model_dir, args.dataset, args.steps)
    rows = []
    for name, r in (("plain TRL defaults", plain), ("charforge train", ours)):
        tps = r["tokens"] / r["seconds"]
        share = tps * 4 * params / 1e9 / ceiling
        rows.append((name, r["tokens"], r["seconds"], tps, share))
    print(f"\nfp32 matmul ceiling (2048x2048, {torch.get_num_threads()} threads): {ceiling:.1f} GFLOP/s; "
          f"{params / 1e6:.1f}M parameters; {args.steps} optimizer steps each (plain TRL: batch {args.batch})")
    print(f"{'':22} {'useful tokens':>13} {'seconds':>8} {'tokens/s':>9} {'share of ceiling':>17}")
    for name, tokens, seconds, tps, share in rows:
        print(f"{name:22} {tokens:>13,.0f} {seconds:>8.1f} {tps:>9.1f} {share:>16.0%}")
    print(f"speed-up (useful tokens/s, ours / plain TRL): {rows[1][3] / rows[0][3]:.2f}x")
    print(json.dumps({"plain": plain, "ours": ours, "ceiling_gflops": ceiling, "params": params}))


if __name__ == "__main__":
    main()

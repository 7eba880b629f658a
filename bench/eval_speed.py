"""Evaluation wall time through vLLM (the flow's path) vs through lm-eval's HF backend, same tasks, same docs.

    .venv/bin/python bench/eval_speed.py [--adapter DIR] [--limit 8]

Both sides run the same character tasks with the same chat template on the same adapter: vLLM serves base +
LoRA to lm-eval's `local-completions` (log-likelihoods one prompt at a time, generation 4 requests at a time, as
in configs/eval/default.yaml); the HF side loads transformers + PEFT in this process. Prints the time of each
side and their ratio; server start-up is reported separately (a fleet is already up when a flow evaluates).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from charforge.checksums import verify_manifest  # noqa: E402
from charforge.vllm_server import VLLMServer, free_port  # noqa: E402
from charforge.vllm_server import load_lora_adapter  # noqa: E402
from charforge.training.adapters import newest_adapter  # noqa: E402
from charforge.evaluation.harness import (  # noqa: E402
    ALL_TASKS,
    LOGLIKELIHOOD_TASKS,
    GENERATION_TASKS,
    hf_model_args,
    read_samples,
    run_lm_eval,
    served_model_args,
    summarize,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapter", type=Path, default=None)
    parser.add_argument("--limit", type=int, default=8, help="documents per task (both sides)")
    parser.add_argument("--concurrency", type=int, default=4, help="parallel generation requests to vLLM")
    args = parser.parse_args()
    adapter = (args.adapter or newest_adapter()).resolve()
    base = Path(verify_manifest(adapter, "re-export it")["lineage"]["base_model_path"])
    work = Path(tempfile.mkdtemp(prefix="eval-speed-"))
    common = dict(limit=args.limit)

    server = VLLMServer(base, "base", free_port(), omp_threads=2)
    started = time.perf_counter()
    server.start(work / "vllm.log")
    try:
        server.wait_ready(400)
        startup = time.perf_counter() - started
        load_lora_adapter(server.url, "candidate", adapter)
        url = f"{server.url}/v1/completions"
        t0 = time.perf_counter()
        run_lm_eval(model_args=served_model_args(url, "candidate", base), tasks=LOGLIKELIHOOD_TASKS,
                    output_dir=work / "vllm", **common)
        run_lm_eval(model_args=served_model_args(url, "candidate", base, args.concurrency), tasks=GENERATION_TASKS,
                    output_dir=work / "vllm", **common)
        vllm_s = time.perf_counter() - t0
    finally:
        server.stop()

    t0 = time.perf_counter()
    run_lm_eval(model="hf", model_args=hf_model_args(base, adapter), tasks=ALL_TASKS, output_dir=work / "hf",
                batch_size=4, **common)
    hf_s = time.perf_counter() - t0

    vllm_scores = summarize(read_samples(work / "vllm"), 200)
    hf_scores = summarize(read_samples(work / "hf"), 200)
    print(f"adapter {adapter}, {args.limit} docs per task, tasks {', '.join(ALL_TASKS)}")
    print(f"{'path':<34}{'wall s':>10}")
    print(f"{'vLLM + LoRA (local-completions)':<34}{vllm_s:>10.1f}   (+ {startup:.0f} s server start-up)")
    print(f"{'HF transformers + PEFT (hf)':<34}{hf_s:>10.1f}")
    print(f"ratio HF / vLLM: {hf_s / vllm_s:.2f}x (with vLLM start-up: {hf_s / (vllm_s + startup):.2f}x)")
    for task, metric in [("character_mc", "acc_norm"), ("character_reply_likelihood", "bits_per_byte"),
                         ("character_generation", "char_id_acc")]:
        print(f"  {task}/{metric}: vLLM {vllm_scores[task][metric].value:.3f}  "
              f"HF {hf_scores[task][metric].value:.3f}")
    (work / "timings.json").write_text(json.dumps({"vllm_s": vllm_s, "startup_s": startup, "hf_s": hf_s}))
    print(f"outputs: {work}")


if __name__ == "__main__":
    main()

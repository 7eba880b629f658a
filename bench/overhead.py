"""Orchestration overhead of the retrain chain, and what a cached re-curation costs.

    .venv/bin/python bench/overhead.py                      # small chain: 4 training steps, evaluation limit 4
    .venv/bin/python bench/overhead.py --steps 40 --limit 32 # the demo's sizes (~20 min)

1. Overhead: one `retrain` run (real curation, training, vLLM + lm-eval evaluation, promotion; no deployment) in an
   isolated state directory, with a sampling profiler on the main thread. Every 5 ms the main thread's stack is
   attributed to the innermost frame that is either Prefect/MLflow code (orchestration: run bookkeeping, state
   changes, result persistence, tracking calls and the sqlite/HTTP work under them) or anything else of ours or
   of the libraries doing the work (torch, lm-eval, waiting on vLLM). Goal: orchestration < 5% of the wall time.
   Prefect's background threads and its temporary server process run beside the main thread; their CPU seconds
   are reported too (on 2 cores they take CPU from the work without being on its critical path).
2. Cached re-curation: the curate flow on data/raw into a fresh folder, then again with unchanged inputs (served
   from Prefect's cache). Goal: the second < 5% of the first.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

ORCHESTRATION = (f"{os.sep}prefect{os.sep}", f"{os.sep}mlflow{os.sep}")
OURS = tuple(str(ROOT / d) + os.sep for d in ("charforge", "flows", "tasks", "serving"))


def classify(frame) -> str:
    """'orchestration' or 'work' by the innermost frame that is Prefect/MLflow or ours; 'other' if neither."""
    while frame is not None:
        path = frame.f_code.co_filename
        if "site-packages" in path and any(p in path for p in ORCHESTRATION):
            return "orchestration"
        if path.startswith(OURS):
            return "work"
        frame = frame.f_back
    return "other"


class MainThreadSampler:
    def __init__(self, interval: float = 0.005) -> None:
        self.interval, self.counts, self.stop = interval, Counter(), threading.Event()
        self.main = threading.main_thread().ident
        self.thread = threading.Thread(target=self.run, name="overhead-sampler", daemon=True)

    def run(self) -> None:
        while not self.stop.wait(self.interval):
            frame = sys._current_frames().get(self.main)
            self.counts[classify(frame)] += 1

    def __enter__(self) -> "MainThreadSampler":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()


def thread_cpu() -> dict[str, float]:
    """CPU seconds per live thread name of this process (from /proc)."""
    ticks = os.sysconf("SC_CLK_TCK")
    out: Counter = Counter()
    for task in Path("/proc/self/task").iterdir():
        try:
            name = (task / "comm").read_text().strip()
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[name] += (int(fields[11]) + int(fields[12])) / ticks
    return dict(out)


def prefect_server_cpu() -> float:
    """CPU seconds of the temporary Prefect server processes this process started (children running uvicorn)."""
    ticks, total = os.sysconf("SC_CLK_TCK"), 0.0
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            stat = (proc / "stat").read_text().rsplit(")", 1)[1].split()
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        if int(stat[1]) == os.getpid() and b"prefect" in cmdline and b"server" in cmdline:
            total += (int(stat[11]) + int(stat[12])) / ticks
    return total


def chain_parameters(root: Path, steps: int, limit: int) -> dict:
    from charforge.config import load_yaml_model
    from charforge.schemas.evaluate import EvalConfig
    from charforge.schemas.train import TrainConfig
    from charforge.settings import CONFIGS_DIR
    from charforge.chain import load_chain

    params = dict(load_chain(CONFIGS_DIR / "retrain" / "demo.yaml"))
    train = load_yaml_model(CONFIGS_DIR / "train" / "smollm2_lora.yaml", TrainConfig).model_copy(
        update={"name": "overhead-bench"})
    train.training.max_steps, train.training.save_steps = steps, steps
    evaluate = load_yaml_model(CONFIGS_DIR / "eval" / "quick.yaml", EvalConfig).model_copy(update={"limit": limit})
    return {**params, "train": train, "evaluate": evaluate, "dataset_dir": str(root / "dataset"), "deploy": False,
            "approve": True, "approval_comment": "bench/overhead.py"}


def measure_chain(root: Path, steps: int, limit: int) -> dict:
    from flows.retrain import retrain

    from tasks.runtime import quiet_flow_heartbeats

    params = chain_parameters(root, steps, limit)
    started = time.perf_counter()
    with MainThreadSampler() as sampler, quiet_flow_heartbeats():  # as `charforge retrain` runs it
        result = retrain(**params)
    wall = time.perf_counter() - started
    total = sum(sampler.counts.values())
    threads = thread_cpu()
    return {"wall_s": wall, "samples": dict(sampler.counts),
            "orchestration_share": sampler.counts["orchestration"] / total,
            "background_cpu_s": {k: v for k, v in threads.items() if k not in ("python", "overhead-sampl")
                                 and v >= 0.5},
            "prefect_server_cpu_s": prefect_server_cpu(), "promoted": result.promoted}


def measure_recuration(root: Path) -> tuple[float, float]:
    from prefect import flow

    from tasks.runtime import quiet_flow_heartbeats
    from flows.curate import curate

    flow(name="warm-up")(lambda: None)()  # the temporary Prefect server starts here, not inside the first timing
    times = []
    for _ in range(2):
        started = time.perf_counter()
        with quiet_flow_heartbeats():  # as `charforge curate` runs it
            curate(inputs=("data/raw",), out_dir=str(root / "recurate"))
        times.append(time.perf_counter() - started)
    return times[0], times[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=4, help="training steps")
    parser.add_argument("--limit", type=int, default=4, help="evaluation documents per task")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="charforge-overhead-") as tmp:
        root = Path(tmp)
        from charforge.base_models import load_preset, prepare_base_model

        shared, _ = prepare_base_model(load_preset())  # the verified base model of the real state dir, not a second copy
        os.environ["CHARFORGE_STATE_DIR"] = str(root / "state")
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{root / 'mlflow.db'}"
        os.environ["PREFECT_HOME"] = str(root / "prefect")
        os.environ.pop("PREFECT_API_URL", None)  # a temporary local server, as `charforge retrain` uses
        from charforge.settings import export_environment

        export_environment()
        (root / "state" / "models").mkdir(parents=True)
        (root / "state" / "models" / shared.name).symlink_to(shared)
        first, second = measure_recuration(root)
        chain = measure_chain(root, args.steps, args.limit)
    s = chain["samples"]
    print(f"chain wall time: {chain['wall_s']:.1f} s ({args.steps} training steps, evaluation limit {args.limit}; "
          f"promoted: {chain['promoted']})")
    print(f"main thread samples: orchestration {s.get('orchestration', 0)}, work {s.get('work', 0)}, "
          f"other {s.get('other', 0)}")
    print(f"orchestration overhead (Prefect + MLflow on the main thread): {chain['orchestration_share']:.2%} of the "
          f"chain's wall time (goal < 5%)")
    print(f"beside it: Prefect's temporary server used {chain['prefect_server_cpu_s']:.1f} CPU s; other threads "
          f"of this process: " + ", ".join(f"{k} {v:.1f} s" for k, v in sorted(chain["background_cpu_s"].items())))
    print(f"curation of data/raw: {first:.2f} s; unchanged re-run (cached): {second:.2f} s = {second / first:.1%} "
          f"of the first (goal < 5%)")


if __name__ == "__main__":
    main()

"""Serving: gateway vs direct vLLM, adapter vs base vs merged throughput, and adapter hot-load time, in one run.

    .venv/bin/python bench/serving.py [--adapter DIR] [--requests 32] [--tokens 32]

1. One vLLM replica (runtime LoRA on) and the gateway as its own process (`charforge gateway`), as deployed.
   Gateway vs direct: the same requests (8 concurrent streams, fixed output length via `ignore_eos`), rounds
   interleaved direct/gateway so drift hits both; throughput ratio. Added latency: 60 pairs of sequential 1-token
   requests, direct and through the gateway alternately on kept-alive connections; p50 gateway minus p50 direct.
2. Adapter vs base on the same replica at 1 and 8 concurrent streams (tokens/s ratio), and prompt scoring (a
   ~300-token conversation, its log-probabilities echoed, one request at a time: what lm-eval sends during
   evaluation). Then the same on a replica started with `VLLM_PLUGINS=""`, i.e. with vLLM's reference CPU LoRA
   ops instead of charforge_vllm's grouped ones (vllm_plugin/).
3. Merged mode: the adapter folded into the base (`charforge.quantization.merge_adapter`), served by a replica
   without --enable-lora; merged vs base-on-the-LoRA-replica, and base without LoRA, at 1 and 8 streams. This
   separates what the LoRA compute costs from what enabling LoRA costs for every request.
4. Hot-load: POST /v1/load_lora_adapter per new name, median of 5.
Servers run one at a time with both cores; numbers on a shared or busy machine move, ratios less so.

    .venv/bin/python bench/serving.py --ratios 5 [--adapter random]

Only the runtime-LoRA ratios, before and after side by side: (a) adapter / base on the same LoRA replica and (b)
adapter / base on a replica without --enable-lora, at 1 and 8 streams, for charforge_vllm's fused layers (the
default), with single-adapter batches on merged weights (`CHARFORGE_VLLM_LORA_MERGE=1`), either compiled
(`CHARFORGE_VLLM_LORA_COMPILE=1`), its per-slice grouped ops (`CHARFORGE_VLLM_LORA=
grouped`, the "before") and vLLM's own ops (`VLLM_PLUGINS=""`). The replicas are up at once (idle, each costs a
few percent of a core) and measured in turn, the order rotated every round; each ratio is taken within a round,
then the median and the range over rounds are printed. One OpenMP thread per replica by default, as the fleet runs
them (`--threads`): with two on two cores every small op waits for the engine process's polling.
`--adapter random`: an all-linear rank-8 PEFT adapter with random weights (the demo's shape; throughput does not
depend on the values), for a machine with no trained adapter.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import httpx  # noqa: E402
import yaml  # noqa: E402

from charforge.base_models import load_preset, prepare_base_model  # noqa: E402
from charforge.vllm_server import VLLMServer, free_port  # noqa: E402
from charforge.training.adapters import newest_adapter  # noqa: E402
from charforge.quantization import merge_adapter  # noqa: E402

PROMPT = [{"role": "user", "content": "Tell me about your morning, in detail."}]


async def load(url: str, model: str, streams: int, requests: int, tokens: int) -> dict:
    """`requests` chat completions of exactly `tokens` tokens, `streams` at a time -> tokens/s and latencies."""
    latencies: list[float] = []
    produced = 0
    queue = asyncio.Queue()
    for _ in range(requests):
        queue.put_nowait(None)

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal produced
        while not queue.empty():
            queue.get_nowait()
            sent = time.perf_counter()
            r = await client.post(f"{url}/v1/chat/completions", json={
                "model": model, "messages": PROMPT, "max_tokens": tokens, "temperature": 0, "ignore_eos": True})
            r.raise_for_status()
            latencies.append(time.perf_counter() - sent)
            produced += r.json()["usage"]["completion_tokens"]

    async with httpx.AsyncClient(timeout=600) as client:
        started = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(streams)))
        wall = time.perf_counter() - started
    return {"tok_s": produced / wall, "p50": statistics.median(latencies), "wall": wall}


def latencies(direct: str, direct_model: str, gateway: str, gateway_model: str, pairs: int) -> tuple[list, list]:
    """Sequential 1-token requests, direct and through the gateway alternately (drift hits both), each target on
    its own kept-alive connection as an application's client would hold it."""
    body = {"messages": PROMPT, "max_tokens": 1, "temperature": 0, "ignore_eos": True}
    d_lat, g_lat = [], []
    with httpx.Client(timeout=120) as d, httpx.Client(timeout=120) as g:
        for i in range(pairs + 2):
            for client, url, model, out in ((d, direct, direct_model, d_lat), (g, gateway, gateway_model, g_lat)):
                sent = time.perf_counter()
                client.post(f"{url}/v1/chat/completions", json={**body, "model": model}).raise_for_status()
                if i >= 2:  # the first two pairs open the connections
                    out.append(time.perf_counter() - sent)
    return d_lat, g_lat


def scoring(url: str, model: str, ids: list[int], requests: int) -> float:
    """Prompt tokens/s of sequential log-likelihood requests (echo + logprobs, one output token)."""
    with httpx.Client(timeout=300) as client:
        started = time.perf_counter()
        for _ in range(requests):
            client.post(f"{url}/v1/completions", json={"model": model, "prompt": ids, "max_tokens": 1, "echo": True,
                                                       "logprobs": 0, "temperature": 0}).raise_for_status()
    rate = len(ids) * requests / (time.perf_counter() - started)
    print(f"  {model} @ {url}: scoring {requests} x {len(ids)}-token prompts -> {rate:.0f} prompt tok/s", flush=True)
    return rate


def scoring_prompt(base_dir: Path) -> list[int]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    turns = [{"role": "system", "content": "You are Nell Bramwick, keeper of the Gull Rock light."}]
    for i in range(6):
        turns += [{"role": "user", "content": f"Tell me about storm number {i} you remember, and what you did."},
                  {"role": "assistant", "content": "It came in from the west like a bosun with a grudge. I trimmed "
                   "the wicks, wound the clockwork, and kept the lamp turning till the grey came up over the water."}]
    return tokenizer.apply_chat_template(turns, tokenize=True, return_dict=True)["input_ids"]


def lora_figures(server: VLLMServer, ids: list[int], n: int, t: int, per: dict, suffix: str) -> None:
    """Base vs adapter on one LoRA replica: decode tokens/s at 1 and 8 streams, and prompt scoring."""
    for streams, count in ((1, max(4, n // 8)), (8, n)):
        per[("base" + suffix, streams)] = run(server.url, "base", streams, count, t)["tok_s"]
        per[("adapter" + suffix, streams)] = run(server.url, "a0", streams, count, t)["tok_s"]
    scoring(server.url, "a0", ids, 1)  # warm-up: the first long prompt allocates
    per[("base" + suffix, "scoring")] = scoring(server.url, "base", ids, 8)
    per[("adapter" + suffix, "scoring")] = scoring(server.url, "a0", ids, 8)


def run(url: str, model: str, streams: int, requests: int, tokens: int) -> dict:
    result = asyncio.run(load(url, model, streams, requests, tokens))
    if requests > 1:
        print(f"  {model} @ {url}: {streams} stream(s) x {requests} requests -> {result['tok_s']:.1f} tok/s",
              flush=True)
    return result


def start(server: VLLMServer, work: Path, label: str) -> float:
    started = time.perf_counter()
    server.start(work / f"{label}.log")
    server.wait_ready(600)
    run(server.url, server.served_name, 1, 2, 4)  # warm-up: first requests compile/allocate
    return time.perf_counter() - started


def start_gateway(replica: str, work: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    config = work / "serving.yaml"
    config.write_text(yaml.safe_dump({"gateway": {"port": port, "api_key_env": None, "health_interval_s": 0.5},
                                      "fleet": {"discovery": "static", "urls": [replica]}}))
    env = dict(os.environ, CHARFORGE_STATE_DIR=str(work / "state"))
    proc = subprocess.Popen([sys.executable, "-m", "cli", "gateway", "--config", str(config)], env=env,
                            stdout=open(work / "gateway.log", "wb"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"gateway did not start; see {work / 'gateway.log'}")


def random_adapter(base_dir: Path, out: Path, rank: int = 8, seed: int = 0) -> Path:
    """An all-linear LoRA of `rank` on the base with random A and B (a trained adapter's shape, not its values)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from charforge.checksums import folder_sha
    from charforge.settings import CONFIGS_DIR
    from charforge.training.adapters import export_adapter

    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir),
                           LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear"))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.02)
    model.save_pretrained(out.with_name(out.name + "-raw"))
    lineage = {"base_model": "smollm2-135m-instruct", "base_model_path": str(base_dir),
               "base_model_sha": folder_sha(base_dir), "dataset_hash": "none", "train_config": "random (bench)",
               "run_identity": "bench-serving", "mlflow_run_id": "none"}
    export_adapter(out.with_name(out.name + "-raw"), out, "bfloat16", lineage,
                   CONFIGS_DIR / "train" / "templates" / "chatml_training.jinja")  # with its manifest, as trained
    return out


REPLICAS = {  # label -> (enable LoRA, environment)
    "merged + compiled": (True, {"CHARFORGE_VLLM_LORA_MERGE": "1", "CHARFORGE_VLLM_LORA_COMPILE": "1"}),
    "fused + merged": (True, {"CHARFORGE_VLLM_LORA_MERGE": "1"}),
    "fused + compiled": (True, {"CHARFORGE_VLLM_LORA_COMPILE": "1"}),
    "fused (after)": (True, {}),
    "grouped (before)": (True, {"CHARFORGE_VLLM_LORA": "grouped"}),
    "vLLM ops": (True, {"VLLM_PLUGINS": ""}),
    "no --enable-lora": (False, {}),
}


def ratios(base_dir: Path, adapter: Path, work: Path, rounds: int, n: int, t: int, chosen: list[str],
           threads: int) -> None:
    """(a) adapter / base on the same LoRA replica and (b) adapter / base without --enable-lora, per round."""
    servers = {label: VLLMServer(base_dir, "base", free_port(), omp_threads=threads, max_cpu_loras=8, max_loras=2,
                                 enable_lora=lora, extra_env=env)
               for label, (lora, env) in REPLICAS.items() if label in chosen}
    try:
        for i, (label, server) in enumerate(servers.items()):
            start(server, work, f"replica-{i}")
            if server.enable_lora:
                httpx.post(f"{server.url}/v1/load_lora_adapter", json={"lora_name": "a0", "lora_path": str(adapter)},
                           timeout=120).raise_for_status()
                run(server.url, "a0", 1, 2, 4)
            print(f"  {label}: up at {server.url}", flush=True)
        per_round: list[dict] = []
        labels = list(servers)
        for r in range(rounds):
            order = labels[r % len(labels):] + labels[:r % len(labels)]
            tok: dict = {}
            for streams, count in ((1, max(4, n // 8)), (8, n)):
                for label in order:
                    models = ("base", "a0") if servers[label].enable_lora else ("base",)
                    for model in (models if r % 2 == 0 else models[::-1]):
                        tok[(label, model, streams)] = asyncio.run(
                            load(servers[label].url, model, streams, count, t))["tok_s"]
            per_round.append(tok)
            print(f"round {r + 1}/{rounds}: " + "  ".join(
                f"{label} a0/base {tok[(label, 'a0', s)] / tok[(label, 'base', s)]:.2f} @{s}"
                for label in labels if servers[label].enable_lora for s in (1, 8)), flush=True)
    finally:
        for server in servers.values():
            server.stop()

    def spread(values: list[float]) -> str:
        return f"{statistics.median(values):.2f}x ({min(values):.2f}-{max(values):.2f})"

    plain = "no --enable-lora"
    print(f"\n{rounds} rounds, {threads} OpenMP thread(s) per replica; {n} requests x {t} tokens at 8 streams, "
          f"{max(4, n // 8)} at 1 stream; median (min-max over rounds)\n")
    print(f"{'LoRA ops':<18} {'streams':>7}  {'adapter tok/s':>13}  {'base tok/s':>10}  "
          f"{'(a) adapter/base, same replica':>30}"
          f"  {'(b) adapter/base without LoRA':>30}  {'base with/without LoRA':>22}")
    for label in labels:
        if label == plain:
            continue
        for s in (1, 8):
            a = [tok[(label, "a0", s)] for tok in per_round]
            b = [tok[(label, "base", s)] for tok in per_round]
            p = [tok[(plain, "base", s)] for tok in per_round]
            print(f"{label:<18} {s:>7}  {statistics.median(a):>13.1f}  {statistics.median(b):>10.1f}  "
                  f"{spread([x / y for x, y in zip(a, b)]):>30}  {spread([x / y for x, y in zip(a, p)]):>30}  "
                  f"{spread([x / y for x, y in zip(b, p)]):>22}")
    print(f"{plain:<18} base tok/s: 1 stream {statistics.median(tok[(plain, 'base', 1)] for tok in per_round):.1f}, "
          f"8 streams {statistics.median(tok[(plain, 'base', 8)] for tok in per_round):.1f}")
    print("goals: (a) >= 0.9x at 8 streams, (b) >= 0.85x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapter", default=None, help="an adapter folder, or 'random' (default: the newest trained)")
    parser.add_argument("--requests", type=int, default=32, help="requests per measurement at 8 streams")
    parser.add_argument("--tokens", type=int, default=32, help="output tokens per request")
    parser.add_argument("--ratios", type=int, default=0, metavar="ROUNDS",
                        help="only the runtime-LoRA ratios, this many alternating rounds")
    parser.add_argument("--replicas", default=",".join(REPLICAS),
                        help=f"with --ratios: which replicas, comma-separated, of {', '.join(REPLICAS)}")
    parser.add_argument("--threads", type=int, default=1,
                        help="with --ratios: OpenMP threads per replica (1, as the fleet's replicas run)")
    args = parser.parse_args()
    base_dir, _ = prepare_base_model(load_preset())
    work = Path(tempfile.mkdtemp(prefix="bench-serving-"))
    if args.adapter == "random":
        adapter = random_adapter(base_dir, work / "random-adapter")
    else:
        adapter = (Path(args.adapter) if args.adapter else newest_adapter()).resolve()
    n, t = args.requests, args.tokens
    if args.ratios:
        chosen = [label.strip() for label in args.replicas.split(",")]
        unknown = [label for label in chosen if label not in REPLICAS]
        if unknown or "no --enable-lora" not in chosen:
            parser.error(f"--replicas {args.replicas!r}: each of {', '.join(REPLICAS)}; 'no --enable-lora' is needed")
        return ratios(base_dir, adapter, work, args.ratios, n, t, chosen, args.threads)
    rows: list[tuple[str, str]] = []
    ids = scoring_prompt(base_dir)

    lora = VLLMServer(base_dir, "base", free_port(), omp_threads=2, max_cpu_loras=8, max_loras=2)
    startup = start(lora, work, "lora")
    try:
        loads = []
        for i in range(5):
            t0 = time.perf_counter()
            r = httpx.post(f"{lora.url}/v1/load_lora_adapter", json={"lora_name": f"a{i}", "lora_path": str(adapter)},
                           timeout=120)
            loads.append(time.perf_counter() - t0)
            r.raise_for_status()
        run(lora.url, "a0", 1, 2, 4)  # warm-up of the LoRA path

        gw_proc, gw = start_gateway(lora.url, work)
        try:
            httpx.put(f"{gw}/admin/routes/bench", json={"weights": {"base": 100}}).raise_for_status()
            direct, via = [], []
            for _ in range(2):  # interleaved rounds
                direct.append(run(lora.url, "base", 8, n, t // 2))
                via.append(run(gw, "bench", 8, n, t // 2))
            d_lat, g_lat = latencies(lora.url, "base", gw, "bench", pairs=60)
        finally:
            gw_proc.terminate()
            gw_proc.wait(30)
        d_tok = statistics.mean(r["tok_s"] for r in direct)
        g_tok = statistics.mean(r["tok_s"] for r in via)
        added_ms = (statistics.median(g_lat) - statistics.median(d_lat)) * 1000
        rows += [("gateway / direct throughput (8 streams)", f"{g_tok:.1f} / {d_tok:.1f} tok/s = {g_tok / d_tok:.3f}x"
                  f"  (goal >= 0.97x)"),
                 ("added latency p50 (1-token requests)", f"{added_ms:+.2f} ms  (goal < 2 ms)"),
                 ("hot-load per name (median of 5)", f"{statistics.median(loads) * 1000:.0f} ms  (goal < 1 s)")]

        per = {}
        lora_figures(lora, ids, n, t, per, "")
    finally:
        lora.stop()

    # VLLM_PLUGINS="": vLLM's switch for general plugins, off in this replica, so its own LoRA ops run
    reference = VLLMServer(base_dir, "base", free_port(), omp_threads=2, max_cpu_loras=8, max_loras=2,
                           extra_env={"VLLM_PLUGINS": ""})
    start(reference, work, "reference-ops")
    try:
        httpx.post(f"{reference.url}/v1/load_lora_adapter", json={"lora_name": "a0", "lora_path": str(adapter)},
                   timeout=120).raise_for_status()
        run(reference.url, "a0", 1, 2, 4)
        lora_figures(reference, ids, n, t, per, " (vLLM ops)")
    finally:
        reference.stop()

    merged_dir = merge_adapter(adapter, base_dir, work / "merged")
    for label, folder in (("merged", merged_dir), ("base, no --enable-lora", base_dir)):
        plain = VLLMServer(folder, "plain", free_port(), omp_threads=2, enable_lora=False)
        start(plain, work, "plain")
        try:
            for streams, count in ((1, max(4, n // 8)), (8, n)):
                per[(label, streams)] = run(plain.url, "plain", streams, count, t)["tok_s"]
        finally:
            plain.stop()

    for streams in (1, 8):
        b = per[("base", streams)]
        rows.append((f"{streams} stream(s): tok/s", "  ".join(f"{k}: {per[(k, streams)]:.1f}" for k in
                     ("base, no --enable-lora", "base", "adapter", "merged"))))
        reference = per[("adapter (vLLM ops)", streams)] / per[("base (vLLM ops)", streams)]
        rows.append((f"{streams} stream(s): adapter / base", f"{per[('adapter', streams)] / b:.2f}x"
                     + ("  (goal >= 0.9x)" if streams == 8 else "")
                     + f"; with vLLM's reference LoRA ops {reference:.2f}x"))
        rows.append((f"{streams} stream(s): merged / base", f"{per[('merged', streams)] / b:.2f}x"))
        rows.append((f"{streams} stream(s): base with / without --enable-lora",
                     f"{b / per[('base, no --enable-lora', streams)]:.2f}x"))
    for suffix, name in (("", "charforge_vllm (fused layers)"), (" (vLLM ops)", "vLLM's reference ops")):
        a, b = per[("adapter" + suffix, "scoring")], per[("base" + suffix, "scoring")]
        rows.append((f"prompt scoring, {name}", f"adapter {a:.0f} / base {b:.0f} prompt tok/s = {a / b:.2f}x"))
    rows.append(("prompt scoring with an adapter: charforge_vllm / reference ops",
                 f"{per[('adapter', 'scoring')] / per[('adapter (vLLM ops)', 'scoring')]:.2f}x"))
    print(f"\nvLLM replica start-up (with LoRA): {startup:.0f} s; {n} requests x {t} tokens at 8 streams\n")
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")


if __name__ == "__main__":
    main()

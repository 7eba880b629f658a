"""How many requests per second one gateway process sustains, and what it adds at a moderate rate, measured with
locust against instant stand-in replicas (so the gateway, not vLLM, is what runs out).

    make bench-capacity      (= .venv/bin/python bench/gateway_capacity.py; locust lives in .venv-bench)

1. Stand-ins: two replicas that answer `/health`, `/v1/models` and chat completions at once (a canned reply, or
   a stream of 8 SSE chunks), written on bare asyncio streams so they outrun the gateway.
2. Saturation: locust (FastHttpUser: one process, `--users` users, no wait) for `--seconds` against a
   `charforge gateway` in front of both stand-ins, non-streaming then streaming: requests/s, p50, failures; and the
   same load straight at one stand-in, the ceiling of the load generator on this machine. Then two gateway
   processes, half the users on each: their sum.
3. Added latency at a fixed rate: 100 requests/s (locust users with `constant_throughput`), p50 through the gateway
   minus p50 straight to a stand-in, runs alternating; through one process of each server stack, and through two
   processes taking 50 requests/s each; then the same rate from an open-loop aiohttp client (100 keep-alive
   connections at 1 req/s each). The two clients disagree by far more than the gateway costs (locust's gevent
   client at 100 users measured +26 ms where aiohttp measured +0.8 ms), so both are printed.
Saturation and latency are measured for both server stacks uvicorn offers, side by side: uvloop + httptools (what
`gateway.event_loop: auto` and `gateway.http_parser: auto` pick, installed with the pipeline) and asyncio + h11.
4. Where the time goes: `py-spy` (if installed in .venv-bench) samples the saturated gateway; the top frames by own
   time are printed.
5. Capture: the same gateway capturing every conversation vs not, alternating (the order flips every repeat):
   saturated requests/s, CPU microseconds per request from /proc (the gateway's event-loop thread, its other threads,
   and its capture writer process), the p50 at 100 requests/s, and the store's size per 1,000 conversations.

Every process shares this machine's cores with the load generator: the figures are for this machine, not a bound of
the gateway's design.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import httpx  # noqa: E402

from charforge.vllm_server import free_port  # noqa: E402
from tests.gateways import GatewayProcess  # noqa: E402

LOCUST = REPO / ".venv-bench" / "bin" / "locust"
PYSPY = REPO / ".venv-bench" / "bin" / "py-spy"
KEY, ADMIN_KEY = "capacity-key", "capacity-admin-key"
VERSION = "stand-in-v1"
REPLY = json.dumps({"id": "x", "object": "chat.completion", "model": VERSION, "usage": {"completion_tokens": 2},
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": "Good day."},
                                 "finish_reason": "stop"}]}).encode()
CHUNK = b'data: {"choices": [{"index": 0, "delta": {"content": "word "}}]}\n\n'
STREAM = CHUNK * 8 + b"data: [DONE]\n\n"
MODELS = json.dumps({"data": [{"id": VERSION, "parent": "base", "root": "/x"}]}).encode()


# ---- stand-in replica ------------------------------------------------------------------------------------------------
async def serve_stand_in(port: int) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, path = lines[0].split(" ")[:2]
                length = next((int(h.split(":", 1)[1]) for h in lines[1:] if h.lower().startswith("content-length:")),
                              0)
                body = await reader.readexactly(length) if length else b""
                if path == "/health":
                    payload, kind = b"", b"application/json"
                elif path == "/v1/models":
                    payload, kind = MODELS, b"application/json"
                elif b'"stream": true' in body or b'"stream":true' in body:
                    payload, kind = STREAM, b"text/event-stream"
                else:
                    payload, kind = REPLY, b"application/json"
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: " + kind + b"\r\ncontent-length: " +
                             str(len(payload)).encode() + b"\r\n\r\n" + payload)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, ValueError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", port, backlog=1024)
    async with server:
        await server.serve_forever()


def stand_in_process(port: int) -> subprocess.Popen:
    code = f"import asyncio, sys; sys.path.insert(0, {str(REPO)!r}); from bench.gateway_capacity import " \
           f"serve_stand_in; asyncio.run(serve_stand_in({port}))"
    proc = subprocess.Popen([sys.executable, "-c", code])
    wait_up(f"http://127.0.0.1:{port}/health", proc)
    return proc


def wait_up(url: str, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"{url} did not come up")
        time.sleep(0.2)


def gateway_process(work: Path, name: str, replicas: list[str], stack: dict, capture: dict | None = None,
                    env: dict | None = None) -> GatewayProcess:
    """A `charforge gateway` with its own state (a one-route table) in front of the stand-ins, on the given server
    stack (`gateway.event_loop`, `gateway.http_parser`), with the given `capture` settings."""
    state = work / f"state-{name}"
    (state / "serving").mkdir(parents=True)
    (state / "serving" / "routes.json").write_text(json.dumps({"routes": {"bench": {"weights": {VERSION: 100}}}}))
    env = {"CHARFORGE_GATEWAY_API_KEY": KEY, "CHARFORGE_GATEWAY_ADMIN_KEY": ADMIN_KEY,
           "CHARFORGE_REPLICA_API_KEY": None, **(env or {})}
    return GatewayProcess(work, name, replicas, state, {"gateway": {"strategy": "round_robin",
                                                                    "max_inflight_per_replica": 512, **stack},
                                                        "capture": capture or {}}, env)


# ---- load ------------------------------------------------------------------------------------------------------------
LOCUSTFILE = '''
import os
import random

import gevent
from locust import FastHttpUser, constant, constant_throughput, task

STREAM = os.environ["CAP_STREAM"] == "1"
RATE = float(os.environ.get("CAP_RATE", "0"))
BODY = {"model": os.environ["CAP_MODEL"], "max_tokens": 8, "stream": STREAM,
        "messages": [{"role": "user", "content": "Good morning!"}]}
HEADERS = {"authorization": "Bearer " + os.environ["CAP_KEY"]} if os.environ.get("CAP_KEY") else {}


class Chat(FastHttpUser):
    wait_time = constant_throughput(RATE) if RATE else constant(0)
    connection_timeout = network_timeout = 30

    def on_start(self):
        if RATE:  # users spawned together would send in bursts, one per second: spread their phases
            gevent.sleep(random.random() / RATE)

    @task
    def chat(self):
        with self.client.post("/v1/chat/completions", json=BODY, headers=HEADERS, catch_response=True) as r:
            if r.status_code != 200 or (STREAM and not r.content.endswith(b"data: [DONE]\\n\\n")):
                r.failure(str(r.status_code))
'''


def locust(work: Path, url: str, users: int, seconds: int, stream: bool, model: str, key: str | None,
           rate: float = 0.0, tag: str = "run") -> subprocess.Popen:
    script = work / "capacity_locustfile.py"
    script.write_text(LOCUSTFILE)
    env = {**os.environ, "CAP_STREAM": "1" if stream else "0", "CAP_RATE": str(rate), "CAP_MODEL": model,
           "CAP_KEY": key or ""}
    return subprocess.Popen([str(LOCUST), "-f", str(script), "--headless", "-u", str(users), "-r", str(users),
                             "--host", url, "--run-time", f"{seconds}s", "--only-summary", "--csv",
                             str(work / tag), "--loglevel", "ERROR"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


def stats(work: Path, tag: str) -> dict:
    with open(work / f"{tag}_stats.csv") as handle:
        row = next(r for r in csv.DictReader(handle) if r["Name"] == "Aggregated")
    return {"rps": float(row["Requests/s"]), "p50_ms": float(row["50%"]), "p99_ms": float(row["99%"]),
            "requests": int(row["Request Count"]), "failures": int(row["Failure Count"])}


def profile(pid: int, seconds: int, out: Path) -> str:
    if not PYSPY.exists():
        return "(py-spy is missing from .venv-bench: `make bench-capacity` installs it)"
    subprocess.run([str(PYSPY), "record", "--pid", str(pid), "--duration", str(seconds), "--format", "raw",
                    "--output", str(out), "--nonblocking", "--rate", "200"], capture_output=True, timeout=seconds + 60)
    if not out.is_file():
        return "(py-spy recorded nothing: it needs ptrace permission)"
    own: dict[str, int] = {}
    total = 0
    for line in out.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        leaf = frames[-1]
        # the module of the frame that spent the time, e.g. "httpx/_client.py" or "serving/gateway.py"
        place = leaf.split("(")[-1].rstrip(")").split(":")[0] if "(" in leaf else leaf
        module = "/".join(Path(place).parts[-2:])
        own[module] = own.get(module, 0) + int(count)
        total += int(count)
    top = sorted(own.items(), key=lambda kv: -kv[1])[:12]
    return "\n".join(f"    {100 * n / total:5.1f}%  {m}" for m, n in top)


async def open_loop(url: str, model: str, key: str | None, connections: int, seconds: int) -> list[float]:
    """Latencies (ms) of an open-loop aiohttp client: `connections` keep-alive connections, each sending one chat
    per second at its own random phase, whatever the answers take."""
    import aiohttp

    body = {"model": model, "max_tokens": 8, "messages": [{"role": "user", "content": "Good morning!"}]}
    headers = {"authorization": f"Bearer {key}"} if key else {}
    latencies: list[float] = []

    async def connection() -> None:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as session:
            await asyncio.sleep(random.random())
            due, end = time.monotonic(), time.monotonic() + seconds
            while due < end:
                started = time.perf_counter()
                async with session.post(f"{url}/v1/chat/completions", json=body, headers=headers) as r:
                    await r.read()
                    if r.status == 200:
                        latencies.append((time.perf_counter() - started) * 1000)
                due += 1.0
                await asyncio.sleep(max(0.0, due - time.monotonic()))
    await asyncio.gather(*(connection() for _ in range(connections)))
    return latencies


STACKS = {"uvloop + httptools": {"event_loop": "uvloop", "http_parser": "httptools"},  # the default (auto)
          "asyncio + h11": {"event_loop": "asyncio", "http_parser": "h11"}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=20)
    parser.add_argument("--users", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", nargs="*", default=["stacks", "gc", "capture"],
                        help="stacks: saturation and latency of the server stacks and of two processes; gc: the "
                             "gateway with and without gc.freeze(); capture: capture of every conversation on vs off")
    args = parser.parse_args()
    if not LOCUST.exists():
        raise SystemExit(f"{LOCUST} is missing: run `make bench-load`, which installs locust there")
    work = Path(tempfile.mkdtemp(prefix="charforge-capacity-"))
    ports = [free_port(), free_port()]
    stand_ins = [stand_in_process(p) for p in ports]
    replicas = [f"http://127.0.0.1:{p}" for p in ports]
    gateways = {name: gateway_process(work, f"one-{i}", replicas, stack) for i, (name, stack) in
                enumerate(STACKS.items())}
    default = next(iter(gateways))
    try:
        if "stacks" in args.only:
            stacks(args, work, replicas, gateways, default)
        if "gc" in args.only:
            gc_freeze(args, work, replicas, gateways[default])
        if "capture" in args.only:
            capture_cost(args, work, replicas, gateways[default])
    finally:
        for gw in gateways.values():
            gw.stop()
        for proc in stand_ins:
            proc.terminate()
        shutil.rmtree(work, ignore_errors=True) if os.environ.get("CAPACITY_CLEAN") else None


def cpu_seconds(pid: int) -> tuple[float, float, float]:
    """User + system CPU time a gateway has used: (its main thread, the event loop; its other threads; its child
    processes, the capture writer)."""
    main = other = 0.0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            seconds = stat_seconds(task / "stat")
        except FileNotFoundError:  # a thread that just ended
            continue
        main, other = (main + seconds, other) if task.name == str(pid) else (main, other + seconds)
    children = 0.0
    for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
        try:
            children += stat_seconds(Path(f"/proc/{child}/stat"))
        except FileNotFoundError:
            continue
    return main, other, children


def stat_seconds(stat: Path) -> float:
    fields = stat.read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def saturate(args, work: Path, gateways: dict[str, GatewayProcess], tag: str) -> dict[str, float]:
    """One saturating non-streaming locust run against each gateway in turn: requests/s by name."""
    rps = {}
    for name, gw in gateways.items():
        locust(work, gw.url, args.users, args.seconds, False, "bench", KEY, tag=f"{tag}-{name}").wait()
        rps[name] = stats(work, f"{tag}-{name}")["rps"]
    return rps


def gc_freeze(args, work: Path, replicas: list[str], frozen: GatewayProcess) -> None:
    """The default gateway (its startup heap frozen out of the collector's sight) vs the same with
    CHARFORGE_GATEWAY_GC_FREEZE=0, alternating: saturated non-streaming requests/s."""
    thawed = gateway_process(work, "gc-thawed", replicas, STACKS["uvloop + httptools"],
                             env={"CHARFORGE_GATEWAY_GC_FREEZE": "0"})
    try:
        print(f"\n## gc.freeze() at start vs not: {args.users} users saturating, non-streaming, {args.seconds} s per "
              f"run, {args.repeats} alternating repeats", flush=True)
        ratios = []
        for i in range(args.repeats):
            rps = saturate(args, work, {"frozen": frozen, "thawed": thawed}, f"gc-{i}")
            ratios.append(rps["frozen"] / rps["thawed"])
            print(f"- repeat {i + 1}: {rps['frozen']:.0f} / {rps['thawed']:.0f} req/s = {ratios[-1]:.3f}x", flush=True)
        print(f"- frozen / thawed: {statistics.median(ratios):.3f}x (repeats {', '.join(f'{r:.3f}' for r in ratios)})",
              flush=True)
    finally:
        thawed.stop()


def capture_cost(args, work: Path, replicas: list[str], off: GatewayProcess) -> None:
    """The same gateway with every conversation of the route captured (sampling 1.0) vs capture off, alternating:
    saturated requests/s and the p50 an open-loop client sees at 100 req/s; then the store's size per 1,000."""
    on = gateway_process(work, "capture-on", replicas, STACKS["uvloop + httptools"], {"routes": {"bench": 1.0}})
    try:
        print(f"\n## Capture on (every conversation of the route) vs off: {args.users} users saturating, then 100 "
              f"req/s open loop; {args.seconds} s per run, {args.repeats} alternating repeats", flush=True)
        ratios, added, cpu_ratios = [], [], []
        for i in range(args.repeats):
            rps, cpu, threads = {}, {}, {}  # cpu: the gateway process's CPU microseconds per request served
            for name, gw in (("off", off), ("on", on)) if i % 2 == 0 else (("on", on), ("off", off)):
                before = cpu_seconds(gw.proc.pid)
                rps.update(saturate(args, work, {name: gw}, f"cap-{i}"))
                served = stats(work, f"cap-{i}-{name}")["requests"]
                threads[name] = [(b - a) * 1e6 / served for a, b in zip(before, cpu_seconds(gw.proc.pid))]
                cpu[name] = sum(threads[name][:2])  # the gateway process; its writer runs beside it
            p50 = {name: statistics.median(asyncio.run(open_loop(gw.url, "bench", KEY, 100, args.seconds)))
                   for name, gw in (("off", off), ("on", on))}
            ratios.append(rps["on"] / rps["off"])
            cpu_ratios.append(cpu["off"] / cpu["on"])
            added.append(p50["on"] - p50["off"])
            print(f"- repeat {i + 1}: saturated {rps['on']:.0f} / {rps['off']:.0f} req/s = {ratios[-1]:.3f}x; "
                  f"gateway CPU per request {cpu['on']:.0f} vs {cpu['off']:.0f} us (off/on {cpu_ratios[-1]:.3f}x; "
                  f"event loop {threads['on'][0]:.0f} vs {threads['off'][0]:.0f}, other threads "
                  f"{threads['on'][1]:.0f} vs {threads['off'][1]:.0f}; writer process {threads['on'][2]:.0f} vs "
                  f"{threads['off'][2]:.0f}); "
                  f"p50 at 100 req/s {p50['on']:.2f} vs {p50['off']:.2f} ms ({added[-1]:+.2f} ms)", flush=True)
        print(f"- capture on / off: {statistics.median(ratios):.3f}x throughput (repeats "
              f"{', '.join(f'{r:.3f}' for r in ratios)}), {statistics.median(cpu_ratios):.3f}x in gateway CPU per "
              f"request (repeats {', '.join(f'{r:.3f}' for r in cpu_ratios)}), p50 {statistics.median(added):+.2f} ms "
              f"(repeats {', '.join(f'{a:+.2f}' for a in added)})", flush=True)
    finally:
        on.stop()
    folder = on.state / "capture" / "conversations"
    files = list(folder.glob("**/*.jsonl"))
    rows = sum(len(p.read_text().splitlines()) for p in files)
    size = sum(p.stat().st_size for p in files)
    print(f"- store: {rows} conversations in {size / 2**20:.1f} MiB = {size / max(rows, 1) * 1000 / 2**20:.2f} MiB "
          f"per 1,000 (each: one short user turn and the stand-in's 2-word reply)", flush=True)


def stacks(args, work: Path, replicas: list[str], gateways: dict, default: str) -> None:
    """Both server stacks saturated (non-streaming, streaming), two processes, and the latency each adds at 100
    req/s (locust, then the open-loop aiohttp client)."""
    print(f"## Saturation: {args.users} users, no wait, {args.seconds} s each, the two server stacks in turn "
          f"(work dir {work})", flush=True)
    for stream in (False, True):
        kind = "streaming (8 chunks)" if stream else "non-streaming"
        rps = {}
        for name, gw in gateways.items():
            tag = f"sat-{'s' if stream else 'n'}-{list(gateways).index(name)}"
            load = locust(work, gw.url, args.users, args.seconds, stream, "bench", KEY, tag=tag)
            spy = None
            if not stream and name == default:
                time.sleep(args.seconds / 4)
                spy = profile(gw.proc.pid, args.seconds // 2, work / "gateway.pyspy")
            load.wait()
            s = stats(work, tag)
            rps[name] = s["rps"]
            print(f"- one gateway ({name}), {kind}: {s['rps']:.0f} req/s, p50 {s['p50_ms']:.0f} ms, "
                  f"p99 {s['p99_ms']:.0f} ms, {s['failures']} failed of {s['requests']}", flush=True)
            if spy:
                print("  gateway's own time by module (py-spy, non-streaming saturation):\n" + spy, flush=True)
        names = list(rps)
        print(f"  ratio {names[0]} / {names[1]}: {rps[names[0]] / rps[names[1]]:.2f}x", flush=True)
        tag = f"sat-{'s' if stream else 'n'}-direct"
        locust(work, replicas[0], args.users, args.seconds, stream, VERSION, None, tag=tag).wait()
        d = stats(work, tag)
        print(f"  a stand-in alone, same load: {d['rps']:.0f} req/s (the ceiling of this load generator here)",
              flush=True)

    second = gateway_process(work, "two", replicas, STACKS[default])
    pair = [gateways[default], second]
    try:
        loads = [locust(work, g.url, args.users // 2, args.seconds, False, "bench", KEY, tag=f"two-{i}")
                 for i, g in enumerate(pair)]
        for load in loads:
            load.wait()
        both = [stats(work, f"two-{i}") for i in range(2)]
        parts = " + ".join(f"{s['rps']:.0f}" for s in both)
        print(f"- two gateway processes ({default}), non-streaming, {args.users // 2} users each: "
              f"{sum(s['rps'] for s in both):.0f} req/s in all ({parts}), "
              f"{sum(s['failures'] for s in both)} failed", flush=True)

        print(f"\n## Added latency at 100 req/s ({args.seconds} s per run, {args.repeats} alternating repeats: "
              f"each stack with 100 users at 1 req/s, two processes with 50 users each, a stand-in directly)",
              flush=True)
        added: dict[str, list[float]] = {name: [] for name in [*gateways, "two processes"]}
        for i in range(args.repeats):
            direct = locust(work, replicas[0], 100, args.seconds, False, VERSION, None, rate=1.0, tag=f"r-d{i}")
            direct.wait()
            d = stats(work, f"r-d{i}")
            line = [f"direct p50 {d['p50_ms']:.1f} ms"]
            for j, (name, gw) in enumerate(gateways.items()):
                locust(work, gw.url, 100, args.seconds, False, "bench", KEY, rate=1.0, tag=f"r-g{j}-{i}").wait()
                g = stats(work, f"r-g{j}-{i}")
                added[name].append(g["p50_ms"] - d["p50_ms"])
                line.append(f"{name} p50 {g['p50_ms']:.1f} ms ({g['rps']:.0f} req/s, {g['failures']} failed)")
            runs = [locust(work, g.url, 50, args.seconds, False, "bench", KEY, rate=1.0, tag=f"r-two{k}-{i}")
                    for k, g in enumerate(pair)]
            for run in runs:
                run.wait()
            two = [stats(work, f"r-two{k}-{i}") for k in range(2)]
            p50 = statistics.mean(t["p50_ms"] for t in two)
            added["two processes"].append(p50 - d["p50_ms"])
            line.append(f"two processes p50 {p50:.1f} ms ({sum(t['rps'] for t in two):.0f} req/s, "
                        f"{sum(t['failures'] for t in two)} failed)")
            print(f"- repeat {i + 1}: " + "; ".join(line), flush=True)
        for name, values in added.items():
            print(f"- p50 added, {name}: {statistics.median(values):+.1f} ms (repeats "
                  f"{', '.join(f'{a:+.1f}' for a in values)}); locust reports whole milliseconds", flush=True)

        print(f"\n## Added latency at 100 req/s, open-loop aiohttp client (100 keep-alive connections at 1 req/s "
              f"each, {args.seconds} s per run, {args.repeats} alternating repeats)", flush=True)
        added = {name: [] for name in [*gateways, "two processes"]}
        for i in range(args.repeats):
            direct = statistics.median(asyncio.run(open_loop(replicas[0], VERSION, None, 100, args.seconds)))
            line = [f"direct p50 {direct:.2f} ms"]
            for name, gw in gateways.items():
                p50 = statistics.median(asyncio.run(open_loop(gw.url, "bench", KEY, 100, args.seconds)))
                added[name].append(p50 - direct)
                line.append(f"{name} {p50:.2f} ms")

            async def both() -> list[float]:
                halves = await asyncio.gather(*(open_loop(g.url, "bench", KEY, 50, args.seconds) for g in pair))
                return [x for half in halves for x in half]
            p50 = statistics.median(asyncio.run(both()))
            added["two processes"].append(p50 - direct)
            line.append(f"two processes {p50:.2f} ms")
            print(f"- repeat {i + 1}: " + "; ".join(line), flush=True)
        for name, values in added.items():
            print(f"- p50 added, {name}: {statistics.median(values):+.2f} ms (repeats "
                  f"{', '.join(f'{a:+.2f}' for a in values)})", flush=True)
    finally:
        second.stop()


if __name__ == "__main__":
    main()

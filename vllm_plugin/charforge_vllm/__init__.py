"""vLLM plugin (serving environment): LoRA on vLLM's CPU backend with one matmul per adapter instead of one
gathered weight matrix per token.

vLLM 0.32's CPU LoRA path (`PunicaWrapperCPU`) calls the PyTorch reference ops in `vllm.lora.ops.torch_ops`,
which copy the adapter's A or B matrix once per *token* (`weights[token_indices]`) and multiply token by token.
For a 300-token prompt on SmolLM2 that is ~20x slower per layer than one matmul, and it is why an adapter
served ~0.4x the base's throughput here. A batch holds few distinct adapters, so `grouped_lora` multiplies each
adapter's rows with its matrix once; tokens without an adapter (index -1) get no LoRA term. `fused_lora` goes one
step further for linear layers: one shrink and one expand per layer (all its slices), float32 weights cached per
adapter slot, the batch's adapters looked up once per step.
"""

from __future__ import annotations

import logging
import os

logger = logging.getLogger("vllm.plugins.charforge_vllm")  # under "vllm": printed by vLLM's log handler
OPS = ("bgmv_shrink", "bgmv_expand", "bgmv_expand_slice", "sgmv_shrink", "sgmv_expand", "sgmv_expand_slice")


def register() -> None:
    """vLLM general plugin: prompt log-probabilities that may read the prefix cache (`prompt_cache`, every
    platform), and on CPU `PunicaWrapperCPU` pointed at the grouped ops. Runs in every vLLM process; idempotent."""
    from vllm.platforms import current_platform

    from charforge_vllm import prompt_cache

    prompt_cache.register()
    if not current_platform.is_cpu():
        return  # GPU/XPU backends have their own fused kernels
    queue_wait_ms = _number("CHARFORGE_VLLM_QUEUE_WAIT_MS", "20", int)
    if queue_wait_ms > 0:  # 0: vLLM's polling for 1 s after every read
        wait_instead_of_polling(_number("CHARFORGE_VLLM_QUEUE_SPIN_MS", "10", float), queue_wait_ms)
    from vllm.lora.punica_wrapper import punica_cpu

    from charforge_vllm import grouped_lora

    for name in OPS:
        setattr(punica_cpu, name, getattr(grouped_lora, name))
    mode = os.environ.get("CHARFORGE_VLLM_LORA", "fused")
    if mode not in ("fused", "grouped"):
        raise ValueError(f"CHARFORGE_VLLM_LORA={mode!r}: expected 'fused' (one matmul per layer, the default) or "
                         "'grouped' (vLLM's per-slice loop over the grouped ops)")
    from charforge_vllm import merged_lora

    merge = merged_lora.merge_slots()
    if mode == "fused":
        from charforge_vllm import fused_lora

        fused_lora.install()
        if merge:
            merged_lora.install(merge, compiled=fused_lora._library is not None)
    logger.info("charforge_vllm: grouped CPU LoRA ops active, layers %s%s (pid %d)", mode,
                f", single-adapter batches on merged weights (up to {merge} slots)" if merge and mode == "fused"
                else "", os.getpid())


def _number(name: str, default: str, kind: type, unit: str = "milliseconds") -> float:
    raw = os.environ.get(name, default)
    try:
        value = kind(raw)
    except ValueError:
        value = -1
    if value < 0:
        raise ValueError(f"{name}={raw!r}: expected a {'whole ' if kind is int else ''}number of {unit} >= 0 "
                         f"(default {default}; 0 turns it off)")
    return value


def wait_instead_of_polling(spin_ms: float, wait_ms: int) -> None:
    """Readers of vLLM's shared-memory queues wait for the next message by polling the queue for 1 s after each
    read (`sched_yield` in a loop), then by sleeping on the queue's notification socket (looking again every 5 s).
    While the worker computes a step, the engine process is such a reader: with as many cores as the worker has
    threads, its polling takes turns with them for the whole step. Here a reader polls for `spin_ms` after a read
    (the gaps between a step's messages), then sleeps on the notification socket for at most `wait_ms` at a time
    before looking again: woken by the write's notification at once, and by its timeout should a notification go
    missing (waiting on notifications with vLLM's 5-s recheck stalled replies for seconds here). After 1 s without
    a read, vLLM's own wait."""
    import time

    import zmq
    from vllm.distributed.device_communicators import shm_broadcast
    from vllm.distributed.utils import sched_yield

    cls = shm_broadcast.SpinCondition
    original = getattr(cls, "_charforge_wait", cls.wait)
    spin_s = spin_ms / 1000

    def wait(self, timeout_ms: int | None = None) -> None:
        since = time.monotonic() - self.last_read
        if not self.is_reader or since > self.busy_loop_s:
            original(self, timeout_ms)
        elif since <= spin_s:
            sched_yield()
        else:
            events = dict(self.poller.poll(timeout=wait_ms if timeout_ms is None else min(wait_ms, timeout_ms)))
            if self.local_notify_socket in events:
                self.local_notify_socket.recv(flags=zmq.NOBLOCK, copy=False)

    cls._charforge_wait = original
    cls.wait = wait
    logger.info("charforge_vllm: shared-memory queue readers poll %g ms after a read, then wait on notifications "
                "(at most %d ms at a time) (pid %d)", spin_ms, wait_ms, os.getpid())

"""One shrink and one expand per LoRA layer on vLLM's CPU backend, with the batch's adapter plan computed once per
step instead of once per op.

vLLM's `PunicaWrapperCPU.add_lora_linear` runs a shrink and an expand for every slice of a layer (q, k and v are
three; gate and up two), and each op converts its weights to float32, looks up the distinct adapters of the batch
(`torch.unique`, a synchronising `.tolist()`) and writes a slice. On a small model that per-op Python and tensor
bookkeeping, not the arithmetic, is most of the LoRA cost (profiled at ~75% of a decode step with an adapter). Here:

- `update_metadata` (once per scheduler step) records which adapter slots the batch uses and, for a batch that
  mixes them, each slot's rows;
- each layer's slices are fused once per adapter slot and kept as float32: the A matrices stacked (`[n*rank, in]`),
  the B matrices block-diagonal (`[sum(out), n*rank]`), so a layer is one shrink matmul and one expand matmul;
  the cache is dropped whenever vLLM writes a slot (`LoRAModelManager.activate_adapter`, the only writer);
- a batch with no adapter (base-model requests on a LoRA replica) returns at once, before any allocation.

The arithmetic is the reference ops': the shrink in float32, its output rounded to the model's dtype before the
expand, the expand's output rounded to the model's dtype and added in place. Zero blocks add exact zeros.
`CHARFORGE_VLLM_LORA=grouped` keeps vLLM's per-slice loop over `grouped_lora`'s ops (the benchmark's "before").
"""

from __future__ import annotations

import ctypes
import os
from typing import Any

import torch
import torch.nn.functional as F

SMALL_BATCH = 64  # tokens: up to this many, a layer's LoRA matmuls run on one MKL thread
_generation = 0  # bumped whenever vLLM writes an adapter slot; cached fused weights of older generations are stale


def bump_generation() -> None:
    global _generation
    _generation += 1


def _mkl_threads_local():
    """MKL's per-thread thread count (`MKL_Set_Num_Threads_Local`, C calling convention; 0 restores the global
    setting) from the MKL that PyTorch links statically, or None where PyTorch has no MKL (e.g. ARM builds).

    The LoRA matmuls of a decode step are tiny (8 tokens x 576 x 24 on SmolLM2): split over two OpenMP threads,
    each waits for the second thread to be scheduled, and on a replica whose engine process polls its queue that
    costs more than the arithmetic (8 x 576 -> 24 -> 960 took 40 us on two threads, 23 us on one, beside a
    polling process). The base layers' GEMMs (oneDNN) keep their threads: only MKL calls from this thread change."""
    try:
        lib = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so"))
        function = lib.MKL_Set_Num_Threads_Local
    except (OSError, AttributeError):
        return None
    function.argtypes, function.restype = [ctypes.c_int], ctypes.c_int
    return function


_mkl_local = _mkl_threads_local()


def plan(indices: torch.Tensor) -> tuple[list[int], dict[int, torch.Tensor] | None]:
    """The adapter slots a step's tokens use (-1, no adapter, left out) and, where the batch mixes slots or mixes
    adapter and base tokens, each slot's token rows; None where one slot covers every token."""
    if indices.numel() == 0:
        return [], None
    distinct = torch.unique(indices).tolist()
    slots = [s for s in distinct if s >= 0]
    if len(distinct) == 1:
        return slots, None
    return slots, {s: (indices == s).nonzero().squeeze(1) for s in slots}


def fused_weights(lora_a_stacked: tuple[torch.Tensor, ...], lora_b_stacked: tuple[torch.Tensor, ...],
                  slot: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """One layer's slices for one slot, as float32 values of `dtype`: A stacked `[n*rank, in]` and B block-diagonal
    `[sum(out), n*rank]` (B's rank columns padded as vLLM pads them)."""
    a = [(w.squeeze(1) if w.dim() == 4 else w)[slot] for w in lora_a_stacked]
    b = [(w.squeeze(1) if w.dim() == 4 else w)[slot] for w in lora_b_stacked]
    a_all = torch.cat([w.to(torch.float32) for w in a])
    b_all = torch.block_diag(*[w.to(dtype).to(torch.float32) for w in b])
    return a_all, b_all


class FusedCPULoRA:
    """Methods grafted onto `PunicaWrapperCPU` by `install`."""

    def cf_update_metadata(self, mapping, lora_index_to_id, max_loras, vocab_size, **kwargs):
        _original["update_metadata"](self, mapping, lora_index_to_id, max_loras, vocab_size, **kwargs)
        indices = self.token_lora_indices
        self._cf_slots, self._cf_rows = plan(indices)
        self._cf_tokens = indices.numel()

    def cf_add_lora_linear(self, y: torch.Tensor, x: torch.Tensor, lora_a_stacked: tuple[torch.Tensor, ...],
                           lora_b_stacked: tuple[torch.Tensor, ...], scale: float, output_slices: tuple[int, ...],
                           *, buffer=None, **kwargs: Any) -> None:
        if torch.compiler.is_compiling():  # traced into a compiled model: one opaque op, run eagerly at each step
            torch.ops.charforge.lora_linear(y, x.view(-1, x.shape[-1]), list(lora_a_stacked), list(lora_b_stacked),
                                            float(scale), list(output_slices), _register(self))
            return
        return self._cf_linear(y, x, lora_a_stacked, lora_b_stacked, scale, output_slices, buffer=buffer, **kwargs)

    def _cf_linear(self, y, x, lora_a_stacked, lora_b_stacked, scale, output_slices, buffer=None, **kwargs) -> None:
        slots = getattr(self, "_cf_slots", None)
        if slots is not None and not slots:
            return  # no token of this batch has an adapter
        x = x.view(-1, x.shape[-1])
        rows = getattr(self, "_cf_rows", None)
        if slots is None or (rows is not None and x.shape[0] < self._cf_tokens):  # no plan for this batch
            return _original["add_lora_linear"](self, y, x, lora_a_stacked, lora_b_stacked, scale, output_slices,
                                                buffer=buffer, **kwargs)
        y2 = y.view(-1, y.shape[-1])
        width = sum(output_slices)
        cache = self.__dict__.setdefault("_cf_cache", {})
        x32 = x.to(torch.float32)
        one_thread = _mkl_local is not None and x.shape[0] <= SMALL_BATCH
        if one_thread:
            _mkl_local(1)
        try:
            self._cf_apply(y2, x32, lora_a_stacked, lora_b_stacked, scale, slots, rows, width, cache, y.dtype)
        finally:
            if one_thread:
                _mkl_local(0)

    def _cf_apply(self, y2, x32, lora_a_stacked, lora_b_stacked, scale, slots, rows, width, cache, dtype):
        for slot in slots:
            key = (id(lora_a_stacked[0]), slot)
            hit = cache.get(key)
            if hit is None or hit[0] != _generation:
                hit = (_generation, *fused_weights(lora_a_stacked, lora_b_stacked, slot, dtype))
                cache[key] = hit
            _, a_all, b_all = hit
            if rows is None:
                shrunk = F.linear(x32, a_all)
            else:
                shrunk = F.linear(x32.index_select(0, rows[slot]), a_all)
            if scale != 1.0:
                shrunk = shrunk * scale
            term = F.linear(shrunk.to(dtype).to(torch.float32), b_all).to(dtype)
            if rows is None:
                y2[:, :width] += term
            else:
                y2[:, :width].index_add_(0, rows[slot], term)

    def _cf_all_zero(self, lora_b_stacked: torch.Tensor) -> bool:
        """Whether every slot this step uses holds zero B weights in `lora_b_stacked` (the embedding's or lm_head's:
        zero for every adapter that does not train them), so the term is zero and the op can be skipped."""
        slots = getattr(self, "_cf_slots", None)
        if slots is None:
            return False
        cache = self.__dict__.setdefault("_cf_zero", {})
        for slot in slots:
            key = (id(lora_b_stacked), slot)
            hit = cache.get(key)
            if hit is None or hit[0] != _generation:
                hit = cache[key] = (_generation, not bool(lora_b_stacked[slot].any()))
            if not hit[1]:
                return False
        return True

    def cf_add_lora_embedding(self, y, x, lora_b_stacked, add_inputs=True, **kwargs):
        if torch.compiler.is_compiling():
            torch.ops.charforge.lora_embedding(y, x, lora_b_stacked, bool(add_inputs), _register(self))
            return
        if self._cf_all_zero(lora_b_stacked):
            return
        return _original["add_lora_embedding"](self, y, x, lora_b_stacked, add_inputs, **kwargs)

    def cf_add_lora_logits(self, y, x, lora_a_stacked, lora_b_stacked, scale, *, buffer=None, **kwargs):
        if self._cf_all_zero(lora_b_stacked):
            return
        return _original["add_lora_logits"](self, y, x, lora_a_stacked, lora_b_stacked, scale, buffer=buffer,
                                            **kwargs)


_original: dict[str, Any] = {}
# Every PunicaWrapperCPU of this process in creation order: a compiled graph names its wrapper by this index (a
# model builds its wrappers in the same order in every process, so a graph from vLLM's compile cache names the same).
_wrappers: list[Any] = []


def _register(wrapper) -> int:
    return _wrappers.index(wrapper)


def _lora_linear_op(y: torch.Tensor, x: torch.Tensor, lora_a: list[torch.Tensor], lora_b: list[torch.Tensor],
                    scale: float, output_slices: list[int], wrapper: int) -> None:
    _wrappers[wrapper]._cf_linear(y, x, tuple(lora_a), tuple(lora_b), scale, tuple(output_slices))


def _lora_embedding_op(y: torch.Tensor, x: torch.Tensor, lora_b: torch.Tensor, add_inputs: bool, wrapper: int) -> None:
    w = _wrappers[wrapper]
    if not w._cf_all_zero(lora_b):
        _original["add_lora_embedding"](w, y, x, lora_b, add_inputs)


def _nothing(*args) -> None:
    return None


_library = None


def _register_ops() -> None:
    """`charforge::lora_linear` and `charforge::lora_embedding`, registered directly on the CPU dispatch key (vLLM's
    `direct_register_custom_op`: `torch.library.custom_op`'s Python dispatch cost ~25 us a call, 120 calls a step)."""
    global _library
    from torch.library import Library
    from vllm.utils.torch_utils import direct_register_custom_op

    if _library is not None:
        return
    _library = Library("charforge", "FRAGMENT")
    direct_register_custom_op("lora_linear", _lora_linear_op, mutates_args=["y"], fake_impl=_nothing,
                              target_lib=_library, dispatch_key="CPU")
    direct_register_custom_op("lora_embedding", _lora_embedding_op, mutates_args=["y"], fake_impl=_nothing,
                              target_lib=_library, dispatch_key="CPU")


def allow_compilation() -> None:
    """vLLM's CPU platform runs every LoRA-enabled model eagerly (`CompilationMode.NONE`) because its LoRA ops cannot
    be traced; with the fused layers behind opaque custom ops the model can be compiled as it is without LoRA. The
    platform's config pass runs with the LoRA config hidden, then it is put back (that pass reads it only to turn
    compilation off). Opt-in (`CHARFORGE_VLLM_LORA_COMPILE=1`): vLLM 0.32 on CPU fails to load its own compile cache
    ("'function' object has no attribute 'finalize_loading'") and compiles at every start, ~60 s here."""
    from vllm.platforms.cpu import CpuPlatform

    original = CpuPlatform.check_and_update_config.__func__

    def check_and_update_config(cls, vllm_config) -> None:
        lora = vllm_config.lora_config
        if lora is None:
            return original(cls, vllm_config)
        vllm_config.lora_config = None
        try:
            original(cls, vllm_config)
        finally:
            vllm_config.lora_config = lora

    CpuPlatform.check_and_update_config = classmethod(check_and_update_config)


def install() -> None:
    """Graft the fused methods onto `PunicaWrapperCPU` and bump the cache generation on every adapter write."""
    from vllm.lora import model_manager
    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

    if _original:
        return
    for name in ("update_metadata", "add_lora_linear", "add_lora_embedding", "add_lora_logits"):
        _original[name] = getattr(PunicaWrapperCPU, name)
        setattr(PunicaWrapperCPU, name, getattr(FusedCPULoRA, f"cf_{name}"))
    PunicaWrapperCPU._cf_apply = FusedCPULoRA._cf_apply
    PunicaWrapperCPU._cf_linear = FusedCPULoRA._cf_linear
    init = PunicaWrapperCPU.__init__

    def __init__(self, *args, **kwargs):
        init(self, *args, **kwargs)
        _wrappers.append(self)

    PunicaWrapperCPU.__init__ = __init__
    if os.environ.get("CHARFORGE_VLLM_LORA_COMPILE", "0") == "1":
        _register_ops()
        allow_compilation()
    PunicaWrapperCPU._cf_all_zero = FusedCPULoRA._cf_all_zero
    activate = model_manager.LoRAModelManager.activate_adapter

    def activate_adapter(self, lora_id: int) -> bool:
        try:
            written = activate(self, lora_id)  # False: already active, nothing written (called every step)
        except BaseException:
            bump_generation()  # a write may have begun
            raise
        if written:
            bump_generation()
        return written

    model_manager.LoRAModelManager.activate_adapter = activate_adapter

"""Progress of an lm-eval pass against a served model: requests done / total, rate and ETA, reported through a
callback (the evaluate flow passes its Prefect run logger), so a long scoring pass never looks like a hang.

lm-eval's own progress bars go to a terminal nobody watches in a flow run; `served_completions` builds its
`local-completions` model with the two request methods counted instead.
"""

from __future__ import annotations

import time
from collections.abc import Callable

Report = Callable[[str], None]
PROMPT_CACHE_KEY = "charforge_prompt_cache_limit"  # vllm_plugin/charforge_vllm/prompt_cache.py reads it


class Progress:
    """Counts finished requests of one phase and reports at most every `every_s` seconds (and at the end)."""

    def __init__(self, report: Report, label: str, every_s: float = 15.0, clock: Callable[[], float] = time.monotonic):
        self.report, self.label, self.every_s, self.clock = report, label, every_s, clock
        self.phase, self.total, self.done = "", 0, 0
        self.started = self.last = 0.0

    def start(self, phase: str, total: int) -> None:
        self.phase, self.total, self.done = phase, total, 0
        self.started = self.last = self.clock()
        self.report(f"{self.label}: {total} {phase} requests")

    def advance(self, n: int) -> None:
        self.done += n
        now = self.clock()
        if self.done >= self.total or now - self.last >= self.every_s:
            self.last = now
            self.report(self.line(now))

    def line(self, now: float) -> str:
        elapsed = max(now - self.started, 1e-9)
        rate = self.done / elapsed
        share = self.done / self.total if self.total else 1.0
        if self.done >= self.total:
            return f"{self.label}: {self.phase} {self.done}/{self.total} done in {elapsed:.0f} s ({rate:.1f}/s)"
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        return (f"{self.label}: {self.phase} {self.done}/{self.total} ({share:.0%}), {rate:.1f}/s, "
                f"ETA {eta:.0f} s")


def served_completions(model_args: dict, report: Report, label: str, prefix_cache: bool = False):
    """lm-eval's `local-completions` model over `model_args`, reporting its progress to `report`. With
    `prefix_cache`, each log-likelihood request of one prompt lets vLLM serve its context from the prefix cache
    (`charforge_vllm.prompt_cache`: up to the position before the continuation's first token, the first one whose
    log-probability lm-eval reads), so the choices of a multiple-choice document prefill their shared context once."""
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    class ProgressCompletions(LocalCompletionsAPI):
        def __init__(self, **kwargs) -> None:
            super().__init__(**kwargs)
            self.progress = Progress(report, label)

        def loglikelihood(self, requests, disable_tqdm: bool = False):
            self.progress.start("log-likelihood", len(requests))
            return super().loglikelihood(requests, disable_tqdm=True)

        def generate_until(self, requests, disable_tqdm: bool = False):
            self.progress.start("generation", len(requests))
            return super().generate_until(requests, disable_tqdm=True)

        def model_call(self, messages, **kwargs):
            out = super().model_call(messages, **kwargs)
            self.progress.advance(len(messages) if isinstance(messages, (list, tuple)) else 1)
            return out

        def _create_payload(self, messages, generate=False, gen_kwargs=None, seed=1234, eos=None, cache_limit=None,
                            **kwargs) -> dict:
            payload = super()._create_payload(messages, generate=generate, gen_kwargs=gen_kwargs, seed=seed, eos=eos,
                                              **kwargs)
            if cache_limit is not None:
                payload["vllm_xargs"] = {PROMPT_CACHE_KEY: cache_limit}
            return payload

        async def amodel_call(self, session, sem, messages, **kwargs):
            ctxlens = kwargs.get("ctxlens")
            if prefix_cache and not kwargs.get("generate", True) and ctxlens and len(ctxlens) == 1 and ctxlens[0]:
                kwargs["cache_limit"] = ctxlens[0] - 1  # lm-eval reads log-probabilities from position ctxlen on
            out = await super().amodel_call(session, sem, messages, **kwargs)
            self.progress.advance(len(messages) if isinstance(messages, (list, tuple)) else 1)
            return out

    return ProgressCompletions(**model_args)

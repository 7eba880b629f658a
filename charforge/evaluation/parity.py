"""Train/serve parity: does vLLM + the adapter see and say what HF transformers + PEFT saw and said in training?

Two checks on the same probes:
1. prompt tokens: the conversation rendered with the template training used, tokenized by the base tokenizer,
   must equal the token ids vLLM builds for the same messages (`POST /tokenize`); any difference is an error that
   shows both sides at the first differing token.
2. greedy tokens: the first N generated tokens at temperature 0 through HF + PEFT and through vLLM; the share of
   prompts whose first token (and whose first N tokens) agree is reported.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import torch

from charforge.cpu import serving_dtype
from charforge.errors import Refused
from charforge.evaluation.lm_eval_tasks import read_probes
from charforge.results import Parity, ParityExample
from charforge.schemas.evaluate import EvalConfig
from charforge.settings import repo_path

from charforge.training.adapters import TRAINING_TEMPLATE, load_adapter_model


class ParityError(Refused):
    """Training and serving disagree on the prompt itself (template or special tokens)."""


class ParityRefused(Refused):
    """The served adapter does not generate like the trained one (first greedy tokens disagree too often)."""


def training_template(adapter_dir: Path, tokenizer) -> tuple[str, str]:
    """(template, where it came from): the one exported with the adapter, else the base tokenizer's."""
    path = Path(adapter_dir) / TRAINING_TEMPLATE
    if path.is_file():
        return path.read_text(), str(path)
    return tokenizer.chat_template, "base tokenizer (the adapter records no training template)"


def _context(tokenizer, ids: list[int], at: int) -> str:
    return repr(tokenizer.decode(ids[max(0, at - 8):at + 8]))


def token_difference(tokenizer, trained: list[int], served: list[int]) -> str | None:
    """None when equal, else where and how the two token sequences first differ, decoded for a human."""
    if trained == served:
        return None
    at = next((i for i, (a, b) in enumerate(zip(trained, served)) if a != b), min(len(trained), len(served)))
    return (f"first difference at token {at} of {len(trained)} (training) / {len(served)} (serving):\n"
            f"  training: {_context(tokenizer, trained, at)}\n  serving:  {_context(tokenizer, served, at)}")


def served_prompt_ids(base_url: str, model: str, messages: list[dict]) -> list[int]:
    response = httpx.post(f"{base_url}/tokenize", json={"model": model, "messages": messages,
                                                        "add_generation_prompt": True}, timeout=60)
    response.raise_for_status()
    return response.json()["tokens"]


def served_greedy_ids(base_url: str, model: str, prompt_ids: list[int], tokens: int) -> list[int]:
    response = httpx.post(f"{base_url}/v1/completions", json={
        "model": model, "prompt": prompt_ids, "max_tokens": tokens, "temperature": 0, "return_token_ids": True,
    }, timeout=120)
    response.raise_for_status()
    return response.json()["choices"][0]["token_ids"][:tokens]


@dataclass(frozen=True)
class TrainedSide:
    """What HF transformers + PEFT say on the parity prompts: computed before vLLM is needed (while it starts)."""

    template_source: str
    conversations: list[list[dict]]
    prompts: list[list[int]]  # the conversations rendered with the training template and tokenized
    greedy: list[list[int]]  # HF + PEFT greedy ids after each prompt
    tokenizer: Any


def trained_side(*, adapter_dir: Path, base_dir: Path, conversations: list[list[dict]], tokens: int) -> TrainedSide:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    template, template_source = training_template(adapter_dir, tokenizer)
    prompts = [list(tokenizer.apply_chat_template(messages, chat_template=template, add_generation_prompt=True,
                                                  tokenize=True, return_dict=False)) for messages in conversations]
    # The dtype vLLM serves in here: float32 on a CPU without native bf16, else the checkpoint's bf16
    served_dtype = serving_dtype("auto")
    model = load_adapter_model(adapter_dir, base_dir,
                               dtype=torch.float32 if served_dtype == "float32" else torch.bfloat16).eval()
    greedy = []
    for prompt in prompts:
        with torch.no_grad():
            out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                 max_new_tokens=tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id)
        greedy.append(out[0, len(prompt):].tolist())
    return TrainedSide(template_source, conversations, prompts, greedy, tokenizer)


def compare_with_served(trained: TrainedSide, *, base_url: str, served_name: str, tokens: int) -> Parity:
    """Both checks against the server; raise ParityError on a prompt mismatch, else the agreement rates."""
    from concurrent.futures import ThreadPoolExecutor

    tokenizer = trained.tokenizer
    with ThreadPoolExecutor(max_workers=8) as pool:  # one vLLM batch, not 8 requests in turn (6 s -> ~1 s here)
        served_prompts = list(pool.map(lambda m: served_prompt_ids(base_url, served_name, m), trained.conversations))
        for prompt, served in zip(trained.prompts, served_prompts):
            difference = token_difference(tokenizer, prompt, served)
            if difference:
                raise ParityError(f"chat template mismatch between training ({trained.template_source}) and serving "
                                  f"(vLLM, model {served_name}): {difference}")
        served_greedy = list(pool.map(lambda p: served_greedy_ids(base_url, served_name, p, tokens), trained.prompts))
    first_equal, all_equal, examples = 0, 0, []
    for hf_ids, vllm_ids in zip(trained.greedy, served_greedy):
        first_equal += int(hf_ids[:1] == vllm_ids[:1])
        n = min(len(hf_ids), len(vllm_ids))
        all_equal += int(hf_ids[:n] == vllm_ids[:n])
        if len(examples) < 3:
            examples.append(ParityExample(hf=tokenizer.decode(hf_ids), vllm=tokenizer.decode(vllm_ids)))
    return Parity(prompts=len(trained.prompts), tokens=tokens, template_source=trained.template_source,
                  first_token_agreement=first_equal / len(trained.prompts),
                  prefix_agreement=all_equal / len(trained.prompts), examples=tuple(examples))


def check_parity(*, adapter_dir: Path, base_dir: Path, base_url: str, served_name: str,
                 conversations: list[list[dict]], tokens: int) -> Parity:
    """Run both checks; raise ParityError on a prompt mismatch, else return the agreement rates and examples."""
    trained = trained_side(adapter_dir=adapter_dir, base_dir=base_dir, conversations=conversations, tokens=tokens)
    return compare_with_served(trained, base_url=base_url, served_name=served_name, tokens=tokens)


def parity_conversations(cfg: EvalConfig) -> list[list[dict]]:
    """`cfg.parity.prompts` probes spread over the probe file (an adapter family's characters' only), as
    conversations."""
    probes = [p for p in read_probes(repo_path(cfg.probes))
              if not cfg.probe_characters or p["character"] in cfg.probe_characters]
    step = max(1, len(probes) // cfg.parity.prompts)
    return [[{"role": "system", "content": p["system_prompt"]}, *p["history"],
             {"role": "user", "content": p["user_msg"]}] for p in probes[::step][:cfg.parity.prompts]]


def judge_parity(cfg: EvalConfig, result: Parity, enforce: bool = True) -> Parity:
    """Below `min_first_token_agreement` the adapter is refused (`ParityRefused`) unless `enforce` is off."""
    if enforce and result.first_token_agreement < cfg.parity.min_first_token_agreement:
        raise ParityRefused(
            f"train/serve parity: HF+PEFT and vLLM agree on the first greedy token for only "
            f"{result.first_token_agreement:.0%} of prompts (< {cfg.parity.min_first_token_agreement:.0%}); the "
            f"served adapter does not behave like the trained one. Examples: "
            f"{[e.model_dump() for e in result.examples]}")
    return result

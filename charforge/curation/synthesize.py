"""Optional synthetic expansion: new conversations from each card through any OpenAI-compatible endpoint.

Generated rows carry "source": "synthetic" and then pass through exactly the same filters as seed data.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
from tqdm import tqdm

from charforge.characters import CharacterCard, load_characters
from charforge.errors import Unavailable
from charforge.http import bearer
from charforge.schemas.curate import SyntheticConfig


class SyntheticError(Unavailable):
    """The generation endpoint did not answer, or answered with an error."""


def chat(client: httpx.Client, cfg: SyntheticConfig, messages: list[dict], seed: int) -> str:
    try:
        response = client.post("/chat/completions", json={
            "model": cfg.model, "messages": messages, "temperature": cfg.temperature, "max_tokens": cfg.max_tokens,
            "seed": seed,
        })
    except httpx.HTTPError as err:
        raise SyntheticError(f"synthetic expansion: cannot reach {cfg.base_url} ({err}); start the server or set "
                             "synthetic.enabled: false") from None
    if response.status_code != 200:
        raise SyntheticError(f"synthetic expansion: {cfg.base_url} answered {response.status_code}: "
                             f"{response.text[:200]}")
    return response.json()["choices"][0]["message"]["content"].strip()


def synthesize_conversation(client, cfg: SyntheticConfig, card: CharacterCard, seed: int) -> dict:
    """Alternate a generated visitor question and the character's reply for `cfg.turns` exchanges."""
    messages = [{"role": "system", "content": card.system_prompt}]
    for turn in range(cfg.turns):
        ask = [{"role": "user", "content": (
            f"Write one short question a visitor might ask {card.name} ({card.description}). "
            "Reply with the question only.")}]
        question = chat(client, cfg, ask, seed * 100 + turn)
        messages.append({"role": "user", "content": question})
        messages.append({"role": "assistant", "content": chat(client, cfg, messages, seed * 100 + turn + 50)})
    return {"messages": messages, "character": card.id, "source": "synthetic"}


def generate_synthetic(characters_dir: Path, out_path: Path, cfg: SyntheticConfig) -> Path:
    """Write `conversations_per_character` generated conversations per card to `out_path` (JSONL)."""
    cards = load_characters(characters_dir)
    headers = bearer(cfg.api_key.get_secret_value() if cfg.api_key else None)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    total = len(cards) * cfg.conversations_per_character
    with httpx.Client(base_url=cfg.base_url, headers=headers, timeout=120) as client, \
            open(out_path, "w", encoding="utf-8") as fh, tqdm(total=total, desc="synthesize") as bar:
        for card in cards.values():
            for i in range(cfg.conversations_per_character):
                fh.write(json.dumps(synthesize_conversation(client, cfg, card, i), ensure_ascii=False) + "\n")
                bar.update()
    return out_path

"""The app side: one small chat interface over the providers a character-chat app talks to.

`OpenAICompatible` speaks `/v1/chat/completions` (the charforge gateway, any vLLM server, or a hosted API);
`Ollama` speaks Ollama's `/api/chat` (newline-delimited JSON when streaming), for running a merged model on a
laptop. Both return the same `ChatReply` and stream the same way (an iterator of text pieces), so an app switches
provider by configuration:

    provider = OpenAICompatible("http://gateway:8000", api_key=KEY, model="nell_bramwick")
    for piece in provider.stream([{"role": "user", "content": "What did you plant this spring?"}]):
        print(piece, end="", flush=True)
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol

import httpx

from charforge.http import bearer

Messages = list[dict[str, str]]


class ProviderError(RuntimeError):
    """The provider refused or failed the request; `status` is the HTTP status (None: failed mid-stream)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class ChatReply:
    content: str
    model: str
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    headers: dict[str, str] = field(default_factory=dict)  # e.g. x-charforge-version: the adapter version served

    @property
    def version(self) -> str | None:
        return self.headers.get("x-charforge-version")


class ChatProvider(Protocol):
    model: str

    def chat(self, messages: Messages, *, temperature: float = 0.7, max_tokens: int = 256,
             user: str | None = None) -> ChatReply: ...

    def stream(self, messages: Messages, *, temperature: float = 0.7, max_tokens: int = 256,
               user: str | None = None) -> Iterator[str]: ...


def _error_message(response: httpx.Response) -> str:
    """OpenAI's `{"error": {"message": ...}}`, Ollama's `{"error": "..."}`, else the body."""
    try:
        error = response.json().get("error")
    except (ValueError, AttributeError):
        return response.text[:500]
    if isinstance(error, dict):
        return str(error.get("message", error))
    return str(error) if error else response.text[:500]


def _raise_for_status(response: httpx.Response) -> None:
    if response.status_code >= 400:
        if not response.is_closed:
            response.read()
        raise ProviderError(f"{response.status_code}: {_error_message(response)}", response.status_code)


class OpenAICompatible:
    """POST /v1/chat/completions; `user` keeps a conversation on one adapter version during a canary."""

    def __init__(self, base_url: str, model: str, api_key: str | None = None, timeout: float = 120) -> None:
        self.model = model
        headers = bearer(api_key)
        self.client = httpx.Client(base_url=base_url.rstrip("/"), headers=headers, timeout=timeout)

    def _body(self, messages: Messages, temperature: float, max_tokens: int, user: str | None,
              stream: bool) -> dict:
        body = {"model": self.model, "messages": messages, "temperature": temperature, "max_tokens": max_tokens,
                "stream": stream}
        return {**body, "user": user} if user else body

    def chat(self, messages: Messages, *, temperature: float = 0.7, max_tokens: int = 256,
             user: str | None = None) -> ChatReply:
        r = self.client.post("/v1/chat/completions", json=self._body(messages, temperature, max_tokens, user, False))
        _raise_for_status(r)
        data = r.json()
        choice, usage = data["choices"][0], data.get("usage") or {}
        return ChatReply(choice["message"].get("content") or "", data.get("model", self.model),
                         choice.get("finish_reason"), usage.get("prompt_tokens"), usage.get("completion_tokens"),
                         dict(r.headers))

    def stream(self, messages: Messages, *, temperature: float = 0.7, max_tokens: int = 256,
               user: str | None = None) -> Iterator[str]:
        """Server-sent events: `data: {chunk}` lines, then `data: [DONE]`."""
        body = self._body(messages, temperature, max_tokens, user, True)
        with self.client.stream("POST", "/v1/chat/completions", json=body) as r:
            _raise_for_status(r)
            for line in r.iter_lines():
                if not line.startswith("data:"):
                    continue  # blank separators, comments
                payload = line[5:].strip()
                if payload == "[DONE]":
                    return
                chunk = json.loads(payload)
                if "error" in chunk:  # vLLM reports failures after the 200 inside the stream
                    raise ProviderError(str(chunk["error"].get("message", chunk["error"])))
                for choice in chunk.get("choices", []):
                    if piece := (choice.get("delta") or {}).get("content"):
                        yield piece


class Ollama:
    """POST /api/chat (https://github.com/ollama/ollama/blob/main/docs/api.md); streaming = NDJSON lines."""

    def __init__(self, base_url: str = "http://127.0.0.1:11434", model: str = "charforge", timeout: float = 120,
                 keep_alive: str | None = None) -> None:
        self.model, self.keep_alive = model, keep_alive
        self.client = httpx.Client(base_url=base_url.rstrip("/"), timeout=timeout)

    def _body(self, messages: Messages, temperature: float, max_tokens: int, stream: bool) -> dict:
        body = {"model": self.model, "messages": messages, "stream": stream,
                "options": {"temperature": temperature, "num_predict": max_tokens}}
        return {**body, "keep_alive": self.keep_alive} if self.keep_alive else body

    def chat(self, messages: Messages, *, temperature: float = 0.7, max_tokens: int = 256,
             user: str | None = None) -> ChatReply:
        r = self.client.post("/api/chat", json=self._body(messages, temperature, max_tokens, False))
        _raise_for_status(r)
        data = r.json()
        return ChatReply(data["message"].get("content", ""), data.get("model", self.model), data.get("done_reason"),
                         data.get("prompt_eval_count"), data.get("eval_count"), dict(r.headers))

    def stream(self, messages: Messages, *, temperature: float = 0.7, max_tokens: int = 256,
               user: str | None = None) -> Iterator[str]:
        with self.client.stream("POST", "/api/chat", json=self._body(messages, temperature, max_tokens, True)) as r:
            _raise_for_status(r)
            for line in r.iter_lines():
                if not line.strip():
                    continue
                chunk = json.loads(line)
                if "error" in chunk:
                    raise ProviderError(str(chunk["error"]))
                if piece := chunk.get("message", {}).get("content"):
                    yield piece
                if chunk.get("done"):
                    return


PROVIDERS = {"openai": OpenAICompatible, "ollama": Ollama}

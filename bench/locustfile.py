"""The chat load bench/load.py drives through the gateway, as locust users (run by `locust --headless`).

Each locust user is one chat user with its own `user` id, sending chat completions back to back, a share of them
streamed. Every request is recorded with its send time, status, Retry-After, the replica and version the gateway
answered from, and, for streams, whether the stream ended cleanly or broke off (an error event, or no `[DONE]`).
The run stops after LOAD_REQUESTS requests in all and, if LOAD_UNTIL names a file, not before that file exists (the
load then covers a whole rollout however long it takes); the records go to LOAD_OUT (JSON) when locust quits.

Environment: LOAD_REQUESTS, LOAD_UNTIL, LOAD_OUT, LOAD_MODEL (the route), LOAD_KEY (the inference key),
LOAD_STREAM_SHARE, LOAD_MAX_TOKENS; LOAD_MODELS (comma-separated routes, each request picks one) with LOAD_ZIPF_S
(the k-th route drawn with weight 1/k^s; 0: uniformly), LOAD_IGNORE_EOS=1 (every reply exactly LOAD_MAX_TOKENS
tokens, vLLM's `ignore_eos`). Streams also record their time to the first event (`ttft`).
LOAD_CHAT_TURNS=N (N > 0): each user holds conversations of N turns, as a chat app sends them: every request carries
the whole history so far (its earlier user messages and the replies it got), a conversation keeps its route and its
`user` id, and the next one draws a new route; user messages are drawn from LOAD_USER_MESSAGES (a JSON list) when
given. Chat records carry the turn and the replica's prompt tokens (streams ask for the usage event).
"""

from __future__ import annotations

import json
import os
import random
import time
import uuid

import gevent
from locust import HttpUser, constant, events, task
from locust.exception import StopUser

REQUESTS = int(os.environ.get("LOAD_REQUESTS", "100"))
UNTIL = os.environ.get("LOAD_UNTIL")
OUT = os.environ.get("LOAD_OUT", "load.json")
MODEL = os.environ.get("LOAD_MODEL", "bench")
HEADERS = {"authorization": f"Bearer {os.environ['LOAD_KEY']}"} if os.environ.get("LOAD_KEY") else {}
STREAM_SHARE = float(os.environ.get("LOAD_STREAM_SHARE", "0.5"))
MAX_TOKENS = int(os.environ.get("LOAD_MAX_TOKENS", "8"))
MODELS = [m for m in os.environ.get("LOAD_MODELS", "").split(",") if m] or [MODEL]
ZIPF_S = float(os.environ.get("LOAD_ZIPF_S", "0"))
WEIGHTS = [1 / k ** ZIPF_S for k in range(1, len(MODELS) + 1)]
IGNORE_EOS = os.environ.get("LOAD_IGNORE_EOS") == "1"
TURNS = ["Good morning! How are you today?", "Tell me about the place where you live.",
         "What did you do yesterday?", "What is your favourite meal?", "Who is your oldest friend?"]
CHAT_TURNS = int(os.environ.get("LOAD_CHAT_TURNS", "0"))
if os.environ.get("LOAD_USER_MESSAGES"):
    with open(os.environ["LOAD_USER_MESSAGES"]) as handle:
        TURNS = json.load(handle)

records: list[dict] = []
sent = 0


def done(count: int) -> bool:
    return count >= REQUESTS and (not UNTIL or os.path.exists(UNTIL))


class ChatUser(HttpUser):
    wait_time = constant(0)

    def on_start(self) -> None:
        self.user_id = f"user-{uuid.uuid4().hex[:8]}"
        self.history: list[dict] = []
        self.model: str | None = None

    def next_turn(self) -> tuple[str, list[dict], int]:
        """(route, messages, turn number): a fresh single turn, or the next turn of this user's conversation."""
        message = {"role": "user", "content": random.choice(TURNS)}
        if not CHAT_TURNS:
            return random.choices(MODELS, WEIGHTS)[0], [message], 1
        if self.model is None or len(self.history) >= 2 * CHAT_TURNS:
            self.model, self.history = random.choices(MODELS, WEIGHTS)[0], []
            self.user_id = f"user-{uuid.uuid4().hex[:8]}"  # one conversation, one session id
        self.history.append(message)
        return self.model, list(self.history), len(self.history) // 2 + 1

    @task
    def chat(self) -> None:
        global sent
        if done(sent):
            raise StopUser()
        sent += 1
        stream = random.random() < STREAM_SHARE
        model, messages, turn = self.next_turn()
        record = {"t": time.time(), "user": self.user_id, "stream": stream, "model": model, "turn": turn}
        body = {"model": model, "max_tokens": MAX_TOKENS, "user": self.user_id, "stream": stream,
                "messages": messages, **({"ignore_eos": True} if IGNORE_EOS else {}),
                **({"stream_options": {"include_usage": True}} if stream and CHAT_TURNS else {})}
        reply = ""
        started = time.perf_counter()
        try:
            with self.client.post("/v1/chat/completions", json=body, headers=HEADERS, stream=stream,
                                  catch_response=True, name="stream" if stream else "chat") as r:
                record.update(status=r.status_code, replica=r.headers.get("x-charforge-replica"),
                              version=r.headers.get("x-charforge-version"), retry_after=r.headers.get("retry-after"))
                if stream and r.status_code == 200:
                    lines = []
                    for line in r.iter_lines(decode_unicode=True):
                        if line and not lines:
                            record["ttft"] = time.perf_counter() - started
                        if line:
                            lines.append(line)
                    record["cut"] = any('"error"' in line for line in lines) or "data: [DONE]" not in lines
                    if CHAT_TURNS and not record["cut"]:
                        reply, record["prompt_tokens"] = streamed_reply(lines)
                elif CHAT_TURNS and r.status_code == 200:
                    answer = r.json()
                    reply = answer["choices"][0]["message"]["content"] or ""
                    record["prompt_tokens"] = answer.get("usage", {}).get("prompt_tokens")
                if r.status_code == 200 and not record.get("cut"):
                    r.success()
                else:
                    record["error"] = r.text[:300] if r.status_code != 200 else None
                    r.failure(f"{r.status_code}{' cut' if record.get('cut') else ''}")
        except Exception as exc:  # a broken connection is a result here, not a crash of the bench
            record.update(status=type(exc).__name__, cut=stream)
        record["seconds"] = time.perf_counter() - started
        records.append(record)
        if CHAT_TURNS:
            if record.get("status") == 200 and not record.get("cut"):
                self.history.append({"role": "assistant", "content": reply})
            else:  # a failed turn ends the conversation, as a user would start over
                self.model = None


def streamed_reply(lines: list[str]) -> tuple[str, int | None]:
    """The text of a streamed chat completion and its prompt tokens (from the usage event)."""
    text, prompt_tokens = [], None
    for line in lines:
        if not line.startswith("data: {"):
            continue
        event = json.loads(line[len("data: "):])
        for choice in event.get("choices") or []:
            text.append((choice.get("delta") or {}).get("content") or "")
        if event.get("usage"):
            prompt_tokens = event["usage"].get("prompt_tokens")
    return "".join(text), prompt_tokens


@events.test_start.add_listener
def stop_when_done(environment, **_) -> None:
    def watch() -> None:
        while not done(len(records)) or len(records) < sent:
            gevent.sleep(0.2)
        environment.runner.quit()
    gevent.spawn(watch)


@events.quitting.add_listener
def save(environment, **_) -> None:
    with open(OUT, "w") as handle:
        json.dump(records, handle)

"""Fakes for the gateway's tests, named as fakes: replicas that misbehave on demand (no real vLLM drops a
connection, cuts a stream or hangs when asked)."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

VERSION = "charforge-lora-v1"
REPLY = {"id": "fake", "object": "chat.completion", "model": VERSION, "usage": {"completion_tokens": 2},
         "choices": [{"index": 0, "message": {"role": "assistant", "content": "Good day."}, "finish_reason": "stop"}]}


class FakeReplica:
    """A fake vLLM replica: /health and /v1/models answer as vLLM does (or `models` overrides the list); a POST does
    what `mode` says: ok, drop (close without answering), cut (a stream that breaks after its first event), slow
    (answer after `delay` s), empty (a 200 with no reply text; streamed: deltas without content, then [DONE]),
    error_event (streamed: an error event, then [DONE], as vLLM ends a stream whose generation failed), load_fails
    (`/v1/load_lora_adapter` answers 500 with vLLM's error JSON, as vLLM 0.32 does for a load its worker refuses),
    not_found (every POST answers 404 `{"detail": "Not Found"}`, as a proxy in front of a replica would)."""

    def __init__(self, mode: str = "ok", delay: float = 0.0) -> None:
        self.mode, self.delay, self.models, self.posts = mode, delay, {"data": [{"id": VERSION}]}, 0
        self.asked: list[str] = []  # the `model` of every POST, in order
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def send_json(self, payload, status: int = 200) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                self.send_json({} if self.path == "/health" else fake.models)

            def do_POST(self) -> None:
                fake.posts += 1
                body = json.loads(self.rfile.read(int(self.headers["content-length"])))
                fake.asked.append(body.get("model"))
                if fake.mode == "load_fails" and self.path == "/v1/load_lora_adapter":
                    self.send_json({"error": {"message": "Call to add_lora method failed: Worker failed with error "
                                              "'No space left on device'", "type": "InternalServerError",
                                              "param": None, "code": 500}}, status=500)
                    return
                if fake.mode == "drop":
                    self.close_connection = True
                    return
                if fake.mode == "not_found":
                    self.send_json({"detail": "Not Found"}, status=404)
                    return
                if fake.mode == "slow":
                    time.sleep(fake.delay)
                if body.get("stream") and fake.mode in ("empty", "error_event"):
                    first = {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}
                    last = ({"error": {"message": "generation failed", "type": "BadRequestError", "code": 400}}
                            if fake.mode == "error_event" else
                            {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
                    data = b"".join(f"data: {json.dumps(e)}\n\n".encode() for e in (first, last)) + b"data: [DONE]\n\n"
                    self.send_response(200)
                    self.send_header("content-type", "text/event-stream")
                    self.send_header("content-length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data[:7])  # split mid-line: the gateway reads events across chunks
                    self.wfile.flush()
                    time.sleep(0.05)
                    self.wfile.write(data[7:])
                    return
                if fake.mode == "cut" or body.get("stream"):
                    event = b'data: {"choices": [{"index": 0, "delta": {"content": "Good"}}]}\n\n'
                    self.send_response(200)
                    self.send_header("content-type", "text/event-stream")
                    self.send_header("content-length", str(10 * len(event)))  # promises more than it sends
                    self.end_headers()
                    self.wfile.write(event)
                    self.wfile.flush()
                    self.close_connection = True
                    return
                empty = {**REPLY, "choices": [{**REPLY["choices"][0], "message": {"role": "assistant",
                                                                                   "content": ""}}]}
                self.send_json(empty if fake.mode == "empty" else REPLY)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

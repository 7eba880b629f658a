"""Table-driven tests of the gateway's pure decisions."""

from __future__ import annotations

from collections import Counter

import pytest

from serving.routing import Gate, Replica, WindowStats, assign_version, choose_replica, classify_load, gate_decision

A = Replica("a", "http://a", loaded=frozenset({"base", "nell-v1"}), outstanding=3)
B = Replica("b", "http://b", loaded=frozenset({"base", "nell-v1", "nell-v2"}), outstanding=1)
C = Replica("c", "http://c", loaded=frozenset({"base", "nell-v1", "nell-v2"}), outstanding=1, healthy=False)


@pytest.mark.parametrize("strategy, model, counter, user, exclude, expected", [
    ("round_robin", "nell-v1", 0, None, frozenset(), "a"),
    ("round_robin", "nell-v1", 1, None, frozenset(), "b"),
    ("round_robin", "nell-v1", 2, None, frozenset(), "a"),          # c is unhealthy: never chosen
    ("round_robin", "nell-v2", 0, None, frozenset(), "b"),          # a lacks the adapter: never chosen
    ("least_outstanding", "nell-v1", 0, None, frozenset(), "b"),
    ("least_outstanding", "nell-v1", 0, None, frozenset({"b"}), "a"),  # retry goes elsewhere
    ("round_robin", "nell-v2", 0, None, frozenset({"b"}), None),   # nowhere left
    ("round_robin", "nell-v3", 0, None, frozenset(), None),        # nobody serves it
])
def test_choose_replica(strategy, model, counter, user, exclude, expected):
    chosen = choose_replica([A, B, C], model, strategy, counter=counter, user=user, exclude=exclude)
    assert (chosen.name if chosen else None) == expected


def test_consistent_hash_keeps_users_and_moves_only_those_of_a_removed_replica():
    replicas = [Replica(n, f"http://{n}", loaded=frozenset({"m"})) for n in "pqrs"]
    users = [f"user-{i}" for i in range(400)]
    before = {u: choose_replica(replicas, "m", "consistent_hash", user=u).name for u in users}
    assert before == {u: choose_replica(replicas, "m", "consistent_hash", user=u).name for u in users}
    assert min(Counter(before.values()).values()) > 60  # spread over all four
    after = {u: choose_replica(replicas[:3], "m", "consistent_hash", user=u).name for u in users}
    moved = {u for u in users if before[u] != after[u]}
    assert moved == {u for u in users if before[u] == "s"}


def test_unknown_strategy_is_named():
    with pytest.raises(ValueError, match="unknown routing strategy 'random'"):
        choose_replica([B], "nell-v1", "random")


@pytest.mark.parametrize("weights, share_new", [
    ({"nell-v1": 100, "nell-v2": 0}, 0.0), ({"nell-v1": 95, "nell-v2": 5}, 0.05),
    ({"nell-v1": 75, "nell-v2": 25}, 0.25), ({"nell-v1": 0, "nell-v2": 100}, 1.0),
])
def test_assign_version_follows_the_weights(weights, share_new):
    by_counter = Counter(assign_version(weights, None, i) for i in range(1000))
    assert by_counter["nell-v2"] / 1000 == pytest.approx(share_new, abs=0.011)
    by_user = Counter(assign_version(weights, f"u{i}") for i in range(4000))
    assert by_user["nell-v2"] / 4000 == pytest.approx(share_new, abs=0.03)


def test_a_user_in_the_canary_stays_in_it_as_it_grows():
    users = [f"u{i}" for i in range(2000)]
    at5 = {u for u in users if assign_version({"nell-v1": 95, "nell-v2": 5}, u) == "nell-v2"}
    at25 = {u for u in users if assign_version({"nell-v1": 75, "nell-v2": 25}, u) == "nell-v2"}
    assert at5 and at5 <= at25
    assert all(assign_version({"nell-v1": 95, "nell-v2": 5}, u) == "nell-v2" for u in at5)  # sticky per request


def test_assign_version_needs_a_live_version():
    with pytest.raises(ValueError, match="no version has a positive weight"):
        assign_version({"nell-v1": 0}, "u")


GATE = Gate(max_error_rate=0.01, max_error_rate_increase=0.005, max_latency_ratio=1.5, min_requests=20)


@pytest.mark.parametrize("new, old, verdict, why", [
    (WindowStats(10, 0, 0.1), WindowStats(100, 0, 0.1), "wait",
     "only 10 requests on the new version (< 20); hold the step"),
    (WindowStats(100, 0, 0.11), WindowStats(100, 0, 0.1), "advance", "100 requests, error rate 0.0%, p95 110 ms"),
    (WindowStats(100, 2, 0.1), WindowStats(100, 0, 0.1), "rollback", "error rate 2.0% > 1.0%"),
    (WindowStats(1000, 8, 0.1), WindowStats(1000, 1, 0.1), "rollback",
     "error rate 0.8% vs 0.1% on the previous version (> +0.5%)"),
    (WindowStats(100, 0, 0.2), WindowStats(100, 0, 0.1), "rollback", "p95 latency 200 ms vs 100 ms (> 1.5x)"),
    (WindowStats(100, 0, 0.2), None, "advance", "100 requests, error rate 0.0%, p95 200 ms"),
])
def test_gate_decision(new, old, verdict, why):
    assert gate_decision(new, old, GATE) == (verdict, why)


@pytest.mark.parametrize("status, body, vllm_json, verdict", [
    (200, "Success: LoRA adapter 'nell-v2' added successfully.", False, "ok"),
    (400, "The lora adapter 'nell-v2' has already been loaded. If you want to load the adapter in place, set "
          "'load_inplace' to True.", True, "already_loaded"),
    (404, "Loading lora nell-v2 failed: No adapter found for /store/nell/abc", True, "bad_artifact"),
    (500, "Call to add_lora method failed: Worker failed with error 'LoRA rank 32 is greater than max_lora_rank 16.'",
     True, "bad_artifact"),
    (400, "The lora adapter 'base' conflicts with a served base model.", True, "bad_artifact"),
    (404, "Not Found", False, "config_error"),       # runtime LoRA updating off on that replica
    (None, "connection refused", False, "bad_replica"),
    (503, "", False, "bad_replica"),
])
def test_classify_load(status, body, vllm_json, verdict):
    assert classify_load(status, body, vllm_json) == verdict


def test_canary_window_survives_a_gateway_restart():
    """Metric deltas between two /metrics scrapes; a restarted gateway's counters start again from zero."""
    from serving.rollout import window

    def snap(gateway: str, **counts: float) -> dict:
        return {(gateway, "v2", kind.replace("le_", "le=").replace("_", "."), False): v for kind, v in counts.items()}
    before = snap("a", ok=10.0, le_0_5=9.0, le_1_0=10.0)
    after = snap("a", ok=30.0, errors=1.0, le_0_5=20.0, le_1_0=31.0)
    assert window(before, after, "v2") == WindowStats(21, 1, 1.0)
    reset = snap("a", ok=4.0, le_0_5=4.0, le_1_0=4.0)
    assert window(before, reset, "v2") == WindowStats(4, 0, 0.5)
    assert window(before, {}, "v2") == WindowStats(0, 0, 0.0)


def test_canary_window_adds_up_gateways_each_restarting_on_its_own():
    """Two gateways share the routes: the window is the sum of each one's delta. Gateway b restarted (its counters
    went back): its window is what it counted since; a's is its difference; a probe row counts only where asked."""
    from serving.rollout import window

    before = {("a", "v2", "ok", False): 100.0, ("a", "v2", "le=1.0", False): 100.0, ("a", "v2", "le=4.0", False): 100.0,
              ("b", "v2", "ok", False): 50.0, ("b", "v2", "le=1.0", False): 50.0, ("b", "v2", "le=4.0", False): 50.0}
    after = {("a", "v2", "ok", False): 110.0, ("a", "v2", "le=1.0", False): 110.0, ("a", "v2", "le=4.0", False): 110.0,
             ("b", "v2", "ok", False): 3.0, ("b", "v2", "errors", False): 1.0, ("b", "v2", "le=1.0", False): 3.0,
             ("b", "v2", "le=4.0", False): 4.0,
             ("b", "v2", "ok", True): 5.0, ("b", "v2", "le=1.0", True): 5.0, ("b", "v2", "le=4.0", True): 5.0}
    assert window(before, after, "v2") == WindowStats(10 + 4 + 5, 1, 4.0)
    assert window(before, after, "v2", probes_only=True) == WindowStats(5, 0, 1.0)


def test_a_familys_rollout_switches_only_its_characters_routes():
    from charforge.characters import load_characters
    from charforge.schemas.serving import ServingConfig
    from charforge.settings import DATA_DIR
    from serving.rollout import RolloutRefused, route_names

    cards = load_characters(DATA_DIR / "characters")
    routes = route_names(ServingConfig(), "smollm2-new-worlds", ["dot_kincaid", "tamsin_oyelaran"])
    assert routes == {"smollm2-new-worlds": None, "dot_kincaid": cards["dot_kincaid"].system_prompt,
                      "tamsin_oyelaran": cards["tamsin_oyelaran"].system_prompt}
    assert set(route_names(ServingConfig(), "smollm2-lora")) == {"smollm2-lora", *cards}  # one adapter for all
    with pytest.raises(RolloutRefused) as refused:
        route_names(ServingConfig(), "detectives", ["ambrose_quill", "sherlock_holmes"])
    assert str(refused.value) == (f"adapter family detectives covers characters without a persona card in "
                                  f"{DATA_DIR / 'characters'}: sherlock_holmes")

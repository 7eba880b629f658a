"""Table-driven tests of adapter placement (`serving.placement`): where a request for an adapter version goes, when
that replica loads it first, and what it evicts."""

from __future__ import annotations

import pytest

from serving.placement import Choice, Placement, choose, victim
from serving.routing import Replica


def replica(name: str, adapters: set[str], outstanding: int = 0, healthy: bool = True) -> Replica:
    return Replica(name, f"http://{name}", healthy=healthy, outstanding=outstanding,
                   loaded=frozenset({"base", *adapters}), adapters=frozenset(adapters))


FAMILIES = frozenset(f"f{i}-v1" for i in range(1, 9))


def placed(choice: Choice | None) -> tuple | None:
    return (choice.replica.name, choice.load, choice.evict) if choice else None


@pytest.mark.parametrize("case, replicas, version, strategy, expected", [
    # affinity: resident wins even with more in flight, below the spill margin (4)
    ("resident, 3 more in flight", [replica("a", {"f1-v1"}, 3), replica("b", set(), 0)], "f1-v1",
     "adapter_affinity", ("a", False, None)),
    # ... and at the margin, the hot adapter spreads to the idle replica
    ("resident, 4 more in flight: spill", [replica("a", {"f1-v1"}, 4), replica("b", set(), 0)], "f1-v1",
     "adapter_affinity", ("b", True, None)),
    ("two residents: fewer in flight", [replica("a", {"f1-v1"}, 2), replica("b", {"f1-v1"}, 1)], "f1-v1",
     "adapter_affinity", ("b", False, None)),
    # resident nowhere: a free slot before an eviction, even on the busier replica
    ("nowhere: free slot first", [replica("a", {"f1-v1", "f2-v1", "f3-v1", "f4-v1"}, 0),
                                  replica("b", {"f5-v1"}, 3)], "f6-v1", "adapter_affinity", ("b", True, None)),
    ("nowhere, both full: evict on the idler", [replica("a", {"f1-v1", "f2-v1", "f3-v1", "f4-v1"}, 2),
                                                replica("b", {"f5-v1", "f6-v1", "f7-v1", "f8-v1"}, 1)], "f1-v1",
     "adapter_affinity", ("a", False, None)),
    # least_outstanding is blind to residency: it loads where the fewest requests are, though a holds it
    ("blind router loads on the idler", [replica("a", {"f1-v1"}, 1), replica("b", set(), 0)], "f1-v1",
     "least_outstanding", ("b", True, None)),
    ("blind router, resident on the idler", [replica("a", set(), 1), replica("b", {"f1-v1"}, 0)], "f1-v1",
     "least_outstanding", ("b", False, None)),
    ("unhealthy replica is never placed on", [replica("a", set(), 0, healthy=False), replica("b", set(), 5)],
     "f1-v1", "adapter_affinity", ("b", True, None)),
    ("not in the catalogue: only where resident", [replica("a", set(), 0), replica("b", {"x-v9"}, 5)], "x-v9",
     "adapter_affinity", ("b", False, None)),
    ("not in the catalogue, resident nowhere", [replica("a", set(), 0)], "x-v9", "adapter_affinity", None),
])
def test_choose(case, replicas, version, strategy, expected):
    assert placed(choose(replicas, version, strategy, Placement(catalogue=FAMILIES, spill_outstanding=4))) == \
        expected, case


def test_a_full_replica_evicts_its_least_recently_used_idle_version():
    a = replica("a", {"f1-v1", "f2-v1", "f3-v1", "f4-v1"})
    used = {("a", "f1-v1"): 10.0, ("a", "f2-v1"): 5.0, ("a", "f3-v1"): 1.0, ("a", "f4-v1"): 20.0}
    assert placed(choose([a], "f5-v1", "adapter_affinity", Placement(catalogue=FAMILIES, last_used=used))) == \
        ("a", True, "f3-v1")
    # f3 has a request in flight: the next least recently used goes
    busy = Placement(catalogue=FAMILIES, last_used=used, inflight={("a", "f3-v1"): 1})
    assert victim(a, busy) == "f2-v1"
    # pinned versions (the fleet's desired state) are never evicted
    assert victim(a, Placement(catalogue=FAMILIES, last_used=used, pinned=frozenset({"f2-v1", "f3-v1"}))) == "f1-v1"


def test_a_replica_full_of_busy_or_pinned_adapters_takes_no_new_one():
    a = replica("a", {"f1-v1", "f2-v1"})
    every_one_busy = Placement(catalogue=FAMILIES, max_resident=2, inflight={("a", "f1-v1"): 2, ("a", "f2-v1"): 1})
    assert choose([a], "f3-v1", "adapter_affinity", every_one_busy) is None
    assert choose([a], "f3-v1", "least_outstanding", every_one_busy) is None
    pinned = Placement(catalogue=FAMILIES, max_resident=2, pinned=frozenset({"f1-v1", "f2-v1"}))
    assert choose([a], "f3-v1", "adapter_affinity", pinned) is None
    # one of them idle: it goes
    assert placed(choose([a], "f3-v1", "adapter_affinity",
                         Placement(catalogue=FAMILIES, max_resident=2, inflight={("a", "f1-v1"): 1}))) == \
        ("a", True, "f2-v1")


def test_tried_and_saturated_replicas_are_skipped():
    a, b = replica("a", {"f1-v1"}, 0), replica("b", set(), 7)
    assert placed(choose([a, b], "f1-v1", "adapter_affinity", Placement(catalogue=FAMILIES),
                         exclude=frozenset({"a"}))) == ("b", True, None)  # a load failed on a: b loads it
    assert placed(choose([a, b], "f1-v1", "adapter_affinity", Placement(catalogue=FAMILIES),
                         exclude=frozenset({"a"}), max_outstanding=7)) is None


def test_affinity_keeps_a_zipf_mix_on_few_loads_where_the_blind_router_reloads():
    """The decision logic alone, replayed: 8 families, Zipf(1.1) traffic, 2 replicas x 4 slots, every request
    taking 3 steps; loads counted as the gateway would make them."""
    import random

    weights = [1 / k ** 1.1 for k in range(1, 9)]
    names = sorted(FAMILIES, key=lambda v: int(v[1:].split("-")[0]))
    rng = random.Random(0)
    traffic = rng.choices(names, weights, k=3000)
    loads = {}
    for strategy in ("adapter_affinity", "least_outstanding"):
        held = {"a": [], "b": []}
        running: list[tuple[int, str, str]] = []  # (ends at step, replica, version)
        inflight: dict[tuple[str, str], int] = {}
        used: dict[tuple[str, str], float] = {}
        count = 0
        for step, version in enumerate(traffic):
            for end, r, v in [x for x in running if x[0] <= step]:
                running.remove((end, r, v))
                inflight[(r, v)] -= 1
            reps = [replica(n, set(held[n]), sum(1 for x in running if x[1] == n)) for n in "ab"]
            c = choose(reps, version, strategy, Placement(catalogue=FAMILIES, inflight=inflight, last_used=used))
            assert c is not None
            r = c.replica.name
            if c.load:
                count += 1
                if c.evict:
                    held[r].remove(c.evict)
                held[r].append(version)
            inflight[(r, version)] = inflight.get((r, version), 0) + 1
            used[(r, version)] = step
            running.append((step + 3, r, version))
        loads[strategy] = count
    assert loads["adapter_affinity"] * 2 <= loads["least_outstanding"], loads

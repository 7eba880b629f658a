"""Adapter placement as pure functions: which replica takes a request for an adapter version, whether that replica
must load it first, and which resident adapter it evicts to make room. The gateway (`serving/gateway.py`) keeps
the state these read (what each replica lists in `/v1/models`, requests in flight per replica and version, when
each version was last used there) and carries the decisions out. Table-driven tests: tests/serving/test_placement.py.

Terms:
- resident: the replica lists the version in `/v1/models` (vLLM has it loaded).
- catalogue: versions that may be placed on demand (served name -> adapter folder); a request for a catalogue
  version resident nowhere loads it where placement chooses, instead of a 503.
- pinned: versions the fleet's desired state loads on every replica (`desired.json`): never evicted here.
- max_resident: adapters a replica holds at most (vLLM's `--max-cpu-loras`); a full replica evicts its least
  recently used version that has no request in flight and is not pinned, or cannot take a new one.
"""

from __future__ import annotations

from dataclasses import dataclass

from serving.routing import Replica, Strategy, choose_replica


@dataclass(frozen=True)
class Placement:
    """What placement knows beyond the replicas themselves."""

    catalogue: frozenset[str] = frozenset()      # versions loadable on demand
    pinned: frozenset[str] = frozenset()         # never evicted
    max_resident: int = 4                        # adapters per replica
    spill_outstanding: int = 8                   # adapter_affinity: place on another replica when the best resident
                                                 # one has this many more requests in flight than the best other
    inflight: dict[tuple[str, str], int] | None = None   # (replica, version) -> requests in flight
    last_used: dict[tuple[str, str], float] | None = None  # (replica, version) -> when last sent a request


@dataclass(frozen=True)
class Choice:
    replica: Replica
    load: bool = False          # the version must be loaded on it first
    evict: str | None = None    # ... after unloading this version


def victim(replica: Replica, placement: Placement) -> str | None:
    """The version a full replica gives up for a new one: least recently used, no request in flight, not pinned;
    None when nothing may go."""
    inflight, used = placement.inflight or {}, placement.last_used or {}
    free = [v for v in replica.adapters if v not in placement.pinned and not inflight.get((replica.name, v))]
    return min(free, key=lambda v: (used.get((replica.name, v), 0.0), v)) if free else None


def room(replica: Replica, placement: Placement) -> tuple[bool, str | None]:
    """(can this replica load one more version, what it must evict first)."""
    if len(replica.adapters) < placement.max_resident:
        return True, None
    evict = victim(replica, placement)
    return evict is not None, evict


def choose(replicas: list[Replica], version: str, strategy: Strategy, placement: Placement | None, counter: int = 0,
           user: str | None = None, exclude: frozenset[str] = frozenset(),
           max_outstanding: int | None = None) -> Choice | None:
    """The replica for one attempt at a request for `version`, and whether it loads the version first.

    Without placement, or for a version outside the catalogue (the base model, a pinned version): only replicas
    where it is resident, chosen by `strategy` (`serving.routing.choose_replica`). For a catalogue version:
    - `adapter_affinity`: the resident replica with the fewest requests in flight, unless every resident one has
      `spill_outstanding` more in flight than a replica that can take the version (then that one loads it: a hot
      adapter spreads to more replicas); resident nowhere: the replica with room (a free slot before an eviction)
      and the fewest in flight.
    - any other strategy: that strategy over every healthy replica with the version or room for it, blind to where
      it is resident (what a router that does not know adapters does), loading where it lands.
    None when no replica can take it (all unhealthy, tried, at `max_outstanding`, or full of busy adapters).
    """
    if placement is None or version not in placement.catalogue:
        picked = choose_replica(replicas, version, strategy if strategy != "adapter_affinity" else
                                "least_outstanding", counter, user, exclude, max_outstanding)
        return Choice(picked) if picked else None
    open_ = [r for r in replicas if r.healthy and r.name not in exclude
             and (max_outstanding is None or r.outstanding < max_outstanding)]
    resident = sorted((r for r in open_ if version in r.loaded), key=lambda r: (r.outstanding, r.name))
    others = []
    for r in open_:
        if version not in r.loaded:
            ok, evict = room(r, placement)
            if ok:
                others.append((evict is not None, r.outstanding, r.name, r, evict))
    if strategy == "adapter_affinity":
        if resident:
            best = resident[0]
            if others:
                spill = min(others, key=lambda o: (o[1], o[0], o[2]))
                if best.outstanding - spill[1] >= placement.spill_outstanding:
                    return Choice(spill[3], load=True, evict=spill[4])
            return Choice(best)
        if not others:
            return None
        _, _, _, r, evict = min(others, key=lambda o: (o[0], o[1], o[2]))
        return Choice(r, load=True, evict=evict)
    # residency-blind: every replica that has the version or could load it, as the strategy picks among them
    evicts = {o[2]: o[4] for o in others}
    pool = [r for r in open_ if version in r.loaded or r.name in evicts]
    marked = [Replica(r.name, r.url, r.healthy, r.outstanding, r.loaded | {version}, r.adapters) for r in pool]
    picked = choose_replica(marked, version, strategy, counter, user)
    if picked is None:
        return None
    real = next(r for r in pool if r.name == picked.name)
    return Choice(real) if version in real.loaded else Choice(real, load=True, evict=evicts[real.name])

"""The whole plan: the fleet for everyone in, then the join storm against it (pure).

The fleet's admission rate is the lowest at which nobody in the storm waits longer than
``max_wait`` (a fluid estimate, ``storm.rate_for_max_wait``), unless the operator names one.
The storm is then simulated at that rate, and the townhall node processes and Redis are sized
for its busiest interval: first joins, waiting-room returns and ticket renewals all reach them,
none of it cacheable.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

from townhall.plan import capacity
from townhall.plan.capacity import Assumptions, FleetPlan, Stream
from townhall.plan.inputs import Figure
from townhall.plan.storm import Admission, ArrivalCurve, StormResult, rate_for_max_wait, simulate


@dataclasses.dataclass(frozen=True)
class StormSpec:
    """The 8 PM storm: how many join in the first minute, over how long the rest come."""

    first_minute: int = 1_000_000
    span_seconds: float = 1800.0
    max_wait_seconds: float = 300.0
    admission_rate: float | None = None  # None: the lowest that keeps waits under max_wait
    max_retry_after: int = 30  # the waiting room's longest Retry-After (capacity.max_retry_after)
    step: float = 0.5
    sample_every: float = 5.0


@dataclasses.dataclass(frozen=True)
class LoadPoint:
    """The fleet's load at one sample of the storm."""

    t: float
    listeners: int
    waiting: int
    edge_requests_per_s: float
    edge_gbps: float
    edge_utilisation: float  # of the deployed edges' limiting resource (CPU, NIC or memory)
    origin_requests_per_s: float
    admission_requests_per_s: float
    node_processes_busy: float
    redis_commands_per_s: float
    redis_cores: float
    hot_key_updates_per_s: float  # waiting-room script calls on the space's counters
    # The same if a waiting-room return whose number is not yet released were answered from
    # a node's copy of the released counter, without a write (first joins, admissions from
    # the room and renewals still write).
    hot_key_writes_if_returns_read_per_s: float


@dataclasses.dataclass(frozen=True)
class Plan:
    stream: Stream
    inputs: Mapping[str, Figure]
    assumptions: Assumptions
    fleet: FleetPlan
    storm_spec: StormSpec
    admission: Admission
    storm: StormResult
    load: tuple[LoadPoint, ...]
    node_processes: int
    node_machines: int
    redis_commands_peak: float
    redis_cores_peak: float
    redis_shards: int  # primaries: for the CPU, and one per split of the space's counters
    counter_splits: int  # keys (on as many primaries) the space's waiting-room counters need
    hot_key_peak: float
    notes: tuple[str, ...]


def storm_load(
    result: StormResult, fleet: FleetPlan, inputs: Mapping[str, Figure], a: Assumptions
) -> list[LoadPoint]:
    """Edge, origin, node and Redis load at each sample of the storm."""
    one, edges = fleet.listener, fleet.edges
    per_edge_origin = fleet.origin.objects_per_s_per_edge * a.spaces
    per_process = inputs["joins_per_core"].value
    points = []
    for s in result.samples:
        admission = s.joins_per_s + s.returns_per_s + s.renewals_per_s
        redis = capacity.redis_load(admission, inputs, a)
        points.append(
            LoadPoint(
                t=s.t,
                listeners=s.admitted,
                waiting=s.waiting,
                edge_requests_per_s=s.admitted * one.requests_per_s,
                edge_gbps=s.admitted * one.bytes_per_s * 8 / 1e9,
                edge_utilisation=s.admitted / (edges.deployed * edges.listeners_per_edge) * a.utilisation,
                origin_requests_per_s=min(edges.deployed, s.admitted) * per_edge_origin,
                admission_requests_per_s=admission,
                node_processes_busy=admission / per_process,
                redis_commands_per_s=redis.commands_per_s,
                redis_cores=redis.cores,
                hot_key_updates_per_s=redis.counter_updates_per_s,
                hot_key_writes_if_returns_read_per_s=s.joins_per_s
                + s.admitted_from_queue_per_s
                + s.renewals_per_s,
            )
        )
    return points


def make_plan(
    stream: Stream,
    inputs: Mapping[str, Figure],
    assumptions: Assumptions | None = None,
    spec: StormSpec | None = None,
) -> Plan:
    """The fleet for ``stream`` and the storm against it."""
    a = assumptions or Assumptions()
    spec = spec or StormSpec()
    fleet = capacity.fleet_plan(stream, inputs, a)
    curve = ArrivalCurve.storm(stream.listeners, spec.first_minute, spec.span_seconds)
    rate = spec.admission_rate or rate_for_max_wait(curve, spec.max_wait_seconds, spec.step)
    admission = Admission(
        rate=rate,
        burst=rate,  # a second's worth, as the configured defaults pair them
        max_active=stream.listeners,
        max_retry_after=spec.max_retry_after,
        renew_every=a.ticket_ttl_seconds * a.renew_at,
    )
    result = simulate(curve, admission, step=spec.step, sample_every=spec.sample_every)
    load = storm_load(result, fleet, inputs, a)
    steady = fleet.renewals_per_s
    busiest = max([p.admission_requests_per_s for p in load] + [steady])
    processes = capacity.node_processes(busiest, inputs, a)
    processes += math.ceil(processes * a.spare)
    redis_peak = max([p.redis_commands_per_s for p in load] + [0.0])
    hot = max([p.hot_key_updates_per_s for p in load] + [steady])
    peak = capacity.redis_load(hot, inputs, a)
    notes = list(fleet.notes)
    splits = capacity.counter_splits(hot, inputs, a)
    if splits > 1:
        read_returns = max([p.hot_key_writes_if_returns_read_per_s for p in load] + [steady])
        notes.append(
            f"one space's waiting-room counters take up to {hot:,.0f} updates/s in the storm, "
            f"{hot / fleet.redis_key_ceiling_per_s:.1f}x what one Redis thread serialises "
            f"({fleet.redis_key_ceiling_per_s:,.0f}/s, one Lua script call per update): the fleet "
            f"needs each space's counters split over {splits} keys on {splits} Redis primaries "
            f"(keys on one primary share its thread): set waiting_room_splits = {splits}, and the "
            f"admission code hashes each joiner to one of {splits} splits holding 1/{splits} of the "
            "space's rate, burst and cap with its own arrival numbers, its queue token and ticket "
            f"naming the split; list {splits} Redis primaries in waiting_room_redis_urls and split "
            "k lives on primary k mod n (docs/scaleout.md); answering waiting-room "
            "returns whose number "
            "is not yet released from each node's copy of the released counter, without a write, "
            f"would leave {read_returns:,.0f} updates/s "
            f"({capacity.counter_splits(read_returns, inputs, a)} split(s))"
        )
    if result.returns > result.admitted:
        notes.append(
            f"waiting-room returns ({result.returns:,}) outnumber joiners ({result.admitted:,}) "
            f"{result.returns / max(1, result.admitted):.1f} to 1: a longest Retry-After above "
            f"{spec.max_retry_after} s for far positions would cut them"
        )
    return Plan(
        stream=stream,
        inputs=inputs,
        assumptions=a,
        fleet=fleet,
        storm_spec=spec,
        admission=admission,
        storm=result,
        load=tuple(load),
        node_processes=processes,
        node_machines=math.ceil(processes / a.node_cores),
        redis_commands_peak=redis_peak,
        redis_cores_peak=max([p.redis_cores for p in load] + [peak.cores]),
        redis_shards=capacity.redis_primaries(peak, inputs, a),
        counter_splits=splits,
        hot_key_peak=hot,
        notes=tuple(notes),
    )

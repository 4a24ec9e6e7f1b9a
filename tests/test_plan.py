"""The capacity planner's pure core: inputs and their sources, fleet arithmetic, the storm."""

from __future__ import annotations

import dataclasses
import math

import pytest

from townhall.plan import capacity
from townhall.plan.capacity import Assumptions, Stream
from townhall.plan.inputs import lookup, resolve
from townhall.plan.planner import StormSpec, make_plan
from townhall.plan.storm import Admission, ArrivalCurve, fluid_max_wait, rate_for_max_wait, simulate

CONTROL = {
    "results": [
        {
            "case": "GET /api/v1/accounts/{handle} (139 B)",
            "townhall": {"rps": 444.0},
            "peer": {"rps": 41000.0},
        },
        {"case": "GET /healthz (15 B)", "townhall": {"rps": 4500.0}, "peer": {"rps": 40000.0}},
    ]
}
AUDIENCE = {
    "rates": {
        "rows": [
            {
                "object": "part",
                "townhall": {"requests_per_cpu_s": 9000.0},
                "peer": {"requests_per_cpu_s": 50000.0},
            },
            {
                "object": "playlist",
                "townhall": {"requests_per_cpu_s": 7000.0},
                "peer": {"requests_per_cpu_s": 1},
            },
        ],
        "runs": [{"object": "part", "bytes": 4300}, {"object": "playlist", "bytes": 1500}],
    }
}


def test_lookup_follows_names_selectors_and_indexes() -> None:
    assert lookup(AUDIENCE, "rates.rows[object=playlist].townhall.requests_per_cpu_s") == 7000.0
    assert lookup(AUDIENCE, "rates.runs[1].bytes") == 1500
    assert lookup(AUDIENCE, "rates.rows[object=segment].townhall") is None
    assert lookup(AUDIENCE, "rates.runs[7].bytes") is None
    assert lookup(AUDIENCE, "nothing.here") is None


def test_each_input_says_where_it_came_from() -> None:
    only_control = resolve({"control.json": CONTROL}, {})
    assert only_control["edge_rps_per_core"].value == 40000.0
    assert only_control["edge_rps_per_core"].origin == "measured"
    assert only_control["edge_rps_per_core"].source.startswith(
        "control.json: results[case=GET /healthz (15 B)]"
    )
    assert only_control["playlist_bytes"].origin == "default"

    both = resolve({"control.json": CONTROL, "audience.json": AUDIENCE}, {"joins_per_core": 3000})
    # The audience benchmark is preferred to the control one when both are there.
    assert both["edge_rps_per_core"].value == 50000.0
    assert both["origin_playlist_rps_per_core"].value == 7000.0
    assert both["playlist_bytes"].value == 1500.0
    assert both["joins_per_core"].value == 3000.0
    assert both["joins_per_core"].origin == "--inputs"
    with pytest.raises(ValueError, match="unknown input"):
        resolve({}, {"cores_per_edge": 8})


def test_media_rate_from_the_replay_benchmark() -> None:
    replay = {"cases": [{"case": "1 minute", "audio_seconds": 60.0, "runs": [{"m4a_bytes": 510000}]}]}
    figure = resolve({"replay.json": replay}, {})["media_bytes_per_second"]
    assert figure.value == pytest.approx(8500.0)
    assert figure.origin == "measured"


def test_wire_bytes_add_tcp_and_tls_framing() -> None:
    assert capacity.wire_bytes(1000) == 1000 + 52 + 22
    assert capacity.wire_bytes(3000) == 3000 + 3 * 52 + 22
    assert capacity.wire_bytes(20000) == 20000 + 14 * 52 + 2 * 22


def test_a_listener_makes_a_reload_and_a_part_request_per_part() -> None:
    inputs = resolve({}, {})
    a = Assumptions(state_poll_seconds=0)
    one = capacity.listener_load(Stream(1000), inputs, a)
    assert one.requests_per_s == pytest.approx(4.0)
    assert one.part_bytes == pytest.approx(inputs["media_bytes_per_second"].value * 0.5)
    quarter = capacity.listener_load(Stream(1000, part_seconds=0.25), inputs, a)
    assert quarter.requests_per_s == pytest.approx(8.0)
    louder = capacity.listener_load(Stream(1000, bitrate=128000), inputs, a)
    assert louder.part_bytes == pytest.approx(2 * one.part_bytes)
    assert louder.bytes_per_s > one.bytes_per_s
    with_page = capacity.listener_load(Stream(1000), inputs, Assumptions(state_poll_seconds=1.5))
    assert with_page.requests_per_s == pytest.approx(4.0 + 1 / 1.5)


def test_doubling_listeners_doubles_edges() -> None:
    inputs, a = resolve({}, {}), Assumptions()
    per_edge = capacity.fleet_plan(Stream(1000), inputs, a).edges.listeners_per_edge
    ten = capacity.fleet_plan(Stream(per_edge * 10), inputs, a).edges
    twenty = capacity.fleet_plan(Stream(per_edge * 20), inputs, a).edges
    assert (ten.needed, twenty.needed) == (10, 20)
    assert twenty.egress_gbps == pytest.approx(2 * ten.egress_gbps)
    assert twenty.requests_per_s == pytest.approx(2 * ten.requests_per_s)


def test_the_scarcest_resource_limits_an_edge() -> None:
    inputs = resolve({}, {})
    slow_nic = capacity.fleet_plan(Stream(10**6), inputs, Assumptions(edge_nic_gbps=1)).edges
    assert slow_nic.limited_by == "NIC"
    assert slow_nic.listeners_per_edge == slow_nic.listeners_by_nic
    small_ram = capacity.fleet_plan(Stream(10**6), inputs, Assumptions(edge_ram_gib=1)).edges
    assert small_ram.limited_by == "connection memory"
    measured = resolve({}, {"edge_listeners_per_core": 100})
    few = capacity.fleet_plan(Stream(10**6), measured, Assumptions()).edges
    assert few.limited_by == "CPU"
    assert few.listeners_by_cpu == int(100 * 16 * 0.7)


def test_collapsing_keeps_origin_load_independent_of_listeners() -> None:
    inputs, a = resolve({}, {}), Assumptions()
    plans = [capacity.fleet_plan(Stream(n), inputs, a) for n in (10_000, 1_000_000, 8_000_000)]
    per_edge = {round(p.origin.requests_per_s / p.edges.deployed, 9) for p in plans}
    assert len(per_edge) == 1  # the same per edge however many listeners each edge holds
    # 0.5 s parts: parts, blocking reloads, plain playlist at 2/s; segments 0.5/s; state 1/s.
    assert per_edge == {7.5}
    # The same edges with 100 times the listeners behind them cost the origin the same.
    small = plans[0]
    crowded = dataclasses.replace(small.edges, needed=small.edges.needed, deployed=small.edges.deployed)
    big_stream = Stream(100 * small.stream.listeners)
    origin = capacity.origin_plan(big_stream, small.listener, crowded, inputs, a)
    assert origin.requests_per_s == small.origin.requests_per_s


def test_storm_curve_holds_its_first_minute_and_total() -> None:
    curve = ArrivalCurve.storm(8_000_000, 1_000_000)
    assert curve.cumulative(60) == pytest.approx(1_000_000)
    assert curve.total == pytest.approx(8_000_000)
    assert curve.rate(0) > curve.rate(60) > curve.rate(900) > curve.rate(1800) == 0
    assert ArrivalCurve.storm(1000, 5000).total == pytest.approx(1000)
    with pytest.raises(ValueError):
        ArrivalCurve.storm(8_000_000, 10_000)  # the tail would start above the first minute
    with pytest.raises(ValueError):
        ArrivalCurve(((10.0, 1.0), (0.0, 1.0)))


# 10,000 joiners at 1,000/s for 10 s, admitted at 100/s: a queue of 9,000 when they stop.
FLAT = ArrivalCurve(((0.0, 1000.0), (10.0, 1000.0)))


def test_the_storm_admits_everyone_in_arrival_order() -> None:
    result = simulate(FLAT, Admission(rate=100, burst=100, max_active=10**6))
    assert result.admitted == 10_000
    by_arrival = sorted(result.cohorts, key=lambda c: c.first)
    # Cohorts tile the arrival order with nobody missing or twice.
    assert [c.first for c in by_arrival] == [0] + [c.first + c.count for c in by_arrival[:-1]]
    released = [c.released_at if c.released_at is not None else c.admitted_at for c in by_arrival]
    assert released == sorted(released)  # released in arrival order
    for c in by_arrival:
        assert c.admitted_at >= c.arrived_at
        if c.released_at is not None:
            # A waiter is told to come back when its number should be out: it is let in then.
            assert 0 <= c.admitted_at - c.released_at <= 1.0 + result.step


def test_queueing_agrees_with_the_rate() -> None:
    rate = 100.0
    result = simulate(FLAT, Admission(rate=rate, burst=rate, max_active=10**6))
    # The last of 10,000 comes in after about 10,000 / 100 s.
    assert 99 <= result.finished_at <= 102
    # Person k arrives at k/1000 s and is out at about k/100 s: waits average 45 s, at most 90 s.
    assert result.mean_wait == pytest.approx(45, abs=2)
    assert result.wait_quantile(1.0) == pytest.approx(90, abs=2)
    assert fluid_max_wait(FLAT, rate) == pytest.approx(90, abs=1)
    assert rate_for_max_wait(FLAT, 90) == pytest.approx(rate, rel=0.02)
    # While the queue is long, admissions run at the rate.
    busy = [s for s in result.samples if 20 <= s.t <= 80]
    assert sum(s.admitted_per_s for s in busy) / len(busy) == pytest.approx(rate, rel=0.05)
    longest = max(s.longest_position for s in result.samples)
    assert 8800 <= longest <= 9100
    # Little's law: mean number waiting = arrival rate x mean wait, over the whole run.
    area = sum(s.waiting for s in result.samples) * 5.0
    assert area / 10_000 == pytest.approx(result.mean_wait, rel=0.1)


def test_the_cap_holds_the_rest_in_the_room() -> None:
    result = simulate(FLAT, Admission(rate=1000, burst=1000, max_active=4000), max_seconds=120)
    assert result.admitted == 4000
    assert result.samples[-1].waiting == 6000


def test_eight_million_plan() -> None:
    plan = make_plan(Stream(8_000_000), resolve({}, {}), Assumptions(), StormSpec())
    assert plan.storm.admitted == 8_000_000
    assert plan.storm.wait_quantile(1.0) <= 300 + 2
    assert plan.fleet.edges.deployed >= plan.fleet.edges.needed > 100
    assert plan.node_processes >= 1 and plan.redis_shards >= 1
    final = plan.load[-1]
    assert final.edge_utilisation <= plan.assumptions.utilisation
    assert {p.origin_requests_per_s for p in plan.load[5:]} == {plan.fleet.origin.requests_per_s}
    assert any("Redis" in note for note in plan.notes)


def test_a_measured_redis_key_ceiling_replaces_the_derived_one() -> None:
    redis = {
        "incr": {"per_redis_cpu_s": 200_000.0},
        "waiting_room_update": {
            "transaction_1": {"updates_per_redis_cpu_s": 5_000.0},
            "script_16": {"updates_per_redis_cpu_s": 20_000.0},
        },
    }
    a = Assumptions()
    derived = capacity.fleet_plan(Stream(10**6), resolve({}, {}), a)
    assert derived.redis_key_ceiling_per_s == pytest.approx(100_000 / 10 * 0.7)
    inputs = resolve({"redis.json": redis}, {})
    assert inputs["redis_ops_per_core"].value == 200_000.0
    assert inputs["redis_key_updates_per_s_script"].source.endswith("script_16.updates_per_redis_cpu_s")
    # The waiting room runs one Lua script per operation: its rate, not the transaction's.
    measured = capacity.fleet_plan(Stream(10**6), inputs, a)
    assert measured.redis_key_ceiling_per_s == pytest.approx(20_000 * 0.7)
    # The store's own script, when measured, is preferred to the stand-in script.
    redis["waiting_room_update"]["store_16"] = {"updates_per_redis_cpu_s": 12_000.0}
    store = resolve({"redis.json": redis}, {})
    assert store["redis_key_updates_per_s_script"].source.endswith("store_16.updates_per_redis_cpu_s")
    assert capacity.fleet_plan(Stream(10**6), store, a).redis_key_ceiling_per_s == pytest.approx(8_400)


def test_the_plan_splits_a_spaces_counters_when_one_thread_cannot_take_them() -> None:
    """The storm's busiest updates of one space's waiting-room counters, over what one Redis
    thread serialises, is the number of keys (on as many primaries) the counters need; a
    storm one thread takes needs no split."""
    inputs = resolve({}, {})
    a = Assumptions()
    plan = make_plan(Stream(8_000_000), inputs, a, StormSpec())
    ceiling = plan.fleet.redis_key_ceiling_per_s
    assert plan.hot_key_peak > ceiling
    assert plan.counter_splits == math.ceil(plan.hot_key_peak / ceiling)
    assert (plan.counter_splits - 1) * ceiling < plan.hot_key_peak <= plan.counter_splits * ceiling
    assert plan.redis_shards >= plan.counter_splits  # keys on one primary share its thread
    note = next(n for n in plan.notes if "waiting-room counters" in n)
    assert f"split over {plan.counter_splits} keys on {plan.counter_splits} Redis primaries" in note
    # Every admission request is one update of the counters plus the limit hits.
    busiest = max(plan.load, key=lambda p: p.admission_requests_per_s)
    assert busiest.hot_key_updates_per_s == busiest.admission_requests_per_s
    assert busiest.redis_commands_per_s == pytest.approx(
        busiest.admission_requests_per_s * (a.redis_limit_hits + 1)
    )
    # Returns read without a write leave first joins, admissions and renewals.
    assert 0 < busiest.hot_key_writes_if_returns_read_per_s < busiest.hot_key_updates_per_s

    small = make_plan(Stream(100_000), inputs, a, StormSpec(first_minute=10_000))
    assert small.hot_key_peak <= small.fleet.redis_key_ceiling_per_s
    assert small.counter_splits == 1
    assert not any("waiting-room counters" in n for n in small.notes)


def test_renewals_go_on_while_the_queue_drains_past_the_curve() -> None:
    result = simulate(FLAT, Admission(rate=100, burst=100, max_active=10**6, renew_every=20.0))
    late = [s for s in result.samples if s.t > 40]
    assert late and all(s.renewals_per_s > 0 for s in late)
    # Everyone in for 20 s or more renews every 20 s: about (admitted 20 s ago) / 20 a second.
    at = {s.t: s for s in result.samples}
    assert at[90].renewals_per_s == pytest.approx(at[70].admitted / 20, rel=0.15)


def test_ticket_checks_at_the_edge_cost_cpu() -> None:
    inputs = resolve({}, {})
    free = Assumptions(auth_subrequest_cost=0, ticket_cache_seconds=1e12)
    checked = Assumptions()
    unchecked = capacity.fleet_plan(Stream(10**6), inputs, free).edges
    edges = capacity.fleet_plan(Stream(10**6), inputs, checked).edges
    assert edges.listeners_by_cpu < unchecked.listeners_by_cpu
    assert edges.ticket_checks_per_s == pytest.approx(10**6 / 10)
    assert 0 < edges.verifier_share < 1


def test_the_edge_benchmark_is_preferred_for_the_edge_rate() -> None:
    edge = {
        "runs": [
            {"listeners": 100, "edge_requests": 1800, "window_s": 5.0, "edge_cores": 0.01},
            {"listeners": 10000, "edge_requests": 400_000, "window_s": 10.0, "edge_cores": 0.5},
        ]
    }
    figure = resolve({"edge.json": edge, "audience.json": AUDIENCE}, {})["edge_rps_per_core"]
    assert figure.value == pytest.approx(80_000)
    assert figure.source.startswith("edge.json: runs[listeners=10000]")
    small = {"runs": edge["runs"][:1]}  # a 100-listener run is too idle to read a core from
    fallback = resolve({"edge.json": small, "audience.json": AUDIENCE}, {})["edge_rps_per_core"]
    assert fallback.source.startswith("audience.json")
    assert resolve({"edge.json": small}, {})["edge_rps_per_core"].origin == "default"

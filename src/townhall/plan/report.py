"""The plan as text (every input and assumption first) and as a JSON document (pure)."""

from __future__ import annotations

import dataclasses
from typing import Any

from townhall.plan.capacity import MSS, TCP_IP_HEADER, TLS_OVERHEAD, origin_objects_per_edge
from townhall.plan.planner import Plan


def _n(x: float) -> str:
    return f"{x:,.0f}"


def render(plan: Plan) -> list[str]:
    """Lines a person reads: inputs with their sources, assumptions, then the answer."""
    s, a, f = plan.stream, plan.assumptions, plan.fleet
    one, edges, origin = f.listener, f.edges, f.origin
    st, adm, spec = plan.storm, plan.admission, plan.storm_spec
    out = [
        f"townhall plan: {_n(s.listeners)} listeners of one space, AAC {s.bitrate / 1000:g} kb/s, "
        f"parts {s.part_seconds:g} s, segments {s.segment_parts} parts ({s.segment_seconds:g} s)",
        "",
        "Inputs (measured on this machine where a result file has them):",
    ]
    for fig in plan.inputs.values():
        out.append(f"  {fig.name} = {fig.value:,.1f} {fig.unit}  [{fig.origin}: {fig.source}]")
    out += ["", "Assumptions (not measured; change with --inputs or the flags):"]
    out += [
        f"  edge machine: {a.edge_cores} cores, {a.edge_nic_gbps:g} Gb/s NIC, {a.edge_ram_gib:g} GiB RAM; "
        f"every resource used to at most {a.utilisation:.0%}",
        f"  edge CPU: the measured per-core rate x {a.edge_derate:g} (TLS, a real NIC and held "
        "reloads cost more than loopback keep-alive GETs)",
        f"  edge memory: {a.edge_kib_per_connection:g} KiB per listener connection (kept alive, TLS)",
        f"  tickets checked at the edge: each request's auth subrequest costs {a.auth_subrequest_cost:g} "
        f"of a request; the verifier is asked once per ticket per {a.ticket_cache_seconds:g} s",
        f"  spare: +{a.spare:.0%} edges and node processes beyond the need",
        "  a listener at the live edge: 1 blocking playlist reload and 1 part per part; no segments; "
        + (
            f"the web page polls the state document every {a.state_poll_seconds:g} s"
            if a.state_poll_seconds > 0
            else "no state polls"
        ),
        f"  HTTP: {a.response_header_bytes} B of response headers, {a.request_bytes} B per request "
        f"(with the ticket cookie); TLS 1.3 ({TLS_OVERHEAD} B per record), TCP/IP "
        f"({TCP_IP_HEADER} B per {MSS} B segment)",
        f"  tickets live {a.ticket_ttl_seconds:g} s and are renewed at {a.renew_at:.0%} of their life",
        f"  Redis per admission request (join, waiting-room return, renewal): {a.redis_limit_hits} "
        "limit hits + 1 call of the waiting-room script on the space's counters; a Redis primary "
        "runs them on one thread",
        f"  a townhall node process uses one core; machines of {a.node_cores} cores",
        f"  {a.spaces} space(s) through the edges (origin load counts each; the listeners are of one); "
        "a space's stage and packager are pinned to one media node, the origin of its objects",
        "",
        "Per listener:",
        f"  {one.requests_per_s:.2f} requests/s = {one.playlists_per_s:g} playlist reloads + "
        f"{one.parts_per_s:g} parts + {one.state_per_s:.2f} state polls",
        f"  {one.bytes_per_s * 8 / 1000:.1f} kb/s out of the edge on the wire (part {_n(one.part_bytes)} B "
        f"of media), {one.ingress_bytes_per_s * 8 / 1000:.1f} kb/s in; "
        f"{one.renewals_per_s * 3600:.1f} ticket renewals an hour, "
        f"{one.ticket_checks_per_s:g} ticket checks a second at the edge",
        "",
        "Edges:",
        f"  one edge holds {_n(edges.listeners_by_cpu)} listeners by CPU, "
        f"{_n(edges.listeners_by_nic)} by NIC, "
        f"{_n(edges.listeners_by_ram)} by connection memory: {_n(edges.listeners_per_edge)} "
        f"(limited by {edges.limited_by})",
        f"  edges: {edges.needed} needed, {edges.deployed} deployed with spare",
        f"  {_n(edges.requests_per_s)} requests/s; {edges.egress_gbps:,.1f} Gb/s out to listeners, "
        f"{edges.ingress_gbps:,.1f} Gb/s in; {_n(edges.ticket_checks_per_s)} ticket checks/s at the "
        f"edges' verifiers ({edges.verifier_share:.0%} of an edge's CPU)",
        "",
        "Origin (request collapsing: at most one request per object per edge):",
    ]
    for name, rate in origin_objects_per_edge(s, a).items():
        out.append(f"  {rate:g}/s per edge: {name}")
    out += [
        f"  {_n(origin.requests_per_s)} requests/s from {edges.deployed} edges, whatever the listener count; "
        f"{origin.cores:.2f} cores; {origin.share_of_media_node:.0%} of the space's one media node "
        f"process; {origin.egress_mbps:,.1f} Mb/s to the edges",
        "",
        f"The 8 PM storm: {spec.first_minute:,} joiners in the first minute, "
        f"{_n(s.listeners - spec.first_minute)} more by {spec.span_seconds / 60:g} minutes",
        f"  arrivals per second: {st.curve.describe()}",
        f"  fleet admission rate: {_n(adm.rate)} joins/s, burst {_n(adm.burst)}"
        + (
            f" (the lowest keeping every wait under {spec.max_wait_seconds:g} s)"
            if spec.admission_rate is None
            else " (given)"
        ),
        f"  waiting room: Retry-After = ceil(position / rate), at most {adm.max_retry_after} s; "
        f"nobody gives up or leaves",
        f"  everyone in by {st.finished_at:,.0f} s; wait p50 {st.wait_quantile(0.5):.0f} s, "
        f"p99 {st.wait_quantile(0.99):.0f} s, max {st.wait_quantile(1.0):.0f} s, mean {st.mean_wait:.0f} s",
        f"  longest queue {_n(max((x.longest_position for x in st.samples), default=0))}; "
        f"{_n(st.returns)} waiting-room returns",
        f"  busiest {plan.storm_spec.sample_every:g} s: "
        f"{_n(max((p.admission_requests_per_s for p in plan.load), default=0))} admission requests/s, "
        f"{_n(plan.redis_commands_peak)} Redis commands/s",
        "",
        "Fleet:",
        f"  edges (nginx): {edges.deployed}",
        f"  townhall node processes for admission: {plan.node_processes} "
        f"({plan.node_machines} machines of {a.node_cores} cores)",
        "  media node for the space (stage, packager, origin): 1, and a standby to re-home to",
        f"  Redis: {plan.redis_shards} primaries: {_n(plan.redis_commands_peak)} commands/s at the "
        f"peak ({plan.redis_cores_peak:.1f} Redis cores); the space's waiting-room counters take "
        f"{_n(plan.hot_key_peak)} updates/s against {_n(f.redis_key_ceiling_per_s)}/s on one "
        f"thread: split over {plan.counter_splits} key(s) on as many primaries"
        + (f" (waiting_room_splits = {plan.counter_splits})" if plan.counter_splits > 1 else ""),
        "  PostgreSQL: 1 primary (joins and renewals do not write to it; each node reads a space's "
        "state once a second)",
        f"  bandwidth: {edges.egress_gbps:,.1f} Gb/s from the edges, {origin.egress_mbps:,.1f} Mb/s "
        f"from the origin",
    ]
    if plan.notes:
        out += ["", "What the plan finds:"] + [f"  - {n}" for n in plan.notes]
    names = [*plan.inputs, *(f.name for f in dataclasses.fields(a))]
    out += ["", "An --inputs file is a JSON object setting any of: " + ", ".join(names)]
    return out


def to_json(plan: Plan) -> dict[str, Any]:
    """The plan as a JSON-ready document (the storm's samples and load included, cohorts not)."""
    st = plan.storm
    return {
        "stream": dataclasses.asdict(plan.stream),
        "inputs": {k: dataclasses.asdict(v) for k, v in plan.inputs.items()},
        "assumptions": dataclasses.asdict(plan.assumptions),
        "listener": dataclasses.asdict(plan.fleet.listener),
        "edges": dataclasses.asdict(plan.fleet.edges),
        "origin": dataclasses.asdict(plan.fleet.origin),
        "renewals_per_s": plan.fleet.renewals_per_s,
        "storm": {
            "spec": dataclasses.asdict(plan.storm_spec),
            "curve": [list(p) for p in st.curve.points],
            "admission": dataclasses.asdict(plan.admission),
            "finished_at": st.finished_at,
            "admitted": st.admitted,
            "returns": st.returns,
            "wait_s": {
                "p50": st.wait_quantile(0.5),
                "p99": st.wait_quantile(0.99),
                "max": st.wait_quantile(1.0),
                "mean": st.mean_wait,
            },
            "samples": [dataclasses.asdict(x) for x in st.samples],
            "load": [dataclasses.asdict(x) for x in plan.load],
        },
        "fleet": {
            "edges": plan.fleet.edges.deployed,
            "node_processes": plan.node_processes,
            "node_machines": plan.node_machines,
            "media_nodes": 1,
            "redis_shards": plan.redis_shards,
            "redis_cores_peak": plan.redis_cores_peak,
            "redis_counter_splits": plan.counter_splits,
            "redis_commands_peak": plan.redis_commands_peak,
            "redis_hot_key_peak": plan.hot_key_peak,
            "redis_key_ceiling": plan.fleet.redis_key_ceiling_per_s,
            "edge_egress_gbps": plan.fleet.edges.egress_gbps,
            "origin_egress_mbps": plan.fleet.origin.egress_mbps,
        },
        "notes": list(plan.notes),
    }

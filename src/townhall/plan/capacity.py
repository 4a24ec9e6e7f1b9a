"""Capacity arithmetic: listeners, bitrate and part duration into edges, origin, control nodes,
Redis and bandwidth (pure: functions of the inputs and assumptions, no I/O).

Theory of operation. A listener at the live edge of an LL-HLS stream makes, per part, one
blocking playlist reload (held by the edge until the part exists) and one part request; a
listener on the web page also polls the space's state document. Every one of those is the same
URL for every listener (tickets ride in a cookie the edge verifies itself), so the edges take the
whole audience and the origin sees at most one request per object per edge (request collapsing:
``proxy_cache_lock``). An edge is full at whichever comes first: its CPU, its NIC, or the memory
of the connections it holds. Admission (joins, waiting-room returns, ticket renewals) is not
cacheable: it reaches the townhall nodes and, for shared counters and limits, Redis.

Every admission request also updates its space's waiting-room counters: one call of the
waiting-room script (``admission/queue_store.py``) on the space's one hash. A Redis primary
runs commands on one thread, so however many primaries there are, one space's counters are
served by one thread at the rate measured for that script (``bench/bench_redis.py``); when a
storm asks for more, the fleet needs the space's counters split over several keys on as many
primaries, and the plan says how many (``waiting_room_splits``, ``admission/queue_store.py``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

from townhall.plan.inputs import MEDIA_BITRATE, Figure

MSS = 1448  # TCP payload per segment (1500 MTU, IPv4, timestamps)
TCP_IP_HEADER = 52
TLS_RECORD = 16384
TLS_OVERHEAD = 22  # TLS 1.3 AES-GCM: 5 B header, 16 B tag, 1 B content type


def wire_bytes(size: float) -> float:
    """Bytes on the wire for a response of ``size`` bytes (headers included) over TLS on TCP/IP."""
    return size + math.ceil(size / MSS) * TCP_IP_HEADER + math.ceil(size / TLS_RECORD) * TLS_OVERHEAD


@dataclasses.dataclass(frozen=True)
class Stream:
    """What is being served: listeners of one space, its bitrate and LL-HLS timing."""

    listeners: int
    bitrate: int = 64000
    part_seconds: float = 0.5
    segment_parts: int = 4

    @property
    def segment_seconds(self) -> float:
        return self.part_seconds * self.segment_parts


@dataclasses.dataclass(frozen=True)
class Assumptions:
    """Everything the plan assumes rather than measures; each is printed with the plan."""

    edge_cores: int = 16
    edge_nic_gbps: float = 10.0
    edge_ram_gib: float = 64.0
    utilisation: float = 0.7  # ceiling on any resource of any machine
    # Loopback wrk keep-alive GETs of plain HTTP cost less CPU than the real thing: TLS, a real
    # NIC's interrupts, held blocking reloads. The measured per-core rate is derated by this.
    edge_derate: float = 0.5
    edge_kib_per_connection: float = 32.0  # nginx connection + OpenSSL buffers, kept alive
    # Tickets are checked at the edge (deploy/nginx/ticket.md): every listener request makes an
    # auth_request subrequest, answered from nginx's cache (counted as this fraction of a
    # request), and the local verifier is asked once per ticket per cache lifetime.
    auth_subrequest_cost: float = 0.5
    ticket_cache_seconds: float = 10.0
    spare: float = 0.1  # extra machines on top of the need, so one failure costs no listener
    node_cores: int = 16  # a machine running townhall node processes (one process per core)
    response_header_bytes: int = 350
    request_bytes: int = 450  # request line, headers and the ticket cookie
    state_poll_seconds: float = 1.5  # the web page's poll of /state (0: players that do not)
    state_max_age: float = 1.0  # the state document's Cache-Control max-age
    ticket_ttl_seconds: float = 600.0
    renew_at: float = 0.8  # the page renews at this fraction of a ticket's life
    # Redis per admission request (a join, a waiting-room return, a renewal), as the admission
    # code makes them: 3 limit hits (address, /24 network, account or proof), then one call of
    # the waiting-room script on the space's counters (its GETBIT/SETBIT of a queue token's
    # number included).
    redis_limit_hits: int = 3
    redis_script_incrs: float = 10.0  # one script call's Redis CPU in INCRs, if not measured
    spaces: int = 1

    def per_edge_wire_limit_bps(self) -> float:
        return self.edge_nic_gbps * 1e9 * self.utilisation


@dataclasses.dataclass(frozen=True)
class Listener:
    """One listener's load at the edge."""

    playlists_per_s: float
    parts_per_s: float
    state_per_s: float
    part_bytes: float
    requests_per_s: float
    bytes_per_s: float  # egress on the wire, headers and framing included
    ingress_bytes_per_s: float
    renewals_per_s: float
    ticket_checks_per_s: float  # asked of the edge's verifier


@dataclasses.dataclass(frozen=True)
class EdgePlan:
    listeners_by_cpu: int
    listeners_by_nic: int
    listeners_by_ram: int
    listeners_per_edge: int
    limited_by: str
    needed: int
    deployed: int
    requests_per_s: float
    egress_gbps: float
    ingress_gbps: float
    ticket_checks_per_s: float  # across the fleet, at the edges' verifiers
    verifier_share: float  # of an edge's CPU spent in its verifier


@dataclasses.dataclass(frozen=True)
class OriginPlan:
    objects_per_s_per_edge: float
    requests_per_s: float
    cores: float
    share_of_media_node: float  # of one townhall node process: a space is pinned to one node
    egress_mbps: float


@dataclasses.dataclass(frozen=True)
class FleetPlan:
    stream: Stream
    listener: Listener
    edges: EdgePlan
    origin: OriginPlan
    renewals_per_s: float
    redis_key_ceiling_per_s: float
    notes: tuple[str, ...]


def listener_load(stream: Stream, inputs: Mapping[str, Figure], a: Assumptions) -> Listener:
    """Requests and bytes per second of one listener at the live edge."""
    media = inputs["media_bytes_per_second"].value * stream.bitrate / MEDIA_BITRATE
    part_bytes = media * stream.part_seconds
    playlists = 1.0 / stream.part_seconds  # one blocking reload per part
    parts = 1.0 / stream.part_seconds
    state = 1.0 / a.state_poll_seconds if a.state_poll_seconds > 0 else 0.0
    h = a.response_header_bytes
    egress = (
        playlists * wire_bytes(inputs["playlist_bytes"].value + h)
        + parts * wire_bytes(part_bytes + h)
        + state * wire_bytes(inputs["state_bytes"].value + h)
    )
    requests = playlists + parts + state
    return Listener(
        playlists_per_s=playlists,
        parts_per_s=parts,
        state_per_s=state,
        part_bytes=part_bytes,
        requests_per_s=requests,
        bytes_per_s=egress,
        ingress_bytes_per_s=requests * wire_bytes(a.request_bytes),
        renewals_per_s=1.0 / (a.ticket_ttl_seconds * a.renew_at),
        ticket_checks_per_s=1.0 / a.ticket_cache_seconds if a.ticket_cache_seconds > 0 else 0.0,
    )


def edge_plan(stream: Stream, one: Listener, inputs: Mapping[str, Figure], a: Assumptions) -> EdgePlan:
    """How many listeners one edge holds, by CPU, NIC and memory, and how many edges that needs."""
    nginx = (
        one.requests_per_s
        * (1 + a.auth_subrequest_cost)
        / (inputs["edge_rps_per_core"].value * a.edge_derate)
    )
    verifier = one.ticket_checks_per_s / (inputs["verifier_rps_per_core"].value * a.edge_derate)
    per_core = 1.0 / (nginx + verifier)
    measured = inputs["edge_listeners_per_core"].value
    if measured > 0:
        per_core = min(per_core, measured)
    by_cpu = int(per_core * a.edge_cores * a.utilisation)
    by_nic = int(a.per_edge_wire_limit_bps() / (one.bytes_per_s * 8))
    by_ram = int(a.edge_ram_gib * 2**20 * a.utilisation / a.edge_kib_per_connection)
    limits = {"CPU": by_cpu, "NIC": by_nic, "connection memory": by_ram}
    limited_by = min(limits, key=lambda k: limits[k])
    per_edge = max(1, limits[limited_by])
    needed = max(1, math.ceil(stream.listeners / per_edge))
    return EdgePlan(
        listeners_by_cpu=by_cpu,
        listeners_by_nic=by_nic,
        listeners_by_ram=by_ram,
        listeners_per_edge=per_edge,
        limited_by=limited_by,
        needed=needed,
        deployed=needed + math.ceil(needed * a.spare),
        requests_per_s=stream.listeners * one.requests_per_s,
        egress_gbps=stream.listeners * one.bytes_per_s * 8 / 1e9,
        ingress_gbps=stream.listeners * one.ingress_bytes_per_s * 8 / 1e9,
        ticket_checks_per_s=stream.listeners * one.ticket_checks_per_s,
        verifier_share=verifier / (nginx + verifier),
    )


def origin_objects_per_edge(stream: Stream, a: Assumptions) -> dict[str, float]:
    """Origin requests per second from one edge for one space, with collapsing: each object
    once. The plain playlist (a player's first load) is micro-cached by the edge for a part."""
    return {
        "parts": 1.0 / stream.part_seconds,
        "blocking playlists (one per _HLS_msn/_HLS_part key)": 1.0 / stream.part_seconds,
        "plain playlist (micro-cached one part)": 1.0 / stream.part_seconds,
        "segments (players behind the live edge)": 1.0 / stream.segment_seconds,
        "state document (max-age)": 1.0 / a.state_max_age if a.state_poll_seconds > 0 else 0.0,
    }


def origin_plan(
    stream: Stream, one: Listener, edges: EdgePlan, inputs: Mapping[str, Figure], a: Assumptions
) -> OriginPlan:
    """The origin's load: independent of listeners, proportional to edges (and spaces)."""
    objects = origin_objects_per_edge(stream, a)
    per_edge = sum(objects.values())
    requests = per_edge * edges.deployed * a.spaces
    playlist_share = 2.0 / stream.part_seconds / per_edge
    rate = 1.0 / (
        playlist_share / inputs["origin_playlist_rps_per_core"].value
        + (1 - playlist_share) / inputs["origin_part_rps_per_core"].value
    )
    cores = requests / rate
    h = a.response_header_bytes
    per_edge_bytes = (
        objects["parts"] * wire_bytes(one.part_bytes + h)
        + (2.0 / stream.part_seconds) * wire_bytes(inputs["playlist_bytes"].value + h)
        + objects["segments (players behind the live edge)"]
        * wire_bytes(one.part_bytes * stream.segment_parts + h)
        + objects["state document (max-age)"] * wire_bytes(inputs["state_bytes"].value + h)
    )
    return OriginPlan(
        objects_per_s_per_edge=per_edge,
        requests_per_s=requests,
        cores=cores,
        share_of_media_node=requests / a.spaces / rate,
        egress_mbps=per_edge_bytes * edges.deployed * a.spaces * 8 / 1e6,
    )


def counter_update_ceiling(inputs: Mapping[str, Figure], a: Assumptions) -> float:
    """Updates per second one Redis thread takes on one space's waiting-room counters, at the
    utilisation ceiling: the store's Lua script as measured; else the older WATCH/MULTI
    transaction as measured (a lower bound); else derived from the INCR rate."""
    script = inputs["redis_key_updates_per_s_script"].value
    transaction = inputs["redis_key_updates_per_s"].value
    if script > 0:
        per_cpu_s = script
    elif transaction > 0:
        per_cpu_s = transaction
    else:
        per_cpu_s = inputs["redis_ops_per_core"].value / a.redis_script_incrs
    return per_cpu_s * a.utilisation


@dataclasses.dataclass(frozen=True)
class RedisLoad:
    """What admission requests ask of Redis."""

    commands_per_s: float
    counter_updates_per_s: float  # waiting-room script calls, all on the space's counters
    cores: float  # Redis CPU-seconds a second: limit hits at the INCR rate, updates at the script's


def redis_load(admission_per_s: float, inputs: Mapping[str, Figure], a: Assumptions) -> RedisLoad:
    """Redis load of ``admission_per_s`` joins, waiting-room returns and renewals."""
    hits = admission_per_s * a.redis_limit_hits
    per_update = counter_update_ceiling(inputs, a) / a.utilisation
    return RedisLoad(
        commands_per_s=hits + admission_per_s,
        counter_updates_per_s=admission_per_s,
        cores=hits / inputs["redis_ops_per_core"].value + admission_per_s / per_update,
    )


def counter_splits(updates_per_s: float, inputs: Mapping[str, Figure], a: Assumptions) -> int:
    """Keys (each on its own primary: keys on one primary share its thread) one space's
    waiting-room counters must be split over to take ``updates_per_s``."""
    return max(1, math.ceil(updates_per_s / counter_update_ceiling(inputs, a)))


def redis_primaries(peak: RedisLoad, inputs: Mapping[str, Figure], a: Assumptions) -> int:
    """Redis primaries for the peak: enough CPU, and one per split of the space's counters."""
    by_cpu = math.ceil(peak.cores / a.utilisation)
    return max(1, by_cpu, counter_splits(peak.counter_updates_per_s, inputs, a))


def fleet_plan(stream: Stream, inputs: Mapping[str, Figure], a: Assumptions) -> FleetPlan:
    """Edges, origin and steady admission load for ``stream`` with everyone in."""
    if stream.listeners < 1 or stream.part_seconds <= 0 or stream.segment_parts < 1:
        raise ValueError("listeners, part duration and parts per segment must be positive")
    one = listener_load(stream, inputs, a)
    edges = edge_plan(stream, one, inputs, a)
    origin = origin_plan(stream, one, edges, inputs, a)
    notes = []
    playlist_share = (
        one.playlists_per_s * wire_bytes(inputs["playlist_bytes"].value + a.response_header_bytes)
    ) / one.bytes_per_s
    if playlist_share > 0.15:
        notes.append(
            f"playlists are {playlist_share:.0%} of what the edges send: compressing them at the edge, "
            "or delta updates (EXT-X-SKIP, RFC 8216bis 6.2.5.1), would cut that share"
        )
    return FleetPlan(
        stream=stream,
        listener=one,
        edges=edges,
        origin=origin,
        renewals_per_s=stream.listeners * one.renewals_per_s,
        redis_key_ceiling_per_s=counter_update_ceiling(inputs, a),
        notes=tuple(notes),
    )


def node_processes(requests_per_s: float, inputs: Mapping[str, Figure], a: Assumptions) -> int:
    """Townhall node processes (one core each) to answer ``requests_per_s`` admission requests."""
    return max(1, math.ceil(requests_per_s / (inputs["joins_per_core"].value * a.utilisation)))

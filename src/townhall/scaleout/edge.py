"""The listener edge: an nginx configuration that caches the origin's LL-HLS for everyone.

Theory of operation
-------------------
Every listener of a space asks for the same objects, so an edge in front of the origins turns
N identical requests into one:

- ``proxy_cache_key`` is the path plus ``_HLS_msn``/``_HLS_part`` only — never the ticket (it
  differs per listener and would defeat the cache); tickets are checked at the edge itself
  (the admission design's ``auth_request`` check, deploy/nginx/ticket.md, is included from
  ``ticket_dir``: its http-, server- and location-level parts, each where it belongs).
- ``proxy_cache_lock on``: while one request for an object is on its way to the origin, the
  others wait for its answer instead of going too. A blocking playlist reload is held at the
  origin for up to three target durations (6 s by default), so the lock's timeout and age are
  longer than that (``hold_seconds``); otherwise waiting requests would fall through to the
  origin uncached (the LL-HLS practice noted in the design).
- ``proxy_cache_min_uses 0``: nginx counts the lookups of an object in a 10-bit field of its
  cache node (``uses:10``). While an object is being fetched, the 1,024th request waiting for it
  wraps that count to 0, fails the "used at least ``min_uses`` times" test and is sent to the
  origin uncached, past the lock; so is every 1,024th after it. A blocking reload at the live
  edge has every listener of the edge waiting on one object, so at 10,000 listeners each part
  cost the origin ~10 playlist requests instead of one (bench/bench_edge.py, BENCHMARKS.md).
  With a minimum of 0 the test always passes and the lock holds however many wait; the one
  cost is that the node of an answer that was not stored stays in the keys zone until
  ``inactive`` expires it, instead of being freed at once.
- ``proxy_ignore_client_abort on``: when the listener whose request holds the lock has gone
  (a player closed, a connection dropped), nginx would still wait for the origin's answer and
  then throw it away unstored, failing to send its header; the next waiter's turn (its 500 ms
  lock poll) repeats that. Listeners leaving together at the live edge so cost the origin one
  request per leaver (hundreds a second in bench/bench_edge.py, where wrk's connections close
  at the end of each run while they wait; the nginx debug log shows each answer discarded).
  Ignoring the abort, the answer is read to the end and stored for everyone still waiting.
- A request waiting on the lock checks it every 500 ms (fixed in nginx), so a listener whose
  blocking reload was collapsed may get it up to half a second after the origin answered.
- Lifetimes come from the origin's ``Cache-Control`` (immutable parts and segments, a short
  life for playlists, cacheable blocking reloads); responses marked ``private`` (the one that
  hands a listener its ticket cookie) are never stored.
- ``proxy_cache_use_stale`` with ``updating`` and errors, and ``proxy_cache_background_update``:
  an origin hiccup or a slow refresh does not reach listeners; they get the last good copy.
- Upstream keep-alive, HTTP/1.1 to the origins; listener requests are balanced by the space's
  id (a consistent hash), so one space's objects are asked of one origin per edge — normally
  the node running its stage, which otherwise relays to it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence


@dataclasses.dataclass(frozen=True)
class EdgeSettings:
    origins: Sequence[str]  # "host:port" of each townhall node
    listen: str = "0.0.0.0:8081"  # an edge listens for the public
    prefix: str = "/var/lib/townhall-edge"  # cache, temp files, pid and logs live here
    workers: str = "auto"
    cache_size: str = "2g"
    hold_seconds: int = 10  # > the origin's longest blocking-reload hold (3 x target, 6 s)
    # The directory holding the edge's ticket check (deploy/nginx/ticket*.conf, ticket.md):
    # ticket-http.conf, ticket-server.conf and ticket.conf, included where each belongs.
    ticket_dir: str = ""


def main_context(prefix: str, workers: str, worker_connections: int) -> str:
    """The main context of an nginx run out of ``prefix`` (``nginx -p``): its error log and pid
    file live there, beside the cache and temp files, so it needs no system directory."""
    return (
        f"worker_processes {workers};\n"
        f"error_log {prefix}/error.log warn;\n"
        f"pid {prefix}/nginx.pid;\n"
        f"events {{ worker_connections {worker_connections}; }}"
    )


def temp_paths(prefix: str) -> str:
    """The http context's temp directories, all under ``prefix``/tmp: nginx's built-in ones are
    system directories its workers (dropped to "nobody") may not be able to write."""
    temp = f"{prefix}/tmp"  # noqa: S108 - the edge's own prefix, not the system /tmp
    return (
        f"    client_body_temp_path {temp}/body;\n"
        f"    proxy_temp_path {temp}/proxy;\n"
        f"    fastcgi_temp_path {temp}/fastcgi;\n"
        f"    uwsgi_temp_path {temp}/uwsgi;\n"
        f"    scgi_temp_path {temp}/scgi;"
    )


TEMPLATE = """\
# townhall listener edge (rendered by townhall.scaleout.edge; see docs/architecture.md).
{main_context}

http {{
{ticket_http}
    access_log off;
    server_tokens off;
    sendfile on;
    tcp_nodelay on;
    keepalive_requests 100000;
{temp_paths}

    proxy_cache_path {prefix}/cache levels=1:2 keys_zone=townhall_hls:64m max_size={cache_size}
                     inactive=10m use_temp_path=off;

    upstream townhall_hls {{
        hash $space consistent;
{servers}
        keepalive 64;
    }}

    upstream townhall_api {{
{servers}
        keepalive 64;
    }}

    server {{
        listen {listen};
{ticket_server}

        location ~ "^/hls/(?<space>[A-Za-z0-9]{{1,16}})/" {{
{ticket}
            proxy_pass http://townhall_hls;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $http_host;

            proxy_cache townhall_hls;
            proxy_cache_key "$uri|$arg__HLS_msn|$arg__HLS_part";
            proxy_cache_lock on;
            proxy_cache_min_uses 0;  # else every 1,024th waiter passes the lock (edge.py)
            proxy_ignore_client_abort on;  # a waiter's answer is stored even if it has left
            proxy_cache_lock_timeout {hold}s;
            proxy_cache_lock_age {hold}s;
            proxy_read_timeout {read_timeout}s;
            proxy_cache_use_stale error timeout updating http_500 http_502 http_503 http_504;
            proxy_cache_background_update on;
            proxy_cache_revalidate on;
            add_header X-Cache $upstream_cache_status always;
        }}

        location / {{
            proxy_pass http://townhall_api;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $http_host;
            proxy_set_header X-Forwarded-For $remote_addr;
            proxy_buffering off;
        }}
    }}
}}
"""

NO_TICKET_CHECK = (
    "            # No edge ticket check configured: cached objects are served to anyone who\n"
    "            # reaches this edge. Include the admission design's check here in production."
)


def render(settings: EdgeSettings) -> str:
    """The edge's ``nginx.conf``."""
    if not settings.origins:
        raise ValueError("an edge needs at least one origin")
    for origin in settings.origins:
        host, _, port = origin.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"an origin is host:port, not {origin!r}")
    servers = "\n".join(f"        server {o} max_fails=2 fail_timeout=2s;" for o in settings.origins)
    d = settings.ticket_dir.rstrip("/")
    ticket = f"            include {d}/ticket.conf;" if d else NO_TICKET_CHECK
    return TEMPLATE.format(
        main_context=main_context(settings.prefix, settings.workers, 8192),
        temp_paths=temp_paths(settings.prefix),
        prefix=settings.prefix,
        cache_size=settings.cache_size,
        servers=servers,
        listen=settings.listen,
        ticket=ticket,
        ticket_http=f"    include {d}/ticket-http.conf;"
        if d
        else "    # (no edge ticket check: see ticket_dir)",
        ticket_server=f"        include {d}/ticket-server.conf;" if d else "",
        hold=settings.hold_seconds,
        read_timeout=settings.hold_seconds + 5,
    )


# The file shipped in deploy/nginx/edge.conf: the compose fleet's edge (two nodes).
SHIPPED = EdgeSettings(
    origins=["node1:8080", "node2:8080"],
    listen="0.0.0.0:8081",
    prefix="/var/cache/townhall-edge",
    ticket_dir="/etc/nginx/townhall",
)

"""The load test's I/O edge: asyncio tasks with httpx clients bound to loopback addresses.

Every scenario is bounded: clients start on a :class:`~townhall.loadtest.schedule.Schedule`,
nobody acts after the run's deadline (its duration plus a drain for the waiting room), each
request has a timeout, and whatever is still running at the hard stop is cancelled. While it
runs, the node's ``/metrics`` is read twice a second for the stage's tick lateness and a
progress line is kept on stderr. At the end a JSON report and a PNG plot are written.

Source addresses: legitimate clients come from many 127.x.y.z addresses in distinct /24s (see
``loopback``), attackers from a few addresses of their own, so per-address and per-network
limits see what they would see in the field. Each address has one httpx transport (its own
connection pool); a listener also gets its own client (its own cookie jar) over that transport.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import datetime as dt
import ipaddress
import json
import logging
import multiprocessing
import os
import resource
import secrets
import socket
import ssl
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import anyio
import anyio.abc
import httpcore
import httpx
from httpcore._backends.anyio import AnyIOStream

from townhall.admission.pow import solve
from townhall.audience.listener import Listener, ListenError, PartAudio
from townhall.loadtest import plot
from townhall.loadtest.accounting import (
    REJECTED,
    Answer,
    JoinLedger,
    JoinRecord,
    Sampled,
    Timeline,
    classify,
    next_step,
    summarize,
    tick_lateness,
)
from townhall.loadtest.loopback import address_for, attack_address, check_target, legit_address
from townhall.loadtest.progress import Progress, render
from townhall.loadtest.schedule import Schedule

logger = logging.getLogger(__name__)

Clock = Callable[[], float]
# One TLS context for every transport: building one per source address (certificates loaded
# each time) would cost milliseconds apiece; loopback load is plain HTTP anyway.
_TLS = ssl.create_default_context()
MAX_SOURCES = 4096


def _own_cpu() -> float:
    """CPU seconds of this process and of its finished children (the proof-of-work workers)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


class LoadtestError(Exception):
    """The run cannot start (a refused target, an unknown space, bad numbers)."""


@dataclasses.dataclass(frozen=True)
class Common:
    """Settings every scenario shares (checked: a run is bounded in count and time)."""

    url: str
    space: str
    seconds: float
    out: Path = Path("loadtest-results")
    sources: int | None = None  # legitimate source addresses; default one per client, up to 4096
    timeout: float = 10.0
    drain: float = 10.0  # after the last start, how long queued joiners keep coming back
    progress: bool = True
    bucket: float | None = None  # time-bucket width of the report; default from the duration

    def __post_init__(self) -> None:
        if not 0 <= self.drain <= 3600:
            raise LoadtestError("--drain must be in [0, 3600] seconds")
        if not 0 < self.timeout <= 300:
            raise LoadtestError("--timeout must be in (0, 300] seconds")
        if self.sources is not None and not 1 <= self.sources <= MAX_SOURCES * 250:
            raise LoadtestError(f"--sources must be 1..{MAX_SOURCES * 250}")


@dataclasses.dataclass(frozen=True)
class ListenersPlan:
    common: Common
    n: int
    ramp: float | None = None  # joins spread over this long; default min(seconds / 4, 5)


@dataclasses.dataclass(frozen=True)
class StormPlan:
    common: Common
    n: int
    accounts: int = 0  # of the n joiners, this many are pre-registered accounts


@dataclasses.dataclass(frozen=True)
class FloodPlan:
    common: Common
    legit: int
    attack_factor: float
    attack_sources: int = 4
    attack_inflight: int = 1024
    accounts: int = 0


Plan = ListenersPlan | StormPlan | FloodPlan


# -- clients -------------------------------------------------------------------------------------


class BoundBackend(httpcore.AnyIOBackend):
    """httpcore's anyio backend, but binding a literal source address itself: anyio resolves
    ``local_host`` with ``getaddrinfo`` in a worker thread on every connection (measured here:
    ~0.2 ms and a thread hop each), which a storm of thousands of new connections pays for
    nothing."""

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,  # noqa: ASYNC109 - httpcore's interface
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        if local_address is None:
            return await super().connect_tcp(host, port, timeout, None, socket_options)
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for option in socket_options or ():
                sock.setsockopt(*option)
            sock.bind((local_address, 0))
            with anyio.fail_after(timeout):
                await asyncio.get_running_loop().sock_connect(sock, (host, port))
            stream = await anyio.abc.SocketStream.from_socket(sock)
        except TimeoutError as exc:
            sock.close()
            raise httpcore.ConnectTimeout(str(exc) or "connect timed out") from exc
        except OSError as exc:
            sock.close()
            raise httpcore.ConnectError(str(exc)) from exc
        return AnyIOStream(stream)


class Sources:
    """One httpx transport per source address (``None``: the system's choice), made on first use
    and all closed at the end."""

    def __init__(self, bind: bool, timeout: float) -> None:
        self.bind = bind
        self.timeout = httpx.Timeout(timeout, connect=min(timeout, 5.0))
        self._transports: dict[str | None, httpx.AsyncHTTPTransport] = {}
        self._clients: dict[str | None, httpx.AsyncClient] = {}

    def transport(self, address: str | None, keepalive: int = 64) -> httpx.AsyncHTTPTransport:
        key = address if self.bind else None
        t = self._transports.get(key)
        if t is None:
            # Idle connections are dropped before uvicorn's own 5 s keep-alive timeout closes them,
            # so that a joiner returning after Retry-After never races the server's close.
            limits = httpx.Limits(
                max_connections=None, max_keepalive_connections=keepalive, keepalive_expiry=4.0
            )
            t = self._transports[key] = httpx.AsyncHTTPTransport(verify=_TLS, limits=limits)
            if key is not None:
                # The same pool httpx builds, with the backend that binds without resolving.
                t._pool = httpcore.AsyncConnectionPool(
                    ssl_context=_TLS,
                    max_connections=limits.max_connections,
                    max_keepalive_connections=limits.max_keepalive_connections,
                    keepalive_expiry=limits.keepalive_expiry,
                    local_address=key,
                    network_backend=BoundBackend(),
                )
        return t

    def client(self, address: str | None, keepalive: int = 64) -> httpx.AsyncClient:
        """A shared client of this address (no cookies kept: joins need none); ``keepalive``
        idle connections kept for reuse (an attacker keeps all of its own: reconnecting would
        cost it as much as the node)."""
        key = address if self.bind else None
        c = self._clients.get(key)
        if c is None:
            self.transport(address, keepalive)
            c = self._clients[key] = self.own_client(address)
        return c

    def own_client(self, address: str | None) -> httpx.AsyncClient:
        """A client of its own (its own cookie jar) over the address's shared transport; not
        to be closed by its user (closing would close the transport): ``close`` does it."""
        return httpx.AsyncClient(transport=self.transport(address), timeout=self.timeout, trust_env=False)

    async def close(self) -> None:
        for t in self._transports.values():
            await t.aclose()


def _bindable(url: str) -> bool:
    """Source addresses in 127/8 can reach an IPv4 loopback target only."""
    host = urlsplit(url).hostname or ""
    return ipaddress.ip_address(host).version == 4


# -- one join ------------------------------------------------------------------------------------


def _float(text: str | None) -> float | None:
    try:
        return float(text) if text is not None else None
    except ValueError:
        return None


def answer_of(sent: float, received: float, r: httpx.Response) -> tuple[Answer, str | None]:
    """The :class:`Answer` of a join response, and the ticket when admitted."""
    code = ""
    token = ticket = None
    position = None
    estimate = None
    retry_after = _float(r.headers.get("retry-after"))
    try:
        body = r.json()
    except ValueError:
        body = None
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict):
            code = str(err.get("code", ""))
        if r.status_code == 202:
            token = body.get("queue_token")
            position = body.get("position")
            estimate = _float(str(body.get("estimated_wait_seconds")))
            retry_after = retry_after if retry_after is not None else _float(str(body.get("retry_after")))
        elif r.status_code == 200:
            ticket = body.get("ticket")
    answer = Answer(
        sent_at=sent,
        received_at=received,
        status=r.status_code,
        code=code,
        retry_after=retry_after,
        queue_token=str(token) if token else None,
        position=int(position) if isinstance(position, int) else None,
        estimated_wait=estimate,
    )
    return answer, str(ticket) if ticket else None


PowSolver = Callable[[str, int], Awaitable[str]]


@dataclasses.dataclass
class Joiner:
    """A well-behaved joiner: follows ``next_step`` until admitted, refused or out of time."""

    rec: JoinRecord
    http: httpx.AsyncClient
    base: str
    space: str
    ledger: JoinLedger
    deadline: float
    clock: Clock
    bearer: str | None = None
    solver: PowSolver | None = None
    ticket: str | None = None

    async def run(self) -> None:
        body: dict[str, str] = {}
        held: str | None = None
        headers = {"Authorization": f"Bearer {self.bearer}"} if self.bearer else {}
        url = f"{self.base}/api/v1/spaces/{self.space}/join"
        while True:
            sent = self.clock()
            try:
                r = await self.http.post(url, json=body or None, headers=headers)
            except httpx.HTTPError as exc:
                answer, ticket = Answer(sent, self.clock(), 0, code=type(exc).__name__), None
            else:
                answer, ticket = answer_of(sent, self.clock(), r)
            self.ledger.record(self.rec, answer)
            step = next_step(answer, held, self.deadline, solves_pow=self.solver is not None)
            if step.action == "done":
                self.ticket = ticket
                return
            if step.action == "stop":
                return
            if step.action == "solve":
                body = await self._solve()
                if not body:
                    return
                continue
            held = step.queue_token
            if held:
                body = {"queue_token": held}  # a return needs no proof of work
            await asyncio.sleep(max(0.0, step.at - self.clock()))

    async def _solve(self) -> dict[str, str]:
        assert self.solver is not None
        while True:  # a shed or limited challenge is waited out, as admission.client does
            try:
                r = await self.http.get(f"{self.base}/api/v1/pow/challenge")
                if r.status_code == 200:
                    challenge = r.json()
                    token, bits = str(challenge["challenge"]), int(challenge["difficulty"])
                    break
            except (httpx.HTTPError, ValueError, KeyError, TypeError):
                return {}
            wait = _float(r.headers.get("retry-after"))
            if r.status_code not in (429, 503) or wait is None or self.clock() + wait >= self.deadline:
                return {}
            await asyncio.sleep(wait)
        started = time.perf_counter()
        nonce = await self.solver(token, bits)
        self.rec.pow_solved += 1
        self.rec.pow_seconds += time.perf_counter() - started
        return {"pow_challenge": token, "pow_nonce": nonce}


class PowPool:
    """Solves proofs of work in worker processes (SHA-256 of short strings holds the GIL, so
    threads would stall the event loop). Made on first use."""

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self._pool: concurrent.futures.ProcessPoolExecutor | None = None

    def _executor(self) -> concurrent.futures.ProcessPoolExecutor:
        if self._pool is None:
            # Spawned, not forked: this process has threads (the event loop's executor).
            ctx = multiprocessing.get_context("spawn")
            self._pool = concurrent.futures.ProcessPoolExecutor(self.workers, mp_context=ctx)
        return self._pool

    async def warm(self) -> None:
        """Start the workers now (a spawned interpreter takes a second or so), so that the
        first proof asked for during the run is not also the slowest."""
        pool = self._executor()
        await asyncio.gather(
            *(asyncio.wrap_future(pool.submit(solve, "warm-up", 1)) for _ in range(self.workers))
        )

    async def __call__(self, token: str, bits: int) -> str:
        return await asyncio.wrap_future(self._executor().submit(solve, token, bits))

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)


# -- the run's common machinery ------------------------------------------------------------------


class Run:
    """Deadlines, the metrics sampler and the progress line of one scenario."""

    def __init__(self, scenario: str, common: Common, clock: Clock = time.time) -> None:
        self.scenario = scenario
        self.common = common
        self.base = check_target(common.url)
        self.clock = clock
        self.start = clock()
        self.sources = Sources(_bindable(self.base), common.timeout)
        # Legitimate joiners solve a proof of work when asked, in every scenario (the web page
        # and `townhall listen` do); the worker processes start only if one is asked for.
        self.solver = PowPool(max(1, min(2, os.cpu_count() or 1)))
        self.lateness = Sampled(self.start)
        self.progress = Progress() if common.progress else None
        self.fields: Callable[[], Mapping[str, object]] = dict
        self.total = common.seconds
        self.load_at_start = os.getloadavg()
        self.cpu_at_start = _own_cpu()
        self._tasks: set[asyncio.Task[Any]] = set()

    def begin(self, total: float) -> None:
        """The measured part starts now (after any setup, such as registering accounts)."""
        self.start = self.clock()
        self.lateness = Sampled(self.start)
        self.total = total
        self.load_at_start = os.getloadavg()
        self.cpu_at_start = _own_cpu()

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def bucket(self) -> float:
        if self.common.bucket:
            return self.common.bucket
        return 0.25 if self.total <= 15 else 0.5 if self.total <= 60 else 1.0

    async def close(self) -> None:
        await self.sources.close()
        self.solver.close()

    async def check_space(self) -> dict[str, Any]:
        http = self.sources.client(None)
        try:
            r = await http.get(f"{self.base}/api/v1/spaces/{self.common.space}")
        except httpx.HTTPError as exc:
            raise LoadtestError(f"cannot reach {self.base}: {exc!r}") from exc
        if r.status_code != 200:
            raise LoadtestError(f"space {self.common.space}: HTTP {r.status_code} {r.text[:200]}")
        space: dict[str, Any] = r.json()
        if space.get("state") != "live":
            raise LoadtestError(f"space {self.common.space} is {space.get('state')!r}, not live")
        return space

    async def _sample(self, stop: asyncio.Event) -> None:
        http = self.sources.client(None)
        while not stop.is_set():
            try:
                r = await http.get(f"{self.base}/metrics")
                values = tick_lateness(r.text) if r.status_code == 200 else {}
            except httpx.HTTPError:
                values = {}
            if values:
                self.lateness.add(self.clock(), values)
            else:
                self.lateness.failures += 1
            try:
                await asyncio.wait_for(stop.wait(), 0.5)
            except TimeoutError:
                pass

    async def _show(self, stop: asyncio.Event) -> None:
        assert self.progress is not None
        while not stop.is_set():
            self.progress.show(self._line())
            try:
                await asyncio.wait_for(stop.wait(), 0.2)
            except TimeoutError:
                pass

    def _line(self) -> str:
        return render(self.scenario, self.clock() - self.start, self.total, self.fields())

    async def drive(self, body: Coroutine[Any, Any, None], hard_stop: float) -> bool:
        """Run ``body`` with the sampler and progress beside it, cancelling everything spawned at
        ``hard_stop`` (an absolute time). True if it finished by itself."""
        stop = asyncio.Event()
        side = [asyncio.ensure_future(self._sample(stop))]
        if self.progress is not None:
            side.append(asyncio.ensure_future(self._show(stop)))
        finished = True
        try:
            await asyncio.wait_for(body, max(0.0, hard_stop - self.clock()))
        except TimeoutError:
            finished = False
        finally:
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            stop.set()
            await asyncio.gather(*side, return_exceptions=True)
            if self.progress is not None:
                self.progress.done(self._line())
        return finished

    async def start_on(self, schedule: Schedule, launch: Callable[[int], Coroutine[Any, Any, Any]]) -> None:
        """Start ``launch(i)`` for every ``i`` as the schedule makes it due."""
        started = 0
        while started < schedule.n:
            due = schedule.due(self.clock())
            while started < due:
                self.spawn(launch(started))
                started += 1
            nxt = schedule.next_at(started)
            if nxt is not None:
                await asyncio.sleep(max(0.0, min(nxt - self.clock(), 0.05)))

    async def wait_spawned(self) -> None:
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    def legit_pool(self, n: int) -> int:
        """Source addresses of legitimate clients: one each up to 4096 unless told; one only
        against ``::1`` (127.x.y.z addresses cannot reach it, so per-address limits bite)."""
        if not self.sources.bind:
            return 1
        return max(1, min(self.common.sources or min(n, MAX_SOURCES), MAX_SOURCES * 250))

    async def run_to_report(
        self, body: Coroutine[Any, Any, None], hard_stop: float, params: Mapping[str, Any]
    ) -> dict[str, Any]:
        """``drive`` the body, then the report's head: the scenario and its ``params``, the
        machine, the generator's CPU, how long it took and whether it finished by itself."""
        finished = await self.drive(body, hard_stop)
        report = self.header(params)
        report["elapsed"] = round(self.clock() - self.start, 3)
        report["finished_by_itself"] = finished
        return report

    def header(self, params: Mapping[str, Any]) -> dict[str, Any]:
        load = os.getloadavg()
        elapsed = max(1e-9, self.clock() - self.start)
        cpu = _own_cpu() - self.cpu_at_start
        return {
            "scenario": self.scenario,
            "target": self.base,
            "space": self.common.space,
            "started_at": dt.datetime.fromtimestamp(self.start, dt.UTC).isoformat(timespec="seconds"),
            "params": dict(params),
            "machine": {
                "cpus": os.cpu_count(),
                "loadavg_at_start": [round(x, 2) for x in self.load_at_start],
                "loadavg_at_end": [round(x, 2) for x in load],
                "note": "the load generator and the server share this machine's cores",
            },
            "generator_cpu": {
                "seconds": round(cpu, 3),
                "cores": round(cpu / elapsed, 3),
                "note": "this process and its proof-of-work workers; near 1 core, the generator "
                "(one event loop) is the bottleneck",
            },
        }

    def write(self, report: dict[str, Any], series: plot.Series) -> dict[str, Any]:
        out = self.common.out
        out.mkdir(parents=True, exist_ok=True)
        stamp = dt.datetime.fromtimestamp(self.start, dt.UTC).strftime("%Y%m%dT%H%M%S")
        stem = f"{self.scenario}-{stamp}-{secrets.token_hex(2)}"
        json_path, png_path = out / f"{stem}.json", out / f"{stem}.png"
        report["node_metrics"] = self.lateness.as_dict()
        report["files"] = {"json": str(json_path), "png": str(png_path)}
        plot.draw(png_path, f"townhall loadtest {self.scenario}", series, self.lateness)
        json_path.write_text(json.dumps(report, indent=2) + "\n")
        return report


async def _in_run(run: Run, scenario: Callable[[Run], Awaitable[dict[str, Any]]]) -> dict[str, Any]:
    """A scenario's report; the run's clients and proof workers closed whatever happens."""
    try:
        return await scenario(run)
    finally:
        await run.close()


async def _register(run: Run, count: int, deadline: float) -> list[str]:
    """``count`` fresh accounts, each registered and logged in from its own source address;
    their bearer tokens."""
    tag = secrets.token_hex(3)
    tokens: list[str] = []
    password = secrets.token_urlsafe(12)

    async def one(i: int) -> None:
        http = run.sources.client(legit_address(i % MAX_SOURCES))
        handle = f"lt{tag}{i}"
        try:
            r = await http.post(f"{run.base}/api/v1/accounts", json={"handle": handle, "password": password})
            if r.status_code != 201:
                raise LoadtestError(f"registering {handle}: HTTP {r.status_code} {r.text[:200]}")
            r = await http.post(f"{run.base}/api/v1/sessions", json={"handle": handle, "password": password})
            if r.status_code != 200:
                raise LoadtestError(f"logging in {handle}: HTTP {r.status_code} {r.text[:200]}")
        except httpx.HTTPError as exc:
            raise LoadtestError(f"registering {handle}: {exc!r}") from exc
        tokens.append(str(r.json()["token"]))

    sem = asyncio.Semaphore(8)

    async def bounded(i: int) -> None:
        async with sem:
            await one(i)

    try:
        await asyncio.wait_for(
            asyncio.gather(*(bounded(i) for i in range(count))), max(1.0, deadline - run.clock())
        )
    except TimeoutError:
        raise LoadtestError(f"registering {count} accounts took too long") from None
    return tokens


# -- join-storm and flood ------------------------------------------------------------------------


def _join_figures(ledger: JoinLedger, n: int) -> dict[str, Any]:
    outcomes = ledger.outcomes()
    honesty = ledger.honesty()
    pow_solved = [r.pow_seconds / r.pow_solved for r in ledger.records if r.pow_solved]
    return {
        "joiners": n,
        "outcomes": outcomes,
        "admitted_or_queued": outcomes["admitted"] + outcomes["queued"],
        "answers": ledger.answers(),
        "statuses": ledger.statuses(),
        "gave_up": ledger.gave_up(),
        "server_errors": ledger.answers()["server_error"],
        "latency": {
            "all": ledger.latency(),
            "admitted": ledger.latency(("admitted",)),
            "queued": ledger.latency(("queued",)),
        },
        "time_to_admission": ledger.time_to_admission(),
        "start_lag": ledger.start_lag(),
        "honesty": {**dataclasses.asdict(honesty), "honest": honesty.honest},
        "pow": {"solved": sum(r.pow_solved for r in ledger.records), "seconds_each": summarize(pow_solved)},
        "accounts": sum(1 for r in ledger.records if r.account),
    }


async def _storm(
    run: Run,
    ledger: JoinLedger,
    n: int,
    tokens: list[str],
    deadline: float,
    solver: PowSolver | None,
) -> None:
    pool = run.legit_pool(n)
    schedule = Schedule(n, run.common.seconds, run.clock())

    async def launch(i: int) -> None:
        address = legit_address(address_for(i, pool))
        bearer = tokens[i] if i < len(tokens) else None
        rec = ledger.joiner(address, account=bearer is not None)
        rec.due = schedule.start + schedule.offset(i)
        joiner = Joiner(
            rec,
            run.sources.client(address),
            run.base,
            run.common.space,
            ledger,
            deadline,
            run.clock,
            bearer,
            solver,
        )
        await joiner.run()

    await run.start_on(schedule, launch)


async def _storm_setup(
    run: Run, n: int, accounts: int, *, warm: bool = False
) -> tuple[list[str], JoinLedger, float]:
    """What join-storm and flood do before their clock starts: check the numbers and the
    space, register the accounts; then the run begins. The accounts' tokens, the ledger of
    legitimate joins and the deadline of the last return."""
    c = run.common
    _check_numbers(n, c.seconds)
    await run.check_space()
    tokens = await _register(run, min(accounts, n), run.clock() + 120) if accounts else []
    if warm:
        await run.solver.warm()  # attack mode will ask legitimate joiners for proofs
    run.begin(c.seconds + c.drain)
    return tokens, JoinLedger(run.start, run.bucket()), run.start + c.seconds + c.drain


def _storm_params(run: Run, n: int, accounts: int) -> dict[str, Any]:
    c = run.common
    return {"seconds": c.seconds, "drain": c.drain, "accounts": accounts, "sources": run.legit_pool(n)}


def _storm_fields(ledger: JoinLedger) -> Callable[[], Mapping[str, object]]:
    def fields() -> Mapping[str, object]:
        o = Counter(r.outcome for r in ledger.records)
        return {
            "joiners": len(ledger.records),
            "admitted": o["admitted"],
            "queued": o["queued"],
            "refused": o["refused"],
            "errors": o["error"],
        }

    return fields


async def join_storm(plan: StormPlan, clock: Clock = time.time) -> dict[str, Any]:
    """``n`` distinct joins spread over ``seconds``; queued joiners come back with their token
    after ``Retry-After`` until admitted or ``drain`` seconds after the last start."""
    return await _in_run(Run("join-storm", plan.common, clock), lambda run: _join_storm(run, plan))


async def _join_storm(run: Run, plan: StormPlan) -> dict[str, Any]:
    c = plan.common
    tokens, ledger, deadline = await _storm_setup(run, plan.n, plan.accounts)
    run.fields = _storm_fields(ledger)

    async def body() -> None:
        await _storm(run, ledger, plan.n, tokens, deadline, run.solver)
        await run.wait_spawned()

    params = {"n": plan.n, **_storm_params(run, plan.n, plan.accounts)}
    report = await run.run_to_report(body(), deadline + c.timeout + 1, params)
    report.update(_join_figures(ledger, plan.n))
    report["timeline"] = ledger.rows(run.clock())
    return run.write(report, plot.join_series(ledger.rows(run.clock())))


async def flood(plan: FloodPlan, clock: Clock = time.time) -> dict[str, Any]:
    """A legitimate storm (``legit`` joins over ``seconds``, solving proofs of work when asked)
    beside attackers at ``attack_factor`` times its rate from ``attack_sources`` addresses,
    who never solve anything and ignore ``Retry-After``."""
    return await _in_run(Run("flood", plan.common, clock), lambda run: _flood(run, plan))


async def _flood(run: Run, plan: FloodPlan) -> dict[str, Any]:
    c = plan.common
    if not 0 <= plan.attack_factor <= 100 or not 1 <= plan.attack_sources <= 1000:
        raise LoadtestError("--attack-factor must be in [0, 100] and --attack-sources 1..1000")
    tokens, ledger, deadline = await _storm_setup(run, plan.legit, plan.accounts, warm=True)
    attack = Timeline(run.start, run.bucket())
    attack_counts: Counter[str] = Counter()
    attack_latencies: list[float] = []
    attack_errors: Counter[str] = Counter()
    attack_n = round(plan.legit * plan.attack_factor)
    inflight = asyncio.Semaphore(plan.attack_inflight)
    url = f"{run.base}/api/v1/spaces/{c.space}/join"

    async def attacker(i: int) -> None:
        per_source = -(-plan.attack_inflight // plan.attack_sources)
        http = run.sources.client(attack_address(i % plan.attack_sources), keepalive=per_source)
        sent = run.clock()
        try:
            r = await http.post(url)
            code = ""
            if r.status_code >= 400:
                try:
                    code = str(r.json()["error"]["code"])
                except (ValueError, KeyError, TypeError):
                    code = ""
            kind = classify(r.status_code, code)
        except httpx.HTTPError as exc:
            kind = "transport"
            attack_errors[type(exc).__name__] += 1
        finally:
            inflight.release()
        now = run.clock()
        attack.add(now, kind, now - sent if kind != "transport" else None)
        attack_counts[kind] += 1
        if kind != "transport":
            attack_latencies.append(now - sent)

    async def attack_all() -> None:
        schedule = Schedule(attack_n, c.seconds, run.start)
        started = 0
        while started < attack_n and run.clock() < run.start + c.seconds:
            due = schedule.due(run.clock())
            while started < due:
                await inflight.acquire()  # saturated: the attack slows to what this client can send
                run.spawn(attacker(started))
                started += 1
            nxt = schedule.next_at(started)
            if nxt is not None:
                await asyncio.sleep(max(0.0, min(nxt - run.clock(), 0.05)))

    legit_fields = _storm_fields(ledger)

    def fields() -> Mapping[str, object]:
        sent = sum(attack_counts.values())
        turned = sum(attack_counts[k] for k in REJECTED)
        return {**legit_fields(), "attack sent": sent, "attack turned away": turned}

    run.fields = fields

    async def body() -> None:
        await asyncio.gather(_storm(run, ledger, plan.legit, tokens, deadline, run.solver), attack_all())
        await run.wait_spawned()

    params = {
        "legit": plan.legit,
        "attack_factor": plan.attack_factor,
        "attack_sources": [attack_address(i) for i in range(plan.attack_sources)],
        "attack_inflight": plan.attack_inflight,
        **_storm_params(run, plan.legit, plan.accounts),
    }
    report = await run.run_to_report(body(), deadline + c.timeout + 1, params)
    legit = _join_figures(ledger, plan.legit)
    outcomes = legit["outcomes"]
    legit["success_rate"] = round((outcomes["admitted"] + outcomes["queued"]) / max(1, plan.legit), 4)
    legit["admitted_rate"] = round(outcomes["admitted"] / max(1, plan.legit), 4)
    report["legit"] = legit
    sent = sum(attack_counts.values())
    answered = sent - attack_counts["transport"]
    report["attack"] = {
        "planned": attack_n,
        "sent": sent,
        "planned_rate": round(attack_n / c.seconds, 1),
        "sent_rate": round(sent / c.seconds, 1),
        "answers": {k: attack_counts[k] for k in sorted(attack_counts)},
        "turned_away": sum(attack_counts[k] for k in REJECTED),
        "rejection_rate": round(sum(attack_counts[k] for k in REJECTED) / max(1, answered), 4),
        "let_in": attack_counts["admitted"] + attack_counts["queued"],
        "transport_errors": dict(attack_errors),
        "latency": summarize(attack_latencies),
    }
    report["timeline"] = ledger.rows(run.clock())
    report["attack_timeline"] = attack.rows(run.clock())
    return run.write(report, plot.join_series(report["timeline"], report["attack_timeline"]))


# -- listeners -----------------------------------------------------------------------------------


async def listeners(plan: ListenersPlan, clock: Clock = time.time) -> dict[str, Any]:
    """``n`` LL-HLS listeners: each joins (waiting its turn if queued), then follows the live
    playlist with blocking reloads and fetches every part, for ``seconds`` from the first join.
    Part latency is the arrival of a part's last byte minus its wall-clock start
    (``audience.listener``)."""
    return await _in_run(Run("listeners", plan.common, clock), lambda run: _listeners(run, plan))


async def _listeners(run: Run, plan: ListenersPlan) -> dict[str, Any]:
    c = plan.common
    _check_numbers(plan.n, c.seconds)
    await run.check_space()
    run.begin(c.seconds)
    ramp = plan.ramp if plan.ramp is not None else min(c.seconds / 4, 5.0)
    if not 0 <= ramp <= c.seconds:
        raise LoadtestError("--ramp must be in [0, --seconds]")
    ledger = JoinLedger(run.start, run.bucket())
    parts = Timeline(run.start, run.bucket())
    latencies: list[float] = []
    results: list[dict[str, Any]] = []
    errors: Counter[str] = Counter()
    active = [0]
    end = run.start + c.seconds
    pool = run.legit_pool(plan.n)
    space_url = f"{run.base}/api/v1/spaces/{c.space}"

    def on_audio(part: PartAudio) -> None:
        lat = part.arrival.latency
        latencies.append(lat)
        parts.add(part.arrival.arrived, "part", lat)

    async def listener(i: int) -> None:
        address = legit_address(address_for(i, pool))
        http = run.sources.own_client(address)
        rec = ledger.joiner(address)
        rec.due = schedule.start + schedule.offset(i)
        joiner = Joiner(rec, http, run.base, c.space, ledger, end, run.clock, solver=run.solver)
        await joiner.run()
        if joiner.ticket is None:
            errors[f"join: {rec.outcome}"] += 1
            return
        follower = Listener(space_url, decode=False, http=http, on_audio=on_audio, clock=run.clock)
        follower.ticket = joiner.ticket
        active[0] += 1
        try:
            result = await follower.run(max(0.1, end - run.clock()))
        except ListenError as exc:
            errors[f"listen: {str(exc)[:80]}"] += 1
            return
        except httpx.HTTPError as exc:
            errors[f"listen: {type(exc).__name__}"] += 1
            return
        finally:
            active[0] -= 1
        results.append(
            {
                "parts": result.parts,
                "gaps": result.gaps,
                "rejoins": result.rejoins,
                "bytes": result.bytes,
                "reason": result.reason,
            }
        )

    def fields() -> Mapping[str, object]:
        lat = sorted(latencies[-2000:])
        p99 = f"{lat[min(len(lat) - 1, int(0.99 * len(lat)))]:.2f} s" if lat else "-"
        return {
            "joined": len(ledger.records),
            "playing": active[0],
            "parts": len(latencies),
            "recent p99": p99,
            "errors": sum(errors.values()),
        }

    run.fields = fields
    schedule = Schedule(plan.n, ramp, run.start)

    async def body() -> None:
        await run.start_on(schedule, listener)
        await run.wait_spawned()

    params = {"n": plan.n, "seconds": c.seconds, "ramp": ramp, "sources": pool}
    report = await run.run_to_report(body(), end + c.timeout + 2, params)
    report["joins"] = {
        "outcomes": ledger.outcomes(),
        "statuses": ledger.statuses(),
        "latency": ledger.latency(),
        "start_lag": ledger.start_lag(),
    }
    report["listeners"] = {
        "started": len(ledger.records),
        "followed": len(results),
        "with_parts": sum(1 for r in results if r["parts"]),
        "parts": sum(r["parts"] for r in results),
        "bytes": sum(r["bytes"] for r in results),
        "gaps": sum(r["gaps"] for r in results),
        "rejoins": sum(r["rejoins"] for r in results),
        "ended": dict(Counter(r["reason"] for r in results)),
    }
    report["part_latency"] = summarize(latencies)
    report["errors"] = dict(errors)
    report["timeline"] = parts.rows(run.clock())
    return run.write(report, plot.listener_series(report["timeline"], ledger.rows(run.clock())))


def _check_numbers(n: int, seconds: float) -> None:
    """Every run is bounded: at most a million clients, an hour, an hour of drain."""
    if n < 1 or n > 1_000_000:
        raise LoadtestError("the number of clients must be 1..1,000,000")
    if not 0 < seconds <= 3600:
        raise LoadtestError("--seconds must be in (0, 3600]")


def run_plan(plan: Plan) -> dict[str, Any]:
    """Run a scenario to its end (the command line's entry)."""
    if isinstance(plan, ListenersPlan):
        return asyncio.run(listeners(plan))
    if isinstance(plan, StormPlan):
        return asyncio.run(join_storm(plan))
    return asyncio.run(flood(plan))


def _ms(figures: Mapping[str, Any], key: str) -> str:
    value = figures.get(key)
    return f"{value * 1000:.1f} ms" if isinstance(value, float) else "-"


def summary(report: Mapping[str, Any]) -> str:
    """A few lines for a person: the headline figures and where the files are."""
    lines = [f"{report['scenario']} against {report['target']} ({report['elapsed']:.1f} s):"]
    figures: Mapping[str, Any] = report
    late = report["node_metrics"]["worst"]
    if report["scenario"] == "listeners":
        ls, lat = report["listeners"], report["part_latency"]
        lines.append(
            f"  {ls['started']} listeners, {ls['with_parts']} received parts: {ls['parts']} parts, "
            f"{ls['gaps']} gaps; behind live p50 {lat.get('p50', '-')} s, p99 {lat.get('p99', '-')} s, "
            f"max {lat.get('max', '-')} s; errors {sum(report['errors'].values())}"
        )
    else:
        figures = report["legit"] if report["scenario"] == "flood" else report
        o, lat = figures["outcomes"], figures["latency"]["all"]
        h = figures["honesty"]
        lines.append(
            f"  joiners {figures['joiners']}: admitted {o['admitted']}, queued {o['queued']}, "
            f"refused {o['refused']}, errors {o['error']}; "
            f"5xx other than shedding: {figures['server_errors']}"
        )
        lines.append(
            f"  join latency p50 {_ms(lat, 'p50')}, p99 {_ms(lat, 'p99')}; waiting room: "
            f"{h['queued_joiners']} queued, {h['admitted_from_queue']} admitted from it, "
            f"{'honest' if h['honest'] else 'NOT honest'} ({h['position_increases']} position rises, "
            f"{h['arrival_inversions']} arrival inversions, {h['order_violations']} order violations)"
        )
        if report["scenario"] == "flood":
            a = report["attack"]
            mode = report["node_metrics"]["attack_mode"]
            if mode["first_seen_at"] is not None:
                lines.append(
                    f"  attack mode seen on from {mode['first_seen_at']:.1f} s "
                    f"({mode['max_pow_bits']:.0f} bits at most)"
                )
            else:
                lines.append("  attack mode not seen on in /metrics")
            lines.append(
                f"  legitimate success {figures['success_rate']:.2%} "
                f"(admitted {figures['admitted_rate']:.2%}), "
                f"proofs solved {figures['pow']['solved']}; attack sent {a['sent']} ({a['sent_rate']}/s of "
                f"{a['planned_rate']}/s planned), turned away {a['rejection_rate']:.2%}, let in {a['let_in']}"
            )
    lag = (report["joins"] if report["scenario"] == "listeners" else figures)["start_lag"]
    gen = report["generator_cpu"]
    lines.append(
        f"  load generator: starts late by p50 {_ms(lag, 'p50')}, p99 {_ms(lag, 'p99')}; "
        f"{gen['cores']:.2f} cores busy"
    )
    during = report["node_metrics"]["during_run"]
    if during:
        lines.append(
            f"  stage this run: {during.get('ticks', 0):.0f} ticks, late by > 5 ms "
            f"{during.get('late>0.005', 0):.0f}, > 20 ms {during.get('late>0.02', 0):.0f}; "
            f"node's 10-minute p99 up to {_ms(late, '0.99')}, max {_ms(late, '1.0')}"
        )
        if during.get("seconds") and ("node_cpu" in during or "stage_cpu" in during):
            span = during["seconds"]
            busy = [
                f"{name} {during[key] / span:.2f} cores"
                for key, name in (("node_cpu", "HTTP process"), ("stage_cpu", "stage process"))
                if key in during
            ]
            lines.append(f"  node CPU: {', '.join(busy)}")
    lines.append(f"  report {report['files']['json']}, plot {report['files']['png']}")
    return "\n".join(lines)

"""What every benchmark here shares: tools, wrk, nginx serving the same bytes, and the server.

Loopback only: every server, peer and load generator started here listens on 127.0.0.1, and
every process started is stopped (its whole process group) when its ``with`` block ends.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from townhall.scaleout.edge import main_context, temp_paths

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
HOST = "127.0.0.1"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PASSWORD = "correct horse battery staple"  # throwaway accounts on a throwaway database
# A bench that signs up and logs in many accounts from one address: those limits out of its way.
GENEROUS = "1000000/minute"
MANY_ACCOUNTS_ENV = {
    "TOWNHALL_LOGIN_LIMIT_PER_ADDRESS": GENEROUS,
    "TOWNHALL_LOGIN_LIMIT_PER_ACCOUNT": GENEROUS,
    "TOWNHALL_SIGNUP_LIMIT_PER_ADDRESS": GENEROUS,
}

# Prints wrk's summary as one JSON line after the run; shared by every wrk invocation.
WRK_DONE_LUA = r"""
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {"requests":%d,"duration_us":%d,"bytes":%d,"connect":%d,"read":%d,' ..
    '"write":%d,"status":%d,"timeout":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,' ..
    '"max_us":%d,"mean_us":%.1f}\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write,
    e.status, e.timeout, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency.max, latency.mean))
end
"""


# -- results -----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Measurement:
    """One side of a comparison: a rate and its latency distribution."""

    name: str
    rps: float
    p50_ms: float
    p99_ms: float
    completed: int
    non_2xx: int = 0
    socket_errors: int = 0
    timeouts: int = 0
    settings: str = ""


@dataclasses.dataclass(frozen=True)
class Comparison:
    """Townhall beside its peer; ``ratio`` is townhall's rate over the peer's."""

    case: str
    townhall: Measurement
    peer: Measurement

    @property
    def ratio(self) -> float:
        return self.townhall.rps / self.peer.rps if self.peer.rps else float("nan")

    def as_json(self) -> dict[str, Any]:
        """The row a results file stores: both sides and the ratio (None without a peer rate)."""
        return {
            "case": self.case,
            "townhall": dataclasses.asdict(self.townhall),
            "peer": dataclasses.asdict(self.peer),
            "ratio": round(self.ratio, 5) if self.peer.rps else None,
        }


# -- helpers -----------------------------------------------------------------------------------


def find_tool(name: str) -> str | None:
    """``name`` on PATH, or in /usr/sbin where Debian puts nginx (often off a user's PATH)."""
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def http(
    method: str, url: str, body: dict[str, Any] | None = None, timeout: float = 10.0
) -> tuple[int, bytes]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return int(response.status), bytes(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def wait_ready(
    ready: Callable[[], bool],
    proc: subprocess.Popen[bytes],
    deadline_s: float,
    log: Path | None,
    what: str,
    every_s: float = 0.1,
) -> None:
    """Poll ``ready`` (an OSError from it counts as not yet) until it says True; fail early if
    ``proc``, the server it waits for, exits. ``what`` names what did not happen in time."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode}; log:\n{tail(log)}")
        with contextlib.suppress(OSError):
            if ready():
                return
        time.sleep(every_s)
    raise RuntimeError(f"{what} within {deadline_s} s; log:\n{tail(log)}")


def wait_http_ok(url: str, proc: subprocess.Popen[bytes], deadline_s: float, log: Path) -> None:
    """Poll ``url`` until it answers 200; fail early if ``proc`` exits."""
    wait_ready(
        lambda: http("GET", url, timeout=1.0)[0] == 200, proc, deadline_s, log, f"{url} did not answer 200"
    )


def tail(path: Path | None, lines: int = 30) -> str:
    if path is None:
        return "(no log)"
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def stop(proc: subprocess.Popen[bytes], grace_s: float = 5.0) -> None:
    """Ask the child (and its process group) to stop, then kill it if it lingers."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=grace_s)


def tool_version(cmd: Sequence[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10, check=False)
    except OSError:
        return "not found"
    text = (out.stdout + out.stderr).strip().splitlines()
    return text[0] if text else "unknown"


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


# -- wrk ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class WrkSettings:
    threads: int
    connections: int
    duration_s: int
    timeout_s: int

    def describe(self) -> str:
        return f"-t{self.threads} -c{self.connections} -d{self.duration_s}s --timeout {self.timeout_s}s"


def lua_long_string(text: str) -> str:
    level = "=" * 3
    assert f"]{level}]" not in text
    return f"[{level}[{text}]{level}]"


def write_lua(directory: Path, name: str, method: str = "GET", body: str | None = None) -> Path:
    parts = [f'wrk.method = "{method}"']
    if body is not None:
        parts.append(f"wrk.body = {lua_long_string(body)}")
        parts.append('wrk.headers["Content-Type"] = "application/json"')
    path = directory / f"{name}.lua"
    path.write_text("\n".join(parts) + "\n" + WRK_DONE_LUA)
    return path


def wrk_summary(
    url: str, script: Path, settings: WrkSettings, duration_s: int | None = None
) -> dict[str, Any]:
    """Run wrk with ``script`` and return the JSON of each ``BENCH_<NAME> {...}`` line it
    printed, by name: ``JSON`` (``WRK_DONE_LUA``'s summary) and any a script adds."""
    duration = settings.duration_s if duration_s is None else duration_s
    cmd = [
        "wrk",
        f"-t{settings.threads}",
        f"-c{settings.connections}",
        f"-d{duration}s",
        f"--timeout={settings.timeout_s}s",
        "-s",
        str(script),
        url,
    ]
    out = subprocess.run(
        cmd, capture_output=True, text=True, timeout=duration + settings.timeout_s + 30, check=False
    )
    if out.returncode != 0:
        raise RuntimeError(f"wrk failed ({out.returncode}): {out.stderr.strip()}")
    lines = {
        name.removeprefix("BENCH_"): json.loads(rest)
        for name, _, rest in (ln.partition(" ") for ln in out.stdout.splitlines())
        if name.startswith("BENCH_")
    }
    if "JSON" not in lines:
        raise RuntimeError(f"wrk printed no summary:\n{out.stdout}\n{out.stderr}")
    return lines


def measurement_of(name: str, raw: dict[str, Any], ok: int, settings: str) -> Measurement:
    """A ``Measurement`` from wrk's summary (``raw``), its rate counted from ``ok`` answers."""
    return Measurement(
        name=name,
        rps=ok / (raw["duration_us"] / 1e6),
        p50_ms=raw["p50_us"] / 1e3,
        p99_ms=raw["p99_us"] / 1e3,
        completed=raw["requests"],
        non_2xx=raw["status"],
        socket_errors=raw["connect"] + raw["read"] + raw["write"],
        timeouts=raw["timeout"],
        settings=settings,
    )


def run_wrk(
    name: str, url: str, script: Path, settings: WrkSettings, duration_s: int | None = None
) -> Measurement:
    duration = settings.duration_s if duration_s is None else duration_s
    raw = wrk_summary(url, script, settings, duration)["JSON"]
    described = settings.describe().replace(f"-d{settings.duration_s}s", f"-d{duration}s")
    return measurement_of(name, raw, raw["requests"] - raw["status"], f"wrk {described}")


# -- nginx -------------------------------------------------------------------------------------


NGINX_CONF = """\
{main_context}
http {{
    access_log off;
    server_tokens off;
    etag off;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 1000000;
{temp_paths}
    types {{ {types} }}
    default_type application/json;
    server {{
        listen {host}:{port};
        root {prefix}/html;
    }}
}}
"""


def nginx_command(prefix: Path, conf: Path) -> list[str]:
    """nginx in the foreground with ``conf``, its paths and error log under ``prefix``."""
    return [
        find_tool("nginx") or "nginx",
        "-p",
        str(prefix),
        "-c",
        str(conf),
        "-e",
        str(prefix / "error.log"),
        "-g",
        "daemon off;",
    ]


@contextlib.contextmanager
def nginx_serving(
    files: dict[str, bytes], workers: str, workdir: Path, types: Mapping[str, str] | None = None
) -> Iterator[str]:
    """Start nginx serving ``files`` (URL path -> body) from disk; yield its base URL. ``types``
    maps file extensions to MIME types (default: everything is application/json)."""
    prefix = workdir / "nginx"
    for sub in ("html", "tmp"):
        (prefix / sub).mkdir(parents=True, exist_ok=True)
    for url_path, body in files.items():
        target = prefix / "html" / url_path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(body)
    # Workers drop root for "nobody": let them read the tree (mkdtemp makes it 0700).
    for path in [workdir, *workdir.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    port = free_port()
    conf = prefix / "nginx.conf"
    mime = " ".join(f"{kind} {ext};" for ext, kind in (types or {}).items())
    conf.write_text(
        NGINX_CONF.format(
            main_context=main_context(str(prefix), workers, 1024),
            temp_paths=temp_paths(str(prefix)),
            prefix=prefix,
            host=HOST,
            port=port,
            types=mime,
        )
    )
    log = prefix / "stderr.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            nginx_command(prefix, conf), stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        base = f"http://{HOST}:{port}"
        wait_http_ok(base + next(iter(files)), proc, 10.0, log)
        yield base
    finally:
        stop(proc)


# -- townhall ----------------------------------------------------------------------------------


@dataclasses.dataclass
class Server:
    """A ``townhall serve`` child: its base URL and process (the leader of its own session)."""

    base: str
    proc: subprocess.Popen[bytes]

    def cpu_seconds(self) -> float:
        """utime + stime of every process in the server's session."""
        return session_cpu_seconds(self.proc.pid)


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


@contextlib.contextmanager
def townhall_server(
    data: Path,
    log: Path,
    env: Mapping[str, str],
    *,
    ready_s: float = 30.0,
    grace_s: float = 5.0,
    append: bool = False,
    warn: Callable[[str], None] = _stderr,
) -> Iterator[Server]:
    """``townhall serve`` on a free loopback port with ``data`` and ``env`` added to this
    process's environment; yields it once ``/healthz`` answers 200, stops it afterwards."""
    exe = Path(sys.executable).parent / "townhall"
    prefix = [str(exe)] if exe.exists() else [sys.executable, "-m", "townhall"]
    port = free_port()
    cmd = [*prefix, "serve", "--host", HOST, "--port", str(port), "--data", str(data)]
    with log.open("ab" if append else "wb") as out:
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **env}, start_new_session=True
        )
    try:
        base = f"http://{HOST}:{port}"
        wait_http_ok(base + "/healthz", proc, ready_s, log)
        yield Server(base, proc)
    finally:
        stop(proc, grace_s=grace_s)
        if proc.returncode not in (0, -signal.SIGTERM):
            warn(f"warning: townhall exited with {proc.returncode}; log tail:\n{tail(log)}")


# -- the machine -------------------------------------------------------------------------------


def session_cpu_seconds(sid: int) -> float:
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            # After the command: state ppid pgrp session ... utime (14th field) stime (15th).
            if int(fields[3]) == sid:
                total += int(fields[11]) + int(fields[12])
    return total / CLK_TCK


def session_rss_bytes(sid: int) -> int:
    """Resident memory of every process in session ``sid`` (VmRSS, summed)."""
    total = 0
    for status in Path("/proc").glob("[0-9]*/status"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            stat = (status.parent / "stat").read_text().rsplit(")", 1)[1].split()
            if int(stat[3]) != sid:
                continue
            for line in status.read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
    return total


def busy_cpu_s() -> float:
    """CPU seconds the whole machine has spent busy (all cores), from /proc/stat."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    return (sum(fields) - fields[3] - fields[4]) / CLK_TCK


def own_cpu_s() -> float:
    """CPU seconds of this process and of its children that have been waited for."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def wait_quiet(limit_s: float, busy_share: float = 0.15, quiet_samples: int = 3) -> float:
    """Wait up to ``limit_s`` for ``quiet_samples`` one-second samples below ``busy_share`` of the
    machine's CPU; return the seconds waited."""
    start, quiet = time.monotonic(), 0
    cores = os.cpu_count() or 1
    while quiet < quiet_samples and time.monotonic() - start < limit_s:
        before = busy_cpu_s()
        time.sleep(1.0)
        quiet = quiet + 1 if (busy_cpu_s() - before) / cores < busy_share else 0
    return time.monotonic() - start


def machine_facts(*tools: str) -> dict[str, Any]:
    """What every results file says of the machine: cores, CPU, platform, Python, and the
    version line of each peer tool named (``wrk``, ``nginx``)."""
    facts: dict[str, Any] = {
        "cpus": os.cpu_count(),
        "cpu_model": cpu_model(),
        "platform": platform.platform(),
        "python": platform.python_version(),
    }
    for tool in tools:
        facts[tool] = tool_version([find_tool(tool) or tool, "-v"])
    return facts


def memory_gib() -> float:
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    return 0.0


def git_state() -> dict[str, Any]:
    def git(*args: str) -> str:
        out = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=False)
        return out.stdout.strip()

    return {"commit": git("rev-parse", "HEAD"), "modified": git("status", "--porcelain", "src").splitlines()}


# -- reporting ---------------------------------------------------------------------------------


def fmt_rate(rate: float) -> str:
    return f"{rate:,.1f}" if rate < 100 else f"{rate:,.0f}"


def fmt_ratio(ratio: float) -> str:
    return f"{ratio:.2f}" if ratio >= 0.1 else f"{ratio:.3f}"


def errors_of(m: dict[str, Any]) -> int:
    return int(m["non_2xx"] + m["socket_errors"] + m["timeouts"])


def comparison_table(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Markdown rows of ``Comparison.as_json`` results: both sides' absolute figures, the
    ratio, and failed requests."""
    lines = [
        "| case | townhall req/s | p50 ms | p99 ms | peer | peer req/s | peer p50 ms | peer p99 ms "
        "| ratio | failed (townhall / peer) |",
        "|" + "---|" * 10,
    ]
    for r in rows:
        t, p = r["townhall"], r["peer"]
        ratio = fmt_ratio(r["ratio"]) if r["ratio"] is not None else "n/a"
        lines.append(
            f"| {r['case']} | {fmt_rate(t['rps'])} | {t['p50_ms']:.1f} | {t['p99_ms']:.1f} "
            f"| {p['name']} | {fmt_rate(p['rps'])} | {p['p50_ms']:.1f} | {p['p99_ms']:.1f} "
            f"| {ratio} | {errors_of(t)} / {errors_of(p)} |"
        )
    return lines


def write_json(path: Path, data: Any) -> Path:
    """A results file: ``data`` as indented JSON with a final newline (its folder made first)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


def say(message: str) -> None:
    """A line of a benchmark's report, on stdout at once (runs are long; the log is watched)."""
    print(message, flush=True)


def shown(path: Path) -> str:
    """``path`` as a report prints it: relative to the repository when inside it."""
    return str(path.relative_to(REPO) if path.is_relative_to(REPO) else path)


def pyplot() -> Any:
    """matplotlib's pyplot on the file-only Agg backend (no display), imported on first use."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: Path, *, dpi: int, title: str | None = None, title_size: float = 10) -> None:
    """Write ``fig`` to ``path`` at ``dpi`` under ``title`` (its suptitle, when given) and close
    it: pyplot keeps every figure it made open until told."""
    if title is not None:
        fig.suptitle(title, fontsize=title_size)
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)


def plot_pair(ax: Any, names: Sequence[str], townhall: dict[str, Any], peer: dict[str, Any]) -> None:
    """Townhall's and its peer's rates as two bars on ``ax``, each labelled with its rate, p50
    and p99 (``Measurement`` fields)."""
    bars = ax.bar(list(names), [townhall["rps"], peer["rps"]], color=["#3b6ea8", "#9aa5b1"], width=0.6)
    for bar, m in zip(bars, (townhall, peer), strict=True):
        ax.annotate(
            f"{fmt_rate(m['rps'])}/s\np50 {m['p50_ms']:.1f} ms\np99 {m['p99_ms']:.1f} ms",
            (bar.get_x() + bar.get_width() / 2, bar.get_height()),
            ha="center",
            va="bottom",
            fontsize=8,
            xytext=(0, 2),
            textcoords="offset points",
        )
    ax.set_ylim(0, max(townhall["rps"], peer["rps"]) * 1.35)


# -- command line ------------------------------------------------------------------------------


def add_wrk_options(
    parser: argparse.ArgumentParser, *, duration: int, warmup: int, connections: int, reads: str = ""
) -> None:
    """The options every wrk-driven benchmark takes, with its defaults; ``reads`` names what
    the ``--connections`` are for in the help."""
    parser.add_argument(
        "--duration", type=int, default=duration, help=f"seconds per measured wrk run (default {duration})"
    )
    parser.add_argument(
        "--warmup", type=int, default=warmup, help=f"uncounted warm-up seconds per run (default {warmup})"
    )
    parser.add_argument("--threads", type=int, default=2, help="wrk threads (default 2)")
    parser.add_argument(
        "--connections",
        type=int,
        default=connections,
        help=f"wrk connections{' for ' + reads if reads else ''} (default {connections})",
    )
    parser.add_argument("--timeout", type=int, default=10, help="wrk request timeout, s (default 10)")
    parser.add_argument("--nginx-workers", default="1", help="nginx worker_processes: N or auto (default 1)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results directory (default bench/results)")


def tools_missing(bench: str, *tools: str) -> bool:
    """Say on stderr how to install the ``tools`` not found; True when any is missing."""
    missing = [tool for tool in tools if find_tool(tool) is None]
    if missing:
        print(
            f"{bench}: {' and '.join(missing)} not found; install with:\n"
            f"    apt-get update && apt-get install -y {' '.join(missing)}",
            file=sys.stderr,
        )
    return bool(missing)

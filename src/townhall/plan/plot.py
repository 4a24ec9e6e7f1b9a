"""The storm as a PNG (matplotlib, from the ``bench`` extra; imported only when plotting)."""

from __future__ import annotations

from pathlib import Path

from townhall.plan.planner import Plan


def write_png(plan: Plan, path: Path) -> None:
    """Six panels over the storm: arrivals and admissions, the waiting room, waits, edge load,
    origin load beside the audience, admission requests and Redis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    st, load = plan.storm, plan.load
    minutes = [p.t / 60 for p in load]
    samples = st.samples
    fig, axes = plt.subplots(2, 3, figsize=(17, 9), layout="constrained")

    ax = axes[0][0]
    ax.plot(minutes, [s.joins_per_s for s in samples], label="first joins/s (arrivals)", color="#c47a2c")
    ax.plot(minutes, [s.admitted_per_s for s in samples], label="admitted/s", color="#3b6ea8")
    ax.axhline(plan.admission.rate, color="#3b6ea8", ls=":", lw=1, label="fleet admission rate")
    ax.set_ylabel("per second")
    ax2 = ax.twinx()
    ax2.plot(minutes, [s.arrived / 1e6 for s in samples], color="#c47a2c", ls="--", label="arrived (M)")
    ax2.plot(minutes, [s.admitted / 1e6 for s in samples], color="#3b6ea8", ls="--", label="in (M)")
    ax2.set_ylabel("millions (dashed)")
    ax.set_title("arrivals and admissions", fontsize=10)
    ax.legend(fontsize=7, loc="upper right")
    ax2.legend(fontsize=7, loc="center right")

    ax = axes[0][1]
    ax.plot(minutes, [s.waiting / 1e6 for s in samples], label="waiting (M)", color="#8a3b8f")
    ax.plot(
        minutes, [s.longest_position / 1e6 for s in samples], label="longest position (M)", color="#d08fd4"
    )
    ax.set_ylabel("millions")
    ax2 = ax.twinx()
    ax2.plot(
        minutes, [s.oldest_wait for s in samples], color="#555", ls="--", label="oldest waiter's wait (s)"
    )
    ax2.set_ylabel("seconds (dashed)")
    ax.set_title("the waiting room", fontsize=10)
    ax.legend(fontsize=7, loc="upper left")
    ax2.legend(fontsize=7, loc="upper right")

    ax = axes[0][2]
    waits = sorted((c.wait, c.count) for c in st.cohorts)
    total = sum(n for _, n in waits) or 1
    xs, ys, seen = [], [], 0
    for w, n in waits:
        seen += n
        xs.append(w)
        ys.append(seen / total)
    ax.plot(xs, ys, color="#3b6ea8")
    ax.axvline(plan.storm_spec.max_wait_seconds, color="#c44", ls="--", lw=1, label="longest wait allowed")
    ax.set_xlabel("wait from first join to admission, s")
    ax.set_ylabel("fraction of joiners")
    ax.set_title(f"waits: p50 {st.wait_quantile(0.5):.0f} s, p99 {st.wait_quantile(0.99):.0f} s", fontsize=10)
    ax.legend(fontsize=7)

    ax = axes[1][0]
    edges = plan.fleet.edges
    ax.plot(
        minutes,
        [p.edge_utilisation * 100 for p in load],
        color="#2a7f62",
        label=f"edge {edges.limited_by}, %",
    )
    ax.axhline(plan.assumptions.utilisation * 100, color="#c44", ls=":", lw=1, label="utilisation ceiling")
    ax.set_ylim(0, 100)
    ax.set_ylabel(f"edge {edges.limited_by} in use, % (spread evenly)")
    ax2 = ax.twinx()
    ax2.plot(minutes, [p.edge_gbps for p in load], color="#999", ls="--", label="Gb/s out of the edges")
    ax2.set_ylabel("Gb/s (dashed)")
    ax2.set_ylim(bottom=0)
    ax.set_title(
        f"{plan.fleet.edges.deployed} edges, {plan.fleet.edges.listeners_per_edge:,} listeners each at the "
        f"ceiling",
        fontsize=10,
    )
    ax.legend(fontsize=7, loc="upper left")
    ax2.legend(fontsize=7, loc="lower right")

    ax = axes[1][1]
    ax.plot(
        minutes, [p.edge_requests_per_s / 1e6 for p in load], color="#2a7f62", label="edge requests/s (M)"
    )
    ax.set_ylabel("edge requests/s, millions")
    ax2 = ax.twinx()
    ax2.plot(minutes, [p.origin_requests_per_s for p in load], color="#c44", label="origin requests/s")
    ax2.set_ylabel("origin requests/s")
    top = max((p.origin_requests_per_s for p in load), default=1.0)
    ax2.set_ylim(0, top * 3 or 1)
    ax.set_title("collapsing: the origin follows edges, not listeners", fontsize=10)
    ax.legend(fontsize=7, loc="upper left")
    ax2.legend(fontsize=7, loc="lower right")

    ax = axes[1][2]
    ax.stackplot(
        minutes,
        [s.joins_per_s / 1e3 for s in samples],
        [s.returns_per_s / 1e3 for s in samples],
        [s.renewals_per_s / 1e3 for s in samples],
        labels=["first joins", "waiting-room returns", "ticket renewals"],
        colors=["#c47a2c", "#d08fd4", "#8fb3d9"],
    )
    ceiling = plan.fleet.redis_key_ceiling_per_s / 1e3
    ax.axhline(ceiling, color="#c44", ls="--", lw=1, label="counter updates one Redis thread takes")
    ax.set_ylabel("admission requests/s, thousands")
    ax2 = ax.twinx()
    ax2.plot(
        minutes, [p.redis_commands_per_s / 1e3 for p in load], color="#333", lw=1, label="Redis commands/s"
    )
    ax2.set_ylabel("Redis commands/s, thousands")
    ax2.set_ylim(bottom=0)
    ax.set_title(
        f"{plan.node_processes} node processes, {plan.redis_shards} Redis primaries, "
        f"counters split {plan.counter_splits} ways",
        fontsize=10,
    )
    ax.legend(fontsize=7, loc="upper right")
    ax2.legend(fontsize=7, loc="center right")

    for row in axes:
        for ax in row:
            ax.grid(alpha=0.3)
    for ax in (axes[0][0], axes[0][1], axes[1][0], axes[1][1], axes[1][2]):
        ax.set_xlabel("minutes after 8 PM")
    s = plan.stream
    fig.suptitle(
        f"townhall plan: {s.listeners:,} listeners, {s.bitrate / 1000:g} kb/s, {s.part_seconds:g} s parts; "
        f"join storm of {plan.storm_spec.first_minute:,} in the first minute, admitted at "
        f"{plan.admission.rate:,.0f}/s",
        fontsize=11,
    )
    fig.savefig(path, dpi=110)
    plt.close(fig)

"""``cometd-bench idle``: what an idle connection costs, per connection mode.

Ramps one fresh server per connection mode (and nginx + nchan as a peer, when
installed) to N idle streams and measures server RSS, kernel slab and
socket-buffer memory, and the ramp rate.

Theory of operation
-------------------
*Per-connection memory.* "Before" is the median of ``--measure`` seconds of
samples before the ramp starts, "at N" the median of ``--measure`` seconds of
samples from ``--settle`` seconds after the server reports all N connections;
the difference divided by the connections actually held is the per-connection
figure. Medians, because the kernel counters are system-wide and move with
whatever else the machine does. Clients close with RST (``floodtest
--rst-close``) so no TIME_WAIT sockets are left to skew the next server's
kernel figures, and each server waits (``--quiet-wait``) for TIME_WAIT sockets
of earlier runs to drain.

*Ramp rate.* While floodtest ramps, the bench polls the server's own count
every 50 ms; the ramp rate is reported first to last (connections held / time
from the first connection seen to all N) and as the slope between 10% and 90%
of N, which leaves out a slow start or a slow tail.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import click

from cometd.loadtest.procs import SOURCE_IPS, end_floodtest, floodtest, log, raise_nofile, stop_all
from cometd.loadtest.report import (
    COLORS,
    KIB,
    command_line,
    finish_info,
    fmt,
    machine_info,
    machine_lines,
    out_option,
    pyplot,
    resolve_out,
    save_figure,
    without_samples,
    write_report,
    write_samples_csv,
)
from cometd.loadtest.sampling import Sampler, median_of, wait_conns, wait_quiet
from cometd.loadtest.servers import (
    CometdServer,
    NchanServer,
    Server,
    modes_option,
    nchan_available,
    parse_modes,
)

__all__ = [
    "IDLE_BASELINES", "IDLE_TARGETS", "idle_one", "idle_graphs", "idle_report", "idle_command",
]


#: measured earlier on this machine, not by the bench: KiB per idle connection
IDLE_BASELINES = [
    ("naive bottle on pywsgi", "server RSS", 24.6),
    ("raw gevent, one greenlet per connection", "server RSS", 8.6),
    ("nginx + nchan", "server RSS", 11.5),
    ("kernel, one loopback connection (both ends)", "kernel", 9.6),
]


#: KiB of server RSS per idle connection
IDLE_TARGETS = {"greenlet": 6.0, "pool": 1.0}


def _ramp_rate(points: list[tuple[float, int]], target: int, base: int) -> float | None:
    """Connections/s while the server went from 10% to 90% of the ramp (interpolated).

    *points* are (time, connections held) pairs polled during the ramp.
    """
    pts = [(t, c - base) for t, c in points]

    def cross(level: float) -> float | None:
        for (t0, c0), (t1, c1) in zip(pts, pts[1:], strict=False):
            if c0 < level <= c1:
                return t0 + (t1 - t0) * (level - c0) / max(c1 - c0, 1e-9)
        return None

    lo, hi = 0.1 * target, 0.9 * target
    t_lo, t_hi = cross(lo), cross(hi)
    if t_lo is None or t_hi is None or t_hi <= t_lo:
        return None
    return (hi - lo) / (t_hi - t_lo)


def idle_one(server: Server, n: int, ramp_rate: float, settle: float, interval: float,
             logdir: Path, measure: float = 2.0) -> dict[str, Any]:
    sampler = Sampler(server, interval)
    sampler.phase = "before"
    sampler.start()
    time.sleep(max(measure, 3 * interval) + interval)
    t_base = sampler.now() - max(measure, 3 * interval)
    base_samples = sampler.since(t_base)
    before = {k: median_of(base_samples, k) for k in ("rss", "slab", "sunreclaim", "tcp_mem",
                                                    "tcp_inuse", "conns")}
    base_conns = int(before["conns"]) if math.isfinite(before["conns"]) else 0
    log(f"{server.label}: RSS before ramp {before['rss'] / 2**20:.1f} MiB; ramping to {n}")
    sampler.phase = "ramp"
    t_ramp = sampler.now()
    proc, json_path = floodtest(server.host, server.port, n, logdir, server.name, rate=ramp_rate,
                                hold=600)
    sampler.watch("floodtest", proc)
    timeout = (n / ramp_rate if ramp_rate else n / 500) + 120
    points: list[tuple[float, int]] = []
    reached = wait_conns(server, base_conns + n, proc, timeout, points=points) - base_conns
    t_reached = sampler.now()
    sampler.phase = "held"
    first = next((t for t, c in points if c > base_conns), None)
    if first is not None:
        t_ramp = first - sampler.t0  # graphs and ramp time start at the first connection
    log(f"{server.label}: {reached} connections {t_reached - t_ramp:.2f}s after the first; "
        f"settling {settle:g}s")
    time.sleep(settle)
    t_meas = sampler.now()
    wait_until = time.monotonic() + max(measure, 3 * interval) + interval / 2
    while time.monotonic() < wait_until and proc.poll() is None:
        time.sleep(interval / 2)
    at_samples = sampler.since(t_meas)
    at = {k: median_of(at_samples, k) for k in ("rss", "slab", "sunreclaim", "tcp_mem",
                                              "tcp_inuse", "conns")}
    held = int(at["conns"]) - base_conns if math.isfinite(at["conns"]) else reached
    sampler.phase = "closing"
    flood = end_floodtest(proc, json_path)
    sampler.watch("floodtest", None)
    time.sleep(max(0.5, 4 * interval))
    sampler.stop()
    samples = sampler.samples
    for s in samples:
        s["t"] -= t_ramp
    per = max(held, 1)
    kernel_slab = (at["slab"] - before["slab"]) / per
    kernel_sock = (at["tcp_mem"] - before["tcp_mem"]) / per
    result = {
        "server": server.name,
        "label": server.label,
        "n": n,
        "held": held,
        "ramp_s": round(t_reached - t_ramp, 2),
        "ramp_rate": _ramp_rate(points, n, base_conns),
        "ramp_rate_first_last": reached / (t_reached - t_ramp) if t_reached > t_ramp else None,
        "client_ramp_rate": flood.get("ramp_rate"),
        "rss_before": before["rss"],
        "rss_at_n": at["rss"],
        "rss_per_conn": (at["rss"] - before["rss"]) / per,
        "slab_per_conn": kernel_slab,
        "sunreclaim_per_conn": (at["sunreclaim"] - before["sunreclaim"]) / per,
        "sockmem_per_conn": kernel_sock,
        "kernel_per_conn": kernel_slab + kernel_sock,
        "tcp_inuse_delta": at["tcp_inuse"] - before["tcp_inuse"],
        "floodtest": {k: flood.get(k) for k in ("opened", "open_max", "welcomed", "streaming",
                                               "connect_errors", "connect_errors_by_errno",
                                               "http_errors", "protocol_errors", "closed",
                                               "ramp_rate", "client_rss_kb",
                                               "rss_bytes_per_conn")},
        "samples": samples,
    }
    log(f"{server.label}: held {held}, RSS/conn {result['rss_per_conn'] / KIB:.2f} KiB, "
        f"kernel/conn {result['kernel_per_conn'] / KIB:.2f} KiB, ramp "
        f"{fmt(result['ramp_rate_first_last'], 0)} conn/s first to last, "
        f"{fmt(result['ramp_rate'], 0)} at 10-90%")
    return result


def idle_graphs(results: list[dict], out: Path) -> list[str]:
    plt = pyplot()
    files = []

    def ramp_points(r: dict, key: str) -> tuple[list[float], list[float]]:
        base = [s for s in r["samples"] if s["phase"] == "before"][-8:]
        b_c = median_of(base, "conns")
        b_c = b_c if math.isfinite(b_c) else 0
        b_v = median_of(base, key)
        xs, ys = [], []
        for s in r["samples"]:
            if s["phase"] not in ("before", "ramp", "held") or s.get("conns") is None:
                continue
            v = s[key]
            xs.append(s["conns"] - b_c)
            ys.append((v - b_v) / 2**20)
        return xs, ys

    for key, fname, title, ylabel, refs in (
        ("rss", "idle-rss.png", "Server RSS while ramping to {n} idle connections",
         "server RSS growth (MiB)", True),
        ("slab", "idle-kernel.png", "Kernel Slab (system-wide: both ends of each connection) "
         "while ramping", "Slab growth (MiB)", False),
    ):
        fig, ax = plt.subplots(figsize=(10, 6.25))
        n = max(r["n"] for r in results)
        for r in results:
            xs, ys = ramp_points(r, key)
            per = r["rss_per_conn"] if key == "rss" else r["slab_per_conn"]
            ax.plot(xs, ys, marker=".", color=COLORS.get(r["server"]),
                    label=f"{r['label']} ({per / KIB:.2f} KiB/conn)")
        if refs:
            for kib, style, lab in ((6.0, "--", "greenlet target 6 KiB/conn"),
                                    (1.0, ":", "pool target 1 KiB/conn"),
                                    (8.6, "-.", "raw gevent baseline 8.6 KiB/conn")):
                ax.plot([0, n], [0, n * kib * KIB / 2**20], style, color="grey", lw=1,
                        label=lab)
        else:
            ax.plot([0, n], [0, n * 9.6 * KIB / 2**20], "--", color="grey", lw=1,
                    label="baseline 9.6 KiB/conn")
        ax.set_xlabel("connections held by the server")
        ax.set_ylabel(ylabel)
        ax.set_title(title.format(n=n))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=9)
        save_figure(fig, out / fname)
        files.append(fname)

    fig, ax = plt.subplots(figsize=(10, 6.25))
    for r in results:
        pts = [(s["t"], s["conns"]) for s in r["samples"] if s.get("conns") is not None]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], color=COLORS.get(r["server"]),
                label=f"{r['label']} ({fmt(r['ramp_rate'], 0)} conn/s)")
    ax.set_xlabel("seconds since the ramp started")
    ax.set_ylabel("connections held")
    ax.set_title("Ramp: connections over time (floodtest as fast as possible)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=9)
    save_figure(fig, out / "idle-ramp.png")
    files.append("idle-ramp.png")
    return files


def idle_report(results: list[dict], notes: list[str], out: Path, opts: dict,
                info: dict[str, str], graphs: list[str]) -> str:
    ramp = "as fast as possible" if not opts["ramp_rate"] else f"{opts['ramp_rate']:g}/s"
    L = [f"# cometd-bench idle: {opts['n']:,} idle connections per server", ""]
    L += ["```", command_line(), "```", ""]
    L += machine_lines(info)
    L += [
        f"- Each server starts fresh; floodtest opens {opts['n']:,} `GET /test/<id>` streams "
        f"({ramp}, "
        f"from {SOURCE_IPS}); the bench samples every {opts['interval']:g}s. 'Before' is the "
        f"median of the {opts['measure']:g}s of samples before the ramp, 'at N' the median "
        f"of {opts['measure']:g}s of samples starting {opts['settle']:g}s after the server "
        "reports all connections; then floodtest closes them with RST.",
        "- KiB = 1024 bytes. RSS/conn = (server RSS at N - RSS before the ramp) / N. "
        "Kernel/conn = (system-wide Slab + sockstat `TCP mem` pages at N - before) / N: "
        "both ends of each loopback connection, like the 9.6 KiB baseline.",
        "",
        "## Results",
        "",
        "| server | held | ramp first to last / 10-90% (conn/s) | RSS before (MiB) | "
        "RSS at N (MiB) | **RSS/conn "
        "(KiB)** | target | kernel/conn (KiB) | of which Slab | of which TCP buffers | "
        "SUnreclaim/conn | TCP sockets + |",
        "|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        target = IDLE_TARGETS.get(r["server"])
        verdict = ""
        if target is not None:
            ok = r["rss_per_conn"] / KIB <= target
            verdict = f"<= {target:g} {'met' if ok else '**missed**'}"
        L.append(
            f"| {r['label']} | {r['held']:,} | {fmt(r.get('ramp_rate_first_last'), 0)} / "
            f"{fmt(r['ramp_rate'], 0)} | "
            f"{r['rss_before'] / 2**20:.1f} | {r['rss_at_n'] / 2**20:.1f} | "
            f"**{r['rss_per_conn'] / KIB:.2f}** | {verdict} | {r['kernel_per_conn'] / KIB:.2f} | "
            f"{r['slab_per_conn'] / KIB:.2f} | {r['sockmem_per_conn'] / KIB:.2f} | "
            f"{r['sunreclaim_per_conn'] / KIB:.2f} | {r['tcp_inuse_delta']:,.0f} |")
    L += ["", "Baselines for comparison, measured earlier on this machine and not by this "
          "run, KiB per idle connection:", "",
          "| what | measured as | KiB/conn |", "|---|---|---:|"]
    for what, kind, kib in IDLE_BASELINES:
        L.append(f"| {what} | {kind} | {kib} |")
    L += ["", "Targets: greenlet mode <= 6 KiB/conn, pool mode <= 1 KiB/conn (server RSS).", ""]
    L += ["## Clients", "", "| server | opened | connect errors | HTTP errors | closed early | "
          "client ramp (conn/s) | floodtest RSS/conn (B) |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        f = r["floodtest"]
        errs = f.get("connect_errors")
        by = f.get("connect_errors_by_errno") or {}
        L.append(f"| {r['label']} | {f.get('opened')} | {errs}{' ' + str(by) if by else ''} | "
                 f"{f.get('http_errors')} | {f.get('closed')} | {fmt(f.get('ramp_rate'), 0)} | "
                 f"{f.get('rss_bytes_per_conn') or 'n/a'} |")
    L += ["", "Server ramp rate: connections held / seconds from the server's first to its "
          "last connection (polled every 50 ms), and connections/s while the server's own count "
          "went from 10% to 90% of N (interpolated between samples). Client ramp rate: "
          "floodtest's connects/s (completed TCP handshakes, which the kernel's listen backlog "
          "can absorb before the server accepts them).", ""]
    return write_report(out, L, graphs, notes)


@click.command("idle")
@click.option("--n", default=15000, show_default=True, type=click.IntRange(min=1),
              help="Idle connections to ramp each server to (< 19,800: one process' files).")
@modes_option
@click.option("--nchan/--no-nchan", default=None,
              help="Also measure nginx + nchan (default: when nginx and libnginx-mod-nchan "
                   "are installed; --nchan fails if they are not).")
@click.option("--ramp-rate", default=0.0, show_default=True, type=float,
              help="floodtest connections per second (0: as fast as the server takes them).")
@click.option("--settle", default=2.0, show_default=True, type=float,
              help="Seconds to wait after the server reports N connections before measuring.")
@click.option("--interval", default=0.25, show_default=True, type=float,
              help="Seconds between samples.")
@click.option("--measure", default=2.0, show_default=True, type=float,
              help="Seconds of samples whose median is the 'before' and the 'at N' figure "
                   "(the kernel counters are system-wide and move with other work).")
@click.option("--quiet-wait", default=20.0, show_default=True, type=float,
              help="Before each server, wait at most this long for TIME_WAIT sockets of "
                   "earlier runs to expire (they hold kernel memory that would skew the "
                   "kernel figures).")
@out_option
def idle_command(n: int, modes: str, nchan: bool | None, ramp_rate: float, settle: float,
                 interval: float, measure: float, quiet_wait: float, out: str | None) -> None:
    """Idle connection cost: ramp a fresh server per mode (and nginx + nchan) to N streams.

    For each server: RSS per connection ((RSS at N - RSS before the ramp) / N),
    kernel memory per connection (Slab and sockstat TCP buffer deltas / N, both
    ends of the loopback connections), and the ramp rate (first to last
    connection, and the 10-90% slope). Graphs memory against
    connections (one line per server) and connections over time. Baselines and
    targets are printed next to the results.
    """
    mode_list = parse_modes(modes)
    if n > 19_500:
        raise click.BadParameter("a single server process holds at most ~19,800 connections "
                                 "(20,000 open files)", param_hint="--n")
    raise_nofile()
    outdir = resolve_out(out, "idle")
    logdir = outdir / "logs"
    notes: list[str] = []
    nginx = nchan_available()
    if nchan and not nginx:
        raise click.ClickException("--nchan: nginx with libnginx-mod-nchan is not installed "
                                   "(apt-get install -y nginx-light libnginx-mod-nchan)")
    if nchan is None and not nginx:
        notes.append("nginx + nchan skipped: not installed (apt-get install -y nginx-light "
                     "libnginx-mod-nchan).")
    if nchan is False:
        notes.append("nginx + nchan skipped (--no-nchan).")
    use_nchan = bool(nginx) and nchan is not False
    opts = {"n": n, "ramp_rate": ramp_rate, "settle": settle, "interval": interval,
            "measure": measure}
    info = machine_info(nginx if use_nchan else None)
    log(f"idle: {n} connections, servers: {', '.join(mode_list)}"
        f"{', nchan' if use_nchan else ''}; results in {outdir}")
    results = []
    work = Path(tempfile.mkdtemp(prefix="cometd-bench-"))
    try:
        plan: list[str] = [*mode_list, *(["nchan"] if use_nchan else [])]
        for name in plan:
            wait_quiet(quiet_wait)
            server: Server | None = None
            try:
                if name == "nchan":
                    server = NchanServer(nginx, work / "nchan", logdir, n)
                else:
                    server = CometdServer(name, str(work / f"db-{name}"), logdir)
                log(f"{server.label}: started, pid {server.proc.pid}, port {server.port}")
                results.append(idle_one(server, n, ramp_rate, settle, interval, logdir,
                                        measure))
            except Exception as exc:  # report the others all the same
                log(f"{name}: FAILED: {exc}")
                notes.append(f"{name}: the run failed ({exc}); see logs/.")
            finally:
                if server is not None:
                    server.stop()
    finally:
        stop_all()
        shutil.rmtree(work, ignore_errors=True)
    for r in results:
        if r["held"] < 0.99 * n:
            notes.append(f"{r['label']} held only {r['held']:,} of {n:,} connections; "
                         "per-connection figures are over the connections held.")
        if abs(r["tcp_inuse_delta"] - 2 * r["held"]) > 0.05 * max(r["held"], 100):
            notes.append(f"{r['label']}: TCP sockets in use grew by {r['tcp_inuse_delta']:,.0f}"
                         f" for {r['held']:,} connections (2 per connection expected); other "
                         "activity on the machine may have skewed the kernel figures.")
    finish_info(info, notes)
    graphs = idle_graphs(results, outdir)
    write_samples_csv(outdir / "samples.csv", {r["server"]: r["samples"] for r in results})
    (outdir / "summary.json").write_text(json.dumps(
        {"scenario": "idle", "command": command_line(), "machine": info, "options": opts,
         "results": without_samples(results), "notes": notes}, indent=2) + "\n")
    idle_report(results, notes, outdir, opts, info, graphs)
    log(f"idle: report {outdir / 'report.md'}")
    click.echo(str(outdir / "report.md"))

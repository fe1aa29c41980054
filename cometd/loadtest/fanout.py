"""``cometd-bench fanout-latency``: deliveries per server CPU-second and delivery latency.

(The side-by-side with nginx + nchan is ``cometd-bench fanout``,
:mod:`cometd.loadtest.versus`.)

Loads a Barabási–Albert friends graph, connects C users, finds the message
rate at which the server saturates with a short step-up, then publishes at
half of it for D seconds.

Theory of operation
-------------------
*CPU.* Deliveries per CPU-second = deliveries counted by the server during the
measured window / server CPU-seconds in that window (the server process's own
CPU time: the load tools share the cores).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import click

from cometd.loadtest.procs import (
    ROOT,
    end_floodtest,
    floodtest,
    log,
    msggen,
    raise_nofile,
    read_json,
    spawn,
    stop,
    stop_all,
    tool,
    wait_proc,
)
from cometd.loadtest.report import (
    COLORS,
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
from cometd.loadtest.sampling import Sampler, cpu_pct, samples_between, wait_conns
from cometd.loadtest.servers import CometdServer, modes_option, parse_modes

__all__ = [
    "FANOUT_TARGETS", "P99_TARGET_MS", "ensure_db", "fanout_one", "fanout_graphs",
    "fanout_report", "fanout_command",
]


#: deliveries per server CPU-second
FANOUT_TARGETS = {"greenlet": 100_000, "pool": 300_000}


P99_TARGET_MS = 100.0


def ensure_db(data_dir: Path, users: int, m: int, seed: int, logdir: Path) -> tuple[Path, dict]:
    """The loaded subscription db for (users, m, seed), generated once and cached."""
    key = f"U{users}-m{m}-s{seed}"
    db = data_dir / f"db-{key}"
    marker = db / "BENCH-LOADED.json"
    if marker.exists():
        log(f"dataset {key}: cached at {db}")
        return db, read_json(marker)
    data_dir.mkdir(parents=True, exist_ok=True)
    if db.exists():
        shutil.rmtree(db)
    friends = data_dir / f"friends-{key}.txt"
    t = time.monotonic()
    log(f"dataset {key}: generating {friends}")
    p = spawn([*tool("genfriends"), "--n", str(users), "--m", str(m), "--seed", str(seed),
               "-o", str(friends)], logdir / "genfriends.log")
    if wait_proc(p, 1800) != 0:
        raise click.ClickException(f"genfriends failed; see {logdir / 'genfriends.log'}")
    stop(p)
    log(f"dataset {key}: loading into {db}")
    p = spawn([*tool("cometd"), "load", str(friends), "--db", str(db)], logdir / "load.log")
    if wait_proc(p, 3600) != 0:
        raise click.ClickException(f"cometd load failed; see {logdir / 'load.log'}")
    stop(p)
    with open(friends, "rb") as f:
        edges = sum(1 for _ in f)
    meta = {"users": users, "m": m, "seed": seed, "friendships": edges,
            "build_s": round(time.monotonic() - t, 1)}
    marker.write_text(json.dumps(meta) + "\n")
    friends.unlink()
    log(f"dataset {key}: {edges:,} friendships loaded in {meta['build_s']}s")
    return db, meta


def fanout_one(mode: str, db: Path, opts: dict, logdir: Path) -> dict[str, Any]:
    users, conns = opts["users"], opts["connections"]
    server = CometdServer(mode, str(db), logdir)
    log(f"{server.label}: started, pid {server.proc.pid}, port {server.port}")
    sampler = Sampler(server, opts["interval"])
    sampler.start()
    result: dict[str, Any] = {"server": mode, "label": server.label, "steps": []}
    try:
        rate = opts["rate"]
        if not rate:
            # -- step-up: find the saturating rate -----------------------------------
            sampler.phase = "connect"
            flood, fjson = floodtest(server.host, server.port, conns, logdir, f"{mode}-stepup")
            sampler.watch("floodtest", flood)
            wait_conns(server, conns, flood, conns / 500 + 120)
            best = 0.0
            r = opts["step_start"]
            while r <= opts["step_max"]:
                sampler.phase = f"step {r:g}"
                t0 = sampler.now()
                mg, mjson = msggen(server.url, r, opts["step_duration"], users,
                                   opts["step_concurrency"], logdir, f"{mode}-step{r:g}")
                sampler.watch("msggen", mg)
                wait_proc(mg, opts["step_duration"] + 40)
                t1 = sampler.now()
                sampler.watch("msggen", None)
                stop(mg)
                s = read_json(mjson)
                win = samples_between(sampler, t0 + 0.5, t1)
                achieved = float(s.get("achieved_rate") or 0)
                step = {"target": r, "achieved": achieved, "errors": s.get("errors"),
                        "server_cpu_pct": cpu_pct(win),
                        "msggen_cpu_pct": cpu_pct(win, "msggen"),
                        "floodtest_cpu_pct": cpu_pct(win, "floodtest"),
                        "machine_cpu_pct": cpu_pct(win, "machine"),
                        "post_p99_ms": (s.get("latency_ms") or {}).get("p99")}
                result["steps"].append(step)
                best = max(best, achieved)
                log(f"{server.label}: step {r:g} msg/s -> {achieved:g} msg/s, server CPU "
                    f"{fmt(step['server_cpu_pct'], 0)}%, msggen CPU "
                    f"{fmt(step['msggen_cpu_pct'], 0)}%")
                if achieved < 0.9 * r:
                    break
                r *= 2
            sampler.phase = "disconnect"
            result["stepup_floodtest"] = end_floodtest(flood, fjson)
            sampler.watch("floodtest", None)
            result["saturating_rate"] = best
            rate = opts["load_fraction"] * best
            log(f"{server.label}: saturating rate {best:g} msg/s; measuring at {rate:g} msg/s")
            time.sleep(0.5)
        result["rate"] = rate
        # -- the measured run ---------------------------------------------------------
        sampler.phase = "connect"
        flood, fjson = floodtest(server.host, server.port, conns, logdir, f"{mode}-run")
        sampler.watch("floodtest", flood)
        held = wait_conns(server, conns, flood, conns / 500 + 120)
        time.sleep(0.5)
        sampler.phase = "run"
        mg, mjson = msggen(server.url, rate, opts["duration"], users, opts["concurrency"],
                           logdir, f"{mode}-run")
        sampler.watch("msggen", mg)
        # The window opens with the first message the server counts (msggen's
        # interpreter start-up is not part of it) and closes when msggen is done
        # and the last messages have been delivered.
        base = server.counters()
        split0 = server.cpu_split()
        c0 = base
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and mg.poll() is None:
            c = server.counters()
            if (c.get("messages") or 0) > (base.get("messages") or 0):
                break
            c0 = c
            split0 = server.cpu_split()
            time.sleep(0.01)
        w0 = time.monotonic()
        t0 = w0 - sampler.t0
        log(f"{server.label}: publishing {rate:g} msg/s for {opts['duration']:g}s to "
            f"{held:,} connections")
        wait_proc(mg, opts["duration"] + 40)
        w_sent = time.monotonic()
        time.sleep(0.5)  # messages still in flight reach floodtest
        split1 = server.cpu_split()
        c1 = server.counters()
        t1 = sampler.now()
        sampler.watch("msggen", None)
        stop(mg)
        sampler.phase = "disconnect"
        fl = end_floodtest(flood, fjson)
        sampler.watch("floodtest", None)
        time.sleep(max(0.5, 2 * opts["interval"]))
    finally:
        sampler.stop()
        server.stop()
    mg_s = read_json(mjson)
    deliveries = (c1["deliveries"] or 0) - (c0["deliveries"] or 0)
    messages = (c1["messages"] or 0) - (c0["messages"] or 0)
    cpu_user = split1[0] - split0[0]
    cpu_sys = split1[1] - split0[1]
    cpu = cpu_user + cpu_sys
    wall = w_sent - w0  # the publishing window (the drain adds no messages)
    win = samples_between(sampler, t0 + 0.5, t1)
    for s in sampler.samples:
        s["t"] -= t0
    result.update({
        "connections": held,
        "messages": messages,
        "msgs_per_s": messages / wall if wall > 0 else None,
        "achieved_rate": mg_s.get("achieved_rate"),
        "msggen_errors": mg_s.get("errors"),
        "msggen_missed": mg_s.get("missed"),
        "deliveries": deliveries,
        "deliveries_per_msg": deliveries / messages if messages else None,
        "deliveries_per_s": deliveries / wall if wall > 0 else None,
        "server_cpu_s": cpu,
        "server_cpu_user_s": cpu_user,
        "server_cpu_system_s": cpu_sys,
        "server_cpu_pct": 100 * cpu / wall if wall > 0 else None,
        "msggen_cpu_pct": cpu_pct(win, "msggen"),
        "floodtest_cpu_pct": cpu_pct(win, "floodtest"),
        "machine_cpu_pct": cpu_pct(win, "machine"),
        "cpu_s_per_100k": cpu / deliveries * 1e5 if deliveries else None,
        "deliveries_per_cpu_s": deliveries / cpu if cpu > 0 else None,
        "msgs_per_cpu_s": messages / cpu if cpu > 0 else None,
        "latency_ms": fl.get("latency_ms") or {},
        "timed_messages": fl.get("messages"),
        "floodtest_closed": fl.get("closed"),
        "floodtest_connect_errors": fl.get("connect_errors"),
        "slow_consumers_dropped": (c1["slow"] or 0) - (c0["slow"] or 0),
        "post_latency_ms": mg_s.get("latency_ms") or {},
        "samples": sampler.samples,
    })
    lat = result["latency_ms"]
    log(f"{server.label}: {fmt(result['deliveries_per_s'], 0)} deliveries/s, "
        f"{fmt(result['deliveries_per_cpu_s'], 0)} deliveries per CPU-s, latency ms p50 "
        f"{lat.get('p50')} p99 {lat.get('p99')} max {lat.get('max')}")
    return result


def fanout_graphs(results: list[dict], out: Path) -> list[str]:
    plt = pyplot()
    files = []

    def series(r: dict, fn) -> tuple[list[float], list[float]]:
        pts = [s for s in r["samples"] if s["phase"] == "run" or (
            s["phase"] in ("connect", "disconnect") and -1.5 <= s["t"] <= r_dur(r) + 3)]
        xs, ys = [], []
        for a, b in zip(pts, pts[1:], strict=False):
            dt = b["t"] - a["t"]
            v = fn(a, b, dt) if dt > 0 else None
            if v is not None:
                xs.append(b["t"])
                ys.append(v)
        return xs, ys

    def r_dur(r: dict) -> float:
        return r.get("_duration", 0)

    def cpu(a, b, dt):
        return 100 * (b["cpu"] - a["cpu"]) / dt

    def deliv(a, b, dt):
        if a.get("deliveries") is None or b.get("deliveries") is None:
            return None
        return (b["deliveries"] - a["deliveries"]) / dt

    for fn, fname, ylabel, title in (
        (cpu, "fanout-cpu.png", "server CPU % (of one core)", "Server CPU during the fan-out run"),
        (deliv, "fanout-deliveries.png", "deliveries / s",
         "Deliveries per second during the fan-out run"),
    ):
        fig, ax = plt.subplots(figsize=(10, 6.25))
        for r in results:
            xs, ys = series(r, fn)
            ax.plot(xs, ys, color=COLORS.get(r["server"]),
                    label=f"{r['label']} at {r['rate']:g} msg/s")
        ax.set_xlabel("seconds since the server counted the first message")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=9)
        save_figure(fig, out / fname)
        files.append(fname)

    if any(r["steps"] for r in results):
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 6.25))
        for r in results:
            if not r["steps"]:
                continue
            tg = [s["target"] for s in r["steps"]]
            ax1.plot(tg, [s["achieved"] for s in r["steps"]], marker="o",
                     color=COLORS.get(r["server"]), label=r["label"])
            ax2.plot(tg, [s["server_cpu_pct"] or 0 for s in r["steps"]], marker="o",
                     color=COLORS.get(r["server"]), label=f"{r['label']} server")
            ax2.plot(tg, [s["msggen_cpu_pct"] or 0 for s in r["steps"]], marker="x", ls=":",
                     color=COLORS.get(r["server"]), label=f"msggen (vs {r['server']})")
        top = max(s["target"] for r in results for s in r["steps"])
        ax1.plot([0, top], [0, top], "--", color="grey", lw=1, label="achieved = target")
        from matplotlib.ticker import FixedLocator, NullLocator, ScalarFormatter

        ticks = sorted({s["target"] for r in results for s in r["steps"]})
        for ax in (ax1, ax2):
            ax.set_xscale("log", base=2)
            ax.xaxis.set_major_locator(FixedLocator(ticks))
            ax.xaxis.set_minor_locator(NullLocator())
            ax.xaxis.set_major_formatter(ScalarFormatter())
            ax.set_xlabel("target msg/s")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        ax1.set_yscale("log", base=2)
        ax1.yaxis.set_major_locator(FixedLocator(ticks))
        ax1.yaxis.set_minor_locator(NullLocator())
        ax1.yaxis.set_major_formatter(ScalarFormatter())
        ax1.set_ylabel("achieved msg/s")
        ax1.set_title("Step-up: achieved rate")
        ax2.set_ylabel("CPU % (of one core)")
        ax2.set_title("Step-up: CPU")
        save_figure(fig, out / "fanout-saturation.png")
        files.append("fanout-saturation.png")
    return files


def fanout_report(results: list[dict], meta: dict, opts: dict, info: dict, notes: list[str],
                  out: Path, graphs: list[str]) -> str:
    L = [f"# cometd-bench fanout-latency: {opts['users']:,} users, "
         f"{opts['connections']:,} connected",
         "", "```", command_line(), "```", ""]
    L += machine_lines(info)
    L += [
        f"- Dataset: `genfriends --n {opts['users']} --m {opts['m']} --seed {opts['seed']}` "
        f"({meta.get('friendships', '?'):,} friendships, ~{2 * opts['m']} friends per user on "
        "average), loaded both ways; cached under the data folder.",
        f"- floodtest holds users 1..{opts['connections']:,} (`GET /test/<id>`; in a "
        "Barabási–Albert graph the low ids are the oldest, best-connected users); msggen "
        f"publishes from subjects drawn uniformly from 1..{opts['users']:,}.",
        "- Saturating rate: msggen steps up "
        f"({opts['step_duration']:g}s per step, doubling from {opts['step_start']:g} msg/s, "
        f"concurrency {opts['step_concurrency']}) until it achieves < 90% of the target; the "
        "best achieved rate is the saturating rate. The measured run publishes at "
        f"{opts['load_fraction']:.0%} of it (or --rate) for {opts['duration']:g}s with "
        f"concurrency {opts['concurrency']}, against fresh connections.",
        "- Server CPU = user+system CPU time of the server process alone (psutil); msggen and "
        "floodtest share the 2 cores with it. Deliveries are the server's own counter. On "
        "loopback the kernel usually runs the receiving socket's TCP processing inside the "
        "sender's send() call, so the server's system time includes part of the clients' "
        "receive path.",
        "",
        "## Results",
        "",
        "| | " + " | ".join(r["label"] for r in results) + " |",
        "|---|" + "---:|" * len(results),
    ]

    def row(name: str, fn) -> None:
        L.append(f"| {name} | " + " | ".join(fn(r) for r in results) + " |")

    row("saturating rate (msg/s)", lambda r: fmt(r.get("saturating_rate"), 0))
    row("measured at (msg/s)", lambda r: f"{r['rate']:,.0f}")
    row("achieved (msg/s)", lambda r: fmt(r.get("msgs_per_s"), 0))
    row("connections held", lambda r: f"{r['connections']:,}")
    row("deliveries per message", lambda r: fmt(r.get("deliveries_per_msg"), 1))
    row("**deliveries/s**", lambda r: f"**{fmt(r.get('deliveries_per_s'), 0)}**")
    row("server CPU % (one core = 100)", lambda r: fmt(r.get("server_cpu_pct"), 0))
    row("server CPU-s in the window (user + system)", lambda r: (
        f"{r['server_cpu_s']:.1f} ({r.get('server_cpu_user_s', 0):.1f} + "
        f"{r.get('server_cpu_system_s', 0):.1f})"))
    row("server CPU-s per 100K deliveries", lambda r: fmt(r.get("cpu_s_per_100k"), 2))
    row("**deliveries per server CPU-s**",
        lambda r: f"**{fmt(r.get('deliveries_per_cpu_s'), 0)}**")
    row("target deliveries per CPU-s", lambda r: (
        f">= {FANOUT_TARGETS[r['server']]:,} " + (
            "met" if (r.get("deliveries_per_cpu_s") or 0) >= FANOUT_TARGETS[r["server"]]
            else "**missed**")) if r["server"] in FANOUT_TARGETS else "")
    row("messages per server CPU-s", lambda r: fmt(r.get("msgs_per_cpu_s"), 0))
    row("latency p50 (ms)", lambda r: fmt(r["latency_ms"].get("p50"), 1))
    row("**latency p99 (ms)**", lambda r: f"**{fmt(r['latency_ms'].get('p99'), 1)}**")
    row("latency max (ms)", lambda r: fmt(r["latency_ms"].get("max"), 1))
    row("target p99 < 100 ms", lambda r: "met" if (r["latency_ms"].get("p99") or 1e9)
        < P99_TARGET_MS else "**missed**")
    row("messages timed by floodtest", lambda r: f"{r.get('timed_messages') or 0:,}")
    row("slow consumers dropped", lambda r: str(r.get("slow_consumers_dropped")))
    row("msggen errors / missed slots",
        lambda r: f"{r.get('msggen_errors')} / {r.get('msggen_missed')}")
    row("POST latency p50 / p99 (ms)", lambda r: (
        f"{fmt(r['post_latency_ms'].get('p50'), 1)} / "
        f"{fmt(r['post_latency_ms'].get('p99'), 1)}"))
    row("msggen / floodtest CPU %", lambda r: (
        f"{fmt(r.get('msggen_cpu_pct'), 0)} / {fmt(r.get('floodtest_cpu_pct'), 0)}"))
    row(f"whole machine CPU % ({os.cpu_count()} cores = {100 * (os.cpu_count() or 1)})",
        lambda r: fmt(r.get("machine_cpu_pct"), 0))
    L += ["", "Targets: >= 100,000 deliveries per server CPU-second (greenlet), >= 300,000 "
          "(pool); p99 < 100 ms at 50% of the saturating rate.", ""]
    if any(r["steps"] for r in results):
        L += ["## Step-up", "", "| server | target msg/s | achieved msg/s | server CPU % | "
              "msggen CPU % | floodtest CPU % | machine CPU % | POST p99 (ms) | errors |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in results:
            for s in r["steps"]:
                L.append(f"| {r['label']} | {s['target']:,.0f} | {s['achieved']:,.0f} | "
                         f"{fmt(s['server_cpu_pct'], 0)} | {fmt(s['msggen_cpu_pct'], 0)} | "
                         f"{fmt(s['floodtest_cpu_pct'], 0)} | "
                         f"{fmt(s.get('machine_cpu_pct'), 0)} | {fmt(s['post_p99_ms'], 1)} | "
                         f"{s['errors']} |")
        L += ["", "CPU % is of one core; the machine has "
              f"{os.cpu_count()}. A server at ~100% is saturated (one process, one core); "
              "a msggen near 100% means the load generator, not the server, set the limit.", ""]
    return write_report(out, L, graphs, notes)


@click.command("fanout-latency")
@click.option("--users", default=100_000, show_default=True, type=click.IntRange(min=20),
              help="Users in the generated friends graph (genfriends --n).")
@click.option("--m", "m", default=15, show_default=True, type=click.IntRange(min=1),
              help="Friends each new user makes (genfriends --m; ~2m friends on average).")
@click.option("--seed", default=1, show_default=True, type=int, help="genfriends --seed.")
@click.option("--connections", default=10_000, show_default=True, type=click.IntRange(min=1),
              help="Users 1..C to connect with floodtest (< 19,800).")
@click.option("--rate", default=0.0, show_default=True, type=float,
              help="Messages/s for the measured run (0: step up to the saturating rate and "
                   "run at --load-fraction of it).")
@click.option("--load-fraction", default=0.5, show_default=True, type=float,
              help="Fraction of the saturating rate the measured run publishes at.")
@click.option("--duration", default=30.0, show_default=True, type=float,
              help="Seconds of the measured run.")
@click.option("--step-duration", default=3.0, show_default=True, type=float,
              help="Seconds per step of the step-up.")
@click.option("--step-start", default=500.0, show_default=True, type=float,
              help="First step's rate (msg/s); each next step doubles it.")
@click.option("--step-max", default=64_000.0, show_default=True, type=float,
              help="Highest step rate tried.")
@click.option("--step-concurrency", default=16, show_default=True, type=int,
              help="msggen --concurrency during the step-up.")
@click.option("--concurrency", default=8, show_default=True, type=int,
              help="msggen --concurrency during the measured run.")
@modes_option
@click.option("--interval", default=0.5, show_default=True, type=float,
              help="Seconds between samples.")
@click.option("--data-dir", default=str(ROOT / "data" / "bench"), show_default=True,
              help="Where generated friends databases are cached (keyed by users, m, seed).")
@out_option
def fanout_command(users: int, m: int, seed: int, connections: int, rate: float,
                   load_fraction: float, duration: float, step_duration: float,
                   step_start: float, step_max: float, step_concurrency: int, concurrency: int,
                   modes: str, interval: float, data_dir: str, out: str | None) -> None:
    """Fan-out throughput and latency: friends graph, C connected users, msggen at a rate.

    Per mode (a fresh server each, one after the other): deliveries/s, server
    CPU-seconds per 100K deliveries and deliveries per server CPU-second,
    delivery latency p50/p99/max (floodtest), slow consumers dropped. Without
    --rate, a short step-up finds the saturating rate first and the measured
    run publishes at --load-fraction of it. Graphs CPU% and deliveries/s over
    time, and the step-up.
    """
    mode_list = parse_modes(modes)
    if connections > 19_500:
        raise click.BadParameter("one server process holds at most ~19,800 connections",
                                 param_hint="--connections")
    if connections > users:
        raise click.BadParameter("cannot connect more users than exist", param_hint="--connections")
    if m >= users:
        raise click.BadParameter("--m must be below --users", param_hint="--m")
    raise_nofile()
    outdir = resolve_out(out, "fanout")
    logdir = outdir / "logs"
    opts = {"users": users, "m": m, "seed": seed, "connections": connections, "rate": rate,
            "load_fraction": load_fraction, "duration": duration,
            "step_duration": step_duration, "step_start": step_start, "step_max": step_max,
            "step_concurrency": step_concurrency, "concurrency": concurrency,
            "interval": interval}
    info = machine_info()
    notes: list[str] = []
    results = []
    try:
        db, meta = ensure_db(Path(data_dir), users, m, seed, logdir)
        for mode in mode_list:
            r = fanout_one(mode, db, opts, logdir)
            r["_duration"] = duration
            results.append(r)
    finally:
        stop_all()
    for r in results:
        if r["connections"] < 0.99 * connections:
            notes.append(f"{r['label']}: only {r['connections']:,} of {connections:,} "
                         "connections were held.")
        if r.get("msggen_missed"):
            notes.append(f"{r['label']}: msggen missed {r['msggen_missed']} slots in the "
                         "measured run (the server, or msggen itself, was slower than the rate).")
        if r.get("steps") and r["steps"][-1]["achieved"] >= 0.9 * r["steps"][-1]["target"]:
            notes.append(f"{r['label']}: the step-up reached --step-max without saturating.")
    finish_info(info, notes)
    graphs = fanout_graphs(results, outdir)
    write_samples_csv(outdir / "samples.csv", {r["server"]: r["samples"] for r in results})
    (outdir / "summary.json").write_text(json.dumps(
        {"scenario": "fanout", "command": command_line(), "machine": info, "options": opts,
         "dataset": meta, "results": without_samples(results), "notes": notes}, indent=2) + "\n")
    fanout_report(results, meta, opts, info, notes, outdir, graphs)
    log(f"fanout: report {outdir / 'report.md'}")
    click.echo(str(outdir / "report.md"))

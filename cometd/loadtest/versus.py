"""``cometd-bench fanout``: cometd's fan-out side by side with nginx + nchan.

Four scenarios, each run on a fresh server of every contender (nginx + nchan
with one worker, cometd ``--mode pool``, cometd ``--mode greenlet``; nchan
sits out ``feed-batch``), in interleaved rounds:

- ``send``: nobody online, ``--send-count`` publishes from random subjects:
  server CPU per publish.
- ``one``: one subject, ``--one-subscribers`` subscribers online, all of them
  reading: deliveries per server CPU-second.
- ``feed``: a Barabási–Albert friends graph of ``--feed-users`` users (m =
  ``--m``), all online, messages from random subjects: deliveries per server
  CPU-second. A cometd user gets what its friends send (and what it sends);
  an nchan subscriber gets the same by multiplexing its own and its friends'
  channels, ``/sub/<a>,<b>,...`` (``nchan_channel_id_split_delimiter``).
  nchan takes at most 255 channels a request, so a user with more than 254
  friends opens one more stream per further 255 channels: every user receives
  every message it would from cometd, and the report says how many streams
  that took.
- ``feed-batch``: the same feed, the same messages at the same rate, but
  msggen posts them ``--feed-batch`` at a time to cometd's ``POST /publish``
  (each batch once its last message is due). nchan has no batch publish, so
  it does not run this one: the ratio is to the same round's nchan ``feed``
  figure, and the report labels the row so.

Theory of operation
-------------------
*Pinning.* The server (every thread and child: ``sched_setaffinity`` before
exec) runs on ``--server-cpu``; the reading client
(:mod:`cometd.loadtest.streamreader`), the publisher (msggen, one keep-alive
connection, paced at the scenario's rate, 100-byte bodies) and this process on
``--client-cpu``.

*Counting.* Deliveries are what the reader received, counted the same way for
every server (a ``ts=`` marker per message); cometd's own delivery counter is
recorded beside it as a check. Server CPU is the user + system time of the
server's processes from just before msggen starts to when the reader has had
no new message for ``QUIET`` seconds after msggen ended; the server's CPU
while idle just before is recorded too (it is close to zero), not subtracted.
On loopback the kernel runs much of the receiving socket's TCP work inside
the sender's ``send()``, so server system time includes part of the reader's
receive path, for every contender alike.

*Ratios.* Each round's cometd figure is divided by the same round's nchan
figure; the report gives the median (min–max) of those ratios, and of each
figure.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import click

from cometd.loadtest.fanout import ensure_db
from cometd.loadtest.msggen import MAX_BATCH_MESSAGES
from cometd.loadtest.procs import (
    ROOT,
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
    command_line,
    finish_info,
    fmt,
    machine_info,
    machine_lines,
    out_option,
    resolve_out,
)
from cometd.loadtest.servers import CometdServer, NchanServer, Server, nchan_available

__all__ = ["CONTENDERS", "SCENARIOS", "TARGETS", "NCHAN_MAX_CHANNELS", "feed_paths",
           "spread", "versus_report", "versus_command"]

CONTENDERS = ("nchan", "pool", "greenlet")
SCENARIOS = ("send", "one", "feed", "feed-batch")
#: (scenario, cometd mode) -> the least ratio to nchan's deliveries per server CPU-s
TARGETS = {("one", "pool"): 1.3, ("one", "greenlet"): 1.0,
           ("feed", "pool"): 4.0, ("feed", "greenlet"): 3.0}
#: channels nchan multiplexes in one subscriber request
NCHAN_MAX_CHANNELS = 255
QUIET = 0.5  # seconds without a new delivery that end a run's window
BODY_SIZE = 100


def feed_paths(friends: dict[int, list[int]], users: int) -> tuple[list[str], list[str]]:
    """Stream paths for every user of the feed: cometd's, and nchan's multiplexed ones."""
    cometd = [f"/test/{u}" for u in range(1, users + 1)]
    nchan = []
    for u in range(1, users + 1):
        channels = [u, *friends.get(u, ())]
        for i in range(0, len(channels), NCHAN_MAX_CHANNELS):
            nchan.append("/sub/" + ",".join(map(str, channels[i:i + NCHAN_MAX_CHANNELS])))
    return cometd, nchan


def spread(values: list[float], unit: str = "") -> str:
    """``median (min–max)`` of *values*, *unit* after the median."""
    if not values:
        return "n/a"
    if len(values) == 1:
        return fmt(values[0]) + unit
    return f"{fmt(statistics.median(values))}{unit} ({fmt(min(values))}–{fmt(max(values))})"


def _read_friends(path: Path) -> dict[int, list[int]]:
    friends: dict[int, list[int]] = defaultdict(list)
    with open(path) as f:
        for line in f:
            a, b = map(int, line.split())
            friends[a].append(b)
            friends[b].append(a)
    return friends


def _star_db(data_dir: Path, subscribers: int, logdir: Path) -> Path:
    """A database where users 2..subscribers+1 subscribe to user 1 (cached)."""
    db = data_dir / f"db-star-{subscribers}"
    marker = db / "BENCH-LOADED.json"
    if marker.exists():
        return db
    data_dir.mkdir(parents=True, exist_ok=True)
    if db.exists():
        shutil.rmtree(db)
    friends = data_dir / f"star-{subscribers}.txt"
    friends.write_text("".join(f"1 {u}\n" for u in range(2, subscribers + 2)))
    p = spawn([*tool("cometd"), "load", str(friends), "--db", str(db)], logdir / "load.log")
    if wait_proc(p, 600) != 0:
        raise click.ClickException(f"cometd load failed; see {logdir / 'load.log'}")
    stop(p)
    friends.unlink()
    marker.write_text(json.dumps({"star": subscribers}) + "\n")
    return db


def _reader_status(path: Path) -> dict:
    return read_json(path) or {"answered": 0, "deliveries": 0}


def _run(server: Server, paths: list[str], users: int, count: int, rate: float,
         opts: dict, logdir: Path, tag: str, batch: int = 1) -> dict[str, Any]:
    """Connect *paths*, publish *count* messages at *rate* from 1..*users*, *batch* a
    request; the counts."""
    client = {opts["client_cpu"]}
    reader = None
    status = logdir / f"reader-{tag}.json"
    status.unlink(missing_ok=True)
    if paths:
        pfile = logdir / f"paths-{tag}.txt"
        pfile.write_text("\n".join(paths) + "\n")
        reader = spawn([*tool("streamreader"), "--server", f"{server.host}:{server.port}",
                        "--paths", str(pfile), "--status", str(status), "--rate", "4000",
                        "--timeout", "600"], logdir / f"reader-{tag}.log", cpus=client)
        deadline = time.monotonic() + len(paths) / 1000 + 60
        while _reader_status(status)["answered"] < len(paths):
            if time.monotonic() > deadline or reader.poll() is not None:
                raise click.ClickException(
                    f"{server.label}: only {_reader_status(status)['answered']} of "
                    f"{len(paths)} streams answered; see {logdir}")
            time.sleep(0.1)
    idle0, t_idle = sum(server.cpu_split()), time.monotonic()
    time.sleep(opts["settle"])
    idle_pct = 100 * (sum(server.cpu_split()) - idle0) / (time.monotonic() - t_idle)
    r0 = _reader_status(status)
    c0 = server.counters()
    u0, s0 = server.cpu_split()
    t0 = time.monotonic()
    # Exactly *count* slots; the duration leaves the last replies time to come.
    mg, mjson = msggen(server.url, rate, count / rate + 2, users, 1, logdir, tag,
                       seed=opts["seed"], size=BODY_SIZE, count=count, cpus=client, batch=batch)
    wait_proc(mg, count / rate + 60)
    stop(mg)
    last, quiet_since = _reader_status(status)["deliveries"], time.monotonic()
    while reader is not None and time.monotonic() - quiet_since < QUIET:
        time.sleep(0.05)
        now = _reader_status(status)["deliveries"]
        if now != last:
            last, quiet_since = now, time.monotonic()
    u1, s1 = server.cpu_split()
    wall = time.monotonic() - t0
    c1 = server.counters()
    r1 = _reader_status(status)
    if reader is not None:
        stop(reader)
        r1 = _reader_status(status)
    m = read_json(mjson)
    cpu = (u1 - u0) + (s1 - s0)
    deliveries = r1["deliveries"] - r0["deliveries"]
    sent = m.get("sent") or 0
    server_deliveries = None
    if c1.get("deliveries") is not None and c0.get("deliveries") is not None:
        server_deliveries = c1["deliveries"] - c0["deliveries"]
    return {
        "streams": len(paths), "published": sent,
        "requests": (m.get("latency_ms") or {}).get("count"), "msggen_errors": m.get("errors"),
        "msggen_missed": m.get("missed"), "achieved_rate": m.get("achieved_rate"),
        "deliveries": deliveries, "server_deliveries": server_deliveries,
        "reader_closed": r1.get("closed"), "wall_s": wall,
        "server_cpu_s": cpu, "server_cpu_user_s": u1 - u0, "server_cpu_system_s": s1 - s0,
        "idle_cpu_pct": idle_pct,
        "cpu_us_per_publish": 1e6 * cpu / sent if sent else None,
        "deliveries_per_cpu_s": deliveries / cpu if cpu > 0 and deliveries else None,
    }


def _start(contender: str, scenario: str, dbs: dict[str, Path], nginx: str | None,
           work: Path, logdir: Path, cpus: set[int]) -> Server:
    if contender == "nchan":
        shutil.rmtree(work / "nchan", ignore_errors=True)
        return NchanServer(nginx or "nginx", work / "nchan", logdir, 20_000, cpus=cpus)
    db = dbs["one" if scenario == "one" else "feed"]
    return CometdServer(contender, str(db), logdir, cpus=cpus)


def versus_report(results: list[dict], opts: dict, info: dict, notes: list[str],
                  out: Path, extra: dict) -> str:
    L = ["# cometd-bench fanout: cometd side by side with nginx + nchan", "", "```",
         command_line(), "```", ""]
    L += machine_lines(info)
    L += [
        f"- Server pinned to CPU {opts['server_cpu']}; reader, msggen and the harness to CPU "
        f"{opts['client_cpu']}. nginx + nchan: one worker. A fresh server per contender, "
        f"scenario and round; {opts['rounds']} rounds, the contenders' order rotating.",
        f"- Publishes: msggen, one keep-alive connection, paced, {BODY_SIZE}-byte bodies.",
        f"- send: {opts['send_count']:,} publishes at {opts['send_rate']:g}/s from subjects "
        f"1..{opts['feed_users']:,}, nobody online.",
        f"- one: {opts['one_count']:,} messages at {opts['one_rate']:g}/s from one subject to "
        f"{opts['one_subscribers']:,} online subscribers.",
        f"- feed: `genfriends --n {opts['feed_users']} --m {opts['m']} --seed {opts['seed']}`,"
        f" every user online; {opts['feed_count']:,} messages at {opts['feed_rate']:g}/s from "
        f"random subjects. nchan: {extra.get('nchan_feed_streams', 0):,} multiplexed streams "
        f"for {opts['feed_users']:,} users ({extra.get('capped_users', 0)} users with more than "
        f"{NCHAN_MAX_CHANNELS - 1} friends hold more than one).",
        f"- feed-batch: the feed's messages at the same rate, msggen posting "
        f"{opts['feed_batch']} at a time to cometd's `POST /publish`; nchan has no batch "
        "publish and does not run it: its ratios are to the same round's nchan feed.",
        "- Deliveries: counted by the reader for every server; server CPU: user + system of "
        "the server's processes over the window (see the module docstring).",
        "", "## Results", "",
        "| scenario: figure | " + " | ".join(CONTENDERS_LABEL[c] for c in opts["contenders"])
        + " | " + " | ".join(f"{m} / nchan" for m in opts["contenders"] if m != "nchan") + " |",
        "|---|" + "---:|" * (2 * len(opts["contenders"]) - 1),
    ]
    by: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in results:
        by[(r["scenario"], r["contender"])].append(r)
    ratios: dict[tuple[str, str], list[float]] = {}
    for scenario in opts["scenarios"]:
        key = "cpu_us_per_publish" if scenario == "send" else "deliveries_per_cpu_s"
        name = ("send: server CPU µs per publish" if scenario == "send"
                else f"{scenario}: deliveries per server CPU-s")
        if scenario == "feed-batch":
            name += (f" (msggen --batch {opts['feed_batch']}; nchan cannot batch: "
                     "ratios to its single-send feed)")
        cells = [spread([r[key] for r in by[(scenario, c)] if r.get(key)])
                 for c in opts["contenders"]]
        rcells = []
        for c in opts["contenders"]:
            if c == "nchan":
                continue
            peer = "feed" if scenario == "feed-batch" else scenario
            base = {r["round"]: r.get(key) for r in by[(peer, "nchan")]}
            vals = [(r[key] / base[r["round"]]) if scenario != "send" else
                    (base[r["round"]] / r[key])
                    for r in by[(scenario, c)] if r.get(key) and base.get(r["round"])]
            ratios[(scenario, c)] = vals
            rcells.append(spread(vals, "×"))
        L.append(f"| {name} | " + " | ".join(cells) + " | " + " | ".join(rcells) + " |")
    L += ["", "Ratios: cometd's figure over nchan's in the same round (for `send`, nchan's CPU "
          "per publish over cometd's: above 1 is cometd cheaper).", "", "## Targets", ""]
    for (scenario, mode), target in TARGETS.items():
        vals = ratios.get((scenario, mode))
        if vals is None:
            continue
        med = statistics.median(vals) if vals else 0.0
        L.append(f"- {scenario}, {mode}: ≥ {target:g}× nchan: {spread(vals, '×')} — "
                 + ("met" if med >= target else "**missed**"))
    L += ["", "## Every run", "",
          "| round | scenario | contender | published | streams | deliveries (cometd's "
          "counter) | server CPU-s (user + sys) | idle CPU % | figure |",
          "|---:|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        counter = "" if r["server_deliveries"] is None else f" ({r['server_deliveries']:,})"
        fig = (f"{fmt(r['cpu_us_per_publish'])} µs/publish" if r["scenario"] == "send"
               else f"{fmt(r['deliveries_per_cpu_s'], 0)} /CPU-s")
        L.append(f"| {r['round']} | {r['scenario']} | {CONTENDERS_LABEL[r['contender']]} | "
                 f"{r['published']:,} | {r['streams']:,} | {r['deliveries']:,}{counter}"
                 f" | {r['server_cpu_s']:.2f} ({r['server_cpu_user_s']:.2f} + "
                 f"{r['server_cpu_system_s']:.2f}) | {fmt(r['idle_cpu_pct'], 1)} | {fig} |")
    L.append("")
    if notes:
        L += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    L += ["The run also wrote `summary.json` (every figure) and `logs/` (each tool's output, "
          "the reader's counts) next to this report.", ""]
    text = "\n".join(L)
    (out / "report.md").write_text(text)
    return text


CONTENDERS_LABEL = {"nchan": "nginx + nchan", "pool": "cometd pool", "greenlet": "cometd greenlet"}


@click.command("fanout")
@click.option("--scenarios", default=",".join(SCENARIOS), show_default=True,
              help="Comma-separated scenarios: send, one, feed, feed-batch.")
@click.option("--contenders", default=",".join(CONTENDERS), show_default=True,
              help="Comma-separated servers: nchan, pool, greenlet.")
@click.option("--rounds", default=3, show_default=True, type=click.IntRange(min=1),
              help="Interleaved rounds (each runs every contender once per scenario).")
@click.option("--send-count", default=10_000, show_default=True, type=click.IntRange(min=1),
              help="send: publishes, nobody online.")
@click.option("--send-rate", default=1000.0, show_default=True, type=float,
              help="send: publishes per second.")
@click.option("--one-subscribers", default=4000, show_default=True,
              type=click.IntRange(min=1, max=19_000), help="one: subscribers online.")
@click.option("--one-count", default=200, show_default=True, type=click.IntRange(min=1),
              help="one: messages.")
@click.option("--one-rate", default=20.0, show_default=True, type=float,
              help="one: messages per second.")
@click.option("--feed-users", default=6000, show_default=True,
              type=click.IntRange(min=20, max=19_000),
              help="feed: users in the friends graph, every one online.")
@click.option("--m", "m", default=15, show_default=True, type=click.IntRange(min=1),
              help="feed: friends each new user makes (genfriends --m).")
@click.option("--feed-count", default=3000, show_default=True, type=click.IntRange(min=1),
              help="feed: messages.")
@click.option("--feed-rate", default=500.0, show_default=True, type=float,
              help="feed: messages per second.")
@click.option("--feed-batch", default=10, show_default=True,
              type=click.IntRange(min=2, max=MAX_BATCH_MESSAGES),
              help="feed-batch: messages msggen posts in one POST /publish.")
@click.option("--seed", default=1, show_default=True, type=int,
              help="genfriends and msggen --seed.")
@click.option("--settle", default=1.0, show_default=True, type=float,
              help="Seconds between the streams' answer and the first publish (the server's "
                   "idle CPU is measured over them).")
@click.option("--server-cpu", default=0, show_default=True, type=int,
              help="The core the server runs on.")
@click.option("--client-cpu", default=1, show_default=True, type=int,
              help="The core the reader, msggen and the harness run on.")
@click.option("--data-dir", default=str(ROOT / "data" / "bench"), show_default=True,
              help="Where the generated databases are cached.")
@out_option
def versus_command(scenarios: str, contenders: str, rounds: int, send_count: int,
                   send_rate: float, one_subscribers: int, one_count: int, one_rate: float,
                   feed_users: int, m: int, feed_count: int, feed_rate: float,
                   feed_batch: int, seed: int,
                   settle: float, server_cpu: int, client_cpu: int, data_dir: str,
                   out: str | None) -> None:
    """Fan-out side by side with nginx + nchan: CPU per publish, deliveries per CPU-s.

    Scenarios send (nobody online), one (one subject, many subscribers),
    feed (friends graph, everyone online) and feed-batch (the feed's
    messages posted --feed-batch at a time to POST /publish; cometd only, as
    nchan has no batch publish), each on a fresh server of every contender,
    in interleaved rounds, the server pinned to one core and the clients to
    another; reports each figure and cometd's ratio to nchan as median
    (min–max) of the rounds.
    """
    scen = [s.strip() for s in scenarios.split(",") if s.strip()]
    cont = [c.strip() for c in contenders.split(",") if c.strip()]
    if not scen or set(scen) - set(SCENARIOS):
        raise click.BadParameter(f"choose from {', '.join(SCENARIOS)}", param_hint="--scenarios")
    if not cont or set(cont) - set(CONTENDERS):
        raise click.BadParameter(f"choose from {', '.join(CONTENDERS)}",
                                 param_hint="--contenders")
    if m >= feed_users:
        raise click.BadParameter("--m must be below --feed-users", param_hint="--m")
    cpus = os.sched_getaffinity(0)
    for name, cpu in (("--server-cpu", server_cpu), ("--client-cpu", client_cpu)):
        if cpu not in cpus:
            raise click.BadParameter(f"CPU {cpu} is not available here", param_hint=name)
    nginx = nchan_available()
    if "nchan" in cont and not nginx:
        raise click.ClickException("nginx with libnginx-mod-nchan is not installed (apt-get "
                                   "install -y nginx-light libnginx-mod-nchan); or leave nchan "
                                   "out of --contenders")
    raise_nofile()
    os.sched_setaffinity(0, {client_cpu})
    outdir = resolve_out(out, "fanout")
    logdir = outdir / "logs"
    logdir.mkdir(parents=True, exist_ok=True)
    opts = {"scenarios": scen, "contenders": cont, "rounds": rounds, "send_count": send_count,
            "send_rate": send_rate, "one_subscribers": one_subscribers, "one_count": one_count,
            "one_rate": one_rate, "feed_users": feed_users, "m": m, "feed_count": feed_count,
            "feed_rate": feed_rate, "feed_batch": feed_batch, "seed": seed, "settle": settle,
            "server_cpu": server_cpu, "client_cpu": client_cpu}
    info = machine_info(nginx if "nchan" in cont else None)
    notes: list[str] = []
    results: list[dict] = []
    work = Path(tempfile.mkdtemp(prefix="cometd-bench-"))
    try:
        dbs = {"one": _star_db(Path(data_dir), one_subscribers, logdir)}
        dbs["feed"], _meta = ensure_db(Path(data_dir), feed_users, m, seed, logdir)
        gf = work / "friends.txt"
        p = spawn([*tool("genfriends"), "--n", str(feed_users), "--m", str(m), "--seed",
                   str(seed), "-o", str(gf)], logdir / "genfriends.log")
        if wait_proc(p, 600) != 0:
            raise click.ClickException(f"genfriends failed; see {logdir / 'genfriends.log'}")
        stop(p)
        friends = _read_friends(gf)
        cometd_feed, nchan_feed = feed_paths(friends, feed_users)
        extra = {"nchan_feed_streams": len(nchan_feed),
                 "capped_users": sum(1 for f in friends.values()
                                     if len(f) >= NCHAN_MAX_CHANNELS)}
        paths = {
            ("send", "nchan"): [], ("send", "cometd"): [],
            ("one", "nchan"): ["/test/1"] * one_subscribers,
            ("one", "cometd"): [f"/test/{u}" for u in range(2, one_subscribers + 2)],
            ("feed", "nchan"): nchan_feed, ("feed", "cometd"): cometd_feed,
            ("feed-batch", "cometd"): cometd_feed,
        }
        plan = {"send": (feed_users, send_count, send_rate), "one": (1, one_count, one_rate),
                "feed": (feed_users, feed_count, feed_rate),
                "feed-batch": (feed_users, feed_count, feed_rate)}
        for rnd in range(1, rounds + 1):
            order = cont[(rnd - 1) % len(cont):] + cont[:(rnd - 1) % len(cont)]
            for scenario in scen:
                for c in order:
                    if scenario == "feed-batch" and c == "nchan":
                        continue  # nchan has no batch publish
                    tag = f"r{rnd}-{scenario}-{c}"
                    server = _start(c, scenario, dbs, nginx, work, logdir, {server_cpu})
                    try:
                        users, count, rate = plan[scenario]
                        r = _run(server, paths[(scenario, "nchan" if c == "nchan" else "cometd")],
                                 users, count, rate, opts, logdir, tag,
                                 feed_batch if scenario == "feed-batch" else 1)
                    finally:
                        server.stop()
                    r.update({"round": rnd, "scenario": scenario, "contender": c})
                    results.append(r)
                    log(f"round {rnd} {scenario} {c}: published {r['published']:,}, "
                        f"deliveries {r['deliveries']:,}, server CPU {r['server_cpu_s']:.2f}s: "
                        + (f"{fmt(r['cpu_us_per_publish'])} µs/publish" if scenario == "send"
                           else f"{fmt(r['deliveries_per_cpu_s'], 0)} deliveries/CPU-s"))
    finally:
        stop_all()
        shutil.rmtree(work, ignore_errors=True)
    for r in results:
        if r["msggen_errors"] or r["msggen_missed"]:
            notes.append(f"round {r['round']} {r['scenario']} {r['contender']}: msggen "
                         f"{r['msggen_errors']} errors, {r['msggen_missed']} missed slots.")
        if r["server_deliveries"] is not None and r["server_deliveries"] != r["deliveries"]:
            notes.append(f"round {r['round']} {r['scenario']} {r['contender']}: the reader "
                         f"counted {r['deliveries']:,} deliveries, the server "
                         f"{r['server_deliveries']:,}.")
        if r["reader_closed"]:
            notes.append(f"round {r['round']} {r['scenario']} {r['contender']}: "
                         f"{r['reader_closed']} streams closed during the run.")
    for scenario in ("one", "feed", "feed-batch"):
        got = {(r["round"], r["contender"]): r["deliveries"] for r in results
               if r["scenario"] == scenario}
        for rnd in range(1, rounds + 1):
            seen = {got[k] for k in got if k[0] == rnd}
            if len(seen) > 1:
                each = ", ".join(f"{k[1]} {v:,}" for k, v in got.items() if k[0] == rnd)
                notes.append(f"round {rnd} {scenario}: the contenders' deliveries differ "
                             f"({each})"
                             "; the figures are per delivery all the same.")
    finish_info(info, notes)
    (outdir / "summary.json").write_text(json.dumps(
        {"scenario": "fanout", "command": command_line(), "machine": info, "options": opts,
         "extra": extra, "results": results, "notes": notes}, indent=2) + "\n")
    versus_report(results, opts, info, notes, outdir, extra)
    log(f"fanout: report {outdir / 'report.md'}")
    click.echo(str(outdir / "report.md"))

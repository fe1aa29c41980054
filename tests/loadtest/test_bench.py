"""cometd-bench: small end-to-end runs of each scenario, plus its helpers.

The runs use small sizes (2,000 idle connections, a 2,000-user graph) so the
whole file stays well under a minute. They check that the report and the
graphs are written, that fan-out counts match what was sent and received, and
guard the idle RSS per connection, which is steady from run to run, against
regressions (latency, rates and kernel counters vary with the machine's load
and are left to the benchmarks).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from cometd.loadtest.idle import _ramp_rate
from cometd.loadtest.report import fmt, machine_info, machine_lines
from cometd.loadtest.sampling import kernel_counters
from cometd.loadtest.servers import nchan_available

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BENCH = os.path.join(ROOT, "bin", "cometd-bench")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run_bench(*args: str, timeout: float = 150) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, BENCH, *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=timeout)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def check_pngs(out, names) -> None:
    for name in names:
        data = (out / name).read_bytes()
        assert data.startswith(PNG_MAGIC), name
        assert 2_000 < len(data) < 100_000, (name, len(data))


def test_help_lists_every_scenario_and_its_options():
    proc = run_bench("--help")
    assert "idle" in proc.stdout and "fanout" in proc.stdout
    idle = run_bench("idle", "--help").stdout
    for opt in ("--n", "--modes", "--nchan", "--out"):
        assert opt in idle
    assert "fanout-latency" in proc.stdout
    fan = run_bench("fanout-latency", "--help").stdout
    for opt in ("--users", "--connections", "--rate", "--duration", "--modes", "--out"):
        assert opt in fan
    versus = run_bench("fanout", "--help").stdout
    for opt in ("--scenarios", "--contenders", "--rounds", "--server-cpu", "--client-cpu",
                "--out"):
        assert opt in versus


# Regression guards on the idle figures, from this machine's small runs
# (bin/cometd-bench idle --n 2000 --modes greenlet,pool --quiet-wait 0 --settle 0.5
# --interval 0.1 --measure 0.5, unpaced, three runs at 8077bf8: greenlet 6.80-6.81 KiB,
# pool 0.44-0.45 KiB, nchan 11.4-11.5 KiB per connection). RSS per held
# connection is steady from run to run, unlike the system-wide kernel counters.
IDLE_N = 2000
MAX_RSS_PER_CONN = {"greenlet": 8.5 * 1024, "pool": 1.5 * 1024}


def test_idle_small(tmp_path):
    out = tmp_path / "idle"
    nchan = nchan_available() is not None
    # Paced so the ramp spans several polls: unpaced, 2,000 connections can all
    # be there by the first, and the server-side ramp rate is then unknown.
    proc = run_bench("idle", "--n", str(IDLE_N), "--modes", "greenlet,pool",
                     "--ramp-rate", "4000", "--quiet-wait", "0", "--settle", "0.5",
                     "--interval", "0.1", "--measure", "0.5", "--out", str(out))
    assert str(out / "report.md") in proc.stdout
    assert "[bench" in proc.stderr  # progress on stderr

    summary = json.loads((out / "summary.json").read_text())
    results = {r["server"]: r for r in summary["results"]}
    assert set(results) == {"greenlet", "pool", *(["nchan"] if nchan else [])}
    for server, r in results.items():
        assert r["held"] == IDLE_N, server
        assert r["floodtest"]["opened"] == IDLE_N
        assert r["floodtest"]["connect_errors"] == 0
        assert r["rss_at_n"] > r["rss_before"] > 2**20
        assert r["rss_per_conn"] > 0, server
        # System-wide kernel counters move with whatever else the machine does
        # (other test runs here): only check that they were read.
        assert math.isfinite(r["kernel_per_conn"])
        assert r["ramp_s"] > 0 and r["ramp_rate"] > 0, server
        # first to last: every connection over the whole ramp, not a slope
        # (ramp_s is rounded to 10 ms)
        rate = r["ramp_rate_first_last"]
        assert rate > 0 and abs(rate * r["ramp_s"] - r["held"]) <= rate * 0.005 + 1, server
    for mode, limit in MAX_RSS_PER_CONN.items():
        assert results[mode]["rss_per_conn"] < limit, (mode, results[mode]["rss_per_conn"])

    report = (out / "report.md").read_text()
    assert f"bin/cometd-bench idle --n {IDLE_N}" in report  # the exact command line
    assert "cometd greenlet" in report and "cometd pool" in report
    if not nchan:
        assert "nchan skipped: not installed" in report
    for server, r in results.items():
        assert f"**{r['rss_per_conn'] / 1024:.2f}**" in report, server
        assert f"| {fmt(r['ramp_rate_first_last'], 0)} / " in report, server
    graphs = ["idle-rss.png", "idle-kernel.png", "idle-ramp.png"]
    for g in graphs:
        assert f"]({g})" in report
    check_pngs(out, graphs)
    assert (out / "samples.csv").read_text().count("\ngreenlet,") > 5


def test_fanout_tiny(tmp_path):
    out = tmp_path / "fanout"
    data = tmp_path / "data"
    args = ["fanout-latency", "--users", "2000", "--m", "5", "--connections", "400",
            "--duration", "2", "--step-duration", "1", "--step-start", "100", "--step-max", "200",
            "--interval", "0.25", "--data-dir", str(data), "--out", str(out)]
    proc = run_bench(*args)
    assert str(out / "report.md") in proc.stdout
    assert list(data.glob("db-U2000-m5-s1/BENCH-LOADED.json"))  # the dataset is cached

    summary = json.loads((out / "summary.json").read_text())
    assert summary["dataset"]["friendships"] == 5 + (2000 - 5 - 1) * 5
    results = {r["server"]: r for r in summary["results"]}
    assert set(results) == {"greenlet", "pool"}
    for mode, r in results.items():
        assert r["connections"] == 400, mode
        assert 1 <= len(r["steps"]) <= 2
        assert r["saturating_rate"] > 0
        assert math.isclose(r["rate"], 0.5 * r["saturating_rate"])
        assert r["messages"] > 0 and r["deliveries"] > 0
        assert r["deliveries_per_msg"] >= 1  # the subject's friends among users 1..400
        assert r["deliveries_per_s"] > 0
        assert r["server_cpu_s"] > 0
        assert r["deliveries_per_cpu_s"] > 0
        assert math.isclose(r["cpu_s_per_100k"] * r["deliveries_per_cpu_s"], 1e5, rel_tol=1e-6)
        lat = r["latency_ms"]
        assert r["timed_messages"] > 0
        assert 0 < lat["p50"] <= lat["p99"] <= lat["max"] < 30_000
        assert r["slow_consumers_dropped"] == 0
        # Every count agrees with what was sent and what arrived: the server's
        # counters over the window, msggen's replies, floodtest's streams.
        sent = json.loads((out / "logs" / f"msggen-{mode}-run.json").read_text())
        assert (sent["errors"], sent["missed"], r["msggen_errors"]) == (0, 0, 0), sent
        assert r["messages"] == sent["sent"], (r["messages"], sent)
        assert r["deliveries"] == sent["deliveries"], (r["deliveries"], sent)
        assert r["timed_messages"] == r["deliveries"]  # each delivery reached floodtest
        assert r["floodtest_closed"] == 0 and r["floodtest_connect_errors"] == 0

    report = (out / "report.md").read_text()
    assert "bin/cometd-bench fanout-latency --users 2000" in report
    assert "deliveries per server CPU-s" in report and "latency p99" in report
    graphs = ["fanout-cpu.png", "fanout-deliveries.png", "fanout-saturation.png"]
    for g in graphs:
        assert f"]({g})" in report
    check_pngs(out, graphs)


def test_bad_modes_are_refused(tmp_path):
    proc = subprocess.run([sys.executable, BENCH, "idle", "--modes", "greenlet,threads",
                           "--out", str(tmp_path / "x")], capture_output=True, text=True,
                          cwd=ROOT, timeout=60)
    assert proc.returncode == 2
    assert "modes" in proc.stderr


def test_ramp_rate_interpolates_between_polls():
    # 0 -> 1000 connections in 1 s, polled every 0.25 s, on top of 5 already there
    points = [(10.0 + 0.25 * i, 5 + min(1000, 250 * i)) for i in range(8)]
    assert _ramp_rate(points, 1000, 5) == pytest.approx(1000.0)
    assert _ramp_rate(points[:2], 1000, 5) is None


def test_kernel_counters_are_read():
    k = kernel_counters()
    assert k["slab"] > 0
    assert k["tcp_inuse"] >= 0 and k["tcp_mem"] >= 0


def test_report_names_nginx_only_when_nchan_ran_and_says_where_baselines_come_from(tmp_path):
    out = tmp_path / "idle"
    run_bench("idle", "--n", "100", "--modes", "pool", "--no-nchan", "--quiet-wait", "0",
              "--settle", "0.2", "--interval", "0.1", "--measure", "0.3", "--out", str(out))
    report = (out / "report.md").read_text()
    versions = next(line for line in report.splitlines() if line.startswith("- Python "))
    assert "gevent" in versions and "nginx" not in versions, versions
    assert "nginx" not in json.loads((out / "summary.json").read_text())["machine"]
    assert "from the issue" not in report
    assert "Baselines for comparison, measured earlier on this machine and not by this run" \
        in report

    # A run that does measure nginx + nchan names the version it ran.
    nginx = tmp_path / "nginx"
    nginx.write_text("#!/bin/sh\necho 'nginx version: nginx/1.99.9' >&2\n")
    nginx.chmod(0o755)
    lines = machine_lines(machine_info(str(nginx)))
    assert "- Python " in lines[2] and lines[2].endswith(", nginx nginx/1.99.9"), lines

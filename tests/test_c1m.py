"""bench/c1m.py on a small scale: its plan, its sysctls and its parsing of floodtest.

The real run goes in a fresh network namespace (``unshare -n``), where the
net.* sysctls it sets are the namespace's own; the few global ones (fs.*,
vm.max_map_count) are only ever raised, and put back at the end.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
C1M = os.path.join(ROOT, "bench", "c1m.py")
sys.path.insert(0, os.path.join(ROOT, "bench"))
import c1m  # noqa: E402


def test_dry_run_prints_the_plan_and_check_systems_sysctls_and_changes_nothing(tmp_path):
    from cometd.syscheck import SYSCTLS

    before = {name: c1m.read_sysctl(name) for name in SYSCTLS
              if name not in ("fs.file-nr", "net.netfilter.nf_conntrack_count")}
    proc = subprocess.run([sys.executable, C1M, "--dry-run", "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "plan: 1,000,000 connections, 53 edges (pool), 53 floodtest processes" in proc.stderr
    # The sysctls are cometd check-system's for the same plan, and only those.
    check = subprocess.run([sys.executable, os.path.join(ROOT, "bin", "cometd"), "check-system",
                            "--connections", "1000000", "--mode", "pool", "--workers", "53",
                            "--clients-here", "--json"], capture_output=True, text=True,
                           timeout=60)
    wanted = json.loads(check.stdout)["sysctls"]
    printed = [line for line in proc.stderr.splitlines() if line.startswith("c1m:   sysctl ")]
    assert len(printed) == len(wanted)
    for name, value in wanted.items():
        assert f"sysctl {name} = {value}   (now: {before[name]})" in proc.stderr, name
    assert {name: c1m.read_sysctl(name) for name in before} == before
    assert not (tmp_path / "out").exists()


# Inside the namespace: loopback up, the sysctls before, c1m in the background
# while they are polled, the sysctls after; one JSON line on stdout.
IN_NAMESPACE = textwrap.dedent("""
    import json, subprocess, sys, time
    sys.path.insert(0, "bench")
    import c1m
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    # The namespace's own sysctls, set short of what 300 connections need,
    # so that check-system asks c1m to raise them.
    c1m.write_sysctl("net.core.somaxconn", "128")
    c1m.write_sysctl("net.ipv4.tcp_max_tw_buckets", "100")
    # 400 ports: 300 connections a source address do not fit in half of them
    c1m.write_sysctl("net.ipv4.ip_local_port_range", "40000 40399")
    names = ["net.core.somaxconn", "net.ipv4.tcp_max_tw_buckets", "net.ipv4.tcp_wmem",
             "net.ipv4.ip_local_port_range", "net.ipv4.tcp_child_ehash_entries",
             "kernel.sched_autogroup_enabled"]
    snap = lambda: {k: c1m.read_sysctl(k) for k in names}
    before, seen = snap(), {}
    run = subprocess.Popen([sys.executable, "bench/c1m.py", *sys.argv[1:]],
                           stdout=subprocess.DEVNULL, stderr=open(sys.argv[-1] + ".log", "w"))
    while run.poll() is None:
        for k, v in snap().items():
            seen.setdefault(k, set()).add(v)
        time.sleep(0.2)
    print(json.dumps({"rc": run.returncode, "before": before, "after": snap(),
                      "seen": {k: sorted(v, key=str) for k, v in seen.items()}}))
""")


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None
                    or shutil.which("ip") is None,
                    reason="needs root, unshare and ip (bin/dev test installs iproute2)")
def test_small_run_applies_and_restores_sysctls_and_reads_floodtest(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(
        ["unshare", "-n", sys.executable, "-c", IN_NAMESPACE, "--connections", "300",
         "--edges", "1", "--client-processes", "1", "--hold", "1", "--msg-rate", "50",
         "--msg-duration", "1", "--check", "--netns", "--timeout", "90", "--out", str(out)],
        capture_output=True, text=True, cwd=ROOT, timeout=180,
        env={**os.environ, "TMPDIR": str(tmp_path)})  # c1m's logs dir: ours, cleaned up
    assert proc.returncode == 0 and proc.stdout, proc.stderr
    assert [p.name[:4] for p in tmp_path.glob("c1m-*")] == ["c1m-"]
    got = json.loads(proc.stdout)
    log = (out.parent / "out.log").read_text()
    assert got["rc"] == 0, log
    # Every sysctl it could set was set during the run and is back afterwards.
    assert got["after"] == got["before"], log
    res = json.loads((out / "c1m.json").read_text())
    # check-system's answer for 300 connections here: 4096, 2 x 300 rounded up, and
    # the wide port range
    # the wide port range, and (--netns) the established hash of the run's own namespace
    # (autogroups: where the kernel has them)
    autogroups = os.path.exists("/proc/sys/kernel/sched_autogroup_enabled")
    assert res["sysctls"] == {"net.core.somaxconn": "4096",
                              "net.ipv4.ip_local_port_range": "1024 65535",
                              "net.ipv4.tcp_max_tw_buckets": "100000",
                              "net.ipv4.tcp_child_ehash_entries": "1024",
                              **({"kernel.sched_autogroup_enabled": "0"} if autogroups else {})
                              }, log
    assert res["autogroup"] == ("0" if autogroups else None)  # read during the run
    # The run was in a namespace of its own, whose table is its own (a shared one reads
    # negative), with its own net.* sysctls set there too.
    assert res["netns"] and res["tcp_ehash_entries"] == 1024, log
    assert "in a network namespace of its own, 3 of its sysctls set" in log
    for name, value in res["sysctls"].items():
        assert value in got["seen"][name], (name, got["seen"][name])
        assert res["sysctls_previous"][name] == got["before"][name]
    assert "restored" in log
    assert res["router_nice"] == -10  # read from the router process itself
    assert res["msggen_nice"] == -10  # and from msggen, the offered load
    # The router's presence beside the edges' streams: every user online, as it knows.
    assert (res["edge_counts_full"]["presence_users"],
            res["edge_counts_full"]["presence_edges"]) == (300, 1), res["edge_counts_full"]
    # The ramp ended by parsing floodtest's progress lines (else: timeout), and
    # the figures come from floodtest's and msggen's JSON.
    assert res["connections_held"] == 300 and res["client_open_max"] == 300, res
    assert (res["connect_errors"], res["closed_early"]) == (0, 0), res
    assert (res["msg_errors"], res["msgs_missed"]) == (0, 0), res
    assert res["msgs_sent"] > 0
    # Published by XADD to the stream the router ingests (no delivered count comes back),
    # and every delivery checked against the friends graph.
    assert res["publish"] == "redis-stream" and res["msg_deliveries_reported"] == 0, res
    assert res["msgs_received"] > res["msgs_sent"], res
    assert res["delivery_check"].endswith(" 0 missing, 0 duplicates, 0 unexpected"), res
    assert f"{res['msgs_sent']} messages published" in res["delivery_check"], res
    assert res["delivery_latency_ms"]["count"] == res["msgs_received"]
    # The messages' CPU split by process: each of ours did work for them (msggen's
    # too, read after it exited), and the split adds up to the machine's busy time.
    cpu = res["msgs_cpu_us_per_delivery"]
    assert all(cpu[g] > 0 for g in ("edges", "router", "redis", "floodtest", "msggen")), cpu
    parts = sum(cpu[g] for g in ("edges", "router", "redis", "floodtest", "msggen", "rest"))
    assert parts == pytest.approx(cpu["machine_busy"], abs=0.1), cpu
    # The ramp's too, with the hypervisor's steal beside it (not our machine's work).
    ramp = res["ramp_cpu_us_per_conn"]
    parts = sum(ramp[g] for g in ("edges", "router", "redis", "floodtest", "rest"))
    assert ramp["edges"] > 0 and ramp["floodtest"] > 0, ramp
    assert parts == pytest.approx(ramp["machine_busy"], abs=0.5), ramp
    assert ramp["machine_steal"] >= 0 and cpu["machine_steal"] >= 0, (ramp, cpu)
    # The report does not pass the missing count off as zero deliveries.
    report = (out / "README.md").read_text()
    assert "| deliveries | not reported by the server (published by XADD" in report
    # The clock every loop reads, as the kernel had it before the ramp.
    clock = res["clock"]
    with open("/sys/devices/system/clocksource/clocksource0/current_clocksource") as f:
        assert clock["clocksource"] == f.read().strip(), clock
    assert clock["monotonic_ns"] > 0 and {"user_ns", "system_ns"} <= clock.keys(), clock
    assert f"| clock (before the ramp) | {clock['clocksource']}: " in report
    assert "| CPU per delivery received, end of the hold" in report


def test_the_ramp_is_done_when_every_connect_is_resolved_not_when_none_is_pending():
    """floodtest's progress lines (as it prints them): a late ramp has nothing pending
    while it still has connects to start, so only open + closed + failed >= n ends it."""
    line = ("[  96.1s] Open={} Closed={} Chunks=1168468 (5059/s) Bytes=1 ConnectErrors={} "
            "Pending={} NoResponse=0 latency -\n")
    n = 1_000_000
    assert not c1m.ramp_resolved(line.format(978_431, 0, 0, 0), n)  # attempt 15's early end
    assert not c1m.ramp_resolved(line.format(999_000, 0, 990, 10), n)  # 10 still connecting
    assert c1m.ramp_resolved(line.format(n, 0, 0, 0), n)
    assert c1m.ramp_resolved(line.format(999_000, 10, 990, 0), n)  # every one resolved
    # Only the last line counts; nothing printed yet is not done.
    assert not c1m.ramp_resolved(line.format(n, 0, 0, 0) + line.format(5, 0, 0, 0), n)
    assert not c1m.ramp_resolved("floodtest: 53 processes\n", n)

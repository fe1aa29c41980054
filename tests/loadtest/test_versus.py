"""Tests for ``cometd-bench fanout`` (cometd.loadtest.versus): cometd beside nginx + nchan.

A tiny real run (a fresh nginx + nchan and a fresh cometd, real reader and
publisher processes) checks that both servers are held to the same work: the
same messages reach the same users, nchan's users with more than 254 friends
included, and the reader's count agrees with cometd's own.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from cometd.loadtest.servers import nchan_available
from cometd.loadtest.versus import NCHAN_MAX_CHANNELS, feed_paths, spread

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BENCH = os.path.join(ROOT, "bin", "cometd-bench")


def test_feed_paths_give_each_user_its_own_and_every_friends_channel():
    hub = list(range(2, 2 + 300))  # user 1 has 300 friends: more than one nchan stream
    friends = {1: hub, **{u: [1] for u in hub}}
    cometd, nchan = feed_paths(friends, 301)
    assert cometd == [f"/test/{u}" for u in range(1, 302)]
    channels: dict[int, list[int]] = {}
    for path in nchan:
        ids = [int(c) for c in path.removeprefix("/sub/").split(",")]
        assert len(ids) <= NCHAN_MAX_CHANNELS
        channels.setdefault(ids[0] if ids[0] != 1 and len(ids) == 2 else 1, []).extend(ids)
    assert sorted(channels[1]) == [1, *hub]  # all 301 channels, each once, in 2 streams
    assert sum(1 for p in nchan if p.startswith("/sub/1,")) == 1
    assert len(nchan) == 2 + 300
    for u in hub:
        assert f"/sub/{u},1" in nchan


def test_spread_is_median_min_max():
    assert spread([3.0, 1.0, 2.0]) == "2.00 (1.00–3.00)"
    assert spread([]) == "n/a"


@pytest.mark.skipif(nchan_available() is None, reason="nginx + libnginx-mod-nchan not installed")
def test_tiny_side_by_side_run_holds_both_servers_to_the_same_deliveries(tmp_path):
    out, data = tmp_path / "out", tmp_path / "data"
    # m=100 over 300 users: the oldest users have more than 254 friends.
    args = ["fanout", "--rounds", "1", "--scenarios", "one,feed,feed-batch",
            "--contenders", "nchan,pool", "--feed-batch", "10",
            "--one-subscribers", "50", "--one-count", "10", "--one-rate", "20",
            "--feed-users", "300", "--m", "100", "--feed-count", "20", "--feed-rate", "20",
            "--settle", "0.2", "--data-dir", str(data), "--out", str(out)]
    proc = subprocess.run([sys.executable, BENCH, *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    runs = {(r["scenario"], r["contender"]): r for r in summary["results"]}
    assert set(runs) == {("one", "nchan"), ("one", "pool"), ("feed", "nchan"), ("feed", "pool"),
                         ("feed-batch", "pool")}  # nchan cannot batch
    for key, r in runs.items():
        assert (r["published"], r["msggen_errors"], r["reader_closed"]) == (
            10 if key[0] == "one" else 20, 0, 0), (key, r)
        assert r["server_cpu_s"] >= 0, key  # (nchan's may be below one 10 ms tick)
    for c in ("nchan", "pool"):
        assert runs[("one", c)]["deliveries"] == 10 * 50, c
    assert runs[("one", "pool")]["server_deliveries"] == 500
    feed = runs[("feed", "pool")]["deliveries"]
    assert feed > 20 * 100  # every subject has >= 100 friends online
    assert runs[("feed", "pool")]["server_deliveries"] == feed
    assert runs[("feed", "nchan")]["deliveries"] == feed  # the same users got the same messages
    # the same messages again, ten to a POST /publish
    assert runs[("feed-batch", "pool")]["deliveries"] == feed
    assert (runs[("feed", "pool")]["requests"], runs[("feed-batch", "pool")]["requests"]) == (20, 2)
    assert summary["extra"]["capped_users"] > 0
    assert summary["extra"]["nchan_feed_streams"] > 300
    report = (out / "report.md").read_text()
    assert "| pool / nchan |" in report
    assert "one: deliveries per server CPU-s" in report and "feed, pool: ≥ 4× nchan" in report
    row = next(line for line in report.splitlines() if line.startswith("| feed-batch: "))
    assert "msggen --batch 10" in row and "| n/a |" in row
    # Two batched requests can take less than one 10 ms CPU tick: then there is no ratio.
    measured = runs[("feed-batch", "pool")]["server_cpu_s"] > 0 and \
        runs[("feed", "nchan")]["server_cpu_s"] > 0
    assert row.endswith("× |") if measured else row.endswith("| n/a | n/a | n/a |"), row

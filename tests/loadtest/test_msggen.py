"""Tests for bin/msggen, run as a real subprocess against the protocol stand-in.

The stand-in HTTP server lives in tests/loadtest/test_floodtest.py (see its docstring);
it is loaded here by path so both files share one stand-in. It counts every
POST by subject and body size, so the tests check what actually went over the
wire, not just what msggen says it sent.
"""

from __future__ import annotations

import importlib.util
import json
import re
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from conftest import get_stats, http_json, http_request, start_server, wait_for

ROOT = Path(__file__).resolve().parents[2]
MSGGEN = ROOT / "bin" / "msggen"
FLOODTEST = ROOT / "bin" / "floodtest"

_spec = importlib.util.spec_from_file_location(
    "floodtest_standin", Path(__file__).with_name("test_floodtest.py")
)
_standin = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_standin)
StandIn, run_tool = _standin.StandIn, _standin.run_tool


@pytest.fixture
def server():
    s = StandIn()
    yield s
    s.close()


def url(server) -> str:
    return f"http://127.0.0.1:{server.port}"


def test_rate_is_honoured_and_bodies_carry_ts(server, tmp_path):
    s, text = run_tool(
        MSGGEN, "--url", url(server), "--rate", "200", "--duration", "2", "--interval", "0.5",
        "--users", "50", tmp_path=tmp_path,
    )
    stats = server.stats()
    assert s["errors"] == 0 and not s["timed_out"]
    # The schedule is 200/s for 2 s: never more, and every slot either sent or
    # counted as missed (the achieved rate under load is the benchmarks' business).
    assert s["sent"] <= 401 and 399 <= s["sent"] + s["missed"] <= 401, s
    assert s["achieved_rate"] <= 200 * 1.05
    assert sum(stats["posts"].values()) == s["sent"] == stats["ts_bodies"]
    assert set(stats["posts"]) <= {str(i) for i in range(1, 51)}
    assert 0 < s["latency_ms"]["p50"] <= s["latency_ms"]["p99"] < 500
    assert 1.9 <= s["duration_s"] < 2 + 3
    assert text.count("sent=") >= 3 and "deliveries=" in text


def test_count_stops_after_that_many_slots(server, tmp_path):
    s, _ = run_tool(
        MSGGEN, "--url", url(server), "--rate", "100", "--duration", "5", "--count", "37",
        "--users", "5", tmp_path=tmp_path,
    )
    assert s["errors"] == 0 and s["sent"] + s["missed"] == 37, s
    assert sum(server.stats()["posts"].values()) == s["sent"]
    assert s["duration_s"] < 3  # it ends after slot 37, not at --duration


def test_zipf_skews_subjects(server, tmp_path):
    s, _ = run_tool(
        MSGGEN, "--url", url(server), "--rate", "0", "--duration", "1", "--users", "100",
        "--zipf", "1.2", "--seed", "7", tmp_path=tmp_path,
    )
    posts = Counter(server.stats()["posts"])
    assert s["sent"] == sum(posts.values()) > 1000
    assert posts.most_common(1)[0][0] == "1"
    # weight of user 1 is 1 / sum(k**-1.2, k=1..100) ~ 0.28
    assert 0.22 < posts["1"] / s["sent"] < 0.34
    assert posts["1"] > posts["2"] > posts["10"]


def test_uniform_subjects_and_padding(server, tmp_path):
    s, _ = run_tool(
        MSGGEN, "--url", url(server), "--rate", "0", "--duration", "1", "--users", "20",
        "--size", "500", "--concurrency", "4", tmp_path=tmp_path,
    )
    stats = server.stats()
    posts = Counter(stats["posts"])
    assert set(posts) == {str(i) for i in range(1, 21)}
    assert max(posts.values()) < 2 * min(posts.values())
    assert stats["sizes"] == {"500": s["sent"]}


def test_slow_server_reports_achieved_rate_without_queueing(tmp_path):
    slow = StandIn("--post-delay", "0.05")
    try:
        s, _ = run_tool(
            MSGGEN, "--url", url(slow), "--rate", "1000", "--duration", "1.5",
            "--concurrency", "2", tmp_path=tmp_path,
        )
    finally:
        slow.close()
    # two senders, 50 ms per POST: at most ~40/s against 1000/s asked. What
    # cannot be sent is counted as missed, not queued: the run ends on time.
    assert 0 < s["achieved_rate"] <= 42
    assert s["missed"] > 1000
    # (the slots of the last POSTs still in flight at the end are neither: 50 ms
    # each when idle, several times that on a loaded two-core box, so allow 0.5 s)
    assert 1000 * (1.5 - 0.5) <= s["sent"] + s["missed"] <= 1000 * 1.5 + 2, s
    assert s["duration_s"] < 1.5 + 1.0


def test_oversized_messages_are_errors(server, tmp_path):
    s, _ = run_tool(
        MSGGEN, "--url", url(server), "--rate", "50", "--duration", "0.4", "--size", "70000",
        tmp_path=tmp_path,
    )
    assert s["sent"] == 0 and s["errors"] >= 15
    assert s["errors_by_kind"] == {"http-413": s["errors"]}


def test_dead_server_is_counted_not_raised(tmp_path):
    with socket.socket() as sock:  # bound, not listening: refused, and ours meanwhile
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        t = time.monotonic()
        s, _ = run_tool(
            MSGGEN, "--url", f"http://127.0.0.1:{port}", "--rate", "100", "--duration", "0.5",
            tmp_path=tmp_path,
        )
    assert s["sent"] == 0 and s["errors"] > 0
    assert set(s["errors_by_kind"]) == {"connect:ConnectionRefusedError"}
    assert time.monotonic() - t < 5


@pytest.mark.parametrize(
    "target", ["http://10.0.0.1:8000", "https://127.0.0.1:8000", "http://8.8.8.8"]
)
def test_non_loopback_or_non_http_refused(target):
    proc = subprocess.run(
        [sys.executable, str(MSGGEN), "--url", target, "--duration", "0.1"],
        capture_output=True, text=True, timeout=10,
    )
    assert proc.returncode == 2
    assert ("loopback" in proc.stderr or "http://" in proc.stderr), proc.stderr
    assert "Traceback" not in proc.stderr


def test_end_to_end_with_floodtest(tmp_path):
    """floodtest holds users 1..30, msggen publishes to them, floodtest times delivery."""
    server = StandIn()
    try:
        ft_json = tmp_path / "ft.json"
        flood = subprocess.Popen(
            [sys.executable, str(FLOODTEST), "--port", str(server.port), "--n", "30",
             "--rate", "0", "--duration", "2.5", "--json", str(ft_json)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        deadline = time.monotonic() + 5
        while server.stats()["streams"] < 30:
            assert time.monotonic() < deadline, "floodtest did not connect"
            time.sleep(0.05)
        m, _ = run_tool(
            MSGGEN, "--url", url(server), "--rate", "200", "--duration", "1", "--users", "30",
            "--size", "100", tmp_path=tmp_path,
        )
        out, _ = flood.communicate(timeout=15)
        assert flood.returncode == 0, out
    finally:
        server.close()

    f = json.loads(ft_json.read_text())
    assert m["errors"] == 0 and m["deliveries"] == m["sent"] >= 190
    assert f["messages"] == m["sent"]
    assert f["chunks"] == f["messages"] + 30
    assert f["latency_ms"]["count"] == m["sent"]
    assert 0 < f["latency_ms"]["p50"] < 50 and f["latency_ms"]["max"] < 1000


def test_make_body_contract():
    from cometd.loadtest.msggen import SubjectSampler, make_body

    body = make_body(42, 17, 64, now=1764140000.1234567)
    assert body.startswith(b"ts=1764140000.123457;from=42;seq=17;") and len(body) == 64
    assert re.fullmatch(rb"ts=\d+\.\d{6};from=\d+;seq=\d+;", make_body(1, 2))
    sample = SubjectSampler(5, seed=1)
    assert {sample() for _ in range(500)} == {1, 2, 3, 4, 5}


def test_end_to_end_with_floodtest_against_real_cometd(tmp_path, mode):
    """The same pair against `bin/cometd` itself: every user's stream gets its own
    messages and those of the one user it follows, and all three counts agree."""
    srv = start_server(str(tmp_path / "db"), "--mode", mode, "--admin-port", "-1")
    try:
        n = 30
        # user i follows user i - 1 (and 1 follows n): two streams per subject
        pairs = [[str(i), str(i - 1 if i > 1 else n)] for i in range(1, n + 1)]
        assert http_json(srv, "POST", "/subscriptions", pairs) == (200, {"added": n})
        ft_json = tmp_path / "ft.json"
        flood = subprocess.Popen(
            [sys.executable, str(FLOODTEST), "--port", str(srv.port), "--n", str(n),
             "--rate", "0", "--duration", "4", "--json", str(ft_json)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        wait_for(lambda: get_stats(srv)["connections"] == n, 10, what="floodtest's streams")
        m, _ = run_tool(
            MSGGEN, "--url", srv.url, "--rate", "100", "--duration", "1", "--users", str(n),
            "--size", "100", tmp_path=tmp_path,
        )
        out, _ = flood.communicate(timeout=20)
        assert flood.returncode == 0, out
        stats = get_stats(srv)
    finally:
        srv.stop()
    f = json.loads(ft_json.read_text())
    assert (m["errors"], m["missed"]) == (0, 0), m
    assert m["sent"] > 0 and m["deliveries"] == 2 * m["sent"], m
    assert stats["messages_sent"] == m["sent"] and stats["deliveries"] == m["deliveries"]
    assert (f["opened"], f["welcomed"], f["connect_errors"], f["closed"]) == (n, n, 0, 0), f
    assert f["messages"] == m["deliveries"]
    assert f["chunks"] == f["messages"] + n
    assert f["latency_ms"]["count"] == f["messages"]
    assert "Traceback" not in "".join(srv.output)


def test_batch_posts_n_messages_a_request_and_records_every_id(tmp_path):
    """--batch 10 against `bin/cometd`: /publish gets ten messages a request; each is
    taken, counted and recorded with its own id."""
    srv = start_server(str(tmp_path / "db"), "--admin-port", "-1")
    record = tmp_path / "ids.txt"
    try:
        m, text = run_tool(
            MSGGEN, "--url", srv.url, "--rate", "200", "--duration", "1", "--users", "20",
            "--batch", "10", "--concurrency", "2", "--record", str(record), tmp_path=tmp_path,
        )
        stats = get_stats(srv)
        _, _, metrics = http_request(srv, "GET", "/metrics")
    finally:
        srv.stop()
    assert "/publish (10 a request" in text
    assert (m["errors"], m["missed"]) == (0, 0) and m["sent"] >= 150, m
    assert stats["messages_sent"] == m["sent"]
    lines = record.read_text().splitlines()
    assert len(lines) == m["sent"] == len({line.split()[1] for line in lines})
    assert {line.split()[0] for line in lines} <= {str(i) for i in range(1, 21)}
    requests = re.search(rb"\ncometd_fast_publishes_total (\S+)", metrics)
    assert requests and float(requests[1]) == m["sent"] / 10, m


def test_via_redis_stream_every_message_is_recorded_and_delivered(tmp_path, redis_server):
    """msggen XADDs, cometd ingests; the ids written back match what floodtest received."""
    n = 30
    friends = tmp_path / "friends.txt"
    friends.write_text("".join(f"{i} {i % n + 1}\n" for i in range(1, n + 1)))
    srv = start_server(str(tmp_path / "db"), "--admin-port", "-1", "--ingest-stream", "s",
                       "--ingest-redis", redis_server.url)
    received, published = tmp_path / "received.txt", tmp_path / "published.txt"
    try:
        pairs = [[a, b] for a, b in (line.split() for line in friends.read_text().splitlines())]
        assert http_json(srv, "POST", "/subscriptions", pairs)[0] == 200
        pairs += [[b, a] for a, b in pairs]
        assert http_json(srv, "POST", "/subscriptions", pairs)[0] == 200
        flood = subprocess.Popen(
            [sys.executable, str(FLOODTEST), "--port", str(srv.port), "--n", str(n), "--events",
             "--record", str(received), "--duration", "4", "--interval", "60"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        wait_for(lambda: get_stats(srv)["connections"] == n, 10, what="floodtest's streams")
        m, text = run_tool(
            MSGGEN, "--via", "redis-stream", "--redis", redis_server.url, "--stream", "s",
            "--rate", "200", "--duration", "1.5", "--users", str(n), "--record", str(published),
            tmp_path=tmp_path)
        out, _ = flood.communicate(timeout=20)
        assert flood.returncode == 0, out
    finally:
        srv.stop()
    assert m["via"] == "redis-stream" and m["errors"] == 0 and m["sent"] >= 250, m
    assert "XADD s at redis://" in text
    lines = published.read_text().splitlines()
    assert len(lines) == m["sent"]
    done = subprocess.run(
        [sys.executable, str(ROOT / "bin" / "cometd-bench"), "check", str(friends),
         str(published), str(received), "--users", f"1-{n}"],
        capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"{m['sent']} messages published, {3 * m['sent']} deliveries expected" in done.stdout
    assert "Traceback" not in "".join(srv.output)


@pytest.mark.parametrize("target", ["redis://10.0.0.1:6379/0", "rediss://127.0.0.1:6379/0",
                                    "redis://127.0.0.1:x/0"])
def test_via_redis_stream_refuses_other_redis_urls(target, tmp_path):
    done = subprocess.run([sys.executable, str(MSGGEN), "--via", "redis-stream", "--redis",
                           target, "--duration", "0.1"], capture_output=True, text=True,
                          timeout=30)
    assert done.returncode == 2 and "--redis" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr

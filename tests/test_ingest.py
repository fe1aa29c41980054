"""cometd.ingest: messages a backend XADDs to a Redis Stream are routed, acked, never lost.

Real ``redis-server`` (conftest ``redis_server``), real cometd processes: the
single-process server with ``--ingest-redis``, and the router of ``--workers``.
"""

from __future__ import annotations

import json
import signal
import time

import pytest
import redis
from conftest import http_request, start_cometd, start_server, unique_id, wait_for
from test_history import events, open_stream, subscribe
from test_workers import SUPERVISOR_READY, kill_leftovers, strays

from cometd.config import ConfigError, load

STREAM = "cometd:messages"


def ingesting(tmp_path, redis_url: str, *args: str):
    return start_server(str(tmp_path / "db"), "--ingest-stream", STREAM, "--ingest-redis",
                        redis_url, "--ingest-consumer", "c1", *args)


def pending(r: redis.Redis) -> int:
    return r.xpending(STREAM, "cometd")["pending"]


def replies(r: redis.Redis, key: str, n: int) -> list[list[str]]:
    """The first *n* lines cometd wrote back to *key*, split (waits for them)."""
    wait_for(lambda: r.llen(key) >= n, 10, what=f"{n} replies on {key}")
    return [line.decode().split(" ", 2) for line in r.lrange(key, 0, -1)]


def metric(srv, sample: str) -> float:
    """The value of one sample (``name`` or ``name{labels}``) in the server's /metrics."""
    status, _, body = http_request(srv, "GET", "/metrics")
    assert status == 200
    for line in body.decode().splitlines():
        if line.split(" ")[0] == sample:
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{sample} not in /metrics")


def test_an_entry_reaches_the_streams_and_is_acked_with_its_id_written_back(
        tmp_path, redis_server):
    r = redis.Redis.from_url(redis_server.url)
    srv = ingesting(tmp_path, redis_server.url)
    try:
        me, friend = unique_id("me"), unique_id("f")
        subscribe(srv, [(me, friend)])
        with open_stream(srv, f"/events/{me}") as c:
            events(c, 1)  # the welcome
            own = r.xadd(STREAM, {"from": me, "body": "to myself", "reply": "r"})
            other = r.xadd(STREAM, {"from": friend, "body": "from a friend", "reply": "r"})
            got = events(c, 2)
        assert [json.loads(e["data"])["body"] for e in got] == ["to myself", "from a friend"]
        lines = replies(r, "r", 2)
        assert lines == [[own.decode(), got[0]["id"]], [other.decode(), got[1]["id"]]]
        wait_for(lambda: pending(r) == 0, 5, what="all acked")
        wait_for(lambda: metric(srv, 'cometd_ingest_entries_total{result="routed"}') == 2, 5)
        assert metric(srv, "cometd_ingest_pending") == 0
    finally:
        srv.stop()
    assert "Traceback" not in "".join(srv.output)


def test_bad_entries_are_acked_counted_and_logged_once_and_the_next_is_routed(
        tmp_path, redis_server):
    r = redis.Redis.from_url(redis_server.url)
    srv = ingesting(tmp_path, redis_server.url)
    try:
        me = unique_id("me")
        with open_stream(srv, f"/events/{me}") as c:
            events(c, 1)
            bad = [{"body": "no from"}, {"from": me}, {"from": "not an id!", "body": "x"},
                   {"from": me, "body": ""}, {"from": me, "body": "x" * (64 * 1024 + 1)},
                   {"from": "bad id", "body": "again"}]
            for fields in bad:
                r.xadd(STREAM, {**fields, "reply": "r"})
            r.xadd(STREAM, {"from": me, "body": "good", "reply": "r"})
            assert json.loads(events(c, 1)[0]["data"])["body"] == "good"
        lines = replies(r, "r", len(bad) + 1)
        assert [line[1:] for line in lines[:len(bad)]] == [
            ["rejected", "missing from or body"], ["rejected", "missing from or body"],
            ["rejected", "invalid from"], ["rejected", "empty body"],
            ["rejected", "body over 64 KiB"], ["rejected", "invalid from"]]
        wait_for(lambda: pending(r) == 0, 5, what="all acked, the bad ones too")
        wait_for(lambda: metric(srv, 'cometd_ingest_entries_total{result="rejected"}') == 6, 5)
    finally:
        srv.stop()
    out = "".join(srv.output)
    # Said once at once, then counted: "1 more ... in the last 10 s" at the stop.
    assert out.count("warning: 1 stream entry rejected (invalid from)") == 1, out
    assert out.count("warning: 1 more stream entry rejected (invalid from)") == 1, out
    assert "Traceback" not in out


def test_kill_9_between_routing_and_ack_neither_loses_nor_repeats(tmp_path, redis_server):
    """Routed but not acked (Redis refuses XACK), then kill -9: re-read, not routed again;
    read but not routed (as the same consumer), then a restart: routed."""
    r = redis.Redis.from_url(redis_server.url)
    r.acl_setuser("ingest", enabled=True, passwords=["+pw"], keys=["*"], channels=["*"],
                  commands=["+@all", "-xack"])
    url = redis_server.url.replace("redis://", "redis://ingest:pw@")
    me = unique_id("me")
    srv = ingesting(tmp_path, url)
    try:
        with open_stream(srv, f"/events/{me}") as c:
            events(c, 1)
            first = r.xadd(STREAM, {"from": me, "body": "one", "reply": "r"}).decode()
            seen = events(c, 1)[0]
        assert json.loads(seen["data"])["body"] == "one"
        assert replies(r, "r", 1)[0] == [first, seen["id"]]
        assert pending(r) == 1  # XACK refused: still pending
    finally:
        srv.stop(signal.SIGKILL)
    r.acl_setuser("ingest", enabled=True, commands=["+xack"])
    second = r.xadd(STREAM, {"from": me, "body": "two", "reply": "r"}).decode()
    # Read by consumer c1, as cometd would have, and never routed: it died first.
    assert r.xreadgroup("cometd", "c1", {STREAM: ">"}, count=1)[0][1][0][0].decode() == second
    assert pending(r) == 2

    srv = ingesting(tmp_path, url)
    try:
        wait_for(lambda: pending(r) == 0, 10, what="both re-read and acked")
        with open_stream(srv, f"/events/{me}", {"Last-Event-ID": seen["id"]}) as c:
            replay = [e for e in events(c, 2) if "data" in e]
        # Only "two": "one" was routed once, before the kill, and is not routed again.
        assert [json.loads(e["data"])["body"] for e in replay] == ["two"]
        lines = replies(r, "r", 3)
        assert {tuple(line) for line in lines} == {(first, seen["id"]), (second, replay[0]["id"])}
        wait_for(lambda: metric(srv, 'cometd_ingest_entries_total{result="recovered"}') == 1, 5)
    finally:
        srv.stop()
    assert "Traceback" not in "".join(srv.output)


def test_the_router_of_workers_ingests(tmp_path, redis_server):
    r = redis.Redis.from_url(redis_server.url)
    try:
        proc = start_cometd(["--workers", "2", "--redis", redis_server.url, "--port", "0",
                             "--admin-port", "0", "--db", str(tmp_path / "db"),
                             "--ingest-stream", STREAM], SUPERVISOR_READY, timeout=60)
    except RuntimeError:
        kill_leftovers(strays(redis_server.url))
        raise
    try:
        host, port = proc.match.group(1), int(proc.match.group(2))

        class At:
            pass

        at = At()
        at.host, at.port = host, port
        users = [unique_id("u") for _ in range(6)]
        streams = [open_stream(at, f"/events/{u}") for u in users]  # spread over both edges
        try:
            for s in streams:
                events(s, 1)
            time.sleep(0.3)  # the edges report presence in 100 ms batches
            for u in users:
                r.xadd(STREAM, {"from": u, "body": f"hi {u}"})
            for u, s in zip(users, streams, strict=True):
                assert json.loads(events(s, 1)[0]["data"])["body"] == f"hi {u}"
        finally:
            for s in streams:
                s.close()
        wait_for(lambda: pending(r) == 0, 5, what="all acked")
    finally:
        proc.stop(signal.SIGTERM, timeout=15)
        kill_leftovers(strays(redis_server.url))
    assert "Traceback" not in "".join(proc.output)


def test_ingest_options_are_checked():
    with pytest.raises(ConfigError, match="--ingest-stream: needs --ingest-redis"):
        load("single", {"ingest_stream": "s"}, {})
    with pytest.raises(ConfigError, match="--ingest-redis: needs --ingest-stream"):
        load("single", {"ingest_redis": "redis://127.0.0.1:1/0"}, {})
    with pytest.raises(ConfigError, match="--ingest-redis: 'http://x' is not a redis"):
        load("single", {"ingest_stream": "s", "ingest_redis": "http://x"}, {})
    config = load("supervisor", {"workers": "2", "redis": "redis://127.0.0.1:1/0",
                                 "ingest_stream": "s", "ingest_batch": "50"}, {})
    assert (config.ingest.stream, config.ingest.batch, config.ingest.group) == ("s", 50, "cometd")


def test_an_entry_trimmed_while_pending_is_acked_and_counted_not_retried(
        tmp_path, redis_server):
    r = redis.Redis.from_url(redis_server.url)
    r.xgroup_create(STREAM, "cometd", id="$", mkstream=True)
    gone = r.xadd(STREAM, {"from": "a", "body": "read, then trimmed"})
    r.xreadgroup("cometd", "c1", {STREAM: ">"})  # read by c1, which then died
    r.xdel(STREAM, gone)
    srv = ingesting(tmp_path, redis_server.url)
    try:
        wait_for(lambda: pending(r) == 0, 10, what="the trimmed entry acked")
        wait_for(lambda: metric(srv, 'cometd_ingest_entries_total{result="rejected"}') == 1, 5)
        time.sleep(0.5)  # the claim at start has run: it must not count it again
        assert metric(srv, 'cometd_ingest_entries_total{result="rejected"}') == 1
        assert metric(srv, 'cometd_ingest_entries_total{result="routed"}') == 0
    finally:
        srv.stop()
    out = "".join(srv.output)
    assert "stream entry rejected (trimmed)" in out and "Traceback" not in out

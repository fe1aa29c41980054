"""``GET /metrics`` against real servers, read with prometheus_client's own parser.

A scripted session (streams of every transport, sends, refusals, a hang-up,
a slow consumer) and then the exact counter values; the same through
``--workers 2``, where one scrape must show the router and both edges; and
``/metrics`` behind an API key when auth is on.
"""

from __future__ import annotations

import json
import signal
import socket
from types import SimpleNamespace

import prometheus_client
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from cometd.admin import PROMPT
from cometd.metrics import Histogram, merged
from tests.conftest import (
    StreamClient,
    http_json,
    http_request,
    start_cometd,
    start_server,
    unique_id,
    wait_for,
)
from tests.test_history import open_stream, post, subscribe
from tests.test_workers import SUPERVISOR_READY, kill_leftovers, strays


def scrape(srv, headers: dict[str, str] | None = None) -> dict[tuple[str, tuple], float]:
    """(sample name, sorted labels) -> value, from one scrape."""
    status, head, body = http_request(srv, "GET", "/metrics", headers=headers)
    assert status == 200, body
    assert head["content-type"].startswith("text/plain; version=0.0.4")
    samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def value(samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def total(samples, name: str, **labels: str) -> float:
    """The sum of *name* over every other label (e.g. over processes)."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= set(ls))


def test_a_scripted_session_is_counted_exactly(tmp_path, mode):
    srv = start_server(str(tmp_path / "db"), "--mode", mode, "--max-pending", "65536")
    accepts = 0

    def request(*args, **kwargs):
        nonlocal accepts
        accepts += 1
        return http_request(srv, *args, **kwargs)

    def stream(path: str, **kwargs) -> StreamClient:
        nonlocal accepts
        accepts += 1
        return StreamClient.open(srv, path, **kwargs)

    def scrape_counted():
        nonlocal accepts
        accepts += 1
        return scrape(srv)

    try:
        subject, slow_user = unique_id("boss"), unique_id("slow")
        users = [unique_id("u") for _ in range(6)]
        status, _, _ = request("POST", "/subscriptions", json.dumps([[u, subject] for u in users]))
        assert status == 200
        streams = [stream(f"/test/{users[0]}"), stream(f"/test/{users[1]}"),
                   stream(f"/test/{users[2]}", http10=True),
                   stream(f"/events/{users[3]}"), stream(f"/events/{users[4]}"),
                   stream(f"/events/{users[5]}", http10=True)]
        for s in streams[:2]:
            s.chunk()  # the welcome: the stream is in the table
        wait_for(lambda: value(scrape_counted(), "cometd_users_online") == 6, 5,
                 what="6 users online")
        sent = 3
        for i in range(sent):
            status, _, body = request("POST", f"/send/{subject}", f"m{i}")
            assert (status, json.loads(body)["delivered"]) == (200, 6)
        # Refusals, one of each: 400 (empty message), 404, 405, 413.
        assert request("POST", f"/send/{subject}", b"")[0] == 400
        assert request("GET", "/nowhere")[0] == 404
        assert request("GET", f"/send/{subject}")[0] == 405
        assert request("POST", f"/send/{subject}", b"x" * 70_000)[0] == 413
        # One client hangs up.
        streams.pop(0).close()
        wait_for(lambda: value(scrape_counted(), "cometd_disconnects_total",
                               reason="client") == 1, 5, what="the hang-up counted")
        # One slow consumer: it reads nothing and is sent more than --max-pending.
        slow = stream(f"/test/{slow_user}", rcvbuf=4096)
        slow.chunk()
        big = b"y" * 60_000
        slow_sends = 0
        while True:
            slow_sends += 1
            status, _, body = request("POST", f"/send/{slow_user}", big)
            assert status == 200
            if json.loads(body)["delivered"] == 0:
                break
            assert slow_sends < 500, "the slow consumer was never dropped"
        samples = scrape_counted()
        assert value(samples, "cometd_messages_published_total") == sent + slow_sends
        # 6 per send to the subject, then 1 per send the slow user still took
        assert value(samples, "cometd_deliveries_total") == 6 * sent + slow_sends - 1
        assert value(samples, "cometd_slow_consumers_dropped_total") == 1
        assert value(samples, "cometd_disconnects_total", reason="slow") == 1
        assert value(samples, "cometd_disconnects_total", reason="client") == 1
        for reason in ("expired", "kicked", "drain", "shutdown", "error"):
            assert value(samples, "cometd_disconnects_total", reason=reason) == 0
        for status, n in (("400", 1), ("404", 1), ("405", 1), ("413", 1), ("401", 0),
                          ("403", 0), ("429", 0), ("503", 0)):
            assert value(samples, "cometd_rejected_requests_total", status=status) == n, status
        assert value(samples, "cometd_accepts_total") == accepts
        expect = {"chunked": 1, "raw": 1, "sse": 2, "sse_raw": 1}
        for transport, n in expect.items():
            assert value(samples, "cometd_connections", transport=transport, mode=mode) == n
        assert value(samples, "cometd_users_online") == 5
        assert value(samples, "cometd_fanout_size_count") == sent + slow_sends
        assert value(samples, "cometd_fanout_size_sum") == 6 * sent + slow_sends - 1
        assert value(samples, "cometd_fanout_size_bucket", le="5.0") == slow_sends
        assert value(samples, "cometd_publish_to_write_seconds_count") == sent + slow_sends
        assert 0 < value(samples, "cometd_publish_to_write_seconds_sum") < 60
        for result in ("recovered", "not_recovered"):
            assert value(samples, "cometd_replays_total", result=result) == 0
        assert value(samples, "cometd_history_bytes") > 0  # the sends are kept
        assert value(samples, "cometd_pending_output_bytes") >= 0
        for s in streams:
            s.close()
        slow.close()
    finally:
        srv.stop()
    assert "Traceback" not in "".join(srv.output)


def admin(srv, line: str) -> str:
    """One admin console command's reply (its lines before the next prompt)."""
    with socket.create_connection((srv.host, srv.admin_port), timeout=5) as sock:
        got = b""
        for ask in (b"", line.encode() + b"\n"):
            sock.sendall(ask)
            while not got.endswith(PROMPT):
                data = sock.recv(65536)
                assert data, got
                got += data
            reply, got = got[:-len(PROMPT)], b""
        return reply.decode().strip()


def test_kicks_resumes_and_history_are_counted_exactly(tmp_path):
    srv = start_server(str(tmp_path / "db"))
    try:
        me, friend, victim = unique_id("me"), unique_id("f"), unique_id("v")
        subscribe(srv, [(me, friend)])
        kicked = [StreamClient.open(srv, f"/test/{victim}"),
                  StreamClient.open(srv, f"/events/{victim}")]
        for s in kicked:
            s.chunk()
        wait_for(lambda: value(scrape(srv), "cometd_users_online") == 1, 5, what="victim online")
        assert admin(srv, f"kick {victim}") == "OK kicked 2"
        for s in kicked:
            s.wait_closed(5)
        first = post(srv, friend, "one")
        post(srv, friend, "two")
        with open_stream(srv, f"/events/{me}", {"Last-Event-ID": first}) as c:
            assert c.headers["cometd-recovered"] == "true"
            c.chunk()
        for asked in ("bogus", "also-bogus"):
            with open_stream(srv, f"/test/{me}?since={asked}") as c:
                assert c.headers["cometd-recovered"] == "false"
                c.chunk()
        samples = wait_for(lambda: (lambda s: s if value(s, "cometd_disconnects_total",
                                                          reason="client") == 3 else None)(
            scrape(srv)), 5, what="the resumed streams' hang-ups counted")
        assert value(samples, "cometd_disconnects_total", reason="kicked") == 2
        for reason in ("slow", "expired", "drain", "shutdown", "error"):
            assert value(samples, "cometd_disconnects_total", reason=reason) == 0, reason
        assert value(samples, "cometd_replays_total", result="recovered") == 1
        assert value(samples, "cometd_replays_total", result="not_recovered") == 2
        assert value(samples, "cometd_history_bytes") > 0
    finally:
        srv.stop()
    assert "Traceback" not in "".join(srv.output)


def test_no_history_holds_no_bytes(tmp_path):
    srv = start_server(str(tmp_path / "db"), "--history-size", "0")
    try:
        for i in range(3):
            post(srv, unique_id("s"), f"m{i}")
        assert value(scrape(srv), "cometd_history_bytes") == 0
    finally:
        srv.stop()


def test_metrics_need_an_api_key_when_auth_is_on(tmp_path):
    key = "metrics-key-" + "k" * 20
    srv = start_server(str(tmp_path / "db"), "--api-key", key)
    try:
        status, _, _ = http_request(srv, "GET", "/metrics")
        assert status == 401
        status, _, _ = http_request(srv, "GET", "/metrics", headers={"X-API-Key": "wrong"})
        assert status == 401
        samples = scrape(srv, headers={"X-API-Key": key})
        assert value(samples, "cometd_rejected_requests_total", status="401") == 2
    finally:
        srv.stop()
    assert key not in "".join(srv.output)


def test_one_scrape_through_workers_shows_the_router_and_every_edge(redis_server, tmp_path):
    try:
        proc = start_cometd(["--workers", "2", "--redis", redis_server.url, "--port", "0",
                             "--admin-port", "0", "--db", str(tmp_path / "db")],
                            SUPERVISOR_READY, timeout=60)
    except RuntimeError:
        kill_leftovers(strays(redis_server.url))
        raise
    srv = SimpleNamespace(host=proc.match.group(1), port=int(proc.match.group(2)))
    try:
        def processes(samples) -> set[str]:
            return {dict(ls)["process"] for (n, ls), _ in samples.items()
                    if n == "cometd_rejected_requests_total"}

        # Within a second or two every process has put its figures in Redis.
        found = wait_for(lambda: (lambda ps: ps if len(ps) == 3 else None)(processes(scrape(srv))),
                         10, interval=0.2, what="router and two edges in one scrape")
        assert sorted(p.split(":")[0] for p in found) == ["edge", "edge", "router"]
        subject = unique_id("boss")
        users = [unique_id("w") for _ in range(8)]
        assert http_json(srv, "POST", "/subscriptions", [[u, subject] for u in users])[0] == 200
        streams = [StreamClient.open(srv, f"/test/{u}") for u in users]
        try:
            for s in streams:
                s.chunk()
            sends = 4
            wait_for(lambda: http_json(srv, "GET", "/stats")[1].get("connections") == 8,
                     5, what="presence of 8 streams")
            ids = []
            for i in range(sends):
                status, reply = http_json(srv, "POST", f"/send/{subject}", f"m{i}".encode())
                assert (status, reply["delivered"]) == (200, 8)
                ids.append(reply["id"])
            for s in streams:
                assert len(s.chunks(sends)) == sends

            # Other processes' figures are up to a second old (see cometd.metrics).
            def settled():
                samples = scrape(srv)
                # An edge counts a payload's deliveries as it writes them and its
                # histograms after: a snapshot can fall in between, so wait for both.
                done = (total(samples, "cometd_deliveries_total") == 8 * sends
                        and total(samples, "cometd_messages_published_total") == sends
                        and total(samples, "cometd_fanout_size_sum") == 2 * 8 * sends)
                return samples if done else None

            samples = wait_for(settled, 10, interval=0.3, what="every process's counts")
            assert total(samples, "cometd_connections") == 8
            assert total(samples, "cometd_presence_users") == 8
            assert total(samples, "cometd_backplane_calls_total", op="send") == 2 * sends
            assert total(samples, "cometd_fanout_size_sum") == 2 * 8 * sends  # router + edges
            assert total(samples, "cometd_history_bytes") > 0  # the router's
            # Resumes through the edges (their replay is the router's): one complete, two not.
            for since in (ids[0], "bogus", "also-bogus"):
                with StreamClient.open(srv, f"/test/{users[0]}?since={since}") as resumed:
                    assert resumed.headers["cometd-recovered"] == str(since == ids[0]).lower()
                    resumed.chunk()

            def replays():
                samples = scrape(srv)
                got = [total(samples, "cometd_replays_total", result=r)
                       for r in ("recovered", "not_recovered")]
                return got if got == [1, 2] else None

            wait_for(replays, 10, interval=0.3, what="the edges' resumes counted")
        finally:
            for s in streams:
                s.close()
    finally:
        proc.stop(signal.SIGTERM, timeout=15)
        kill_leftovers(strays(redis_server.url))
    assert "Traceback" not in "".join(proc.output)


def test_merged_labels_each_sample_with_its_process():
    text = ("# HELP cometd_deliveries_total Messages\n# TYPE cometd_deliveries_total counter\n"
            "cometd_deliveries_total 3.0\n")
    out = merged([("edge:a", text), ("edge:b", text.replace("3.0", "4.0"))]).decode()
    families = list(text_string_to_metric_families(out))
    assert [f.name for f in families] == ["cometd_deliveries"]
    assert {(s.labels["process"], s.value) for s in families[0].samples} == {
        ("edge:a", 3.0), ("edge:b", 4.0)}


def test_histogram_exposes_what_prometheus_clients_own_would():
    values = [0, 0.5, 1, 1, 2.5, 3, 99, 1000, -1]
    ours_registry, theirs_registry = CollectorRegistry(), CollectorRegistry()
    ours = Histogram("h", "help", ("kind",), buckets=(0, 1, 2.5, 100), registry=ours_registry)
    theirs = prometheus_client.Histogram("h", "help", ["kind"], buckets=(0, 1, 2.5, 100),
                                         registry=theirs_registry)
    for v in values:
        ours.labels("a").observe(v)
        theirs.labels("a").observe(v)
    ours.labels("b")  # a series with nothing observed yet
    theirs.labels("b")
    ours.labels("c").observe_many(2.5, 3)  # a batch's messages, observed at once
    for _ in range(3):
        theirs.labels("c").observe(2.5)

    def samples(registry) -> set[tuple]:
        text = generate_latest(registry).decode()
        return {(s.name, tuple(sorted(s.labels.items())), s.value)
                for f in text_string_to_metric_families(text) for s in f.samples
                if not s.name.endswith("_created")}

    assert samples(ours_registry) == samples(theirs_registry)
    assert ("h_bucket", (("kind", "a"), ("le", "1.0")), 5.0) in samples(ours_registry)


def test_streams_refused_by_a_limit_are_counted_by_reason_and_status(tmp_path):
    srv = start_server(str(tmp_path / "db"), "--max-streams-per-user", "1")
    try:
        user = unique_id("lim")
        with StreamClient.open(srv, f"/test/{user}") as first:
            first.chunk()
            refused = StreamClient.open(srv, f"/test/{user}")
            assert refused.status == 429
            refused.close()
            samples = scrape(srv)
        assert value(samples, "cometd_streams_refused_total", reason="per_user") == 1
        assert value(samples, "cometd_streams_refused_total", reason="connections") == 0
        assert value(samples, "cometd_rejected_requests_total", status="429") == 1
        assert value(samples, "cometd_rejected_requests_total", status="503") == 0
    finally:
        srv.stop()

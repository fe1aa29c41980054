"""``cometd --workers N``: a supervisor, one router and N edges sharing one port.

Real processes against a real ``redis-server`` (``redis_server`` in conftest):
the edges must both listen on the port (SO_REUSEPORT), the kernel must spread
connections over them, a message must reach streams on every edge, a dead
edge must be replaced, and SIGTERM must leave no process behind - also when it
arrives while the supervisor is still starting its children.
"""

from __future__ import annotations

import signal
import socket
import time

import psutil
import pytest
from conftest import CometdProcess, start_cometd
from test_backplane import Stream, admin, assert_counts_true, request, wait_until

SUPERVISOR_READY = (r"^cometd: listening on http://([\d.]+):(\d+)/ admin ([\d.]+):(\d+) "
                    r".*workers=(\d+)")


def children(pid: int) -> dict[int, str]:
    """The supervisor's children: pid -> "router" or "edge"."""
    out: dict[int, str] = {}
    try:
        kids = psutil.Process(pid).children()
    except psutil.NoSuchProcess:
        return out
    for child in kids:
        try:
            cmd = child.cmdline()
        except psutil.NoSuchProcess:
            continue
        out[child.pid] = next((a for a in cmd if a in ("router", "edge")), "?")
    return out


def listening_on(pid: int, port: int) -> bool:
    try:
        conns = psutil.Process(pid).net_connections(kind="tcp")
    except psutil.NoSuchProcess:
        return False
    return any(c.status == psutil.CONN_LISTEN and c.laddr.port == port for c in conns)


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def strays(redis_url: str) -> list[int]:
    """Live processes (bar zombies) started with this test's Redis URL: cometd's.

    The URL is in a supervisor's argv, and in its children's COMETD_CONFIG_JSON.
    """
    found = []
    for p in psutil.process_iter(["cmdline", "status", "environ"]):
        config = (p.info["environ"] or {}).get("COMETD_CONFIG_JSON", "")
        if (redis_url in (p.info["cmdline"] or []) or f'"{redis_url}"' in config) and (
                p.info["status"] != psutil.STATUS_ZOMBIE):
            found.append(p.pid)
    return found


def kill_leftovers(pids) -> None:
    for pid in pids:
        try:
            psutil.Process(pid).kill()
        except psutil.NoSuchProcess:
            pass


class Workers:
    def __init__(self, process: CometdProcess, redis_url: str) -> None:
        self.process = process
        self.redis_url = redis_url
        self.addr = (process.match.group(1), int(process.match.group(2)))
        self.admin_port = int(process.match.group(4))
        self.seen: set[int] = set()

    def children(self) -> dict[int, str]:
        kids = children(self.process.pid)
        self.seen |= set(kids)
        return kids

    def router_stat(self, key: str) -> str:
        lines = admin(self.admin_port, "stats")
        return dict(line.split(": ", 1) for line in lines[:-1])[key]


@pytest.fixture
def workers(redis_server, tmp_path):
    try:
        proc = start_cometd(["--workers", "2", "--redis", redis_server.url, "--port", "0",
                             "--admin-port", "0", "--db", str(tmp_path / "db")],
                            SUPERVISOR_READY, timeout=60)  # it starts its children one by one
    except RuntimeError:
        kill_leftovers(strays(redis_server.url))  # the children of a supervisor killed early
        raise
    w = Workers(proc, redis_server.url)
    try:
        yield w
    finally:
        w.children()
        proc.stop(signal.SIGTERM, timeout=15)
        kill_leftovers(w.seen | set(strays(redis_server.url)))


def test_edges_share_the_port_and_connections_spread(workers):
    kids = workers.children()
    assert sorted(kids.values()) == ["edge", "edge", "router"]
    port = workers.addr[1]
    edges = [pid for pid, role in kids.items() if role == "edge"]
    assert all(listening_on(pid, port) for pid in edges)  # both bound it: SO_REUSEPORT

    n = 40
    status, reply = request(workers.addr, "POST", "/subscriptions",
                            [[f"w{i}", "boss"] for i in range(n)])
    assert (status, reply) == (200, {"added": n})
    streams = [Stream(workers.addr, f"w{i}") for i in range(n)]
    try:
        assert wait_until(lambda: workers.router_stat("connections") == str(n), 5)
        assert request(workers.addr, "POST", "/send/boss", b"to all") == (200, {"delivered": n})
        for stream in streams:
            assert stream.wait_messages(1) == [b"to all"], stream.user

        # Each edge's own count: ask /stats on fresh connections until both answered.
        per_edge: dict[str, int] = {}
        for _ in range(200):
            status, stats = request(workers.addr, "GET", "/stats")
            assert status == 200, stats
            per_edge[stats["edge"]["id"]] = stats["edge"]["connections"]
            if len(per_edge) == 2:
                break
        assert len(per_edge) == 2, per_edge
        assert sum(per_edge.values()) == n
        assert min(per_edge.values()) >= 4, per_edge  # spread, not all on one edge
    finally:
        for stream in streams:
            stream.close()
    assert "Traceback" not in "".join(workers.process.output)


def test_dead_edge_is_replaced_and_sigterm_stops_everything(workers):
    kids = workers.children()
    port = workers.addr[1]
    victim = next(pid for pid, role in kids.items() if role == "edge")
    psutil.Process(victim).kill()
    fresh = wait_until(lambda: [pid for pid, role in workers.children().items()
                                if role == "edge" and pid not in kids and listening_on(pid, port)],
                       10)
    assert len(fresh) == 1, workers.children()
    stream = Stream(workers.addr, "after")
    try:
        assert wait_until(lambda: workers.router_stat("connections") == "1", 5)
    finally:
        stream.close()

    everyone = set(workers.children())
    assert len(everyone) == 3
    assert workers.process.stop(signal.SIGTERM, timeout=15) == 0
    assert wait_until(lambda: all(gone(pid) for pid in everyone), 5)
    assert not strays(workers.redis_url)
    with pytest.raises(OSError):
        socket.create_connection(workers.addr, timeout=2).close()
    assert "Traceback" not in "".join(workers.process.output)


def test_sigterm_during_startup_leaves_no_children(redis_server, tmp_path):
    # The router's banner is out, the edges' are not: the supervisor is mid-startup.
    try:
        sup = start_cometd(["--workers", "2", "--redis", redis_server.url, "--port", "0",
                            "--admin-port", "-1", "--db", str(tmp_path / "db")],
                           r"cometd router: ", timeout=60)
    except RuntimeError:
        kill_leftovers(strays(redis_server.url))
        raise
    try:
        sup.proc.send_signal(signal.SIGTERM)
        sup.proc.wait(20)
        assert wait_until(lambda: not strays(redis_server.url), 5), strays(redis_server.url)
        assert "Traceback" not in "".join(sup.output), sup.output
    finally:
        sup.stop(signal.SIGKILL)
        kill_leftovers(strays(redis_server.url))


def test_killed_router_is_restarted_and_the_cluster_heals(workers):
    n = 6
    status, reply = request(workers.addr, "POST", "/subscriptions",
                            [[f"r{i}", "boss"] for i in range(n)])
    assert (status, reply) == (200, {"added": n})
    streams = [Stream(workers.addr, f"r{i}") for i in range(n)]
    try:
        assert wait_until(lambda: workers.router_stat("connections") == str(n), 5)
        kids = workers.children()
        router = next(pid for pid, role in kids.items() if role == "router")
        psutil.Process(router).kill()
        fresh = wait_until(lambda: [pid for pid, role in workers.children().items()
                                    if role == "router" and pid != router], 10)
        assert len(fresh) == 1, workers.children()
        # Until the new router has the edges' presence, an edge answers 503 or
        # the true count, never a wrong one; then everyone gets the message.
        probes = []
        deadline = time.monotonic() + 15
        while not probes or probes[-1][1] != n:
            assert time.monotonic() < deadline, probes
            body = b"after the kill %d" % len(probes)
            status, reply = request(workers.addr, "POST", "/send/boss", body, timeout=15)
            assert status in (200, 503) and isinstance(reply, dict), (status, reply)
            probes.append((body, reply["delivered"] if status == 200 else None))
            time.sleep(0.2)
        assert_counts_true(probes, streams, streams)
        assert workers.router_stat("connections") == str(n)
        assert set(workers.children().values()) == {"router", "edge"}
    finally:
        for stream in streams:
            stream.close()
    out = "".join(workers.process.output)
    assert "router exited with -9; restarting" in out, out
    assert "Traceback" not in out

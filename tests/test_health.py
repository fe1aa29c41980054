"""``GET /healthz`` and ``GET /readyz``: a single server; an edge losing its router, and Redis."""

from __future__ import annotations

import signal
import time
from types import SimpleNamespace

from cometd.connections import ConnectionTable
from cometd.router import Router
from cometd.server import LocalBackend
from cometd.store import SubscriptionStore
from tests.conftest import http_json, start_cometd, start_server, wait_for
from tests.test_backplane import EDGE_READY, ROUTER_READY


def test_a_single_server_is_alive_and_ready_without_credentials(tmp_path):
    key = "health-key-" + "k" * 20
    srv = start_server(str(tmp_path / "db"), "--api-key", key)
    try:
        assert http_json(srv, "GET", "/healthz") == (200, {"status": "ok"})
        assert http_json(srv, "GET", "/readyz") == (200, {"status": "ready"})
        assert http_json(srv, "GET", "/stats")[0] == 401  # health is open; the rest is not
    finally:
        srv.stop()


def test_a_closed_store_is_not_ready(tmp_path):
    store = SubscriptionStore(str(tmp_path / "db"))
    table = ConnectionTable()
    backend = LocalBackend(store, Router(store, table), table)
    try:
        assert backend.ready() == []
        store.close()
        assert backend.ready() == ["store: closed"]
    finally:
        table.close()


def _readiness(srv) -> tuple[int, object]:
    return http_json(srv, "GET", "/readyz", timeout=5)


def test_an_edge_is_not_ready_within_3_s_of_losing_its_router_and_ready_when_back(
        redis_server, tmp_path):
    args = ["router", "--redis", redis_server.url, "--db", str(tmp_path / "db"),
            "--admin-port", "-1"]
    router = start_cometd(args, ROUTER_READY)
    edge = start_cometd(["edge", "--redis", redis_server.url, "--port", "0"], EDGE_READY)
    srv = SimpleNamespace(host=edge.match.group(2), port=int(edge.match.group(3)))
    try:
        wait_for(lambda: _readiness(srv)[0] == 200, 5, what="the edge ready")
        router.stop(signal.SIGTERM)
        lost = time.monotonic()
        wait_for(lambda: _readiness(srv)[0] == 503, 3, interval=0.05,
                 what="not ready after the router stopped")
        assert _readiness(srv) == (503, {"status": "not ready",
                                         "missing": ["router: not heard from"]})
        assert time.monotonic() - lost <= 3
        assert http_json(srv, "GET", "/healthz") == (200, {"status": "ok"})  # alive all along
        router = start_cometd(args, ROUTER_READY)
        wait_for(lambda: _readiness(srv) == (200, {"status": "ready"}), 3, interval=0.05,
                 what="ready after the router came back")
        # Redis itself gone: not ready either, and ready again once it is back.
        redis_server.stop()
        wait_for(lambda: _readiness(srv)[0] == 503, 3, interval=0.05,
                 what="not ready without Redis")
        redis_server.restart()
        wait_for(lambda: _readiness(srv)[0] == 200, 10, interval=0.1,
                 what="ready after Redis came back")
    finally:
        edge.stop()
        router.stop()
    out = "".join(edge.output)
    assert "Traceback" not in out
    # The operator log says each change once, not once per heartbeat.
    lost = [line for line in edge.output if "no router heard" in line]
    found = [line for line in edge.output if "the router hears this edge" in line]
    assert 1 <= len(lost) <= 2 and len(found) == len(lost) + 1, out

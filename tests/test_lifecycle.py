"""Server(config, role) in-process: startup, banner and an ordered shutdown, on real
sockets and a real LevelDB (the process-level behaviour is in test_config.py)."""

from __future__ import annotations

import re
import socket

import pytest
from conftest import free_port

from cometd.config import load
from cometd.lifecycle import ListenError, Server
from cometd.store import SubscriptionStore


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            s.listen(1)
        except OSError:
            return False
    return True


def test_startup_banner_and_shutdown_free_everything(tmp_path):
    db = str(tmp_path / "db")
    server = Server(load("single", {"port": "0", "admin_port": "0", "db": db}, {}))
    server.startup()
    try:
        m = re.fullmatch(r"cometd: listening on http://127\.0\.0\.1:(\d+)/ admin 127\.0\.0\.1:"
                         r"(\d+) mode=greenlet db=(\S+)", server.banner)
        assert m and m.group(3) == db, server.banner
        http_port, admin_port = int(m.group(1)), int(m.group(2))
        assert not _bindable(http_port) and not _bindable(admin_port)
    finally:
        server.shutdown()
    server.shutdown()  # each part stops once: a second shutdown does nothing
    assert _bindable(http_port) and _bindable(admin_port)
    SubscriptionStore(db).close()  # closed: this process may open it again


def test_failed_startup_stops_the_parts_already_started(tmp_path):
    db = str(tmp_path / "db")
    http_port = free_port()
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen(1)
        taken = held.getsockname()[1]
        server = Server(load("single", {"port": str(http_port), "admin_port": str(taken),
                                        "db": db}, {}))
        with pytest.raises(ListenError) as err:
            server.startup()
    assert str(err.value) == f"cannot listen on 127.0.0.1:{taken}: Address already in use"
    # The store and the HTTP listener had started before the console failed.
    assert _bindable(http_port)
    SubscriptionStore(db).close()


def test_no_console_no_admin_in_banner(tmp_path):
    server = Server(load("single", {"port": "0", "admin_port": "-1",
                                    "db": str(tmp_path / "db")}, {}))
    server.startup()
    try:
        assert " admin " not in server.banner
    finally:
        server.shutdown()

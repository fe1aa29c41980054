"""Operator logs: JSON lines a collector can parse, bursts summarised, no secret in them."""

from __future__ import annotations

import json
import logging
import sys
import time

import gevent
import jwt

from cometd import log
from tests.conftest import StreamClient, http_request, start_server

SECRET = "log-test-secret-" + "s" * 32
KEY = "log-test-api-key-" + "k" * 16


def test_json_lines_parse_and_hold_no_token_or_key(tmp_path):
    srv = start_server(str(tmp_path / "db"), "--log-format", "json", "--jwt-secret", SECRET,
                       "--api-key", KEY)
    bad_token = jwt.encode({"sub": "42", "exp": 1}, SECRET, algorithm="HS256")  # expired
    forged = jwt.encode({"sub": "42"}, "another-secret-" + "x" * 32, algorithm="HS256")
    try:
        for token in (bad_token, forged, "not-a-token-at-all"):
            assert http_request(srv, "GET", f"/test/42?token={token}")[0] == 401
        assert http_request(srv, "POST", "/send/42", b"hi",
                            headers={"X-API-Key": KEY + "x"})[0] == 401
        good = jwt.encode({"sub": "7", "exp": int(time.time()) + 600}, SECRET,
                          algorithm="HS256")
        with StreamClient.open(srv, f"/test/7?token={good}") as stream:
            assert stream.status == 200
            assert http_request(srv, "POST", "/send/7", b"hi", headers={"X-API-Key": KEY})[0] \
                == 200
            stream.chunks(2)
    finally:
        assert srv.stop() == 0
    banner = [line for line in srv.output if not line.startswith("{")]
    assert len(banner) == 1 and banner[0].startswith("cometd: listening on http://"), banner
    lines = [line for line in srv.output if line.startswith("{")]
    events = [json.loads(line) for line in lines]  # every other line is one JSON object
    # (a drain is logged if the server had not yet seen the stream's hang-up)
    events = [e for e in events if e["event"] not in ("drain", "drained")]
    assert [e["event"] for e in events] == ["listening", "auth_failures", "stopping",
                                            "auth_failures", "stopped"], lines
    first, rest = events[1], events[3]
    assert (first["count"], rest["count"]) == (1, 3)  # said at once, the rest at shutdown
    assert all(e["role"] == "single" and e["ts"].endswith("Z") for e in events)
    assert {e["level"] for e in events} == {"info", "warning"}
    text = "".join(srv.output)
    for secret in (SECRET, KEY, bad_token, forged, good, "not-a-token-at-all"):
        assert secret not in text


def test_a_burst_is_said_at_once_then_once_per_window(capsys):
    log.configure("text", "edge")
    log.flush_bursts()  # what earlier in-process tests left pending (e.g. slow consumers)
    capsys.readouterr()
    burst = log.Burst("test_burst", "thing(s) happened", logging.WARNING, window=0.3)
    for _ in range(50):
        burst.note()
    assert capsys.readouterr().err == "cometd edge: warning: 1 thing(s) happened\n"
    gevent.sleep(0.4)
    assert capsys.readouterr().err == ("cometd edge: warning: 49 more thing(s) happened in "
                                       "the last 0.3 s\n")
    gevent.sleep(0.4)  # a quiet window says nothing, and the next one is said at once
    assert capsys.readouterr().err == ""
    burst.note()
    assert capsys.readouterr().err == "cometd edge: warning: 1 thing(s) happened\n"
    log.flush_bursts()
    assert capsys.readouterr().err == ""
    log.configure(stream=sys.__stderr__)  # not the capture, which ends with this test

"""CORS: the policy's rules in-process, and the headers of real servers (both modes,
``--workers`` over Redis, with and without authentication, and as headless Chromium
reads them) on preflights, answers, errors and streams, by both ways in."""

from __future__ import annotations

import functools
import http.server
import json
import socket
import threading
import time

import pytest
from browser import needs_chromium
from conftest import (
    StreamClient,
    get_stats,
    http_request,
    start_cometd,
    start_server,
    wait_for,
)
from test_workers import kill_leftovers, strays

from cometd.config import ConfigError, from_json, load, to_json, to_toml
from cometd.cors import ALLOW_HEADERS, ALLOW_METHODS, MAX_AGE, CorsPolicy
from cometd.streamhttp import CHUNKED, SSE_RAW, stream_head

APP = "https://app.example"
EVIL = "https://evil.example"
ROUTES = ["/send/u1", "/subscriptions", "/subscriptions/u1", "/subscribers/u1", "/stats",
          "/test/u1", "/events/u1"]


def cors_headers(headers: dict[str, str]) -> dict[str, str]:
    """The Access-Control-* headers among lower-cased *headers*."""
    return {k: v for k, v in headers.items() if k.startswith("access-control-")}


def allowed(origin: str) -> dict[str, str]:
    return {"access-control-allow-origin": origin}


PREFLIGHT = {"access-control-allow-methods": ALLOW_METHODS,
             "access-control-allow-headers": ALLOW_HEADERS,
             "access-control-max-age": str(MAX_AGE)}


# -- in-process: the policy -------------------------------------------------------------


def test_listed_origins_are_echoed_with_vary_and_credentials_only_when_asked():
    policy = CorsPolicy([APP, "http://localhost:3000"])
    assert policy.headers(APP) == [("Access-Control-Allow-Origin", APP), ("Vary", "Origin")]
    assert policy.headers(EVIL) == policy.headers(None) == [("Vary", "Origin")]
    assert not policy.allows(EVIL) and not policy.allows(None) and policy.allows(APP)
    with_cookies = CorsPolicy([APP], credentials=True)
    assert ("Access-Control-Allow-Credentials", "true") in with_cookies.headers(APP)
    assert with_cookies.headers(EVIL) == [("Vary", "Origin")]


def test_any_origin_gets_a_star_and_never_credentials():
    policy = CorsPolicy(["*"], credentials=True)
    assert policy.headers(EVIL) == policy.headers(None) == [("Access-Control-Allow-Origin", "*")]
    assert policy.allows(EVIL) and not policy.allows(None)
    assert policy.stream_lines_for(b"GET /test/1 HTTP/1.1\r\nHost: x\r\n\r\n") == (
        "Access-Control-Allow-Origin: *\r\n")
    # A listed origin beside * still gets itself and credentials; the rest get *.
    both = CorsPolicy(["*", APP], credentials=True)
    assert both.headers(APP) == [("Access-Control-Allow-Origin", APP), ("Vary", "Origin"),
                                 ("Access-Control-Allow-Credentials", "true")]
    assert both.headers(EVIL) == [("Access-Control-Allow-Origin", "*"), ("Vary", "Origin")]
    assert dict(both.preflight_headers(EVIL))["Access-Control-Allow-Origin"] == "*"


def test_the_origin_of_a_raw_stream_request():
    policy = CorsPolicy([APP])
    ok = f"Access-Control-Allow-Origin: {APP}\r\nVary: Origin\r\n"
    head = b"GET /events/1 HTTP/1.1\r\nHost: x\r\n"
    assert policy.stream_lines_for(head + b"Origin: " + APP.encode() + b"\r\n\r\n") == ok
    assert policy.stream_lines_for(head + b"oRiGiN:\t" + APP.encode() + b" \r\n\r\n") == ok
    assert policy.stream_lines_for(b"GET /events/1 HTTP/1.1\r\nOrigin: " + APP.encode()
                                   + b"\r\nHost: x\r\n\r\n") == ok
    for refused in (head + b"Origin: " + EVIL.encode() + b"\r\n\r\n",
                    head + b"Origin: " + APP.encode() + b"/\r\n\r\n",
                    head + b"X-Origin: " + APP.encode() + b"\r\n\r\n",
                    head + b"Origin: " + APP.encode() + b"\r\nOrigin: " + APP.encode()
                    + b"\r\n\r\n",
                    # after the header block: the next pipelined request's, not this one's
                    head + b"\r\nGET /x HTTP/1.1\r\nOrigin: " + APP.encode() + b"\r\n\r\n",
                    head + b"\r\n"):
        assert policy.stream_lines_for(refused) == "Vary: Origin\r\n", refused


def test_a_stream_head_carries_the_lines_among_its_headers():
    lines = CorsPolicy([APP]).stream_lines(APP)
    for kind in (CHUNKED, SSE_RAW):
        # One retry value, not a range: an SSE welcome's retry is drawn per stream.
        plain = stream_head("u1", kind, "/test/u1", retry=(3000, 3000))
        head, _, welcome = stream_head("u1", kind, "/test/u1", lines,
                                       retry=(3000, 3000)).partition(b"\r\n\r\n")
        assert head.endswith(b"\r\n" + lines.encode().rstrip(b"\r\n")), head
        assert plain.partition(b"\r\n\r\n")[2] == welcome  # the welcome is the same


def test_configured_origins_are_checked_and_normalised():
    config = load("single", {"cors_origin": ("HTTPS://App.Example:443", "http://[::1]:8080",
                                             APP, "*")}, {})
    assert config.http.cors_origin == (APP, "http://[::1]:8080", "*")
    assert load("single", {}, {"COMETD_CORS_ORIGIN": f"{APP}, http://a.test:80"}
                ).http.cors_origin == (APP, "http://a.test")
    assert load("single", {}, {}).http.cors_origin is None
    for bad, problem in (("null", "'null' is not allowed"),
                         (f"{APP}/", f"'{APP}/' is not an origin"),
                         ("app.example", "'app.example' is not an origin"),
                         (f"{APP}:99999", ".* is not an origin"),
                         (f"{APP}?x=1", ".* is not an origin")):
        with pytest.raises(ConfigError, match=f"^--cors-origin: {problem}"):
            load("single", {"cors_origin": (bad,)}, {})


def test_origins_from_toml_print_and_read_back(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text(f'[http]\ncors_origin = ["{APP}", "*"]\n')
    config = load("single", {}, {}, str(path))
    assert config.http.cors_origin == (APP, "*")
    path.write_text(to_toml(config))
    assert load("single", {}, {}, str(path)) == config
    assert from_json(to_json(config)) == config
    path.write_text('[http]\ncors_origin = "https://a.test"\n')  # one string: as in a variable
    assert load("single", {}, {}, str(path)).http.cors_origin == ("https://a.test",)
    path.write_text("[http]\ncors_origin = [1]\n")
    with pytest.raises(ConfigError, match=r"^--cors-origin: \[1\] is not a list of strings"):
        load("single", {}, {}, str(path))


# -- real servers -----------------------------------------------------------------------


class Addr:
    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port


def open_stream(srv, request: str) -> StreamClient:
    """*request* (a whole raw request) on a fresh connection; the client past its head."""
    sock = socket.create_connection((srv.host, srv.port), timeout=10)
    sock.sendall(request.encode())
    return StreamClient(sock)


def stream_requests(srv, origin: str | None, query: str = "") -> dict[str, str]:
    """Stream requests by kind and way in: the accept callback's and pywsgi's."""
    line = "" if origin is None else f"Origin: {origin}\r\n"
    host = f"Host: {srv.host}\r\n"
    absolute = f"http://{srv.host}:{srv.port}"  # an absolute-form target goes to pywsgi
    return {
        "fast chunked": f"GET /test/u1{query} HTTP/1.1\r\n{host}{line}\r\n",
        "fast sse": f"GET /events/u1{query} HTTP/1.1\r\n{host}{line.lower()}\r\n",
        "fast raw": f"GET /events/u1{query} HTTP/1.0\r\n{line}\r\n",
        "pywsgi chunked": f"GET {absolute}/test/u1{query} HTTP/1.1\r\n{host}{line}\r\n",
        "pywsgi sse": f"GET {absolute}/events/u1{query} HTTP/1.1\r\n{host}{line}\r\n",
        "pywsgi head": f"HEAD /events/u1{query} HTTP/1.1\r\n{host}{line}\r\n",
    }


def check_streams(srv, origin: str | None, expected: dict[str, str], query: str = "",
                  status: int = 200) -> None:
    for way, request in stream_requests(srv, origin, query).items():
        client = open_stream(srv, request)
        try:
            assert client.status == status, way
            assert cors_headers(client.headers) == expected, (way, client.headers)
            if "head" not in way and status == 200:
                welcome = client.chunk() if client.chunked else client.read_until(b"\n")
                assert b"Welcome" in welcome, way
        finally:
            client.close()


def preflight(srv, path: str, origin: str, method: str = "POST"):
    return http_request(srv, "OPTIONS", path, headers={
        "Origin": origin, "Access-Control-Request-Method": method,
        "Access-Control-Request-Headers": "authorization, content-type, x-api-key"})


@pytest.fixture
def cors_server(tmp_path, mode):
    srv = start_server(str(tmp_path / "db"), "--mode", mode, "--cors-origin", APP,
                       "--cors-origin", "http://localhost:3000")
    yield srv
    srv.stop()


def test_preflights_of_every_route_for_an_allowed_origin(cors_server):
    for path in ROUTES:
        status, headers, body = preflight(cors_server, path, APP)
        assert (status, body) == (204, b""), path
        assert cors_headers(headers) == {**allowed(APP), **PREFLIGHT}, path
        assert headers["vary"] == "Origin"
    status, headers, _ = preflight(cors_server, "/subscriptions", "http://localhost:3000",
                                   "DELETE")
    assert status == 204 and headers["access-control-allow-origin"] == "http://localhost:3000"


def test_an_origin_not_allowed_gets_no_cors_headers(cors_server):
    for path in ROUTES:
        status, headers, _ = preflight(cors_server, path, EVIL)
        assert status == 405 and cors_headers(headers) == {}, path  # as with no CORS at all
    status, headers, _ = http_request(cors_server, "POST", "/send/u1", b"hi",
                                      headers={"Origin": EVIL})
    assert status == 200 and cors_headers(headers) == {}
    assert headers["vary"] == "Origin"  # an allowed origin's answer differs
    status, headers, _ = http_request(cors_server, "GET", "/stats")
    assert status == 200 and cors_headers(headers) == {}
    check_streams(cors_server, EVIL, {})
    check_streams(cors_server, None, {})


def test_answers_errors_and_streams_carry_the_allowed_origin(cors_server):
    with open_stream(cors_server, f"GET /test/u1 HTTP/1.1\r\nHost: x\r\nOrigin: {APP}\r\n\r\n"
                     ) as reader:
        reader.chunk()
        origin = {"Origin": APP}
        status, headers, body = http_request(cors_server, "POST", "/send/u1", b"hello",
                                             headers=origin)
        assert status == 200 and json.loads(body)["delivered"] == 1, body
        assert cors_headers(headers) == allowed(APP) and headers["vary"] == "Origin"
        assert reader.chunk() == b"hello"
    for method, path, body, code in (("GET", "/subscribers/bad%20id!", None, 400),
                                     ("POST", "/send/u1", b"", 400),
                                     ("GET", "/nowhere", None, 404),
                                     ("PUT", "/stats", None, 405),
                                     ("POST", "/subscriptions", b"[1]", 400),
                                     ("GET", "/test/bad%20id", None, 404)):
        status, headers, _ = http_request(cors_server, method, path, body, headers=origin)
        assert status == code and cors_headers(headers) == allowed(APP), (method, path)
    check_streams(cors_server, APP, allowed(APP))


def test_star_lets_any_origin_read_without_credentials(tmp_path, mode):
    srv = start_server(str(tmp_path / "db"), "--mode", mode, "--cors-origin", "*")
    try:
        status, headers, _ = preflight(srv, "/send/u1", EVIL)
        assert status == 204 and cors_headers(headers) == {**allowed("*"), **PREFLIGHT}
        status, headers, _ = http_request(srv, "POST", "/send/u1", b"x", headers={"Origin": EVIL})
        assert status == 200 and cors_headers(headers) == allowed("*")
        assert "vary" not in headers
        check_streams(srv, EVIL, allowed("*"))
    finally:
        srv.stop()


def test_no_origin_configured_no_cors_headers(server):
    status, headers, _ = preflight(server, "/send/u1", APP)
    assert status == 405 and cors_headers(headers) == {} and "vary" not in headers
    status, headers, _ = http_request(server, "POST", "/send/u1", b"x", headers={"Origin": APP})
    assert status == 200 and cors_headers(headers) == {} and "vary" not in headers
    check_streams(server, APP, {})


def test_workers_with_redis_carry_the_same_headers(redis_server, tmp_path):
    sup = start_cometd(["--workers", "2", "--redis", redis_server.url, "--port", "0",
                        "--admin-port", "-1", "--db", str(tmp_path / "db"), "--cors-origin", APP],
                       r"^cometd: listening on http://([\d.]+):(\d+)/ .*workers=2", timeout=60)
    try:
        srv = Addr(sup.match.group(1), int(sup.match.group(2)))
        for _ in range(4):  # the kernel spreads connections over both edges
            status, headers, _ = preflight(srv, "/send/u1", APP)
            assert status == 204 and cors_headers(headers) == {**allowed(APP), **PREFLIGHT}
            status, headers, _ = http_request(srv, "POST", "/send/u1", b"x",
                                              headers={"Origin": APP})
            assert status == 200 and cors_headers(headers) == allowed(APP)
            status, headers, _ = preflight(srv, "/send/u1", EVIL)
            assert status == 405 and cors_headers(headers) == {}
        check_streams(srv, APP, allowed(APP))
        check_streams(srv, EVIL, {})
    finally:
        sup.stop()
        kill_leftovers(strays(redis_server.url))


# -- a real browser -----------------------------------------------------------------

BROWSER_PAGE = """<!doctype html><html><body><pre id="out">pending</pre><script>
const cometd = location.hash.slice(1), result = {};
function finish(key, value) {
  result[key] = value;
  if ("fetch" in result && "stream" in result)
    document.getElementById("out").textContent = JSON.stringify(result);
}
// A header that is not CORS-safelisted: the browser preflights this GET.
fetch(cometd + "/subscribers/b1", {headers: {"X-API-Key": "k"}}).then(
  r => r.text().then(t => finish("fetch", r.status + " " + t)), () => finish("fetch", "blocked"));
const es = new EventSource(cometd + "/events/b1");
es.onopen = () => fetch(cometd + "/send/b1", {method: "POST", body: "hi",
                                              headers: {"Content-Type": "application/json"}})
  .catch(() => { es.close(); finish("stream", "send blocked"); });
es.onmessage = ev => { es.close(); finish("stream", ev.data); };
es.onerror = () => { es.close(); finish("stream", "error"); };
</script></body></html>
"""


def browser_run(driver, page_url: str) -> dict:
    """What a page of this module found, loaded by headless Chromium at *page_url*."""
    driver.get("about:blank")  # a new hash alone would not load the page again
    driver.get(page_url)
    out = wait_for(lambda: (text := driver.find_element("id", "out").text) != "pending" and text,
                   20, what="the page's result")
    return json.loads(out)


@needs_chromium
def test_a_browser_page_reads_only_when_its_origin_is_allowed(driver, tmp_path):
    (tmp_path / "page.html").write_text(BROWSER_PAGE)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    handler.log_message = lambda *args: None  # type: ignore[attr-defined]
    pages = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=pages.serve_forever, daemon=True).start()
    origin = f"http://127.0.0.1:{pages.server_port}"  # another port: another origin
    try:
        for allowed_origin, expected in (
                (origin, {"fetch": '200 {"subscribers": []}',
                          "stream": '{"from": "b1", "body": "hi"}'}),
                ("http://127.0.0.1:1", {"fetch": "blocked", "stream": "error"})):
            srv = start_server(str(tmp_path / "db"), "--cors-origin", allowed_origin)
            try:
                got = browser_run(driver, f"{origin}/page.html#{srv.url}")
            finally:
                srv.stop()
            assert got == expected, allowed_origin
    finally:
        pages.shutdown()
        pages.server_close()


# -- with authentication ----------------------------------------------------------------

SECRET = "cors-test-secret-that-is-at-least-32-bytes"
KEY = "cors-publisher-key-0123456789"
CREDENTIALS = {"access-control-allow-credentials": "true"}


def hs256(sub: str, ttl: int = 600) -> str:
    import jwt

    now = int(time.time())
    return jwt.encode({"sub": sub, "exp": now + ttl, "iat": now}, SECRET, algorithm="HS256")


def test_auth_turns_open_serving_off_the_loopback_into_authenticated_serving():
    for auth in ({"jwt_secret": SECRET}, {"api_key": (KEY,)}):
        config = load("single", {"host": "0.0.0.0", **auth}, {})
        assert config.auth_enabled and not config.open_to_network


@pytest.fixture
def auth_server(tmp_path, mode):
    srv = start_server(str(tmp_path / "db"), "--mode", mode, "--cors-origin", APP,
                       "--jwt-secret", SECRET, "--api-key", KEY)
    yield srv
    srv.stop()


def test_with_auth_preflights_need_no_credentials_and_refusals_are_readable(auth_server):
    srv, origin = auth_server, {"Origin": APP}
    status, headers, _ = preflight(srv, "/send/u1", APP)  # no token, no key: browsers send none
    assert status == 204 and cors_headers(headers) == {**allowed(APP), **CREDENTIALS, **PREFLIGHT}
    status, headers, _ = http_request(srv, "POST", "/send/u1", b"x", headers=origin)
    assert status == 401 and cors_headers(headers) == {**allowed(APP), **CREDENTIALS}
    status, headers, _ = http_request(srv, "POST", "/send/u2", b"x", headers={
        **origin, "Authorization": f"Bearer {hs256('u1')}"})
    assert status == 403 and cors_headers(headers) == {**allowed(APP), **CREDENTIALS}
    status, headers, _ = http_request(srv, "POST", "/send/u1", b"x", headers={
        **origin, "X-API-Key": KEY})
    assert status == 200 and cors_headers(headers) == {**allowed(APP), **CREDENTIALS}
    status, headers, _ = http_request(srv, "POST", "/send/u1", b"x", headers={"Origin": EVIL})
    assert status == 401 and cors_headers(headers) == {}
    # Streams: refused (the accept callback hands the request on) and taken, both ways in.
    check_streams(srv, APP, {**allowed(APP), **CREDENTIALS}, status=401)
    check_streams(srv, APP, {**allowed(APP), **CREDENTIALS}, query=f"?token={hs256('u1')}")
    check_streams(srv, EVIL, {}, query=f"?token={hs256('u1')}")


def test_credentials_only_with_a_listed_origin_and_a_token_that_may_be_a_cookie(tmp_path):
    for flags, origin, expected in (
            (["--cors-origin", "*", "--jwt-secret", SECRET], EVIL, allowed("*")),
            (["--cors-origin", APP, "--api-key", KEY], APP, allowed(APP))):
        srv = start_server(str(tmp_path / f"db{len(flags)}{origin[8]}"), *flags)
        try:
            status, headers, _ = http_request(srv, "GET", "/stats", headers={
                "Origin": origin, "X-API-Key": KEY})
            assert cors_headers(headers) == expected, flags  # no Allow-Credentials
            status, headers, _ = preflight(srv, "/stats", origin, "GET")
            assert status == 204 and cors_headers(headers) == {**expected, **PREFLIGHT}, flags
        finally:
            srv.stop()


COOKIE_PAGE = """<!doctype html><html><body><pre id="out">pending</pre><script>
const [cometd, token, withCredentials] = location.hash.slice(1).split("|");
const out = document.getElementById("out");
// Cookies ignore ports: one set here goes to cometd on another port of this host.
document.cookie = `cometd_token=${token}; path=/`;
const es = new EventSource(cometd + "/events/b1", {withCredentials: withCredentials === "1"});
es.onopen = () => fetch(cometd + "/send/b1", {method: "POST", body: "by cookie",
                                              headers: {"Authorization": "Bearer " + token}});
es.onmessage = ev => { es.close(); out.textContent = JSON.stringify({stream: ev.data}); };
es.onerror = () => { es.close(); out.textContent = JSON.stringify({stream: "error"}); };
</script></body></html>
"""


@needs_chromium
def test_a_browser_stream_with_its_token_in_a_cookie(driver, tmp_path):
    (tmp_path / "page.html").write_text(COOKIE_PAGE)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    handler.log_message = lambda *args: None  # type: ignore[attr-defined]
    pages = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=pages.serve_forever, daemon=True).start()
    origin = f"http://127.0.0.1:{pages.server_port}"
    srv = start_server(str(tmp_path / "db"), "--cors-origin", origin, "--jwt-secret", SECRET)
    try:
        for credentials, expected in (("1", '{"from": "b1", "body": "by cookie"}'),
                                      ("0", "error")):  # no cookie sent: 401
            url = f"{origin}/page.html#{srv.url}|{hs256('b1')}|{credentials}"
            got = browser_run(driver, url)
            assert got == {"stream": expected}, credentials
    finally:
        srv.stop()
        pages.shutdown()
        pages.server_close()


def test_a_stream_refused_by_the_limits_carries_the_headers(tmp_path, mode):
    srv = start_server(str(tmp_path / "db"), "--mode", mode, "--cors-origin", APP,
                       "--max-streams-per-user", "1")
    try:
        with open_stream(srv, "GET /test/u1 HTTP/1.1\r\nHost: x\r\n\r\n") as first:
            first.chunk()
            wait_for(lambda: get_stats(srv)["connections"] == 1, 10, what="the first stream")
            for way, request in stream_requests(srv, APP).items():
                if "head" in way:
                    continue  # a HEAD opens no stream, so no limit refuses it
                refused = open_stream(srv, request)
                try:
                    assert refused.status == 429, way
                    assert cors_headers(refused.headers) == allowed(APP), (way, refused.headers)
                finally:
                    refused.close()
            refused = open_stream(srv, stream_requests(srv, EVIL)["fast sse"])
            assert refused.status == 429 and cors_headers(refused.headers) == {}
            refused.close()
    finally:
        srv.stop()

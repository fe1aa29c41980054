"""Publishing, on the fast path and through bottle: the same answers, batches all or nothing.

Two servers, alike but for ``--no-fast-publish``, get the same raw requests
(good and bad publishes, credentials, CORS, the smuggling corpus, pipelined
requests behind them) and must answer byte for byte alike, Date and message
ids aside; ``cometd_fast_publishes_total`` shows which way each went. Then
what only the fast path does: many publishes on one keep-alive connection,
handing the connection to pywsgi for another route, the idle timeout; and
``POST /publish`` on a single server and through an edge.
"""

from __future__ import annotations

import json
import re
import signal
import socket
import time

import pytest
from conftest import RedisServer, StreamClient, http_json, start_cometd, start_server, unique_id
from test_backplane import EDGE_READY, ROUTER_READY
from test_history import events, open_stream
from test_server import SMUGGLING

from cometd.auth import mint
from cometd.history import parse_id

KEY = "publish-test-key"
SECRET = "s" * 32
ORIGIN = "http://page.example"
TIMEOUT = 1.0
HEALTH = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"


def _start(tmp_path_factory, *extra: str):
    return start_server(str(tmp_path_factory.mktemp("publish") / "db"), "--admin-port", "-1",
                        "--api-key", KEY, "--jwt-secret", SECRET, "--cors-origin", ORIGIN,
                        "--request-timeout", str(TIMEOUT), *extra)


@pytest.fixture(scope="module")
def fast(tmp_path_factory):
    s = _start(tmp_path_factory)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def slow(tmp_path_factory):
    s = _start(tmp_path_factory, "--no-fast-publish")
    yield s
    s.stop()


def _exchange(srv, data: bytes) -> bytes:
    """*data* on one connection; all the server sends until it closes."""
    with socket.create_connection((srv.host, srv.port), timeout=10) as sock:
        try:
            sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass
        out = b""
        try:
            while chunk := sock.recv(65536):
                out += chunk
        except ConnectionResetError:
            pass
    return out


def _responses(data: bytes) -> list[tuple[str, list[str], object]]:
    """(status line, header lines but Date, JSON body with ids masked) of each response."""
    out = []
    while data:
        head, sep, rest = data.partition(b"\r\n\r\n")
        assert sep, data
        lines = head.decode("latin-1").split("\r\n")
        length = next(int(v) for k, _, v in (x.partition(": ") for x in lines)
                      if k.lower() == "content-length")
        body = json.loads(rest[:length])
        text = re.sub(r'"id": "[^"]+"', '"id": "ID"', json.dumps(body))
        out.append((lines[0], sorted(x for x in lines[1:] if not x.startswith("Date:")),
                    json.loads(text)))
        data = rest[length:]
    return out


def _fast_count(srv) -> int:
    data = _exchange(srv, b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-API-Key: %s\r\n"
                     b"Connection: close\r\n\r\n" % KEY.encode())
    match = re.search(rb"\ncometd_fast_publishes_total (\S+)", data)
    assert match, data[:300]
    return int(float(match[1]))


def _post(path: str, body: bytes, *fields: str) -> bytes:
    head = "".join(f"{f}\r\n" for f in fields)
    return (f"POST {path} HTTP/1.1\r\nHost: x\r\n{head}Content-Length: {len(body)}\r\n\r\n"
            ).encode() + body


def _batch(*items: object) -> bytes:
    return b"".join(json.dumps(i).encode() + b"\n" for i in items)


ALICE = mint(SECRET, "alice", 600)
BOB = mint(SECRET, "bob", 600)
API = f"X-API-Key: {KEY}"
# name: (request bytes, how many of them the fast path answers)
CASES = {
    "send": (_post("/send/alice", b"hi", API), 1),
    "send-cors": (_post("/send/alice", b"hi", API, f"Origin: {ORIGIN}"), 1),
    "send-other-origin": (_post("/send/alice", b"hi", API, "Origin: http://evil"), 1),
    "send-as-itself": (_post("/send/alice", b"hi", f"Authorization: Bearer {ALICE}"), 1),
    "send-as-another": (_post("/send/alice", b"hi", f"Authorization: Bearer {BOB}"), 1),
    "send-no-credential": (_post("/send/alice", b"hi"), 1),
    "send-bad-key": (_post("/send/alice", b"hi", "X-API-Key: nope"), 1),
    "send-bad-token": (_post("/send/alice", b"hi", "Authorization: Bearer a.b.c"), 1),
    "send-empty": (_post("/send/alice", b"", API), 1),
    "send-too-long": (_post("/send/alice", b"x" * (64 * 1024 + 1), API), 1),
    "send-bad-subject": (_post("/send/" + "x" * 65, b"hi", API), 1),
    "send-query": (_post("/send/alice?x=1", b"hi", API), 1),
    "send-escaped": (_post("/send/%61lice", b"hi", API), 0),
    "send-chunked": (b"POST /send/alice HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
                     b"%s\r\n\r\n2\r\nhi\r\n0\r\n\r\n" % API.encode(), 0),
    "send-two-keys": (_post("/send/alice", b"hi", API, API), 0),
    "send-close": (_post("/send/alice", b"hi", API, "Connection: close"), 1),
    "send-subpath": (_post("/send/alice/x", b"hi", API), 0),
    "publish": (_post("/publish", _batch({"from": "alice", "body": "a"},
                                         {"from": "bob", "body": "b"}), API), 1),
    "publish-as-itself": (_post("/publish", _batch({"from": "alice", "body": "a"}),
                                f"Authorization: Bearer {ALICE}"), 1),
    "publish-as-another": (_post("/publish", _batch({"from": "alice", "body": "a"},
                                                    {"from": "bob", "body": "b"}),
                                 f"Authorization: Bearer {ALICE}"), 1),
    "publish-bad-json": (_post("/publish", b'{"from": "a", "body": "x"}\n{nope\n', API), 1),
    "publish-bad-id": (_post("/publish", _batch({"from": "a b", "body": "x"}), API), 1),
    "publish-empty-body": (_post("/publish", _batch({"from": "a", "body": ""}), API), 1),
    "publish-extra-field": (_post("/publish", _batch({"from": "a", "body": "x", "to": 1}), API),
                            1),
    "publish-not-object": (_post("/publish", b"[1, 2]\n", API), 1),
    "publish-nothing": (_post("/publish", b"\n\n", API), 1),
    "publish-no-credential": (_post("/publish", _batch({"from": "a", "body": "x"})), 1),
    "publish-trailing-slash": (_post("/publish/", b"x", API), 0),
    "extra-crlf": (_post("/send/alice", b"hi", API) + b"\r\n", 1),
    **{f"smuggle-{name}": (b"POST /send/alice HTTP/1.1\r\nHost: x\r\n%s\r\n%s" % (f, b), 0)
       for name, (f, b, _) in SMUGGLING.items()},
}


@pytest.mark.parametrize("case", CASES)
def test_both_paths_answer_alike(fast, slow, case):
    request, taken = CASES[case]
    before = _fast_count(fast)
    # Every case, then a publish and a request for another route on the same connection.
    data = request + _post("/send/bob", b"next", API) + HEALTH[:-2] + b"Connection: close\r\n\r\n"
    got, want = _responses(_exchange(fast, data)), _responses(_exchange(slow, data))
    assert got == want
    assert got, "no answer at all"
    closed_early = len(got) == 1
    assert _fast_count(fast) - before == taken + (taken and not closed_early)
    assert _fast_count(slow) == 0


def test_a_keepalive_publisher_is_served_request_after_request(fast):
    user = unique_id("ka")
    token = mint(SECRET, user, 60)
    before = _fast_count(fast)
    with StreamClient.open(fast, f"/test/{user}?token={token}") as stream, \
            socket.create_connection((fast.host, fast.port), timeout=10) as sock:
        stream.chunk()
        reader = sock.makefile("rb")
        for i in range(50):
            sock.sendall(_post(f"/send/{user}", b"m%d" % i, API))
            status = reader.readline()
            assert status == b"HTTP/1.1 200 OK\r\n", status
            length = 0
            while (line := reader.readline()) != b"\r\n":
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            assert json.loads(reader.read(length))["delivered"] == 1
        assert [stream.chunk() for _ in range(50)] == [b"m%d" % i for i in range(50)]
        # another route hands the connection to pywsgi, which serves what follows
        sock.sendall(HEALTH + _post(f"/send/{user}", b"after", API))
        assert reader.readline() == b"HTTP/1.1 200 OK\r\n"
        assert stream.chunk() == b"after"
    assert _fast_count(fast) - before == 50


def test_an_idle_keepalive_publisher_is_closed_after_the_request_timeout(fast):
    with socket.create_connection((fast.host, fast.port), timeout=10) as sock:
        sock.sendall(_post("/send/alice", b"hi", API))
        assert sock.recv(65536).startswith(b"HTTP/1.1 200 OK")
        start = time.monotonic()
        assert sock.recv(65536) == b""
        assert TIMEOUT * 0.8 < time.monotonic() - start < TIMEOUT * 3


def _watch(srv, user: str) -> StreamClient:
    stream = StreamClient.open(srv, f"/test/{user}?token={mint(SECRET, user, 60)}")
    stream.chunk()
    return stream


def _publish(srv, body: bytes, *fields: str) -> tuple[int, dict]:
    answers = _responses(_exchange(srv, _post("/publish", body, *fields, "Connection: close")))
    status = int(answers[0][0].split()[1])
    return status, answers[0][2]


def _raw_publish(srv, body: bytes) -> tuple[int, dict]:
    data = _exchange(srv, _post("/publish", body, API, "Connection: close"))
    head, _, rest = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(rest)


@pytest.mark.system  # the server fixture is named at run time, out of the tier walk's sight
@pytest.mark.parametrize("path", ["fast", "slow"])
def test_a_batch_is_delivered_in_order_with_an_id_each(request, path):
    srv = request.getfixturevalue(path)
    a, b = unique_id("ba"), unique_id("bb")
    with _watch(srv, a) as sa, _watch(srv, b) as sb:
        items = [{"from": a if i % 3 else b, "body": f"n{i} é"} for i in range(30)]
        status, answer = _raw_publish(srv, _batch(*items))
        assert status == 200, answer
        results = answer["results"]
        assert [r["delivered"] for r in results] == [1] * 30
        keys = [parse_id(r["id"]) for r in results]
        assert keys == sorted(keys) and len(set(keys)) == 30
        assert [sa.chunk() for _ in range(20)] == [
            i["body"].encode() for i in items if i["from"] == a]
        assert [sb.chunk() for _ in range(10)] == [
            i["body"].encode() for i in items if i["from"] == b]


@pytest.mark.parametrize("bad, problem", [
    (b'{"from": "x", "body": 3}', 'line 3: not an object with a "from" and a "body" string'),
    (b'{"from": "x", "body": "' + b"y" * (64 * 1024 + 1) + b'"}', "line 3: body over 65536"),
    (b"nope", "line 3: not JSON"),
], ids=["not-a-string", "too-long", "not-json"])
def test_a_bad_line_refuses_the_whole_batch(fast, bad, problem):
    user = unique_id("bad")
    with _watch(fast, user) as stream:
        good = json.dumps({"from": user, "body": "good"}).encode()
        status, answer = _raw_publish(fast, good + b"\n" + good + b"\n" + bad + b"\n")
        assert status == 400 and answer["error"].startswith(problem), answer
        status, answer = _raw_publish(fast, _batch({"from": user, "body": "later"}))
        assert status == 200
        assert stream.chunk() == b"later"  # nothing of the refused batch came first


def test_a_token_publishes_a_batch_only_as_itself(fast):
    user, other = unique_id("me"), unique_id("other")
    token = mint(SECRET, user, 60)
    with _watch(fast, user) as stream:
        status, answer = _publish(fast, _batch({"from": user, "body": "1"},
                                               {"from": other, "body": "2"}),
                                  f"Authorization: Bearer {token}")
        assert (status, answer) == (403, {"error": "the token is for another user"})
        status, answer = _publish(fast, _batch({"from": user, "body": "mine"}),
                                  f"Authorization: Bearer {token}")
        assert status == 200 and answer["results"][0]["delivered"] == 1
        assert stream.chunk() == b"mine"


def test_an_edge_publishes_a_batch_in_one_router_call(tmp_path):
    redis = RedisServer(str(tmp_path))
    redis.start()
    procs = []
    try:
        procs.append(start_cometd(["router", "--redis", redis.url, "--db", str(tmp_path / "db"),
                                   "--admin-port", "-1"], ROUTER_READY))
        edge = start_cometd(["edge", "--redis", redis.url, "--port", "0"],
                            EDGE_READY)
        procs.append(edge)
        srv = type("Srv", (), {"host": edge.match.group(2), "port": int(edge.match.group(3))})
        user = unique_id("edge")
        with StreamClient.open(srv, f"/test/{user}") as stream:
            stream.chunk()
            deadline = time.monotonic() + 10
            while True:  # the router learns of the stream from the edge
                status, answer = _raw_publish(srv, _batch({"from": user, "body": "x"}))
                if answer["results"][0]["delivered"] or time.monotonic() > deadline:
                    break
                time.sleep(0.1)
            assert stream.chunk() == b"x"
            before = _fast_count_open(srv)
            payloads = _edge_deliveries(srv)
            status, answer = _raw_publish(srv, _batch(*({"from": user, "body": f"e{i}"}
                                                        for i in range(20))))
            assert status == 200 and [r["delivered"] for r in answer["results"]] == [1] * 20
            assert [stream.chunk() for _ in range(20)] == [b"e%d" % i for i in range(20)]
            assert _fast_count_open(srv) > before
            # The batch shares delivery flushes, not one (10 ms apart) a message.
            assert _edge_deliveries(srv) - payloads <= 3
    finally:
        for proc in procs:
            proc.stop()
        redis.stop()


def _edge_deliveries(srv) -> int:
    """Delivery payloads the edge has had from the router, from its /metrics."""
    data = _exchange(srv, b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    found = re.findall(rb'\ncometd_backplane_batch_size_count\{[^}]*kind="delivery"[^}]*'
                       rb'process="edge[^"]*"[^}]*\} (\S+)', data)
    assert len(found) == 1, data
    return int(float(found[0]))


def _fast_count_open(srv) -> int:
    data = _exchange(srv, b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    found = re.findall(rb'\ncometd_fast_publishes_total\{process="edge[^"]*"\} (\S+)', data)
    return int(sum(float(v) for v in found))


# -- the fast path's own reading and writing ------------------------------------------

def _heads() -> list[bytes]:
    """Publish heads of many shapes: every case above, and variations of the common one."""
    heads = [data[:data.index(b"\r\n\r\n") + 4] for data, _ in CASES.values()
             if b"\r\n\r\n" in data]
    common = b"POST /send/alice HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n"
    for extra in [b"", b"X-API-Key: k\r\n", b"x-api-key:k \t\r\n",
                  b"Authorization: Bearer t\r\n", b"Origin: http://page.example\r\n",
                  b"ORIGIN: o\r\nOrigin: p\r\n", b"Connection: close\r\n",
                  b"Connection: keep-alive\r\n", b"Expect: 100-continue\r\n",
                  b"Host: y\r\n", b"Content-Length: 2\r\n", b"Content-Length: 3\r\n",
                  b"Transfer-Encoding: chunked\r\n", b"X-A: a\rb\r\n", b"X-A: \x00\r\n",
                  b"X-A: host: y\r\n", b"X-Host: y\r\n", b" folded\r\n", b"X-A : 1\r\n",
                  b"X(A): 1\r\n", b"User-Agent: t\xe9st\r\n", b"Accept: */*\r\n"]:
        heads.append(common + extra + b"\r\n")
        heads.append(common.replace(b"Host: x\r\n", b"") + extra + b"\r\n")
    for line in [b"POST /publish HTTP/1.1", b"POST /send/a.b_c:d-1 HTTP/1.1",
                 b"POST /send/" + b"x" * 64 + b" HTTP/1.1",
                 b"POST /send/" + b"x" * 65 + b" HTTP/1.1",
                 b"POST /send/al%69ce HTTP/1.1", b"POST /send/alice?x HTTP/1.1",
                 b"POST /send/alice HTTP/1.0", b"POST /send/alice HTTP/1.2",
                 b"POST /send/alice HTTP/2.0", b"POST  /send/alice HTTP/1.1",
                 b"POST http://x/send/alice HTTP/1.1", b"POST /sendx/alice HTTP/1.1",
                 b"POST /publish/ HTTP/1.1", b"POST /publishx HTTP/1.1"]:
        heads.append(line + b"\r\nHost: x\r\nContent-Length: 7\r\n\r\n")
    for length in [b"0", b"007", b" 12 ", b"\t5", b"", b"1" * 18, b"1" * 19, b"-1", b"+1", b"1 2",
                   b"\xb2", b"3,3"]:
        heads.append(b"POST /send/alice HTTP/1.1\r\nHost: x\r\nContent-Length: " + length
                     + b"\r\n\r\n")
    return heads


def _mutants(head: bytes, rng) -> list[bytes]:
    """*head* with one byte changed, removed or doubled, at random places; each still ends
    with its empty line (the fast path only reads such a head)."""
    out = []
    body = head[:-4]
    for _ in range(300):
        at = rng.randrange(len(body))
        pick = rng.choice([b"\r", b"\n", b" ", b"\t", b":", b",", b"\x00", b"\x7f", b"\xe9",
                           b"A", b"-", b"0", b"%", b"?", b"/"])
        kind = rng.randrange(3)
        if kind == 0:
            mutated = body[:at] + pick + body[at + 1:]
        elif kind == 1:
            mutated = body[:at] + body[at + 1:]
        else:
            mutated = body[:at] + body[at:at + 1] * 2 + body[at + 1:]
        if b"\r\n\r\n" not in mutated:
            out.append(mutated + b"\r\n\r\n")
    return out


def test_the_plain_reading_takes_only_what_the_strict_grammar_reads_alike():
    """The plain reading of a head is the strict grammar's, or none (then the grammar reads it).

    Over the shapes above and thousands of one-byte mutations of them: it
    never takes a head the strict grammar refuses or leaves to pywsgi, and
    never reads one differently; and it does take the common shapes.
    """
    import random

    from cometd.publish import _general_request, _plain_request
    rng = random.Random(17)
    heads = _heads()
    for seed in list(heads[:40]):
        heads += _mutants(seed, rng)
    taken = 0
    for head in heads:
        plain = _plain_request(head)
        if plain is not None:
            taken += 1
            assert plain == _general_request(head), head
    assert taken > 100, taken
    for head in (_post("/send/alice", b"hi", API)[:-2], _post("/publish", b"x")[:-1],
                 _post("/send/1", b"", f"Authorization: Bearer {ALICE}", f"Origin: {ORIGIN}")):
        assert _plain_request(head) is not None, head


_TOO_DEEP = b'{"from": "1", "body": ' + b"[" * 100_000 + b"]" * 100_000 + b"}\n"
# Bodies the batch's one-array reading must read as the line by line one does, or leave to it.
BATCH_BODIES = [
    _batch({"from": "1", "body": "a"}, {"from": "bob", "body": "b \u00e9 }\n{ \\ \" end"}),
    b'{"from":"1","body":"x"}\n{"from":"user:2","body":"y"}',
    # two items on one line and one over two: as one array, three items on two lines
    b'{"from": "1", "body": "x"}, {"from": "2"\n"body": "y"}\n',
    b'{"from": "1"\n, "body": "x"}\n',
    b'{"from": "1", "body": "x"}, {"from": "2", "body": "y"}\n',
    b'\n\n{"from": "1", "body": "x"}\n\n{"from": "2", "body": "y"}\r\n  \n',
    b'{"from": "1", "body": "x"}\r\n{"from": "2", "body": "y"}\r\n',
    b'{"from": "1", "body": "x", "from": "2"}\n',
    b'{"from": "1", "body": "\\ud800"}\n',
    b'{"from": "a b", "body": "x"}\n',
    b'{"from": "1", "body": ""}\n',
    b'{"from": 1, "body": "x"}\n{"from": "1", "body": 2}\n',
    b'{"from": "1", "body": "x", "to": 2}\n',
    b'{"from": "1", "body": {"x": "y"}}\n{"from": "1", "body": "x"}\n',
    b'[{"from": "1", "body": "x"}]\n',
    b'\xef\xbb\xbf{"from": "1", "body": "x"}\n',
    b'{"from": "1", "body": "\xff"}\n',
    b'\x0c{"from": "1", "body": "x"}\x0c\n',
    b'{"from": "1", "body": NaN}\n',
    b" \n\t\n",
    _TOO_DEEP,
    b'{"from": "1", "body": "' + b"y" * (64 * 1024 + 1) + b'"}\n',
    b'{"from":"1","body":"x"}\n' * 10_001,
    b'{"from":"1","body":"x"}\n' * 10_000,
]


def _parsed(parse, body: bytes) -> object:
    from cometd.publish import BodyError
    try:
        return parse(body)
    except BodyError as exc:
        return exc.status, exc.message


def test_a_batch_read_as_one_array_is_read_as_line_by_line(monkeypatch):
    """parse_batch's one-array reading gives what the line by line one gives, errors and all.

    Over the bodies above and a few thousand one-byte mutations of the short
    ones: the same messages, or the same error naming the same line; and the
    common shape does take the one-array reading.
    """
    import random

    from cometd import publish
    rng = random.Random(17)
    bodies = list(BATCH_BODIES)
    for seed in (b for b in BATCH_BODIES if len(b) < 200):
        for _ in range(150):
            at = rng.randrange(len(seed))
            pick = bytes((rng.choice(b'{}[],:"\n\r \\x10\x0c'),))
            bodies.append(seed[:at] + pick + seed[at + (rng.random() < 0.5):])
    for body in bodies:
        assert _parsed(publish.parse_batch, body) == _parsed(publish._parse_lines, body), body[:80]
    deep = _parsed(publish.parse_batch, _TOO_DEEP)
    assert deep[0] == 400 and deep[1].startswith("line 1: not JSON"), deep
    by_lines = []
    monkeypatch.setattr(publish, "_parse_lines", lambda b: by_lines.append(b) or [])
    for body in BATCH_BODIES[:2] + BATCH_BODIES[-1:]:
        assert publish.parse_batch(body), body[:80]
    assert by_lines == []


def test_a_send_answer_is_json_dumps_bytes():
    from cometd.publish import Answer, _answer_bytes
    for delivered, message_id in [(0, "1-0"), (12345, "4294967295-1048575")]:
        payload = {"delivered": delivered, "id": message_id}
        data = _answer_bytes(Answer(200, payload), True, "Vary: Origin\r\n", False)
        head, _, body = data.partition(b"\r\n\r\n")
        assert body == json.dumps(payload).encode()
        assert b"\r\nContent-Length: %d\r\n" % len(body) in head
        assert b"\r\nVary: Origin\r\n" in head and b"Connection" not in head


def test_a_batch_answer_is_json_dumps_bytes():
    """A batch's results, written from pieces, are json.dumps's bytes; so are its errors."""
    from cometd.history import format_ids
    from cometd.publish import Answer, _answer_bytes, results_json
    from cometd.router import Sent
    for sent in ([], [Sent(0, "1-0")], [(12345, "4294967295-18446744073709551615"), (0, "2-9")],
                 list(zip(range(100), format_ids(5 << 64 | 99_999_950, 100), strict=True))):
        text = results_json(sent)
        assert text == json.dumps({"results": [{"delivered": d, "id": i} for d, i in sent]})
        for payload in (text, {"error": 'line 7: not JSON: "\u00e9" \u00e9'}):
            data = _answer_bytes(Answer(200 if payload is text else 400, payload), False,
                                 "Vary: Origin\r\n", False)
            head, _, body = data.partition(b"\r\n\r\n")
            assert body == (text if payload is text else json.dumps(payload)).encode()
            assert b"\r\nContent-Length: %d\r\n" % len(body) in head


class _CountingSocket(socket.socket):
    """A real socket that counts its sends."""

    sends = 0

    def send(self, data, *args):
        self.sends += 1
        return super().send(data, *args)


class _Backend:
    """What serve_publisher publishes to, in process: the subjects it was given, in order."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes]] = []

    def send(self, subject: str, body: bytes) -> tuple[int, str]:
        self.sent.append((subject, body))
        return 0, f"1-{len(self.sent)}"


def _in_process_server(backend):
    import gevent

    from cometd.auth import Authenticator
    from cometd.config import AuthConfig
    table = type("Table", (), {"loop": gevent.get_hub().loop})()
    return type("Server", (), {"publisher": backend, "auth": Authenticator(AuthConfig()),
                               "cors": None, "table": table, "request_timeout": TIMEOUT})()


def test_pipelined_publishes_are_answered_in_order_with_one_write():
    import gevent

    from cometd.publish import serve_publisher
    backend = _Backend()
    ours, theirs = socket.socketpair()
    sock = _CountingSocket(fileno=ours.detach())
    requests = b"".join(_post(f"/send/u{i}", b"m%d" % i) for i in range(20))
    theirs.sendall(requests)
    theirs.shutdown(socket.SHUT_WR)  # after these, the client is done
    done = gevent.spawn(serve_publisher, _in_process_server(backend), sock, b"")
    done.join(5)
    assert done.successful() and done.value is None, done.exception
    assert sock.sends == 1
    sock.close()
    theirs.settimeout(5)
    data = b""
    while chunk := theirs.recv(65536):
        data += chunk
    theirs.close()
    answers = _responses(data)
    assert [a[0] for a in answers] == ["HTTP/1.1 200 OK"] * 20
    assert backend.sent == [(f"u{i}", b"m%d" % i) for i in range(20)]
    assert [json.loads(b) for b in re.findall(rb'\{"delivered[^}]*\}', data)] == [
        {"delivered": 0, "id": f"1-{i + 1}"} for i in range(20)]


def _read_answer(reader) -> tuple[bytes, dict]:
    """The status line and JSON body of the next answer on *reader* (a socket's file)."""
    status = reader.readline()
    length = 0
    while (line := reader.readline()) not in (b"\r\n", b""):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    return status, json.loads(reader.read(length) or b"null")


def test_a_request_split_anywhere_is_read_whole(fast):
    """Each publish arrives in two reads, split after every byte of it in turn."""
    user = unique_id("split")
    before = _fast_count(fast)
    with _watch(fast, user) as stream, \
            socket.create_connection((fast.host, fast.port), timeout=10) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        reader = sock.makefile("rb")
        request = _post(f"/send/{user}", b"body!", API)
        sock.sendall(request)  # whole: the accept callback gives the fast path the connection
        assert _read_answer(reader)[1]["delivered"] == 1
        for cut in range(1, len(request)):
            sock.sendall(request[:cut])
            time.sleep(0.003)  # read on its own
            sock.sendall(request[cut:])
            status, answer = _read_answer(reader)
            assert (status, answer["delivered"]) == (b"HTTP/1.1 200 OK\r\n", 1), cut
        assert stream.chunks(len(request)) == [b"body!"] * len(request)
    assert _fast_count(fast) - before == len(request)


def test_a_trickling_publisher_is_closed_within_the_request_timeout(fast):
    """A byte now and then does not keep a request open: the deadline is per request."""
    with socket.create_connection((fast.host, fast.port), timeout=10) as sock:
        sock.sendall(_post("/send/alice", b"hi", API))
        assert sock.recv(65536).startswith(b"HTTP/1.1 200 OK")
        start = time.monotonic()
        request = _post("/send/alice", b"x" * 40, API)
        closed = None
        for byte in request:
            try:
                sock.send(bytes([byte]))
            except OSError:
                closed = time.monotonic()
                break
            sock.settimeout(0.15)
            try:
                if sock.recv(65536) == b"":
                    closed = time.monotonic()
                    break
            except TimeoutError:
                pass
        assert closed is not None, "the whole request trickled in"
        assert TIMEOUT * 0.8 < closed - start < TIMEOUT * 3


def test_a_busy_publisher_outlives_the_timeout_of_each_request(fast):
    """The deadline moves with each request: a connection in use for longer stays open."""
    with socket.create_connection((fast.host, fast.port), timeout=10) as sock:
        reader = sock.makefile("rb")
        for i in range(5):  # 2.4 request timeouts in all
            if i:
                time.sleep(TIMEOUT * 0.6)
            sock.sendall(_post("/send/alice", b"hi", API))
            assert _read_answer(reader)[0] == b"HTTP/1.1 200 OK\r\n", i


def test_a_publisher_that_reads_no_answers_is_closed_after_the_request_timeout(fast):
    """Pipelined publishes whose answers are never read: once the answers fill the socket,
    the server waits for room up to the request timeout, then closes."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect((fast.host, fast.port))
        block = _post("/send/alice", b"hi") * 200  # no credential: 401s, no router work
        sock.sendall(block)  # (one whole publish first: the fast path takes the connection)
        sock.settimeout(0.5)
        deadline = time.monotonic() + 30
        try:
            while time.monotonic() < deadline:
                sock.sendall(block)
        except TimeoutError:
            pass
        stuck = time.monotonic()  # the server no longer reads: it waits to write
        closed = None
        sock.settimeout(0.1)
        while closed is None and time.monotonic() < stuck + TIMEOUT * 10:
            try:
                sock.send(block)
            except TimeoutError:
                continue
            except OSError:
                closed = time.monotonic()
        assert closed is not None, "still open"
        assert closed - stuck < TIMEOUT * 3


def test_a_publish_after_a_poll_on_its_kept_connection_takes_the_fast_path(fast):
    user = unique_id("poll")
    token = mint(SECRET, user, 60)
    before = _fast_count(fast)
    with _watch(fast, user) as stream, \
            socket.create_connection((fast.host, fast.port), timeout=10) as sock:
        reader = sock.makefile("rb")
        sock.sendall(f"GET /poll/{user}?timeout=0&token={token} HTTP/1.1\r\nHost: x\r\n\r\n"
                     .encode())
        assert _read_answer(reader)[0] == b"HTTP/1.1 200 OK\r\n"
        sock.sendall(_post(f"/send/{user}", b"after a poll", API))
        status, answer = _read_answer(reader)
        assert (status, answer["delivered"]) == (b"HTTP/1.1 200 OK\r\n", 1)
        assert stream.chunk() == b"after a poll"
    assert _fast_count(fast) - before == 1


def test_a_batchs_history_survives_a_kill_9_right_after_the_answer(tmp_path):
    db = str(tmp_path / "db")
    srv = start_server(db, "--admin-port", "-1")
    try:
        me, friend = unique_id("me"), unique_id("f")
        assert http_json(srv, "POST", "/subscriptions", [[me, friend]])[0] == 200
        status, seen = http_json(srv, "POST", f"/send/{friend}", b"seen")
        assert status == 200
        status, answer = http_json(srv, "POST", "/publish", _batch(
            *({"from": friend if i % 2 else me, "body": f"b{i}"} for i in range(50))))
        assert status == 200, answer
    finally:
        srv.stop(signal.SIGKILL)  # at once: the answer came after the write
    sent = [parse_id(r["id"]) for r in answer["results"]]
    assert sent == list(range(sent[0], sent[0] + 50))  # consecutive, in order
    assert sent[0] == parse_id(seen["id"]) + 1
    srv = start_server(db, "--admin-port", "-1")
    try:
        with open_stream(srv, f"/events/{me}", {"Last-Event-ID": seen["id"]}) as stream:
            assert stream.headers["cometd-recovered"] == "true"
            stream.chunk()
            got = events(stream, 50)
        assert [parse_id(e["id"]) for e in got] == sent
        assert [json.loads(e["data"])["body"] for e in got] == [f"b{i}" for i in range(50)]
    finally:
        srv.stop()

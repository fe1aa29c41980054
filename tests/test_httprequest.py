"""The request grammar in-process: what a head parses to, and what each refusal says.

The server tests send the same kinds of requests over sockets and check
what follows them on the connection; these pin the decisions themselves.
"""

from __future__ import annotations

import io

import pytest

from cometd.httprequest import HeadersTooLarge, RequestError, read_head


def _head(data: bytes):
    line, _, rest = data.partition(b"\n")
    return read_head((line + b"\n").decode("latin-1"), io.BufferedReader(io.BytesIO(rest)))


@pytest.mark.parametrize("data, expected", [
    (b"GET /stats HTTP/1.1\r\nHost: x\r\n\r\n", ("GET", "/stats", "HTTP/1.1", None, False, False)),
    (b"GET /stats HTTP/1.0\r\n\r\n", ("GET", "/stats", "HTTP/1.0", None, False, True)),
    (b"GET /stats HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n",
     ("GET", "/stats", "HTTP/1.0", None, False, False)),
    (b"GET /stats HTTP/1.1\r\nHost: x\r\nConnection: keep-alive, close\r\n\r\n",
     ("GET", "/stats", "HTTP/1.1", None, False, True)),
    (b"POST /send/1 HTTP/1.1\r\nHost: x\r\nContent-Length:  12 \r\n\r\n",
     ("POST", "/send/1", "HTTP/1.1", 12, False, False)),
    (b"POST /send/1 HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: Chunked\r\n\r\n",
     ("POST", "/send/1", "HTTP/1.1", None, True, False)),
    # Transfer-Encoding wins over Content-Length, and the connection closes after
    (b"POST /send/1 HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
     ("POST", "/send/1", "HTTP/1.1", None, True, True)),
    (b"GET http://example.com:80/test/1?a=b HTTP/1.1\r\nHost: y\r\n\r\n",
     ("GET", "/test/1?a=b", "HTTP/1.1", None, False, False)),
    (b"GET https://example.com HTTP/1.1\r\nHost: y\r\n\r\n",
     ("GET", "/", "HTTP/1.1", None, False, False)),
    (b"OPTIONS * HTTP/1.1\r\nHost: y\r\n\r\n", ("OPTIONS", "*", "HTTP/1.1", None, False, False)),
    (b"GET /stats HTTP/1.9\r\nHost: x\r\n\r\n", ("GET", "/stats", "HTTP/1.1", None, False, False)),
])
def test_heads_that_pass(data, expected):
    head = _head(data)
    assert (head.method, head.path, head.version, head.content_length, head.chunked,
            head.close) == expected
    assert all(name.lower() != "content-length" for name, _ in head.fields) or not head.chunked


def test_fields_keep_their_order_and_lose_their_padding():
    head = _head(b"GET / HTTP/1.1\r\nHost: x\r\nX-A:\t a b \t\r\nX-B:\r\nx-a: 2\r\n\r\n")
    assert head.fields == [("Host", "x"), ("X-A", "a b"), ("X-B", ""), ("x-a", "2")]


@pytest.mark.parametrize("data, status, words", [
    (b"get / HTTP/1.1\r\nHost: x\r\n\r\n", 501, "method"),
    (b"BREW / HTTP/1.1\r\nHost: x\r\n\r\n", 501, "method"),
    (b"G@T / HTTP/1.1\r\nHost: x\r\n\r\n", 400, "request line"),
    (b"GET  / HTTP/1.1\r\nHost: x\r\n\r\n", 400, "request line"),
    (b"GET / HTTP/1.1\nHost: x\r\n\r\n", 400, "CRLF"),
    (b"GET /stats\r\n\r\n", 400, "request line"),  # HTTP/0.9
    (b"GET / HTTP/2.0\r\n\r\n", 400, "version"),
    (b"GET example.com/ HTTP/1.1\r\nHost: x\r\n\r\n", 400, "target"),
    (b"GET ftp://x/ HTTP/1.1\r\nHost: x\r\n\r\n", 400, "target"),
    (b"GET * HTTP/1.1\r\nHost: x\r\n\r\n", 400, "target"),
    (b"GET / HTTP/1.1\r\n\r\n", 400, "Host"),
    (b"GET / HTTP/1.0\r\nHost: x\r\nHost: y\r\n\r\n", 400, "Host"),
    (b"GET / HTTP/1.1\r\nHost: x\r\nX: 1\r\n 2\r\n\r\n", 400, "folding"),
    (b"GET / HTTP/1.1\r\nHost : x\r\n\r\n", 400, "header line"),
    (b"GET / HTTP/1.1\r\nHost: x\r\nX: a\x7fb\r\n\r\n", 400, "header line"),
    (b"GET / HTTP/1.1\r\nHost: x\n\r\n", 400, "CRLF"),
    (b"GET / HTTP/1.1\r\nHost: x\r\n", 400, "ended"),
    (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\n", 400,
     "Content-Length"),
    (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1, 1\r\n\r\n", 400, "Content-Length"),
    (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: " + b"9" * 19 + b"\r\n\r\n", 400,
     "Content-Length"),
    (b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, gzip\r\n\r\n", 400, "chunked"),
    (b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: ,chunked\r\n\r\n", 400, "chunked"),
    (b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked"
     b"\r\n\r\n", 400, "more than once"),
    (b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", 501, "coding"),
    (b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n", 400, "HTTP/1.0"),
])
def test_heads_refused(data, status, words):
    with pytest.raises(RequestError) as refused:
        _head(data)
    assert refused.value.status == status
    assert words in refused.value.message


def test_a_header_block_over_64k_is_431():
    with pytest.raises(HeadersTooLarge) as refused:
        _head(b"GET / HTTP/1.1\r\nHost: x\r\n" + b"X: %s\r\n" % (b"v" * 1000) * 70 + b"\r\n")
    assert refused.value.status == 431

"""WebSocket streams, ``GET /ws/<id>`` (RFC 6455): the upgrade, the frames, what a client sends.

A WebSocket is one more stream kind (:data:`cometd.streamhttp.WEBSOCKET`) in
the :class:`~cometd.connections.ConnectionTable`: each message is one text
frame holding ``{"id": ..., "from": ..., "body": ...}`` (an SSE event's data
plus its id), built once per message like the other kinds' framings
(:func:`message_frame`, called by :meth:`cometd.streamhttp.Message.frame`).
The first frame is a welcome, ``{"welcome": "/ws/<id>", "id": ...}``; a
resume (``?since=<id>``) adds ``"recovered": true|false`` and, when false,
the id asked for and the reason, then the replay.

Theory of operation
-------------------
The request goes through pywsgi and the web app like a resume does: the app
checks the id and the token (404, 401/403) and marks the environ as a
stream; :func:`upgrade` then checks the handshake (400), the ``Origin``
(403, see below) and the admission limits (429/503), all before anything is
upgraded, and answers ``101 Switching Protocols``. The socket then leaves
pywsgi as any stream does. wsproto computes the ``Sec-WebSocket-Accept``
and parses client frames; server frames are unmasked and built here, since
the per-delivery path must stay one plain bytes write.

A browser's WebSocket is not subject to CORS, so with ``--cors-origin`` set
the handshake's ``Origin`` must be one of its origins (any with ``*``), and a
request without one (not a browser) is let through.

Client frames are read when the table's epoll says the socket is readable
(:func:`client_data`), in both connection modes, with no greenlet per
connection. A client answers each keep-alive ping with a pong, so a whole
masked pong in one read is recognised by its first bytes and dropped without
a parser; anything else goes to a wsproto connection made for that socket on
first need (about 1.7 KB, so not for every idle socket). Pings are answered,
a close is answered and the connection closed, text and binary data are
ignored (publishing stays on the HTTP API) up to :data:`MAX_CLIENT_MESSAGE`
bytes a message (1009 past it), and a protocol error (an unmasked frame, a
bad opcode, ...) closes with wsproto's code for it, mostly 1002. Each of these
ends counts as ``client`` in the disconnects.

The server's close codes, by why a stream ends (:data:`CLOSE_FRAMES`):
1001 shutdown, 1013 drain (try again later, elsewhere), 1008 token expired,
4000 slow consumer, 4001 kicked.
"""

from __future__ import annotations

import base64
import binascii
import json
import struct
from typing import Any

from wsproto.connection import Connection as _WsprotoConnection
from wsproto.connection import ConnectionType
from wsproto.events import BytesMessage, CloseConnection, Ping, TextMessage
from wsproto.utilities import generate_accept_token

from cometd.cors import with_lines
from cometd.counts import COUNTS
from cometd.history import Replay, format_id

__all__ = [
    "PREFIX", "PING", "CLOSE_CODES", "CLOSE_FRAMES", "MAX_CLIENT_MESSAGE", "HandshakeError",
    "accept_response", "check_handshake", "client_data", "close_frame", "frame",
    "message_frame", "resumed_frames", "upgrade", "welcome_frame",
]

#: the route's prefix
PREFIX = "/ws/"
OP_TEXT, OP_CLOSE, OP_PING, OP_PONG = 0x1, 0x8, 0x9, 0xA
#: the keep-alive: a ping with no payload
PING = b"\x89\x00"
#: the close code a stream gets, by why it ends (cometd.counts.DISCONNECT_REASONS)
CLOSE_CODES = {"shutdown": (1001, "server shutting down"), "drain": (1013, "server draining"),
               "expired": (1008, "token expired"), "slow": (4000, "slow consumer"),
               "kicked": (4001, "kicked")}
#: bytes of one text or binary message a client may send (all are ignored)
MAX_CLIENT_MESSAGE = 16 * 1024

_GUID_KEY_BYTES = 16  # a Sec-WebSocket-Key is 16 random bytes, base64 (RFC 6455 4.1)


def frame(opcode: int, payload: bytes) -> bytes:
    """One final, unmasked server frame."""
    n = len(payload)
    if n < 126:
        return bytes((0x80 | opcode, n)) + payload
    if n < 0x10000:
        return struct.pack("!BBH", 0x80 | opcode, 126, n) + payload
    return struct.pack("!BBQ", 0x80 | opcode, 127, n) + payload


def close_frame(code: int, reason: str = "") -> bytes:
    """A close frame with *code* and *reason* (cut to the 123 bytes a control frame allows)."""
    return frame(OP_CLOSE, struct.pack("!H", code) + reason.encode()[:123])


#: the close frame for each reason a stream ends that has a code
CLOSE_FRAMES = {reason: close_frame(*code) for reason, code in CLOSE_CODES.items()}


def message_frame(key: int, subject: str, body: bytes) -> bytes:
    """The text frame of one message: an SSE event's JSON data plus its id."""
    data = json.dumps({"id": format_id(key), "from": subject,
                       "body": body.decode("utf-8", "replace")})
    return frame(OP_TEXT, data.encode())


def welcome_frame(path: str, last: int, **extra: Any) -> bytes:
    """The first frame: the route and, with *last* (a message key), an id to resume from."""
    welcome: dict[str, Any] = {"welcome": path}
    if last:
        welcome["id"] = format_id(last)
    welcome.update(extra)
    return frame(OP_TEXT, json.dumps(welcome).encode())


def resumed_frames(path: str, since: str, replay: Replay) -> bytes:
    """A resumed WebSocket's first frames: the welcome saying whether it recovered, the replay."""
    extra: dict[str, Any] = {"recovered": replay.recovered}
    if not replay.recovered:
        extra.update(last_event_id=since[:100], reason=replay.reason)
    parts = [welcome_frame(path, replay.head, **extra)]
    parts.extend(message_frame(*message) for message in replay.messages)
    return b"".join(parts)


class HandshakeError(ValueError):
    """A request to a WebSocket route that is no valid opening handshake: 400."""


def _tokens(value: str | None) -> set[str]:
    return {t.strip().lower() for t in (value or "").split(",")}


def check_handshake(environ: dict[str, Any]) -> str:
    """The request's ``Sec-WebSocket-Key`` if *environ* is an RFC 6455 opening handshake."""
    if environ.get("REQUEST_METHOD") != "GET" or environ.get("SERVER_PROTOCOL") != "HTTP/1.1":
        raise HandshakeError("a WebSocket handshake is a GET over HTTP/1.1")
    if "websocket" not in _tokens(environ.get("HTTP_UPGRADE")) or (
            "upgrade" not in _tokens(environ.get("HTTP_CONNECTION"))):
        raise HandshakeError("not a WebSocket handshake (Upgrade: websocket, "
                             "Connection: Upgrade)")
    if environ.get("HTTP_SEC_WEBSOCKET_VERSION", "").strip() != "13":
        raise HandshakeError("unsupported Sec-WebSocket-Version (13 is supported)")
    key = environ.get("HTTP_SEC_WEBSOCKET_KEY", "").strip()
    try:
        valid = len(base64.b64decode(key, validate=True)) == _GUID_KEY_BYTES
    except (binascii.Error, ValueError):
        valid = False
    if not valid:
        raise HandshakeError("missing or malformed Sec-WebSocket-Key")
    return key


def accept_response(key: str, lines: str = "") -> bytes:
    """The ``101 Switching Protocols`` for *key*, with more header *lines* (CRLF-ended)."""
    accept = generate_accept_token(key.encode()).decode()
    return (f"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Accept: {accept}\r\n{lines}\r\n").encode()


def _refusal(status: int, reason: str, message: str, lines: str) -> bytes:
    body = json.dumps({"error": message}).encode()
    if status == 400:
        lines += "Sec-WebSocket-Version: 13\r\n"
    return (f"HTTP/1.1 {status} {reason}\r\nConnection: close\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n{lines}\r\n"
            ).encode() + body


def upgrade(handler, user: str, kind: int, path: str, expires: float | None,
            since: str | None, address: str):
    """Answer the WebSocket request the app took for *user*'s stream (see the module docstring).

    *handler* is the :class:`cometd.server.CometHandler` holding the request.
    Returns the handler's stream tuple, or None when the request was refused
    (the refusal sent).
    """
    server, environ, sock = handler.server, handler.environ, handler.socket
    cors = server.cors
    origin = environ.get("HTTP_ORIGIN")
    lines = "" if cors is None else cors.stream_lines(origin)
    try:
        key = check_handshake(environ)
    except HandshakeError as exc:
        COUNTS.rejected["400"] += 1
        sock.sendall(_refusal(400, "Bad Request", str(exc), lines))
        return None
    if cors is not None and origin is not None and not cors.allows(origin):
        COUNTS.rejected["403"] += 1
        sock.sendall(_refusal(403, "Forbidden", "this origin may not open a WebSocket", lines))
        return None
    refused = server.admission.admit(user, address)
    if refused is not None:
        sock.sendall(with_lines(refused, lines) if lines else refused)
        return None
    head = accept_response(key)
    if since is None:
        head += welcome_frame(path, server.table.newest)
    # else the welcome and the replay follow (cometd.server.CometServer.handle)
    sock.sendall(head)
    return (sock, user, kind, expires, address, path, since, "")


class _ClientFrames(_WsprotoConnection):
    """wsproto's server side of one socket, and the bytes of the message in progress."""

    def __init__(self) -> None:
        super().__init__(ConnectionType.SERVER)
        self.message_bytes = 0


def _whole_pong(data: bytes) -> bool:
    # FIN + pong, masked, a short payload, and nothing else in the read.
    return len(data) >= 6 and data[0] == 0x8A and data[1] & 0x80 == 0x80 and (
        len(data) == 6 + (data[1] & 0x7F)) and (data[1] & 0x7F) <= 125


def client_data(conn, data: bytes) -> None:
    """Act on *data* a client sent on its WebSocket *conn* (a table's connection)."""
    parser = conn.ws
    if parser is None:
        if _whole_pong(data):
            return
        parser = conn.ws = _ClientFrames()
    parser.receive_data(data)
    # A protocol error comes as a CloseConnection with wsproto's code for it,
    # which the answer echoes like a client's own close.
    for event in parser.events():
        if isinstance(event, Ping):
            conn.deliver(frame(OP_PONG, bytes(event.payload)))
        elif isinstance(event, CloseConnection):
            code = event.code if 1000 <= event.code < 5000 and event.code not in (
                1005, 1006, 1015) else 1000  # those three are never sent
            conn.table.end(conn, close_frame(code), "client")
            return
        elif isinstance(event, TextMessage | BytesMessage):
            parser.message_bytes += len(event.data)
            if parser.message_bytes > MAX_CLIENT_MESSAGE:
                conn.table.end(conn, close_frame(1009, "message too big"), "client")
                return
            if event.message_finished:
                parser.message_bytes = 0

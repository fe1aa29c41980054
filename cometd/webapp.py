"""The HTTP interface: a bottle app for streams, publishing and subscriptions.

Routes
------
``GET /test/<id>``            chunked stream of message bodies (HTTP/1.0: raw, until close);
                              ``?since=<message id>`` resumes after that message
``GET /events/<id>``          the same as Server-Sent Events; a ``Last-Event-ID`` header
                              (or ``?last_event_id=``) resumes
``GET /ws/<id>``              the same as a WebSocket (:mod:`cometd.websocket`); ``?since=``
                              resumes
``POST /send/<subject>``      publish the request body -> ``{"delivered": N, "id": "<id>"}``
``POST /publish``             many messages, one JSON object a line (see :mod:`cometd.publish`)
                              -> ``{"results": [{"delivered": N, "id": "<id>"}, ...]}``
``GET /poll/<id>``            long poll: ``?since=<message id>&timeout=<s>`` -> one JSON answer
                              (:mod:`cometd.longpoll`)
``GET /subscribers/<id>``     ``{"subscribers": [...]}``
``GET /subscriptions/<id>``   ``{"subscriptions": [...]}``
``POST /subscriptions``       JSON ``[[subscriber, subscribee], ...]`` -> ``{"added": N}``
                              (a ``[a, a]`` pair is refused: everyone gets their own messages)
``DELETE /subscriptions``     same body -> ``{"removed": N}``
``GET /stats``                counters as JSON
``GET /metrics``              Prometheus text format (:mod:`cometd.metrics`)
``GET /healthz``              ``{"status": "ok"}`` while the process serves (no auth)
``GET /readyz``               200, or 503 with what is missing (no auth)
``GET /``                     the demo page, with ``/page.css`` and ``/page.js``
                              (:mod:`cometd.page`; no auth: the files hold no secret)

With authentication configured, every route asks the
:class:`~cometd.auth.Authenticator` first (see :mod:`cometd.auth` for who may
do what); a refusal is 401 or 403 with ``{"error": reason}`` and a
``WWW-Authenticate`` header, and nothing of the request is applied.

A stream route does not write the stream itself: it marks the WSGI environ
with ``cometd.stream = (user, kind, path, expires, since)`` (*expires*: when
its token does, if it has one; *since*: the message id a resume asked for,
else None); the server adapter
(:mod:`cometd.server`) sends :func:`cometd.streamhttp.stream_head` and hands
the socket to the connection table, so no WSGI machinery stays behind per
connection. Most stream requests never get here: the server answers plain
ones when it accepts them (see :mod:`cometd.streamhttp`).

Errors are short JSON (or text) bodies; no traceback ever reaches a client.
"""

from __future__ import annotations

import json
from typing import Any, Protocol

import bottle

from cometd.auth import Authenticator, AuthError
from cometd.config import AuthConfig
from cometd.counts import COUNTS
from cometd.ids import InvalidId, check_id
from cometd.longpoll import POLL_KEY, PollError, PollRequest, parse_poll_query
from cometd.page import install as install_page
from cometd.publish import AUTH_FAILURES as _AUTH_FAILURES
from cometd.publish import Answer, BackendUnavailable, BodyError, answer_publish, answer_send
from cometd.store import SelfSubscription, check_pair
from cometd.streamhttp import WEBSOCKET, resume_from, stream_kind

__all__ = ["make_app", "Backend", "BackendUnavailable", "MAX_MESSAGE_BYTES", "STREAM_KEY"]

MAX_MESSAGE_BYTES = 64 * 1024
MAX_JSON_BYTES = 16 * 1024 * 1024
STREAM_KEY = "cometd.stream"
METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
#: the seed's answer to an invalid id on /test, kept word for word; /events names its own path
NOT_FOUND_USER = "User id not found, try {route}123 instead"


class Backend(Protocol):
    """What the app needs from the server (an edge passes these to the router)."""

    def send(self, subject: str, body: bytes) -> tuple[int, str]: ...
    def send_batch(self, messages: list[tuple[str, bytes]]) -> list[tuple[int, str]]: ...
    def subscribers(self, user: str) -> list[str]: ...
    def subscriptions(self, user: str) -> list[str]: ...
    def add(self, pairs: list[tuple[str, str]]) -> int: ...
    def remove(self, pairs: list[tuple[str, str]]) -> int: ...
    def stats(self) -> dict[str, Any]: ...
    def metrics(self) -> bytes: ...
    def ready(self) -> list[str]: ...


def _unavailable_is_503(callback: Any) -> Any:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return callback(*args, **kwargs)
        except BackendUnavailable as exc:
            return _error(503, str(exc))

    return wrapper


def _refusals_are_401_or_403(callback: Any) -> Any:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return callback(*args, **kwargs)
        except AuthError as exc:
            COUNTS.rejected[str(exc.status)] += 1
            if exc.status == 401:
                _AUTH_FAILURES.note()  # a count only: never the credential
            return bottle.HTTPResponse(
                json.dumps({"error": exc.description}), status=exc.status,
                headers={"Content-Type": "application/json",
                         "WWW-Authenticate": exc.www_authenticate})

    return wrapper


def _json(status: int, payload: Any) -> bottle.HTTPResponse:
    return bottle.HTTPResponse(
        json.dumps(payload), status=status, headers={"Content-Type": "application/json"}
    )


def _error(status: int, message: str) -> bottle.HTTPResponse:
    COUNTS.rejected[str(status)] += 1
    return _json(status, {"error": message})


def _answered(answer: Answer) -> bottle.HTTPResponse:
    payload = answer.payload
    return bottle.HTTPResponse(payload if type(payload) is str else json.dumps(payload),
                               status=answer.status,
                               headers={"Content-Type": "application/json", **dict(answer.headers)})


def _read_body(limit: int) -> bytes:
    """This request's body, at most *limit* bytes; :class:`BodyError` when it cannot be."""
    # Read this request's wsgi.input itself, not bottle's request.body: bottle's
    # request is a thread-local shared by every greenlet of the (unpatched)
    # server, and while this read waits for the network another request
    # rebinds it, so bottle would mix up the two requests' bodies. pywsgi's
    # input has also removed any chunk framing already, which bottle would
    # parse a second time.
    environ = bottle.request.environ
    length = int(environ.get("CONTENT_LENGTH") or -1)
    if length > limit:
        raise BodyError(413, f"request body over {limit} bytes")
    try:
        body = environ["wsgi.input"].read(limit + 1)
    except OSError:
        # The client went away, ran out of time or sent broken chunk framing.
        raise BodyError(400, "incomplete request body") from None
    if len(body) > limit:
        raise BodyError(413, f"request body over {limit} bytes")
    return body


def _pairs(body: bytes, adding: bool) -> list[tuple[str, str]]:
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise _error(400, f"body is not JSON: {exc}") from None
    if not isinstance(data, list):
        raise _error(400, "body must be a JSON list of [subscriber, subscribee] pairs")
    pairs = []
    for i, pair in enumerate(data):
        if not (isinstance(pair, list) and len(pair) == 2):
            raise _error(400, f"item {i} is not a [subscriber, subscribee] pair")
        try:
            pairs.append(check_pair(*pair) if adding else (check_id(pair[0]), check_id(pair[1])))
        except (InvalidId, SelfSubscription) as exc:
            raise _error(400, f"item {i}: {exc}") from None
    return pairs


def make_app(backend: Backend, auth: Authenticator | None = None) -> bottle.Bottle:
    """The bottle app over *backend*, with access as *auth* says (None: open to all)."""
    if auth is None:
        auth = Authenticator(AuthConfig())
    app = bottle.Bottle(catchall=True)
    app.config["json.disable"] = True  # every route sets its own body and type
    app.install(_unavailable_is_503)
    app.install(_refusals_are_401_or_403)

    def caller():
        environ = bottle.request.environ
        return auth.caller(environ.get("HTTP_AUTHORIZATION"), environ.get("HTTP_X_API_KEY"))

    def stream(user: str, sse: bool, route: str = "") -> str:
        environ = bottle.request.environ
        identity = auth.stream(user, environ.get("HTTP_AUTHORIZATION"),
                               environ.get("QUERY_STRING", ""), environ.get("HTTP_COOKIE"))
        try:
            user = check_id(user)
        except InvalidId:
            hint = NOT_FOUND_USER.format(route=route or ("/events/" if sse else "/test/"))
            COUNTS.rejected["404"] += 1
            raise bottle.HTTPResponse(
                hint, status=404, headers={"Content-Type": "text/plain; charset=utf-8"}
            ) from None
        if environ.get("HTTP_TRANSFER_ENCODING") or int(environ.get("CONTENT_LENGTH") or 0):
            # The socket leaves pywsgi with the head sent: no body may follow.
            raise _error(400, "a stream request has no body")
        http10 = environ.get("SERVER_PROTOCOL") == "HTTP/1.0"
        expires = None if identity is None else identity.expires
        kind = WEBSOCKET if route else stream_kind(sse, http10)
        since = resume_from(environ.get("HTTP_LAST_EVENT_ID"), environ.get("QUERY_STRING", ""),
                            sse)
        environ[STREAM_KEY] = (user, kind, bottle.request.path, expires, since)
        return ""

    # Anything after the prefix, even empty or with a slash, is the id: an
    # invalid one gets the hint below, not the generic 404.
    @app.get("/test/<user:re:.*>")
    def test_stream(user: str) -> str:
        return stream(user, sse=False)

    @app.get("/events/<user:re:.*>")
    def events_stream(user: str) -> str:
        return stream(user, sse=True)

    @app.get("/ws/<user:re:.*>")  # the upgrade itself: cometd.websocket
    def websocket_stream(user: str) -> str:
        return stream(user, sse=False, route="/ws/")

    @app.get("/poll/<user:re:.*>")
    def poll(user: str) -> Any:
        # Parsed here, answered by the server (cometd.longpoll), as a stream is.
        environ = bottle.request.environ
        identity = auth.stream(user, environ.get("HTTP_AUTHORIZATION"),
                               environ.get("QUERY_STRING", ""), environ.get("HTTP_COOKIE"))
        try:
            user = check_id(user)
        except InvalidId as exc:
            return _error(400, str(exc))
        if bottle.request.method == "HEAD":
            COUNTS.rejected["405"] += 1
            return bottle.HTTPResponse(json.dumps({"error": "a poll is GET only"}), status=405,
                                       headers={"Content-Type": "application/json",
                                                "Allow": "GET"})
        if environ.get("HTTP_TRANSFER_ENCODING") or int(environ.get("CONTENT_LENGTH") or 0):
            return _error(400, "a poll request has no body")
        try:
            since, timeout = parse_poll_query(environ.get("QUERY_STRING", ""))
        except PollError as exc:
            return _error(400, str(exc))
        environ[POLL_KEY] = PollRequest(user, since, timeout,
                                        None if identity is None else identity.expires)
        return ""

    # The same functions as the server's fast path (cometd.publish), which
    # takes most publishes before they get here.
    @app.post("/send/<subject>")
    def send(subject: str) -> bottle.HTTPResponse:
        environ = bottle.request.environ
        return _answered(answer_send(backend, auth, environ.get("HTTP_AUTHORIZATION"),
                                     environ.get("HTTP_X_API_KEY"), subject, _read_body))

    @app.post("/publish")
    def publish() -> bottle.HTTPResponse:
        environ = bottle.request.environ
        return _answered(answer_publish(backend, auth, environ.get("HTTP_AUTHORIZATION"),
                                        environ.get("HTTP_X_API_KEY"), _read_body))

    def lookup(user: str, key: str) -> bottle.HTTPResponse:
        verdict = caller()
        try:
            user = check_id(user)
        except InvalidId as exc:
            return _error(400, str(exc))
        # A user may read whom it follows; who follows it takes an API key.
        auth.permit(verdict, user if key == "subscriptions" else None)
        return _json(200, {key: getattr(backend, key)(user)})

    @app.get("/subscribers/<user>")
    def subscribers(user: str) -> bottle.HTTPResponse:
        return lookup(user, "subscribers")

    @app.get("/subscriptions/<user>")
    def subscriptions(user: str) -> bottle.HTTPResponse:
        return lookup(user, "subscriptions")

    def own_pairs(adding: bool) -> list[tuple[str, str]]:
        verdict = caller()
        try:
            body = _read_body(MAX_JSON_BYTES)
        except BodyError as exc:
            raise _error(exc.status, exc.message) from None
        pairs = _pairs(body, adding=adding)
        for subscriber, _ in pairs:  # all or nothing
            auth.permit(verdict, subscriber)
        return pairs

    @app.post("/subscriptions")
    def add() -> bottle.HTTPResponse:
        return _json(200, {"added": backend.add(own_pairs(adding=True))})

    @app.delete("/subscriptions")
    def remove() -> bottle.HTTPResponse:
        return _json(200, {"removed": backend.remove(own_pairs(adding=False))})

    @app.get("/stats")
    def get_stats() -> bottle.HTTPResponse:
        auth.permit(caller(), None)
        return _json(200, backend.stats())

    @app.get("/metrics")
    def get_metrics() -> bottle.HTTPResponse:
        auth.permit(caller(), None)  # an API key when auth is on, like /stats
        return bottle.HTTPResponse(backend.metrics(), status=200,
                                   headers={"Content-Type": METRICS_CONTENT_TYPE})

    install_page(app)  # GET /: the demo page (cometd.page)

    # Health is for load balancers and orchestrators: no credential, and
    # nothing in it but whether the process serves and which part is missing.
    @app.get("/healthz")
    def healthz() -> bottle.HTTPResponse:
        return _json(200, {"status": "ok"})

    @app.get("/readyz")
    def readyz() -> bottle.HTTPResponse:
        missing = backend.ready()
        if missing:
            return _json(503, {"status": "not ready", "missing": missing})
        return _json(200, {"status": "ready"})

    def on_error(res: bottle.HTTPError) -> str:
        COUNTS.rejected[str(res.status_code)] += 1
        bottle.response.content_type = "application/json"
        reason = {404: "not found", 405: "method not allowed"}.get(res.status_code)
        if reason is None:
            reason = "internal error" if res.status_code >= 500 else str(res.body or res.status)
        return json.dumps({"error": reason})

    app.default_error_handler = on_error  # type: ignore[method-assign]
    return app

"""Cross-origin resource sharing (CORS): which other sites' pages may read cometd.

A browser lets a page of another origin read a response only when the
response names that origin in ``Access-Control-Allow-Origin``; before a
request a page could not make with a plain form (a ``DELETE``, an
``Authorization`` or ``X-API-Key`` header, a JSON body), it first asks with an
``OPTIONS`` preflight. :class:`CorsPolicy` holds ``--cors-origin``'s list and
says which headers each response gets.

Theory of operation
-------------------
Every response of the web app, errors included, goes through :meth:`wrap`,
which adds the headers for the request's ``Origin`` and answers preflights
itself (204) before the app, so a preflight needs no credentials, as
browsers send none with it. A stream's head is written by the server, not
the app: both ways into a stream pass :meth:`stream_lines` (pywsgi's path,
from the parsed ``Origin``) or :meth:`stream_lines_for` (the accept callback,
from the request's bytes) to :func:`cometd.streamhttp.stream_head`, and
into a stream's refusal by the connection limits (:func:`with_lines`). Every
answer is computed once per configured origin, so a response pays a dict
lookup; with ``*`` alone none varies and the accept callback does not even
look for the ``Origin``.

The rules, after the Fetch standard's CORS protocol:

- A listed origin gets itself back in ``Access-Control-Allow-Origin``, with
  ``Vary: Origin``, and ``Access-Control-Allow-Credentials: true`` when
  credentials are in use (with a JWT key, a stream's token may come in a
  cookie; :mod:`cometd.lifecycle` decides), so that
  ``fetch(..., {credentials: "include"})`` and ``EventSource(url,
  {withCredentials: true})`` work.
- ``*`` lets any other origin read, without credentials: the answer is
  ``Access-Control-Allow-Origin: *``, which browsers refuse for a request
  with credentials. Echoing any origin *with* credentials would let every
  site on the web read a signed-in user's stream with that user's cookie.
- Any other origin gets no ``Access-Control-*`` header (the browser then
  keeps the response from the page); with origins listed, every response
  still says ``Vary: Origin``, since another origin's would differ. An
  ``OPTIONS`` that is not an allowed preflight reaches the app as before
  (405).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import Any

__all__ = ["CorsPolicy", "with_lines", "ALLOW_METHODS", "ALLOW_HEADERS", "MAX_AGE"]

#: what a preflight may ask for: every method and request header of the API
ALLOW_METHODS = "GET, POST, DELETE"
ALLOW_HEADERS = "Authorization, Content-Type, Last-Event-ID, X-API-Key"
#: seconds a browser may keep a preflight's answer (Chromium keeps at most 7200)
MAX_AGE = 600

# Searched only within a header block that cometd.streamhttp accepted, whose
# lines all end in CRLF and whose names follow a CRLF.
_ORIGIN = re.compile(rb"\r\norigin:[ \t]*([^\r]*?)[ \t]*(?=\r)", re.IGNORECASE)

Headers = list[tuple[str, str]]


def _lines(headers: Headers) -> str:
    return "".join(f"{name}: {value}\r\n" for name, value in headers)


def with_lines(response: bytes, lines: str) -> bytes:
    """A whole HTTP *response* (a stream's refusal) with header *lines* after its status line."""
    end = response.index(b"\r\n") + 2
    return response[:end] + lines.encode("latin-1") + response[end:]


class CorsPolicy:
    """The CORS headers for each request origin, from ``--cors-origin``."""

    def __init__(self, origins: Iterable[str], credentials: bool = False) -> None:
        origins = tuple(origins)
        self.any = "*" in origins
        self.origins = frozenset(o for o in origins if o != "*")
        self.credentials = credentials
        vary = [("Vary", "Origin")]
        creds = [("Access-Control-Allow-Credentials", "true")] if credentials else []
        self._listed = {o: [("Access-Control-Allow-Origin", o), *vary, *creds]
                        for o in self.origins}
        self._other = ([("Access-Control-Allow-Origin", "*")] if self.any else []) + (
            vary if self.origins else [])
        preflight = [("Access-Control-Allow-Methods", ALLOW_METHODS),
                     ("Access-Control-Allow-Headers", ALLOW_HEADERS),
                     ("Access-Control-Max-Age", str(MAX_AGE))]
        self._preflight = {o: h + preflight for o, h in self._listed.items()}
        self._preflight_any = self._other + preflight
        self._listed_lines = {o: _lines(h) for o, h in self._listed.items()}
        self._other_lines = _lines(self._other)

    def allows(self, origin: str | None) -> bool:
        """Whether a page of *origin* may read the responses."""
        return origin is not None and (self.any or origin in self.origins)

    def headers(self, origin: str | None) -> Headers:
        """The CORS headers of a response to a request from *origin* (None: no Origin)."""
        return self._listed.get(origin, self._other)  # type: ignore[arg-type]

    def preflight_headers(self, origin: str) -> Headers:
        """The headers of the 204 to an allowed origin's preflight."""
        return self._preflight.get(origin, self._preflight_any)

    def stream_lines(self, origin: str | None) -> str:
        """:meth:`headers` as header lines for a stream's head."""
        return self._listed_lines.get(origin, self._other_lines)  # type: ignore[arg-type]

    def stream_lines_for(self, request: bytes) -> str:
        """:meth:`stream_lines` for a raw stream request that the accept callback took."""
        if not self.origins:
            return self._other_lines  # the same for every origin
        end = request.find(b"\r\n\r\n") + 2
        found = _ORIGIN.findall(request, 0, end)
        if len(found) != 1:
            return self._other_lines  # none, or several (pywsgi would join them: no match)
        return self._listed_lines.get(found[0].decode("latin-1"), self._other_lines)

    def wrap(self, app: Callable[..., Any]) -> Callable[..., Any]:
        """The WSGI *app* with these headers on every response, and preflights answered."""

        def cors_app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
            origin = environ.get("HTTP_ORIGIN")
            if (environ["REQUEST_METHOD"] == "OPTIONS" and self.allows(origin)
                    and "HTTP_ACCESS_CONTROL_REQUEST_METHOD" in environ):
                start_response("204 No Content", self.preflight_headers(origin))
                return []
            extra = self.headers(origin)

            def start(status: str, headers: Headers, exc_info: Any = None) -> Any:
                return start_response(status, [*headers, *extra], exc_info)

            return app(environ, start)

        return cors_app

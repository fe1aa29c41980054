"""The demo page at ``GET /``: HTML, CSS and plain JavaScript shipped as package data.

One page (``index.html``) with its stylesheet (``/page.css``) and script
(``/page.js``): no build step, nothing from another site, so it works
offline. It talks only to the API of the server that served it: the user's
feed through ``EventSource`` on ``/events/<id>`` (or a WebSocket on
``/ws/<id>`` when the server offers one, reopened with ``?since=``), ``POST /send/<id>``,
``/subscriptions/<id>`` and ``/subscribers/<id>``; a pasted token goes on
the stream as ``?token=`` and on the API as ``Authorization: Bearer``.

The files are read once, when the app is made. Every answer carries a strict
Content-Security-Policy (this origin only, no inline script or style, no
frames), ``nosniff`` and an ``ETag``; ``Cache-Control: no-cache`` lets a
browser keep a copy but ask (``If-None-Match`` -> 304) each time, so an
upgraded server never runs an old script against a new API.
"""

from __future__ import annotations

import hashlib
from importlib import resources

import bottle

__all__ = ["CONTENT_SECURITY_POLICY", "PAGES", "install"]

#: path -> (file in this package, Content-Type)
PAGES = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/page.css": ("page.css", "text/css; charset=utf-8"),
    "/page.js": ("page.js", "text/javascript; charset=utf-8"),
}
#: 'self' covers ws: and wss: to this host too (CSP level 3)
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


def install(app: bottle.Bottle) -> None:
    """Add the page's routes to *app* (no credential needed: the files hold no secret)."""
    for path, (name, content_type) in PAGES.items():
        body = resources.files(__name__).joinpath(name).read_bytes()
        etag = f'"{hashlib.sha256(body).hexdigest()[:20]}"'
        app.get(path, callback=_serve(body, content_type, etag))


def _serve(body: bytes, content_type: str, etag: str):
    headers = {"Content-Type": content_type, "Content-Security-Policy": CONTENT_SECURITY_POLICY,
               "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
               "Cache-Control": "no-cache", "ETag": etag}

    def serve() -> bottle.HTTPResponse:
        asked = bottle.request.environ.get("HTTP_IF_NONE_MATCH", "")
        if etag in (tag.strip() for tag in asked.split(",")) or asked.strip() == "*":
            return bottle.HTTPResponse(b"", status=304, headers=headers)
        return bottle.HTTPResponse(body, status=200, headers=headers)

    return serve

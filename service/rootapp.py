"""What the server answers outside its API's own routes: the docs page at ``/`` and the errors of
BentoML's app (``/livez``, ``/readyz``, ``/metrics``, ``/docs.json``, any other path).

1. **The docs page** (``index_page``). BentoML 1.4's page at ``/`` is Swagger UI with Google Tag
   Manager in it: a script and an iframe from www.googletagmanager.com (container GTM-WNPGWRM)
   load in the browser of whoever opens the server's root, so a server on a private network
   reports its visitors to a third party, and behind an air gap the page waits on a host it
   cannot reach. It is titled "BentoML Prediction Service" and links to BentoML's GitHub, and
   Swagger UI's default configuration sends the served document to validator.swagger.io for a
   badge. Here: the same Swagger UI, from the assets BentoML ships (served by this server),
   titled after this service, with the validator off, under a Content-Security-Policy that lets
   the page load nothing from any other origin and run no script but its own files and the one
   inline configuration (by hash).
2. **Errors in the API's JSON shape** (``http_error``). A path no route serves and a method a
   route does not take were answered by Starlette in plain text (``Not Found``, ``Method Not
   Allowed``); they are now ``{"error": {"reason", "message"}, "request_id"}`` with
   ``X-Request-ID``, as under ``/v1`` (``Allow`` kept on a 405), so a client or gateway parses
   every error answer of the server one way.

``install(title, version)`` patches BentoML's app factory once (idempotent); where BentoML has
changed what is patched, it is left alone and that is logged.
"""

from __future__ import annotations

import base64
import hashlib
import html
import logging
from http import HTTPStatus
from typing import Any

from . import requests
from .app import error_body

logger = logging.getLogger(__name__)

# Swagger UI's configuration: BentoML's swagger-initializer.js with the validator off (its
# default posts the document's URL to validator.swagger.io and shows the badge it answers)
INITIALIZER = """window.onload = function () {
  window.ui = SwaggerUIBundle({
    url: "./docs.json",
    dom_id: "#swagger-ui",
    deepLinking: true,
    validatorUrl: null,
    presets: [SwaggerUIBundle.presets.apis, SwaggerUIStandalonePreset],
    plugins: [SwaggerUIBundle.plugins.DownloadUrl],
    layout: "StandaloneLayout",
  });
};"""

PAGE = """<!DOCTYPE html>
<html lang="en">
  <head>
    <meta charset="UTF-8">
    <title>{title}</title>
    <link rel="icon" href="data:,">
    <link rel="stylesheet" type="text/css" href="./static_content/swagger-ui.css">
  </head>
  <body>
    <div id="swagger-ui"></div>
    <script src="./static_content/swagger-ui-bundle.js" charset="UTF-8"></script>
    <script src="./static_content/swagger-ui-standalone-preset.js" charset="UTF-8"></script>
    <script>{initializer}</script>
  </body>
</html>
"""


def page(title: str, version: str) -> str:
    """The docs page's HTML."""
    return PAGE.format(title=html.escape(f"{title} {version}: API"), initializer=INITIALIZER)


def page_headers() -> dict[str, str]:
    """The docs page's headers: nothing from another origin, no inline script but the page's own
    configuration, no framing, no referrer sent on."""
    digest = base64.b64encode(hashlib.sha256(INITIALIZER.encode()).digest()).decode()
    policy = ("default-src 'self'; "
              f"script-src 'self' 'sha256-{digest}'; "
              "style-src 'self' 'unsafe-inline'; "  # Swagger UI sets style attributes
              "img-src 'self' data:; "  # its icons are data: URLs
              "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'")
    return {"content-security-policy": policy, "x-content-type-options": "nosniff",
            "referrer-policy": "no-referrer", "cache-control": "no-cache"}


def error_payload(status: int, method: str, path: str, detail: str | None,
                  allow: str | None, request_id: str) -> tuple[str, dict]:
    """(reason, JSON body) of an HTTP error BentoML's app raised, in ``/v1``'s shape."""
    if status == 404:
        reason, message = "not_found", f"no route {method} {path}"
    elif status == 405:
        reason, message = "method_not_allowed", f"use {allow}" if allow else "method not allowed"
    else:
        try:
            phrase = HTTPStatus(status).phrase
        except ValueError:
            phrase = f"HTTP {status}"
        reason = phrase.lower().replace(" ", "_").replace("-", "_")
        message = detail or phrase
    return reason, error_body(reason, message, request_id)


async def http_error(request: Any, exc: Any) -> Any:
    """Starlette's handler of ``HTTPException`` for BentoML's app: the API's JSON error."""
    from starlette.responses import Response

    headers = dict(getattr(exc, "headers", None) or {})
    request_id = requests.request_id({"x-request-id": request.headers.get("x-request-id", "")})
    status = exc.status_code
    _, body = error_payload(status, request.method, request.url.path, exc.detail,
                            headers.get("Allow") or headers.get("allow"), request_id)
    if status in (204, 304):  # no body allowed
        return Response(status_code=status, headers={**headers, "x-request-id": request_id})
    return Response(requests.dump_json(body), status_code=status,
                    media_type="application/json",
                    headers={**headers, "x-request-id": request_id})


def install(title: str, version: str) -> bool:
    """Patch BentoML's app factory (the docs page and the error handler); False (logged) where
    BentoML changed."""
    try:
        from _bentoml_impl.server.app import ServiceAppFactory
        from starlette.exceptions import HTTPException

        original_call, original_index = ServiceAppFactory.__call__, ServiceAppFactory.index_page
    except (ImportError, AttributeError) as exc:
        logger.warning("BentoML changed (%s): its own docs page and plain-text errors stay", exc)
        return False
    text, headers = page(title, version), page_headers()
    if getattr(original_call, "_clf_patched", False):
        ServiceAppFactory._clf_page = text
        return True

    async def index_page(self: Any, request: Any) -> Any:
        from starlette.responses import HTMLResponse

        from modelstore._bentoml import uses_new_index

        if uses_new_index():  # BentoML's other UI (its own assets, not Swagger UI's)
            return await original_index(self, request)
        return HTMLResponse(ServiceAppFactory._clf_page, headers=headers)

    def call(self: Any) -> Any:
        app = original_call(self)
        app.add_exception_handler(HTTPException, http_error)
        return app

    call._clf_patched = True  # type: ignore[attr-defined]
    ServiceAppFactory._clf_page = text
    ServiceAppFactory.__call__, ServiceAppFactory.index_page = call, index_page
    return True

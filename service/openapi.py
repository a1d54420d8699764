"""The OpenAPI document of the routes ``app.py`` serves, built from the route table itself.

BentoML 1.4 merges a mounted app's routes into its ``/docs.json`` (and the Swagger UI at ``/``)
only for a FastAPI app, so each mount is a ``DocumentedMount``: a FastAPI instance whose routes
carry the operations the route table declares (``App.add_route(..., doc=...)``), while its
``__call__`` hands every request straight to the raw ASGI ``App``: the document costs nothing on
the hot path. Shared pieces (the error schema with its reason codes, common parameters) are built
here from the same tables the handlers use (``app.STATUS``, ``preprocessing.REASONS``,
``requests.REASONS``).
"""

from __future__ import annotations

import copy
import re
from http import HTTPStatus
from typing import TYPE_CHECKING, Any

from preprocessing import REASONS as INPUT_REASONS

from . import requests

if TYPE_CHECKING:
    from .app import App


def error_schema() -> dict:
    """``{"error": {"reason", "message"}, "request_id"}``; reason is one of ``app.STATUS``."""
    from .app import STATUS

    return {
        "type": "object",
        "required": ["error"],
        "properties": {
            "error": {
                "type": "object",
                "required": ["reason", "message"],
                "properties": {
                    "reason": {"type": "string", "enum": sorted(STATUS),
                               "description": _reason_descriptions()},
                    "message": {"type": "string",
                                "description": "what is wrong and what to send instead"},
                },
            },
            "request_id": {"type": "string"},
        },
    }


def _reason_descriptions() -> str:
    lines = [f"`{r}`: {d}" for r, d in {**INPUT_REASONS, **requests.REASONS}.items()]
    return "Input and request reasons (4xx): " + "; ".join(lines) + "."


def error_responses(*statuses: int) -> dict[str, dict]:
    """OpenAPI responses for the given error statuses, each with the error schema and the
    reasons that map to it."""
    from .app import STATUS

    out = {}
    for status in statuses:
        reasons = sorted(r for r, s in STATUS.items() if s == status)
        schema = error_schema()
        schema["properties"]["error"]["properties"]["reason"] = {"type": "string",
                                                                 "enum": reasons}
        out[str(status)] = {
            "description": f"{HTTPStatus(status).phrase}: reason {', '.join(reasons)}",
            "content": {"application/json": {"schema": schema}},
        }
    return out


REQUEST_ID_HEADER = {
    "name": "X-Request-ID", "in": "header", "required": False,
    "description": "the request's id (1-128 of A-Z a-z 0-9 . _ : -); echoed in the answer and "
                   "the key of its prediction log records. A fresh one is made when absent.",
    "schema": {"type": "string"},
}


def served_models(settings: Any) -> dict[str, str]:
    """``{kind: name}`` of the models the settings serve (``CLF_IMAGE_MODEL``,
    ``CLF_TEXT_MODEL``; a version pin dropped), image first; empty without settings. The document
    names them, so clients and Swagger UI offer the names a request may use."""
    if settings is None:
        return {}
    tags = {"image": settings.image_model, "text": settings.text_model}
    return {kind: tag.partition(":")[0] for kind, tag in tags.items() if tag}


def _json(schema: dict, description: str) -> dict:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def classify_answer_schema() -> dict:
    from .served import PREDICTION_SCHEMA

    return {
        "type": "object",
        "required": ["request_id", "model", "model_version", "predictions"],
        "properties": {
            "request_id": {"type": "string"},
            "model": {"type": "string"},
            "model_version": {"type": "string"},
            "predictions": {"type": "array", "items": PREDICTION_SCHEMA,
                            "description": "one per input, in the request's order"},
        },
    }


def slices_header_schema(settings: Any) -> dict:
    """``X-Slices`` as the settings in force accept it: ``key=value`` parts separated by ``;``,
    keys from CLF_SLICE_KEYS, values of 1..64 characters."""
    keys = sorted(settings.slice_rules().keys)
    if not keys:
        return {"type": "string", "pattern": r"^\s*$"}
    key = "(?:" + "|".join(re.escape(k) for k in keys) + ")"
    part = key + r"\s*=\s*[^;\s](?:[^;]{0,62}[^;\s])?"
    return {"type": "string", "pattern": rf"^(?:[\s;]*{part})*[\s;]*$"}


def _with_max_items(bodies: dict, limit: int) -> dict:
    """The bodies' schemas with every list of inputs capped at ``limit``."""
    out = copy.deepcopy(bodies)
    for media in out.values():
        for prop in media["schema"].get("properties", {}).values():
            if prop.get("type") == "array":
                prop["maxItems"] = limit
    return out


def classify_operation(kind: str, defaults: Any) -> dict:
    """``POST /v1/classify/{image,text}``: bodies from ``requests``, answer from ``served``;
    limits from the settings in force (``defaults``)."""
    bodies = _with_max_items(
        requests.IMAGE_BODIES if kind == "image" else requests.TEXT_BODIES,
        defaults.max_images_per_request if kind == "image" else defaults.max_texts_per_request)
    limit = (f"at most CLF_MAX_IMAGES_PER_REQUEST ({defaults.max_images_per_request})"
             if kind == "image" else
             f"at most CLF_MAX_TEXTS_PER_REQUEST ({defaults.max_texts_per_request})")
    what = ("images as multipart/form-data (field `image`, repeatable), JSON with base64 "
            "(`{\"images\": [...]}` or `{\"image\": \"...\"}`), or one raw image body"
            if kind == "image" else
            "texts as JSON (`{\"texts\": [...]}` or `{\"text\": \"...\"}`) or one text/plain "
            "body (UTF-8, or the `charset` its Content-Type names)")
    return {
        "operationId": f"classify_{kind}",
        "summary": f"Classify {kind}s",
        "description": f"One or many {what}; {limit} per request and a body of at most "
                       f"CLF_MAX_BODY_BYTES (`Content-Encoding: gzip` or `deflate` accepted, "
                       f"inflated within that limit). Each input is preprocessed by the shared "
                       f"preprocessing from the model's spec, batched with other requests, "
                       f"classified, and (with the prediction log on) recorded before the "
                       f"answer is sent.",
        "tags": ["classify"],
        "parameters": [
            {"name": "top_k", "in": "query", "required": False,
             "description": f"how many classes to return per input (default CLF_TOP_K, "
                            f"{defaults.top_k})",
             "schema": {"type": "integer", "minimum": 1, "maximum": 1000}},
            REQUEST_ID_HEADER,
            {"name": "X-Slices", "in": "header", "required": False,
             "description": "slice tags for the prediction log and the slice report: "
                            "`key=value; key2=value2`, keys from CLF_SLICE_KEYS (none by "
                            "default: then any tag is refused with 422)",
             "schema": slices_header_schema(defaults)},
        ],
        "requestBody": {"required": True, "content": bodies},
        "responses": {
            "200": _json(classify_answer_schema(), "one prediction per input"),
            **error_responses(400, 404, 413, 415, 422, 431, 500, 503, 504),
        },
    }


def feedback_operation() -> dict:
    return {
        "operationId": "feedback",
        "summary": "Ground-truth labels for logged predictions",
        "description": "Labels by request id (the `request_id` of a classify answer), one per "
                       "input of that request. Idempotent; a batch is all-or-nothing. Needs "
                       "`Authorization: Bearer <CLF_FEEDBACK_TOKEN>`; 403 when the server has "
                       "no token or no prediction log.",
        "tags": ["monitoring"],
        "x-bearer": True,
        "parameters": [REQUEST_ID_HEADER],
        "requestBody": {"required": True, "content": requests.FEEDBACK_BODIES},
        "responses": {
            "200": _json({
                "type": "object", "required": ["request_id", "results"],
                "properties": {
                    "request_id": {"type": "string"},
                    "results": {"type": "array", "items": {
                        "type": "object",
                        "required": ["request_id", "labels", "created", "updated", "unchanged"],
                        "properties": {"request_id": {"type": "string"},
                                       "labels": {"type": "integer",
                                                  "description": "labels given"},
                                       "created": {"type": "integer"},
                                       "updated": {"type": "integer"},
                                       "unchanged": {"type": "integer"}}}}}},
                "what each label did"),
            **error_responses(400, 401, 403, 404, 413, 415, 422, 431, 500),
        },
    }


def models_operation() -> dict:
    model = {"type": "object",
             "required": ["name", "version", "task", "labels", "provider", "spec", "spec_hash",
                          "ood_flags", "ready"],
             "properties": {"name": {"type": "string"}, "version": {"type": "string"},
                            "task": {"type": "string",
                                     "enum": ["image-classification", "text-classification"]},
                            "labels": {"type": "array", "items": {"type": "string"}},
                            "provider": {"type": "string"},
                            "spec": {"type": "object",
                                     "description": "the preprocessing spec (spec.json)"},
                            "spec_hash": {"type": "string"},
                            "ood_flags": {"type": "boolean"}, "ready": {"type": "boolean"}}}
    return {
        "operationId": "list_models",
        "summary": "The models this server serves",
        "tags": ["models"],
        "parameters": [REQUEST_ID_HEADER],
        "responses": {"200": _json({"type": "object", "required": ["models"],
                                    "properties": {"models": {"type": "array", "items": model}}},
                                   "name, version, task, labels and spec of each model"),
                      **error_responses(500)},
    }


def info(title: str, version: str, settings: Any) -> dict:
    """The document's ``info``: what the service is and how its answers are shaped (rendered as
    Markdown by the Swagger UI at ``/``)."""
    served = ", ".join(f"{kind} `{name}`" for kind, name in served_models(settings).items())
    return {
        "title": title,
        "version": version,
        "description": (
            "Image and text classification on ONNX Runtime, with adaptive batching, a prediction "
            "log, ground-truth feedback, drift and per-slice monitoring.\n\n"
            f"Serving: {served or 'no model configured'}.\n\n"
            "- `/v1`: this service's API: classify images and texts, feedback, the models.\n"
            "- `/v2`: the Open Inference Protocol (KServe v2, Triton's REST API): "
            "`tritonclient[http]` and KServe clients work as they are.\n"
            "- `/livez`, `/readyz`, `/metrics` (Prometheus): for the orchestrator and the "
            "monitoring.\n\n"
            "Every error answer is JSON, with a reason a program can branch "
            "on and a message a person can act on: "
            "`{\"error\": {\"reason\", \"message\"}, \"request_id\"}` "
            "(`/v2`: `{\"error\": \"<message>\", \"reason\", \"request_id\"}`); "
            "a 503 carries `Retry-After`. Request bodies may be compressed "
            "(`Content-Encoding: gzip` or `deflate`). `X-Request-ID` is echoed in every "
            "answer."),
    }


def build_mounts(app: App, prefixes: tuple[str, ...], title: str, version: str) -> list[Any]:
    """One FastAPI app per mount prefix: its routes are the route table's under that prefix,
    each with the operations the table declares; its ``__call__`` is the raw ``app``'s."""
    from fastapi import Depends, FastAPI
    from fastapi.security import HTTPBearer

    class DocumentedMount(FastAPI):
        """Documents the routes under ``prefix``; every request goes to the raw ASGI app."""

        def __init__(self, prefix: str) -> None:
            super().__init__(title=title, version=version, openapi_url=None, docs_url=None,
                             redoc_url=None)
            self.prefix = prefix

        async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
            await app(scope, receive, send)

    async def answered_by_the_route_table() -> None:  # the documented routes' FastAPI endpoint
        """Never called: ``DocumentedMount.__call__`` hands every request to ``App``."""

    bearer = HTTPBearer(scheme_name="feedbackToken", auto_error=False,
                        description="the server's CLF_FEEDBACK_TOKEN")
    mounts = []
    for prefix in prefixes:
        mount = DocumentedMount(prefix)
        for route in app.routes:
            if not (route.template == prefix or route.template.startswith(prefix + "/")):
                continue
            for method, doc in route.docs.items():
                doc = dict(doc)
                secured = doc.pop("x-bearer", False)
                mount.add_api_route(
                    route.template[len(prefix):] or "/", answered_by_the_route_table,
                    methods=[method], openapi_extra=doc, response_model=None,
                    summary=doc.get("summary"), description=doc.get("description"),
                    operation_id=doc.get("operationId"),
                    dependencies=[Depends(bearer)] if secured else None)
        # BentoML mounts a Starlette app "passively": a request reaches it only if one of its
        # routes matches, else BentoML answers a plain-text 404. This undocumented catch-all
        # sends every path under the prefix to ``App``, whose errors are the documented JSON.
        mount.add_api_route("/{rest:path}", answered_by_the_route_table, include_in_schema=False,
                            methods=["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE",
                                     "OPTIONS", "TRACE"])
        mounts.append(mount)
    return mounts

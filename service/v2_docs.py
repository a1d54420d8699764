"""The OpenAPI 3.0 operations of the Open Inference Protocol v2 routes (``v2.py`` registers them
with ``App.add_route(..., doc=...)``): inline schemas, no ``$ref``."""

from __future__ import annotations

import copy
from typing import Any

from . import openapi, requests

TAGS = ["open inference protocol v2"]
DATATYPES = ["BYTES", "FP32", "BOOL"]

_NAME = {"name": "name", "in": "path", "required": True, "schema": {"type": "string"},
         "description": "a served model's name (as `GET /v1/models` lists it)"}
_VERSION = {"name": "version", "in": "path", "required": True, "schema": {"type": "string"},
            "description": "the version this server serves (another one is a 404 naming it)"}
_SLICES = {"name": "X-Slices", "in": "header", "required": False, "schema": {"type": "string"},
           "description": "slice tags for the prediction log, as on `/v1`: `key=value; "
                          "key2=value2`, keys from CLF_SLICE_KEYS"}
_HEADER_LENGTH = {
    "name": "Inference-Header-Content-Length", "in": "header", "required": False,
    "schema": {"type": "integer", "minimum": 0},
    "description": "binary tensor extension: the body's first N bytes are the JSON request; "
                   "the inputs' raw bytes follow, in the order of `inputs`, each "
                   "`parameters.binary_data_size` long (BYTES elements: a 4-byte little-endian "
                   "length and the bytes; FP32: little-endian)"}

_SHAPE = {"type": "array", "items": {"type": "integer"},
          "description": "dimensions, row-major; -1 in metadata is any size"}
_TENSOR_META = {"type": "object", "required": ["name", "datatype", "shape"],
                "properties": {"name": {"type": "string"},
                               "datatype": {"type": "string", "enum": DATATYPES},
                               "shape": _SHAPE}}


def error_responses(*statuses: int) -> dict[str, dict]:
    """``openapi.error_responses`` with the v2 shape: ``error`` is the message (a string, as
    the protocol and tritonclient want), ``reason`` beside it."""
    out = openapi.error_responses(*statuses)
    for response in out.values():
        schema = response["content"]["application/json"]["schema"]
        reason = schema["properties"]["error"]["properties"]["reason"]
        response["content"]["application/json"]["schema"] = {
            "type": "object", "required": ["error", "reason"],
            "properties": {
                "error": {"type": "string", "description": "what is wrong and what to send "
                                                           "instead"},
                "reason": copy.deepcopy(reason),
                "request_id": {"type": "string"},
            },
        }
    return out


def _json(schema: dict, description: str) -> dict:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _empty(description: str) -> dict:
    """A health answer: ``{"live": true}``, ``{"ready": true}`` (KServe's v2 JSON bodies)."""
    key = "live" if description == "live" else "ready"
    props = {key: {"type": "boolean", "enum": [True]}}
    if description == "model ready":
        props["name"] = {"type": "string"}
    return {"description": description, "content": {"application/json": {"schema": {
        "type": "object", "required": [key], "properties": props}}}}


def _params(versioned: bool, documented: Any = None) -> list[dict]:
    """The path parameters (``name`` limited to the served models' names where the settings
    are known) and ``X-Request-ID``."""
    names = list(openapi.served_models(documented).values())
    name = {**_NAME, "schema": {"type": "string", "enum": names}} if names else _NAME
    return [name, _VERSION, openapi.REQUEST_ID_HEADER] if versioned else [
        name, openapi.REQUEST_ID_HEADER]


def _at(versioned: bool) -> str:
    return " (the served version only)" if versioned else ""


def server_metadata() -> dict:
    return {
        "operationId": "v2_server_metadata",
        "summary": "Server metadata (v2)",
        "description": "The server's name, version and protocol extensions.",
        "tags": TAGS,
        "responses": {"200": _json({
            "type": "object", "required": ["name", "version", "extensions"],
            "properties": {"name": {"type": "string"}, "version": {"type": "string"},
                           "extensions": {"type": "array", "items": {"type": "string"}}}},
            "name, version, extensions"), **error_responses(500)},
    }


def health(which: str) -> dict:
    live = which == "live"
    return {
        "operationId": f"v2_server_{which}",
        "summary": f"Server {'liveness' if live else 'readiness'} (v2)",
        "description": ("200 `{\"live\": true}` while the process answers." if live else
                        "200 `{\"ready\": true}` once every model is loaded and warmed up; 503 "
                        "before and while shutting down."),
        "tags": TAGS,
        "responses": {"200": _empty("live" if live else "ready"),
                      **error_responses(*((500,) if live else (503,)))},
    }


def model_metadata(versioned: bool, documented: Any = None) -> dict:
    doc = {
        "operationId": "v2_model_version_metadata" if versioned else "v2_model_metadata",
        "summary": "Model metadata (v2)" + _at(versioned),
        "description": "The model's inputs and outputs with their datatypes and shapes (-1: any "
                       "size). Image models take `image` (BYTES: encoded images, through the "
                       "shared preprocessing) or `input` (FP32 [-1, C, H, W]: tensors the client "
                       "preprocessed, bypassing it); text models take `text` (BYTES: UTF-8). "
                       "Outputs: `label`, `probabilities` (in the order of "
                       "`parameters.labels`), `ood`, `truncated` (texts) and, when asked for, "
                       "`embedding`.",
        "tags": TAGS,
        "parameters": _params(versioned, documented),
        "responses": {"200": _json({
            "type": "object", "required": ["name", "versions", "platform", "inputs", "outputs"],
            "properties": {
                "name": {"type": "string"},
                "versions": {"type": "array", "items": {"type": "string"}},
                "platform": {"type": "string"},
                "inputs": {"type": "array", "items": _TENSOR_META},
                "outputs": {"type": "array", "items": _TENSOR_META},
                "parameters": {"type": "object", "description": "task, labels (the order of "
                               "`probabilities`), spec_hash, ood_flags, usage, default_outputs"},
            }}, "the model's tensors"), **error_responses(404, 503)},
    }
    if not versioned:
        doc["responses"]["200"]["links"] = _version_links(
            "$response.body#/versions/0", "v2_model_version_metadata", "v2_model_version_ready",
            "v2_model_version_infer")
    return doc


def model_ready(versioned: bool, documented: Any = None) -> dict:
    return {
        "operationId": "v2_model_version_ready" if versioned else "v2_model_ready",
        "summary": "Model readiness (v2)" + _at(versioned),
        "description": '200 `{"name": ..., "ready": true}` once the model is loaded and warmed up; '
                       "503 before; 404 for a model (or version) this server does not serve.",
        "tags": TAGS,
        "parameters": _params(versioned, documented),
        "responses": {"200": _empty("model ready"), **error_responses(404, 503)},
    }


def _request_schema() -> dict:
    tensor = {
        "type": "object", "required": ["name", "datatype", "shape"],
        "properties": {
            "name": {"type": "string", "enum": ["image", "input", "text"]},
            "datatype": {"type": "string", "enum": ["BYTES", "FP32"]},
            "shape": {"type": "array", "items": {"type": "integer", "minimum": 0},
                      "description": "[N] (or [N, 1]) for BYTES; [N, C, H, W] for `input`"},
            "parameters": {"type": "object", "properties": {
                "binary_data_size": {"type": "integer", "minimum": 0,
                                     "description": "binary extension: this input's bytes "
                                                    "after the JSON header"}}},
            "data": {"type": "array", "items": {},
                     "description": "row-major, flat or nested; BYTES elements are strings: "
                                    "texts as they are, images in base64 (a data: URL too)"},
        },
    }
    output = {"type": "object", "required": ["name"], "properties": {
        "name": {"type": "string",
                 "enum": ["label", "probabilities", "ood", "truncated", "embedding"]},
        "parameters": {"type": "object", "properties": {
            "binary_data": {"type": "boolean",
                            "description": "answer this output as raw bytes after the header"},
            "classification": {"type": "integer", "minimum": 0,
                               "description": "`probabilities` only: the k best as BYTES "
                                              "\"p:index:label\""}}}}}
    return {
        "type": "object", "required": ["inputs"],
        "properties": {
            "id": {"type": "string", "description": "echoed in the answer"},
            "parameters": {"type": "object", "properties": {
                "binary_data_output": {"type": "boolean",
                                       "description": "every output as raw bytes unless it "
                                                      "says otherwise"}}},
            "inputs": {"type": "array", "minItems": 1, "maxItems": 1, "items": tensor,
                       "description": "exactly one input"},
            "outputs": {"type": "array", "items": output,
                        "description": "absent: every output but `embedding`"},
        },
    }


def _infer_examples(documented: Any) -> dict[str, dict]:
    """JSON requests for each kind of model served (both kinds without settings): what Swagger
    UI's "Try it out" offers; each is for the model of its kind."""
    served = openapi.served_models(documented) or {"image": "an image model",
                                                   "text": "a text model"}
    top3 = [{"name": "label"}, {"name": "probabilities", "parameters": {"classification": 3}}]
    examples = {
        "image": ("an encoded image (base64) as BYTES",
                  {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                               "data": [requests.EXAMPLE_PNG_BASE64]}]}),
        "image, the label and the 3 best": (
            "the same, asking for the label and the three most likely classes only",
            {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                         "data": [requests.EXAMPLE_PNG_BASE64]}], "outputs": top3}),
        "text": ("texts as BYTES (UTF-8)",
                 {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [2],
                              "data": [requests.EXAMPLE_TEXT,
                                       "WINNER!! Claim your free prize now"]}]}),
        "text, the label and the 3 best": (
            "the same, asking for the label and the three most likely classes only",
            {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1],
                         "data": [requests.EXAMPLE_TEXT]}], "outputs": top3}),
    }
    return {key: {"summary": f"{served[key.split(',')[0]]}: {summary}", "value": value}
            for key, (summary, value) in examples.items() if key.split(",")[0] in served}


def _version_links(version: str, *operations: str) -> dict[str, dict]:
    """OpenAPI links from an answer to the routes of the version it names (``version``: a
    runtime expression into the answer's body), same model: how a client learns which version
    to ask for by name."""
    return {f"{op}_of_this_version": {
        "operationId": op, "parameters": {"name": "$request.path.name", "version": version},
        "description": "the same model, at the version this answer names"}
        for op in operations}


def _response_schema() -> dict:
    tensor = {
        "type": "object", "required": ["name", "datatype", "shape"],
        "properties": {
            "name": {"type": "string"},
            "datatype": {"type": "string", "enum": DATATYPES},
            "shape": _SHAPE,
            "parameters": {"type": "object", "properties": {
                "binary_data_size": {"type": "integer"}}},
            "data": {"type": "array", "items": {}, "description": "row-major, flat"},
        },
    }
    return {
        "type": "object", "required": ["model_name", "outputs"],
        "properties": {
            "model_name": {"type": "string"}, "model_version": {"type": "string"},
            "id": {"type": "string"},
            "parameters": {"type": "object", "properties": {
                "request_id": {"type": "string",
                               "description": "the prediction log's key (X-Request-ID)"}}},
            "outputs": {"type": "array", "items": tensor},
        },
    }


def infer(versioned: bool, defaults: Any = None) -> dict:
    images = getattr(defaults, "max_images_per_request", None)
    texts = getattr(defaults, "max_texts_per_request", None)
    limits = ("CLF_MAX_IMAGES_PER_REQUEST" + (f" ({images})" if images else "") + " images or "
              "CLF_MAX_TEXTS_PER_REQUEST" + (f" ({texts})" if texts else "") + " texts")
    binary = "the JSON request, then the inputs' raw bytes (see Inference-Header-Content-Length)"
    return {
        "operationId": "v2_model_version_infer" if versioned else "v2_model_infer",
        "summary": "Inference (v2)" + _at(versioned),
        "description": "Classify a batch: at most " + limits + " per request, a body of at "
                       "most CLF_MAX_BODY_BYTES. `image` and `text` (BYTES) go through the "
                       "shared preprocessing, the batcher, the prediction log, the OOD flag and "
                       "the metrics exactly as `/v1`; `input` (FP32 [N, C, H, W], the spec's "
                       "shape) bypasses the shared preprocessing (no input features are logged) "
                       "and is otherwise served the same. JSON or Triton's binary tensor "
                       "extension; `Content-Encoding: gzip` or `deflate` accepted (inflated within that "
                       "limit; another coding is 415 `unsupported_encoding`). The answer "
                       "is `application/octet-stream` (JSON header + raw outputs, "
                       "`Inference-Header-Content-Length`) when any output is binary, JSON "
                       "otherwise. Errors: `{\"error\": \"<message>\", \"reason\", "
                       "\"request_id\"}`. Binary requests carry the header "
                       "`Inference-Header-Content-Length`: "
                       + _HEADER_LENGTH["description"] + ".",
        "tags": TAGS,
        # The binary extension's Inference-Header-Content-Length header belongs to the
        # application/octet-stream body only (its value must be that body's JSON header length),
        # so it is described there rather than listed as a parameter of every body.
        "parameters": [*_params(versioned, defaults), _SLICES],
        "requestBody": {"required": True, "content": {
            "application/json": {"schema": _request_schema(),
                                 "examples": _infer_examples(defaults)},
            "application/octet-stream": {"schema": {"type": "string", "format": "binary",
                                                    "description": binary}},
        }},
        "responses": {
            "200": {"description": "one row per input in every output tensor",
                    **({} if versioned else {"links": _version_links(
                        "$response.body#/model_version", "v2_model_version_infer",
                        "v2_model_version_metadata", "v2_model_version_ready")}),
                    "headers": {"Inference-Header-Content-Length": {
                        "schema": {"type": "integer"},
                        "description": "binary answers: the JSON header's length"}},
                    "content": {
                        "application/json": {"schema": _response_schema()},
                        "application/octet-stream": {"schema": {
                            "type": "string", "format": "binary",
                            "description": "the JSON answer, then the binary outputs' raw "
                                           "bytes"}}}},
            **error_responses(400, 404, 413, 415, 422, 431, 500, 503, 504),
        },
    }

"""Open Inference Protocol v2 (KServe / Triton HTTP/REST) over the served models, beside ``/v1``.

Routes (registered on the same ``App`` by ``register``; the service mounts it at ``/v2`` too):

  GET  /v2                                   server metadata: name, version, extensions (in
                                             the route table as ``/v2/``: see ``root_app``)
  GET  /v2/health/live                       200 {"live": true}: the process answers
  GET  /v2/health/ready                      200 when every model is loaded and warm, else 503
  GET  /v2/models/{name}[/versions/{v}]      model metadata: inputs, outputs, datatypes, shapes
  GET  /v2/models/{name}[/versions/{v}]/ready  200 when that model is ready, else 503
  POST /v2/models/{name}[/versions/{v}]/infer  inference

``name`` is a served model's name (``digits-cnn``, ``lang-transformer``), ``v`` the version it
serves; another version is a 404 that names the served one.

Tensors (``datatype`` / ``shape``; ``-1`` is the batch):

  image model  in   ``image``  BYTES [-1]: encoded images (PNG, JPEG, ...) through the shared
                    preprocessing exactly as ``/v1/classify/image`` (decode, resize, OOD features)
                    ``input``  FP32 [-1, C, H, W] (the spec's shape): tensors the client already
                    preprocessed. Bypasses the shared preprocessing (no decode, no input features
                    for the prediction log or drift; the raw input is not logged); still batched,
                    logged, OOD-scored and counted. Send exactly one of ``image`` / ``input``.
  text model   in   ``text``   BYTES [-1]: UTF-8 texts, through the shared preprocessing
  both         out  ``label`` BYTES [-1] (the most probable class), ``probabilities`` FP32
                    [-1, K] (the full vector, in the order of the model's labels: the metadata's
                    ``parameters.labels``), ``ood`` BOOL [-1] (the out-of-distribution flag;
                    always false for a model without a reference profile), and for texts
                    ``truncated`` BOOL [-1]; ``embedding`` FP32 [-1, D] only when asked for in
                    ``outputs``. With no ``outputs`` in the request, every output but
                    ``embedding`` is returned.

BYTES inputs may also be shaped [-1, 1]. Classification extension: ``probabilities`` asked for
with ``parameters.classification: k`` answers BYTES [-1, k] of ``"p:index:label"``, best first.

Wire formats: a JSON body (``data`` flat or nested, row-major; BYTES elements are strings:
texts as they are, images as base64, since JSON cannot carry raw bytes), or Triton's binary
tensor extension: ``Inference-Header-Content-Length: L`` says the first L bytes are the JSON
header and the inputs' raw bytes follow it in the order of ``inputs``, each input's length in
its ``parameters.binary_data_size``; raw BYTES elements are a 4-byte little-endian length and the
bytes, raw FP32 is little-endian. ``Content-Encoding: gzip`` or ``deflate`` bodies are accepted
(inflated within the body size limit by ``app._read_body``, as on every route). The answer is JSON unless an output asks for
``parameters.binary_data: true`` (or the request's ``parameters.binary_data_output`` is true and
the output does not say otherwise): then the answer is ``application/octet-stream``, the JSON
header (its length in ``Inference-Header-Content-Length``) followed by those outputs' raw bytes.

The request's ``id`` is echoed; ``X-Request-ID``, ``X-Slices`` and ``X-Request-Deadline-Ms``
work as in ``/v1`` (so do admission and the overload answers), and the answer's
``parameters.request_id`` is the prediction log's key (what ``/v1/feedback`` takes).

Errors: ``{"error": "<message>", "reason": "<reason>", "request_id": "..."}`` with the status
``app.STATUS`` gives the reason, as in ``/v1``, but with ``error`` a string: the v2 protocol (and
``tritonclient``, which formats ``error`` as the exception's message and fails on an object)
wants a string there. Malformed JSON or binary framing is ``bad_request`` (400); an unknown
input or output, a wrong datatype, a shape that does not match the data or the model, bad base64
are ``bad_field`` (422); more items than ``CLF_MAX_IMAGES_PER_REQUEST`` /
``CLF_MAX_TEXTS_PER_REQUEST`` is ``too_many_items`` (413); the inputs' own errors are the shared
preprocessing's (``not_an_image``, ``empty_text``, ...).
"""

from __future__ import annotations

import binascii
import functools
import logging
import math
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import numpy as np

from preprocessing import InputError, decode_text

from . import requests
from . import v2_docs as docs
from . import v2json
from .batching import BatchError
from .recording import LogUnavailable
from .requests import RequestError
from .served import (DeadlineExceeded, Overloaded, Prediction, RequestContext, ServedImageModel,
                     ServedModel, Tensors)

if TYPE_CHECKING:
    from .app import Answer, App

logger = logging.getLogger(__name__)

SERVER_NAME = "clfserve"
EXTENSIONS = ["binary_tensor_data", "classification"]
PLATFORM = "onnxruntime_onnx"
HEADER_LENGTH = "inference-header-content-length"
OCTET_STREAM = "application/octet-stream"
SERVER_PATH = "/v2/"  # GET /v2 (see root_app)

IMAGE_INPUT, TENSOR_INPUT, TEXT_INPUT = "image", "input", "text"
LABEL, PROBABILITIES, OOD, TRUNCATED, EMBEDDING = (
    "label", "probabilities", "ood", "truncated", "embedding")
_U32 = struct.Struct("<I")


@functools.lru_cache(maxsize=1)
def server_version() -> str:
    try:
        from importlib.metadata import version

        return version(SERVER_NAME)
    except Exception:  # noqa: BLE001 - not installed (a source checkout): still answer
        return "0"


# ---- the request ---------------------------------------------------------------------------

@dataclass
class InputTensor:
    """One input of an inference request, its data flattened: FP32 as a float32 array, BYTES
    as a list of ``bytes`` (JSON strings are UTF-8 encoded; base64 is the model's business)."""

    name: str
    datatype: str
    shape: list[int]
    data: np.ndarray | list[bytes]
    binary: bool  # came as raw bytes (binary extension), not as JSON data


@dataclass
class OutputRequest:
    name: str
    binary: bool
    classification: int = 0


@dataclass
class InferRequest:
    id: str | None
    inputs: list[InputTensor]
    outputs: list[OutputRequest] | None  # None: the defaults
    binary_output: bool  # the request's ``binary_data_output``: the default for every output


def _bad(message: str, reason: str = "bad_field") -> RequestError:
    return RequestError(reason, message)


def parse_infer(body: bytes, header_length: str | None = None) -> InferRequest:
    """An inference request: JSON, or (``header_length`` given) a JSON header and raw tensors."""
    raw = memoryview(body)
    if header_length is not None:
        if not header_length.strip().isdigit() or int(header_length) > len(body):
            raise _bad(f"Inference-Header-Content-Length {header_length!r} is not a length "
                       f"within the {len(body)}-byte body", "bad_request")
        split = int(header_length)
        head, raw = body[:split], raw[split:]
    else:
        head, raw = body, raw[len(body):]
    doc = v2json.fast_document(head)  # None: the usual parse, which words every error
    if doc is None:
        doc = requests.parse_json(head, "the inference request header")
    if not isinstance(doc, dict):
        raise _bad('the inference request must be a JSON object {"inputs": [...]}')
    # An optional field is absent or of its type: null is refused, as the document says, not
    # taken for absent.
    rid = doc.get("id")
    if "id" in doc and not isinstance(rid, str):
        raise _bad("'id' must be a string")
    parameters = _parameters(doc, "the request")
    entries = doc.get("inputs")
    if not isinstance(entries, list) or not entries:
        raise _bad("'inputs' must be a non-empty list of tensors {\"name\", \"datatype\", "
                   '"shape", "data"}', "empty" if entries == [] else "bad_field")
    offset = 0
    inputs = []
    for i, entry in enumerate(entries):
        tensor, used = _input(entry, i, raw[offset:], header_length is not None)
        offset += used
        inputs.append(tensor)
    if offset != len(raw):
        raise _bad(f"{len(raw) - offset} bytes after the JSON header belong to no input's "
                   "binary_data_size", "bad_request")
    names = [t.name for t in inputs]
    if len(set(names)) != len(names):
        raise _bad(f"input names repeat: {names}")
    return InferRequest(rid, inputs, _outputs(doc["outputs"]) if "outputs" in doc else None,
                        _flag(parameters, "binary_data_output", "the request"))


def _parameters(doc: dict, where: str) -> dict:
    parameters = doc.get("parameters", {})
    if not isinstance(parameters, dict):
        raise _bad(f"the 'parameters' of {where} must be an object")
    shm = sorted(k for k in parameters if k.startswith("shared_memory"))
    if shm:
        raise _bad(f"{where}: shared memory ({shm}) is not supported by this server; send the "
                   "data in the body")
    return parameters


def _flag(parameters: dict, key: str, where: str) -> bool:
    value = parameters.get(key, False)
    if not isinstance(value, bool):
        raise _bad(f"{where}: parameter '{key}' must be true or false")
    return value


def _input(entry: Any, i: int, rest: memoryview, framed: bool) -> tuple[InputTensor, int]:
    """One entry of ``inputs`` and how many bytes of ``rest`` (the binary tail) it took."""
    if not isinstance(entry, dict):
        raise _bad(f"inputs[{i}] must be an object {{\"name\", \"datatype\", \"shape\", \"data\"}}")
    name = entry.get("name")
    if not isinstance(name, str):
        raise _bad(f"inputs[{i}] has no 'name'")
    where = f"input {name!r}"
    datatype = entry.get("datatype")
    if datatype not in ("BYTES", "FP32"):
        raise _bad(f"{where}: datatype {datatype!r} is not supported; BYTES (images, texts) or "
                   "FP32 (preprocessed image tensors)")
    shape = entry.get("shape")
    if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise _bad(f"{where}: 'shape' must be a list of non-negative integers, got {shape!r}")
    count = math.prod(shape)
    size = _parameters(entry, where).get("binary_data_size")
    if size is not None:
        if "data" in entry:
            raise _bad(f"{where} has both 'data' and parameters.binary_data_size")
        if not framed:
            raise _bad(f"{where} has parameters.binary_data_size but the request has no "
                       "Inference-Header-Content-Length header", "bad_request")
        if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size <= len(rest):
            raise _bad(f"{where}: binary_data_size {size!r} is more than the {len(rest)} bytes "
                       "left after the header", "bad_request")
        chunk = rest[:size]
        if datatype == "FP32":
            if size != 4 * count:
                raise _bad(f"{where}: shape {shape} holds {count} FP32 values ({4 * count} "
                           f"bytes), binary_data_size is {size}")
            data: np.ndarray | list[bytes] = np.frombuffer(chunk, dtype="<f4")
        else:
            data = decode_bytes(chunk, where)
        used = size
    else:
        if "data" not in entry:
            raise _bad(f"{where} has neither 'data' nor parameters.binary_data_size")
        data, used = _json_data(entry["data"], datatype, where), 0
    if len(data) != count:
        raise _bad(f"{where}: shape {shape} holds {count} elements, the data has {len(data)}")
    return InputTensor(name, datatype, shape, data, size is not None), used


def _json_data(value: Any, datatype: str, where: str) -> np.ndarray | list[bytes]:
    if isinstance(value, np.ndarray):  # FP32 data v2json.fast_document already read
        return value
    if not isinstance(value, list):
        raise _bad(f"{where}: 'data' must be a list (flat or nested, row-major)")
    if datatype == "FP32":
        try:
            with np.errstate(over="ignore"):  # out of float32 range -> inf, refused later
                return np.asarray(value, dtype=np.float32).reshape(-1)
        except (ValueError, TypeError):
            raise _bad(f"{where}: FP32 'data' must be numbers (a flat or evenly nested "
                       "list)") from None
    out = []
    for item in _flatten(value):
        if not isinstance(item, str):
            raise _bad(f"{where}: BYTES 'data' must be strings, got {requests.json_type(item)}")
        out.append(item.encode("utf-8", "surrogatepass"))
    return out


def _flatten(value: list) -> Iterator[Any]:
    for item in value:
        if isinstance(item, list):
            yield from _flatten(item)
        else:
            yield item


def decode_bytes(raw: memoryview | bytes, where: str = "BYTES tensor") -> list[bytes]:
    """Raw BYTES elements: each a 4-byte little-endian length and that many bytes."""
    out, pos, end = [], 0, len(raw)
    while pos < end:
        if pos + 4 > end:
            raise _bad(f"{where}: element {len(out)} is cut inside its 4-byte length",
                       "bad_request")
        (n,) = _U32.unpack_from(raw, pos)
        pos += 4
        if pos + n > end:
            raise _bad(f"{where}: element {len(out)} says {n} bytes, {end - pos} are left",
                       "bad_request")
        out.append(bytes(raw[pos:pos + n]))
        pos += n
    return out


def encode_bytes(items: Sequence[bytes]) -> bytes:
    """BYTES elements -> the binary form (4-byte little-endian length + bytes, each)."""
    return b"".join(_U32.pack(len(b)) + b for b in items)


def _outputs(value: Any) -> list[OutputRequest]:
    if not isinstance(value, list):
        raise _bad("'outputs' must be a list of {\"name\", \"parameters\"}")
    out = []
    for i, entry in enumerate(value):
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise _bad(f"outputs[{i}] must be an object with a 'name'")
        where = f"output {entry['name']!r}"
        parameters = _parameters(entry, where)
        binary = parameters.get("binary_data")  # absent: the request's default
        if "binary_data" in parameters and not isinstance(binary, bool):
            raise _bad(f"{where}: parameter 'binary_data' must be true or false")
        k = parameters.get("classification", 0)
        if not isinstance(k, int) or isinstance(k, bool) or k < 0:
            raise _bad(f"{where}: parameter 'classification' must be a non-negative integer")
        out.append(OutputRequest(entry["name"], binary, k))  # None: the request's default
    if len({o.name for o in out}) != len(out):
        raise _bad(f"output names repeat: {[o.name for o in out]}")
    return out


# ---- the answer ----------------------------------------------------------------------------

@dataclass
class OutputTensor:
    name: str
    datatype: str  # BYTES, FP32 or BOOL
    shape: list[int]
    data: np.ndarray | list[str]  # BYTES: strings (UTF-8 on the wire)

    def raw(self) -> bytes:
        if self.datatype == "BYTES":
            return encode_bytes([s.encode("utf-8") for s in self.data])
        dtype = "<f4" if self.datatype == "FP32" else np.bool_
        return np.ascontiguousarray(self.data, dtype=dtype).tobytes()

    def json_data(self) -> list:
        if self.datatype == "BYTES":
            return list(self.data)
        return np.asarray(self.data).reshape(-1).tolist()


def encode_response(head: dict, outputs: Sequence[tuple[OutputTensor, bool]]
                    ) -> tuple[bytes, str, list[tuple[bytes, bytes]]]:
    """``(body, content type, extra headers)``: JSON, or the JSON header + raw outputs when any
    output is binary."""
    docs, chunks = [], []
    for tensor, binary in outputs:
        doc: dict = {"name": tensor.name, "datatype": tensor.datatype, "shape": tensor.shape}
        if binary:
            chunk = tensor.raw()
            doc["parameters"] = {"binary_data_size": len(chunk)}
            chunks.append(chunk)
        else:
            doc["data"] = tensor.json_data()
        docs.append(doc)
    header = requests.dump_json({**head, "outputs": docs})
    if not chunks:
        return header, "application/json", []
    return (b"".join([header, *chunks]), OCTET_STREAM,
            [(HEADER_LENGTH.encode(), str(len(header)).encode())])


# ---- models: what they take and answer -----------------------------------------------------

def input_names(model: ServedModel) -> tuple[str, ...]:
    return (IMAGE_INPUT, TENSOR_INPUT) if isinstance(model, ServedImageModel) else (TEXT_INPUT,)


def output_names(model: ServedModel) -> tuple[str, ...]:
    base = (LABEL, PROBABILITIES, OOD)
    return base + ((EMBEDDING,) if isinstance(model, ServedImageModel) else (TRUNCATED, EMBEDDING))


def default_outputs(model: ServedModel) -> list[str]:
    return [n for n in output_names(model) if n != EMBEDDING]


def _embedding_dim(model: ServedModel) -> int:
    dim = getattr(model.model, "embedding_dim", None)
    return int(dim) if isinstance(dim, int) else -1


def model_metadata(model: ServedModel) -> dict:
    if isinstance(model, ServedImageModel):
        inputs = [{"name": IMAGE_INPUT, "datatype": "BYTES", "shape": [-1]},
                  {"name": TENSOR_INPUT, "datatype": "FP32",
                   "shape": [-1, *model.spec.input_shape]}]
        usage = ("send exactly one input: 'image' (encoded images, through the shared "
                 "preprocessing) or 'input' (preprocessed tensors in the spec's shape, bypassing "
                 "it)")
    else:
        inputs = [{"name": TEXT_INPUT, "datatype": "BYTES", "shape": [-1]}]
        usage = "send 'text': UTF-8 texts, through the shared preprocessing"
    shapes = {LABEL: ("BYTES", [-1]), PROBABILITIES: ("FP32", [-1, len(model.labels)]),
              OOD: ("BOOL", [-1]), TRUNCATED: ("BOOL", [-1]),
              EMBEDDING: ("FP32", [-1, _embedding_dim(model)])}
    return {
        "name": model.name,
        "versions": [model.version],
        "platform": PLATFORM,
        "inputs": inputs,
        "outputs": [{"name": n, "datatype": shapes[n][0], "shape": shapes[n][1]}
                    for n in output_names(model)],
        "parameters": {"task": model.task, "labels": list(model.labels),
                       "spec_hash": model.artifact.spec.content_hash,
                       "ood_flags": model.ood is not None, "usage": usage,
                       "default_outputs": default_outputs(model)},
    }


def wanted_outputs(model: ServedModel, request: InferRequest) -> list[OutputRequest]:
    """The outputs to answer, validated before any inference runs."""
    known = output_names(model)
    if request.outputs is None:
        return [OutputRequest(n, request.binary_output) for n in default_outputs(model)]
    out = []
    for o in request.outputs:
        if o.name not in known:
            raise _bad(f"{model.name} has no output {o.name!r}; its outputs are {list(known)}")
        if o.classification and o.name != PROBABILITIES:
            raise _bad(f"output {o.name!r}: 'classification' applies to 'probabilities' only")
        binary = request.binary_output if o.binary is None else o.binary
        out.append(OutputRequest(o.name, binary, o.classification))
    return out


def the_input(model: ServedModel, request: InferRequest, max_items: int) -> InputTensor:
    """The request's one input, checked against the model: name, datatype, shape, count."""
    names = input_names(model)
    unknown = [t.name for t in request.inputs if t.name not in names]
    if unknown:
        raise _bad(f"{model.name} has no input(s) {unknown}; its inputs are {list(names)}")
    if len(request.inputs) != 1:
        raise _bad(f"send exactly one input of {list(names)}, got "
                   f"{[t.name for t in request.inputs]}")
    tensor = request.inputs[0]
    if tensor.name == TENSOR_INPUT:
        expected, shape = "FP32", [*model.spec.input_shape]
        if tensor.datatype == expected and (len(tensor.shape) != 4 or tensor.shape[1:] != shape):
            raise _bad(f"input 'input' must have shape [N, {', '.join(map(str, shape))}] (the "
                       f"model's spec), got {tensor.shape}")
    else:
        expected = "BYTES"
        if tensor.datatype == expected and not (
                len(tensor.shape) == 1 or (len(tensor.shape) == 2 and tensor.shape[1] == 1)):
            raise _bad(f"input {tensor.name!r} must have shape [N] (or [N, 1]), got {tensor.shape}")
    if tensor.datatype != expected:
        raise _bad(f"input {tensor.name!r} must be {expected}, got {tensor.datatype}")
    n = tensor.shape[0] if tensor.shape else 0
    if n == 0:
        raise RequestError("empty", f"input {tensor.name!r} holds no items; send at least one")
    if n > max_items:
        raise RequestError("too_many_items", f"{n} items in one request; the limit is {max_items}")
    return tensor


def model_inputs(model: ServedModel, tensor: InputTensor) -> Sequence[Any]:
    """What ``model.classify`` takes for this input: encoded images, texts, or ``Tensors``."""
    if tensor.name == TENSOR_INPUT:
        array = tensor.data.reshape(tensor.shape)
        if not np.isfinite(array).all():
            raise _bad("input 'input' holds NaN or infinite values")
        return Tensors(array)
    if tensor.name == TEXT_INPUT:
        texts = []
        for i, data in enumerate(tensor.data):
            try:
                texts.append(decode_text(data))
            except InputError as exc:
                prefix = f"text {i}: " if len(tensor.data) > 1 else ""
                raise InputError(exc.reason, prefix + exc.message) from None
        return texts
    if tensor.binary:
        return tensor.data
    images = []
    for i, data in enumerate(tensor.data):
        if data.startswith(b"data:"):
            data = data.partition(b",")[2]  # a data URL: data:image/png;base64,....
        try:
            images.append(requests.b64decode(data))
        except (binascii.Error, ValueError):
            raise _bad(f"input 'image' element {i} is not valid base64: in JSON, images are "
                       "base64 strings (or send them raw with the binary tensor "
                       "extension)") from None
    return images


def output_tensors(model: ServedModel, predictions: Sequence[Prediction],
                   wanted: Sequence[OutputRequest]) -> list[tuple[OutputTensor, bool]]:
    n, labels = len(predictions), model.labels
    index = {label: j for j, label in enumerate(labels)}
    probs = (np.stack([p.probabilities for p in predictions]).astype(np.float32, copy=False)
             if n else np.zeros((0, len(labels)), np.float32))
    out = []
    for o in wanted:
        if o.name == LABEL:
            tensor = OutputTensor(LABEL, "BYTES", [n], [p.label for p in predictions])
        elif o.name == PROBABILITIES and o.classification:
            k = min(o.classification, len(labels))
            tensor = OutputTensor(PROBABILITIES, "BYTES", [n, k], [
                f"{prob:f}:{index[label]}:{label}"
                for p in predictions for label, prob in p.top_k[:k]])
        elif o.name == PROBABILITIES:
            tensor = OutputTensor(PROBABILITIES, "FP32", [n, len(labels)], probs)
        elif o.name == OOD:
            tensor = OutputTensor(OOD, "BOOL", [n], np.array([p.ood for p in predictions]))
        elif o.name == TRUNCATED:
            tensor = OutputTensor(TRUNCATED, "BOOL", [n],
                                  np.array([bool(p.truncated) for p in predictions]))
        else:
            emb = (np.stack([p.embedding for p in predictions]) if n else
                   np.zeros((0, max(_embedding_dim(model), 0)), np.float32))
            tensor = OutputTensor(EMBEDDING, "FP32", list(emb.shape), emb.astype(np.float32))
        out.append((tensor, o.binary))
    return out


# ---- the routes ----------------------------------------------------------------------------

def error_answer(exc: Exception, request_id: str) -> Answer:
    """Any failure of a v2 route as its v2 error answer (``app.__call__``'s mapping, with
    ``error`` a string)."""
    from .app import STATUS, Answer, Failure

    headers: list[tuple[bytes, bytes]] = []
    if isinstance(exc, (InputError, RequestError, Failure)):
        reason, message = exc.reason, exc.message
        headers = list(getattr(exc, "headers", None) or [])
    elif isinstance(exc, Overloaded):
        reason, message = "overloaded", exc.message
        headers = [(b"retry-after", str(exc.retry_after_s).encode())]
    elif isinstance(exc, DeadlineExceeded):
        reason, message = "deadline_exceeded", getattr(exc, "message", str(exc))
    elif isinstance(exc, LogUnavailable):  # never answer what was not recorded
        reason, message = "log_unavailable", f"{exc}; retry later"
    elif isinstance(exc, BatchError):
        logger.exception("inference failed [request_id=%s]", request_id)
        reason = "internal"
        message = f"inference failed; the server log has request id {request_id}"
    else:
        logger.exception("unexpected failure [request_id=%s]", request_id)
        reason = "internal"
        message = f"internal error; the server log has request id {request_id}"
    return Answer(STATUS[reason], v2_error(reason, message, request_id), headers=headers)


def v2_error(reason: str, message: str, request_id: str) -> dict:
    return {"error": message, "reason": reason, "request_id": request_id}


def _v2_errors(handler):
    """A v2 route answers its errors in the v2 shape (see the module doc)."""

    @functools.wraps(handler)
    async def wrapped(scope, receive, headers, request_id, **params):
        try:
            return await handler(scope, receive, headers, request_id, **params)
        except Exception as exc:  # noqa: BLE001 - every failure becomes its answer
            return error_answer(exc, request_id)

    return wrapped


class Routes:
    """The v2 handlers over one ``App`` (its slots and settings, bound later)."""

    def __init__(self, app: App) -> None:
        self.app = app

    def models(self) -> list[ServedModel]:
        return [slot.current for slot in self.app.slots.values()]

    def model(self, name: str, version: str | None = None) -> ServedModel:
        from .app import Failure

        if self.app.settings is None:
            raise Failure("not_ready", "the models are still loading; retry when "
                          "/v2/health/ready answers 200")
        models = self.models()
        model = next((m for m in models if m.name == name), None)
        if model is None:
            raise Failure("not_found", f"no model named {name!r}; this server serves "
                          f"{[m.name for m in models]}")
        if version is not None and version != model.version:
            raise Failure("not_found", f"{name} version {version!r} is not served; this server "
                          f"serves {name} version {model.version} only")
        return model

    async def server_metadata(self, scope, receive, headers, request_id) -> Answer:
        from .app import Answer

        return Answer(200, {"name": SERVER_NAME, "version": server_version(),
                            "extensions": EXTENSIONS})

    async def live(self, scope, receive, headers, request_id) -> Answer:
        from .app import Answer

        return Answer(200, {"live": True})

    async def ready(self, scope, receive, headers, request_id) -> Answer:
        from .app import Answer, Failure

        from .lifecycle import DRAIN

        if DRAIN.active:
            raise Failure("shutting_down", "this server is shutting down; use another replica")
        models = self.models() if self.app.settings is not None else []
        if not models or not all(m.ready for m in models):
            raise Failure("not_ready", "the models are still loading or warming up")
        return Answer(200, {"ready": True})

    async def metadata(self, scope, receive, headers, request_id, name: str,
                       version: str | None = None) -> Answer:
        from .app import Answer

        return Answer(200, model_metadata(self.model(name, version)))

    async def model_ready(self, scope, receive, headers, request_id, name: str,
                          version: str | None = None) -> Answer:
        from .app import Answer, Failure

        model = self.model(name, version)
        if not model.ready:
            raise Failure("not_ready", f"{name} is still loading or warming up")
        return Answer(200, {"name": model.name, "ready": True})

    async def infer(self, scope, receive, headers, request_id, name: str,
                    version: str | None = None) -> Answer:
        """Read, admit, parse, classify, answer: ``App._classify``'s steps in the same order."""
        from .app import Answer, Failure

        model = self.model(name, version)
        if not model.ready:
            raise Failure("not_ready", f"{name} is still loading; retry when "
                          f"/v2/models/{name}/ready answers 200")
        app, settings = self.app, self.app.settings
        admitted = False
        try:
            budget_s = requests.deadline_ms(headers, settings.request_deadline_ms) / 1e3 or math.inf
            slices = requests.slices(headers.get(requests.SLICES_HEADER, ""), app.slice_rules)
            body, started = await app.read_then_admit(scope, receive, headers, model, budget_s)
            admitted = True
            ctx = RequestContext(request_id, slices, started)
            request = parse_infer(body, headers.get(HEADER_LENGTH))
            wanted = wanted_outputs(model, request)
            limit = (settings.max_images_per_request if isinstance(model, ServedImageModel)
                     else settings.max_texts_per_request)
            inputs = model_inputs(model, the_input(model, request, limit))
            top_k = max([1, *(o.classification for o in wanted)])  # the classification extension's
            predictions = await model.classify(inputs, top_k, ctx, started + budget_s)
        except (InputError, RequestError) as exc:
            model.reject(exc.reason)
            raise
        finally:
            if admitted:
                model.release()
        head: dict = {"model_name": model.name, "model_version": model.version}
        if request.id is not None:
            head["id"] = request.id
        head["parameters"] = {"request_id": request_id}
        body, content_type, extra = encode_response(head, output_tensors(model, predictions,
                                                                         wanted))
        return Answer(200, body, content_type, extra)


def register(app: App, documented: Any = None) -> Routes:
    """Add the v2 routes to ``app`` (``App.__init__`` calls this); ``documented``: the settings
    whose limits the OpenAPI operations state."""
    routes = Routes(app)
    for method, template, handler, doc in _table(routes, documented):
        app.add_route(method, template, _v2_errors(handler), doc=doc)
    return routes


def root_app(app: App) -> Any:
    """What to mount at the server's root so that ``GET /v2`` (the server metadata, exactly
    that path) reaches ``app``. The route table has it as ``/v2/``, the mount root as
    Starlette's ``Mount("/v2")`` hands it over (and as the OpenAPI document lists it); that
    mount matches ``/v2/...`` only and redirects ``/v2`` to ``/v2/``, which ``tritonclient``
    (``get_server_metadata``) does not follow. This is a Starlette app with the one route
    ``/v2``, handed to ``app`` as ``/v2/``: BentoML's mount of a Starlette app matches only its
    routes, so every other path still falls through to BentoML's own."""
    from starlette.applications import Starlette
    from starlette.routing import Route

    return Starlette(routes=[Route("/v2", _AsMountRoot(app))])


class _AsMountRoot:
    """ASGI: the request for ``/v2``, as ``/v2/`` (an object, not a function: Starlette's
    ``Route`` calls an object as an ASGI app, a function as a request handler)."""

    def __init__(self, app: App) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        await self.app({**scope, "path": SERVER_PATH, "raw_path": SERVER_PATH.encode()},
                       receive, send)


def _table(r: Routes, documented: Any) -> list[tuple[str, str, Any, dict]]:
    model = "/v2/models/{name}"
    versioned = "/v2/models/{name}/versions/{version}"
    return [
        ("GET", SERVER_PATH, r.server_metadata, docs.server_metadata()),
        ("GET", "/v2/health/live", r.live, docs.health("live")),
        ("GET", "/v2/health/ready", r.ready, docs.health("ready")),
        ("GET", model, r.metadata, docs.model_metadata(False, documented)),
        ("GET", versioned, r.metadata, docs.model_metadata(True, documented)),
        ("GET", model + "/ready", r.model_ready, docs.model_ready(False, documented)),
        ("GET", versioned + "/ready", r.model_ready, docs.model_ready(True, documented)),
        ("POST", model + "/infer", r.infer, docs.infer(False, documented)),
        ("POST", versioned + "/infer", r.infer, docs.infer(True, documented)),
    ]

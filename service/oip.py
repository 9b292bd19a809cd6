"""The Open Inference Protocol (KServe v2, as Triton and MLServer speak it) over HTTP/REST.

These endpoints only translate: an OIP request into a call of the data plane (service/inference.py) and
its answer back into an OIP response. Supported: health, server and model metadata, readiness, inference
with the binary tensor data extension (`Inference-Header-Content-Length`) and the classification extension,
and the model repository extension's load (service/repository.py). Errors are the protocol's
`{"error": "<message>"}`.

The model takes one input, either
- `image`: BYTES, shape [N] (or [N, 1]), one encoded image (JPEG, PNG, ...) per element; in JSON `data`
  each element is base64, in binary data each is the raw file; or
- `pixels`: FP32, shape [N, height, width, 3], already preprocessed as the manifest says (channels last);
and answers `probabilities`: FP32 [N, classes], or with `parameters: {"classification": k}` on the requested
output, BYTES [N, k] of `"score:index:label"`, best first.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from functools import wraps
from typing import Any

import numpy as np
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from service.endpoints import UNTRAINED_SHORT, disconnected
from service.errors import ErrorJSON, ServiceError
from service.inference import Answer, DataPlane
from service.model import Classifier, ranked
from service.payload import check_identity_encoding, decimal, decode_base64, parse_json, read_body
from service.repository import LoadFailed, Repository

SERVER_NAME = "car-classifier"
SERVER_VERSION = "1.0.0"
EXTENSIONS = ("binary_tensor_data", "classification", "model_repository")
PLATFORM = "onnxruntime_onnx"
VERSION = "1"  # one version at a time: a load replaces it
IMAGE_INPUT = "image"
PIXELS_INPUT = "pixels"
OUTPUT = "probabilities"
HEADER_LENGTH = "Inference-Header-Content-Length"
_FRAMING_BYTES = 64 * 1024
_LENGTH = struct.Struct("<I")

Endpoint = Callable[[Request], Awaitable[Response]]


class ProtocolError(Exception):
    """A request this protocol cannot serve; answered `{"error": message}` with `status_code`."""

    def __init__(self, message: str, status_code: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.status_code = status_code


def error_response(status_code: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return ErrorJSON({"error": message}, status_code=status_code, headers=headers)


def protocol(endpoint: Endpoint) -> Endpoint:
    """Every error an endpoint raises, in the protocol's shape."""

    @wraps(endpoint)
    async def translated(request: Request) -> Response:
        try:
            return await endpoint(request)
        except ServiceError as exc:
            return error_response(exc.status_code, exc.message, exc.headers)
        except (ProtocolError, LoadFailed) as exc:
            return error_response(exc.status_code, exc.message)

    return translated


def _plane(request: Request) -> DataPlane:
    plane: DataPlane = request.app.state.data_plane
    return plane


def _model(request: Request) -> Classifier:
    """The model the path names, if it is the one served (and the version, if given, is ours)."""
    model = _plane(request).model
    name, version = request.path_params["name"], request.path_params.get("version")
    if name != model.manifest.name:
        raise ProtocolError(f"unknown model {name!r}: this server serves {model.manifest.name!r}", 404)
    if version is not None and version != VERSION:
        raise ProtocolError(f"model {name!r} has no version {version!r}; it serves version {VERSION}", 404)
    return model


@protocol
async def server_metadata(request: Request) -> Response:
    return JSONResponse({"name": SERVER_NAME, "version": SERVER_VERSION, "extensions": list(EXTENSIONS)})


@protocol
async def live(request: Request) -> Response:
    return JSONResponse({"live": True})


@protocol
async def server_ready(request: Request) -> Response:
    if not request.app.state.ready:
        raise ProtocolError("the model is not loaded yet, or the server is shutting down", 503)
    return JSONResponse({"ready": True})


@protocol
async def model_metadata(request: Request) -> Response:
    model = _model(request)
    spec = model.manifest.preprocessing
    return JSONResponse(
        {
            "name": model.manifest.name,
            "versions": [VERSION],
            "platform": PLATFORM,
            "inputs": [
                {"name": IMAGE_INPUT, "datatype": "BYTES", "shape": [-1]},
                {"name": PIXELS_INPUT, "datatype": "FP32", "shape": [-1, spec.height, spec.width, 3]},
            ],
            "outputs": [{"name": OUTPUT, "datatype": "FP32", "shape": [-1, len(model.labels)]}],
        }
    )


@protocol
async def model_ready(request: Request) -> Response:
    model = _model(request)
    if not request.app.state.ready:
        raise ProtocolError("the model is not loaded yet, or the server is shutting down", 503)
    return JSONResponse({"name": model.manifest.name, "ready": True})


# --- inference ---


def _object(value: object, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ProtocolError(f"{where} must be a JSON object")
    return value


def _optional(document: dict[str, Any], key: str, kind: type, where: str) -> Any:
    value = document.get(key)
    if value is not None and (not isinstance(value, kind) or (kind is int and isinstance(value, bool))):
        raise ProtocolError(f"{where}.{key} must be a {'JSON object' if kind is dict else kind.__name__}")
    return value


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


@dataclass(frozen=True)
class Tensor:
    name: str
    datatype: str
    shape: tuple[int, ...]
    data: object  # JSON `data`, or bytes when sent as binary data


@dataclass(frozen=True)
class Requested:
    name: str
    binary: bool
    classification: int


def _flatten(data: object) -> Iterator[object]:
    if isinstance(data, list):
        for item in data:
            yield from _flatten(item)
    else:
        yield data


def _input(value: object, where: str) -> tuple[dict[str, Any], Tensor]:
    item = _object(value, where)
    name, datatype, shape = item.get("name"), item.get("datatype"), item.get("shape")
    if not isinstance(name, str) or not isinstance(datatype, str):
        raise ProtocolError(f"{where} needs a string `name` and `datatype`")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise ProtocolError(f"{where}.shape must be a list of non-negative integers")
    parameters = _optional(item, "parameters", dict, where) or {}
    return parameters, Tensor(name, datatype, tuple(shape), item.get("data"))


def _parse(document: object, binary: bytes) -> tuple[dict[str, Any], Tensor, list[Requested]]:
    """The request's JSON (and binary data) -> its one input and the outputs asked for."""
    request = _object(document, "the inference request")
    identifier = _optional(request, "id", str, "request")
    if identifier is not None and not _encodable(identifier):
        raise ProtocolError("request.id holds a lone surrogate: it cannot be sent back as UTF-8")
    parameters = _optional(request, "parameters", dict, "request") or {}
    inputs = request.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise ProtocolError("the inference request needs `inputs`: a non-empty list")
    parsed = [_input(item, f"inputs[{i}]") for i, item in enumerate(inputs)]
    offset = 0
    tensors = []
    for params, tensor in parsed:
        size = params.get("binary_data_size")
        if size is None:
            if tensor.data is None:
                raise ProtocolError(f"input {tensor.name!r} has neither `data` nor binary data")
            tensors.append(tensor)
            continue
        if not isinstance(size, int) or isinstance(size, bool) or size < 0 or offset + size > len(binary):
            raise ProtocolError(
                f"input {tensor.name!r}: binary_data_size {size!r} does not fit the {len(binary)} bytes of binary "
                f"data after the JSON header (send its length in {HEADER_LENGTH})"
            )
        tensors.append(Tensor(tensor.name, tensor.datatype, tensor.shape, binary[offset : offset + size]))
        offset += size
    if offset != len(binary):
        raise ProtocolError(f"{len(binary) - offset} bytes of binary data belong to no input")
    if len(tensors) != 1:
        raise ProtocolError(f"the model takes one input, {IMAGE_INPUT!r} (BYTES) or {PIXELS_INPUT!r} (FP32)")
    default_binary = parameters.get("binary_data_output", False)
    if not isinstance(default_binary, bool):
        raise ProtocolError("parameters.binary_data_output must be true or false")
    outputs = request.get("outputs")
    if outputs is None:
        return request, tensors[0], [Requested(OUTPUT, default_binary, 0)]
    if not isinstance(outputs, list):
        raise ProtocolError("`outputs` must be a list")
    return request, tensors[0], [_output(item, f"outputs[{i}]", default_binary) for i, item in enumerate(outputs)]


def _output(value: object, where: str, default_binary: bool) -> Requested:
    item = _object(value, where)
    name = item.get("name")
    if not isinstance(name, str):
        raise ProtocolError(f"{where} needs a string `name`")
    if name != OUTPUT:
        raise ProtocolError(f"unknown output {name!r}: the model's output is {OUTPUT!r}")
    parameters = _optional(item, "parameters", dict, where) or {}
    binary = parameters.get("binary_data", default_binary)
    classification = parameters.get("classification", 0)
    if not isinstance(binary, bool):
        raise ProtocolError(f"{where}.parameters.binary_data must be true or false")
    if not isinstance(classification, int) or isinstance(classification, bool) or classification < 0:
        raise ProtocolError(f"{where}.parameters.classification must be a non-negative integer")
    return Requested(name, binary, classification)


def _count(shape: tuple[int, ...]) -> int:
    # In Python's integers: numpy's int64 product overflowed on [2**64] (a 500) and wrapped [2**60 + 1, ...]
    # round to a count that the data then matched.
    return math.prod(shape)


def _encoded_images(tensor: Tensor) -> list[bytes | ServiceError]:
    if tensor.datatype != "BYTES":
        raise ProtocolError(f"input {IMAGE_INPUT!r} must be BYTES (one encoded image per element)")
    if len(tensor.shape) not in (1, 2) or (len(tensor.shape) == 2 and tensor.shape[1] != 1):
        raise ProtocolError(f"input {IMAGE_INPUT!r} has shape {list(tensor.shape)}; send [N] or [N, 1]")
    count = _count(tensor.shape)
    if count == 0:
        raise ProtocolError(f"input {IMAGE_INPUT!r} holds no image")
    images: list[bytes | ServiceError] = []
    if isinstance(tensor.data, bytes):
        view, offset = tensor.data, 0
        while offset < len(view):
            if offset + 4 > len(view):
                raise ProtocolError(f"input {IMAGE_INPUT!r}: binary BYTES data ends inside a length prefix")
            (size,) = _LENGTH.unpack_from(view, offset)
            if offset + 4 + size > len(view):
                raise ProtocolError(f"input {IMAGE_INPUT!r}: element {len(images)} runs past the binary data")
            images.append(view[offset + 4 : offset + 4 + size])
            offset += 4 + size
    else:
        for i, element in enumerate(_flatten(tensor.data)):
            if not isinstance(element, str):
                raise ProtocolError(f"input {IMAGE_INPUT!r}: element {i} is not a base64 string")
            try:
                images.append(decode_base64(element))
            except ServiceError as exc:
                images.append(exc)
    if len(images) != count:
        raise ProtocolError(f"input {IMAGE_INPUT!r} has shape {list(tensor.shape)} but {len(images)} elements")
    return images


def _pixels(tensor: Tensor, model: Classifier) -> np.ndarray:
    height, width, channels = model.input_shape
    if tensor.datatype != "FP32":
        raise ProtocolError(f"input {PIXELS_INPUT!r} must be FP32")
    if len(tensor.shape) != 4 or tensor.shape[1:] != (height, width, channels) or tensor.shape[0] == 0:
        raise ProtocolError(
            f"input {PIXELS_INPUT!r} has shape {list(tensor.shape)}; the model takes [N, {height}, {width}, {channels}]"
        )
    count = _count(tensor.shape)
    if isinstance(tensor.data, bytes):
        if len(tensor.data) != count * 4:
            raise ProtocolError(
                f"input {PIXELS_INPUT!r}: {len(tensor.data)} bytes of binary data, expected {count * 4}"
            )
        values = np.frombuffer(tensor.data, dtype="<f4").astype(np.float32)
    else:
        flat = list(_flatten(tensor.data))
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in flat):
            raise ProtocolError(f"input {PIXELS_INPUT!r}: `data` must hold numbers only")
        if len(flat) != count:
            raise ProtocolError(f"input {PIXELS_INPUT!r} has shape {list(tensor.shape)} but {len(flat)} values")
        # Values past FP32's range become infinite (and are refused below); an integer past float64's raises.
        with np.errstate(over="ignore"):
            try:
                values = np.asarray(flat, dtype=np.float32)
            except OverflowError:
                raise ProtocolError(f"input {PIXELS_INPUT!r} holds a value too large for FP32") from None
    if not np.isfinite(values).all():
        raise ProtocolError(f"input {PIXELS_INPUT!r} holds NaN or infinite values")
    return values.reshape(tensor.shape)


def _probabilities(answer: Answer) -> np.ndarray:
    rows = []
    for i, result in enumerate(answer.results):
        if isinstance(result, ServiceError):  # one bad image fails the request: OIP has no per-element error
            raise type(result)(f"image {i}: {result.message}", headers=result.headers)
        rows.append(result)
    return np.stack(rows).astype(np.float32, copy=False)


def _classification(probabilities: np.ndarray, labels: list[str], k: int) -> list[bytes]:
    strings = []
    for row in probabilities:
        # Triton's form: the score as C's %f, the class index, the label. Ranked as /infer ranks them.
        strings += [f"{row[i]:f}:{i}:{labels[i]}".encode() for i in ranked(row, k)]
    return strings


def _serialized(elements: list[bytes]) -> bytes:
    return b"".join(_LENGTH.pack(len(element)) + element for element in elements)


@protocol
async def infer(request: Request) -> Response:
    plane = _plane(request)
    model = _model(request)
    deadline = plane.deadline()
    check_identity_encoding(request)
    limit = plane.settings.max_upload_bytes
    # Room for the images as base64 in JSON, the largest form.
    body = await read_body(request, (limit * 4 + 2) // 3 + _FRAMING_BYTES, limit)
    declared = request.headers.get(HEADER_LENGTH.lower())
    if declared is not None:
        length = decimal(declared)
        if length is None or length > len(body):
            raise ProtocolError(f"{HEADER_LENGTH} {declared!r} is not a length within the {len(body)}-byte body")
        header, binary = body[:length], body[length:]
    else:
        header, binary = body, b""
    try:
        document = parse_json(header)
    except ValueError:
        raise ProtocolError("the inference request is not valid JSON") from None
    parsed, tensor, outputs = _parse(document, binary)
    gone = lambda: disconnected(request)  # noqa: E731
    if tensor.name == IMAGE_INPUT:
        answer = await plane.classify(_encoded_images(tensor), deadline, gone)
    elif tensor.name == PIXELS_INPUT:
        pixels = _pixels(tensor, model)
        answer = await plane.classify_pixels(pixels, deadline, gone)
    else:
        raise ProtocolError(f"unknown input {tensor.name!r}: the model takes {IMAGE_INPUT!r} or {PIXELS_INPUT!r}")
    probabilities = _probabilities(answer)
    return _respond(parsed, answer.model, probabilities, outputs)


def _respond(
    request: dict[str, Any], model: Classifier, probabilities: np.ndarray, outputs: list[Requested]
) -> Response:
    document: dict[str, Any] = {"model_name": model.manifest.name, "model_version": VERSION}
    if "id" in request:
        document["id"] = request["id"]
    if not model.manifest.trained:
        document["parameters"] = {"warning": UNTRAINED_SHORT}
    count = probabilities.shape[0]
    blobs: list[bytes] = []
    described = []
    for wanted in outputs:
        if wanted.classification:
            strings = _classification(probabilities, model.labels, wanted.classification)
            output: dict[str, Any] = {"name": wanted.name, "datatype": "BYTES", "shape": [count, len(strings) // count]}
            blob = _serialized(strings)
            values: object = [s.decode() for s in strings]
        else:
            output = {"name": wanted.name, "datatype": "FP32", "shape": list(probabilities.shape)}
            blob = probabilities.astype("<f4").tobytes()
            values = probabilities.ravel().tolist()
        if wanted.binary:
            output["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            output["data"] = values
        described.append(output)
    document["outputs"] = described
    if not blobs:
        return JSONResponse(document)
    header = json.dumps(document, separators=(",", ":"), ensure_ascii=False).encode()
    return Response(
        header + b"".join(blobs),
        media_type="application/octet-stream",
        headers={HEADER_LENGTH: str(len(header))},
    )


# --- the model repository extension ---


@protocol
async def load(request: Request) -> Response:
    body = await read_body(request, _FRAMING_BYTES, _FRAMING_BYTES, "the limit of a load request")
    if body.strip():
        try:
            document = parse_json(body)
        except ValueError:
            raise ProtocolError("the load request is not valid JSON") from None
        parameters = _optional(_object(document, "the load request"), "parameters", dict, "request") or {}
        overrides = sorted(key for key in parameters if key == "config" or key.startswith("file:"))
        if overrides:
            raise ProtocolError(f"this server loads only what MODEL_DIR holds; {', '.join(overrides)} cannot be sent")
    repository: Repository = request.app.state.repository
    loaded = await repository.load(request.path_params["name"])
    manifest = loaded.model.manifest
    return JSONResponse(
        {
            "name": manifest.name,
            "version": VERSION,
            "sha256": manifest.model.sha256,
            "replaced": {"name": loaded.replaced.manifest.name, "sha256": loaded.replaced.manifest.model.sha256},
        }
    )

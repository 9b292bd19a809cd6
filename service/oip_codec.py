"""The Open Inference Protocol's codec (KServe v2, as Triton and MLServer speak it): an inference request's
JSON (and binary tensor data) in, the data plane's answer out as the protocol's response. No HTTP here: the
endpoints (service/oip.py) hand it bytes and send what it returns.

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
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from service.errors import InvalidRequest, ServiceError
from service.inference import IMAGE_INPUT, OUTPUT, PIXELS_INPUT, UNTRAINED_SHORT, VERSION, Answer
from service.model import Classifier, ranked
from service.payload import decimal, decode_base64, parse_json

HEADER_LENGTH = "Inference-Header-Content-Length"
_LENGTH = struct.Struct("<I")


@dataclass(frozen=True)
class Encoded:
    """A response: its JSON document, and the binary data that follows it (empty: a plain JSON response)."""

    document: dict[str, Any]
    binary: bytes = b""

    def header(self) -> bytes:
        return json.dumps(self.document, separators=(",", ":"), ensure_ascii=False).encode()


def split_body(body: bytes, declared: str | None) -> tuple[bytes, bytes]:
    """The body's JSON header and the binary data after it, `declared` being the Inference-Header-Content-Length."""
    if declared is None:
        return body, b""
    length = decimal(declared)
    if length is None or length > len(body):
        raise InvalidRequest(f"{HEADER_LENGTH} {declared!r} is not a length within the {len(body)}-byte body")
    return body[:length], body[length:]


def _document(header: bytes, what: str) -> object:
    try:
        return parse_json(header)
    except ValueError:
        raise InvalidRequest(f"the {what} is not valid JSON") from None


def _object(value: object, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise InvalidRequest(f"{where} must be a JSON object")
    return value


def _optional(document: dict[str, Any], key: str, kind: type, where: str) -> Any:
    value = document.get(key)
    if value is not None and (not isinstance(value, kind) or (kind is int and isinstance(value, bool))):
        raise InvalidRequest(f"{where}.{key} must be a {'JSON object' if kind is dict else kind.__name__}")
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
        raise InvalidRequest(f"{where} needs a string `name` and `datatype`")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise InvalidRequest(f"{where}.shape must be a list of non-negative integers")
    parameters = _optional(item, "parameters", dict, where) or {}
    return parameters, Tensor(name, datatype, tuple(shape), item.get("data"))


def parse(header: bytes, binary: bytes) -> tuple[dict[str, Any], Tensor, list[Requested]]:
    """The request's JSON (and binary data) -> the request, its one input and the outputs asked for."""
    request = _object(_document(header, "inference request"), "the inference request")
    identifier = _optional(request, "id", str, "request")
    if identifier is not None and not _encodable(identifier):
        raise InvalidRequest("request.id holds a lone surrogate: it cannot be sent back as UTF-8")
    parameters = _optional(request, "parameters", dict, "request") or {}
    inputs = request.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise InvalidRequest("the inference request needs `inputs`: a non-empty list")
    parsed = [_input(item, f"inputs[{i}]") for i, item in enumerate(inputs)]
    offset = 0
    tensors = []
    for params, tensor in parsed:
        size = params.get("binary_data_size")
        if size is None:
            if tensor.data is None:
                raise InvalidRequest(f"input {tensor.name!r} has neither `data` nor binary data")
            tensors.append(tensor)
            continue
        if not isinstance(size, int) or isinstance(size, bool) or size < 0 or offset + size > len(binary):
            raise InvalidRequest(
                f"input {tensor.name!r}: binary_data_size {size!r} does not fit the {len(binary)} bytes of binary "
                f"data after the JSON header (send its length in {HEADER_LENGTH})"
            )
        tensors.append(Tensor(tensor.name, tensor.datatype, tensor.shape, binary[offset : offset + size]))
        offset += size
    if offset != len(binary):
        raise InvalidRequest(f"{len(binary) - offset} bytes of binary data belong to no input")
    if len(tensors) != 1:
        raise InvalidRequest(f"the model takes one input, {IMAGE_INPUT!r} (BYTES) or {PIXELS_INPUT!r} (FP32)")
    default_binary = parameters.get("binary_data_output", False)
    if not isinstance(default_binary, bool):
        raise InvalidRequest("parameters.binary_data_output must be true or false")
    outputs = request.get("outputs")
    if outputs is None:
        return request, tensors[0], [Requested(OUTPUT, default_binary, 0)]
    if not isinstance(outputs, list):
        raise InvalidRequest("`outputs` must be a list")
    return request, tensors[0], [_output(item, f"outputs[{i}]", default_binary) for i, item in enumerate(outputs)]


def _output(value: object, where: str, default_binary: bool) -> Requested:
    item = _object(value, where)
    name = item.get("name")
    if not isinstance(name, str):
        raise InvalidRequest(f"{where} needs a string `name`")
    if name != OUTPUT:
        raise InvalidRequest(f"unknown output {name!r}: the model's output is {OUTPUT!r}")
    parameters = _optional(item, "parameters", dict, where) or {}
    binary = parameters.get("binary_data", default_binary)
    classification = parameters.get("classification", 0)
    if not isinstance(binary, bool):
        raise InvalidRequest(f"{where}.parameters.binary_data must be true or false")
    if not isinstance(classification, int) or isinstance(classification, bool) or classification < 0:
        raise InvalidRequest(f"{where}.parameters.classification must be a non-negative integer")
    return Requested(name, binary, classification)


def _count(shape: tuple[int, ...]) -> int:
    # In Python's integers: numpy's int64 product overflowed on [2**64] (a 500) and wrapped [2**60 + 1, ...]
    # round to a count that the data then matched.
    return math.prod(shape)


def encoded_images(tensor: Tensor) -> list[bytes | ServiceError]:
    if tensor.datatype != "BYTES":
        raise InvalidRequest(f"input {IMAGE_INPUT!r} must be BYTES (one encoded image per element)")
    if len(tensor.shape) not in (1, 2) or (len(tensor.shape) == 2 and tensor.shape[1] != 1):
        raise InvalidRequest(f"input {IMAGE_INPUT!r} has shape {list(tensor.shape)}; send [N] or [N, 1]")
    count = _count(tensor.shape)
    if count == 0:
        raise InvalidRequest(f"input {IMAGE_INPUT!r} holds no image")
    images: list[bytes | ServiceError] = []
    if isinstance(tensor.data, bytes):
        view, offset = tensor.data, 0
        while offset < len(view):
            if offset + 4 > len(view):
                raise InvalidRequest(f"input {IMAGE_INPUT!r}: binary BYTES data ends inside a length prefix")
            (size,) = _LENGTH.unpack_from(view, offset)
            if offset + 4 + size > len(view):
                raise InvalidRequest(f"input {IMAGE_INPUT!r}: element {len(images)} runs past the binary data")
            images.append(view[offset + 4 : offset + 4 + size])
            offset += 4 + size
    else:
        for i, element in enumerate(_flatten(tensor.data)):
            if not isinstance(element, str):
                raise InvalidRequest(f"input {IMAGE_INPUT!r}: element {i} is not a base64 string")
            try:
                images.append(decode_base64(element))
            except ServiceError as exc:
                images.append(exc)
    if len(images) != count:
        raise InvalidRequest(f"input {IMAGE_INPUT!r} has shape {list(tensor.shape)} but {len(images)} elements")
    return images


def pixel_batch(tensor: Tensor, model: Classifier) -> np.ndarray:
    height, width, channels = model.input_shape
    if tensor.datatype != "FP32":
        raise InvalidRequest(f"input {PIXELS_INPUT!r} must be FP32")
    if len(tensor.shape) != 4 or tensor.shape[1:] != (height, width, channels) or tensor.shape[0] == 0:
        raise InvalidRequest(
            f"input {PIXELS_INPUT!r} has shape {list(tensor.shape)}; the model takes [N, {height}, {width}, {channels}]"
        )
    count = _count(tensor.shape)
    if isinstance(tensor.data, bytes):
        if len(tensor.data) != count * 4:
            raise InvalidRequest(
                f"input {PIXELS_INPUT!r}: {len(tensor.data)} bytes of binary data, expected {count * 4}"
            )
        values = np.frombuffer(tensor.data, dtype="<f4").astype(np.float32)
    else:
        flat = list(_flatten(tensor.data))
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in flat):
            raise InvalidRequest(f"input {PIXELS_INPUT!r}: `data` must hold numbers only")
        if len(flat) != count:
            raise InvalidRequest(f"input {PIXELS_INPUT!r} has shape {list(tensor.shape)} but {len(flat)} values")
        # Values past FP32's range become infinite (and are refused below); an integer past float64's raises.
        with np.errstate(over="ignore"):
            try:
                values = np.asarray(flat, dtype=np.float32)
            except OverflowError:
                raise InvalidRequest(f"input {PIXELS_INPUT!r} holds a value too large for FP32") from None
    if not np.isfinite(values).all():
        raise InvalidRequest(f"input {PIXELS_INPUT!r} holds NaN or infinite values")
    return values.reshape(tensor.shape)


def stacked(answer: Answer) -> np.ndarray:
    rows = []
    for i, result in enumerate(answer.results):
        if isinstance(result, ServiceError):  # one bad image fails the request: OIP has no per-element error
            raise type(result)(f"image {i}: {result.message}", headers=result.headers)
        rows.append(result)
    return np.stack(rows).astype(np.float32, copy=False)


def classification(probabilities: np.ndarray, labels: list[str], k: int) -> list[bytes]:
    strings = []
    for row in probabilities:
        # Triton's form: the score as C's %f, the class index, the label. Ranked as /infer ranks them.
        strings += [f"{row[i]:f}:{i}:{labels[i]}".encode() for i in ranked(row, k)]
    return strings


def _serialized(elements: list[bytes]) -> bytes:
    return b"".join(_LENGTH.pack(len(element)) + element for element in elements)


def response(
    request: dict[str, Any], model: Classifier, probabilities: np.ndarray, outputs: list[Requested]
) -> Encoded:
    """The protocol's response to `request`: the outputs asked for, each in JSON `data` or as binary data."""
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
            strings = classification(probabilities, model.labels, wanted.classification)
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
    return Encoded(document, b"".join(blobs))


def load_request(body: bytes) -> None:
    """Check a repository load request: this server loads only what MODEL_DIR holds, so a request may not
    carry a model of its own (`config`, `file:` parameters)."""
    if not body.strip():
        return
    request = _object(_document(body, "load request"), "the load request")
    parameters = _optional(request, "parameters", dict, "request") or {}
    overrides = sorted(key for key in parameters if key == "config" or key.startswith("file:"))
    if overrides:
        raise InvalidRequest(f"this server loads only what MODEL_DIR holds; {', '.join(overrides)} cannot be sent")

"""The Open Inference Protocol (KServe v2, as Triton and MLServer speak it) over HTTP/REST.

Each endpoint takes care of the HTTP-specific things and delegates: the request's bytes to the codec
(service/oip_codec.py), the work to the data plane (service/inference.py). Supported: health, server and model
metadata, readiness, inference with the binary tensor data extension (`Inference-Header-Content-Length`) and the
classification extension, and the model repository extension's load (service/repository.py). Errors are
ServiceErrors, answered in the protocol's `{"error": "<message>"}` by `error_response` (registered for the
`/v2` prefix in service/app.py).
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from service import oip_codec as codec
from service import record
from service.endpoints import disconnected
from service.errors import ErrorJSON, InvalidRequest, ModelLoadDisabled, ServiceError, noted
from service.inference import IMAGE_INPUT, OUTPUT, PIXELS_INPUT, VERSION, DataPlane
from service.oip_codec import HEADER_LENGTH
from service.payload import FRAMING_BYTES, check_identity_encoding, json_body_limit, read_body
from service.repository import Repository

PREFIX = "/v2"
SERVER_NAME = "car-classifier"
SERVER_VERSION = "1.0.0"
EXTENSIONS = ("binary_tensor_data", "classification", "model_repository")
# The protocol's names, for the contract.
__all__ = ["HEADER_LENGTH", "IMAGE_INPUT", "OUTPUT", "PIXELS_INPUT", "VERSION"]


def error_response(exc: ServiceError) -> JSONResponse:
    body = {"error": exc.message}
    request_id = noted(exc.code)
    if request_id is not None:
        body["request_id"] = request_id
    return ErrorJSON(body, status_code=exc.status_code, headers=exc.headers)


def _plane(request: Request) -> DataPlane:
    plane: DataPlane = request.app.state.data_plane
    return plane


async def server_metadata(request: Request) -> Response:
    return JSONResponse({"name": SERVER_NAME, "version": SERVER_VERSION, "extensions": list(EXTENSIONS)})


async def live(request: Request) -> Response:
    return JSONResponse({"live": True})


async def server_ready(request: Request) -> Response:
    _plane(request).check_ready()
    return JSONResponse({"ready": True})


async def model_metadata(request: Request) -> Response:
    return JSONResponse(_plane(request).metadata(request.path_params["name"], request.path_params.get("version")))


async def model_ready(request: Request) -> Response:
    plane = _plane(request)
    model = plane.find(request.path_params["name"], request.path_params.get("version"))
    plane.check_ready()
    return JSONResponse({"name": model.manifest.name, "ready": True})


async def infer(request: Request) -> Response:
    plane = _plane(request)
    model = plane.find(request.path_params["name"], request.path_params.get("version"))
    deadline = plane.deadline()
    check_identity_encoding(request)
    limit = plane.settings.max_upload_bytes
    body = await read_body(request, json_body_limit(limit), limit)  # room for the images as base64 in JSON
    parsed, tensor, outputs = codec.parse(*codec.split_body(body, request.headers.get(HEADER_LENGTH.lower())))
    gone = lambda: disconnected(request)  # noqa: E731
    if tensor.name == IMAGE_INPUT:
        answer = await plane.classify(codec.encoded_images(tensor), deadline, gone)
    elif tensor.name == PIXELS_INPUT:
        answer = await plane.classify_pixels(codec.pixel_batch(tensor, model), deadline, gone)
    else:
        raise InvalidRequest(f"unknown input {tensor.name!r}: the model takes {IMAGE_INPUT!r} or {PIXELS_INPUT!r}")
    encoded = codec.response(parsed, answer.model, codec.stacked(answer), outputs)
    if not encoded.binary:
        return JSONResponse(encoded.document)
    header = encoded.header()
    return Response(
        header + encoded.binary,
        media_type="application/octet-stream",
        headers={HEADER_LENGTH: str(len(header))},
    )


async def load(request: Request) -> Response:
    """The model repository extension: load MODEL_DIR's artifact again and serve it (MODEL_LOAD=enabled only)."""
    if not _plane(request).settings.model_load:
        raise ModelLoadDisabled(
            "loading a model over HTTP is off: set MODEL_LOAD=enabled to turn it on (with API_KEY set, it then "
            "needs the key); SIGHUP to the server process loads MODEL_DIR again without it"
        )
    codec.load_request(await read_body(request, FRAMING_BYTES, FRAMING_BYTES, "the limit of a load request"))
    repository: Repository = request.app.state.repository
    loaded = await repository.load(request.path_params["name"])
    answered = record.current.get()
    if answered is not None:
        answered.model = loaded.model.tag  # the answer comes from the model it loaded
    manifest = loaded.model.manifest
    return JSONResponse(
        {
            "name": manifest.name,
            "version": VERSION,
            "sha256": manifest.model.sha256,
            "replaced": {"name": loaded.replaced.manifest.name, "sha256": loaded.replaced.manifest.model.sha256},
        }
    )

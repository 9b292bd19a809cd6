"""GET /openapi.json: service/openapi.json, served, is valid OpenAPI 3.1, matches the app's routes, every ServiceError
and real answers, and admits no request the service refuses for its form (schemathesis, every check)."""

from __future__ import annotations

import base64
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from jsonschema import ValidationError
from openapi_schema_validator import OAS31Validator
from openapi_spec_validator import validate
from starlette.routing import Route

from service import endpoints
from service.app import create_app
from service.errors import ServiceError
from service.openapi import app_operations, build_document, documented_operations, template
from service.settings import Settings
from tests.helpers import ARTIFACTS, ROOT, Server, image_bytes, running_service

API_DOC = ROOT / "docs" / "api.md"
KEY = "test-key-0123"


def _all_errors() -> list[type[ServiceError]]:
    # Walked here independently of service/openapi.py, so a bug in its walk cannot hide an error.
    found: list[type[ServiceError]] = []
    pending = list(ServiceError.__subclasses__())
    while pending:
        cls = pending.pop()
        found.append(cls)
        pending.extend(cls.__subclasses__())
    return found


# Answered by Starlette's 404/405 and the last-resort handler (service/errors.py), not by a ServiceError.
HANDLER_CODES = {"not_found", "method_not_allowed", "internal_error"}


def _resolved(document: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in node:
        *_, kind, name = node["$ref"].split("/")
        node = document["components"][kind][name]
    return node


def _codes(response: dict[str, Any], document: dict[str, Any] | None = None) -> set[str]:
    """The codes an error response documents: its description names each as "`code`: why"."""
    response = _resolved(document or template(), response)
    return set(re.findall(r"`([a-z0-9_]+)`:", response["description"]))


def _enum(response: dict[str, Any], document: dict[str, Any]) -> set[str] | None:
    """The `code` enum of an error in the service's shape; None for the Open Inference Protocol's shape."""
    schema = _resolved(document, response)["content"]["application/json"]["schema"]
    if "allOf" not in schema:
        return None
    return set(schema["allOf"][1]["properties"]["error"]["properties"]["code"]["enum"])


def _documented_errors(document: dict[str, Any]) -> set[tuple[int, str]]:
    """(status, code) of every error the document names: on its operations, and before any route (info)."""
    found = {
        (int(status), code)
        for item in document["paths"].values()
        for operation in item.values()
        for status, response in operation["responses"].items()
        if status[0] in "45"
        for code in _codes(response, document)
    }
    info = document["info"]["description"]
    return found | {(int(status), code) for status, code in re.findall(r"(\d{3}) `([a-z0-9_]+)`", info)}


@pytest.fixture(scope="module")
def reference_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    # The committed artifact: the untrained reference model, whose answers carry `warning`.
    log = tmp_path_factory.mktemp("openapi") / "reference.log"
    with running_service(ARTIFACTS, log) as server:
        yield server


@pytest.fixture(scope="module")
def document(reference_server: Server) -> dict[str, Any]:
    response = httpx.get(f"{reference_server.url}/openapi.json")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    body: dict[str, Any] = response.json()
    return body


@pytest.fixture(scope="module")
def keyed_server(tiny_artifact: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    log = tmp_path_factory.mktemp("openapi") / "keyed.log"
    with running_service(tiny_artifact, log, API_KEY=KEY) as server:
        yield server


def test_the_served_document_is_valid_openapi_3_1(document: dict[str, Any]) -> None:
    assert document["openapi"].startswith("3.1")
    validate(document)


def test_every_route_of_the_app_is_documented_and_nothing_else(document: dict[str, Any]) -> None:
    app = create_app(Settings())
    served = {(path, method) for path, item in document["paths"].items() for method in item}
    assert set(app_operations(app)) == documented_operations() == served
    assert all(item[m]["summary"] != "not described yet" for item in document["paths"].values() for m in item)


def test_a_route_added_without_a_description_is_caught() -> None:
    app = create_app(Settings())
    app.router.routes.append(Route("/extra", endpoints.ping, methods=["GET", "DELETE"]))
    assert {("/extra", "get"), ("/extra", "delete")} <= set(app_operations(app)) - documented_operations()
    extra = build_document(app, Settings())["paths"]["/extra"]
    assert extra["get"]["summary"] == "not described yet"


def test_every_error_class_is_documented_with_its_status(document: dict[str, Any]) -> None:
    keyed = build_document(create_app(Settings(api_keys=(KEY,))), Settings(api_keys=(KEY,)))
    errors = _all_errors()
    assert {"unauthorized", "request_timeout", "overloaded", "invalid_image"} <= {cls.code for cls in errors}
    documented = _documented_errors(keyed)
    assert {(cls.status_code, cls.code) for cls in errors} <= documented
    # Nothing stale: every code the document names is one the service answers.
    assert {code for _, code in documented} <= {cls.code for cls in errors} | HANDLER_CODES
    assert "401" not in document["paths"]["/infer"]["post"]["responses"], "401 only when an API key is configured"
    assert (401, "unauthorized") not in _documented_errors(document)


def test_each_error_response_lists_its_codes_once(document: dict[str, Any]) -> None:
    # In the service's shape the `code` enum and the description name the same codes; every route can meet the
    # client guard's 503 `overloaded` (MAX_CONNECTIONS).
    for path, item in document["paths"].items():
        for method, operation in item.items():
            responses = operation["responses"]
            assert "overloaded" in _codes(responses["503"], document), (path, method)
            for status, response in responses.items():
                enum = _enum(response, document) if status[0] in "45" else None
                assert enum is None or enum == _codes(response, document), (path, method, status)


def _schema_of(document: dict[str, Any], path: str, media: str = "application/json") -> OAS31Validator:
    schema = document["paths"][path]["post"]["requestBody"]["content"][media]["schema"]
    return OAS31Validator({**schema, "components": document["components"]})


def test_requests_the_service_refuses_for_their_form_are_not_admitted(document: dict[str, Any]) -> None:
    # schemathesis's findings before the document was data: each is answered 400, so the document refuses it.
    infer = _schema_of(document, "/infer")
    for body in ({"image": ""}, {"image": "data:image/png;base64,"}, {"image": "  "}):
        assert not infer.is_valid(body), body
    assert infer.is_valid({"image": base64.b64encode(image_bytes((1, 2, 3))).decode()})
    oip = _schema_of(document, "/v2/models/{name}/infer")
    image = {"name": "image", "datatype": "BYTES", "shape": [1], "data": ["AAAA"]}
    assert oip.is_valid({"inputs": [image]})
    for tensor in (
        {**image, "data": None},
        {key: value for key, value in image.items() if key != "data"},
        {**image, "parameters": {"binary_data_size": 4}},  # binary data needs the header's length: octet-stream
        {**image, "datatype": "FP32"},
    ):
        assert not oip.is_valid({"inputs": [tensor]}), tensor
    load = _schema_of(document, "/v2/repository/models/{name}/load")
    assert load.is_valid({"parameters": {"x": 1}}) and not load.is_valid({"parameters": {"file:model.onnx": "x"}})


def _conforms(document: dict[str, Any], path: str, method: str, response: httpx.Response) -> None:
    """The real answer validates against the schema the document gives for its status."""
    documented = _resolved(document, document["paths"][path][method]["responses"][str(response.status_code)])
    schema = {**documented["content"]["application/json"]["schema"], "components": document["components"]}
    OAS31Validator(schema).validate(response.json())


def test_real_answers_validate_against_the_documented_schemas(
    reference_server: Server, document: dict[str, Any]
) -> None:
    url = reference_server.url
    good, bad = image_bytes((10, 200, 10)), b"not an image"
    single = httpx.post(f"{url}/infer?top_k=3", files={"image": good})
    assert set(single.json()) == {"class", "score", "top_k", "warning"}
    several = httpx.post(f"{url}/infer", files=[("image", good), ("image", bad), ("image", good)])
    as_json = httpx.post(f"{url}/infer?top_k=2", json={"images": [base64.b64encode(good).decode(), "@@"]})
    for answer in (single, several, as_json):
        assert answer.status_code == 200, answer.text
        _conforms(document, "/infer", "post", answer)
    assert [sorted(item) for item in several.json()["results"]] == [["class", "score"], ["error"], ["class", "score"]]
    assert "error" in as_json.json()["results"][1]
    for failed in (httpx.post(f"{url}/infer", files={"image": bad}), httpx.post(f"{url}/infer?top_k=0", json={})):
        assert failed.status_code in (400, 422)
        _conforms(document, "/infer", "post", failed)
    home = httpx.get(f"{url}/")
    _conforms(document, "/", "get", home)
    assert set(home.json()) == {"status", "model", "warning"}
    with pytest.raises(ValidationError):  # the schemas are strict: an undocumented key fails
        OAS31Validator({"$ref": "#/components/schemas/Home", "components": document["components"]}).validate(
            {**home.json(), "extra": 1}
        )
    top_k = _resolved(document, document["paths"]["/infer"]["post"]["parameters"][0])["schema"]
    assert (top_k["minimum"], top_k["maximum"]) == (1, endpoints.MAX_TOP_K)
    name = home.json()["model"]["name"]
    assert document["components"]["parameters"]["ModelName"]["example"] == name
    images = document["paths"]["/infer"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert images["properties"]["images"]["maxItems"] == Settings().max_images_per_request
    assert "at most 10,485,760 bytes (MAX_UPLOAD_BYTES)" in document["paths"]["/infer"]["post"]["description"]


def test_real_protocol_errors_validate_against_the_documented_schemas(
    reference_server: Server, document: dict[str, Any]
) -> None:
    url, name = reference_server.url, httpx.get(f"{reference_server.url}/").json()["model"]["name"]
    answers = [
        ("/v2/models/{name}", "get", httpx.get(f"{url}/v2/models/nobody"), 404),
        ("/v2/models/{name}/ready", "get", httpx.get(f"{url}/v2/models/{name}/versions/9/ready"), 404),
        ("/v2/models/{name}/infer", "post", httpx.post(f"{url}/v2/models/{name}/infer", json={}), 400),
        ("/v2/models/{name}/infer", "post", httpx.post(f"{url}/v2/models/{name}/infer", content=b"{"), 400),
        ("/v2/repository/models/{name}/load", "post", httpx.post(f"{url}/v2/repository/models/x/load"), 403),
    ]
    for path, method, answer, status in answers:
        assert answer.status_code == status, (path, answer.text)
        assert set(answer.json()) == {"error", "request_id"} and isinstance(answer.json()["error"], str)
        _conforms(document, path, method, answer)


def test_every_answer_documents_and_carries_its_request_id_and_model(
    reference_server: Server, document: dict[str, Any]
) -> None:
    for path, item in document["paths"].items():
        for method, operation in item.items():
            assert {"$ref": "#/components/parameters/RequestId"} in operation["parameters"], (path, method)
            for status, response in operation["responses"].items():
                headers = _resolved(document, response)["headers"]
                assert {"X-Request-ID", "X-Model"} <= set(headers), (path, method, status)
    name = httpx.get(f"{reference_server.url}/").json()["model"]["name"]
    for answer in (
        httpx.get(f"{reference_server.url}/openapi.json", headers={"X-Request-ID": "doc-1"}),
        httpx.post(
            f"{reference_server.url}/infer", files={"image": b"not an image"}, headers={"X-Request-ID": "doc-1"}
        ),
    ):
        assert answer.headers["x-request-id"] == "doc-1" and answer.headers["x-model"].startswith(f"{name}@sha256:")
    schema = document["components"]["headers"]["RequestId"]["schema"]
    OAS31Validator(schema).validate(answer.headers["x-request-id"])
    assert answer.json()["error"]["request_id"] == "doc-1"


def test_with_an_api_key_the_protected_routes_need_the_bearer_scheme(keyed_server: Server) -> None:
    document = httpx.get(f"{keyed_server.url}/openapi.json").json()
    validate(document)
    assert document["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    name = httpx.get(f"{keyed_server.url}/").json()["model"]["name"]
    operations = [(path, method, op) for path, item in document["paths"].items() for method, op in item.items()]
    secured = {path for path, _, op in operations if op.get("security")}
    assert {"/infer", "/metrics"} <= secured and not secured & {"/", "/ping", "/ready", "/docs", "/openapi.json"}
    for path, method, op in operations:
        url = keyed_server.url + path.replace("{name}", name).replace("{version}", "1")
        answer = httpx.request(method, url)
        if path in secured:
            unauthorized = _resolved(document, op["responses"]["401"])
            assert _codes(unauthorized) == {"unauthorized"} and "WWW-Authenticate" in unauthorized["headers"]
            assert answer.status_code == 401 and answer.json()["error"]["code"] == "unauthorized", path
        else:
            assert "401" not in op["responses"] and answer.status_code != 401, path


def test_docs_api_md_lists_every_error_code() -> None:
    table = {
        code
        for line in API_DOC.read_text().splitlines()
        if re.match(r"^\| \d{3} \|", line)
        for code in re.findall(r"`([a-z0-9_]+)`", line.split("|")[2])
    }
    assert {cls.code for cls in _all_errors()} <= table


# What no schema can say, on the inference routes only: that the bytes are an image (400 `invalid_image`), that
# the elements match the shape (400 `invalid_request`), that a text is base64 (422). Every other refusal of a
# request the document admits fails schemathesis's positive_data_acceptance check.
def _schemathesis(server: Server, workdir: Path, examples: int, *extra: str) -> None:
    st = Path(sys.executable).with_name("st")
    config = ROOT / "schemathesis.toml"  # what a bare `st run` from the repository root reads
    command = [str(st), "--config-file", str(config), "run", f"{server.url}/openapi.json", "--checks", "all"]
    command += ["--max-examples", str(examples), "--seed", "7"]
    # A generous per-request timeout: on a busy 2-core machine a slow answer is not a failure of the contract.
    command += ["--request-timeout", "60", "--no-color", "--workers", "1", *extra]
    run = subprocess.run(command, cwd=workdir, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-8000:] + run.stderr[-2000:]
    # Its summary line, e.g. "613 generated, 613 passed, 14 skipped": all generated cases passed.
    summary = re.search(r"(\d+) generated, (\d+) passed", run.stdout)
    assert summary and summary[1] == summary[2] != "0", run.stdout[-4000:]


@pytest.mark.slow
def test_schemathesis_finds_no_failure(tiny_server: Server, tmp_path: Path) -> None:
    # The tiny model keeps each inference and each model load quick; the reference model's answers
    # (with `warning`) are checked against the same schemas above.
    _schemathesis(tiny_server, tmp_path, 25)


@pytest.mark.slow
def test_schemathesis_finds_no_failure_with_an_api_key(keyed_server: Server, tmp_path: Path) -> None:
    # The coverage phase's boundary cases already ran without a key: here the key and the 401s are the point.
    _schemathesis(
        keyed_server, tmp_path, 10, "--phases", "examples,fuzzing", "--header", f"Authorization: Bearer {KEY}"
    )

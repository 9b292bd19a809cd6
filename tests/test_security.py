"""Security settings against a real server: API keys, CORS, and what the responses give away."""

from __future__ import annotations

import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from service.settings import Settings, SettingsError
from tests.helpers import ARTIFACTS, Server, image_bytes, running_service

RED = image_bytes((255, 0, 0))
KEYS = ("first-key-0123456789", "second-key-abcdefghij")


@pytest.fixture(scope="module")
def keyed_server(tiny_artifact: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    folder = tmp_path_factory.mktemp("keys")
    key_file = folder / "keys.txt"
    key_file.write_text(f"# one key a line\n{KEYS[1]}\n\n")
    env = {"API_KEY": KEYS[0], "API_KEY_FILE": str(key_file), "CORS_ORIGINS": "https://app.example, https://b.example"}
    with running_service(tiny_artifact, folder / "server.log", **env) as server:
        yield server


def _unauthorized(response: httpx.Response) -> None:
    assert response.status_code == 401, response.text
    assert response.headers["www-authenticate"].startswith("Bearer")
    assert response.json()["error"]["code"] == "unauthorized"


@pytest.mark.parametrize("route", ["/infer", "/metrics"])
@pytest.mark.parametrize(
    "authorization", [None, "Bearer wrong-key", f"Basic {KEYS[0]}", f"Bearer {KEYS[0]}x", f"Bearer {KEYS[0][:-1]}"]
)
def test_protected_routes_need_a_valid_key(keyed_server: Server, route: str, authorization: str | None) -> None:
    headers = {"authorization": authorization} if authorization else {}
    if route == "/infer":
        response = httpx.post(f"{keyed_server.url}{route}", files={"image": RED}, headers=headers)
    else:
        response = httpx.get(f"{keyed_server.url}{route}", headers=headers)
    _unauthorized(response)


@pytest.mark.parametrize("key", KEYS)
def test_each_configured_key_opens_infer_and_metrics(keyed_server: Server, key: str) -> None:
    headers = {"authorization": f"Bearer {key}"}
    response = httpx.post(f"{keyed_server.url}/infer", files={"image": RED}, headers=headers)
    assert response.status_code == 200 and response.json()["class"] == "red"
    assert httpx.get(f"{keyed_server.url}/metrics", headers=headers).status_code == 200


def test_probes_stay_open_with_a_key(keyed_server: Server) -> None:
    assert httpx.get(f"{keyed_server.url}/ping").json() == {"message": "pong"}
    assert httpx.get(f"{keyed_server.url}/ready").json() == {"ready": True}
    assert httpx.get(f"{keyed_server.url}/").status_code == 200


def test_an_unauthorized_upload_is_read_before_the_401(keyed_server: Server) -> None:
    # urllib writes the whole body before it reads: the 401 must wait for it, or the client sees a reset.
    request = urllib.request.Request(f"{keyed_server.url}/infer", data=b"\x00" * (8 * 1024 * 1024))
    with pytest.raises(urllib.error.HTTPError) as raised:
        urllib.request.urlopen(request, timeout=60)
    raised.value.close()
    assert raised.value.code == 401


def test_cors_preflight_for_an_allowed_origin(keyed_server: Server) -> None:
    headers = {
        "origin": "https://b.example",
        "access-control-request-method": "POST",
        "access-control-request-headers": "authorization, content-type",
    }
    response = httpx.options(f"{keyed_server.url}/infer", headers=headers)
    assert response.status_code == 200, response.text  # answered before any key is asked for
    assert response.headers["access-control-allow-origin"] == "https://b.example"
    assert "POST" in response.headers["access-control-allow-methods"]
    assert "authorization" in response.headers["access-control-allow-headers"].lower()
    simple = httpx.get(f"{keyed_server.url}/ping", headers={"origin": "https://app.example"})
    assert simple.headers["access-control-allow-origin"] == "https://app.example"


def test_cors_refuses_other_origins(keyed_server: Server) -> None:
    headers = {"origin": "https://evil.example", "access-control-request-method": "POST"}
    response = httpx.options(f"{keyed_server.url}/infer", headers=headers)
    assert response.status_code == 400
    assert "access-control-allow-origin" not in response.headers
    # In the service's one error shape, saying what was refused.
    assert response.json()["error"]["code"] == "cors_refused"
    assert response.json()["error"]["message"].startswith("CORS preflight refused (origin)")
    method = {"origin": "https://b.example", "access-control-request-method": "DELETE"}
    refused = httpx.options(f"{keyed_server.url}/infer", headers=method)
    assert refused.status_code == 400 and refused.headers["content-type"] == "application/json"
    assert refused.json()["error"]["message"].startswith("CORS preflight refused (method)")
    simple = httpx.get(f"{keyed_server.url}/ping", headers={"origin": "https://evil.example"})
    assert "access-control-allow-origin" not in simple.headers


def test_without_settings_no_key_and_no_cors(tiny_server: Server) -> None:
    assert httpx.post(f"{tiny_server.url}/infer", files={"image": RED}).status_code == 200
    response = httpx.get(f"{tiny_server.url}/ping", headers={"origin": "https://app.example"})
    assert "access-control-allow-origin" not in response.headers
    preflight = httpx.options(
        f"{tiny_server.url}/infer", headers={"origin": "https://app.example", "access-control-request-method": "POST"}
    )
    assert preflight.status_code == 405


def test_no_response_names_the_server_or_leaks_internals(tiny_server: Server) -> None:
    responses = [
        httpx.get(f"{tiny_server.url}/"),
        httpx.get(f"{tiny_server.url}/ping"),
        httpx.get(f"{tiny_server.url}/metrics"),
        httpx.post(f"{tiny_server.url}/infer", files={"image": RED}),
        httpx.post(f"{tiny_server.url}/infer", files={"image": b"not an image"}),
        httpx.post(f"{tiny_server.url}/infer", content=b"x", headers={"content-type": "text/plain"}),
        httpx.get(f"{tiny_server.url}/no/such/route"),
        httpx.delete(f"{tiny_server.url}/infer"),
    ]
    for response in responses:
        assert "server" not in response.headers, (response.request.url, response.headers)
        if response.status_code >= 400:
            text = response.text
            for leak in ("Traceback", "/work", "site-packages", ".py", "uvicorn", "starlette"):
                assert leak not in text, (response.request.url, text)


def test_key_settings_are_read_and_checked(tmp_path: Path) -> None:
    assert Settings.from_env({}).api_keys == ()
    assert Settings.from_env({"API_KEY": " k1 "}).api_keys == ("k1",)
    keys = tmp_path / "keys"
    keys.write_text("a\n# comment\n\nb\n")
    assert Settings.from_env({"API_KEY": "k1", "API_KEY_FILE": str(keys)}).api_keys == ("k1", "a", "b")
    assert "k1" not in repr(Settings.from_env({"API_KEY": "k1"})), "a key must not reach a log line through repr"
    with pytest.raises(SettingsError, match="API_KEY_FILE"):
        Settings.from_env({"API_KEY_FILE": str(tmp_path / "missing")})
    (tmp_path / "empty").write_text("# nothing\n")
    with pytest.raises(SettingsError, match="no key"):
        Settings.from_env({"API_KEY_FILE": str(tmp_path / "empty")})
    assert Settings.from_env({"CORS_ORIGINS": " https://a.example ,https://b.example,"}).cors_origins == (
        "https://a.example",
        "https://b.example",
    )


def test_the_service_writes_nothing_to_home_or_tmp(tmp_path: Path) -> None:
    # onnxruntime's telemetry wrote a device id under ~/.cache and /tmp/.ses unless ORT_DISABLE_TELEMETRY=1.
    home = tmp_path / "home"
    home.mkdir()
    env = {"HOME": str(home), "TMPDIR": str(home), "XDG_CACHE_HOME": str(home / ".cache")}
    with running_service(ARTIFACTS, tmp_path / "server.log", **env) as server:
        assert httpx.post(f"{server.url}/infer", files={"image": RED}).status_code == 200
    assert sorted(home.rglob("*")) == []

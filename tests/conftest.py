from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import Server, running_service, write_tiny_artifact


@pytest.fixture(scope="session")
def tiny_artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tiny") / "artifact"
    write_tiny_artifact(out)
    return out


@pytest.fixture(scope="module")
def tiny_server(tiny_artifact: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    log = tmp_path_factory.mktemp("logs") / "tiny-server.log"
    # A small upload limit (and discard bound past it) keeps the 413 tests quick.
    env = {
        "MAX_UPLOAD_BYTES": str(2 * 1024 * 1024),
        "MAX_IMAGE_PIXELS": "1000000",
        "MAX_DISCARD_BYTES": str(4 << 20),
        "MAX_DECODE_BYTES": str(2 << 20),
        "MODEL_LOAD": "enabled",  # the load route's hostile inputs are tested too
    }
    with running_service(tiny_artifact, log, **env) as s:
        yield s

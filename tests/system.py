"""Real programs the tests drive (a browser, a load balancer, an OCI engine) and the shared photos.

On a developer's machine a missing program skips its test with the reason. In CI (`CI=true`), where
`scripts/system-deps` installs them, a missing program fails the test instead: nothing skips silently there.
"""

from __future__ import annotations

import os
import shutil

import pytest

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require_executable(name: str) -> str:
    """The program's path; skip (or, in CI, fail) when it is not installed."""
    path = shutil.which(name)
    if path is None:
        message = f"{name} is not installed (bash scripts/system-deps installs it as root)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    return path

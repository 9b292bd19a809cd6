"""`python -m service`: verify the artifact, then serve it with uvicorn."""

from __future__ import annotations

import logging
import sys

import uvicorn

from service.app import create_app
from service.model import ArtifactError, Classifier
from service.settings import Settings, SettingsError


def main() -> int:
    try:
        settings = Settings.from_env()
    except SettingsError as exc:
        print(f"service: bad setting: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=settings.log_level.upper() if settings.log_level != "trace" else "DEBUG",
        format="%(levelname)s:     %(message)s",
    )
    try:
        # Load before uvicorn starts, so a bad artifact is one clear line and a non-zero exit.
        classifier = Classifier.load(settings.model_dir, settings.threads)
    except ArtifactError as exc:
        print(f"service: cannot serve the artifact in {settings.model_dir}: {exc}", file=sys.stderr)
        return 3
    app = create_app(settings, classifier)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=settings.log_level, access_log=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`python -m service`: verify the artifact, then serve it with uvicorn."""

from __future__ import annotations

import logging
import signal
import sys
from types import FrameType

import uvicorn
from starlette.applications import Starlette

from service.app import create_app
from service.model import ArtifactError, Classifier
from service.settings import Settings, SettingsError


class _Server(uvicorn.Server):
    """uvicorn, plus: /ready turns 503 the moment a shutdown starts, and SIGTERM exits 0 once drained.

    uvicorn stops accepting connections and waits for the requests in flight; the lifespan then answers
    whatever is still queued before the workers stop. (Stock uvicorn re-raises the signal at the very end,
    which would make a clean drain look like a kill.)
    """

    def __init__(self, config: uvicorn.Config, app: Starlette) -> None:
        super().__init__(config)
        self._app = app

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self._app.state.ready = False
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True
        else:
            self.should_exit = True


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
        classifier = Classifier.load(settings.model_dir, settings.intra_op_threads)
    except ArtifactError as exc:
        print(f"service: cannot serve the artifact in {settings.model_dir}: {exc}", file=sys.stderr)
        return 3
    app = create_app(settings, classifier)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level, access_log=False)
    _Server(config, app).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())

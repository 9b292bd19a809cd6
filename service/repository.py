"""The model repository: load the artifact in MODEL_DIR again and swap it in, without a restart.

`POST /v2/repository/models/{name}/load` (the Open Inference Protocol's model repository extension, as
Triton has it) and SIGHUP both land in `Repository.load`. The new artifact is verified, loaded and warmed
beside the one serving; only then does the data plane switch to it, in one assignment on the event loop.
Requests already admitted hold the model they started with and finish on it; its sessions are freed when
the last of them is answered. A new artifact that fails any check leaves the old one serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any

from service.errors import LoadFailed, ModelNotFound
from service.inference import DataPlane, release_freed_memory
from service.manifest import Manifest, ManifestError
from service.metrics import Metrics
from service.model import ArtifactError, Classifier
from service.settings import Settings

log = logging.getLogger("service")


@dataclass(frozen=True)
class Loaded:
    model: Classifier
    replaced: Classifier


def describe(model: Classifier) -> str:
    manifest = model.manifest
    return f"{manifest.name!r} (sha256 {manifest.model.sha256[:12]}...)"


class Repository:
    def __init__(self, settings: Settings, plane: DataPlane, metrics: Metrics) -> None:
        self._settings = settings
        self._plane = plane
        self._metrics = metrics
        # One load at a time: a second waits, then loads whatever MODEL_DIR holds by then.
        self._lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()
        self._sighup = False

    def background(self, coroutine: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.get_running_loop().create_task(coroutine, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def widen(self, model: Classifier) -> None:
        """Build `model`'s wide session in the background, off the path to any answer."""
        self.background(self._add_wide_session(model), "wide-session")

    async def _add_wide_session(self, model: Classifier) -> None:
        threads = self._settings.wide_threads
        if threads > 1 and model.wide is None:
            # Only once an answer has gone out and the engine is idle: building a session holds the GIL for
            # much of its 0.2 s, and built beside the first request it made that answer 0.25 s slower
            # (launch to first answer 1.31 s against 0.96 s, interleaved launches on the AMD EPYC).
            await self._plane.settled()
            try:
                await asyncio.to_thread(model.add_wide_session, threads)
                # A swap freed the old model's sessions just before this one was built.
                await asyncio.to_thread(release_freed_memory)
            except Exception:  # the narrow session serves on; a wide one is only faster for a lone request
                log.exception("could not build the %d-thread session; every run stays on one core", threads)
        if model is not self._plane.model:  # swapped out while its wide session was being built
            model.wide = None
            return
        self._metrics.session_threads.labels("wide").set(model.wide_threads)

    async def load(self, name: str | None = None) -> Loaded:
        """Load MODEL_DIR's artifact and serve it. `name`: the model the caller expects to find there."""
        model_dir = self._settings.model_dir
        async with self._lock:
            serving = self._plane.model
            if name is not None:
                try:
                    found = Manifest.read(model_dir).name
                except ManifestError as exc:
                    self._metrics.model_loads.labels("failed").inc()
                    raise LoadFailed(f"cannot load {name!r}: {exc}; still serving {describe(serving)}") from None
                if found != name:
                    raise ModelNotFound(f"the repository (MODEL_DIR={model_dir}) holds model {found!r}, not {name!r}")
            try:
                model = await asyncio.to_thread(Classifier.load, model_dir, self._settings.intra_op_threads, warm=True)
            except ArtifactError as exc:
                self._metrics.model_loads.labels("failed").inc()
                log.error("model load from %s failed, still serving %s: %s", model_dir, describe(serving), exc)
                raise LoadFailed(
                    f"cannot load the artifact in {model_dir}: {exc}; still serving {describe(serving)}"
                ) from None
            replaced = self._plane.swap(model)
            self._metrics.describe_model(model.manifest)
            self._metrics.session_threads.labels("wide").set(0)
            self._metrics.model_loads.labels("loaded").inc()
            log.info("now serving %s from %s (was %s)", describe(model), model_dir, describe(replaced))
            self.widen(model)
            return Loaded(model, replaced)

    def listen_for_sighup(self) -> None:
        """SIGHUP loads MODEL_DIR again (only where the loop may own signals: the main thread)."""
        with contextlib.suppress(ValueError, RuntimeError, NotImplementedError):
            asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, self._on_sighup)
            self._sighup = True

    def _on_sighup(self) -> None:
        log.info("SIGHUP: loading the artifact in %s again", self._settings.model_dir)
        self.background(self._load_quietly(), "sighup-load")

    async def _load_quietly(self) -> None:
        with contextlib.suppress(LoadFailed):  # logged by load(); the old model serves on
            await self.load()

    async def close(self) -> None:
        """Stop the background work: a server that is stopping needs no wide session and no new model. (Waited
        for instead, a wide session that waits for a first answer kept a server that never answered one from
        ever exiting: SIGTERM before any request, or a port already in use.)"""
        if self._sighup:
            asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
        while self._tasks:
            for task in self._tasks:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)

"""The data plane: what every protocol does, whichever brought the request.

Every protocol's endpoints (service/endpoints.py, service/oip.py) only translate their request into a call
here and the answer back. Here: readiness, finding the model a request names and its metadata, the most images
one request may carry, the deadline, and inference: the model a request is served by (pinned when its images
are in, so a hot swap never changes it halfway), admission, decoding (just ahead of the engine), the scheduler
and the client leaving.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from service import record
from service.admission import Admission
from service.deadline import Deadline
from service.errors import ModelNotFound, NotReady, PayloadTooLarge, ServiceError
from service.imaging import preprocess
from service.memory import trim_heap
from service.metrics import Metrics
from service.model import Classifier
from service.record import RequestRecord
from service.scheduler import Decode, Scheduler, most_held
from service.settings import Settings
from service.waiter import Gone

VERSION = "1"  # one version at a time: a load replaces it
PLATFORM = "onnxruntime_onnx"
# The model's inputs as the service takes them: encoded images, or pixels already preprocessed (channels last).
IMAGE_INPUT = "image"
PIXELS_INPUT = "pixels"
OUTPUT = "probabilities"
UNTRAINED_SHORT = "untrained reference model: this class is not a real prediction"
NOT_READY = "the model is not loaded yet, or the server is shutting down"


def _free(model: Classifier) -> None:
    model.close()
    asyncio.get_running_loop().run_in_executor(None, release_freed_memory)


def release_freed_memory() -> None:
    """Hand what the process has freed back to the system. glibc keeps memory that onnxruntime frees in its
    arenas: without this, RSS grew by 10-18 MB with each swap of the committed artifact; with it, it stayed
    flat (6 swaps in-process)."""
    import gc

    gc.collect()  # the sessions' Python wrappers can sit in reference cycles until the next full collection
    trim_heap()


@dataclass(frozen=True)
class Answer:
    """What one request got: the model that answered it, and per image its probabilities or its error."""

    model: Classifier
    results: list[np.ndarray | ServiceError]


class DataPlane:
    """Health, model lookup, metadata and inference for every protocol. Made with the app; serving from the
    lifespan's `start` (model loaded and warmed) until a shutdown begins."""

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings = settings
        self.ready = False
        self._model: Classifier | None = None
        self._scheduler: Scheduler | None = None
        # Room for all the scheduler can hold: past that a request is refused before its body.
        self.admission = Admission(most_held(settings.max_queue, settings.workers, settings.max_batch))
        self._metrics = metrics
        # Requests in progress per model (by id), and models swapped out that some of them still use.
        self._users: dict[int, int] = {}
        self._retired: dict[int, Classifier] = {}

    def start(self, model: Classifier, scheduler: Scheduler) -> None:
        self._model, self._scheduler = model, scheduler
        self.ready = True

    @property
    def model(self) -> Classifier:
        """The model serving now."""
        if self._model is None:
            raise NotReady(NOT_READY)
        return self._model

    @property
    def scheduler(self) -> Scheduler:
        if self._scheduler is None:
            raise NotReady(NOT_READY)
        return self._scheduler

    @property
    def tag(self) -> str:
        """The model serving now as answers name it (X-Model); empty before one is."""
        return self._model.tag if self._model is not None else ""

    def check_ready(self) -> None:
        """503 unless the model is loaded and warmed and no shutdown has begun."""
        if not self.ready:
            raise NotReady(NOT_READY)

    def find(self, name: str, version: str | None = None) -> Classifier:
        """The model `name` (and `version`, if given), if it is the one served; else 404."""
        model = self.model
        if name != model.manifest.name:
            raise ModelNotFound(f"unknown model {name!r}: this server serves {model.manifest.name!r}")
        if version is not None and version != VERSION:
            raise ModelNotFound(f"model {name!r} has no version {version!r}; it serves version {VERSION}")
        return model

    def metadata(self, name: str, version: str | None = None) -> dict[str, object]:
        """The model's name, versions, platform and tensors (the Open Inference Protocol's model metadata)."""
        model = self.find(name, version)
        spec = model.manifest.preprocessing
        return {
            "name": model.manifest.name,
            "versions": [VERSION],
            "platform": PLATFORM,
            "inputs": [
                {"name": IMAGE_INPUT, "datatype": "BYTES", "shape": [-1]},
                {"name": PIXELS_INPUT, "datatype": "FP32", "shape": [-1, spec.height, spec.width, 3]},
            ],
            "outputs": [{"name": OUTPUT, "datatype": "FP32", "shape": [-1, len(model.labels)]}],
        }

    @property
    def max_images(self) -> int:
        """Images one request may carry: MAX_IMAGES_PER_REQUEST, and never more than the queue can take at once."""
        return min(self.settings.max_images_per_request, self.scheduler.capacity)

    def check_count(self, count: int) -> None:
        """413 for a request of more images than one request may carry: the one place this is decided."""
        limit = self.settings.max_images_per_request
        if count > limit:
            raise PayloadTooLarge(f"{count} images in one request; the limit is {limit} (MAX_IMAGES_PER_REQUEST)")
        if count > self.max_images:  # the queue is the smaller bound
            raise PayloadTooLarge(
                f"{count} images in one request; the inference queue takes {self.max_images} (MAX_QUEUE)"
            )

    def deadline(self) -> Deadline:
        """When a request that arrives now must be answered."""
        return Deadline.after(self.settings.request_timeout_s, "REQUEST_TIMEOUT_S")

    def swap(self, model: Classifier) -> Classifier:
        """Serve `model` from the next request on; requests already admitted finish on the one returned, whose
        sessions are freed when the last of them is answered (at once if none is in progress)."""
        old, self._model = self.model, model
        if self._users.get(id(old)):
            self._retired[id(old)] = old
        else:
            _free(old)
        return old

    @contextlib.contextmanager
    def _pinned(self, request: RequestRecord | None) -> Iterator[Classifier]:
        """The model serving now, for the whole of one request, whatever a swap does meanwhile."""
        model = self.model
        if request is not None:
            request.model = model.tag
        key = id(model)
        self._users[key] = self._users.get(key, 0) + 1
        try:
            yield model
        finally:
            self._users[key] -= 1
            if not self._users[key]:
                del self._users[key]
                retired = self._retired.pop(key, None)
                if retired is not None:
                    _free(retired)

    async def settled(self) -> None:
        """Once an answer has gone out and the engine is idle (see Scheduler.settled)."""
        await self.scheduler.settled()

    async def classify(self, images: Sequence[bytes | ServiceError], deadline: Deadline, gone: Gone | None) -> Answer:
        """Encoded images -> probabilities, each image decoded as the model it is served by expects."""
        self.check_count(len(images))
        encoded = {i: item for i, item in enumerate(images) if isinstance(item, bytes)}
        results: list[np.ndarray | ServiceError] = [
            item if isinstance(item, ServiceError) else np.empty(0) for item in images
        ]
        if not encoded:
            return Answer(self.model, results)
        request = record.current.get()
        with self.admission.admit(len(encoded)), self._pinned(request) as model:
            # Queued encoded: the scheduler decodes each image (in a thread, never on the event loop) just ahead
            # of the engine, so waiting images cost their bytes, not their pixels.
            decoders = [functools.partial(self._decode, data, model, request) for data in encoded.values()]
            rows = await self._infer(model, decoders, deadline, gone, request)
            for i, row in zip(encoded, rows, strict=True):
                results[i] = row
        return Answer(model, results)

    async def classify_pixels(self, pixels: np.ndarray, deadline: Deadline, gone: Gone | None) -> Answer:
        """Preprocessed (N, height, width, 3) float32 pixels -> probabilities."""
        self.check_count(len(pixels))
        request = record.current.get()
        with self.admission.admit(len(pixels)), self._pinned(request) as model:
            rows = await self._infer(model, list(pixels), deadline, gone, request)
        return Answer(model, rows)

    def _decode(self, data: bytes, model: Classifier, request: RequestRecord | None) -> np.ndarray | ServiceError:
        """Blocking: the scheduler calls it in a decode thread, or on an inference thread just before the run."""
        started = time.perf_counter()
        seen: list[tuple[str | None, tuple[int, int]]] = []
        try:
            pixels = preprocess(
                data,
                model.manifest.preprocessing,
                self.settings.max_image_pixels,
                self.settings.max_decode_bytes,
                lambda image: seen.append((image.format, image.size)),
            )
        except ServiceError as exc:
            if request is not None:
                request.decoded(started, time.perf_counter())
            return exc
        ended = time.perf_counter()
        self._metrics.decode.observe(ended - started)
        ((image_format, (width, height)),) = seen
        self._metrics.observe_input(image_format, width * height, len(data))
        if request is not None:
            request.decoded(started, ended)
        return pixels

    async def _infer(
        self,
        model: Classifier,
        pixels: Sequence[np.ndarray | Decode],
        deadline: Deadline,
        gone: Gone | None,
        request: RequestRecord | None,
    ) -> list[np.ndarray | ServiceError]:
        if deadline.remaining() <= 0:
            raise deadline.exceeded()
        if request is None:
            return await self.scheduler.infer(model, pixels, deadline, gone)
        request.images += len(pixels)
        try:
            return await self.scheduler.infer(model, pixels, deadline, gone, record=request)
        finally:
            request.answered = time.perf_counter()

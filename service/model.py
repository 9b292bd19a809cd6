"""The model runtime: load a verified artifact into onnxruntime and classify arrays. Knows nothing of HTTP."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from service.manifest import Manifest, ManifestError, read_labels, sha256_file
from service.memory import trim_heap
from service.record import header_text

log = logging.getLogger(__name__)


class ArtifactError(RuntimeError):
    """The artifact cannot be served: missing, corrupt, or inconsistent with its manifest."""


@dataclass(frozen=True)
class Scored:
    label: str
    score: float


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    probabilities: np.ndarray = exp / exp.sum(axis=-1, keepdims=True)
    return probabilities


def ranked(probabilities: np.ndarray, k: int) -> list[int]:
    """The indices of the `k` highest scores, highest first: a tie in index order, a NaN after every number. One
    rule for /infer, its top_k and OIP's classification, so they never name different classes."""
    if k == 1:
        # One C call where it settles the answer (argmax takes the first of a tie, but a NaN would win it): on
        # the event loop just after a run has had both cores, a sort's Python wrappers took 0.085 ms of a lone
        # request.
        first = int(probabilities.argmax())
        if not math.isnan(probabilities[first]):
            return [first]
    order = np.argsort(-probabilities, kind="stable")  # NaN sorts last; equal scores keep their index order
    return [int(i) for i in order[:k]]


def session_options(threads: int, *, spinning: bool = False) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # INT8 needs at least EXTENDED to fuse QDQ pairs into QLinear kernels. ALL is applied here, at load,
    # for this machine's CPU; the shipped file itself stays portable.
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Idle intra-op threads spin by default, stealing the cores that decoding needs: with JPEG decoding
    # alongside, 1 worker x 2 threads ran 12.4 img/s spinning, 20.5 not. Only the wide session, which runs a
    # request that is alone, spins: there no decoding competes, and a spinning thread joins a run sooner.
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    if spinning:
        # Spinning between a run's operators, not between runs: a lone request's idle wide thread would spin
        # on through the next request's HTTP and decoding. 6.5-8.7 ms less CPU per lone request in that thread
        # (22-27%; a pod's CPU limit counts it), latency the same within the spread.
        options.add_session_config_entry("session.force_spinning_stop", "1")
    # A memory pattern reserves one block per concurrent run for all of a run's tensors; without it, runs take
    # tensors from the shared arena and reuse each other's freed chunks: 6-7 MB less with two runs side by side,
    # the same CPU per run (narrow 32.7-33.8 vs 28.9-34.4 ms; wide lone run 26.1/24.7 vs 26.6/24.5 ms).
    options.enable_mem_pattern = False
    options.log_severity_level = 3
    return options


def _shape_accepts(shape: list[int | str | None], given: tuple[int | None, ...]) -> bool:
    """Whether an input of onnxruntime's declared `shape` takes arrays of shape `given` (None: any batch)."""
    if len(shape) != len(given):
        return False
    return all(not isinstance(dim, int) or want is None or dim == want for dim, want in zip(shape, given, strict=True))


def _session(model_path: Path, threads: int, *, spinning: bool = False) -> ort.InferenceSession:
    try:
        options = session_options(threads, spinning=spinning)
        return ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types for unreadable graphs
        raise ArtifactError(f"onnxruntime cannot load {model_path}: {exc}") from None


class Classifier:
    """A verified artifact in onnxruntime: a narrow session (one run per core) and, once built, a wide one.

    The wide session's runs use every core: the scheduler gives it a request that is alone, so a lone request
    is answered as fast as the engine allows, while requests side by side each get one core (narrow).
    """

    def __init__(
        self, session: ort.InferenceSession, manifest: Manifest, labels: list[str], model_path: Path | None = None
    ) -> None:
        self.session = session
        self.manifest = manifest
        self.labels = labels
        self.model_path = model_path
        self._input = manifest.input.name
        self._output = manifest.output.name
        self.warmed = False
        self.wide: ort.InferenceSession | None = None
        # Names it on every answer (X-Model) and in the access log: a hot swap shows in both.
        self.tag = header_text(f"{manifest.name}@sha256:{manifest.model.sha256[:12]}")

    @classmethod
    def load(cls, model_dir: Path, threads: int, *, warm: bool = False) -> Classifier:
        try:
            manifest = Manifest.read(model_dir)
            labels = read_labels(model_dir, manifest.labels)
        except ManifestError as exc:
            raise ArtifactError(str(exc)) from None
        model_path = model_dir / manifest.model.file
        if not model_path.is_file():
            raise ArtifactError(f"model file {model_path} named by the manifest does not exist")
        digest = sha256_file(model_path)
        if digest != manifest.model.sha256:
            raise ArtifactError(
                f"model file {model_path} has sha256 {digest[:12]}..., the manifest says "
                f"{manifest.model.sha256[:12]}...: the artifact is corrupt or was changed after export"
            )
        classifier = cls(_session(model_path, threads), manifest, labels, model_path)
        classifier._check_signature()
        if warm:
            classifier.warm_up()
        trim_heap()
        return classifier

    def _check_signature(self) -> None:
        inputs = self.session.get_inputs()
        if [i.name for i in inputs] != [self._input]:
            raise ArtifactError(
                f"the model's inputs are {[i.name for i in inputs]}, the manifest says [{self._input!r}]"
            )
        height, width, channels = self.input_shape
        nchw = self.manifest.input.layout == "NCHW"
        expected = (None, channels, height, width) if nchw else (None, height, width, channels)
        if not _shape_accepts(inputs[0].shape, expected):
            raise ArtifactError(
                f"the model's input {self._input!r} has shape {inputs[0].shape}, but the manifest's preprocessing "
                f"makes {self.manifest.input.layout} batches of shape {['N', *expected[1:]]}"
            )
        outputs = {o.name: o for o in self.session.get_outputs()}
        if self._output not in outputs:
            raise ArtifactError(f"the model has no output {self._output!r} (it has {sorted(outputs)})")
        shape = outputs[self._output].shape
        classes = shape[-1] if shape else None
        if isinstance(classes, int) and classes != len(self.labels):
            raise ArtifactError(f"the model has {classes} outputs but the labels file has {len(self.labels)} names")

    @property
    def input_shape(self) -> tuple[int, int, int]:
        spec = self.manifest.preprocessing
        return (spec.height, spec.width, 3)

    def add_wide_session(self, threads: int) -> None:
        """Build and warm the session whose runs use `threads` cores; until it is ready, every run is narrow."""
        if self.model_path is None or threads <= 1:
            return
        # With its arena: without one it kept 10 MiB less but ran a lone request 15% slower (45.9 vs 40.3 ms
        # median, engine alone, interleaved, AMD EPYC).
        wide = _session(self.model_path, threads, spinning=True)
        self._run(wide, np.zeros((1, *self.input_shape), dtype=np.float32))
        self.wide = wide

    @property
    def wide_threads(self) -> int:
        """Intra-op threads of the wide session; 0 while there is none."""
        return self.wide.get_session_options().intra_op_num_threads if self.wide is not None else 0

    def predict(self, batch: np.ndarray, wide: bool = False) -> np.ndarray:
        """(N, height, width, 3) float32 -> (N, classes) probabilities, on every core if `wide` and ready."""
        return self._run(self.wide if wide and self.wide is not None else self.session, batch)

    def _run(self, session: ort.InferenceSession, batch: np.ndarray) -> np.ndarray:
        if self.manifest.input.layout == "NCHW":
            batch = np.ascontiguousarray(batch.transpose(0, 3, 1, 2))
        (out,) = session.run([self._output], {self._input: batch})
        out = np.asarray(out, dtype=np.float32)
        return softmax(out) if self.manifest.output.kind == "logits" else out

    def top(self, probabilities: np.ndarray, k: int) -> list[Scored]:
        return [Scored(self.labels[i], float(probabilities[i])) for i in ranked(probabilities, k)]

    def close(self) -> None:
        """Free the sessions now (a model swapped out, once no request needs it), whoever still holds this object."""
        self.wide = None
        del self.session

    def warm_up(self) -> None:
        """One run on a blank image: the first run allocates and plans, so pay for it before the first client."""
        try:
            self.predict(np.zeros((1, *self.input_shape), dtype=np.float32))
        except Exception as exc:  # onnxruntime's own exception types: a graph that loads but cannot run
            raise ArtifactError(f"the model failed its first run on a blank {self.input_shape} image: {exc}") from None
        self.warmed = True

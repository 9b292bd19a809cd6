"""The artifact manifest: the one contract between the export and the service.

The export writes it through `Manifest.to_dict()`, the service reads it through `Manifest.from_dict()`;
both halves import this module, and it imports nothing heavier than the standard library, so the
TensorFlow-free service and the TensorFlow export agree on one definition.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1
MANIFEST_FILE = "manifest.json"

RESIZE_FILTERS = ("bilinear_tf", "bilinear", "bicubic", "nearest", "lanczos", "box", "hamming")
LAYOUTS = ("NHWC", "NCHW")
DTYPES = ("float32",)
OUTPUT_KINDS = ("probabilities", "logits")
QUANTIZATIONS = ("fp32", "dynamic_int8", "static_int8", "static_int8_u8")


class ManifestError(ValueError):
    """The manifest is missing, unreadable, or does not follow the schema."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        # Large chunks: at start-up this runs on the loader thread while the main thread imports the web stack,
        # and each read and update gives up the GIL and waits up to the 5 ms switch interval to get it back. In
        # 1 MiB chunks the loader ended 23 ms later; launch to first answer 0.923 of that in 16 MiB chunks.
        for chunk in iter(lambda: f.read(1 << 24), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _get(data: Mapping[str, Any], key: str, kind: type, where: str) -> Any:
    if key not in data:
        raise ManifestError(f"{where}: missing key {key!r}")
    value = data[key]
    # bool is an int subclass: never let `true` pass for a count.
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
        raise ManifestError(f"{where}.{key}: expected {kind.__name__}, got {type(value).__name__}")
    return value


def _one_of(value: str, allowed: tuple[str, ...], where: str) -> str:
    if value not in allowed:
        raise ManifestError(f"{where}: {value!r} is not one of {', '.join(allowed)}")
    return value


@dataclass(frozen=True)
class ModelFile:
    file: str
    sha256: str
    bytes: int
    opset: int
    quantization: str

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ModelFile:
        w = "model"
        return cls(
            file=_get(d, "file", str, w),
            sha256=_get(d, "sha256", str, w),
            bytes=_get(d, "bytes", int, w),
            opset=_get(d, "opset", int, w),
            quantization=_one_of(_get(d, "quantization", str, w), QUANTIZATIONS, f"{w}.quantization"),
        )


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int | None, ...]
    layout: str
    dtype: str

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TensorSpec:
        w = "input"
        shape = _get(d, "shape", list, w)
        if len(shape) != 4 or not all(s is None or (isinstance(s, int) and s > 0) for s in shape):
            raise ManifestError(f"{w}.shape: expected 4 dimensions (positive ints or null), got {shape}")
        return cls(
            name=_get(d, "name", str, w),
            shape=tuple(shape),
            layout=_one_of(_get(d, "layout", str, w), LAYOUTS, f"{w}.layout"),
            dtype=_one_of(_get(d, "dtype", str, w), DTYPES, f"{w}.dtype"),
        )


@dataclass(frozen=True)
class OutputSpec:
    name: str
    kind: str

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> OutputSpec:
        return cls(
            name=_get(d, "name", str, "output"),
            kind=_one_of(_get(d, "kind", str, "output"), OUTPUT_KINDS, "output.kind"),
        )


@dataclass(frozen=True)
class Preprocessing:
    """How image bytes become the model's input; the export measures it against its training pipeline."""

    height: int
    width: int
    resize: str = "bilinear_tf"
    # Pixel values 0..255 are mapped linearly onto this range. Keras EfficientNetV2 rescales inside the
    # network, so its models take raw 0..255.
    value_range: tuple[float, float] = (0.0, 255.0)
    # Decode large JPEGs at a reduced DCT scale (never below the model's input size): ~1.5x faster decode.
    jpeg_draft: bool = True
    # What shows through transparent pixels.
    background: tuple[int, int, int] = (255, 255, 255)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Preprocessing:
        w = "preprocessing"
        height, width = _get(d, "height", int, w), _get(d, "width", int, w)
        if height <= 0 or width <= 0:
            raise ManifestError(f"{w}: height and width must be positive")
        lo, hi = _get(d, "value_range", list, w)
        background = tuple(_get(d, "background", list, w))
        if len(background) != 3 or not all(isinstance(c, int) and 0 <= c <= 255 for c in background):
            raise ManifestError(f"{w}.background: expected three ints in 0..255")
        return cls(
            height=height,
            width=width,
            resize=_one_of(_get(d, "resize", str, w), RESIZE_FILTERS, f"{w}.resize"),
            value_range=(float(lo), float(hi)),
            jpeg_draft=_get(d, "jpeg_draft", bool, w),
            background=(int(background[0]), int(background[1]), int(background[2])),
        )


@dataclass(frozen=True)
class Labels:
    file: str
    count: int
    sha256: str

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Labels:
        w = "labels"
        return cls(file=_get(d, "file", str, w), count=_get(d, "count", int, w), sha256=_get(d, "sha256", str, w))


@dataclass(frozen=True)
class Manifest:
    name: str
    description: str
    trained: bool
    created_at: str
    model: ModelFile
    input: TensorSpec
    output: OutputSpec
    preprocessing: Preprocessing
    labels: Labels
    # Provenance and the export report (source model, tool versions, parity, variants): recorded for
    # people and benchmarks; the service only displays it.
    source: dict[str, Any] = field(default_factory=dict)
    export: dict[str, Any] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Manifest:
        if not isinstance(d, Mapping):
            raise ManifestError("manifest: expected a JSON object")
        version = _get(d, "schema_version", int, "manifest")
        if version != SCHEMA_VERSION:
            raise ManifestError(
                f"manifest: schema_version {version} is not supported (this service reads {SCHEMA_VERSION})"
            )
        return cls(
            name=_get(d, "name", str, "manifest"),
            description=_get(d, "description", str, "manifest"),
            trained=_get(d, "trained", bool, "manifest"),
            created_at=_get(d, "created_at", str, "manifest"),
            model=ModelFile.from_dict(_get(d, "model", dict, "manifest")),
            input=TensorSpec.from_dict(_get(d, "input", dict, "manifest")),
            output=OutputSpec.from_dict(_get(d, "output", dict, "manifest")),
            preprocessing=Preprocessing.from_dict(_get(d, "preprocessing", dict, "manifest")),
            labels=Labels.from_dict(_get(d, "labels", dict, "manifest")),
            source=dict(d.get("source", {})),
            export=dict(d.get("export", {})),
            schema_version=version,
        )

    def to_dict(self) -> dict[str, Any]:
        # JSON has no tuples; keep the on-disk form plain lists.
        plain: dict[str, Any] = json.loads(json.dumps(asdict(self)))
        return plain

    @classmethod
    def read(cls, model_dir: Path) -> Manifest:
        path = model_dir / MANIFEST_FILE
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise ManifestError(f"no manifest at {path}: export a model first (python -m export --help)") from exc
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ManifestError(f"cannot read {path}: {exc}") from exc
        return cls.from_dict(data)

    def write(self, model_dir: Path) -> Path:
        path = model_dir / MANIFEST_FILE
        path.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n", encoding="utf-8")
        return path


def read_labels(model_dir: Path, labels: Labels) -> list[str]:
    """Read and verify the labels file named by the manifest."""
    path = model_dir / labels.file
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ManifestError(f"cannot read labels file {path}: {exc}") from exc
    if hashlib.sha256(raw).hexdigest() != labels.sha256:
        raise ManifestError(f"labels file {path} does not match the sha256 in the manifest")
    names = raw.decode("utf-8").splitlines()
    if len(names) != labels.count:
        raise ManifestError(f"labels file {path} has {len(names)} names, the manifest says {labels.count}")
    return names

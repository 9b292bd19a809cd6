"""The manifest, the contract between the export and the service: every way it can be wrong is refused by name."""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from service.manifest import (
    MANIFEST_FILE,
    SCHEMA_VERSION,
    Labels,
    Manifest,
    ManifestError,
    Preprocessing,
    read_labels,
    sha256_file,
)
from service.model import ArtifactError, Classifier


@pytest.fixture(scope="module")
def document(tiny_artifact: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((tiny_artifact / MANIFEST_FILE).read_text())
    return data


def _edited(document: dict[str, Any], edit: Callable[[dict[str, Any]], object]) -> dict[str, Any]:
    changed = copy.deepcopy(document)
    edit(changed)
    return changed


def test_round_trip_is_exact(document: dict[str, Any]) -> None:
    manifest = Manifest.from_dict(document)
    assert manifest.to_dict() == document
    assert manifest.schema_version == SCHEMA_VERSION == 1
    assert manifest.input.shape == (None, 8, 8, 3) and manifest.input.layout == "NHWC"
    assert manifest.input.name == "input" and manifest.input.dtype == "float32"
    assert manifest.output.name == "probabilities" and manifest.output.kind == "probabilities"
    assert manifest.preprocessing == Preprocessing(height=8, width=8)
    assert manifest.labels.count == 4 and manifest.labels.file == "labels.txt"
    assert manifest.model.quantization == "fp32" and manifest.model.opset == 18
    assert manifest.trained is True and manifest.name == "tiny-colour-classifier"


def test_defaults_of_preprocessing() -> None:
    spec = Preprocessing(height=3, width=4)
    assert spec.resize == "bilinear_tf"
    assert spec.value_range == (0.0, 255.0)
    assert spec.jpeg_draft is True
    assert spec.background == (255, 255, 255)


def test_optional_sections_default_to_empty(document: dict[str, Any]) -> None:
    bare = _edited(document, lambda m: (m.pop("source", None), m.pop("export", None)))
    manifest = Manifest.from_dict(bare)
    assert manifest.source == {} and manifest.export == {}
    kept = Manifest.from_dict(_edited(document, lambda m: m.update(source={"a": 1}, export={"b": [2]})))
    assert kept.source == {"a": 1} and kept.export == {"b": [2]}


def test_preprocessing_values_are_read(document: dict[str, Any]) -> None:
    def edit(m: dict[str, Any]) -> None:
        m["preprocessing"].update(
            height=30, width=40, resize="lanczos", value_range=[-1, 1], jpeg_draft=False, background=[1, 2, 3]
        )

    spec = Manifest.from_dict(_edited(document, edit)).preprocessing
    assert spec == Preprocessing(30, 40, "lanczos", (-1.0, 1.0), False, (1, 2, 3))
    assert isinstance(spec.value_range[0], float) and isinstance(spec.background, tuple)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda m: m.pop("name"), "manifest: missing key 'name'"),
        (lambda m: m.update(name=3), "manifest.name: expected str, got int"),
        (lambda m: m.update(trained="yes"), "manifest.trained: expected bool, got str"),
        (lambda m: m.update(schema_version=2), "manifest: schema_version 2 is not supported (this service reads 1)"),
        (lambda m: m.update(schema_version=True), "manifest.schema_version: expected int, got bool"),
        (lambda m: m.update(model=[]), "manifest.model: expected dict, got list"),
        (lambda m: m["model"].update(bytes=True), "model.bytes: expected int, got bool"),
        (lambda m: m["model"].update(opset="17"), "model.opset: expected int, got str"),
        (lambda m: m["model"].pop("sha256"), "model: missing key 'sha256'"),
        (lambda m: m["model"].update(quantization="int4"), "model.quantization: 'int4' is not one of fp32, "),
        (lambda m: m["input"].update(shape=[None, 8, 8]), "input.shape: expected 4 dimensions"),
        (lambda m: m["input"].update(shape=[None, 8, 0, 3]), "input.shape: expected 4 dimensions"),
        (lambda m: m["input"].update(shape=[None, 8, "8", 3]), "input.shape: expected 4 dimensions"),
        (lambda m: m["input"].update(shape=[None, 8, -8, 3]), "(positive ints or null), got [None, 8, -8, 3]"),
        (lambda m: m["input"].update(shape="1x8x8x3"), "input.shape: expected list, got str"),
        (lambda m: m["input"].update(layout="NWHC"), "input.layout: 'NWHC' is not one of NHWC, NCHW"),
        (lambda m: m["input"].update(dtype="float16"), "input.dtype: 'float16' is not one of float32"),
        (lambda m: m["input"].pop("name"), "input: missing key 'name'"),
        (lambda m: m["output"].update(kind="scores"), "output.kind: 'scores' is not one of probabilities, logits"),
        (lambda m: m["output"].pop("name"), "output: missing key 'name'"),
        (lambda m: m["preprocessing"].update(height=0), "preprocessing: height and width must be positive"),
        (lambda m: m["preprocessing"].update(width=-1), "preprocessing: height and width must be positive"),
        (lambda m: m["preprocessing"].update(resize="cubic"), "preprocessing.resize: 'cubic' is not one of"),
        (lambda m: m["preprocessing"].update(background=[1, 2]), "preprocessing.background: expected three ints"),
        (lambda m: m["preprocessing"].update(background=[1, 2, 256]), "expected three ints in 0..255"),
        (lambda m: m["preprocessing"].update(background=[-1, 2, 3]), "expected three ints in 0..255"),
        (lambda m: m["preprocessing"].update(background=[1.5, 2, 3]), "expected three ints in 0..255"),
        (lambda m: m["preprocessing"].update(jpeg_draft=1), "preprocessing.jpeg_draft: expected bool, got int"),
        (lambda m: m["preprocessing"].pop("value_range"), "preprocessing: missing key 'value_range'"),
        (lambda m: m["labels"].update(count="4"), "labels.count: expected int, got str"),
        (lambda m: m["labels"].pop("file"), "labels: missing key 'file'"),
        (lambda m: m["labels"].pop("sha256"), "labels: missing key 'sha256'"),
        (lambda m: m.pop("created_at"), "manifest: missing key 'created_at'"),
        (lambda m: m.pop("description"), "manifest: missing key 'description'"),
        # A wrong type names the key where it lives, for every key.
        (lambda m: m["model"].update(file=1), "model.file: expected str, got int"),
        (lambda m: m["model"].update(quantization=8), "model.quantization: expected str, got int"),
        (lambda m: m["input"].update(layout=None), "input.layout: expected str, got NoneType"),
        (lambda m: m["input"].update(dtype=4), "input.dtype: expected str, got int"),
        (lambda m: m["output"].update(kind=[]), "output.kind: expected str, got list"),
        (lambda m: m["preprocessing"].update(height="8"), "preprocessing.height: expected int, got str"),
        (lambda m: m["preprocessing"].update(width=8.0), "preprocessing.width: expected int, got float"),
        (lambda m: m["preprocessing"].update(width=0), "preprocessing: height and width must be positive"),
        (lambda m: m["preprocessing"].update(background="white"), "preprocessing.background: expected list, got str"),
        (lambda m: m["preprocessing"].update(resize=1), "preprocessing.resize: expected str, got int"),
        (lambda m: m.update(input=[]), "manifest.input: expected dict, got list"),
        (lambda m: m.update(output="x"), "manifest.output: expected dict, got str"),
        (lambda m: m.update(preprocessing=None), "manifest.preprocessing: expected dict, got NoneType"),
        (lambda m: m.update(labels=4), "manifest.labels: expected dict, got int"),
    ],
)
def test_each_schema_violation_is_named(
    document: dict[str, Any], edit: Callable[[dict[str, Any]], object], message: str
) -> None:
    with pytest.raises(ManifestError) as caught:
        Manifest.from_dict(_edited(document, edit))
    assert message in str(caught.value)


@pytest.mark.parametrize("value", [[], "a string", 3, None])
def test_a_manifest_that_is_not_a_json_object(value: object) -> None:
    with pytest.raises(ManifestError) as caught:
        Manifest.from_dict(value)  # type: ignore[arg-type]
    assert str(caught.value) == "manifest: expected a JSON object"


def test_the_smallest_valid_values_are_accepted(document: dict[str, Any]) -> None:
    def edit(m: dict[str, Any]) -> None:
        m["input"].update(shape=[1, 1, 1, 3])
        m["preprocessing"].update(height=1, width=1, background=[0, 0, 0])

    manifest = Manifest.from_dict(_edited(document, edit))
    assert manifest.input.shape == (1, 1, 1, 3)
    assert (manifest.preprocessing.height, manifest.preprocessing.width) == (1, 1)
    assert manifest.preprocessing.background == (0, 0, 0)
    top = Manifest.from_dict(_edited(document, lambda m: m["preprocessing"].update(background=[255, 255, 255])))
    assert top.preprocessing.background == (255, 255, 255)


def test_reading_from_disk(tiny_artifact: Path, tmp_path: Path) -> None:
    manifest = Manifest.read(tiny_artifact)
    assert manifest.name == "tiny-colour-classifier"
    with pytest.raises(ManifestError, match=f"no manifest at {tmp_path / MANIFEST_FILE}: export a model first"):
        Manifest.read(tmp_path)
    (tmp_path / MANIFEST_FILE).write_text("{ not json")
    with pytest.raises(ManifestError, match="cannot read"):
        Manifest.read(tmp_path)
    (tmp_path / MANIFEST_FILE).write_bytes(b'{"name": "\xff"}')
    with pytest.raises(ManifestError, match="cannot read"):
        Manifest.read(tmp_path)
    (tmp_path / MANIFEST_FILE).write_text("[1, 2]")
    with pytest.raises(ManifestError, match="expected a JSON object"):
        Manifest.read(tmp_path)


def test_write_then_read(tiny_artifact: Path, tmp_path: Path) -> None:
    manifest = Manifest.read(tiny_artifact)
    path = manifest.write(tmp_path)
    assert path == tmp_path / MANIFEST_FILE
    text = path.read_text()
    assert text.endswith("}\n") and text.startswith('{\n  "name"')
    assert Manifest.read(tmp_path) == manifest


def test_labels_are_verified(tiny_artifact: Path, tmp_path: Path) -> None:
    names = ["a", "b", "c"]
    raw = "\n".join(names).encode() + b"\n"
    (tmp_path / "labels.txt").write_bytes(raw)
    good = Labels("labels.txt", 3, hashlib.sha256(raw).hexdigest())
    assert read_labels(tmp_path, good) == names
    with pytest.raises(ManifestError, match="does not match the sha256 in the manifest"):
        read_labels(tmp_path, Labels("labels.txt", 3, hashlib.sha256(b"other").hexdigest()))
    with pytest.raises(ManifestError, match="has 3 names, the manifest says 4"):
        read_labels(tmp_path, Labels("labels.txt", 4, good.sha256))
    with pytest.raises(ManifestError, match="cannot read labels file"):
        read_labels(tmp_path, Labels("missing.txt", 3, good.sha256))


def test_sha256_of_a_file_larger_than_one_read(tmp_path: Path) -> None:
    data = bytes(range(256)) * 9000  # 2.2 MiB: three reads of 1 MiB
    (tmp_path / "blob").write_bytes(data)
    assert sha256_file(tmp_path / "blob") == hashlib.sha256(data).hexdigest()
    (tmp_path / "empty").write_bytes(b"")
    assert sha256_file(tmp_path / "empty") == hashlib.sha256(b"").hexdigest()


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda a: (a / "labels.txt").write_text("x\ny\nz\nw\n"), "does not match the sha256"),
        (lambda a: (a / "labels.txt").unlink(), "cannot read labels file"),
        (lambda a: (a / MANIFEST_FILE).write_text("[]"), "expected a JSON object"),
        (lambda a: (a / MANIFEST_FILE).unlink(), "no manifest at"),
    ],
)
def test_the_classifier_refuses_a_damaged_artifact(
    tiny_artifact: Path, tmp_path: Path, damage: Callable[[Path], object], message: str
) -> None:
    import shutil

    artifact = tmp_path / "artifact"
    shutil.copytree(tiny_artifact, artifact)
    damage(artifact)
    with pytest.raises(ArtifactError, match=message):
        Classifier.load(artifact, 1)

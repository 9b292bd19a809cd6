"""The committed default artifact: intact, valid, honest about being untrained."""

from __future__ import annotations

import json

import pytest

from service.manifest import Manifest, read_labels, sha256_file
from tests.helpers import ARTIFACTS, SHARED


@pytest.fixture(scope="module")
def manifest() -> Manifest:
    return Manifest.from_dict(json.loads((ARTIFACTS / "manifest.json").read_text()))


def test_model_sha256_matches_manifest(manifest: Manifest) -> None:
    path = ARTIFACTS / manifest.model.file
    assert sha256_file(path) == manifest.model.sha256
    assert path.stat().st_size == manifest.model.bytes


def test_manifest_round_trips_through_the_schema(manifest: Manifest) -> None:
    raw = json.loads((ARTIFACTS / "manifest.json").read_text())
    assert manifest.to_dict() == raw


def test_it_is_the_int8_reference_model_and_says_so(manifest: Manifest) -> None:
    assert manifest.trained is False
    assert "UNTRAINED" in manifest.description
    assert manifest.model.quantization == "static_int8"
    assert manifest.input.shape == (None, 300, 300, 3)
    assert manifest.preprocessing.value_range == (0.0, 255.0)
    report = manifest.export
    assert {v["name"] for v in report["variants"]} == {
        "fp32",
        "dynamic",
        "static",
        "static_u8",
        "mixed",
        "mixed_stem_swish",
    }
    assert report["selected"] == "mixed_stem_swish"
    assert report["batchnorm_reestimated_batches"] > 0
    assert not (ARTIFACTS / "fp32.onnx").exists()


def test_labels_are_the_196_stanford_cars_names(manifest: Manifest) -> None:
    labels = read_labels(ARTIFACTS, manifest.labels)
    assert len(labels) == 196
    assert labels[0] == "AM General Hummer SUV 2000"
    names = SHARED / "data" / "stanford_cars_names.txt"
    if not names.exists():
        pytest.skip(f"{names} not present (it is only beside the project in CI): cannot cross-check the order")
    assert labels == names.read_text().splitlines()

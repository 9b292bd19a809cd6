"""The artifact's graph is saved with onnxruntime's portable optimizations; the CPU-specific ones still run at load."""

from __future__ import annotations

import collections
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from export.optimize import optimize_artifact, preoptimize
from service.manifest import Manifest, sha256_file
from service.model import Classifier, session_options
from tests.helpers import ARTIFACTS, write_tiny_artifact

NCHWC = "com.microsoft.nchwc"


def _final_graph(model: Path, scratch: Path) -> collections.Counter[tuple[str, str]]:
    """The op types of the graph the service really runs: the model as its session optimized it at load."""
    options = session_options(1)
    options.optimized_model_filepath = str(scratch)
    ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    graph = onnx.load(str(scratch)).graph
    return collections.Counter((node.domain or "ai.onnx", node.op_type) for node in graph.node)


def _conv_model(path: Path) -> None:
    rng = np.random.default_rng(0)
    weights = [
        onnx.numpy_helper.from_array((rng.standard_normal((32, 16, 3, 3)) / 10).astype(np.float32), "w1"),
        onnx.numpy_helper.from_array((rng.standard_normal((32, 32, 3, 3)) / 10).astype(np.float32), "w2"),
        onnx.numpy_helper.from_array(np.ones(32, dtype=np.float32), "scale"),
        onnx.numpy_helper.from_array(np.zeros(32, dtype=np.float32), "zero"),
    ]
    nodes = [
        helper.make_node("Conv", ["input", "w1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c1", "scale", "zero", "zero", "scale"], ["bn"]),
        helper.make_node("Relu", ["bn"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2"], ["output"], pads=[1, 1, 1, 1]),
    ]
    graph = helper.make_graph(
        nodes,
        "convs",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 16, 24, 24])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 32, 24, 24])],
        initializer=weights,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))


def test_the_saved_graph_answers_identically_and_load_time_layouts_still_apply(tmp_path: Path) -> None:
    source, saved = tmp_path / "convs.onnx", tmp_path / "saved.onnx"
    _conv_model(source)
    report = preoptimize(source, saved)
    assert report["graph_optimization"] == "extended"
    stored = collections.Counter(node.op_type for node in onnx.load(str(saved)).graph.node)
    assert "BatchNormalization" not in stored, "the portable rewrites were not saved"
    assert not any(node.domain == NCHWC for node in onnx.load(str(saved)).graph.node), "a CPU-specific layout was saved"
    original, optimized = _final_graph(source, tmp_path / "a.onnx"), _final_graph(saved, tmp_path / "b.onnx")
    assert original == optimized
    if not any(domain == NCHWC for domain, _ in original):
        pytest.skip("this CPU gets no NCHWc layout from onnxruntime: nothing CPU-specific to check")
    assert any(domain == NCHWC for domain, _ in optimized), "the layout transform no longer applies at load"


def test_optimize_artifact_rewrites_model_and_manifest_together(tmp_path: Path) -> None:
    artifact = tmp_path / "artifact"
    write_tiny_artifact(artifact)
    before = Classifier.load(artifact, 1).predict(np.full((1, 8, 8, 3), [200, 10, 10], dtype=np.float32))
    manifest = optimize_artifact(artifact)
    assert manifest.export["graph"]["graph_optimization"] == "extended"
    assert Manifest.read(artifact) == manifest
    assert sha256_file(artifact / manifest.model.file) == manifest.model.sha256
    after = Classifier.load(artifact, 1).predict(np.full((1, 8, 8, 3), [200, 10, 10], dtype=np.float32))
    np.testing.assert_array_equal(before, after)
    assert optimize_artifact(artifact) == manifest  # a second run changes nothing


def test_the_committed_artifact_ships_the_portable_optimized_graph() -> None:
    manifest = Manifest.read(ARTIFACTS)
    assert manifest.export["graph"]["graph_optimization"] == "extended"
    nodes = onnx.load(str(ARTIFACTS / manifest.model.file)).graph.node
    types = collections.Counter(node.op_type for node in nodes)
    assert types["QLinearConv"] > 100, "the QDQ pairs were not fused ahead of time"
    assert types["DequantizeLinear"] <= 2
    assert not any(node.domain == NCHWC for node in nodes)

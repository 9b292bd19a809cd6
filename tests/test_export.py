"""The export, end to end with real Keras models, real tf2onnx and real onnxruntime (needs TensorFlow)."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from importlib.util import find_spec
from pathlib import Path
from typing import TypeVar

import httpx
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from export.images import synthetic_jpegs
from export.parity import Thresholds, preprocessing_vs_tensorflow
from export.pipeline import MIN_CALIBRATION_IMAGES, ExportConfig, ExportFailed, image_set_report, run_export
from export.quantize import (
    VARIANTS,
    _input_rescaling_nodes,
    image_convs,
    stem_swish_nodes,
    swish_nodes,
    tile_input_constants,
)
from service.manifest import Manifest, sha256_file
from tests.helpers import CARS, ROOT, SHARED, image_bytes, running_service
from tests.system import IN_CI

# Looked up, not imported: importing TensorFlow at collection cost every `-m "not export"` run seconds and
# gigabytes. In CI the export requirements are installed, so nothing may skip there.
_NO_TENSORFLOW = pytest.mark.skipif(
    find_spec("tensorflow") is None and not IN_CI, reason="the export tests need the export requirements (TensorFlow)"
)
T = TypeVar("T")


def export(test: T) -> T:
    """Marks a test that runs TensorFlow: `-m export` selects it, a machine without TensorFlow skips it."""
    return pytest.mark.export(_NO_TENSORFLOW(test))  # type: ignore[no-any-return]


FIVE = ["alpha", "bravo", "charlie", "delta", "echo"]


def _tiny_keras(path: Path) -> Path:
    import keras

    keras.utils.set_random_seed(1)
    inputs = keras.Input((32, 32, 3))
    x = keras.layers.Rescaling(1 / 255)(inputs)
    x = keras.layers.Conv2D(8, 3, strides=2, padding="same")(x)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.Activation("swish")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(len(FIVE), activation="softmax")(x)
    keras.Model(inputs, outputs).save(path)
    return path


@pytest.fixture(scope="module")
def tiny_keras_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _tiny_keras(tmp_path_factory.mktemp("keras") / "tiny.keras")


@pytest.fixture(scope="module")
def five_labels(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("labels") / "labels.txt"
    path.write_text("\n".join(FIVE) + "\n")
    return path


def _config(out: Path, **kw: object) -> ExportConfig:
    defaults: dict[str, object] = {"calibration_count": 16, "validation_count": 16}
    return ExportConfig(out=out, **(defaults | kw))  # type: ignore[arg-type]


@export
def test_tiny_keras_model_end_to_end(tiny_keras_file: Path, five_labels: Path, tmp_path: Path) -> None:
    out = tmp_path / "artifact"
    manifest = run_export(_config(out, keras_model=tiny_keras_file, labels=five_labels, keep_variants=tmp_path / "v"))

    assert sorted(p.name for p in out.iterdir()) == ["labels.txt", "manifest.json", "model.onnx"]
    on_disk = Manifest.read(out)
    assert on_disk == manifest
    assert sha256_file(out / "model.onnx") == manifest.model.sha256
    assert manifest.trained is True and manifest.source["loader"] == "keras3"
    assert manifest.input.shape == (None, 32, 32, 3) and manifest.output.kind == "probabilities"

    report = manifest.export
    variants = {v["name"]: v for v in report["variants"]}
    assert set(variants) == set(VARIANTS)
    assert variants["fp32"]["passed"] and variants["fp32"]["parity"]["max_abs_diff"] < 1e-4
    passing = [v for v in report["variants"] if v["passed"]]
    assert report["selected"] == min(passing, key=lambda v: v["latency_ms"])["name"]
    for name in variants:  # every variant is a servable artifact of its own
        assert Manifest.read(tmp_path / "v" / name).model.quantization == variants[name]["quantization"]
    for name in ("static", "static_u8"):  # the Rescaling layer stays float: the raw input goes straight into it
        graph = onnx.load(str(tmp_path / "v" / name / "model.onnx")).graph
        first = [n.op_type for n in graph.node if graph.input[0].name in n.input]
        assert first == ["Mul"], (name, first)
        assert any(n.op_type == "QuantizeLinear" for n in graph.node), name

    # The service serves whichever variant shipped, and answers what Keras answers for the same photo, as
    # closely as the gate demanded of that variant on the validation images.
    import keras

    from service.imaging import preprocess

    model = keras.models.load_model(tiny_keras_file)
    photo = synthetic_jpegs(1, seed=7)[0]
    expected = np.asarray(model(preprocess(photo, manifest.preprocessing, 10**9)[None]))[0]
    with running_service(out, tmp_path / "server.log") as server:
        body = httpx.post(f"{server.url}/infer?top_k=5", files={"image": photo}).json()
    assert sorted(item["class"] for item in body["top_k"]) == sorted(FIVE)
    served = np.array([next(i["score"] for i in body["top_k"] if i["class"] == name) for name in FIVE])
    shipped = variants[report["selected"]]
    assert np.abs(served - expected).max() <= max(2 * shipped["parity"]["max_abs_diff"], 1e-4), (served, expected)
    margin = np.sort(expected)[-1] - np.sort(expected)[-2]
    if margin > 2 * shipped["parity"]["max_abs_diff"]:  # a clear winner must stay the winner
        assert body["class"] == FIVE[int(expected.argmax())]


@export
def test_parity_gate_refuses_and_writes_nothing(tiny_keras_file: Path, five_labels: Path, tmp_path: Path) -> None:
    out = tmp_path / "artifact"
    out.mkdir()
    (out / "keep.txt").write_text("untouched")
    impossible = Thresholds(fp32_max_abs_diff=-1.0, min_top1_agreement=1.1, min_cosine=1.1)
    with pytest.raises(ExportFailed) as failure:
        run_export(_config(out, keras_model=tiny_keras_file, labels=five_labels, thresholds=impossible))
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    assert (out / "keep.txt").read_text() == "untouched"
    report = failure.value.report
    assert report["selected"] is None
    assert all(not v["passed"] and v["failures"] for v in report["variants"])
    assert [p for p in tmp_path.iterdir() if p.name.startswith(".artifact")] == []


@export
def test_forced_variant_must_still_pass(tiny_keras_file: Path, five_labels: Path, tmp_path: Path) -> None:
    manifest = run_export(_config(tmp_path / "a", keras_model=tiny_keras_file, labels=five_labels, variants=("fp32",)))
    assert manifest.model.quantization == "fp32"
    assert [v["name"] for v in manifest.export["variants"]] == ["fp32"]


@export
def test_cli_reports_failure_with_exit_code(tiny_keras_file: Path, five_labels: Path, tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "export",
            "--keras-model",
            str(tiny_keras_file),
            "--labels",
            str(five_labels),
            "--out",
            str(tmp_path / "out"),
            "--calibration-count",
            "8",
            "--validation-count",
            "8",
            "--fp32-max-abs-diff",
            "-1",
            "--quantization",
            "fp32",
            "--report-json",
            str(tmp_path / "report.json"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1, result.stderr[-2000:]
    assert "FAILED" in result.stderr and "max |Δp|" in result.stdout
    assert not (tmp_path / "out").exists()
    assert json.loads((tmp_path / "report.json").read_text())["selected"] is None


@export
def test_cli_help() -> None:
    result = subprocess.run([sys.executable, "-m", "export", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0
    for flag in ("--keras-model", "--reference", "--labels", "--calibration-dir", "--quantization", "--out"):
        assert flag in result.stdout


@export
def test_labels_match_stanford_cars_list() -> None:
    from export.labels import stanford_cars_names

    names = stanford_cars_names()
    assert len(names) == 196 and names[0] == "AM General Hummer SUV 2000"
    shared = SHARED / "data" / "stanford_cars_names.txt"
    if not shared.exists():
        pytest.skip(f"{shared} not present: cannot cross-check the order")
    assert names == shared.read_text().splitlines()


@export
@pytest.mark.filterwarnings("ignore:You are saving your model as an HDF5 file:UserWarning")
def test_original_h5_shape_loads_with_tf_keras_and_serves(tmp_path: Path) -> None:
    """The original's file: a TF 2.10 Keras 2 .h5, EfficientNetV2B3 backbone + Dense(196, softmax) head."""
    import tf_keras

    tf_keras.utils.set_random_seed(0)
    base = tf_keras.applications.EfficientNetV2B3(weights=None, input_shape=(300, 300, 3))
    head = tf_keras.layers.Dense(196, activation="softmax", name="cars")(base.layers[-2].output)
    h5 = tmp_path / "original.h5"
    tf_keras.Model(base.input, head).save(h5)

    out = tmp_path / "artifact"
    # FP32 only: this random network is not calibratable (see PITFALLS); the reference export and the digits
    # test cover int8 on trained and BatchNorm-re-estimated networks.
    manifest = run_export(_config(out, keras_model=h5, variants=("fp32",), calibration_count=4, validation_count=4))
    assert manifest.source["loader"] == "tf_keras"
    assert manifest.export["variants"][0]["parity"]["max_abs_diff"] < 1e-4
    assert manifest.labels.count == 196

    photo = (CARS / "bentleycgtc2007.jpg").read_bytes() if CARS.exists() else image_bytes((80, 80, 80), fmt="JPEG")
    with running_service(out, tmp_path / "server.log") as server:
        response = httpx.post(f"{server.url}/infer", files={"image": photo})
    assert response.status_code == 200 and "class" in response.json()


@export
def test_preprocessing_matches_the_training_pipeline_on_real_photos(record_property: object) -> None:
    if not CARS.exists():
        pytest.skip(f"{CARS} not present (the real car photos live beside the project in CI)")
    photos = [p.read_bytes() for p in sorted(CARS.glob("*.jpg"))]
    measured = preprocessing_vs_tensorflow(photos, 300, 300)
    record_property("preprocessing_vs_tensorflow", measured)  # type: ignore[operator]
    print(json.dumps(measured, indent=2))
    # Our TF-style bilinear differs from tf.image.resize only by the JPEG decoders' rounding; Pillow's
    # antialiased bilinear is measurably further away: the manifest's default is the measured choice.
    assert measured["bilinear_tf"]["mean_abs"] < 1.5
    assert measured["bilinear_tf"]["mean_abs"] < measured["bilinear"]["mean_abs"]


@export
def test_reference_cli_regenerates_a_servable_artifact(tmp_path: Path) -> None:
    """`python -m export --reference` as documented, with small image counts to fit the CI budget."""
    out = tmp_path / "x"
    result = subprocess.run(
        [sys.executable, "-m", "export", "--reference", "--out", str(out), "--bn-batches", "4",
         "--calibration-count", "8", "--validation-count", "4", "--variants", "fp32", "static"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "<- ships" in result.stdout
    manifest = Manifest.read(out)
    assert manifest.trained is False and "UNTRAINED" in manifest.description
    assert manifest.source["loader"] == "reference"
    assert manifest.labels.count == 196 and manifest.input.shape == (None, 300, 300, 3)
    with running_service(out, tmp_path / "server.log") as server:
        home = httpx.get(f"{server.url}/").json()
        assert home["model"]["trained"] is False and "untrained" in home["warning"]
        response = httpx.post(f"{server.url}/infer", files={"image": synthetic_jpegs(1, seed=5)[0]})
    assert response.status_code == 200 and "class" in response.json()


def _graph(*nodes: tuple[str, list[str], str]) -> onnx.GraphProto:
    constants = [onnx.numpy_helper.from_array(np.ones((1,), np.float32), name) for name in ("c1", "c2")]
    return helper.make_graph(
        [helper.make_node(op, inputs, [out], name=out) for op, inputs, out in nodes],
        "g",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [1]),
            helper.make_tensor_value_info("y", TensorProto.FLOAT, [1]),
        ],
        [helper.make_tensor_value_info(nodes[-1][2], TensorProto.FLOAT, [1])],
        constants,
    )


def test_input_rescaling_is_the_constant_elementwise_chain_at_the_input() -> None:
    rescale = _graph(
        ("Mul", ["x", "c1"], "m"), ("Sub", ["m", "c2"], "s"), ("Relu", ["s"], "r"), ("Mul", ["r", "c1"], "t")
    )
    assert _input_rescaling_nodes(rescale) == ["m", "s"]  # stops at the first other op, never resumes
    assert _input_rescaling_nodes(_graph(("Relu", ["x"], "r"), ("Mul", ["r", "c1"], "m"))) == []
    assert _input_rescaling_nodes(_graph(("Mul", ["x", "y"], "m"), ("Add", ["m", "c1"], "a"))) == []  # not a constant
    fan_out = _graph(("Mul", ["x", "c1"], "m"), ("Relu", ["m"], "r"), ("Add", ["m", "r"], "a"))
    assert _input_rescaling_nodes(fan_out) == ["m"]


def test_calibration_warnings_and_counts() -> None:
    few, others = synthetic_jpegs(3, seed=1), synthetic_jpegs(2, seed=2)
    sets, warnings = image_set_report(few, few[:2] + others)
    assert sets == {"calibration_images": 3, "validation_images": 4, "overlap": 2}
    assert len(warnings) == 2
    assert f"fewer than {MIN_CALIBRATION_IMAGES}" in warnings[0] and "2 of the 4 validation images" in warnings[1]
    enough = synthetic_jpegs(MIN_CALIBRATION_IMAGES, seed=3)
    assert image_set_report(enough, others) == (
        {"calibration_images": MIN_CALIBRATION_IMAGES, "validation_images": 2, "overlap": 0},
        [],
    )


@export
def test_a_small_calibration_folder_is_reported(tiny_keras_file: Path, five_labels: Path, tmp_path: Path) -> None:
    """The issue's new user: one folder of a few photos, no validation folder."""
    photos = tmp_path / "photos"
    photos.mkdir()
    for i, blob in enumerate(synthetic_jpegs(6, seed=4)):
        (photos / f"{i}.jpg").write_bytes(blob)
    config = _config(tmp_path / "a", keras_model=tiny_keras_file, labels=five_labels, variants=("fp32",))
    held_out = run_export(replace(config, calibration_dir=photos, calibration_count=4)).export
    assert held_out["calibration"]["images"] == 4 and held_out["validation"]["images"] == 2
    assert held_out["validation"]["overlapping_calibration"] == 0
    assert [w for w in held_out["warnings"] if "fewer than" in w]
    everything = run_export(replace(config, calibration_dir=photos, calibration_count=6)).export
    assert everything["validation"]["images"] == 6 and everything["validation"]["overlapping_calibration"] == 6
    assert [w for w in everything["warnings"] if "6 of the 6 validation images are also calibration" in w]


def test_collecting_the_export_tests_does_not_import_tensorflow() -> None:
    script = (
        "import sys, pytest\n"
        "code = pytest.main(['--collect-only', '-q', '-p', 'no:cacheprovider', '-m', 'not export',\n"
        "                    'tests/test_export.py', 'tests/test_digits_accuracy.py'])\n"
        "sys.exit(7 if 'tensorflow' in sys.modules else int(code))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]


def test_swish_nodes_are_the_sigmoid_mul_pairs_not_the_gates() -> None:
    graph = _graph(
        ("Sigmoid", ["x"], "s"),
        ("Mul", ["s", "x"], "swish"),  # swish, operands in either order
        ("Sigmoid", ["y"], "gate"),
        ("Mul", ["swish", "gate"], "excited"),  # a squeeze-and-excitation gate: the sigmoid of another tensor
    )
    assert swish_nodes(graph) == ["s", "swish"]


def test_tiled_input_constants_give_bit_identical_results() -> None:
    rng = np.random.default_rng(0)
    scale = onnx.numpy_helper.from_array(rng.uniform(1, 5, (1, 1, 1, 3)).astype(np.float32), "scale")
    offset = onnx.numpy_helper.from_array(rng.uniform(-1, 1, (3,)).astype(np.float32), "offset")
    half = onnx.numpy_helper.from_array(np.array(0.5, np.float32), "half")
    graph = helper.make_graph(
        [
            helper.make_node("Mul", ["input", "half"], ["m"], name="m"),
            helper.make_node("Add", ["m", "offset"], ["a"], name="a"),
            helper.make_node("Mul", ["a", "scale"], ["out"], name="s"),
        ],
        "g",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 4, 5, 3])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", 4, 5, 3])],
        [scale, offset, half],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    x = rng.uniform(0, 255, (2, 4, 5, 3)).astype(np.float32)

    def run(m: onnx.ModelProto) -> np.ndarray:
        session = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
        return np.asarray(session.run(None, {"input": x})[0])

    before = run(model)
    assert tile_input_constants(model, ["m", "a", "s"]) == 2  # the scalar stays a scalar
    shapes = {t.name: list(t.dims) for t in model.graph.initializer}
    assert shapes == {"half": [], "scale_tiled_w5": [1, 1, 5, 3], "offset_tiled_w5": [1, 1, 5, 3]}
    onnx.checker.check_model(model, full_check=True)
    assert np.array_equal(run(model), before)


def test_image_convs_are_the_convolutions_over_few_channels() -> None:
    weights = [
        onnx.numpy_helper.from_array(np.ones(shape, np.float32), name)
        for name, shape in (("w_stem", (8, 3, 3, 3)), ("w_deep", (8, 8, 1, 1)), ("w_depthwise", (8, 1, 3, 3)))
    ]
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "w_stem"], ["a"], name="stem", pads=[1, 1, 1, 1]),
            helper.make_node("Sigmoid", ["a"], ["s"], name="stem_sigmoid"),
            helper.make_node("Mul", ["a", "s"], ["b"], name="stem_swish"),
            helper.make_node("Conv", ["b", "w_deep"], ["c"], name="deep"),
            helper.make_node("Conv", ["c", "w_depthwise"], ["d"], name="depthwise", group=8, pads=[1, 1, 1, 1]),
            helper.make_node("Sigmoid", ["d"], ["e"], name="late_sigmoid"),
            helper.make_node("Mul", ["e", "d"], ["f"], name="late_swish"),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("f", TensorProto.FLOAT, [1, 8, 8, 8])],
        weights,
    )
    assert image_convs(graph) == ["stem"]  # a depthwise conv has one channel per group, not a few in all
    assert stem_swish_nodes(graph) == ["stem_sigmoid", "stem_swish"]

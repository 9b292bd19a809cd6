"""The export, start to finish: load, convert, quantize, check parity, choose, write."""

from __future__ import annotations

import hashlib
import logging
import platform
import tempfile
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from export import images, labels, parity, quantize, sources
from export.artifact import placeholder_model_file, write_artifact
from export.convert import INPUT_NAME, OPSET, keras_input_shape, output_kind, to_onnx
from export.optimize import optimize_artifact
from service.imaging import preprocess
from service.manifest import Labels, Manifest, OutputSpec, Preprocessing, TensorSpec

log = logging.getLogger("export")

SELECTION_RULE = (
    "the fastest variant that passes the parity gate: least median CPU time of a batch-1 run with one intra-op "
    "thread (its latency on an idle core), the variants timed in turns"
)
_NO_PIXEL_LIMIT = 1 << 40
# Below this many images, MinMax ranges follow the few images seen (one unusual image sets a layer's whole
# range, a missing kind of scene leaves another range too narrow), and a parity figure over so few images
# says little: warn, and record the counts in the manifest.
MIN_CALIBRATION_IMAGES = 100
_TOOLS = ("tensorflow", "keras", "tf_keras", "tf2onnx", "onnx", "onnxruntime", "numpy", "pillow")


class ExportFailed(RuntimeError):
    """The export ran but its result must not ship (the parity gate refused it); nothing was written."""

    def __init__(self, message: str, report: dict[str, Any]) -> None:
        super().__init__(message)
        self.report = report


@dataclass
class ExportConfig:
    out: Path
    keras_model: Path | None = None
    reference: bool = False
    labels: Path | None = None
    calibration_dir: Path | None = None
    validation_dir: Path | None = None
    calibration_count: int = 64
    validation_count: int = 32
    bn_batches: int = 40
    bn_batch_size: int = 8
    variants: tuple[str, ...] = quantize.VARIANTS  # the candidates; the fastest that passes ships
    thresholds: parity.Thresholds = field(default_factory=parity.Thresholds)
    resize: str = "bilinear_tf"
    jpeg_draft: bool = True
    value_range: tuple[float, float] = (0.0, 255.0)
    keep_variants: Path | None = None
    name: str | None = None
    seed: int = sources.REFERENCE_SEED


def _tool_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for tool in _TOOLS:
        try:
            versions[tool] = metadata.version(tool)
        except metadata.PackageNotFoundError:
            continue
    return versions


def _image_set(folder: Path | None, count: int, seed: int) -> tuple[list[bytes], str]:
    if folder is not None:
        return images.folder_images(folder, count), str(folder)
    return images.synthetic_jpegs(count, seed), f"synthetic (seed {seed})"


def _arrays(blobs: list[bytes], spec: Preprocessing) -> np.ndarray:
    return np.stack([preprocess(b, spec, _NO_PIXEL_LIMIT) for b in blobs]).astype(np.float32)


def image_set_report(calibration: list[bytes], validation: list[bytes]) -> tuple[dict[str, Any], list[str]]:
    """Counts, overlap (identical files) and the warnings a user must see about the two image sets."""
    calibrated = {hashlib.sha256(b).hexdigest() for b in calibration}
    overlap = sum(hashlib.sha256(b).hexdigest() in calibrated for b in validation)
    warnings = []
    if len(calibration) < MIN_CALIBRATION_IMAGES:
        warnings.append(
            f"calibrating on {len(calibration)} images, fewer than {MIN_CALIBRATION_IMAGES}: int8 ranges from so "
            "few images may not cover what the service will see (raise --calibration-count, or give "
            "--calibration-dir more images)"
        )
    if overlap:
        warnings.append(
            f"{overlap} of the {len(validation)} validation images are also calibration images: parity is "
            "judged on images the quantization was fitted to and will look better than it is "
            "(give --validation-dir a separate set)"
        )
    return {"calibration_images": len(calibration), "validation_images": len(validation), "overlap": overlap}, warnings


def _keras_predict(model: Any, arrays: np.ndarray) -> np.ndarray:
    return np.concatenate([np.asarray(model(b, training=False)) for b in images.batches(arrays, 8)]).astype(np.float32)


def _print_report(variants: list[dict[str, Any]], selected: str | None) -> None:
    header = (
        f"{'variant':<21} {'size MB':>7} {'latency ms':>10} {'CPU ms':>7} {'max|Δp|':>9} {'top-1':>6} {'p-cos':>7} "
        f"{'logit-cos':>9}  gate"
    )
    lines = [header, "-" * len(header)]
    for v in variants:
        p = v["parity"]
        gate = "pass" if v["passed"] else "FAIL: " + "; ".join(v["failures"])
        mark = " <- ships" if v["name"] == selected else ""
        lines.append(
            f"{v['name']:<21} {v['bytes'] / 1e6:>7.1f} {v['latency_ms']:>10.1f} {v['cpu_ms']:>7.1f} "
            f"{p['max_abs_diff']:>9.2e} {p['top1_agreement']:>6.3f} {p['probability_cosine']:>7.4f} "
            f"{p['logit_cosine']:>9.4f}  {gate}{mark}"
        )
    print("\n".join(lines), flush=True)


def run_export(config: ExportConfig) -> Manifest:
    """Export `config`'s model: the fastest variant that passes the gate, written to `config.out`.

    Raises ExportFailed (with the report) when no variant passes, ValueError or FileNotFoundError on bad input.
    """
    wanted = _wanted_variants(config)
    source = _load_source(config)
    names = _class_names(config, source)
    spec = _preprocessing(config, source.model)
    sets = _image_sets(config)
    calibration = _arrays(sets.calibration, spec)
    validation = _arrays(sets.validation, spec)
    bn_batches = _reestimate_batchnorm(config, source, spec)

    expected = _keras_predict(source.model, validation)
    proto = to_onnx(source.model)
    output = OutputSpec(name=proto.graph.output[0].name, kind=output_kind(proto))

    with tempfile.TemporaryDirectory(prefix="export-") as work:
        built = _build_variants(proto, calibration, Path(work), wanted)
        reports = _parity_reports(built, expected, validation, config.thresholds, source.trained)
        _add_timings(reports, built, validation)
        selected = _select(reports)
        _print_report(reports, selected)
        report = (
            _selection_report(config, wanted, reports, selected, source.trained)
            | _data_report(sets, bn_batches, spec)
            | {"tools": _tool_versions()}
        )
        if selected is None:
            raise ExportFailed("no variant passed the parity gate; nothing was written", report)
        manifest = _manifest(config, source, spec, output, len(names), report)
        written = _write(config, built, names, manifest)
    log.info("wrote %s (%s, %.1f MB)", config.out, selected, written.model.bytes / 1e6)
    return written


def _wanted_variants(config: ExportConfig) -> tuple[str, ...]:
    """The requested variants in their canonical order, after checking the configuration names one source."""
    if config.reference == (config.keras_model is not None):
        raise ValueError("give exactly one of --keras-model PATH or --reference")
    known = quantize.VARIANTS + quantize.EXPERIMENTS
    unknown = set(config.variants) - set(known)
    if unknown or not config.variants:
        raise ValueError(f"variants must be some of {', '.join(known)}, got {config.variants}")
    return tuple(v for v in known if v in config.variants)


def _load_source(config: ExportConfig) -> sources.Source:
    if config.keras_model is None:
        return sources.build_reference(config.seed)
    return sources.load_keras_model(config.keras_model)


def _class_names(config: ExportConfig, source: sources.Source) -> list[str]:
    names = labels.read_names(config.labels) if config.labels else labels.stanford_cars_names()
    classes = int(source.model.outputs[0].shape[-1])
    if classes != len(names):
        raise ValueError(f"the model has {classes} outputs but there are {len(names)} class names")
    return names


def _preprocessing(config: ExportConfig, model: Any) -> Preprocessing:
    height, width, _ = keras_input_shape(model)
    return Preprocessing(
        height=height,
        width=width,
        resize=config.resize,
        value_range=config.value_range,
        jpeg_draft=config.jpeg_draft,
    )


@dataclass
class ImageSets:
    """The calibration and validation images as files, where they came from, and what a user must know."""

    calibration: list[bytes]
    calibration_from: str
    validation: list[bytes]
    validation_from: str
    overlap: int
    warnings: list[str]


def _image_sets(config: ExportConfig) -> ImageSets:
    calibration, calibration_from = _image_set(config.calibration_dir, config.calibration_count, config.seed + 1)
    if config.calibration_dir is None:
        log.warning("calibrating on synthetic images: real images of the target domain calibrate better")
    if config.validation_dir is None and config.calibration_dir is not None:
        # One folder for both: validate on the images after the calibration ones, so that parity is judged
        # on images the ranges were not fitted to; a folder too small for that overlaps, and says so.
        every = images.folder_images(config.calibration_dir)
        held_out = every[len(calibration) :][: config.validation_count]
        validation = held_out or every[: config.validation_count]
        validation_from = f"{config.calibration_dir} ({'held out' if held_out else 'the calibration images'})"
    else:
        validation, validation_from = _image_set(config.validation_dir, config.validation_count, config.seed + 2)
    counts, warnings = image_set_report(calibration, validation)
    for warning in warnings:
        log.warning("%s", warning)
    return ImageSets(calibration, calibration_from, validation, validation_from, counts["overlap"], warnings)


def _reestimate_batchnorm(config: ExportConfig, source: sources.Source, spec: Preprocessing) -> int:
    """Batches of BatchNorm re-estimation an untrained model needs before it can be calibrated (0 if trained)."""
    if source.trained:
        return 0
    bn_images = _arrays(images.synthetic_jpegs(config.bn_batches * config.bn_batch_size, config.seed + 3), spec)
    return sources.reestimate_batchnorm(source.model, images.batches(bn_images, config.bn_batch_size))


def _build_variants(
    proto: onnx.ModelProto, calibration: np.ndarray, workdir: Path, wanted: tuple[str, ...]
) -> list[quantize.Variant]:
    fp32_path = workdir / "fp32.onnx"
    onnx.save(proto, str(fp32_path))
    return quantize.make_variants(fp32_path, calibration, workdir, wanted)


def _parity_reports(
    built: list[quantize.Variant],
    expected: np.ndarray,
    validation: np.ndarray,
    thresholds: parity.Thresholds,
    trained: bool,
) -> list[dict[str, Any]]:
    """Each variant's size, parity with Keras on the validation images, and the gate's verdict."""
    reports: list[dict[str, Any]] = []
    for variant in built:
        log.info("checking %s against Keras on %d images...", variant.name, len(validation))
        got = parity.onnx_predict(variant.path, validation)
        result = parity.compare(expected, got)
        problems = parity.failures(variant.name, result, thresholds, trained)
        if not _takes_float(variant.path):
            # The manifest schema (service/manifest.py) only describes float32 inputs so far.
            problems.append("uint8 input: measured only, the service feeds float32")
        reports.append(
            {
                "name": variant.name,
                "quantization": quantize.QUANTIZATION_NAMES[variant.name],
                "bytes": variant.path.stat().st_size,
                "parity": parity.as_dict(result),
                "passed": not problems,
                "failures": problems,
            }
        )
    return reports


def _add_timings(reports: list[dict[str, Any]], built: list[quantize.Variant], validation: np.ndarray) -> None:
    log.info("timing %s in turns...", ", ".join(v.name for v in built))
    latencies = parity.latencies_ms({v.name: v.path for v in built}, validation)
    for r in reports:
        r["latency_ms"] = round(latencies[r["name"]].latency_ms, 2)
        r["cpu_ms"] = round(latencies[r["name"]].cpu_ms, 2)


def _select(reports: list[dict[str, Any]]) -> str | None:
    """The name of the variant that ships (SELECTION_RULE), or None when none passed the gate."""
    passing = [r for r in reports if r["passed"]]
    return str(min(passing, key=lambda r: r["cpu_ms"])["name"]) if passing else None


def _selection_report(
    config: ExportConfig, wanted: tuple[str, ...], reports: list[dict[str, Any]], selected: str | None, trained: bool
) -> dict[str, Any]:
    return {
        "opset": OPSET,
        "variants": reports,
        "selected": selected,
        "selection_rule": SELECTION_RULE + f", among {', '.join(wanted)}",
        "thresholds": vars(config.thresholds) | {},
        "parity_judged_by": "top-1 agreement and probability cosine"
        if trained
        else "logit cosine (untrained: near-uniform outputs make top-1 meaningless)",
    }


def _data_report(sets: ImageSets, bn_batches: int, spec: Preprocessing) -> dict[str, Any]:
    return {
        "calibration": {"images": len(sets.calibration), "from": sets.calibration_from, "method": "MinMax"},
        "validation": {
            "images": len(sets.validation),
            "from": sets.validation_from,
            "overlapping_calibration": sets.overlap,
        },
        "warnings": sets.warnings,
        "batchnorm_reestimated_batches": bn_batches,
        "preprocessing_vs_tensorflow": parity.preprocessing_vs_tensorflow(sets.validation[:8], spec.height, spec.width),
    }


def _manifest(
    config: ExportConfig,
    source: sources.Source,
    spec: Preprocessing,
    output: OutputSpec,
    classes: int,
    report: dict[str, Any],
) -> Manifest:
    """The shipped variant's manifest; write_artifact fills in the file hashes and sizes."""
    return Manifest(
        name=config.name or ("efficientnetv2-b3-stanford-cars-reference" if not source.trained else "car-classifier"),
        description=(
            "UNTRAINED reference model: the real EfficientNetV2-B3 architecture (300x300, 196 Stanford Cars "
            "classes) with seeded random weights; its predictions are meaningless."
            if not source.trained
            else f"Exported from {Path(source.path).name}."
        ),
        trained=source.trained,
        created_at=datetime.now(UTC).replace(microsecond=0).isoformat(),
        model=placeholder_model_file(quantize.QUANTIZATION_NAMES[report["selected"]], OPSET),
        input=TensorSpec(name=INPUT_NAME, shape=(None, spec.height, spec.width, 3), layout="NHWC", dtype="float32"),
        output=output,
        preprocessing=spec,
        labels=Labels(file="", count=classes, sha256=""),
        source={"path": source.path, "sha256": source.sha256, "loader": source.loader},
        export=report,
    )


def _write(config: ExportConfig, built: list[quantize.Variant], names: list[str], manifest: Manifest) -> Manifest:
    """Write the shipped variant to `config.out` (and every float-input variant under --keep-variants)."""
    paths = {v.name: v.path for v in built}
    if config.keep_variants is not None:
        for r in (r for r in manifest.export["variants"] if _takes_float(paths[r["name"]])):
            write_artifact(config.keep_variants / r["name"], paths[r["name"]], names, _for_variant(manifest, r))
        log.info("all variants written under %s", config.keep_variants)
    write_artifact(config.out, paths[manifest.export["selected"]], names, manifest)
    # The service's session builds about twice as fast from the pre-optimized graph (export/optimize.py).
    return optimize_artifact(config.out)


def _takes_float(path: Path) -> bool:
    model = onnx.load(str(path), load_external_data=False)
    return bool(model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT)


def _for_variant(manifest: Manifest, report: dict[str, Any]) -> Manifest:
    return replace(
        manifest,
        model=placeholder_model_file(report["quantization"], OPSET),
        export=manifest.export | {"selected": report["name"], "selection_rule": "kept with --keep-variants"},
    )

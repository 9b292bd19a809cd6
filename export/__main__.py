"""`python -m export`: turn a trained Keras classifier into a served artifact. Run `python -m export --help`."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from export.parity import Thresholds
from export.quantize import EXPERIMENTS, VARIANTS
from service.manifest import RESIZE_FILTERS


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m export",
        description="Convert a trained Keras image classifier to ONNX, quantize it, check it against Keras, "
        "and write a self-describing artifact (model.onnx, labels.txt, manifest.json) that the service serves.",
    )
    # --help lists the flags in the order they are added.
    _model_arguments(p)
    _image_arguments(p)
    _variant_arguments(p)
    _gate_arguments(p)
    _preprocessing_arguments(p)
    _output_arguments(p)
    return p.parse_args(argv)


def _model_arguments(p: argparse.ArgumentParser) -> None:
    """Which model, which class names, where the artifact goes."""
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--keras-model", type=Path, metavar="PATH", help=".keras (Keras 3), .h5 (Keras 2) or SavedModel"
    )
    source.add_argument(
        "--reference",
        action="store_true",
        help="export the UNTRAINED reference model: EfficientNetV2-B3, 300x300, 196 classes, seeded weights",
    )
    p.add_argument(
        "--labels",
        type=Path,
        metavar="PATH",
        help="one class name per line, in output-index order "
        "(default: the 196 Stanford Cars names from tensorflow-datasets)",
    )
    p.add_argument("--out", type=Path, default=Path("artifacts"), help="artifact folder (default: artifacts/)")


def _image_arguments(p: argparse.ArgumentParser) -> None:
    """The images that calibrate int8 ranges, judge parity and re-estimate the reference's BatchNorm."""
    p.add_argument("--calibration-dir", type=Path, help="images for static int8 calibration (default: synthetic)")
    p.add_argument(
        "--validation-dir",
        type=Path,
        help="images for the parity check (default: the --calibration-dir images left after calibration; "
        "the export warns when validation and calibration images overlap)",
    )
    p.add_argument("--calibration-count", type=int, default=64, help="at most this many calibration images")
    p.add_argument("--validation-count", type=int, default=32, help="at most this many validation images")
    p.add_argument("--bn-batches", type=int, default=40, help="reference only: BatchNorm re-estimation batches")


def _variant_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--variants",
        nargs="+",
        choices=VARIANTS + EXPERIMENTS,
        default=list(VARIANTS),
        help=f"candidate variants (default: {' '.join(VARIANTS)}; also measurable: {' '.join(EXPERIMENTS)}); "
        "the fastest that passes the parity gate ships",
    )
    p.add_argument(
        "--quantization",
        choices=VARIANTS + EXPERIMENTS,
        help="ship this variant (it must still pass the gate): the same as --variants with one name",
    )


def _gate_arguments(p: argparse.ArgumentParser) -> None:
    """The parity gate's thresholds, defaulting to export.parity.Thresholds."""
    d = Thresholds()
    p.add_argument(
        "--fp32-max-abs-diff",
        type=float,
        default=d.fp32_max_abs_diff,
        help=f"gate: FP32 max |Δ probability| vs Keras (default {d.fp32_max_abs_diff})",
    )
    p.add_argument(
        "--min-top1-agreement",
        type=float,
        default=d.min_top1_agreement,
        help=f"gate: INT8 top-1 agreement with Keras, trained models (default {d.min_top1_agreement})",
    )
    p.add_argument(
        "--min-cosine",
        type=float,
        default=d.min_cosine,
        help=f"gate: INT8 mean cosine of probabilities (logits if untrained) (default {d.min_cosine})",
    )


def _preprocessing_arguments(p: argparse.ArgumentParser) -> None:
    """What the manifest tells the service to do to an image before the model sees it."""
    p.add_argument(
        "--resize",
        choices=RESIZE_FILTERS,
        default="bilinear_tf",
        help="resize filter the service uses (default bilinear_tf: tf.image.resize's, as in training)",
    )
    p.add_argument("--no-jpeg-draft", action="store_true", help="decode JPEGs at full size before resizing")
    p.add_argument(
        "--value-range",
        type=float,
        nargs=2,
        default=(0.0, 255.0),
        metavar=("LOW", "HIGH"),
        help="pixel values 0..255 map onto this range (default 0 255: Keras EfficientNetV2 rescales inside)",
    )


def _output_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--keep-variants",
        type=Path,
        metavar="DIR",
        help="also write every variant as its own artifact under DIR/<variant>",
    )
    p.add_argument("--name", help="model name recorded in the manifest")
    p.add_argument("--seed", type=int, default=0, help="seed for the reference weights and synthetic images")
    p.add_argument("--report-json", type=Path, help="also write the export report (the manifest's `export`) here")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # onnxruntime.quantization logs a line per tensor at INFO on the root logger: keep ours only.
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("export").setLevel(logging.INFO)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from export.pipeline import ExportConfig, ExportFailed, run_export

    config = ExportConfig(
        out=args.out,
        keras_model=args.keras_model,
        reference=args.reference,
        labels=args.labels,
        calibration_dir=args.calibration_dir,
        validation_dir=args.validation_dir,
        calibration_count=args.calibration_count,
        validation_count=args.validation_count,
        bn_batches=args.bn_batches,
        variants=(args.quantization,) if args.quantization else tuple(args.variants),
        thresholds=Thresholds(args.fp32_max_abs_diff, args.min_top1_agreement, args.min_cosine),
        resize=args.resize,
        jpeg_draft=not args.no_jpeg_draft,
        value_range=tuple(args.value_range),
        keep_variants=args.keep_variants,
        name=args.name,
        seed=args.seed,
    )
    try:
        manifest = run_export(config)
    except ExportFailed as exc:
        print(f"export: FAILED: {exc}", file=sys.stderr)
        if args.report_json:
            args.report_json.write_text(json.dumps(exc.report, indent=2) + "\n")
        return 1
    except (ValueError, FileNotFoundError) as exc:
        print(f"export: {exc}", file=sys.stderr)
        return 2
    if args.report_json:
        args.report_json.write_text(json.dumps(manifest.export, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Where the decode thread's time goes: the service's preprocessing, stage by stage, on the benchmark JPEGs.

    python -m benchmarks.preprocess            # about 10 seconds, one thread
    python -m benchmarks.preprocess --repeats 2 --out /tmp/x

Runs service.imaging's own functions, single threaded and with nothing else running, on the 48 JPEGs every
load test posts, with the committed artifact's preprocessing: header (`open_image`), decode (`decode_rgb`:
JPEG decode with DCT-domain downscaling, EXIF, RGB) and resize (`resize`: array view and the TF-exact
bilinear resize). The first pass is not counted. Writes results/<name>.{json,md}.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from benchmarks import payloads
from benchmarks.report import command_line, provenance, save
from benchmarks.run import ROOT
from service.imaging import decode_rgb, open_image, resize, scale_values
from service.manifest import Manifest

STAGES = ("header", "decode", "resize")


def time_stages(images: list[bytes], model_dir: Path, repeats: int) -> dict[str, list[float]]:
    """Milliseconds per image and stage, one entry per timed pass (the mean over the images)."""
    spec = Manifest.read(model_dir).preprocessing
    passes: dict[str, list[float]] = {stage: [] for stage in STAGES}
    for counted in [False] + [True] * repeats:
        totals = dict.fromkeys(STAGES, 0.0)
        for data in images:
            t0 = time.perf_counter()
            image = open_image(data, 10**9)
            t1 = time.perf_counter()
            rgb = decode_rgb(image, spec)
            t2 = time.perf_counter()
            scale_values(resize(rgb, spec), spec.value_range)
            t3 = time.perf_counter()
            totals["header"] += t1 - t0
            totals["decode"] += t2 - t1
            totals["resize"] += t3 - t2
        if counted:
            for stage in STAGES:
                passes[stage].append(totals[stage] / len(images) * 1000)
    return passes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.preprocess", description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--name", default="preprocess")
    args = parser.parse_args(argv)
    images = payloads.image_bytes()
    passes = time_stages(images, ROOT / "artifacts", args.repeats)
    median = {stage: round(statistics.median(values), 3) for stage, values in passes.items()}
    result = {
        **provenance(command_line("python -m benchmarks.preprocess", argv)),
        "images": len(images),
        "mean_kb": round(sum(map(len, images)) / len(images) / 1000, 1),
        "ms_per_image": median | {"total": round(sum(median.values()), 3)},
        "passes": passes,
    }
    m = result["machine"]
    lines = [
        f"Command: `{result['command']}` ({result['created_at']}); {m['cpu']}, Python {m['python']}. "
        f"{len(images)} JPEGs (mean {result['mean_kb']} KB), one thread, median of {args.repeats} passes.",
        "",
        "| stage | ms per image |",
        "|---|---|",
        *(f"| {stage} | {value} |" for stage, value in result["ms_per_image"].items()),
    ]
    save(args.out, args.name, result, lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""What one uploaded image can cost to decode: bytes sent against CPU time and peak memory, format by format.

    python -m benchmarks.decode_cost                      # 39.9 MP images that compress to almost nothing
    python -m benchmarks.decode_cost --megapixels 39.9 12 --name decode-cost

A JPEG is decoded reduced (its DCT scaling, the manifest's `jpeg_draft`), so even a 40 MP photo is cheap; every
other format is decoded whole, and a flat 40 MP PNG or Group-4 TIFF is a few KiB on the wire. Each image is
decoded by `service.imaging.preprocess` with the service's default limits (`Settings.from_env()`), in a fresh
Python process of its own that has imported and warmed the decoder: the growth of its peak RSS (`VmHWM`) is
what the image cost, nothing else. Writes results/<name>.{json,md}.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from PIL import Image

from benchmarks.report import command_line, provenance, save

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
# (format, Pillow mode, save options): what a hostile client would pick, and the usual photo formats.
CASES: list[tuple[str, str, dict[str, Any]]] = [
    ("JPEG", "RGB", {}),
    ("PNG", "RGB", {"optimize": True}),
    ("PNG", "RGBA", {"optimize": True}),
    ("PNG", "L", {"optimize": True}),
    ("PNG", "P", {"optimize": True, "transparency": 0}),
    ("GIF", "P", {}),
    ("WEBP", "RGB", {"lossless": True}),
    ("TIFF", "1", {"compression": "group4"}),
]
CHILD = """
import json, sys, time
from pathlib import Path
from service.imaging import preprocess, warm_up
from service.errors import ServiceError
from service.manifest import Manifest
from service.settings import Settings
settings = Settings.from_env({})
spec = Manifest.read(Path("artifacts")).preprocessing
limits = {"max_decode_bytes": settings.max_decode_bytes} if hasattr(settings, "max_decode_bytes") else {}
warm_up()
data = Path(sys.argv[1]).read_bytes()
def high_water_kib():
    # VmHWM, not ru_maxrss: Linux carries a parent's ru_maxrss into the child it forks and execs.
    line = next(l for l in open("/proc/self/status") if l.startswith("VmHWM:"))
    return int(line.split()[1])
before = high_water_kib()
started = time.perf_counter()
try:
    preprocess(data, spec, settings.max_image_pixels, **limits)
    outcome = "decoded"
except ServiceError as exc:
    outcome = f"{exc.status_code} {exc.code}"
seconds = time.perf_counter() - started
after = high_water_kib()
growth_mb = round((after - before) / 1024, 1)
print(json.dumps({"outcome": outcome, "ms": round(seconds * 1000, 1), "peak_rss_growth_mb": growth_mb}))
"""


def flat_image(mode: str, megapixels: float) -> Image.Image:
    """One colour over the whole frame (4:3): compresses to almost nothing, decodes to its full size."""
    width = round(math.sqrt(megapixels * 1e6 * 4 / 3))
    height = round(megapixels * 1e6 / width)
    colour: Any = {"RGB": (10, 200, 30), "RGBA": (10, 200, 30, 128), "1": 1}.get(mode, 100)
    return Image.new(mode, (width, height), colour)


def decode_in_a_fresh_process(path: Path) -> dict[str, Any]:
    """The outcome of preprocessing the file at `path` with the default limits, its time, its peak RSS growth."""
    child = subprocess.run(
        [sys.executable, "-c", CHILD, str(path)], cwd=ROOT, capture_output=True, text=True, check=True
    )
    result: dict[str, Any] = json.loads(child.stdout.strip().splitlines()[-1])
    return result


def measure(fmt: str, mode: str, options: dict[str, Any], megapixels: float, work: Path) -> dict[str, Any]:
    buffer = io.BytesIO()
    image = flat_image(mode, megapixels)
    image.save(buffer, format=fmt, **options)
    path = work / f"{fmt}-{mode}-{megapixels}.img"
    path.write_bytes(buffer.getvalue())
    return {
        "format": fmt,
        "mode": mode,
        "size": f"{image.width}x{image.height}",
        "megapixels": megapixels,
        "upload_kib": round(len(buffer.getvalue()) / 1024, 1),
        **decode_in_a_fresh_process(path),
    }


def markdown(result: dict[str, Any]) -> list[str]:
    m = result["machine"]
    lines = [
        f"Command: `{result['command']}` ({result['created_at']}); {m['cpu']}, Python {m['python']}. Each image "
        "decoded once by `service.imaging.preprocess` with the default limits, in a fresh process of its own.",
        "",
        "| format | mode | size | upload KiB | outcome | ms | peak RSS growth MB |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["images"]:
        lines.append(
            f"| {r['format']} | {r['mode']} | {r['size']} | {r['upload_kib']} | {r['outcome']} | {r['ms']} | "
            f"{r['peak_rss_growth_mb']} |"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.decode_cost", description=__doc__.split("\n\n")[0])
    parser.add_argument("--megapixels", type=float, nargs="+", default=[39.9])
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--name", default="decode-cost")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="decode-cost-") as tmp:
        images = [
            measure(fmt, mode, options, megapixels, Path(tmp))
            for megapixels in args.megapixels
            for fmt, mode, options in CASES
        ]
    result = {**provenance(command_line("python -m benchmarks.decode_cost", argv)), "images": images}
    save(args.out, args.name, result, markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

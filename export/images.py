"""Image sets for calibration and parity: a user's folder, or a deterministic synthetic photo-like set.

TensorFlow-free, so the benchmarks can generate the same kind of images.
"""

from __future__ import annotations

from collections.abc import Iterator
from io import BytesIO
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


def synthetic_photo(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """A smooth, textured RGB scene: sky/ground gradients, blurred shapes, sensor noise.

    Not a car, but with the low-frequency structure, edges and colour statistics of a photograph, which
    uniform noise lacks (and which calibrating int8 ranges on noise gets badly wrong).
    """
    sky, ground = rng.uniform(40, 230, 3), rng.uniform(20, 180, 3)
    horizon = rng.uniform(0.3, 0.7)
    t = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None, None]
    base = np.where(t < horizon, sky * (1 - 0.5 * t), ground * (0.6 + 0.4 * t))
    base = np.broadcast_to(base, (height, width, 3)).copy()
    # Low-frequency illumination field, upsampled from a coarse grid.
    coarse = Image.fromarray(rng.uniform(0, 255, (6, 8, 3)).astype(np.uint8)).resize((width, height), Image.BICUBIC)
    base = 0.75 * base + 0.25 * np.asarray(coarse, dtype=np.float32)
    image = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(3, 9))):
        x0, y0 = rng.uniform(0, width * 0.8), rng.uniform(height * 0.2, height * 0.9)
        w, h = rng.uniform(0.1, 0.5) * width, rng.uniform(0.05, 0.3) * height
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        box = (x0, y0, x0 + w, y0 + h)
        (draw.ellipse if rng.random() < 0.5 else draw.rounded_rectangle)(box, fill=colour)
    image = image.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.5, 2.0))))
    noisy = np.asarray(image, dtype=np.float32) + rng.normal(0, 4, (height, width, 3))
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def synthetic_jpegs(
    count: int, seed: int, sizes: tuple[tuple[int, int], ...] = ((320, 240), (480, 360), (640, 480), (800, 600))
) -> list[bytes]:
    """`count` JPEG files as bytes, identical for the same seed on any machine."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        width, height = sizes[i % len(sizes)]
        buffer = BytesIO()
        synthetic_photo(rng, width, height).save(buffer, format="JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


def folder_images(folder: Path, limit: int | None = None) -> list[bytes]:
    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not paths:
        raise FileNotFoundError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) under {folder}")
    return [p.read_bytes() for p in paths[:limit]]


def batches(arrays: np.ndarray, size: int) -> Iterator[np.ndarray]:
    for start in range(0, len(arrays), size):
        yield arrays[start : start + size]

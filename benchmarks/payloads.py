"""The benchmark's request bodies: deterministic photo-like JPEGs of mixed sizes, generated once and cached.

Every system under test sees the same bytes. Many distinct images per run: sending the same few again and
again would hide decode cost and flatter any cache.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from export.images import synthetic_photo

CACHE = Path(__file__).parent / ".cache" / "images"
SIZES = ((640, 480), (800, 600), (1024, 768), (1280, 720), (1600, 1200), (1920, 1080))
COUNT = 48
SEED = 2024


def image_paths(count: int = COUNT, cache: Path = CACHE) -> list[Path]:
    cache.mkdir(parents=True, exist_ok=True)
    paths = [cache / f"{i:03d}-{SIZES[i % len(SIZES)][0]}x{SIZES[i % len(SIZES)][1]}.jpg" for i in range(count)]
    if not all(p.exists() for p in paths):
        rng = np.random.default_rng(SEED)
        for i, path in enumerate(paths):
            width, height = SIZES[i % len(SIZES)]
            image = synthetic_photo(rng, width, height)
            tmp = path.with_suffix(".tmp")
            image.save(tmp, format="JPEG", quality=88)
            tmp.replace(path)
    return paths


def image_bytes(count: int = COUNT) -> list[bytes]:
    return [p.read_bytes() for p in image_paths(count)]

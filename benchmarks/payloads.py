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
# Phone-upload and web-thumbnail sizes, where decoding is cheap and the engine is most of a request.
SMALL_SIZES = ((640, 480), (560, 310))
SMALL_SEED = 2025
# The image sets a benchmark can name: sizes and seed (each set is COUNT distinct images, sizes in turn).
SETS = {"large": (SIZES, SEED), "small": (SMALL_SIZES, SMALL_SEED)}


def image_paths(
    count: int = COUNT, cache: Path = CACHE, sizes: tuple[tuple[int, int], ...] = SIZES, seed: int = SEED
) -> list[Path]:
    if seed != SEED:  # the large set keeps its file names (and its cache) from before there were sets
        cache = cache / f"seed-{seed}"
    cache.mkdir(parents=True, exist_ok=True)
    paths = [cache / f"{i:03d}-{sizes[i % len(sizes)][0]}x{sizes[i % len(sizes)][1]}.jpg" for i in range(count)]
    if not all(p.exists() for p in paths):
        rng = np.random.default_rng(seed)
        for i, path in enumerate(paths):
            width, height = sizes[i % len(sizes)]
            image = synthetic_photo(rng, width, height)
            tmp = path.with_suffix(".tmp")
            image.save(tmp, format="JPEG", quality=88)
            tmp.replace(path)
    return paths


def image_bytes(count: int = COUNT) -> list[bytes]:
    return [p.read_bytes() for p in image_paths(count)]


def image_set(name: str) -> list[bytes]:
    """The COUNT JPEGs of a named set ("large": the default benchmark images; "small": 640x480 and 560x310)."""
    if name not in SETS:
        raise ValueError(f"unknown image set {name!r}; the sets are {', '.join(SETS)}")
    sizes, seed = SETS[name]
    return [p.read_bytes() for p in image_paths(COUNT, sizes=sizes, seed=seed)]

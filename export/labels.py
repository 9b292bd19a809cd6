"""Class names: a user's file, or the 196 Stanford Cars names that the tensorflow-datasets package ships."""

from __future__ import annotations

import tempfile
from pathlib import Path


def stanford_cars_names() -> list[str]:
    """The cars196 names in class-index order, from tensorflow-datasets' builder metadata (no download)."""
    import tensorflow_datasets as tfds

    with tempfile.TemporaryDirectory() as empty:
        names = list(tfds.builder("cars196", data_dir=empty).info.features["label"].names)
    if len(names) != 196:
        raise RuntimeError(f"tensorflow-datasets' cars196 builder lists {len(names)} names, expected 196")
    return names


def read_names(path: Path) -> list[str]:
    names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    names = [n for n in names if n]
    if not names:
        raise ValueError(f"{path} holds no class names")
    if len(set(names)) != len(names):
        raise ValueError(f"{path} repeats class names")
    return names

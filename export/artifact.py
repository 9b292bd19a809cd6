"""Write an artifact folder (model.onnx, labels.txt, manifest.json) atomically."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path

from service.manifest import Labels, Manifest, ModelFile, sha256_file

MODEL_FILE = "model.onnx"
LABELS_FILE = "labels.txt"


def write_artifact(out: Path, model_path: Path, labels: list[str], manifest: Manifest) -> Manifest:
    """Fill in the file hashes and sizes, then replace `out` in one rename: readers see the old or the new."""
    out = out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        shutil.copyfile(model_path, staging / MODEL_FILE)
        labels_bytes = ("\n".join(labels) + "\n").encode("utf-8")
        (staging / LABELS_FILE).write_bytes(labels_bytes)
        manifest = replace(
            manifest,
            model=replace(
                manifest.model,
                file=MODEL_FILE,
                sha256=sha256_file(staging / MODEL_FILE),
                bytes=(staging / MODEL_FILE).stat().st_size,
            ),
            labels=Labels(file=LABELS_FILE, count=len(labels), sha256=hashlib.sha256(labels_bytes).hexdigest()),
        )
        manifest.write(staging)
        os.chmod(staging, 0o755)
        if out.exists():
            retired = Path(tempfile.mkdtemp(prefix=f".{out.name}-old-", dir=out.parent))
            os.replace(out, retired / out.name)
            os.replace(staging, out)
            shutil.rmtree(retired)
        else:
            os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return manifest


def placeholder_model_file(quantization: str, opset: int) -> ModelFile:
    # Hash and size are filled in by write_artifact from the bytes actually written.
    return ModelFile(file=MODEL_FILE, sha256="", bytes=0, opset=opset, quantization=quantization)

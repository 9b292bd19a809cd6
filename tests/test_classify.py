"""`python -m service.classify`, run as a user runs it: a real process over real folders of generated images,
the tiny real model in onnxruntime, and (--url) a real server."""

from __future__ import annotations

import csv
import io
import json
import os
import pty
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.helpers import ROOT, image_bytes, running_service, server_metric, write_tiny_artifact

PASSED, FAILED, BAD_ARGUMENTS, INTERRUPTED = 0, 1, 2, 130
RED, GREEN, BLUE = (200, 20, 20), (20, 200, 20), (20, 20, 200)


def classify(*args: str, stdin: str | None = None, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "service.classify", *args],
        cwd=ROOT, env={**os.environ, **env}, input=stdin, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def rows(text: str) -> list[list[str]]:
    return list(csv.reader(io.StringIO(text)))


def noise_png(size: int) -> bytes:
    pixels = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    """Good images in several formats (one named .dat), nested; a corrupt JPEG, a text file, an empty file, a
    symlink loop, a broken symlink, an image over MAX_UPLOAD_BYTES."""
    root = tmp_path / "photos"
    (root / "b" / "deeper").mkdir(parents=True)
    (root / "a-red.jpg").write_bytes(image_bytes(RED, fmt="JPEG"))
    (root / "b" / "green.dat").write_bytes(image_bytes(GREEN, fmt="WEBP"))
    (root / "b" / "deeper" / "blue.png").write_bytes(image_bytes(BLUE))
    (root / "b" / "loop").symlink_to("..")
    (root / "c-corrupt.jpg").write_bytes(image_bytes(RED, fmt="JPEG")[:80])
    (root / "d-notes.txt").write_text("not an image")
    (root / "e-empty.jpg").write_bytes(b"")
    (root / "f-gone.jpg").symlink_to(root / "nowhere.jpg")
    (root / "g-huge.png").write_bytes(noise_png(200))
    return root


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("classify") / "tiny"
    write_tiny_artifact(out)
    return out


def test_a_folder_gives_a_row_per_image_in_order_with_the_services_error_codes(photos: Path, tiny: Path) -> None:
    done = classify(str(photos), "--model-dir", str(tiny), MAX_UPLOAD_BYTES="100000")
    assert done.returncode == FAILED, done.stderr
    table = rows(done.stdout)
    assert table[0] == ["path", "class", "score", "error", "message"]
    by_path = {row[0]: row for row in table[1:]}
    expected = ["a-red.jpg", "b/deeper/blue.png", "b/green.dat", "c-corrupt.jpg", "f-gone.jpg", "g-huge.png"]
    assert [row[0] for row in table[1:]] == [str(photos / name) for name in expected]  # the loop walked once
    assert [by_path[str(photos / name)][1] for name in expected[:3]] == ["red", "blue", "green"]
    assert 0.9 < float(by_path[str(photos / "a-red.jpg")][2]) <= 1
    assert by_path[str(photos / "c-corrupt.jpg")][3] == "invalid_image"
    assert by_path[str(photos / "f-gone.jpg")][3:] == ["unreadable", "cannot read the file: No such file or directory"]
    assert by_path[str(photos / "g-huge.png")][3] == "payload_too_large"
    assert "classified 3 of 6 images" in done.stderr
    assert "3 failed (" in done.stderr and "1 invalid_image" in done.stderr and "2 unreadable" not in done.stderr
    assert "2 other files skipped" in done.stderr  # the text file and the empty one


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a file whatever its mode")
def test_an_unreadable_file_is_an_error_row(tmp_path: Path, tiny: Path) -> None:
    locked = tmp_path / "locked.png"
    locked.write_bytes(image_bytes(RED))
    locked.chmod(0)
    done = classify(str(locked), "--model-dir", str(tiny))
    assert done.returncode == FAILED
    assert rows(done.stdout)[1][3:] == ["unreadable", "cannot read the file: Permission denied"]


def test_jsonl_top_k_and_paths_from_standard_input(photos: Path, tiny: Path) -> None:
    listed = f"{photos / 'b' / 'deeper' / 'blue.png'}\n{photos / 'a-red.jpg'}\n{photos / 'c-corrupt.jpg'}\n"
    done = classify("-", "--model-dir", str(tiny), "--format", "jsonl", "--top-k", "2", stdin=listed)
    assert done.returncode == FAILED, done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert [line["path"] for line in lines] == listed.split()
    assert lines[0]["class"] == "blue" and [item["class"] for item in lines[0]["top_k"]][0] == "blue"
    assert len(lines[1]["top_k"]) == 2 and lines[1]["top_k"][0]["score"] == lines[1]["score"]
    assert lines[2]["error"]["code"] == "invalid_image" and "class" not in lines[2]


def test_every_image_classified_exits_0_and_bad_arguments_exit_2(tmp_path: Path, tiny: Path) -> None:
    (tmp_path / "red.png").write_bytes(image_bytes(RED))
    assert classify(str(tmp_path), "--model-dir", str(tiny)).returncode == PASSED
    for bad in (["--top-k", "0"], ["--resume"], ["--format", "xml"], ["--connections", "0"]):
        done = classify(str(tmp_path), "--model-dir", str(tiny), *bad)
        assert done.returncode == BAD_ARGUMENTS, (bad, done.stderr)
        assert "Traceback" not in done.stderr
    assert classify(str(tmp_path), THREADS="none").returncode == BAD_ARGUMENTS
    broken = classify(str(tmp_path), "--model-dir", str(tmp_path))
    assert broken.returncode == 3 and "cannot load the artifact" in broken.stderr


def test_sigint_keeps_every_finished_row_and_resume_completes_without_repeating_one(tmp_path: Path) -> None:
    slow = tmp_path / "slow"
    write_tiny_artifact(slow, busy_matmuls=60)  # tens of ms a run: the process is surely mid-run when signalled
    folder = tmp_path / "many"
    folder.mkdir()
    names = [f"{i:03d}.png" for i in range(60)]
    for i, name in enumerate(names):
        (folder / name).write_bytes(image_bytes((i * 4, 100, 50)))
    out = tmp_path / "rows.csv"
    env = {**os.environ, "THREADS": "1", "WORKERS": "1"}
    command = [sys.executable, "-m", "service.classify", str(folder), "--model-dir", str(slow), "--out", str(out)]
    process = subprocess.Popen(command, cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not out.exists() or out.read_text().count("\n") < 4:
        assert time.monotonic() < deadline and process.poll() is None, "no rows came"
        time.sleep(0.02)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == INTERRUPTED, stderr
    assert "interrupted" in stderr and "Traceback" not in stderr
    first = rows(out.read_text())
    assert all(len(row) == 5 and row[1] for row in first[1:])
    assert [row[0] for row in first[1:]] == [str(folder / n) for n in names[: len(first) - 1]]
    assert len(first) - 1 < len(names), "the run finished before the signal: nothing was interrupted"

    resumed = subprocess.run([*command, "--resume"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert resumed.returncode == PASSED, resumed.stderr
    assert f"{len(first) - 1} already in the output" in resumed.stderr
    final = rows(out.read_text())
    assert final[0] == first[0] and [row[0] for row in final[1:]] == [str(folder / n) for n in names]


def test_resume_cuts_off_a_row_cut_short(tmp_path: Path, tiny: Path) -> None:
    (tmp_path / "in").mkdir()
    for name, colour in (("1.png", RED), ("2.png", GREEN)):
        (tmp_path / "in" / name).write_bytes(image_bytes(colour))
    out = tmp_path / "rows.jsonl"
    out.write_text(json.dumps({"path": str(tmp_path / "in" / "1.png"), "class": "red", "score": 1.0}) + '\n{"path": "')
    done = classify(str(tmp_path / "in"), "--model-dir", str(tiny), "--out", str(out), "--format", "jsonl", "--resume")
    assert done.returncode == PASSED, done.stderr
    assert [json.loads(line)["class"] for line in out.read_text().splitlines()] == ["red", "green"]


def _stderr_under_a_terminal(args: list[str]) -> str:
    controller, terminal = pty.openpty()
    process = subprocess.Popen(
        [sys.executable, "-m", "service.classify", *args], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=terminal
    )
    os.close(terminal)
    seen = b""
    while True:
        try:
            chunk = os.read(controller, 4096)
        except OSError:  # EIO: the process has exited and closed the terminal
            break
        if not chunk:
            break
        seen += chunk
    os.close(controller)
    assert process.wait(timeout=60) == PASSED
    return seen.decode()


def test_the_progress_bar_shows_on_a_terminal_and_not_in_a_pipe(photos: Path, tiny: Path, tmp_path: Path) -> None:
    folder = tmp_path / "some"
    folder.mkdir()
    for i in range(20):
        (folder / f"{i}.png").write_bytes(image_bytes((i * 10, 0, 0)))
    shown = _stderr_under_a_terminal([str(folder), "--model-dir", str(tiny)])
    assert "\r" in shown and "images/s" in shown and " files" in shown, shown
    assert "classified 20 of 20 images" in shown
    quiet = _stderr_under_a_terminal([str(folder), "--model-dir", str(tiny), "--quiet"])
    assert "\r[" not in quiet and " files" not in quiet and "classified 20 of 20 images" in quiet
    piped = classify(str(folder), "--model-dir", str(tiny))
    assert piped.stderr.splitlines() == [line for line in piped.stderr.splitlines() if line.startswith("classified")]


def test_url_gives_the_same_rows_as_the_local_engine(photos: Path, tmp_path: Path) -> None:
    """A slow model and a queue of one behind more connections: some answers are 503s, retried after Retry-After."""
    (photos / "g-huge.png").unlink()  # the upload limit is the client's own setting: the rest is the service's
    slow = tmp_path / "slow"
    write_tiny_artifact(slow, busy_matmuls=20)
    local = classify(str(photos), "--model-dir", str(slow), "--top-k", "3")
    with running_service(slow, tmp_path / "server.log", MAX_QUEUE="1", WORKERS="1", THREADS="1") as server:
        remote = classify(str(photos), "--url", server.url, "--top-k", "3", "--connections", "4")
        refused = server_metric(server, "http_requests_total", route="/infer", status="503")
    assert remote.returncode == local.returncode == FAILED, remote.stderr
    assert remote.stdout == local.stdout  # rows, order, scores to the last digit, error codes and messages
    assert refused > 0, "no request was refused: the retry after Retry-After went untested"
    unreachable = classify(str(photos), "--url", "http://127.0.0.1:9")
    assert unreachable.returncode == 3 and "cannot reach the service" in unreachable.stderr

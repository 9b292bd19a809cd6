"""`python -m service.classify PATH...`: classify a folder of photos with the service's own engine.

The same code path as the service (manifest, artifact verification, decoding with its bounds, the scheduler
with its decode stage and WORKERS workers), without HTTP: files are read a bounded window ahead of the engine
and the rows written in input order as they complete, so memory stays flat whatever the folder's size.
`--url` sends the same images to a running service instead. docs/api.md describes the options and the rows.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import signal
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Protocol

from service.classify_engines import LocalEngine, RemoteEngine
from service.classify_files import Reader, paths
from service.classify_output import Row, Tally, Writer, finished, is_terminal, open_output
from service.inference import UNTRAINED_SHORT
from service.model import ArtifactError, Classifier
from service.settings import Settings, SettingsError

INTERRUPTED = 130  # as a shell reports a process that SIGINT ended
MAX_TOP_K = 20  # as POST /infer's top_k


class Engine(Protocol):
    window: int
    warning: str

    async def start(self) -> None: ...

    async def classify(self, path: str, data: bytes) -> Row: ...

    async def close(self) -> None: ...


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m service.classify", description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="+", metavar="PATH", help="image files or folders (recursive); - reads paths")
    parser.add_argument("--out", type=Path, help="write the rows to this file (default: standard output)")
    parser.add_argument("--format", choices=("csv", "jsonl"), default="csv")
    parser.add_argument("--top-k", type=int, metavar="N", help=f"the N best classes (1-{MAX_TOP_K}) in each row")
    parser.add_argument("--resume", action="store_true", help="skip the paths already in --out; append the rest")
    parser.add_argument("--quiet", action="store_true", help="no progress bar, only the summary")
    parser.add_argument("--model-dir", type=Path, help="the artifact (default: MODEL_DIR, else ./artifacts)")
    parser.add_argument("--url", help="classify with the service at this URL instead of in this process")
    parser.add_argument("--connections", type=int, default=4, help="--url: concurrent connections (default 4)")
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except KeyboardInterrupt:  # before the run (loading the model): nothing written yet
        return INTERRUPTED


def _main(argv: list[str] | None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.top_k is not None and not 1 <= args.top_k <= MAX_TOP_K:
        parser.error(f"--top-k must be from 1 to {MAX_TOP_K}")
    if args.resume and args.out is None:
        parser.error("--resume needs --out: the file whose rows are kept")
    if args.connections < 1:
        parser.error("--connections must be at least 1")
    try:
        settings = Settings.from_env()
    except SettingsError as exc:
        parser.error(f"bad setting: {exc}")
    if args.model_dir is not None:
        settings = dataclasses.replace(settings, model_dir=args.model_dir)
    try:
        engine = _engine(args, settings)
    except ValueError as exc:
        parser.error(str(exc))
    except ArtifactError as exc:
        print(f"classify: cannot load the artifact in {settings.model_dir}: {exc}", file=sys.stderr)
        return 3
    except ConnectionError as exc:
        print(f"classify: {exc}", file=sys.stderr)
        return 3
    jsonl = args.format == "jsonl"
    done, started = finished(args.out, jsonl) if args.resume else (set(), False)
    tally = Tally(sys.stderr if is_terminal(sys.stderr) and not args.quiet else None)
    if tally.bar_shown and "-" not in args.paths:  # the count of files, for the time left, off the main work
        threading.Thread(target=_count, args=(tally, args.paths), daemon=True).start()
    stream = open_output(args.out, append=args.resume)
    try:
        writer = Writer(stream, jsonl, args.top_k, header=not started)
        reader = Reader(args.paths, done, settings.max_upload_bytes)
        interrupted = asyncio.run(_run(engine, reader, writer, tally))
    finally:
        if args.out is not None:
            stream.close()
    print(tally.summary(interrupted), file=sys.stderr)
    if engine.warning:
        print(f"classify: warning: {engine.warning}", file=sys.stderr)
    return INTERRUPTED if interrupted else 1 if tally.failed else 0


def _engine(args: argparse.Namespace, settings: Settings) -> Engine:
    if args.url:
        remote = RemoteEngine(args.url, args.connections, args.top_k)
        remote.check()
        return remote
    model = Classifier.load(settings.model_dir, settings.intra_op_threads, warm=True)
    engine = LocalEngine(settings, model, args.top_k)
    if not model.manifest.trained:
        engine.warning = UNTRAINED_SHORT
    return engine


def _count(tally: Tally, arguments: list[str]) -> None:
    tally.total = sum(1 for _ in paths(arguments))


async def _run(engine: Engine, reader: Reader, writer: Writer, tally: Tally) -> bool:
    """Classify every item, writing its row in order; whether a signal (SIGINT, SIGTERM) cut the run short.
    The first signal stops the reading and lets the images in flight finish; a second stops at once."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    await engine.start()
    pending: asyncio.Queue[asyncio.Future[Row] | None] = asyncio.Queue(engine.window)
    reading = ThreadPoolExecutor(1, thread_name_prefix="reader")

    async def produce() -> None:
        while not stop.is_set() and (item := await loop.run_in_executor(reading, reader.next)) is not None:
            tally.resumed = reader.resumed
            if item.skipped:
                tally.skip()
            elif item.data is None:
                await pending.put(_ready(Row(item.path, code=item.code, message=item.message)))
            else:
                await pending.put(asyncio.ensure_future(engine.classify(item.path, item.data)))
        await pending.put(None)

    async def consume() -> None:
        while (future := await pending.get()) is not None:
            row = await future
            writer.write(row)
            tally.add(row)

    consumer = asyncio.ensure_future(consume())
    producer = asyncio.ensure_future(produce())
    producer.add_done_callback(lambda task: task.cancelled() or task.exception() is None or consumer.cancel())

    def on_signal() -> None:
        if stop.is_set():
            consumer.cancel()
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)
    try:
        with contextlib.suppress(asyncio.CancelledError):
            await consumer
        producer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await producer  # re-raises what made the reading fail, if anything did
    finally:
        while not pending.empty():  # the images in flight when a second signal came: nobody waits for them
            future = pending.get_nowait()
            if future is not None:
                future.cancel()
        reading.shutdown(wait=False, cancel_futures=True)
        await engine.close()
    return stop.is_set()


def _ready(row: Row) -> asyncio.Future[Row]:
    future: asyncio.Future[Row] = asyncio.get_running_loop().create_future()
    future.set_result(row)
    return future


if __name__ == "__main__":
    sys.exit(main())

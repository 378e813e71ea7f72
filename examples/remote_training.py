"""Train from a PickledDataset served over HTTP, with a local cache of what was fetched.

The script serves a folder on 127.0.0.1 (Starlette's static files, which
answer byte-range requests, under uvicorn, in a thread), generates a
two-class dataset file in it if needed, then trains a logistic regression
for a few epochs from ``http://127.0.0.1:PORT/NAME``: items come by range
requests, a batch's neighbours grouped into one request, and with
``--cache`` the fetched bytes are kept on disk, so the epochs after the
first make no request at all.

    python examples/remote_training.py --folder served --cache remote-cache --epochs 3

To serve an existing folder for another process instead (Ctrl-C stops it):

    python examples/remote_training.py --folder served --serve-only --port 8002

It prints, for each epoch, the mean loss, the items per second and the
requests made; then the accuracy of the final model.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import uvicorn
from starlette.applications import Starlette
from starlette.routing import Mount
from starlette.staticfiles import StaticFiles

from mlworkflow_async import DictDataset, PickledDataset

NAME = "train.pkl"


def make_data(path: Path, items: int, features: int = 8, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, items)
    x = rng.normal(0, 1, (items, features)).astype(np.float32) + labels[:, None] * 1.5
    source = DictDataset({i: {"x": x[i], "y": int(labels[i])} for i in range(items)})
    asyncio.run(PickledDataset.create(source, path))


@contextmanager
def serve(folder: Path, port: int = 0) -> Iterator[str]:
    """Serve ``folder`` on 127.0.0.1 from a thread; yield its base URL."""
    app = Starlette(routes=[Mount("/", StaticFiles(directory=folder))])
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind(("127.0.0.1", port))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:  # uvicorn offers no event to wait on
            if time.monotonic() > deadline or not thread.is_alive():
                raise RuntimeError("the HTTP server did not start")
            time.sleep(0.01)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def train(url: str, cache: str | None, epochs: int, batch_size: int) -> float:
    options: dict[str, Any] = {} if cache is None else {"cache_dir": cache}
    with PickledDataset(url, **options) as ds:
        source: Any = ds._reader.source  # type: ignore[union-attr]
        weights = np.zeros(len(ds.sync.query_item(0)["x"]), np.float64)
        bias = 0.0
        for epoch in range(epochs):
            before, started, losses = source.stats.requests, time.perf_counter(), []
            for _, batch in ds.sync.batches(batch_size, shuffle=0, epoch=epoch):
                x, y = batch["x"].astype(np.float64), batch["y"]
                p = 1 / (1 + np.exp(-(x @ weights + bias)))
                loss = -np.mean(y * np.log(p + 1e-9) + (1 - y) * np.log(1 - p + 1e-9))
                losses.append(float(loss))
                weights -= 0.5 * x.T @ (p - y) / len(y)
                bias -= 0.5 * float(np.mean(p - y))
            seconds = time.perf_counter() - started
            print(f"epoch {epoch + 1}/{epochs}: mean loss {np.mean(losses):.4f}, "
                  f"{len(ds) / seconds:,.0f} items/s, {source.stats.requests - before} requests")
        everything = ds.sync.query_items(list(ds.yield_keys()))
    x = np.stack([item["x"] for item in everything])
    y = np.array([item["y"] for item in everything])
    accuracy = float(np.mean(((x @ weights + bias) > 0) == y))
    print(f"final accuracy on all {len(y)} items: {accuracy:.1%}")
    return accuracy


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", type=Path, required=True, help="the folder to serve")
    parser.add_argument("--items", type=int, default=4096)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--cache", help="keep the fetched bytes in this folder")
    parser.add_argument("--serve-only", action="store_true", help="only serve the folder")
    parser.add_argument("--port", type=int, default=0, help="with --serve-only")
    args = parser.parse_args(argv)
    args.folder.mkdir(parents=True, exist_ok=True)
    path = args.folder / NAME
    if not path.exists():
        make_data(path, args.items)
        print(f"wrote {args.items} items to {path}")
    with serve(args.folder, args.port if args.serve_only else 0) as base:
        if args.serve_only:
            print(f"serving {args.folder} at {base}/ (Ctrl-C stops)", flush=True)
            try:
                threading.Event().wait()
            except KeyboardInterrupt:
                return 0
        print(f"training from {base}/{NAME}")
        train(f"{base}/{NAME}", args.cache, args.epochs, args.batch_size)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A small async HTTP service that hands out training batches.

Clients (training workers, say) ask for the next batch; the service reads
the items from a ``PickledDataset`` and passes them through a transform
chain: normalisation, then an awaited lookup standing for any I/O a real
service waits for (a feature store, a remote decoder). Requests are served
concurrently on one event loop, so ``/health`` keeps answering at once
while batches load.

    python examples/data_service.py --data data.pickle --port 8000
    curl 'http://127.0.0.1:8000/batch?size=4'              # JSON
    curl 'http://127.0.0.1:8000/batch?size=4&format=npy'   # .npy bytes
    curl -H 'Accept: application/x-npy' 'http://127.0.0.1:8000/batch?size=4'
    curl 'http://127.0.0.1:8000/health'

The data file is generated at start-up if it does not exist: ``--items``
float32 feature vectors with an integer label each; their per-feature mean
and standard deviation are stored in the file's context and used to
normalise. The context also records the settings that generated the file,
which is generated again when ``--items`` or ``--features`` differ.

Each request takes the next ``size`` keys from a shared cursor that cycles
through the keys epoch after epoch, so concurrent requests get distinct
batches even when their sizes differ. At most ``--max-loading`` batches
load at once; more requests wait their turn.

A JSON batch is ``{"epoch", "keys", "x", "label"}``. A ``.npy`` batch is one
structured array with the fields ``key``, ``label`` and ``x``; read it with
``numpy.load(io.BytesIO(body))``.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import io
import signal
import socket
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from mlworkflow_async import Dataset, PickledDataset, TransformedDataset
from mlworkflow_async.exceptions import PickledFileError

NPY_MEDIA_TYPE = "application/x-npy"
MAX_BATCH = 1024


# -- the data -------------------------------------------------------------------


#: The context entry of the data file: the settings its data was generated with.
GENERATED_WITH = "generated_with"


def data_settings(items: int, features: int, seed: int) -> dict[str, Any]:
    """What defines the generated data: equal settings generate equal data."""
    return {"items": items, "features": features, "seed": seed}


class GeneratedData(Dataset[int, dict[str, Any]]):
    """Random feature vectors and labels; ``context`` holds their statistics."""

    def __init__(self, items: int, features: int, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        centres = rng.uniform(-5, 5, features)
        spreads = rng.uniform(0.5, 3, features)
        self.x = rng.normal(centres, spreads, (items, features)).astype(np.float32)
        self.labels = rng.integers(0, 10, items)
        self.context = {
            "mean": self.x.mean(axis=0).tolist(),
            "std": self.x.std(axis=0).tolist(),
            GENERATED_WITH: data_settings(items, features, seed),
        }

    def yield_keys(self) -> range:
        return range(len(self.x))

    async def query_item(self, key: int) -> dict[str, Any]:
        return {"x": self.x[key], "label": int(self.labels[key])}


async def prepare_data(path: Path, items: int, features: int, seed: int = 0) -> str:
    """Generate the data file at ``path`` unless it holds that data; say which it did.

    Returns ``"found"``, ``"generated"``, or ``"generated again: ..."`` with
    the reason when the file held data made with other settings. A file that
    is not a dataset file raises ``FileExistsError`` and is left alone.
    """
    origin = "generated"
    wanted = data_settings(items, features, seed)
    if await anyio.Path(path).exists():
        try:
            # Only the context is needed; safe=True loads no class from the file.
            async with await PickledDataset.open(path, safe=True) as stored:
                found = stored.context.get(GENERATED_WITH)
        except PickledFileError as exc:
            raise FileExistsError(f"{exc}; pass another --data, or remove {path}") from exc
        if found == wanted:
            return "found"
        origin = f"generated again: {_difference(found, wanted)}"
    await PickledDataset.create(GeneratedData(items, features, seed), path)
    return origin


def _difference(found: object, wanted: dict[str, Any]) -> str:
    if not isinstance(found, dict):
        return "it did not say which data it held"
    changed = [
        f"{name} {found.get(name)!r} -> {value!r}"
        for name, value in wanted.items()
        if found.get(name) != value
    ]
    return "it held other data (" + ", ".join(changed) + ")"


def transformed(stored: PickledDataset, latency: float) -> TransformedDataset[int, Any]:
    """The items of ``stored``, normalised, then after an awaited ``latency``."""
    mean = np.asarray(stored.context["mean"], np.float32)
    std = np.asarray(stored.context["std"], np.float32)

    def normalise(key: int, item: dict[str, Any]) -> dict[str, Any]:
        return {"x": (item["x"] - mean) / std, "label": item["label"]}

    async def lookup(key: int, item: dict[str, Any]) -> dict[str, Any]:
        await asyncio.sleep(latency)  # stands for a remote lookup the service awaits
        return item

    return TransformedDataset(stored, [normalise, lookup])


class KeyCursor:
    """Hands out the next keys, cycling through all of them epoch after epoch."""

    def __init__(self, keys: Sequence[int]) -> None:
        self.keys = keys
        self.position = 0
        self.epoch = 0

    def take(self, size: int) -> tuple[int, list[int]]:
        """The epoch of the first key, and the next ``size`` keys."""
        # No await in here: concurrent requests can never take the same keys.
        epoch = self.epoch
        taken: list[int] = []
        while len(taken) < size:
            stop = min(len(self.keys), self.position + size - len(taken))
            taken += self.keys[self.position : stop]
            self.position = stop
            if self.position == len(self.keys):
                self.position, self.epoch = 0, self.epoch + 1
        return epoch, taken


# -- the service ----------------------------------------------------------------


class BadRequest(ValueError):
    pass


def _batch_size(request: Request) -> int:
    raw = request.query_params.get("size", "32")
    try:
        size = int(raw)
    except ValueError:
        raise BadRequest(f"size must be an integer, got {raw!r}") from None
    if not 1 <= size <= MAX_BATCH:
        raise BadRequest(f"size must be between 1 and {MAX_BATCH}, got {size}")
    return size


def _wants_npy(request: Request) -> bool:
    chosen = request.query_params.get("format")
    if chosen is None:
        return NPY_MEDIA_TYPE in request.headers.get("accept", "")
    if chosen not in ("json", "npy"):
        raise BadRequest(f"format must be 'json' or 'npy', got {chosen!r}")
    return chosen == "npy"


def npy_bytes(keys: list[int], batch: dict[str, np.ndarray]) -> bytes:
    """One structured array (fields ``key``, ``label``, ``x``) as ``.npy`` bytes."""
    x = batch["x"]
    dtype = np.dtype([("key", np.int64), ("label", np.int64), ("x", x.dtype, x.shape[1:])])
    table = np.empty(len(keys), dtype)
    table["key"], table["label"], table["x"] = keys, batch["label"], x
    buffer = io.BytesIO()
    np.save(buffer, table, allow_pickle=False)
    return buffer.getvalue()


def create_app(
    data: Path,
    items: int = 4096,
    features: int = 16,
    latency: float = 0.005,
    max_loading: int = 8,
    announce: str | None = None,
) -> Starlette:
    """The Starlette app; it prepares and opens ``data`` at start-up."""
    state: dict[str, Any] = {"served": 0, "loading": 0}

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        origin = await prepare_data(data, items, features)
        async with await PickledDataset.open(data) as stored:
            state["dataset"] = transformed(stored, latency)
            state["cursor"] = KeyCursor(await stored.keys.all())
            # Made here, inside the serving loop, once per start-up.
            state["limit"] = anyio.Semaphore(max_loading)
            where = f" on {announce}" if announce else ""
            # What exists now (modules, the key index) lives as long as the
            # service: freezing it keeps the collector from scanning it again
            # and again, and full collections from pausing every request.
            gc.freeze()
            print(f"ready{where}: {len(stored)} items in {data} ({origin})", flush=True)
            yield
        print(f"stopped after serving {state['served']} batches", flush=True)

    async def batch(request: Request) -> Response:
        try:
            size, npy = _batch_size(request), _wants_npy(request)
        except BadRequest as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)
        epoch, keys = state["cursor"].take(size)
        async with state["limit"]:
            state["loading"] += 1
            try:
                result = await state["dataset"].query(keys)
            finally:
                state["loading"] -= 1
        state["served"] += 1
        if npy:
            return Response(npy_bytes(keys, result), media_type=NPY_MEDIA_TYPE)
        return JSONResponse(
            {
                "epoch": epoch,
                "keys": keys,
                "x": result["x"].tolist(),
                "label": result["label"].tolist(),
            }
        )

    async def health(request: Request) -> Response:
        return JSONResponse(
            {"status": "ok", "served": state["served"], "loading": state["loading"]}
        )

    routes = [Route("/batch", batch), Route("/health", health)]
    return Starlette(routes=routes, lifespan=lifespan)


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Serve training batches over HTTP.")
    parser.add_argument(
        "--data", type=Path, default=Path("service_data.pickle"),
        help="the PickledDataset file to serve; generated if missing",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=8000, help="port (0: any free port)")
    parser.add_argument("--items", type=int, default=4096, help="items to generate")
    parser.add_argument("--features", type=int, default=16, help="features per item")
    parser.add_argument(
        "--latency", type=float, default=0.005,
        help="seconds the per-item lookup awaits (default 0.005)",
    )
    parser.add_argument(
        "--max-loading", type=int, default=8, help="batches loading at once at most"
    )
    args = parser.parse_args(argv)
    if args.items < 1 or args.features < 1 or args.max_loading < 1:
        parser.error("--items, --features and --max-loading must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    # Bound here rather than by uvicorn, so that the real port is known for
    # --port 0 and announced before serving.
    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    # IPPROTO_TCP explicitly: asyncio then turns Nagle's algorithm off on each
    # connection, as it does on the sockets it makes; with it on, keep-alive
    # replies stall for the client's delayed ACK (about 40 ms each).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((args.host, args.port))
    host, port = sock.getsockname()[:2]
    url = f"http://{host}:{port}"
    print(f"data service listening on {url}", flush=True)
    app = create_app(
        args.data, args.items, args.features, args.latency, args.max_loading, announce=url
    )
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    # uvicorn shuts down gracefully on SIGINT or SIGTERM, then raises the
    # signal again: both then end the process normally, with status 0.
    signal.signal(signal.SIGTERM, _stop)
    with suppress(KeyboardInterrupt):
        server.run(sockets=[sock])
    return 0


def _stop(signum: int, frame: object) -> None:
    raise SystemExit(0)


if __name__ == "__main__":
    sys.exit(main())

"""The data service example, run as a real server on loopback."""

from __future__ import annotations

import asyncio
import io
import signal
import statistics
import sys
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from examples import data_service
from mlworkflow_async import DictDataset, PickledDataset

ROOT = Path(__file__).resolve().parent.parent
ITEMS, FEATURES, BATCH = 4096, 16, 8
REQUESTS = 200


class Service:
    def __init__(self, process: asyncio.subprocess.Process, url: str, data: Path) -> None:
        self.process = process
        self.url = url
        self.data = data
        self.lines: list[str] = []

    async def read_line(self, timeout: float = 20.0) -> str:
        assert self.process.stdout is not None
        line = await asyncio.wait_for(self.process.stdout.readline(), timeout)
        text = line.decode().rstrip("\n")
        self.lines.append(text)
        return text


@pytest.fixture
async def service(tmp_path: Path) -> AsyncIterator[Service]:
    data = tmp_path / "service.pickle"
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        str(ROOT / "examples" / "data_service.py"),
        "--port", "0", "--data", str(data), "--items", str(ITEMS),
        "--features", str(FEATURES), "--latency", "0.02", "--max-loading", "8",
        stdout=asyncio.subprocess.PIPE,
        cwd=tmp_path,
    )
    try:
        service = Service(process, "", data)
        first = await service.read_line()
        assert first.startswith("data service listening on http://127.0.0.1:"), first
        service.url = first.rpartition(" ")[2]
        ready = await service.read_line()  # printed once the data is prepared
        assert ready == f"ready on {service.url}: {ITEMS} items in {data} (generated)"
        yield service
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def expected_items(data: Path) -> tuple[np.ndarray, np.ndarray]:
    """The normalised features and the labels, straight from the data file."""
    async with await PickledDataset.open(data) as stored:
        items = await stored.query(list(range(ITEMS)))
        mean = np.asarray(stored.context["mean"], np.float32)
        std = np.asarray(stored.context["std"], np.float32)
    return (items["x"] - mean) / std, items["label"]


def parse(response: httpx.Response) -> tuple[list[int], np.ndarray, np.ndarray]:
    assert response.status_code == 200, response.text
    if response.headers["content-type"] == data_service.NPY_MEDIA_TYPE:
        table = np.load(io.BytesIO(response.content), allow_pickle=False)
        return table["key"].tolist(), table["x"], table["label"]
    body = response.json()
    assert set(body) == {"epoch", "keys", "x", "label"}
    assert body["epoch"] == 0
    return body["keys"], np.asarray(body["x"], np.float32), np.asarray(body["label"])


class HealthPoller(threading.Thread):
    """Polls ``/health`` until stopped, timing each answer."""

    def __init__(self, url: str) -> None:
        super().__init__(name="health-poller")
        self.url = url
        self.stop = threading.Event()
        self.latencies: list[float] = []
        self.loading: list[int] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with httpx.Client(base_url=self.url, timeout=30) as client:
                while not self.stop.is_set():
                    start = time.perf_counter()
                    answer = client.get("/health")
                    self.latencies.append(time.perf_counter() - start)
                    answer.raise_for_status()
                    self.loading.append(answer.json()["loading"])
                    self.stop.wait(0.005)
        except BaseException as exc:
            self.error = exc


async def test_concurrent_batches_are_distinct_and_health_stays_fast(service: Service) -> None:
    # Health is polled from a thread of its own: this loop is busy driving
    # the 200 batch requests, and timing health from it would time this
    # test's client rather than the service.
    poller = HealthPoller(service.url)
    batch_latencies: list[float] = []
    async with httpx.AsyncClient(base_url=service.url, timeout=30) as client:
        health = await client.get("/health")
        assert health.json() == {"status": "ok", "served": 0, "loading": 0}

        async def request(i: int) -> httpx.Response:
            start = time.perf_counter()
            # Every third in .npy by query parameter, every third by Accept header.
            if i % 3 == 1:
                answer = await client.get("/batch", params={"size": BATCH, "format": "npy"})
            elif i % 3 == 2:
                headers = {"Accept": data_service.NPY_MEDIA_TYPE}
                answer = await client.get("/batch", params={"size": BATCH}, headers=headers)
            else:
                answer = await client.get("/batch", params={"size": BATCH})
            batch_latencies.append(time.perf_counter() - start)
            return answer

        poller.start()
        try:
            responses = await asyncio.gather(*(request(i) for i in range(REQUESTS)))
        finally:
            poller.stop.set()
            await asyncio.to_thread(poller.join, 10)

    # Health answered while batches were really loading, without waiting for
    # them: typically far faster than a batch in the same run (a ratio, as
    # absolute times mean nothing on a loaded machine).
    assert poller.error is None
    assert sum(loading > 0 for loading in poller.loading) >= 3
    assert len(poller.latencies) >= 5
    health_time = statistics.median(poller.latencies)
    batch_time = statistics.median(batch_latencies)
    assert health_time * 4 < batch_time, (
        f"median health {health_time * 1000:.1f} ms, batch {batch_time * 1000:.1f} ms"
    )

    x_expected, labels_expected = await expected_items(service.data)
    all_keys: list[int] = []
    kinds = set()
    for response in responses:
        keys, x, labels = parse(response)
        kinds.add(response.headers["content-type"])
        assert len(keys) == BATCH
        assert x.shape == (BATCH, FEATURES)
        assert x.dtype == np.float32
        np.testing.assert_allclose(x, x_expected[keys], rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(labels, labels_expected[keys])
        all_keys += keys
    assert kinds == {"application/json", data_service.NPY_MEDIA_TYPE}
    # Each request got its own keys: together, the first REQUESTS * BATCH keys.
    assert sorted(all_keys) == list(range(REQUESTS * BATCH))
    # Normalised: the per-feature statistics of the whole file are 0 and 1.
    np.testing.assert_allclose(x_expected.mean(axis=0), 0, atol=1e-4)
    np.testing.assert_allclose(x_expected.std(axis=0), 1, atol=1e-4)

    service.process.send_signal(signal.SIGINT)
    assert await asyncio.wait_for(service.process.wait(), 15) == 0
    assert await service.read_line() == f"stopped after serving {REQUESTS} batches"


async def test_bad_requests_and_epochs(service: Service) -> None:
    async with httpx.AsyncClient(base_url=service.url, timeout=30) as client:
        for params, message in [
            ({"size": "many"}, "size must be an integer, got 'many'"),
            ({"size": 0}, "size must be between 1 and 1024, got 0"),
            ({"size": 4, "format": "xml"}, "format must be 'json' or 'npy', got 'xml'"),
        ]:
            response = await client.get("/batch", params=params)
            assert response.status_code == 400
            assert response.json() == {"error": message}
        # Sizes that do not divide the item count wrap into the next epoch.
        first = (await client.get("/batch", params={"size": 1000})).json()
        assert first["keys"] == list(range(1000))
        assert first["epoch"] == 0
        for _ in range(3):
            await client.get("/batch", params={"size": 1000})
        wrapped = (await client.get("/batch", params={"size": 200})).json()
        assert wrapped["epoch"] == 0
        assert wrapped["keys"] == list(range(4000, ITEMS)) + list(range(200 - (ITEMS - 4000)))
        following = (await client.get("/batch", params={"size": 2})).json()
        assert following["epoch"] == 1
        assert following["keys"] == [104, 105]
    service.process.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(service.process.wait(), 15) == 0


async def test_reuses_an_existing_data_file(tmp_path: Path) -> None:
    data = tmp_path / "data.pickle"
    assert await data_service.prepare_data(data, 50, 3) == "generated"
    before = data.stat().st_mtime_ns
    assert await data_service.prepare_data(data, 50, 3) == "found"
    assert data.stat().st_mtime_ns == before
    async with await PickledDataset.open(data) as stored:
        assert len(stored) == 50
        item = await data_service.transformed(stored, 0).query_item(7)
    assert item["x"].shape == (3,)
    assert item["x"].dtype == np.float32


async def test_a_data_file_of_other_data_is_generated_again(tmp_path: Path) -> None:
    data = tmp_path / "data.pickle"
    assert await data_service.prepare_data(data, 50, 3) == "generated"
    origin = await data_service.prepare_data(data, 20, 4)
    assert origin == "generated again: it held other data (items 50 -> 20, features 3 -> 4)"
    async with await PickledDataset.open(data) as stored:
        assert len(stored) == 20
        assert stored.context["generated_with"] == {"items": 20, "features": 4, "seed": 0}
        assert len(stored.context["mean"]) == 4
        assert (await stored.query_item(0))["x"].shape == (4,)
    assert await data_service.prepare_data(data, 20, 4) == "found"

    # A file written before the settings were recorded, and one that is no dataset.
    old = tmp_path / "old.pickle"
    items = {i: {"x": np.zeros(4, np.float32), "label": 0} for i in range(10)}
    await PickledDataset.create(DictDataset(items), old)
    assert await data_service.prepare_data(old, 10, 4) == (
        "generated again: it did not say which data it held"
    )
    notes = tmp_path / "notes.txt"
    notes.write_text("not a dataset")
    with pytest.raises(FileExistsError, match="pass another --data, or remove"):
        await data_service.prepare_data(notes, 10, 4)
    assert notes.read_text() == "not a dataset"


async def test_the_service_says_it_generated_other_data_again(tmp_path: Path) -> None:
    data = tmp_path / "service.pickle"
    assert await data_service.prepare_data(data, 30, FEATURES) == "generated"
    process = await asyncio.create_subprocess_exec(
        sys.executable, str(ROOT / "examples" / "data_service.py"),
        "--port", "0", "--data", str(data), "--items", "40", "--features", str(FEATURES),
        stdout=asyncio.subprocess.PIPE,
        cwd=tmp_path,
    )
    try:
        service = Service(process, "", data)
        service.url = (await service.read_line()).rpartition(" ")[2]
        assert await service.read_line() == (
            f"ready on {service.url}: 40 items in {data} "
            "(generated again: it held other data (items 30 -> 40))"
        )
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 15) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


def test_cursor_cycles_without_overlap() -> None:
    cursor = data_service.KeyCursor(range(5))
    assert cursor.take(3) == (0, [0, 1, 2])
    assert cursor.take(3) == (0, [3, 4, 0])
    assert cursor.take(7) == (1, [1, 2, 3, 4, 0, 1, 2])
    assert cursor.epoch == 2

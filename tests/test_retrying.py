"""RetryingDataset against a real flaky HTTP server on 127.0.0.1."""

from __future__ import annotations

import logging
import re
from typing import Any

import httpx
import pytest

from mlworkflow_async import Dataset, RetryingDataset, TransformedDataset
from tests._http_server import FileServer, serve_files

FILES = {f"f{i}": f"body {i}".encode() for i in range(12)}


class HttpFiles(Dataset[str, bytes]):
    """Files of a server; a 5xx answer is an ``OSError`` (worth retrying), a 404 a KeyError."""

    def __init__(self, server: FileServer, names: list[str]) -> None:
        self.server = server
        self.names = names
        self.client: httpx.AsyncClient | None = None  # one per test, made in its event loop

    def yield_keys(self) -> list[str]:
        return self.names

    async def query_item(self, key: str) -> bytes:
        if self.client is None:
            self.client = httpx.AsyncClient()
        reply = await self.client.get(self.server.url(key))
        if reply.status_code >= 500:
            raise ConnectionError(f"{self.server.url(key)} answered {reply.status_code}")
        if reply.status_code == 404:
            raise KeyError(key)
        return reply.content


def retrying(server: FileServer, **options: Any) -> RetryingDataset[str, bytes]:
    options.setdefault("initial_wait", 0.01)
    return RetryingDataset(HttpFiles(server, sorted(FILES)), **options)


async def test_a_flaky_file_is_fetched_after_retries_counted_in_the_stream_stats(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with serve_files(FILES, delay=0, failing={"f3": 2, "f7": 1}) as server:
        ds = retrying(server, attempts=3)
        caplog.set_level(logging.WARNING, logger="mlworkflow_async")
        stream = ds.batches(4)
        got = {key: item for keys, batch in [b async for b in stream]
               for key, item in zip(keys, batch.tolist(), strict=True)}
    assert got == FILES
    assert (server.hits["f3"], server.hits["f7"], server.hits["f0"]) == (3, 2, 1)
    assert stream.stats.retried == 3
    assert stream.stats.failed == 0
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 3
    assert sum("for key 'f3' failed (ConnectionError" in m for m in messages) == 2
    assert any("attempt 1 of 3 for key 'f7'" in m for m in messages)


async def test_retries_inside_a_chain_count_in_the_outer_stream() -> None:
    # The transform reads its parent through an inner engine: the retries
    # still belong to the stream the user iterates.
    with serve_files(FILES, delay=0, failing={"f1": 1, "f2": 1}) as server:
        chain = TransformedDataset(retrying(server), [lambda key, item: item.upper()])
        stream = chain.batches(6, collate_fn=list)
        batches = [batch async for _, batch in stream]
    assert [item for batch in batches for item in batch] == [
        FILES[k].upper() for k in sorted(FILES)
    ]
    assert stream.stats.retried == 2


async def test_the_final_failure_names_the_key_and_the_attempts() -> None:
    with serve_files(FILES, delay=0, failing={"f5": 10}) as server:
        ds = retrying(server, attempts=3)
        with pytest.raises(ConnectionError, match="f5 answered 503") as info:
            await ds.query_item("f5")
        assert server.hits["f5"] == 3
    assert "RetryingDataset gave up on key 'f5' after 3 attempts" in info.value.__notes__


async def test_skipped_failures_after_retries_are_recorded_with_their_key() -> None:
    with serve_files(FILES, delay=0, failing={"f4": 10}) as server:
        ds = retrying(server, attempts=2)
        stream = ds.batches(4, on_error="skip")
        keys = [k async for batch_keys, _ in stream for k in batch_keys]
    assert keys == [k for k in sorted(FILES) if k != "f4"]
    assert [f.key for f in stream.failures] == ["f4"]
    assert isinstance(stream.failures[0].exception, ConnectionError)
    assert (stream.stats.failed, stream.stats.retried) == (1, 1)


async def test_other_errors_are_not_retried() -> None:
    with serve_files(FILES, delay=0) as server:
        ds = RetryingDataset(HttpFiles(server, ["nope"]), attempts=5, initial_wait=0.01)
        with pytest.raises(KeyError):
            await ds.query_item("nope")
        assert server.hits["nope"] == 1


async def test_a_stalled_attempt_times_out_and_is_retried() -> None:
    with serve_files(FILES, delay=0, stalled={"f2": 1}) as server:
        # on= does not name TimeoutError: a timed-out attempt is retried anyway.
        ds = retrying(server, on=ConnectionError, attempts=2, timeout=2.0)
        stream = ds.batches(4, keys=["f2"])
        assert [batch.tolist() async for _, batch in stream] == [[FILES["f2"]]]
        assert server.hits["f2"] == 2
    assert stream.stats.retried == 1


async def test_every_attempt_stalled_raises_a_timeout_naming_the_key() -> None:
    with serve_files(FILES, delay=0, stalled={"f0": 10}) as server:
        ds = retrying(server, attempts=2, timeout=0.2)
        with pytest.raises(TimeoutError, match=r"no answer for key 'f0' of HttpFiles within "
                           r"timeout=0\.2 s") as info:
            await ds.query_item("f0")
        assert server.hits.get("f0", 0) <= 2  # an attempt may time out before it connects
    assert "after 2 attempts" in info.value.__notes__[0]


async def test_backoff_grows_exponentially_with_jitter(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="mlworkflow_async")
    with serve_files(FILES, delay=0, failing={"f9": 3}) as server:
        ds = retrying(server, attempts=4, initial_wait=0.02)
        assert await ds.query_item("f9") == FILES["f9"]
    waits = [float(m) for m in re.findall(r"retrying in ([\d.]+) s", caplog.text)]
    assert len(waits) == 3
    for attempt, wait in enumerate(waits):
        base = 0.02 * 2**attempt
        assert base <= wait <= base + 0.02 + 1e-9


def test_bad_arguments_are_named() -> None:
    with serve_files(FILES) as server:
        parent = HttpFiles(server, [])
        with pytest.raises(ValueError, match="attempts must be at least 1"):
            RetryingDataset(parent, attempts=0)
        with pytest.raises(TypeError, match="attempts must be an integer"):
            RetryingDataset(parent, attempts=2.5)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="timeout must be None or a number"):
            RetryingDataset(parent, timeout=0)
        with pytest.raises(TypeError, match="on= takes an exception class"):
            RetryingDataset(parent, on="OSError")  # type: ignore[arg-type]
        assert "attempts=3" in repr(RetryingDataset(parent))

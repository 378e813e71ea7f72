"""Byte ranges of a file on any fsspec filesystem (``s3://``, ``gs://``, ``memory://``...).

fsspec's calls block (its asynchronous filesystems run them on fsspec's own
event loop thread), so each read is one ``cat_file`` call in a worker thread.
The file is pinned by its size and, where the filesystem reports one, its
ETag or modification time when opened: a read past the size seen then, or a
file gone since, raises :class:`~mlworkflow_async.exceptions.RemoteFileChangedError`.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import anyio.to_thread

from ..exceptions import RemoteFileChangedError, RemoteFileError, RemoteFileNotFoundError
from ._transport import Opened, Transient

__all__ = ["FsspecTransport"]

#: Keys of ``fs.info()`` that change when the file is rewritten, best first.
_VALIDATORS = ("ETag", "etag", "md5Hash", "generation", "LastModified", "mtime", "updated",
               "created")


class FsspecTransport:
    """Range reads of one fsspec URL; see the module docstring."""

    def __init__(self, url: str, storage_options: Mapping[str, Any] | None = None) -> None:
        import fsspec.core

        self.url = url
        try:
            self._fs, self._path = fsspec.core.url_to_fs(url, **dict(storage_options or {}))
        except (ImportError, ValueError) as exc:  # an unknown protocol, a missing driver
            raise RemoteFileError(f"cannot open {url}: {exc}", url) from exc
        protocol = self._fs.protocol
        scheme = protocol if isinstance(protocol, str) else protocol[0]
        # Buckets of one store share a host; a per-bucket bound is as close as fsspec tells.
        self.host = f"{scheme}://{self._path.split('/', 1)[0]}"
        self._size: int | None = None

    async def open(self, tail: int) -> Opened:
        """Look the file up, then fetch its last ``tail`` bytes."""
        info = await self._call(self._fs.info, self._path)
        if info.get("type", "file") != "file":
            raise RemoteFileError(f"{self.url} is not a file (it is a {info['type']})", self.url)
        size = int(info["size"])
        self._size = size
        validator = next((str(info[k]) for k in _VALIDATORS if info.get(k) is not None), "")
        start = max(0, size - tail)
        body = await self._call(self._fs.cat_file, self._path, start, size) if size else b""
        if len(body) != size - start:
            raise self._changed(f"its size was {size} bytes, it now ends at {start + len(body)}")
        return Opened(size, f"{size}:{validator}", start, bytes(body))

    async def fetch(self, start: int, stop: int) -> bytes:
        body = await self._call(self._fs.cat_file, self._path, start, stop, reading=True)
        if len(body) != stop - start:
            raise self._changed(f"its size was {self._size} bytes, it now ends at "
                                f"{start + len(body)}")
        return bytes(body)

    async def _call(self, function: Any, *args: Any, reading: bool = False) -> Any:
        try:
            return await anyio.to_thread.run_sync(functools.partial(function, *args))
        except FileNotFoundError as exc:
            if reading:
                raise self._changed("it no longer exists") from exc
            raise RemoteFileNotFoundError(f"{self.url} does not exist: check the URL",
                                          self.url) from exc
        except PermissionError as exc:
            raise RemoteFileError(f"cannot read {self.url}: {exc}", self.url) from exc
        except (ConnectionError, TimeoutError) as exc:
            raise Transient(f"{type(exc).__name__}: {exc}") from exc
        except OSError as exc:  # what filesystems raise for a failed request
            raise Transient(f"{type(exc).__name__}: {exc}") from exc

    def _changed(self, why: str) -> RemoteFileChangedError:
        return RemoteFileChangedError(
            f"{self.url} changed while it was open ({why}): open it again", self.url
        )

    async def aclose(self) -> None:
        pass

    def close(self) -> None:
        pass

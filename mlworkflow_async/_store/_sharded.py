"""A sharded PickledDataset: a folder of shard files and the manifest naming them.

:meth:`PickledDataset.create(..., shards=N) <mlworkflow_async.PickledDataset.create>`
writes a folder (see :mod:`mlworkflow_async._store._shard_writer`); opening
the folder, locally or at a URL ending with ``/``, gives one dataset whose
keys are those of the shards in shard order.

Manifest (``manifest.json``, version 1)
---------------------------------------
A JSON object, written last and atomically (temporary file, sync, rename),
so it only ever names complete shards:

- ``"format"``: ``"mlworkflow-async sharded dataset"``; ``"version"``: 1;
- ``"run"``: the id of the run that wrote it (shard names contain it);
- ``"items"``: the total number of items;
- ``"shards"``: in key order, one object per file: ``"file"`` (a plain
  name in the folder), ``"items"``, ``"size"`` (bytes) and ``"sha256"``
  (hex digest of the whole file);
- ``"context"``: the source's context as JSON (values JSON cannot hold are
  written as their ``repr``); the exact context is read from the shards.

Opening checks each shard's item count and size against the manifest;
``verify`` also checks the digests.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeGuard
from urllib.parse import quote

import anyio
import anyio.to_thread

from .._core._dataset import Dataset
from ..exceptions import CorruptFileError, PickledFileError, UnsupportedVersionError
from ._pickled import PickledDataset

__all__ = [
    "MANIFEST",
    "Manifest",
    "ShardEntry",
    "ShardedPickledDataset",
    "encode_manifest",
    "file_digest",
    "is_sharded_location",
]

MANIFEST = "manifest.json"
FORMAT_NAME = "mlworkflow-async sharded dataset"
MANIFEST_VERSION = 1
#: A manifest larger than this is refused rather than read (a hostile server).
MAX_MANIFEST_BYTES = 64 << 20
#: Shard names are plain file names: no folders, no hidden or special names.
_SHARD_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,254}")
_SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class ShardEntry:
    """What the manifest says of one shard file."""

    file: str
    items: int
    size: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    run: str
    shards: tuple[ShardEntry, ...]
    context: Any


def encode_manifest(run: str, shards: Sequence[ShardEntry], context: Any) -> bytes:
    """The manifest's bytes; ``context`` becomes JSON, odd values their ``repr``."""
    document = {
        "format": FORMAT_NAME,
        "version": MANIFEST_VERSION,
        "run": run,
        "items": sum(entry.items for entry in shards),
        "shards": [
            {"file": e.file, "items": e.items, "size": e.size, "sha256": e.sha256}
            for e in shards
        ],
        "context": None if context is None else _jsonable(context),
    }
    return (json.dumps(document, indent=1) + "\n").encode()


def _jsonable(value: Any, depth: int = 0) -> Any:
    """``value`` as JSON can hold it: containers kept, other values as their ``repr``."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if depth < 32 and isinstance(value, Mapping):
        return {
            key if isinstance(key, str) else repr(key): _jsonable(item, depth + 1)
            for key, item in value.items()
        }
    if depth < 32 and isinstance(value, (list, tuple)):
        return [_jsonable(item, depth + 1) for item in value]
    return repr(value)


def _natural(value: object) -> TypeGuard[int]:
    return type(value) is int and value >= 0  # not bool, not negative


def decode_manifest(data: bytes, name: str) -> Manifest:
    """Parse and check a manifest; anything off raises ``CorruptFileError`` naming it."""

    def bad(what: str) -> CorruptFileError:
        return CorruptFileError(f"{name} is not a readable sharded dataset manifest: {what}", name)

    try:
        document = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise bad(f"it is not JSON ({exc})") from None
    if not isinstance(document, dict) or document.get("format") != FORMAT_NAME:
        raise bad(f'it does not say "format": "{FORMAT_NAME}"')
    version = document.get("version")
    if not _natural(version):
        raise bad(f"its version is {version!r}, not a number")
    if version > MANIFEST_VERSION:
        raise UnsupportedVersionError(
            f"{name} is a sharded dataset manifest of version {version}, newer than this "
            f"library reads ({MANIFEST_VERSION}); upgrade mlworkflow-async to read it",
            name,
        )
    shards = document.get("shards")
    if not isinstance(shards, list) or not shards:
        raise bad('"shards" is not a non-empty list')
    entries: list[ShardEntry] = []
    seen: set[str] = set()
    for number, shard in enumerate(shards):
        if not isinstance(shard, dict):
            raise bad(f"shard {number} is not an object")
        file, items, size, digest = (shard.get(k) for k in ("file", "items", "size", "sha256"))
        if not isinstance(file, str) or not _SHARD_NAME.fullmatch(file):
            raise bad(f"shard {number} has the file name {file!r}, not a plain name")
        if file in seen:
            raise bad(f"shard file {file} is listed twice")
        seen.add(file)
        if not _natural(items) or not _natural(size):
            raise bad(f'shard {file} has no valid "items" and "size" counts')
        if not isinstance(digest, str) or not _SHA256.fullmatch(digest):
            raise bad(f'shard {file} has no valid "sha256" digest')
        entries.append(ShardEntry(file, items, size, digest))
    total = document.get("items")
    if total != sum(entry.items for entry in entries):
        raise bad(f'"items" ({total!r}) is not the sum of the shards\' item counts')
    run = document.get("run")
    return Manifest(run if isinstance(run, str) else "", tuple(entries), document.get("context"))


def file_digest(path: str) -> tuple[int, str]:
    """The size and SHA-256 of a file (blocking)."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


# -- where a sharded dataset lives -------------------------------------------


def _is_url(text: str) -> bool:
    return "://" in text


def is_sharded_location(path: object) -> bool:
    """Whether ``path`` names a sharded dataset: a folder, its manifest, a URL ending in ``/``."""
    if not isinstance(path, (str, os.PathLike)):
        return False
    text = os.fspath(path)
    if not isinstance(text, str):
        return False
    if _is_url(text):
        return text.endswith(("/", "/" + MANIFEST))
    return os.path.basename(text) == MANIFEST or os.path.isdir(text)


class _Location:
    """The folder (or base URL) of a sharded dataset, and the names in it."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.remote = _is_url(path)
        if self.remote:
            self.base = path[: -len(MANIFEST)] if path.endswith(MANIFEST) else path
            self.manifest = self.base + MANIFEST
        else:
            self.base = os.path.dirname(path) if os.path.basename(path) == MANIFEST else path
            self.manifest = os.path.join(self.base, MANIFEST)

    def shard(self, file: str) -> str:
        return self.base + quote(file) if self.remote else os.path.join(self.base, file)

    def read_manifest(self) -> bytes:
        """The manifest's bytes (blocking)."""
        if self.remote:
            return _fetch_blocking(self.manifest)
        try:
            with open(self.manifest, "rb") as f:
                data = f.read(MAX_MANIFEST_BYTES + 1)
        except FileNotFoundError:
            raise IsADirectoryError(
                errno.EISDIR, f"Is a directory, without the {MANIFEST} of a sharded "
                f"PickledDataset (was its first create interrupted?)", self.base
            ) from None
        return self._bounded(data)

    async def read_manifest_async(self) -> bytes:
        if not self.remote:
            return await anyio.to_thread.run_sync(self.read_manifest)
        httpx = _httpx(self.manifest)
        async with httpx.AsyncClient(follow_redirects=True) as client:
            try:
                async with client.stream("GET", self.manifest) as response:
                    _check_status(response, self.manifest)
                    data = bytearray()
                    async for chunk in response.aiter_bytes():
                        data += chunk
                        if len(data) > MAX_MANIFEST_BYTES:
                            break
            except httpx.HTTPError as exc:
                raise _network_error(self.manifest, exc) from exc
        return self._bounded(bytes(data))

    def _bounded(self, data: bytes) -> bytes:
        if len(data) > MAX_MANIFEST_BYTES:
            raise CorruptFileError(
                f"{self.manifest} is larger than {MAX_MANIFEST_BYTES} bytes: not a manifest",
                self.manifest,
            )
        return data


def _httpx(url: str) -> Any:
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"cannot open {url}: only http:// and https:// URLs are supported")
    try:
        import httpx
    except ImportError:
        raise ImportError(
            f"opening {url} needs httpx: pip install 'mlworkflow-async[remote]'"
        ) from None
    return httpx


def _check_status(response: Any, url: str) -> None:
    if response.status_code != 200:
        raise PickledFileError(
            f"cannot read {url}: the server answered HTTP {response.status_code}", url
        )


def _network_error(url: str, exc: Exception) -> PickledFileError:
    return PickledFileError(f"cannot read {url}: {type(exc).__name__}: {exc}", url)


def _fetch_blocking(url: str) -> bytes:
    httpx = _httpx(url)
    try:
        with httpx.stream("GET", url, follow_redirects=True) as response:
            _check_status(response, url)
            data = bytearray()
            for chunk in response.iter_bytes():
                data += chunk
                if len(data) > MAX_MANIFEST_BYTES:
                    break
    except httpx.HTTPError as exc:
        raise _network_error(url, exc) from exc
    return bytes(data)


# -- the dataset ----------------------------------------------------------------


class ShardedPickledDataset(PickledDataset):
    """The shard files of a folder read as one dataset, keys in shard order.

    Made by ``PickledDataset(folder)`` or ``await PickledDataset.open(folder)``:

    >>> import asyncio, os, tempfile
    >>> from mlworkflow_async import DictDataset, PickledDataset
    >>> folder = os.path.join(tempfile.mkdtemp(), "squares")
    >>> source = DictDataset({i: i * i for i in range(10)})
    >>> asyncio.run(PickledDataset.create(source, folder, shards=3))
    10
    >>> with PickledDataset(folder) as ds:
    ...     print(len(ds), ds.sync.query_items([0, 9]), ds.shard_groups())
    10 [0, 81] [(0, 3), (3, 3), (6, 4)]

    Each read goes to the shard holding the key; a batch spanning shards is
    split, its parts read concurrently. Everything else behaves as for one
    file: ``mmap``, ``safe`` and ``allow`` apply to every shard.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        mmap: bool = False,
        safe: bool = False,
        allow: Iterable[object] = (),
        verify: str = "all",
    ) -> None:
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(
                f"PickledDataset opens a folder by its path (str or os.PathLike), got {path!r}"
            )
        location = _Location(os.fspath(path))
        options: dict[str, Any] = {
            "mmap": bool(mmap), "safe": bool(safe), "allow": tuple(allow), "verify": verify
        }
        manifest = decode_manifest(location.read_manifest(), location.manifest)
        shards: list[PickledDataset] = []
        try:
            for entry in manifest.shards:
                shards.append(PickledDataset(location.shard(entry.file), **options))
            self._assemble(location, manifest, shards, options)
        except BaseException:
            for shard in shards:
                shard.close()
            raise

    @classmethod
    async def open_sharded(
        cls,
        path: str | os.PathLike[str],
        *,
        mmap: bool = False,
        safe: bool = False,
        allow: Iterable[object] = (),
        verify: str = "all",
    ) -> ShardedPickledDataset:
        """Open a sharded dataset without blocking the loop; shards open concurrently."""
        options: dict[str, Any] = {
            "mmap": bool(mmap), "safe": bool(safe), "allow": tuple(allow), "verify": verify
        }
        location = _Location(os.fspath(path))
        if not location.remote:  # one worker thread call does it all

            def construct() -> ShardedPickledDataset:
                return cls(path, **options)

            return await anyio.to_thread.run_sync(construct)
        manifest = decode_manifest(await location.read_manifest_async(), location.manifest)
        opened: list[PickledDataset | None] = [None] * len(manifest.shards)

        async def open_one(index: int, entry: ShardEntry) -> None:
            opened[index] = await PickledDataset.open(location.shard(entry.file), **options)

        try:
            try:
                async with anyio.create_task_group() as tg:
                    for index, entry in enumerate(manifest.shards):
                        tg.start_soon(open_one, index, entry)
            except BaseExceptionGroup as group:
                raise group.exceptions[0] from None
            shards = [shard for shard in opened if shard is not None]
            self: ShardedPickledDataset = object.__new__(cls)
            self._assemble(location, manifest, shards, options)
        except BaseException:
            for shard in opened:
                if shard is not None:
                    shard.close()
            raise
        return self

    def _assemble(
        self,
        location: _Location,
        manifest: Manifest,
        shards: list[PickledDataset],
        options: dict[str, Any],
    ) -> None:
        self._location = location
        self._manifest = manifest
        self._shards = shards
        self._options = options
        where: dict[Any, int] = {}
        groups: list[tuple[int, int]] = []
        keys: list[Any] = []
        for index, (entry, shard) in enumerate(zip(manifest.shards, shards, strict=True)):
            shard_keys = shard.yield_keys()
            if len(shard_keys) != entry.items or shard.file_size != entry.size:
                raise CorruptFileError(
                    f"shard {shard.path} of the sharded dataset {location.path} does not "
                    f"match its manifest: it has {len(shard_keys)} items and "
                    f"{shard.file_size} bytes, the manifest says {entry.items} items and "
                    f"{entry.size} bytes (was it replaced or damaged?)",
                    shard.path,
                )
            groups.append((len(keys), len(shard_keys)))
            keys.extend(shard_keys)
            where.update(dict.fromkeys(shard_keys, index))
            if len(where) != len(keys):
                raise CorruptFileError(
                    f"shard {shard.path} of the sharded dataset {location.path} holds keys "
                    f"that an earlier shard already holds",
                    shard.path,
                )
        self._keys = tuple(keys)
        self._where = where
        self._groups = groups

    # -- what the folder holds ------------------------------------------------

    @property
    def path(self) -> str:
        """The folder (or base URL) the dataset was opened from."""
        return self._location.base

    @property
    def context(self) -> dict[str, Any]:
        return self._shards[0].context

    @property
    def format_version(self) -> int:
        """The oldest format version among the shard files."""
        return min(shard.format_version for shard in self._shards)

    @property
    def file_size(self) -> int:
        """The total size of the shard files, in bytes."""
        return sum(shard.file_size for shard in self._shards)

    @property
    def shard_files(self) -> list[str]:
        """The paths (or URLs) of the shard files, in key order."""
        return [shard.path for shard in self._shards]

    def shard_groups(self) -> list[tuple[int, int]]:
        """``(first_key_index, key_count)`` of each shard file, in key order."""
        return list(self._groups)

    def check_files(self) -> None:
        """Check every local shard's size and SHA-256 against the manifest (blocking).

        Raises :class:`~mlworkflow_async.exceptions.CorruptFileError` naming
        the first shard that differs. Shards at URLs are not read for this.
        """
        if self._location.remote:
            return
        for entry, shard in zip(self._manifest.shards, self._shards, strict=True):
            size, digest = file_digest(shard.path)
            if (size, digest) != (entry.size, entry.sha256):
                raise CorruptFileError(
                    f"shard {shard.path} of the sharded dataset {self.path} is damaged: its "
                    f"SHA-256 is not the one in the manifest",
                    shard.path,
                )

    def yield_keys(self) -> tuple[Any, ...]:
        return self._keys

    def __len__(self) -> int:
        return len(self._keys)

    # -- reads -----------------------------------------------------------------

    def _shard_indices(self, keys: Sequence[Any]) -> list[int]:
        where = self._where
        try:
            return list(map(where.__getitem__, keys))
        except (KeyError, TypeError):
            pass
        for key in keys:  # name the first bad key
            try:
                where[key]
            except TypeError:
                raise KeyError(f"{key!r} (unhashable) is not a key of {self.path}") from None
            except KeyError:
                raise KeyError(
                    f"{key!r} is not a key of the sharded PickledDataset {self.path}"
                ) from None
        raise AssertionError("unreachable")

    async def query_item(self, key: Any) -> Any:
        return (await self.query_items((key,)))[0]

    async def query_items(
        self, keys: Sequence[Any], concurrency: int | None = None
    ) -> list[Any]:
        """The items of ``keys`` in order; a shard's keys are read in one call to it."""
        if not isinstance(keys, (list, tuple)):
            keys = list(keys)
        if not keys:
            return []
        indices = self._shard_indices(keys)
        first = indices[0]
        if indices.count(first) == len(indices):  # the usual case: one shard
            return await self._shards[first].query_items(keys)
        positions: dict[int, list[int]] = {}
        for position, index in enumerate(indices):
            positions.setdefault(index, []).append(position)
        out: list[Any] = [None] * len(keys)

        async def read(index: int, where: list[int]) -> None:
            items = await self._shards[index].query_items([keys[p] for p in where])
            for p, item in zip(where, items, strict=True):
                out[p] = item

        if not self._location.remote:
            # Local parts are mostly served from the page cache without
            # suspending: one after the other costs less than a task each
            # (batches() keeps several batches in flight for cold reads).
            for index, where in positions.items():
                await read(index, where)
            return out
        try:
            async with anyio.create_task_group() as tg:
                for index, where in positions.items():
                    tg.start_soon(read, index, where)
        except BaseExceptionGroup as group:
            raise group.exceptions[0] from None
        return out

    async def query_batch(self, keys: Sequence[Any], collate: Any) -> Any:
        """A batch within one shard is built by that shard; others are read split, then collated."""
        if not isinstance(keys, (list, tuple)):
            keys = list(keys)
        indices = self._shard_indices(keys) if keys else []
        if indices and indices.count(indices[0]) == len(indices):
            shard: Any = self._shards[indices[0]]
            if hasattr(shard, "query_batch"):
                return await shard.query_batch(keys, collate)
        # The generic batch over query_items, not the single file's fast path.
        return await Dataset.query_batch(self, keys, collate)

    # -- life cycle --------------------------------------------------------------

    def close(self) -> None:
        for shard in self.__dict__.get("_shards", ()):
            shard.close()

    @property
    def closed(self) -> bool:
        return all(shard.closed for shard in self._shards)

    def __del__(self) -> None:
        pass  # each shard closes itself when collected

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self._location.path, **self._options}

    def __repr__(self) -> str:
        state = ", closed" if self.closed else ""
        return (
            f"<PickledDataset {self.path!r}: {len(self)} items in {len(self._shards)} shards, "
            f"format {self.format_version}{state}>"
        )

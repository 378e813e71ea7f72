"""A dataset stored in one indexed file: written atomically, read fast without blocking.

:class:`PickledDataset` writes every item of a dataset into a single file and
reads them back by key. It also reads the files of format 1 and those of
the original ``mlworkflow`` library (see :mod:`mlworkflow_async._store._legacy`);
``python -m mlworkflow_async convert`` rewrites either in format 2.

File format (version 2, written by default)
-------------------------------------------
All integers are little-endian; every byte is covered by a CRC-32C
(zlib's CRC-32 where the ``crc32c`` package is missing), so a flipped bit
anywhere raises :class:`~mlworkflow_async.exceptions.CorruptFileError`.
The full description, field by field, is in
:mod:`mlworkflow_async._store._format2`; in short:

- Header, 64 bytes: magic ``b"\\x89MLWDS\\r\\n"``, version (u32, 2), flags
  (u32), checksum algorithm (u32), zeros, and the header's own checksum.
- Items from offset 64, back to back, each a protocol 5 pickle followed by
  its out-of-band numpy buffers (8-byte aligned; 4096 for 1 MiB or more).
- Index region: a 16-byte entry per item (offset, tag and pickle length,
  checksum of the item's whole span), key offsets, an open-addressing hash
  table of the keys' pickled bytes with one fingerprint byte per slot, rows
  for items with several buffers, the keys' pickles, the context, for items
  with mapped arrays the checksum of their bytes outside those arrays, and
  a checksum of every 4096-byte block of the region.
- Footer, the last 160 bytes: a copy of the header (so that a remote file
  opens from its last bytes), counts and lengths of the parts, whether the
  keys are the ints ``first, first + 1, ...`` in file order (and ``first``),
  the checksum of the block checksums, its own checksum, and
  ``b"MLWDSEND"``.

Opening reads the header and footer and maps the index region: nothing is
built per key, whatever the number of items. Keys are found by their
pickle; the list of keys is unpickled only when asked for. In a file of
indices (keys ``first, first + 1, ...``), key ``k`` is the ``k - first``-th
item: a lookup reads one 16-byte entry, and the keys are counted, not read.

Format 1 (``create(..., format_version=1)``) has the same header without
checksum, the same items with 64-byte alignment, and a pickled index (keys,
a table of offsets, the context) checked by a CRC-32 in a 32-byte trailer.

A file missing its footer was not finished. Files written to a path are
written to a temporary file in the same folder first and renamed into place
once complete and synced to disk, so a reader never sees a partial file.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterable, Callable, Iterable, Mapping, Sequence, Sized
from types import TracebackType
from typing import IO, Any, BinaryIO, cast

import anyio
import anyio.to_thread

from .._core._collate import DEFAULT_COLLATE, collate_batch
from .._core._dataset import Dataset
from .._core._keys import KeySequence
from ..exceptions import CorruptFileError, UnsupportedVersionError
from ._file_keys import FileKeys
from ._format import HEADER_SIZE, MAGIC, Encoder, header
from ._format2 import VERSION2, Encoder2, header2, header_intact
from ._index2 import Index2, MemoryIndex
from ._reads import FileReader
from ._reads2 import Reader2
from ._remote import is_url
from ._safe_unpickler import allowed_names
from ._source_reader import SourceReader, open_blocking
from ._writes import AtomicFile, FileObject, Sink

__all__ = ["PickledDataset"]

#: Keys fetched per ``query_items`` call while writing.
_CHUNK = 256
#: What fetched items may add up to (as written) while they wait for the writer,
#: and how many they may be at most (each is a Python object meanwhile).
_HOLD_BYTES = 8 << 20
_HOLD_ITEMS = 8192


class PickledDataset(Dataset[Any, Any]):
    """The items of a file written by :meth:`create`, read by key.

    >>> import asyncio, os, tempfile
    >>> import numpy as np
    >>> from mlworkflow_async import DictDataset, PickledDataset
    >>> path = os.path.join(tempfile.mkdtemp(), "squares.pkl")
    >>> source = DictDataset({i: {"x": np.full(3, i * i)} for i in range(5)})
    >>> asyncio.run(PickledDataset.create(source, path))
    5
    >>> with PickledDataset(path) as ds:
    ...     print(len(ds), ds.sync.query_item(3))
    5 {'x': array([9, 9, 9])}

    In async code, open it with ``await PickledDataset.open(path)`` (and
    ``async with``), which does not block the event loop. ``len()`` and
    :attr:`context` are known as soon as the file is open; the keys are
    unpickled when first asked for (in worker threads, a chunk at a time,
    when awaited). A key is found by its pickle: ``3``,
    ``np.int64(3)`` and ``("a", 1)`` find what was stored under them, but
    ``3.0`` does not find ``3``. Keys holding sets or frozensets are found
    in any process (their elements are spelled in a fixed order, not in the
    order of the hash seed). Reads never
    block the loop: items already in the page cache are read directly,
    others in one worker thread call per batch; ``batched_queries`` is True
    so :meth:`batches` reads whole batches at once. Any number of reads may
    run concurrently.

    Every item is checked against its checksum as it is read (format 2).
    Arrays of 1 MiB or more are maps of the file, not copies: by default
    private copy-on-write maps (writable); with ``mmap=True`` read-only
    views of one map of the file (smaller arrays are then copies, checked
    like the rest). They are handed out once their pages are in memory,
    read in by a worker thread if needed. ``verify="all"`` (the default)
    hashes a mapped array in that thread the first time its item is read;
    ``verify="copied"`` skips that (saving a pass over the array's bytes) and
    checks everything else, the rest of such an item included (in files
    written before that rest had a checksum of its own, such an item is
    hashed whole once, as with ``"all"``). ``python -m mlworkflow_async
    verify`` checks every byte.
    Never modify a file in place while it is open: :meth:`create` replaces
    files atomically, which is safe.

    **Unpickling runs code chosen by whoever wrote the file.** Only open
    files you trust, or pass ``safe=True``: then only builtin containers and
    scalars, numpy arrays and the classes listed in ``allow`` (key classes,
    for instance) can be loaded, and anything else raises
    :class:`~mlworkflow_async.exceptions.UnsafePickleError`.

    A file that is empty, truncated, unfinished, damaged or not a dataset
    file raises :class:`~mlworkflow_async.exceptions.CorruptFileError`
    naming it; one from a newer version of the library raises
    :class:`~mlworkflow_async.exceptions.UnsupportedVersionError`. An
    unknown key raises ``KeyError``.

    An open PickledDataset can be pickled to another process, which
    reopens the file by path, and keeps working in a forked child.

    ``path`` may also be an ``http(s)://`` or fsspec URL (the ``remote``
    extra): items are fetched by byte-range requests, grouped per batch,
    with retries, and ``cache_dir=`` keeps what was fetched on local disk.
    The other keywords (``gap``, ``max_requests``, ``retries``, ``backoff``,
    ``timeout``, ``tail``, ``cache_size``, ``cache_block``, ``headers``,
    ``storage_options``) are those of
    :class:`~mlworkflow_async._store._remote.RemoteOptions`.
    """

    batched_queries = True
    _reader: FileReader | SourceReader
    _index: Index2 | MemoryIndex
    _options: dict[str, Any]

    def __new__(cls, *args: Any, **kwargs: Any) -> PickledDataset:
        # A folder (or a URL ending in "/") holds a sharded dataset.
        from ._sharded import ShardedPickledDataset, is_sharded_location

        if not issubclass(cls, ShardedPickledDataset) and is_sharded_location(
            args[0] if args else kwargs.get("path")
        ):
            sharded = object.__new__(ShardedPickledDataset)
            if not isinstance(sharded, cls):  # then Python will not call __init__
                ShardedPickledDataset.__init__(sharded, *args, **kwargs)
            return sharded
        plain: PickledDataset = super().__new__(cls)
        return plain

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        mmap: bool = False,
        safe: bool = False,
        allow: Iterable[object] = (),
        verify: str = "all",
        cache_dir: str | os.PathLike[str] | None = None,
        **remote: Any,
    ) -> None:
        if is_url(path):
            self._options, remote = _remote_options(mmap, safe, allow, cache_dir, remote)
            self._reader = open_blocking(path, **remote)
            self._index = self._reader.index
            return
        _local_only(path, cache_dir, remote)
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(
                f"PickledDataset opens a file by its path (str or os.PathLike), got {path!r}"
            )
        allowed = tuple(allow)
        self._options: dict[str, Any] = {
            "mmap": bool(mmap), "safe": bool(safe), "allow": allowed, "verify": verify,
        }
        path = os.fspath(path)
        if safe:
            allowed_names(allowed)  # refuse a bad allow list before touching the file
        version = _format_of(path)
        if version is not None and version > VERSION2:
            if not header_intact(path):
                raise CorruptFileError(
                    f"{path} is not a readable PickledDataset file: its header is damaged "
                    f"(checksum mismatch)", path
                )
            raise UnsupportedVersionError(
                f"{path} was written by a newer version of mlworkflow-async (file format "
                f"{version}; this version reads formats up to {VERSION2}): upgrade the library",
                path,
            )
        if version == VERSION2:
            self._reader = Reader2(
                path, use_mmap=bool(mmap), safe=bool(safe), allow=allowed, verify=verify
            )
            self._index = self._reader.index
        else:
            if verify not in ("all", "copied"):
                raise ValueError(f"verify must be 'all' or 'copied', got {verify!r}")
            self._reader = FileReader(path, use_mmap=bool(mmap), safe=bool(safe), allow=allowed)
            self._index = MemoryIndex(self._reader.layout)

    @classmethod
    async def open(
        cls,
        path: str | os.PathLike[str],
        *,
        mmap: bool = False,
        safe: bool = False,
        allow: Iterable[object] = (),
        verify: str = "all",
        cache_dir: str | os.PathLike[str] | None = None,
        **remote: Any,
    ) -> PickledDataset:
        """Open ``path`` like the constructor, in a worker thread.

        A URL is opened on the running event loop (see :class:`PickledDataset`).
        """
        allow = tuple(allow)
        if is_url(path):
            from ._sharded import ShardedPickledDataset, is_sharded_location

            if is_sharded_location(path):
                return await ShardedPickledDataset.open_sharded(
                    path, mmap=mmap, safe=safe, allow=allow, verify=verify
                )
            options, remote = _remote_options(mmap, safe, allow, cache_dir, remote)
            dataset: PickledDataset = cls.__new__(cls)
            dataset._options = options
            dataset._reader = await SourceReader.open(path, **remote)
            dataset._index = dataset._reader.index
            return dataset
        _local_only(path, cache_dir, remote)

        def construct() -> PickledDataset:
            return cls(path, mmap=mmap, safe=safe, allow=allow, verify=verify)

        return await anyio.to_thread.run_sync(construct)

    # -- what the file holds -------------------------------------------------

    @property
    def path(self) -> str:
        """The path the file was opened from."""
        return self._reader.path

    @property
    def context(self) -> dict[str, Any]:
        """The metadata stored with the items (the source dataset's ``context``)."""
        return dict(self._index.context or {})

    @property
    def format_version(self) -> int:
        """The file's format version; 0 for a file of the original ``mlworkflow``."""
        return int(self._index.version)

    @property
    def file_size(self) -> int:
        """The size of the file in bytes, when it was opened."""
        return self._reader.size

    def yield_keys(self) -> Sequence[Any]:
        """The keys in file order; a format 2 file unpickles them only now."""
        return self._index.keys()

    def _new_keys(self) -> KeySequence[Any]:
        # A format 2 file's keys are unpickled in worker threads when first
        # awaited (batches(), keys.all()), not on the event loop.
        index = self.__dict__.get("_index")
        if isinstance(index, Index2) and index.footer.first is None:
            return FileKeys(self.yield_keys, type(self).__name__, index)
        return super()._new_keys()

    def __len__(self) -> int:
        # Known at open, without unpickling the keys.
        return len(self._index)

    async def query_item(self, key: Any) -> Any:
        return (await self._reader.query((key,)))[0]

    async def query_items(
        self, keys: Sequence[Any], concurrency: int | None = None
    ) -> list[Any]:
        """The items of ``keys`` in order, read in one go (one thread call at most)."""
        if not isinstance(keys, (list, tuple)):
            keys = list(keys)
        return await self._reader.query(keys)

    def _blocking_items(self, keys: Sequence[Any]) -> list[Any] | None:
        # A local file's reads are blocking calls: the blocking view makes them
        # on its own thread (a remote file's requests need the event loop).
        reader = self._reader
        if not isinstance(reader, FileReader):
            return None
        return reader.query_blocking(keys if isinstance(keys, (list, tuple)) else list(keys))

    async def query_batch(self, keys: Sequence[Any], collate: Callable[[list[Any]], Any]) -> Any:
        """The batch of ``keys`` collated by ``collate``.

        With the default collation, a batch of items that are each one
        large array (64 KiB or more) of one shape and dtype is read straight
        into place: one ``preadv`` per item into its row of the batch, in a
        worker thread, each row checked; no copy is made on the loop.
        """
        if not isinstance(keys, (list, tuple)):
            keys = list(keys)
        reader = self._reader
        # The first key tells whether the batch may go into place, so that a
        # batch of small items is not looked up twice (W3a: about 2 µs a key).
        if collate is DEFAULT_COLLATE and isinstance(reader, Reader2) and keys and (
            reader.into_place_plan(reader.locate(keys[:1])) is not None
        ):
            entries = reader.locate(keys)
            size = reader.into_place_plan(entries)
            if size is not None:
                batch = await reader.query_batch_into_place(keys, entries, size)
                if batch is not None:
                    return batch
        return await collate_batch(await self.query_items(keys), collate)

    # -- life cycle ----------------------------------------------------------

    def close(self) -> None:
        """Close the file; reads in progress finish first. Arrays already read stay valid."""
        self._reader.close()

    @property
    def closed(self) -> bool:
        return self._reader.closed

    def __enter__(self) -> PickledDataset:
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    async def __aenter__(self) -> PickledDataset:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __del__(self) -> None:
        reader = self.__dict__.get("_reader")
        if reader is not None:
            with contextlib.suppress(Exception):
                reader.close()

    def __getstate__(self) -> dict[str, Any]:
        # Another process reopens the file by path; descriptors do not travel.
        return {"path": self.path, **self._options}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(  # type: ignore[misc]
            state["path"], mmap=state["mmap"], safe=state["safe"], allow=state["allow"],
            verify=state.get("verify", "all"),
            **state.get("remote", {}),
        )

    def __repr__(self) -> str:
        kind = f"format {self.format_version}" if self.format_version else "original mlworkflow"
        state = ", closed" if self.closed else ""
        return f"<PickledDataset {self.path!r}: {len(self)} items, {kind}{state}>"

    # -- writing -------------------------------------------------------------

    @classmethod
    async def create(
        cls,
        dataset: Any,
        path: str | os.PathLike[str] | IO[bytes],
        keys: Iterable[Any] | AsyncIterable[Any] | None = None,
        *,
        concurrency: int = 256,
        progress: bool = False,
        format_version: int = VERSION2,
        shards: int | None = None,
        client: Any = None,
    ) -> int:
        """Write the items of ``dataset`` (all of them, or those of ``keys``) into a file.

        Returns the number of items written. Items are fetched the way the
        dataset fetches (``query_items`` on chunks of keys for a bulk
        backend, ``query_item`` otherwise), up to ``concurrency`` at a time,
        and written in key order; pickling and writing happen in a worker
        thread while the next chunks load. The dataset's ``context`` mapping, if any, is stored.
        A blocking dataset (such as an original ``mlworkflow`` one) is
        wrapped with :func:`~mlworkflow_async.from_sync`.

        ``path`` is written atomically: the data goes to a temporary file in
        the same folder, synced, then renamed to ``path``. On an error,
        cancellation or Ctrl-C the temporary file is removed and any
        previous file at ``path`` is left as it was. A process killed
        meanwhile (``SIGKILL``, a crash, a power cut) cannot remove it: the
        unfinished file stays beside ``path``, named ``.NAME.XXXXXXXX.tmp``
        (the target's name after a dot, 8 hex digits, ``.tmp``: for
        ``data.pkl``, ``.data.pkl.3f9a0c1e.tmp``). Readers reject it as
        unfinished; it is safe to delete once no ``create`` is writing it.
        ``path`` may instead be a binary file object open for writing, at
        its start; it is written directly, so an interrupted write leaves it
        partial (and unreadable: readers detect it).

        ``progress=True`` shows a progress bar if ``tqdm`` is installed.
        ``format_version=1`` writes the previous format (no checksums, an
        index built in memory at open) for readers older than format 2.

        An item that cannot be pickled raises
        :class:`~mlworkflow_async.exceptions.UnpicklableItemError` naming it.
        Keys are unique: a key given twice, or two keys equal in Python but
        pickled differently (``1`` and ``True``, ``1`` and ``1.0``), raise
        ``ValueError`` naming them.

        ``shards=N`` makes ``path`` a folder of ``N`` shard files and a
        manifest, written in parallel on ``client``: a Dask ``Client``, a
        ``concurrent.futures.Executor``, or ``"process"`` for a pool of
        local processes; without ``client``, in this process. See
        :mod:`mlworkflow_async._store._shard_writer`.
        """
        if concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, got {concurrency}")
        if format_version not in (1, VERSION2):
            raise ValueError(f"format_version must be 1 or 2, got {format_version!r}")
        dataset = _as_dataset(dataset)
        if shards is not None or client is not None:
            from ._shard_writer import create_sharded

            return await create_sharded(
                dataset, cast("str | os.PathLike[str]", path), keys, shards=shards,
                client=client, concurrency=concurrency, progress=progress,
            )
        source: Iterable[Any] | AsyncIterable[Any] = dataset.keys if keys is None else keys
        context = getattr(dataset, "context", None)
        if not isinstance(context, Mapping):
            context = None
        chunk = min(concurrency, _CHUNK)

        def open_sink() -> Sink:
            sink: Sink
            if isinstance(path, (str, os.PathLike)):
                sink = AtomicFile(os.fspath(path))
            elif hasattr(path, "write"):
                sink = FileObject(cast(BinaryIO, path))
            else:
                raise TypeError(f"create() writes to a path or a binary file object, got {path!r}")
            try:
                sink.write([header2() if format_version == VERSION2 else header()])
            except BaseException:
                sink.discard()
                raise
            return sink

        sink = await anyio.to_thread.run_sync(open_sink)
        encoder: Encoder | Encoder2 = (
            Encoder2(sink.name) if format_version == VERSION2 else Encoder(sink.name)
        )
        bar = _progress_bar(progress, _known_length(source), sink.name)
        committed = False
        engine = dataset._engine(source, chunk, concurrency)
        try:
            while True:
                try:
                    units = [await engine.next_unit(), *engine.take_ready()]
                except StopAsyncIteration:
                    break
                # The units fetched while the last write ran go in one thread hop
                # (tiny items: the hop costs more than encoding them).
                keys = [key for unit in units for key in unit.keys]
                items = [item for unit in units for item in unit.batch]
                await anyio.to_thread.run_sync(_write_chunk, encoder, sink, keys, items)
                # Small items: let more of them gather while a write runs, so
                # that a hop carries more (1M tiny items: 1.3x with 8k a hop).
                per_item = max(1, encoder.position // max(1, encoder.count))
                engine.hold(min(_HOLD_ITEMS, _HOLD_BYTES // per_item))
                if bar is not None:
                    bar.update(len(keys))
            await anyio.to_thread.run_sync(_finish, encoder, sink, context)
            committed = True
        finally:
            await engine.aclose()
            if not committed:
                with anyio.CancelScope(shield=True):
                    await anyio.to_thread.run_sync(sink.discard)
            if bar is not None:
                bar.close()
        return encoder.count


# -- files behind URLs ---------------------------------------------------------


def _remote_options(
    mmap: bool, safe: bool, allow: Iterable[object], cache_dir: Any, remote: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The options to keep (to reopen elsewhere) and the arguments of the remote reader."""
    allowed = tuple(allow)
    if cache_dir is not None:
        remote["cache_dir"] = os.fspath(cache_dir)
    kept = {"mmap": bool(mmap), "safe": bool(safe), "allow": allowed, "remote": dict(remote)}
    return kept, {"use_mmap": bool(mmap), "safe": bool(safe), "allow": allowed, **remote}


def _local_only(path: object, cache_dir: object, remote: dict[str, Any]) -> None:
    if cache_dir is not None or remote:
        names = ", ".join(sorted([*remote, *(["cache_dir"] if cache_dir is not None else [])]))
        raise TypeError(
            f"{names} only apply to files behind URLs (http(s)://, s3://, ...), and {path!r} "
            f"is a local path"
        )


# -- helpers for create ------------------------------------------------------


def _as_dataset(dataset: Any) -> Dataset[Any, Any]:
    if isinstance(dataset, Dataset):
        return dataset
    if callable(getattr(dataset, "query_item", None)) and callable(
        getattr(dataset, "yield_keys", None)
    ):
        from .._core._adapters import from_sync

        return from_sync(dataset)
    raise TypeError(f"create() needs a dataset, got {dataset!r}")


def _known_length(source: object) -> int | None:
    if isinstance(source, KeySequence):
        return len(source) if source.complete else None
    return len(source) if isinstance(source, Sized) else None


def _write_chunk(
    encoder: Encoder | Encoder2, sink: Sink, keys: list[Any], items: list[Any]
) -> None:
    sink.write(encoder.encode(keys, items))



def _finish(encoder: Encoder | Encoder2, sink: Sink, context: Mapping[str, Any] | None) -> None:
    if isinstance(encoder, Encoder2):
        encoder.finish(context, sink.write)
    else:
        sink.write([encoder.finish(context)])
    sink.commit()


def _format_of(path: str) -> int | None:
    """The format version a file's header announces (None for other files)."""
    try:
        with open(path, "rb") as file:
            head = file.read(HEADER_SIZE)
    except IsADirectoryError:
        return None
    if not head.startswith(MAGIC) or len(head) < 12:
        return None
    return int.from_bytes(head[8:12], "little")



def _progress_bar(enabled: bool, total: int | None, name: str) -> Any:
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, unit="item", desc=os.path.basename(name) or name)


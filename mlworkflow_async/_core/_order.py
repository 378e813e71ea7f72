"""The order of a stream's keys: plain, shuffled by seed and epoch, sharded by rank; resumable.

A stream hands out *units* (its batches) of consecutive positions. A
:class:`KnownOrder` maps unit ``u`` to its keys in constant time and memory
whatever the number of keys, so a stream can start at any unit: that is what
makes resuming exact and cheap. A :class:`StreamedOrder` reads keys as they
are discovered, for datasets whose keys are not all known yet.

Shuffling uses a keyed bijection of ``[0, n)`` (a Feistel-like network
over a grid of about ``sqrt(n) x sqrt(n)``, see :class:`Permutation`),
evaluated a batch at a time with numpy: no shuffled copy of the indices is ever made, and the same
seed and epoch give the same order in every process and on every machine.

>>> order = KnownOrder(list("abcdefghij"), batch_size=4, seed=7, epoch=0)
>>> [order.unit_keys(u) for u in range(order.units)] == [
...     order.unit_keys(u) for u in range(order.units)]
True
>>> sorted(k for u in range(order.units) for k in order.unit_keys(u)) == list("abcdefghij")
True
"""

from __future__ import annotations

import hashlib
import math
import pickle
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import islice
from typing import Any, Generic, TypeVar

import numpy as np

from ..exceptions import ResumeError
from ._keys import KeySequence

__all__ = ["KnownOrder", "Permutation", "StreamedOrder", "StreamSpec", "fingerprint"]

K = TypeVar("K")

_ROUNDS = 8
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_S1, _S2 = np.uint64(30), np.uint64(31)
#: Keys sampled (evenly spaced) to fingerprint a key list in constant time.
_SAMPLE = 64
STATE_FORMAT = "mlworkflow_async.batches/1"


class Permutation:
    """A bijection of ``range(n)`` chosen by ``(seed, epoch)``, computed on the fly.

    ``x`` is read as a pair ``(left, right)`` in ``[0, a) x [0, b)`` with
    ``a * b`` just above ``n`` (``a`` about ``sqrt(n)``); each round adds a
    keyed hash of one half to the other, modulo its range, which is
    invertible whatever the hash. Values that land in ``[n, a * b)`` (a
    fraction of about ``2 / sqrt(n)``) walk on until they are back in range.

    >>> p = Permutation(10, seed=3, epoch=1)
    >>> sorted(p(np.arange(10)).tolist()) == list(range(10))
    True
    >>> (p(np.arange(10)) == Permutation(10, 3, 1)(np.arange(10))).all()
    np.True_
    """

    __slots__ = ("_a", "_b", "_keys", "n")

    def __init__(self, n: int, seed: int, epoch: int) -> None:
        self.n = n
        self._a = math.isqrt(max(n - 1, 0)) + 1
        self._b = max(1, -(-n // self._a))
        digest = hashlib.blake2b(
            f"{seed}/{epoch}".encode(), digest_size=8 * _ROUNDS, person=b"mlwa-shuffle"
        ).digest()
        self._keys = [np.uint64(k) for k in np.frombuffer(digest, dtype="<u8").tolist()]

    def _once(self, x: np.ndarray) -> np.ndarray:
        a, b = np.uint64(self._a), np.uint64(self._b)
        left: np.ndarray = x // b
        right: np.ndarray = x % b
        for i, key in enumerate(self._keys):
            if i % 2:
                right = (right + _mix(left, key) % b) % b
            else:
                left = (left + _mix(right, key) % a) % a
        out: np.ndarray = left * b + right
        return out

    def __call__(self, positions: np.ndarray) -> np.ndarray:
        out = self._once(positions.astype(np.uint64))
        outside = out >= self.n
        while outside.any():  # rare: the domain exceeds n by about 2 * sqrt(n)
            out[outside] = self._once(out[outside])
            outside = out >= self.n
        return out.astype(np.int64)


def _mix(v: np.ndarray, key: np.uint64) -> np.ndarray:
    """A keyed 64-bit hash of every value of ``v`` (multiply and xor-shift)."""
    z = (v ^ key) * _M1  # wraps modulo 2**64, as intended
    z ^= z >> _S1
    z *= _M2
    z ^= z >> _S2
    return z


def fingerprint(keys: Sequence[Any], count: int | None = None) -> str:
    """A short digest of ``count`` keys (default: all), from an even sample of them.

    Constant time: it reads at most 64 keys, so a change elsewhere in a long
    key list can go unnoticed; the count is always part of it.
    """
    n = len(keys) if count is None else count
    digest = hashlib.blake2b(str(n).encode(), digest_size=8)
    step = max(1, n // _SAMPLE)
    for index in range(0, n, step):
        digest.update(pickle.dumps(keys[index], protocol=5))
    if n:
        digest.update(pickle.dumps(keys[n - 1], protocol=5))
    return digest.hexdigest()


@dataclass(frozen=True)
class StreamSpec:
    """What defines the order of a stream, checked again on resume."""

    batch_size: int
    shuffle: int | None
    epoch: int
    shard: tuple[int, int] | None
    drop_incomplete: bool
    ordered: bool

    def state(
        self, position: int, done: Iterable[int], keys: dict[str, Any] | None
    ) -> dict[str, Any]:
        """The JSON-serialisable state at ``position``; ``keys`` None before any key is read."""
        return {
            "format": STATE_FORMAT,
            "batch_size": self.batch_size,
            "shuffle": self.shuffle,
            "epoch": self.epoch,
            "shard": list(self.shard) if self.shard else None,
            "drop_incomplete": self.drop_incomplete,
            "ordered": self.ordered,
            "keys": keys,
            "position": position,
            "done": sorted(done),
        }

    def check(self, state: Any) -> tuple[int, frozenset[int]]:
        """The position and units done recorded in ``state``, once it matches this spec."""
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise ResumeError(
                f"resume= takes the dict returned by stream.state_dict(), got {state!r:.100}"
            )
        mine = self.state(0, (), None)
        differences = [
            f"{name}={state.get(name)!r} (now {name}={mine[name]!r})"
            for name in ("batch_size", "shuffle", "epoch", "shard", "drop_incomplete", "ordered")
            if state.get(name) != mine[name]
        ]
        if differences:
            raise ResumeError(
                f"cannot resume: the saved stream had {', '.join(differences)}; pass the "
                f"same arguments as the saved stream"
            )
        position, done = state.get("position"), state.get("done")
        if (
            type(position) is not int
            or position < 0
            or not isinstance(done, list)
            or not all(type(u) is int and u > position for u in done)
            or (state.get("keys") is None and (position or done))
        ):
            raise ResumeError(f"cannot resume: the saved position is malformed ({state!r:.200})")
        return position, frozenset(done)


class KnownOrder(Generic[K]):
    """Units of a known key list, in plain or shuffled order, restricted to one shard.

    Rank ``r`` of ``w`` takes global positions ``r, r + w, r + 2w, ...`` of
    the (shuffled) order: every key goes to exactly one rank, and ranks get
    the same number of keys give or take one. With ``drop_incomplete`` every
    rank takes ``n // w`` keys and whole batches only, so all ranks get the
    same number of batches.
    """

    def __init__(
        self,
        keys: Sequence[K],
        batch_size: int,
        seed: int | None = None,
        epoch: int = 0,
        shard: tuple[int, int] | None = None,
        drop_incomplete: bool = False,
    ) -> None:
        self.keys = keys
        self.batch_size = batch_size
        n = len(keys)
        self.rank, self.world = shard if shard is not None else (0, 1)
        if drop_incomplete:
            self.count = n // self.world
            self.units = self.count // batch_size
        else:
            self.count = len(range(self.rank, n, self.world))
            self.units = -(-self.count // batch_size)
        self._permute = Permutation(n, seed, epoch) if seed is not None and n > 1 else None
        self._fingerprint: dict[str, Any] | None = None

    def unit_keys(self, unit: int) -> list[K]:
        """The keys of unit ``unit``, in order; empty past the end."""
        if unit >= self.units:
            return []
        start = unit * self.batch_size
        stop = min(start + self.batch_size, self.count)
        keys = self.keys
        if self._permute is None and self.world == 1:
            return list(keys[start:stop])
        positions = np.arange(start, stop, dtype=np.int64) * self.world + self.rank
        if self._permute is not None:
            positions = self._permute(positions)
        return [keys[i] for i in positions.tolist()]

    def fingerprint(self) -> dict[str, Any]:
        """The count and digest of the keys (computed once: the key list never changes)."""
        if self._fingerprint is None:
            self._fingerprint = {"count": len(self.keys), "fingerprint": fingerprint(self.keys)}
        return self._fingerprint

    def check_keys(self, saved: Any, handed_out: int) -> None:
        """Raise :class:`ResumeError` unless ``saved`` (or None: nothing read) matches.

        ``handed_out`` is the keys before the saved position: a state saved
        while the keys streamed counts no more than those.
        """
        if saved is None:
            return
        expected = self.fingerprint()
        count = saved.get("count") if isinstance(saved, dict) else None
        if (
            type(count) is int
            and 0 <= count <= handed_out
            and count < len(self.keys)
            and self._permute is None
            and self.world == 1
        ):
            # Saved while the keys still streamed: it covers only those handed out.
            expected = {"count": count, "fingerprint": fingerprint(self.keys, count)}
        _check_same(saved, expected)


class StreamedOrder(Generic[K]):
    """Units of keys read in order as they come: from a dataset's keys, or any iterable.

    The keys of a :class:`KeySequence` are claimed by position (whole units
    per await, and memoized, so a resumed stream skips ahead without
    fetching any item); other iterables are read in order.
    """

    def __init__(
        self,
        source: KeySequence[K] | Iterable[K] | AsyncIterable[K],
        batch_size: int,
    ) -> None:
        self.batch_size = batch_size
        self.units: int | None = None
        self._seq = source if isinstance(source, KeySequence) else None
        self._iter: Iterator[K] | None = None
        self._aiter: AsyncIterator[K] | None = None
        if self._seq is None:
            if isinstance(source, AsyncIterable):
                self._aiter = aiter(source)
            else:
                self._iter = iter(source)
        self._read = 0  # keys read from a plain iterable so far
        self._seen: list[K] = []  # a sample, to fingerprint what was handed out

    async def unit_keys(self, unit: int) -> list[K]:
        start = unit * self.batch_size
        if self._seq is not None:
            return await self._seq.slice(start, start + self.batch_size)
        await self._skip_to(start)
        keys: list[K] = []
        if self._iter is not None:
            keys = list(islice(self._iter, self.batch_size))
        else:
            assert self._aiter is not None
            for _ in range(self.batch_size):
                try:
                    keys.append(await anext(self._aiter))
                except StopAsyncIteration:
                    break
        self._read += len(keys)
        return keys

    async def _skip_to(self, start: int) -> None:
        # Units are claimed in increasing order; a resumed stream starts further on.
        while self._read < start:
            step = min(start - self._read, 4096)
            if self._iter is not None:
                got = sum(1 for _ in islice(self._iter, step))
            else:
                assert self._aiter is not None
                got = 0
                for _ in range(step):
                    try:
                        await anext(self._aiter)
                    except StopAsyncIteration:
                        break
                    got += 1
            self._read += got
            if got < step:
                return

    def fingerprint(self, handed_out: int) -> dict[str, Any]:
        if self._seq is None:
            return {"count": handed_out, "fingerprint": None}
        known = self._seq.known_list()
        count = min(handed_out, len(known))
        return {"count": count, "fingerprint": fingerprint(known, count)}

    async def check_keys(self, saved: Any) -> None:
        """Raise :class:`ResumeError` unless the keys handed out before match ``saved``."""
        if saved is None:
            return
        if not isinstance(saved, dict) or type(saved.get("count")) is not int:
            raise ResumeError(f"cannot resume: the saved keys are malformed ({saved!r:.100})")
        if self._seq is None:
            return  # a plain iterable cannot be checked without reading it twice
        count = saved["count"]
        await self._seq.fill_to(count)
        _check_same(saved, self.fingerprint(count))


def _check_same(saved: Any, mine: dict[str, Any]) -> None:
    if not isinstance(saved, dict) or set(saved) != {"count", "fingerprint"}:
        raise ResumeError(f"cannot resume: the saved keys are malformed ({saved!r:.100})")
    if saved == mine:
        return
    if saved["count"] != mine["count"]:
        what = f"there were {saved['count']} keys, there are {mine['count']} now"
    else:
        what = f"the {mine['count']} keys are not the same ones (fingerprint "
        what += f"{saved['fingerprint']} then, {mine['fingerprint']} now)"
    raise ResumeError(
        f"cannot resume: the dataset's keys changed since the state was saved: {what}; "
        f"a saved stream resumes only over the keys it was started with"
    )

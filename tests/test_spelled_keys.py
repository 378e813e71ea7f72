"""Spelled key bytes are the pickler's, byte for byte, or not spelled at all."""

from __future__ import annotations

import asyncio
import collections
import copyreg
import io
import math
import pickle
import random
from typing import Any, NamedTuple

import numpy as np
import pytest

from mlworkflow_async import DictDataset, PickledDataset
from mlworkflow_async._store._format2 import key_bytes
from mlworkflow_async._store._spelled_keys import framed_off, spell_key


class Key(NamedTuple):
    name: str
    index: int


class Deep(NamedTuple):
    key: Key
    tags: tuple[Any, ...] = ()


Pair = collections.namedtuple("Pair", "a b")


class Outer:
    class Inner(NamedTuple):
        x: float


class WithDict(Key):
    """A NamedTuple subclass whose instances have a dict: pickled with its state."""


class Reduced(NamedTuple):
    v: int

    def __reduce__(self) -> Any:
        return (Reduced, (self.v + 1,))


def pickled(key: Any) -> bytes:
    """What the key bytes were before spelling: the fast pickler, unframed."""
    out = io.BytesIO()
    pickler = pickle.Pickler(out, 5)
    pickler.fast = True
    pickler.dump(key)
    return framed_off(out.getvalue())


ATOMS: list[Any] = [
    0, 1, 255, 256, 65535, 65536, -1, -256, 2**31 - 1, -(2**31), 2**31, -(2**31) - 1, 2**70,
    "", "a", "é", "🙂", "\ud800", "x" * 255, "x" * 256, "é" * 200, "y" * 70_000,
    b"", b"\x00", b"z" * 255, b"z" * 256, b"w" * 70_000,
    0.0, -0.0, 1.5, math.inf, -math.inf, math.nan, 1e-300,
    None, True, False,
]


def random_key(rng: random.Random, depth: int = 0) -> Any:
    roll = rng.random()
    if depth > 2 or roll < 0.45:
        if rng.random() < 0.3:
            return rng.choice([rng.randrange(-(2**33), 2**33), rng.random() * 1e6,
                               "".join(chr(rng.randrange(32, 0x3000)) for _ in range(5))])
        return rng.choice(ATOMS)
    size = rng.randrange(0, 7)
    items = tuple(random_key(rng, depth + 1) for _ in range(size))
    if roll < 0.75:
        return items
    shape = rng.choice([Key, Pair, Outer.Inner, Deep])
    if shape is Key:
        return Key(str(rng.choice(ATOMS[13:20])), rng.randrange(-(2**31), 2**31))
    if shape is Pair:
        return Pair(items, rng.choice(ATOMS))
    if shape is Outer.Inner:
        return Outer.Inner(rng.random())
    return Deep(Key("k", rng.randrange(100)), items)


def spellable(key: Any) -> bool:
    """Whether the key has one of the shapes meant to be spelled."""
    kind = type(key)
    if kind is int:
        return -(2**31) <= key < 2**31
    if kind in (str, bytes):
        return len(key.encode("utf-8", "surrogatepass") if kind is str else key) <= 50_000
    if kind is tuple or kind in (Key, Deep, Pair, Outer.Inner):
        return all(map(spellable, key))
    return kind in (float, bool, type(None))


def reference(key: Any) -> bytes:
    """The key bytes as written before spelling: ints, bytes and floats by pickle.dumps."""
    if type(key) in (int, bytes, float):
        return framed_off(pickle.dumps(key, 5))
    return pickled(key)


def test_spelled_keys_are_the_pickler_bytes() -> None:
    rng = random.Random(7)
    keys = [*ATOMS, *(random_key(rng) for _ in range(5000)), (), ((),), Key("a", 1),
            Deep(Key("b", 2), (1, "x", None)), Pair(1, 2), Outer.Inner(0.5)]
    spelled = 0
    for key in keys:
        got = spell_key(key)
        assert (got is not None) == spellable(key), key
        if got is not None:
            spelled += 1
            assert got == pickled(key), key
        assert key_bytes(key) == reference(key), key
    assert spelled > len(keys) // 2


@pytest.mark.parametrize(
    "key",
    [
        WithDict("a", 1),  # its instance dict would be pickled
        Reduced(3),  # its own __reduce__
        (np.int64(3), "a"),  # a numpy scalar in a tuple keeps numpy's reduction
        [1, 2],
        frozenset({1}),
        (1, [2]),
        Key("y" * 70_000, 1),  # past what one frame of the pickler holds
    ],
    ids=["dict", "reduce", "numpy", "list", "frozenset", "nested list", "long"],
)
def test_other_shapes_are_left_to_the_pickler(key: Any) -> None:
    assert spell_key(key) is None
    if isinstance(key, WithDict):
        key.note = "x"  # type: ignore[attr-defined]
    try:
        expected = pickled(key)
    except TypeError:  # unhashable inside: key_bytes is never asked for these
        return
    assert key_bytes(key) == expected


def test_a_class_registered_with_copyreg_is_left_to_the_pickler() -> None:
    class Local(NamedTuple):
        v: int

    assert spell_key(Key("a", 1)) is not None
    assert spell_key(Local(1)) is None  # not found under its name: the pickler's error
    with pytest.raises((pickle.PicklingError, AttributeError)):
        key_bytes(Local(1))
    copyreg.pickle(Key, lambda key: (Key, (key.name, key.index)))
    try:
        assert spell_key(Key("a", 1)) is None
        assert key_bytes(Key("a", 1)) == pickled(Key("a", 1))
    finally:
        del copyreg.dispatch_table[Key]
    assert spell_key(Key("a", 1)) == pickled(Key("a", 1))


def test_files_find_spelled_keys(tmp_path: Any) -> None:
    # Written with spelled key bytes, found by key, listed by unpickling them.
    keys = [Key("img", i) for i in range(50)] + ["s", ("t", 1.5, None), Deep(Key("d", 1))]
    path = tmp_path / "keys.pkl"
    asyncio.run(PickledDataset.create(DictDataset({k: i for i, k in enumerate(keys)}), path))
    with PickledDataset(path) as ds:
        assert ds.sync.query_items(keys[::-1]) == list(range(len(keys)))[::-1]
        assert ds.sync.keys.all() == keys


def test_classes_made_on_the_fly_are_not_held_forever() -> None:
    import gc
    import weakref

    from mlworkflow_async._store import _spelled_keys

    made = []
    for index in range(1100):
        cls = type(f"Made{index}", (), {})
        made.append(weakref.ref(cls))
        assert spell_key((cls(), index)) is None
        del cls
    gc.collect()
    assert len(_spelled_keys._prefixes) <= 1024
    assert sum(ref() is not None for ref in made) <= 1024  # the cache holds the rest no more
    assert any(ref() is None for ref in made)

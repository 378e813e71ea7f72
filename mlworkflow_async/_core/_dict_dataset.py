"""A dataset backed by an in-memory mapping."""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import TypeVar

from ..exceptions import UnhashableKeyError
from ._dataset import Dataset

__all__ = ["DictDataset"]

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class DictDataset(Dataset[K, V]):
    """The items of a mapping, keyed as in the mapping.

    >>> import asyncio
    >>> ds = DictDataset({1: "a", 2: "b", 3: "c"})
    >>> len(ds), asyncio.run(ds.query_item(2))
    (3, 'b')
    """

    batched_queries = True

    def __init__(self, dic: Mapping[K, V]) -> None:
        if not isinstance(dic, Mapping):
            raise TypeError(
                f"DictDataset takes a mapping of keys to items, got {type(dic).__name__}; "
                f"for a list, use DictDataset(dict(enumerate(items)))"
            )
        self.dic = dic

    def yield_keys(self) -> tuple[K, ...]:
        return tuple(self.dic)

    async def query_item(self, key: K) -> V:
        try:
            return self.dic[key]
        except KeyError:
            raise KeyError(f"{key!r} is not a key of this DictDataset") from None
        except TypeError:
            UnhashableKeyError.check(self, (key,))
            raise

    async def query_items(
        self, keys: Sequence[K], concurrency: int | None = None
    ) -> list[V]:
        # Plain lookups: no need to schedule anything per item.
        return self._lookup(keys)

    def _blocking_items(self, keys: Sequence[K]) -> list[V] | None:
        return self._lookup(keys)

    def _lookup(self, keys: Sequence[K]) -> list[V]:
        dic = self.dic
        try:
            return [dic[key] for key in keys]
        except KeyError as exc:
            raise KeyError(f"{exc.args[0]!r} is not a key of this DictDataset") from None
        except TypeError:
            UnhashableKeyError.check(self, keys)
            raise

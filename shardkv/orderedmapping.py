"""`items()`, `values()` and `reversed()` of a store as one ordered scan; `update()`'s arguments.

The `MutableMapping` defaults walk `iter(db)` and call `db[key]` for each key: one round of
`get` per item (18x slower than `scan()` on 200k keys), and not at the scan's snapshot, so a
cross-shard batch committed while they run showed in part (docs/TRANSACTIONS.md, "Isolation").
A store whose `scan()` yields (key, value) in key order inherits from `ScanMapping` instead.
"""

from __future__ import annotations

import itertools
from collections.abc import ItemsView, Iterable, Iterator, KeysView, Mapping, MutableMapping, ValuesView
from typing import Any


class KeysInOrder(KeysView):
    """`db.keys()`: the keys in key order (`reversed()`: from the last)."""

    def __reversed__(self) -> Iterator[Any]:
        return reversed(self._mapping)


class ItemsInOrder(ItemsView):
    """`db.items()`: (key, value) in key order, read by one `db.scan()`."""

    def __iter__(self) -> Iterator[tuple[Any, Any]]:
        return iter(self._mapping.scan())

    def __reversed__(self) -> Iterator[tuple[Any, Any]]:
        return iter(self._mapping.scan(reverse=True))


class ValuesInOrder(ValuesView):
    """`db.values()`: the values in key order, read by one `db.scan()`."""

    def __iter__(self) -> Iterator[Any]:
        return (value for _, value in self._mapping.scan())

    def __reversed__(self) -> Iterator[Any]:
        return (value for _, value in self._mapping.scan(reverse=True))


class ScanMapping(MutableMapping):
    """A MutableMapping whose `items()` and `values()` come from its ordered `scan()`."""

    def __reversed__(self) -> Iterator[Any]:
        """The keys from the last to the first (one `scan(reverse=True)`), as reversed(dict)."""
        return (key for key, _ in self.scan(reverse=True))

    def keys(self) -> KeysInOrder:  # type: ignore[override]
        """A view of the keys, in key order; `reversed()` of it goes from the last."""
        return KeysInOrder(self)

    def items(self) -> ItemsInOrder:  # type: ignore[override]
        """A view of (key, value) pairs; iterating it is one `scan()`, in key order."""
        return ItemsInOrder(self)

    def values(self) -> ValuesInOrder:  # type: ignore[override]
        """A view of the values; iterating it is one `scan()`, in key order."""
        return ValuesInOrder(self)


def update_pairs(other: Any, kwds: dict) -> Iterator[Any]:
    """The (key, value) pairs of `update(other, **kwds)` as dict.update reads them: a mapping's
    items, an object with keys() read key by key, else `other` itself as pairs; then `kwds`."""
    if isinstance(other, Mapping):
        pairs: Iterable = other.items()
    elif hasattr(other, "keys"):
        pairs = ((key, other[key]) for key in other.keys())
    else:
        pairs = other
    return itertools.chain(pairs, kwds.items())

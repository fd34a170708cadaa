"""`Bounded`: the one kind of table the dispatch core keeps, safe under threads."""

import collections
import threading
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar


_V = TypeVar("_V")


class Bounded(Generic[_V]):
    """A dict of at most `limit` entries, least recently used dropped first: a
    program, token or placement in use is never pushed out by others made since
    (a busy process keeps its training step).

    Every operation is one or two C calls on an `OrderedDict` (atomic under the
    GIL), so reads take no lock. `get_or_make` makes a missing value under a lock,
    so that two threads asking for the same key at once get the same value, made
    once; `make` must not trace or compile (nothing is ever held locked across a
    call into JAX). `discard` takes no lock: weak-reference callbacks call it, and
    those can run inside any allocation, including one made while the lock is held.
    """

    __slots__ = ("_entries", "_limit", "_lock")

    def __init__(self, limit: int):
        self._entries: collections.OrderedDict[Hashable, _V] = collections.OrderedDict()
        self._limit = limit
        self._lock = threading.RLock()

    def get(self, key: Hashable) -> _V | None:
        """The value for `key` (now the most recently used), or `None`. Raises
        `TypeError` for an unhashable key."""
        entries = self._entries
        value = entries.get(key)
        if value is not None:
            try:
                entries.move_to_end(key)
            except KeyError:  # dropped by another thread meanwhile: still ours
                pass
        return value

    def get_or_make(self, key: Hashable, make: Callable[[], _V]) -> _V:
        value = self.get(key)
        if value is not None:
            return value
        with self._lock:
            value = self._entries.get(key)
            if value is None:
                value = make()
                self._insert(key, value)
            return value

    def put(self, key: Hashable, value: _V) -> None:
        with self._lock:
            self._entries.pop(key, None)
            self._insert(key, value)

    def _insert(self, key: Hashable, value: _V) -> None:
        entries = self._entries
        while len(entries) >= self._limit:
            try:
                entries.popitem(last=False)
            except KeyError:  # emptied by a concurrent `discard`
                break
        entries[key] = value

    def discard(self, key: Hashable, value: _V) -> None:
        """Drops `key` if it still maps to `value`."""
        if self._entries.get(key) is value:
            self._entries.pop(key, None)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._entries

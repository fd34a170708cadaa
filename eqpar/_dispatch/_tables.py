"""`Bounded`: the one kind of table the dispatch core keeps, safe under threads."""

import threading
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar


_V = TypeVar("_V")


class Bounded(Generic[_V]):
    """A dict of at most `limit` entries, oldest dropped first.

    Reads are plain dict reads (atomic under the GIL, so the hot path takes no
    lock). `get_or_make` makes a missing value under a lock, so that two threads
    asking for the same key at once get the same value, made once. `discard` takes
    no lock: it is what weak-reference callbacks call, and those can run inside any
    allocation, including one made while the lock is held.
    """

    __slots__ = ("_entries", "_limit", "_lock")

    def __init__(self, limit: int):
        self._entries: dict[Hashable, _V] = {}
        self._limit = limit
        self._lock = threading.RLock()

    def get(self, key: Hashable) -> _V | None:
        """The value for `key`, or `None`. Raises `TypeError` for an unhashable key."""
        return self._entries.get(key)

    def get_or_make(self, key: Hashable, make: Callable[[], _V]) -> _V:
        try:
            return self._entries[key]
        except KeyError:
            pass
        with self._lock:
            value = self._entries.get(key)
            if value is None:
                value = make()
                while len(self._entries) >= self._limit:
                    evict_oldest(self._entries)
                self._entries[key] = value
            return value

    def put(self, key: Hashable, value: _V) -> None:
        with self._lock:
            self._entries.pop(key, None)
            while len(self._entries) >= self._limit:
                evict_oldest(self._entries)
            self._entries[key] = value

    def discard(self, key: Hashable, value: _V) -> None:
        """Drops `key` if it still maps to `value`."""
        if self._entries.get(key) is value:
            self._entries.pop(key, None)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)


def evict_oldest(entries: dict) -> None:
    """Drops the oldest entry of `entries`. A weak-reference callback (or another
    thread's lock-free `discard`) may change the dict at the same moment: then
    there is nothing left to do here."""
    try:
        entries.pop(next(iter(entries)), None)
    except (RuntimeError, StopIteration):
        pass

"""Checks that a test leaves the repository's files alone: examples, the demo and the
benchmarks write only where they are told to (a temporary folder in the tests).

In this process an audit hook (`sys.addaudithook`) sees every file opened for writing
and every folder made; a subprocess is checked by the files it could touch (`watched`)
and by running it from a temporary folder. Other changes to the checkout (someone
editing it at the same time) cannot make these checks fail.
"""

import contextlib
import os
import pathlib
import sys
from collections.abc import Iterator


ROOT = pathlib.Path(__file__).parent.parent.resolve()
# Written by Python, pytest and hypothesis themselves, not by the code under test.
_TOOLING = {"__pycache__", ".pytest_cache", ".hypothesis", ".venv", ".nox", ".git"}
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
_writes: list[str] | None = None  # recording while not None


def _in_repository(path: object) -> str | None:
    if isinstance(path, int):  # a file descriptor
        return None
    try:
        full = pathlib.Path(os.path.abspath(os.fsdecode(path)))
    except (TypeError, ValueError):
        return None
    if not full.is_relative_to(ROOT):
        return None
    inside = full.relative_to(ROOT)
    if _TOOLING & set(inside.parts):
        return None
    return str(inside)


def _audit(event: str, args: tuple) -> None:
    if _writes is None:
        return
    if event == "open":
        path, mode, flags = args
        writing = (
            any(c in mode for c in "wax+") if isinstance(mode, str) else False
        ) or bool((flags or 0) & _WRITE_FLAGS)
        paths = [path] if writing else []
    elif event in ("os.mkdir", "os.remove", "os.rmdir"):
        paths = [args[0]]
    elif event in ("os.rename", "os.replace", "os.link", "os.symlink"):
        paths = [args[0], args[1]]
    else:
        return
    for path in paths:
        inside = _in_repository(path)
        if inside is not None:
            _writes.append(f"{event} {inside}")


sys.addaudithook(_audit)


def _stamp(path: pathlib.Path) -> tuple[int, int] | None:
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    return stat.st_mtime_ns, stat.st_size


@contextlib.contextmanager
def leaves_repository_alone(*watched: pathlib.Path) -> Iterator[None]:
    """Fails if code run in this process inside the block writes anywhere in the
    checkout, or if anything (a subprocess too) touches one of the `watched` files
    (such as benchmarks/RESULTS.md)."""
    global _writes
    stamps = {path: _stamp(path) for path in watched}
    _writes = writes = []
    try:
        yield
    finally:
        _writes = None
    assert not writes, f"wrote into the repository: {sorted(set(writes))}"
    touched = [str(path) for path in watched if _stamp(path) != stamps[path]]
    assert not touched, f"changed files of the repository: {touched}"

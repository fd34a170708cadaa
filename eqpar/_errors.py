"""eqpar's error types.

Every error eqpar raises for bad input is one of these, so that user code can catch
eqpar's complaints precisely, and each subclasses the builtin a user would reach for
first (`ValueError`, `NameError`), so that generic handlers keep working.
"""

import sys
import warnings
from typing import Annotated, Any, TYPE_CHECKING, TypeVar


_T = TypeVar("_T")

if TYPE_CHECKING:
    Checked = Annotated[_T, "validated by eqpar"]
else:

    class _Checked:
        """`Checked[T]` is `T` to a static type checker and `Any` at run time: an
        option that eqpar validates itself, so that a wrong value gets eqpar's
        error (which says what to do) also under a runtime type checker such as
        beartype."""

        def __getitem__(self, item: Any) -> Any:
            return Any

    Checked = _Checked()


class EqparError(Exception):
    """Base class of every error eqpar raises on purpose."""


class SpecError(EqparError, ValueError):
    """A spec (`in_axes`, `out_axes`, `in_specs`, `out_specs`) does not fit the values
    it describes: wrong tree structure, an axis out of range, an unknown parameter
    name, or a value of the wrong kind."""


class AxisSizeError(EqparError, ValueError):
    """Mapped or sharded sizes do not fit: arguments disagree on the mapped size, a
    mapped axis is longer than the number of devices, or a sharded dimension does not
    divide over the mesh axes it is split across."""


class MeshError(EqparError, ValueError):
    """No mesh to run on, or a spec names an axis that the mesh does not have."""


class ReplicationError(EqparError, ValueError):
    """A value's replication type (`check_vma`) rules out what was asked, e.g.
    [`eqpar.grad_mean`][] of a gradient that is the same on every device, which may
    be a sum, an average or a term that never varied."""


class UnboundAxisError(EqparError, NameError):
    """A collective named an axis that no enclosing transform binds."""


class DeletedArrayError(EqparError, RuntimeError):
    """An input array's buffer is gone: it was donated to an earlier call (`donate=`)
    or deleted. Pass the output of that call (the new value) instead, or a copy."""


class CheckpointError(EqparError, ValueError):
    """A checkpoint cannot be saved or restored as asked: no (finished) checkpoint to
    restore, a step that is not after the latest one, or a `like` tree whose leaves,
    shapes or dtypes differ from the saved ones."""


class EqparWarning(UserWarning):
    """A call that runs but is probably not what was meant, e.g. a random key that
    `Parallel` broadcasts, so that every device draws the same numbers."""


def warn(message: str, category: type[Warning] = EqparWarning) -> None:
    """Issues a warning located at the first frame outside eqpar, JAX and Equinox,
    i.e. the user's line that led to it, however deep inside eqpar it was found."""
    frame, level = sys._getframe(1), 2  # stacklevel 2 is warn's caller
    while frame is not None and frame.f_globals.get("__name__", "").startswith(
        _LIBRARIES
    ):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)


_LIBRARIES = ("eqpar.", "jax", "equinox", "jaxtyping", "beartype")

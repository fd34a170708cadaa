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
    """Base class of every error eqpar raises on purpose.

    !!! example

        ```python
        import jax.numpy as jnp, eqpar

        try:
            eqpar.psum(jnp.ones(3), "i")  # no transform binds "i"
        except eqpar.EqparError as e:  # every kind below is one
            assert isinstance(e, eqpar.UnboundAxisError)
        ```
    """


class SpecError(EqparError, ValueError):
    """A spec (`in_axes`, `out_axes`, `in_specs`, `out_specs`) does not fit the values
    it describes: wrong tree structure, an axis out of range, an unknown parameter
    name, or a value of the wrong kind.

    !!! example

        ```python
        import jax.numpy as jnp, eqpar

        try:
            eqpar.filter_vmap(lambda x: x, in_axes=1)(jnp.ones(3))  # rank 1: no axis 1
        except eqpar.SpecError as e:
            assert "axis" in str(e)
        else:
            raise AssertionError("expected a SpecError")
        ```
    """


class AxisSizeError(EqparError, ValueError):
    """Mapped or sharded sizes do not fit: arguments disagree on the mapped size, a
    mapped axis is longer than the number of devices, or a sharded dimension does not
    divide over the mesh axes it is split across.

    !!! example

        ```python
        import jax.numpy as jnp, eqpar

        try:
            eqpar.filter_vmap(lambda x, y: x + y)(jnp.ones(3), jnp.ones(4))
        except eqpar.AxisSizeError as e:
            assert "3" in str(e) and "4" in str(e)  # both sizes are named
        else:
            raise AssertionError("expected an AxisSizeError")
        ```
    """


class MeshError(EqparError, ValueError):
    """No mesh to run on, or a spec names an axis that the mesh does not have.

    !!! example

        ```python
        import jax, jax.numpy as jnp, eqpar
        from jax.sharding import PartitionSpec as P

        mesh = jax.make_mesh((jax.device_count(),), ("data",))
        try:
            eqpar.filter_shard_map(lambda x: x, mesh=mesh, in_specs=P("model"),
                                   out_specs=P("model"))(jnp.ones(8))
        except eqpar.MeshError as e:
            assert "model" in str(e)
        else:
            raise AssertionError("expected a MeshError")
        ```
    """


class ReplicationError(EqparError, ValueError):
    """A value's replication type (`check_vma`) rules out what was asked, e.g.
    [`eqpar.grad_mean`][] of a gradient that is the same on every device, which may
    be a sum, an average or a term that never varied.

    !!! example

        ```python
        import jax, jax.numpy as jnp, eqpar
        from jax.sharding import PartitionSpec as P

        mesh = jax.make_mesh((jax.device_count(),), ("data",))

        @eqpar.filter_shard_map(mesh=mesh, in_specs=(P(), P("data")), out_specs=P())
        def step(w, x):
            grads = jax.grad(lambda w: jnp.sum(x @ w))(w)  # already summed over devices
            return eqpar.grad_mean(grads, "data")

        try:
            step(jnp.ones(3), jnp.ones((8, 3)))
        except eqpar.ReplicationError:
            pass  # use eqpar.filter_value_and_grad_mean, which knows the difference
        else:
            raise AssertionError("expected a ReplicationError")
        ```
    """


class UnboundAxisError(EqparError, NameError):
    """A collective named an axis that no enclosing transform binds.

    !!! example

        ```python
        import jax.numpy as jnp, eqpar

        try:
            eqpar.filter_vmap(lambda x: eqpar.psum(x, "j"), axis_name="i")(jnp.ones(3))
        except eqpar.UnboundAxisError as e:
            assert "'j'" in str(e)
        else:
            raise AssertionError("expected an UnboundAxisError")
        ```
    """


class DeletedArrayError(EqparError, RuntimeError):
    """An input array's buffer is gone: it was donated to an earlier call (`donate=`)
    or deleted. Pass the output of that call (the new value) instead, or a copy.

    !!! example

        ```python
        import jax.numpy as jnp, eqpar

        step = eqpar.filter_jit(lambda w: w + 1.0, donate="all")
        w = jnp.zeros(3)
        w_next = step(w)  # w's buffer now belongs to w_next
        try:
            step(w)
        except eqpar.DeletedArrayError:
            w_next = step(w_next)  # the new value is the one to pass
        else:
            raise AssertionError("expected a DeletedArrayError")
        ```
    """


class CheckpointError(EqparError, ValueError):
    """A checkpoint cannot be saved or restored as asked: no (finished) checkpoint to
    restore, a step that is not after the latest one, or a `like` tree whose leaves,
    shapes or dtypes differ from the saved ones.

    !!! example

        ```python
        import tempfile, jax.numpy as jnp, eqpar

        with eqpar.CheckpointManager(tempfile.mkdtemp()) as checkpoints:
            try:
                checkpoints.restore({"w": jnp.zeros(3)})  # nothing saved yet
            except eqpar.CheckpointError as e:
                assert "no" in str(e).lower()
            else:
                raise AssertionError("expected a CheckpointError")
        ```
    """


class EqparWarning(UserWarning):
    """A call that runs but is probably not what was meant, e.g. a random key that
    `Parallel` broadcasts, so that every device draws the same numbers.

    !!! example

        ```python
        import warnings, jax, jax.numpy as jnp, eqpar

        noisy = eqpar.Parallel(lambda x, key: x + jax.random.normal(key, x.shape),
                               in_axes=(0, None))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            noisy(jnp.zeros((8, 2)), jax.random.key(0))  # one key broadcast to all
        assert any(issubclass(w.category, eqpar.EqparWarning) for w in caught)
        ```
    """


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

"""Several processes, one program: JAX's own multi-process runtime, and the two
conversions a data-parallel program needs (each process's local batch -> one global
array, and back).

Nothing here is a cluster layer of eqpar's own: `initialize` is
`jax.distributed.initialize` plus the environment a launcher sets (`eqpar.launch`,
or your scheduler), and the array helpers are JAX's
`make_array_from_process_local_data` and `multihost_utils` applied to pytrees. After
`initialize`, `jax.devices()` lists every process's devices, so `data_mesh`,
`Parallel`, `filter_shard_map`, `replicate` and the collectives work across processes
with no change.

`initialize` also makes a process that fails end at once: Python's normal exit runs
JAX's distributed shutdown, which waits for every other process, while they may be
waiting for this one in a collective, so an uncaught exception would hang the run.
"""

import os
import sys
import threading
import types
from collections.abc import Mapping

import jax
import jax.tree_util as jtu
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from jaxtyping import PyTree

from ._errors import Checked, MeshError, SpecError
from ._runner import concrete_context_mesh
from ._specs import is_array


# The first variable that is set wins: eqpar's launcher sets the EQPAR_ ones.
_ENV = {
    "coordinator_address": ("EQPAR_COORDINATOR_ADDRESS", "JAX_COORDINATOR_ADDRESS"),
    "num_processes": ("EQPAR_NUM_PROCESSES", "JAX_NUM_PROCESSES"),
    "process_id": ("EQPAR_PROCESS_ID", "JAX_PROCESS_ID"),
    "local_device_count": ("EQPAR_LOCAL_DEVICES",),
}


def _from_env(name: str, env: Mapping[str, str]) -> str | None:
    for var in _ENV[name]:
        if env.get(var):
            return env[var]
    return None


def initialize(
    coordinator_address: Checked[str | None] = None,
    num_processes: Checked[int | None] = None,
    process_id: Checked[int | None] = None,
    *,
    local_device_count: Checked[int | None] = None,
) -> bool:
    """Starts JAX's multi-process runtime, from arguments or the environment.

    Call it first thing, before any JAX computation. Each argument left as `None` is
    read from the environment: `EQPAR_COORDINATOR_ADDRESS` (or
    `JAX_COORDINATOR_ADDRESS`), `EQPAR_NUM_PROCESSES` (or `JAX_NUM_PROCESSES`),
    `EQPAR_PROCESS_ID` (or `JAX_PROCESS_ID`) and `EQPAR_LOCAL_DEVICES`, which is what
    `python -m eqpar.launch` sets for each process it starts. On CPU, collectives
    across processes use gloo.

    **Arguments:**

    - `coordinator_address`: `"host:port"` of process 0's coordinator.
    - `num_processes`: how many processes take part.
    - `process_id`: this process's index, `0 <= process_id < num_processes`.
    - `local_device_count`: simulated CPU devices for this process (CPU only).

    **Returns:**

    `True` if a multi-process runtime was started; `False` when nothing asks for one
    (no arguments, no environment): the program then runs as a single process, so
    the same script works with and without a launcher.

    !!! warning "A failing process ends at once"

        Once the multi-process runtime is started, an uncaught exception, in the main
        thread or any other, prints its traceback as usual and then ends the process
        at once with status 1 (130 for `KeyboardInterrupt`), skipping Python's
        `atexit` handlers: JAX's distributed shutdown among them would wait for
        the other processes, which may be waiting for this one. The launcher
        (`python -m eqpar.launch`, or your scheduler) then stops the others. An
        exception that ends only a thread becomes fatal too, since the program may
        be waiting for that thread's work. `sys.exit(n)` never reaches this hook:
        under `python -m eqpar.launch` a status `n != 0` also ends the process at
        once; under another launcher, raise an exception instead.

    !!! example

        The same script runs alone or under `python -m eqpar.launch -n 2`:

        ```python
        import jax, eqpar

        started = eqpar.initialize()  # first thing, before any JAX computation
        assert started == (jax.process_count() > 1)
        ```
    """
    _check_arguments(coordinator_address, num_processes, process_id, local_device_count)
    env = os.environ
    coordinator_address = coordinator_address or _from_env("coordinator_address", env)
    num = num_processes if num_processes is not None else _int_env("num_processes")
    pid = process_id if process_id is not None else _int_env("process_id")
    local = (
        local_device_count
        if local_device_count is not None
        else _int_env("local_device_count")
    )
    if local is not None:
        if local < 1:  # from the environment (arguments are checked above)
            raise MeshError(
                f"EQPAR_LOCAL_DEVICES must be a positive integer (simulated CPU "
                f"devices per process), got {local}; unset it for JAX's default."
            )
        jax.config.update("jax_num_cpu_devices", local)
    if coordinator_address is None and num is None and pid is None:
        return False
    if coordinator_address is None or num is None or pid is None:
        raise MeshError(
            "initialize needs all three of the coordinator address, the number of "
            f"processes and this process's id; got coordinator={coordinator_address!r}"
            f", num_processes={num!r}, process_id={pid!r}. Pass them, or set "
            "EQPAR_COORDINATOR_ADDRESS, EQPAR_NUM_PROCESSES and EQPAR_PROCESS_ID "
            "(`python -m eqpar.launch` does)."
        )
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=coordinator_address, num_processes=num, process_id=pid
    )
    _end_process_on_uncaught_exceptions(pid, num)
    return True


def _check_arguments(
    coordinator_address: object,
    num_processes: object,
    process_id: object,
    local_device_count: object,
) -> None:
    """eqpar errors for arguments of the wrong kind (JAX's would be an
    `AttributeError` deep inside `jax.distributed`)."""
    if coordinator_address is not None and not isinstance(coordinator_address, str):
        raise MeshError(
            "initialize: `coordinator_address` must be a string 'host:port' (process "
            "0's address and a free port, e.g. '10.0.0.1:1234'), got "
            f"{coordinator_address!r} ({type(coordinator_address).__name__}); for a "
            f"port alone on this machine, pass '127.0.0.1:{coordinator_address}'."
        )
    for name, value, least in (
        ("num_processes", num_processes, 1),
        ("process_id", process_id, 0),
        ("local_device_count", local_device_count, 1),
    ):
        if value is not None and (
            not isinstance(value, int) or isinstance(value, bool) or value < least
        ):
            raise MeshError(
                f"initialize: `{name}` must be an integer of at least {least} (or "
                f"None: read from the environment), got {value!r}."
            )
    if (
        isinstance(num_processes, int)
        and isinstance(process_id, int)
        and process_id >= num_processes
    ):
        raise MeshError(
            f"initialize: `process_id` must be below `num_processes`: got process_id="
            f"{process_id} with num_processes={num_processes} (ids are 0 to "
            f"{num_processes - 1})."
        )


def _end_process_on_uncaught_exceptions(process_id: int, num_processes: int) -> None:
    """Hooks `sys.excepthook` and `threading.excepthook`: print as before, then end
    this process without running `atexit` (see `initialize`). Installed once."""
    if getattr(sys.excepthook, "_eqpar_ends_process", False):
        return
    previous = sys.excepthook
    previous_in_thread = threading.excepthook

    def end(exc_type: type[BaseException], where: str) -> None:
        code = 130 if issubclass(exc_type, KeyboardInterrupt) else 1
        try:
            print(
                f"eqpar: process {process_id} of {num_processes} ends with status "
                f"{code} on the uncaught {exc_type.__name__} above{where}, without "
                "JAX's distributed shutdown (it would wait for the other processes).",
                file=sys.stderr,
            )
        finally:
            for stream in (sys.stdout, sys.stderr):
                try:
                    stream.flush()
                except Exception:
                    pass
            os._exit(code)

    def excepthook(
        exc_type: type[BaseException],
        exc: BaseException,
        tb: types.TracebackType | None,
    ) -> None:
        try:
            previous(exc_type, exc, tb)
        finally:
            end(exc_type, "")

    def thread_excepthook(args: threading.ExceptHookArgs) -> None:
        previous_in_thread(args)
        # SystemExit ends only its thread, as in Python; a daemon thread failing
        # while the interpreter shuts down cannot hang anything any more.
        if args.exc_type is SystemExit or sys.is_finalizing():
            return
        thread = args.thread.name if args.thread is not None else "a thread"
        end(args.exc_type, f" (in thread {thread})")

    excepthook._eqpar_ends_process = True  # type: ignore[attr-defined]
    sys.excepthook = excepthook
    threading.excepthook = thread_excepthook


def _int_env(name: str) -> int | None:
    value = _from_env(name, os.environ)
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise MeshError(f"{_ENV[name][0]} must be an integer, got {value!r}.") from None


def _spec_and_mesh(spec: P | None, mesh: Mesh | None) -> tuple[P, Mesh]:
    if mesh is None:
        mesh = concrete_context_mesh("global_batch / local_batch / gather")
    if spec is None:
        spec = P(mesh.axis_names[0])
    if not isinstance(spec, P):
        raise SpecError(f"`spec` must be a PartitionSpec, got {spec!r}.")
    return spec, mesh


def global_batch(
    local: PyTree, spec: P | None = None, *, mesh: Mesh | None = None
) -> PyTree:
    """Each process's local batch -> one global array per leaf, sharded by `spec`.

    Every process calls it with its own part (e.g. its rows of the batch); the result
    is the concatenation in process order, as one `jax.Array` spanning all devices.
    Also works in a single process (the local batch is then the whole batch).

    **Arguments:**

    - `local`: this process's part; non-array leaves pass through.
    - `spec`: how the global array is sharded (default: the leading axis over the
        mesh's first axis, i.e. data parallel).
    - `mesh`: the global mesh (default: the context mesh).

    !!! example

        In one process the local batch is the global one (under
        `python -m eqpar.launch -n 2` each process passes its own rows):

        ```python
        import jax, numpy as np, eqpar

        mesh = eqpar.data_mesh()
        rows = np.arange(4.0 * jax.device_count()).reshape(-1, 2)
        batch = eqpar.global_batch({"x": rows}, mesh=mesh)
        assert batch["x"].shape == rows.shape
        assert len(batch["x"].sharding.device_set) == jax.device_count()
        assert (eqpar.local_batch(batch)["x"] == rows).all()
        assert (eqpar.gather(batch)["x"] == rows).all()
        ```
    """
    spec, mesh = _spec_and_mesh(spec, mesh)
    sharding = NamedSharding(mesh, spec)
    return jtu.tree_map(
        lambda x: (
            jax.make_array_from_process_local_data(sharding, np.asarray(x))
            if is_array(x)
            else x
        ),
        local,
    )


def local_batch(tree: PyTree) -> PyTree:
    """Global arrays -> this process's part (the inverse of `global_batch`).

    Each leaf must be a `jax.Array` with a `NamedSharding` (as eqpar's transforms
    return); other leaves pass through. Returns NumPy arrays.

    !!! example

        ```python
        import jax, jax.numpy as jnp, numpy as np, eqpar
        from jax.sharding import PartitionSpec as P

        mesh = eqpar.data_mesh()
        y = eqpar.filter_device_put(jnp.arange(2.0 * jax.device_count()), P("data"),
                                    mesh=mesh)
        mine = eqpar.local_batch(y)  # this process's rows (all of them, here)
        assert isinstance(mine, np.ndarray) and (mine == np.asarray(y)).all()
        ```
    """

    def local(x: jax.Array) -> np.ndarray:
        sharding = x.sharding
        if not isinstance(sharding, NamedSharding) or not isinstance(
            sharding.mesh, Mesh
        ):
            raise SpecError(
                f"local_batch needs arrays with a NamedSharding, got {sharding}."
            )
        out = multihost_utils.global_array_to_host_local_array(
            x, sharding.mesh, sharding.spec
        )
        return np.asarray(out)

    return jtu.tree_map(lambda x: local(x) if isinstance(x, jax.Array) else x, tree)


def gather(tree: PyTree) -> PyTree:
    """A full copy of every global array leaf, as NumPy, on every process.

    !!! example

        ```python
        import jax, jax.numpy as jnp, numpy as np, eqpar
        from jax.sharding import PartitionSpec as P

        mesh = eqpar.data_mesh()
        y = eqpar.filter_device_put(
            {"loss": jnp.arange(float(jax.device_count())), "step": 3},
            P("data"), mesh=mesh,
        )
        whole = eqpar.gather(y)  # every process gets every row
        assert isinstance(whole["loss"], np.ndarray) and whole["step"] == 3
        ```
    """
    return jtu.tree_map(
        lambda x: (
            np.asarray(multihost_utils.process_allgather(x, tiled=True))
            if isinstance(x, jax.Array)
            else x
        ),
        tree,
    )

"""Run by tests/test_launch.py under `python -m eqpar.launch` (or started directly with
the launcher's environment): a data-parallel loop, one psum across every process per
step, in which the last process fails at step 3 in the way `--fail` names. Each
process writes its pid (and, with `--child`, that of a child it starts) into
`--pids`, so that the test can check that none is left running."""

import argparse
import os
import pathlib
import signal
import subprocess
import sys
import threading
import time


def fail(how: str) -> None:
    if how == "raise":
        raise RuntimeError("process fails on purpose at step 3")
    if how == "exit":
        sys.exit(3)
    if how == "os_exit":
        os._exit(3)
    if how == "thread":

        def work() -> None:
            raise RuntimeError("a thread fails on purpose at step 3")

        threading.Thread(target=work, name="loader").start()  # main carries on


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pids", required=True, help="folder for the pid files")
    parser.add_argument("--fail", choices=["raise", "exit", "os_exit", "thread"])
    parser.add_argument("--steps", type=int, default=10**6)
    parser.add_argument("--child", action="store_true", help="start a sleeping child")
    parser.add_argument(
        "--print-signals",
        action="store_true",
        help="print SIGTERM, SIGINT and SIGHUP when they arrive, and carry on",
    )
    args = parser.parse_args()
    pids = pathlib.Path(args.pids)
    (pids / str(os.getpid())).write_text("worker")
    if args.child:
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
        (pids / str(child.pid)).write_text("child")
    # The launcher runs this file as `python file.py` would.
    assert sys.path[0] == os.path.dirname(os.path.realpath(__file__)), sys.path[:2]
    assert sys.argv[0] == __file__, sys.argv

    import eqpar

    assert eqpar.initialize(), "run me with `python -m eqpar.launch -n 2`"
    import jax
    import numpy as np
    from jax.sharding import PartitionSpec as P

    if args.print_signals:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(
                sig, lambda s, _: print(f"got {signal.Signals(s).name}", flush=True)
            )
    me, last = jax.process_index(), jax.process_count() - 1
    mesh = eqpar.data_mesh()
    total = eqpar.filter_shard_map(
        lambda v: eqpar.psum(v.sum(0), "data"),
        mesh=mesh,
        in_specs=P("data"),
        out_specs=P(),
    )
    for step in range(args.steps):
        if step == 3 and me == last and args.fail:
            fail(args.fail)
        rows = np.full((jax.local_device_count(), 2), step, np.float32)
        s = eqpar.gather(total(eqpar.global_batch(rows, mesh=mesh)))
        print(f"step {step}: {s[0]:.0f}", flush=True)
        time.sleep(0.05)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`python -m eqpar.launch -n N [--local-devices D] [--timeout S] script.py args...`

Starts N copies of a script on this machine as the processes of one JAX program:
each gets `EQPAR_COORDINATOR_ADDRESS` (127.0.0.1 and a free port),
`EQPAR_NUM_PROCESSES`, `EQPAR_PROCESS_ID` and, with `--local-devices`,
`EQPAR_LOCAL_DEVICES` (simulated CPU devices), which `eqpar.initialize()` reads.

Output is streamed line by line with a `[pI]` prefix. The run is bounded: when any
process fails, the others are killed (a process waiting in a collective for a dead
peer would otherwise wait forever) and the launcher exits with the failing status;
past `--timeout` seconds everything is killed and the exit status is 124.
"""

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(i: int, n: int, port: int, local_devices: int | None) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        EQPAR_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
        EQPAR_NUM_PROCESSES=str(n),
        EQPAR_PROCESS_ID=str(i),
        PYTHONUNBUFFERED="1",
    )
    if local_devices is not None:
        env["EQPAR_LOCAL_DEVICES"] = str(local_devices)
        flags = re.sub(
            r"--xla_force_host_platform_device_count=\S+", "", env.get("XLA_FLAGS", "")
        )
        env["XLA_FLAGS"] = (
            f"{flags} --xla_force_host_platform_device_count={local_devices}".strip()
        )
    return env


def _stream(i: int, proc: subprocess.Popen, lock: threading.Lock) -> None:
    assert proc.stdout is not None
    for line in proc.stdout:
        with lock:
            sys.stdout.write(f"[p{i}] {line}")
            sys.stdout.flush()


def _kill(procs: list[subprocess.Popen], grace: float = 3.0) -> None:
    for p in procs:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + grace
    for p in procs:
        try:
            p.wait(max(deadline - time.monotonic(), 0.01))
        except subprocess.TimeoutExpired:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait()


def launch(
    script: str,
    args: list[str],
    *,
    processes: int,
    local_devices: int | None = None,
    timeout: float = 600.0,
) -> int:
    """Runs `processes` copies of `script` and returns the launcher's exit status."""
    port = _free_port()
    lock = threading.Lock()
    procs: list[subprocess.Popen] = []
    threads = []
    for i in range(processes):
        proc = subprocess.Popen(
            [sys.executable, "-u", script, *args],
            env=_env(i, processes, port, local_devices),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,  # its own process group: killed as a whole
        )
        procs.append(proc)
        with lock:
            print(f"[launch] process {i}: pid {proc.pid}", flush=True)
        t = threading.Thread(target=_stream, args=(i, proc, lock), daemon=True)
        t.start()
        threads.append(t)

    start = time.monotonic()
    status = 0
    try:
        while True:
            codes = [p.poll() for p in procs]
            failed = [(i, c) for i, c in enumerate(codes) if c not in (None, 0)]
            if failed:
                i, code = failed[0]
                status = code if code > 0 else 128 - code
                with lock:
                    print(
                        f"[launch] process {i} exited with status {code}; "
                        "stopping the others",
                        flush=True,
                    )
                break
            if all(c == 0 for c in codes):
                break
            if time.monotonic() - start > timeout:
                status = 124
                with lock:
                    print(
                        f"[launch] timed out after {timeout:.0f} s; stopping all",
                        flush=True,
                    )
                break
            time.sleep(0.05)
    except KeyboardInterrupt:
        status = 130
    finally:
        _kill(procs)
        for t in threads:
            t.join(timeout=2.0)
    return status


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m eqpar.launch", description=(__doc__ or "").splitlines()[0]
    )
    parser.add_argument("-n", "--processes", type=int, required=True)
    parser.add_argument("--local-devices", type=int, default=None)
    parser.add_argument(
        "--timeout",
        type=float,
        default=600.0,
        help="seconds before everything is killed (default 600)",
    )
    parser.add_argument("script")
    parser.add_argument("args", nargs=argparse.REMAINDER)
    ns = parser.parse_args(argv)
    if ns.processes < 1:
        parser.error("-n must be at least 1")
    return launch(
        ns.script,
        ns.args,
        processes=ns.processes,
        local_devices=ns.local_devices,
        timeout=ns.timeout,
    )


if __name__ == "__main__":
    sys.exit(main())

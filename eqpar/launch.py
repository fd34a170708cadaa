"""`python -m eqpar.launch -n N [--local-devices D] [--timeout S] [--grace G] script.py
args...`

Starts N copies of a script on this machine as the processes of one JAX program:
each gets `EQPAR_COORDINATOR_ADDRESS` (127.0.0.1 and a free port),
`EQPAR_NUM_PROCESSES`, `EQPAR_PROCESS_ID` and, with `--local-devices`,
`EQPAR_LOCAL_DEVICES` (simulated CPU devices), which `eqpar.initialize()` reads.

Output is streamed line by line, each line whole and prefixed `[pI]` (stdout and
stderr alike); gloo's "[Gloo] Rank r is connected to k peer ranks" messages are
dropped.

With N > 1, every process must join JAX's multi-process runtime
(`eqpar.initialize()`, or `jax.distributed.initialize()`): a process that runs its
script to the end without joining ends with status 1 and a line saying so, which
fails the run, since its processes ran as N independent programs (each computing
the whole thing on its own devices) rather than one.

Nothing hangs and nothing is left running:

- A process that fails (an uncaught exception, `sys.exit(n)` with `n != 0`,
  `os._exit`, a signal) ends the run: the launcher stops the others (a process
  waiting in a collective for a dead peer would otherwise wait forever) and exits
  with the failure's status (`128 + signal` for a signal), naming the process. Each
  script runs under a small bootstrap so that such a process really ends: JAX's
  distributed shutdown, which Python runs at exit, would wait for the other
  processes, and they may be waiting for this one.
- SIGTERM, SIGINT (Ctrl-C) and SIGHUP to the launcher are passed on to every process;
  the launcher then exits with `128 + signal`. Past `--timeout` seconds everything is
  stopped and the exit status is 124.
- Stopping a process means its signal (SIGTERM, or the one the launcher received),
  then SIGKILL to its process group after `--grace` seconds (or at a second signal):
  JAX's preemption service catches SIGTERM, so a JAX process usually needs the
  SIGKILL. Each process has its own process group, which also holds the processes
  it starts.
- If the launcher itself is killed (SIGKILL), its processes die with it: on Linux
  through `PR_SET_PDEATHSIG`, elsewhere through a thread in each process that checks
  once a second that its launcher is still there. Processes they started themselves
  are not covered on that path.
"""

import argparse
import ctypes
import os
import re
import runpy
import signal
import socket
import subprocess
import sys
import threading
import time
import types
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO, NamedTuple


# Run by each process in place of `python script.py`: puts the script's folder first
# on sys.path (as Python does), loads this file without importing eqpar (which would
# import JAX before the script could configure it) and hands over to _run_worker.
_BOOTSTRAP = (
    "import os, sys\n"
    "sys.path[0] = os.path.dirname(os.path.realpath(sys.argv[3]))\n"
    "import importlib.util\n"
    "spec = importlib.util.spec_from_file_location('_eqpar_launch', sys.argv[1])\n"
    "module = importlib.util.module_from_spec(spec)\n"
    "spec.loader.exec_module(module)\n"
    "module._run_worker(int(sys.argv[2]), sys.argv[3], sys.argv[4:])\n"
)
# Gloo's connection messages, also when its threads' writes interleave mid-line
# ("[Gloo] Rank [Gloo] Rank 4 is connected ..." then "6 is connected ...").
_GLOO_CHATTER = re.compile(r"\[Gloo\]|is connected to \d+ peer ranks\.")
_FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
_NOT_JOINED = "eqpar.launch: "  # starts the line of a process that never joined
_PR_SET_PDEATHSIG = 1
_POLL_S = 0.05


# ---------------------------------------------------------------- in each process


def _run_worker(launcher_pid: int, script: str, args: list[str]) -> None:
    """Runs `script` as `__main__` in this process; a failure ends the process now."""
    _die_with_launcher(launcher_pid)
    sys.argv = [script, *args]
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as e:
        code = _exit_status(e)
        if code != 0:
            _exit_now(code)
        _check_joined(script)
        # Status 0: the normal exit, JAX's shutdown included (it waits for the
        # others, which is what a run that succeeds everywhere wants).
    except BaseException as e:
        tb = e.__traceback__
        while tb is not None and tb.tb_frame.f_code.co_filename != script:
            tb = tb.tb_next  # hide this bootstrap's and runpy's frames
        if tb is not None:
            e = e.with_traceback(tb)
        # eqpar.initialize's hook (when installed) prints and ends the process.
        sys.excepthook(type(e), e, e.__traceback__)
        _exit_now(130 if isinstance(e, KeyboardInterrupt) else 1)
    else:
        _check_joined(script)


def _check_joined(script: str) -> None:
    """Ends a process that ran its script to the end without joining JAX's
    multi-process runtime, with status 1 and a line saying what to do: with N > 1
    processes it was one of N independent runs (each on its own devices, each
    computing the whole thing), not one program, which status 0 would hide."""
    processes = int(os.environ.get("EQPAR_NUM_PROCESSES", "1"))
    if processes < 2 or _joined():
        return
    index = os.environ.get("EQPAR_PROCESS_ID", "?")
    print(
        f"{_NOT_JOINED}process {index} of {processes} ran to the end without joining "
        "JAX's multi-process runtime: call `eqpar.initialize()` (or "
        "`jax.distributed.initialize()`) at the start of the script, before any JAX "
        f"computation. Without it the {processes} processes ran {script} as "
        f"{processes} independent programs; to run it as one process, use `-n 1` "
        "or plain `python`.",
        file=sys.stderr,
    )
    _exit_now(1)


def _joined() -> bool:
    """Whether this process took part in JAX's multi-process runtime (looked up only
    when the script has imported JAX: this file never imports it itself)."""
    jax = sys.modules.get("jax")
    if jax is None:
        return False
    try:
        if jax.distributed.is_initialized():
            return True
        return jax.process_count() > 1  # joined, then `jax.distributed.shutdown()`
    except Exception:  # a backend that cannot start: nothing was joined
        return False


def _exit_status(e: SystemExit) -> int:
    # What Python's own exit makes of `sys.exit(code)`.
    if e.code is None:
        return 0
    if isinstance(e.code, int):
        return e.code
    print(e.code, file=sys.stderr)
    return 1


def _exit_now(code: int) -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    os._exit(code)


def _die_with_launcher(launcher_pid: int) -> None:
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            args = [ctypes.c_ulong(a) for a in (int(signal.SIGKILL), 0, 0, 0)]
            done = libc.prctl(_PR_SET_PDEATHSIG, *args) == 0
        except (OSError, AttributeError):
            done = False
        if done:
            if os.getppid() != launcher_pid:  # it died before prctl took effect
                os.kill(os.getpid(), signal.SIGKILL)
            return
    _watch_launcher(launcher_pid)


def _watch_launcher(launcher_pid: int, every: float = 1.0) -> threading.Thread:
    def watch() -> None:
        while os.getppid() == launcher_pid:
            time.sleep(every)
        os.kill(os.getpid(), signal.SIGKILL)

    thread = threading.Thread(target=watch, name="eqpar-launcher-watch", daemon=True)
    thread.start()
    return thread


# ---------------------------------------------------------------- in the launcher


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


class _Output:
    """The launcher's stdout, shared by every reader thread: whole lines only."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._closed = False

    def write(self, line: str) -> None:
        with self._lock:
            if self._closed:
                return
            try:
                sys.stdout.write(line if line.endswith("\n") else line + "\n")
                sys.stdout.flush()
            except (OSError, ValueError):  # e.g. `| head` went away: keep draining
                self._closed = True


class _Process:
    def __init__(self, index: int, proc: "subprocess.Popen[str]") -> None:
        self.index = index
        self.proc = proc
        self.error = ""  # the last line of its last traceback
        self.readers: list[threading.Thread] = []

    def read(self, stream: IO[str], out: _Output) -> None:
        in_traceback = False
        for line in stream:
            if _GLOO_CHATTER.search(line):
                continue
            if line.startswith("Traceback (most recent call last):"):
                in_traceback = True
            elif line.startswith(_NOT_JOINED):
                self.error = line.strip()
            elif in_traceback and line.strip() and not line[0].isspace():
                self.error, in_traceback = line.strip(), False
            out.write(f"[p{self.index}] {line}")

    def signal_group(self, sig: int) -> None:
        try:
            os.killpg(self.proc.pid, sig)  # its own group: start_new_session
        except (ProcessLookupError, PermissionError):
            pass


def _ended(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with status {code}"


def _status(code: int) -> int:
    return code if code > 0 else 128 - code


@contextmanager
def _signals_recorded() -> Iterator[list[int]]:
    """The signals the launcher receives, recorded (not acted on) while in the block."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received  # only the main thread can set handlers
        return

    def record(signum: int, frame: types.FrameType | None) -> None:
        received.append(signum)

    previous = {sig: signal.signal(sig, record) for sig in _FORWARDED}
    try:
        yield received
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)


def _stop(
    processes: list[_Process], sig: int, grace: float, received: list[int]
) -> None:
    """`sig` to every running process, SIGKILL to every process group after `grace`
    seconds or at the next signal the launcher receives."""
    for p in processes:
        if p.proc.poll() is None:
            p.signal_group(sig)
    signals_before = len(received)
    deadline = time.monotonic() + grace
    while (
        any(p.proc.poll() is None for p in processes)
        and time.monotonic() < deadline
        and len(received) == signals_before
    ):
        time.sleep(_POLL_S)
    for p in processes:
        p.signal_group(signal.SIGKILL)  # also what a finished process left behind
    for p in processes:
        p.proc.wait()


def _start(
    i: int, script: str, args: list[str], env: dict[str, str], out: _Output
) -> _Process:
    proc = subprocess.Popen(
        [sys.executable, "-u", "-c", _BOOTSTRAP, os.path.abspath(__file__)]
        + [str(os.getpid()), script, *args],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        encoding="utf-8",
        errors="replace",
        start_new_session=True,  # its own group: Ctrl-C reaches only the launcher
    )
    p = _Process(i, proc)
    out.write(f"[launch] process {i}: pid {proc.pid}")
    for stream in (proc.stdout, proc.stderr):
        assert stream is not None
        t = threading.Thread(target=p.read, args=(stream, out), daemon=True)
        t.start()
        p.readers.append(t)
    return p


class _End(NamedTuple):
    status: int
    why: str | None = None  # None: every process exited with 0
    failed: _Process | None = None  # the process whose failure ended the run
    stop_with: int = signal.SIGTERM  # what stops the processes still running


def _watch(
    running: list[_Process],
    received: list[int],
    timeout: float,
    grace: float,
    out: _Output,
) -> _End:
    """Waits until every process exits with 0, one fails, the launcher receives a
    signal or `timeout` passes."""
    start = time.monotonic()
    while True:
        if received:
            name = signal.Signals(received[0]).name
            out.write(
                f"[launch] received {name}: passing it on to every process "
                f"(SIGKILL after {grace:g} s)"
            )
            return _End(128 + received[0], f"stopped by {name}", None, received[0])
        codes = [p.proc.poll() for p in running]
        failed = [(p, c) for p, c in zip(running, codes) if c is not None and c != 0]
        if failed:
            how = "; ".join(
                f"process {p.index} (pid {p.proc.pid}) {_ended(c)}" for p, c in failed
            )
            out.write(f"[launch] {how}; stopping the others")
            first, code = failed[0]
            return _End(_status(code), f"process {first.index} {_ended(code)}", first)
        if all(c == 0 for c in codes):
            return _End(0)
        if time.monotonic() - start > timeout:
            out.write(f"[launch] timed out after {timeout:g} s; stopping all")
            return _End(124, f"timed out after {timeout:g} s")
        time.sleep(_POLL_S)


def launch(
    script: str,
    args: list[str],
    *,
    processes: int,
    local_devices: int | None = None,
    timeout: float = 600.0,
    grace: float = 5.0,
) -> int:
    """Runs `processes` copies of `script` as one JAX program; see `python -m
    eqpar.launch --help`.

    **Arguments:**

    - `script`: the Python file each process runs (as `python script.py args...`).
    - `args`: its command-line arguments.
    - `processes`: how many processes.
    - `local_devices`: simulated CPU devices per process (`None`: JAX's default).
    - `timeout`: seconds after which everything is stopped.
    - `grace`: seconds between the signal that stops a process and SIGKILL.

    **Returns:**

    The launcher's exit status: 0 when every process exits with 0; the first failing
    process's status (`128 + signal` if a signal killed it); 124 past `timeout`;
    `128 + signal` when the launcher receives SIGTERM, SIGINT or SIGHUP. Every
    process has ended when it returns.
    """
    port = _free_port()
    out = _Output()
    running: list[_Process] = []
    end = _End(1)  # if the launcher itself fails (the error then propagates)
    with _signals_recorded() as received:
        try:
            for i in range(processes):
                if not received:
                    env = _env(i, processes, port, local_devices)
                    running.append(_start(i, script, args, env, out))
            end = _watch(running, received, timeout, grace, out)
        finally:
            _stop(running, end.stop_with, grace, received)
            for p in running:
                for t in p.readers:
                    t.join(timeout=2.0)
    if end.why is not None:
        why = end.why
        if end.failed is not None and end.failed.error:  # read to the end by now
            why += f" after {end.failed.error[:400]}"
        elif end.failed is None:
            why += ": " + ", ".join(
                f"process {p.index} {_ended(p.proc.returncode)}" for p in running
            )
        out.write(f"[launch] run failed with status {end.status}: {why}")
    return end.status


def main(argv: list[str] | None = None) -> int:
    """The command line: `python -m eqpar.launch -n N ... script.py args...`."""
    parser = argparse.ArgumentParser(
        prog="python -m eqpar.launch",
        description="Starts N copies of a script on this machine as the processes of "
        "one JAX program (`pydoc eqpar.launch` says what happens when one fails).",
    )
    parser.add_argument("-n", "--processes", type=int, required=True)
    parser.add_argument("--local-devices", type=int, default=None)
    parser.add_argument(
        "--timeout",
        type=float,
        default=600.0,
        help="seconds before everything is stopped (default 600); status 124",
    )
    parser.add_argument(
        "--grace",
        type=float,
        default=5.0,
        help="seconds between the signal that stops a process and SIGKILL (default 5)",
    )
    parser.add_argument("script")
    parser.add_argument("args", nargs=argparse.REMAINDER)
    ns = parser.parse_args(argv)
    if ns.processes < 1:
        parser.error(f"-n must be at least 1, got {ns.processes}")
    if ns.local_devices is not None and ns.local_devices < 1:
        parser.error(
            f"--local-devices must be at least 1 (simulated CPU devices per "
            f"process), got {ns.local_devices}; leave it out for JAX's default"
        )
    if not ns.timeout > 0:  # also NaN
        parser.error(
            f"--timeout must be a positive number of seconds, got {ns.timeout:g}"
        )
    if not ns.grace >= 0:
        parser.error(f"--grace must be 0 or more seconds, got {ns.grace:g}")
    if not os.path.exists(ns.script):
        parser.error(f"no such script: {ns.script!r} (give a path to a Python file)")
    return launch(
        ns.script,
        ns.args,
        processes=ns.processes,
        local_devices=ns.local_devices,
        timeout=ns.timeout,
        grace=ns.grace,
    )


if __name__ == "__main__":
    sys.exit(main())

"""`python -m eqpar.launch` when something goes wrong, with real processes (2 x 4 CPU):
a process that raises, exits or is killed ends the run within seconds, naming it; a
signal to the launcher reaches every process; no test leaves a process running."""

import contextlib
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest


ROOT = pathlib.Path(__file__).parent.parent
WORKER = ROOT / "tests" / "_launch_worker.py"
MP_WORKER = ROOT / "tests" / "_mp_worker.py"
LAUNCH = ROOT / "eqpar" / "launch.py"
PROMPT = 60.0  # seconds: every run here ends well within the launcher's 600 s default


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # an orphan that died stays a zombie until PID 1 reaps it: it runs nothing
        stat = pathlib.Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def left_running(pids: set[int], wait: float = 10.0) -> list[int]:
    """The pids still running after up to `wait` seconds, killed (so a failing test
    leaves nothing behind either)."""
    deadline = time.monotonic() + wait
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = sorted(p for p in pids if alive(p))
    for pid in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return left


class Run:
    """A program started as a real process, its output read as it comes."""

    def __init__(self, cmd: list[str], pid_dir: pathlib.Path, **popen) -> None:
        self.pid_dir = pid_dir
        self.start = time.monotonic()
        self.proc = subprocess.Popen(
            cmd,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            **popen,
        )
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        with self.proc.stdout as stream:
            for line in stream:
                with self._changed:
                    self.lines.append(line)
                    self._changed.notify_all()

    @property
    def output(self) -> str:
        with self._changed:
            return "".join(self.lines)

    def wait_for(self, *texts: str, timeout: float = PROMPT) -> None:
        """Until the output holds each of `texts`."""
        with self._changed:
            done = self._changed.wait_for(
                lambda: all(t in "".join(self.lines) for t in texts), timeout
            )
        assert done, f"never printed {texts}:\n{self.output[-3000:]}"

    def finish(self, timeout: float = PROMPT) -> tuple[int, str, float]:
        """Its exit status, output and how long it ran."""
        code = self.proc.wait(timeout)
        elapsed = time.monotonic() - self.start
        self._reader.join(timeout=5.0)
        return code, self.output, elapsed

    def pids(self) -> set[int]:
        """The launcher's processes (as it reports them) and every pid the workers
        wrote down (themselves and their children)."""
        reported = re.findall(r"\[launch\] process \d+: pid (\d+)", self.output)
        written = [p.name for p in self.pid_dir.iterdir()]
        return {int(p) for p in [*reported, *written]}

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


@contextlib.contextmanager
def launched(tmp_path: pathlib.Path, *args: str) -> Iterator[Run]:
    """`python -m eqpar.launch -n 2 --local-devices 4 --grace 2 tests/_launch_worker.py
    --pids DIR args...`; afterwards, fails if any of its processes is left running."""
    pid_dir = tmp_path / "pids"
    pid_dir.mkdir()
    cmd = [sys.executable, "-m", "eqpar.launch", "-n", "2", "--local-devices", "4"]
    cmd += ["--grace", "2", str(WORKER), "--pids", str(pid_dir), *args]
    run = Run(cmd, pid_dir)
    try:
        yield run
    finally:
        run.stop()
        left = left_running(run.pids())
    assert not left, f"left running: {left}\n{run.output[-3000:]}"


def assert_prompt_failure(
    run: Run, status: int, how: str, error: str | None = None
) -> str:
    code, out, elapsed = run.finish()
    assert code == status, out[-3000:]
    assert elapsed < PROMPT, f"took {elapsed:.0f} s"
    stopping = rf"\[launch\] process 1 \(pid \d+\) {how}; stopping the others"
    assert re.search(stopping, out), out[-3000:]
    summary = f"[launch] run failed with status {status}: process 1 {how}"
    assert summary + (f" after {error}" if error else "") in out, out[-3000:]
    return out


@pytest.mark.programs
def test_a_clean_run_prints_whole_prefixed_lines_without_gloo_chatter(tmp_path):
    with launched(tmp_path, "--steps", "4", "--child") as run:
        code, out, elapsed = run.finish()
    assert code == 0, out[-3000:]
    for p in ("p0", "p1"):
        assert f"[{p}] step 3: 24" in out, out[-3000:]  # 8 devices x step 3
    assert "[Gloo]" not in out
    assert "run failed" not in out
    for line in out.splitlines():
        assert re.match(r"\[(p[01]|launch)\] ", line), line


@pytest.mark.programs
def test_an_uncaught_exception_ends_the_run(tmp_path):
    with launched(tmp_path, "--fail", "raise", "--child") as run:
        out = assert_prompt_failure(
            run,
            1,
            "exited with status 1",
            "RuntimeError: process fails on purpose at step 3",
        )
    assert "[p1] Traceback (most recent call last):" in out
    assert '[p1]   File "' + str(WORKER) in out
    assert "runpy" not in out  # the bootstrap's frames are hidden
    assert "[p1] eqpar: process 1 of 2 ends with status 1" in out


@pytest.mark.programs
def test_sys_exit_with_a_status_ends_the_run(tmp_path):
    with launched(tmp_path, "--fail", "exit", "--child") as run:
        assert_prompt_failure(run, 3, "exited with status 3")


@pytest.mark.programs
def test_os_exit_ends_the_run(tmp_path):
    with launched(tmp_path, "--fail", "os_exit", "--child") as run:
        assert_prompt_failure(run, 3, "exited with status 3")


@pytest.mark.programs
def test_an_exception_in_a_thread_ends_the_run(tmp_path):
    with launched(tmp_path, "--fail", "thread", "--child") as run:
        out = assert_prompt_failure(
            run,
            1,
            "exited with status 1",
            "RuntimeError: a thread fails on purpose at step 3",
        )
    assert "[p1] Exception in thread loader" in out
    assert "(in thread loader)" in out


@pytest.mark.programs
def test_a_worker_killed_by_sigkill_ends_the_run(tmp_path):
    with launched(tmp_path, "--child") as run:
        run.wait_for("[p0] step 2:", "[p1] step 2:")
        (pid,) = re.findall(r"\[launch\] process 1: pid (\d+)", run.output)
        os.kill(int(pid), signal.SIGKILL)
        assert_prompt_failure(run, 128 + signal.SIGKILL, "was killed by SIGKILL")


@pytest.mark.programs
@pytest.mark.parametrize(
    "sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP], ids=lambda s: s.name
)
def test_a_signal_to_the_launcher_reaches_every_worker(tmp_path, sig):
    # The workers print the signal and carry on (as one that saves a checkpoint
    # might): the launcher ends them with SIGKILL after --grace.
    with launched(tmp_path, "--print-signals", "--child") as run:
        run.wait_for("[p0] step 2:", "[p1] step 2:")
        run.proc.send_signal(sig)
        code, out, elapsed = run.finish()
    assert code == 128 + sig, out[-3000:]
    assert elapsed < PROMPT
    assert f"[launch] received {sig.name}: passing it on to every process" in out
    assert f"[p0] got {sig.name}" in out and f"[p1] got {sig.name}" in out, out[-3000:]
    assert f"[launch] run failed with status {128 + sig}: stopped by {sig.name}" in out


@pytest.mark.programs
def test_ctrl_c_interrupts_every_worker(tmp_path):
    with launched(tmp_path, "--child") as run:
        run.wait_for("[p0] step 2:", "[p1] step 2:")
        run.proc.send_signal(signal.SIGINT)
        code, out, elapsed = run.finish()
    assert code == 130, out[-3000:]
    assert elapsed < PROMPT
    assert "KeyboardInterrupt" in out, out[-3000:]


@pytest.mark.programs
def test_the_workers_die_with_a_killed_launcher(tmp_path):
    with launched(tmp_path) as run:
        run.wait_for("[p0] step 2:", "[p1] step 2:")
        workers = run.pids()
        assert len(workers) == 2
        run.proc.kill()  # no chance to stop anything: PR_SET_PDEATHSIG does
        run.finish()
        assert not left_running(workers)


@pytest.mark.programs
def test_without_pdeathsig_a_watchdog_ends_the_process_with_its_launcher(tmp_path):
    # What systems other than Linux get. The middle process plays the launcher.
    watched = (
        "import importlib.util, os, sys, time\n"
        "spec = importlib.util.spec_from_file_location('launch', sys.argv[1])\n"
        "launch = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(launch)\n"
        "launch._watch_launcher(os.getppid(), every=0.1)\n"
        "print('watching', flush=True)\n"
        "time.sleep(300)\n"
    )
    middle = (
        "import subprocess, sys\n"
        "child = subprocess.Popen([sys.executable, '-c', sys.argv[2], sys.argv[3]])\n"
        "open(sys.argv[1], 'w').write(str(child.pid))\n"
        "child.wait()\n"
    )
    pid_file = tmp_path / "child.pid"
    cmd = [sys.executable, "-c", middle, str(pid_file), watched, str(LAUNCH)]
    run = Run(cmd, tmp_path)
    try:
        run.wait_for("watching")
        child = int(pid_file.read_text())
        assert alive(child)
        run.proc.kill()
        run.finish()
    finally:
        run.stop()
        left = left_running({int(pid_file.read_text())} if pid_file.exists() else set())
    assert not left


@pytest.mark.programs
def test_initialize_ends_a_failing_process_under_any_launcher(tmp_path):
    # Started as a scheduler would (no eqpar.launch): eqpar.initialize's hook ends
    # the process that raised; stopping the other one is the scheduler's job.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    runs = []
    try:
        for i in range(2):
            env = dict(
                os.environ,
                EQPAR_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                EQPAR_NUM_PROCESSES="2",
                EQPAR_PROCESS_ID=str(i),
                EQPAR_LOCAL_DEVICES="4",
            )
            pid_dir = tmp_path / f"pids{i}"
            pid_dir.mkdir()
            cmd = [sys.executable, str(WORKER), "--pids", str(pid_dir)]
            runs.append(Run([*cmd, "--fail", "raise"], pid_dir, env=env))
        code, out, elapsed = runs[1].finish()
        assert code == 1, out[-3000:]
        assert elapsed < PROMPT
        assert "RuntimeError: process fails on purpose at step 3" in out
        assert "eqpar: process 1 of 2 ends with status 1" in out
    finally:
        pids = set()
        for run in runs:
            run.stop()
            pids |= run.pids()
        left = left_running(pids)
    assert not left


@pytest.mark.programs
def test_a_failing_process_stops_the_run(tmp_path):
    # It fails right after initialize, before any collective.
    pid_dir = tmp_path / "pids"
    pid_dir.mkdir()
    cmd = [sys.executable, "-m", "eqpar.launch", "-n", "2", "--local-devices", "4"]
    run = Run([*cmd, "--timeout", "120", str(MP_WORKER), "--fail"], pid_dir)
    try:
        code, out, elapsed = run.finish()
        assert code != 0
        assert elapsed < PROMPT, f"took {elapsed:.0f} s"
        assert "RuntimeError: process 1 fails on purpose" in out
        assert "[p1] Traceback" in out
        assert "stopping the others" in out
        assert len(run.pids()) == 2
    finally:
        run.stop()
        left = left_running(run.pids())
    assert not left


@pytest.mark.programs
def test_timeout_kills_everything(tmp_path):
    script = tmp_path / "sleepy.py"
    script.write_text("import time\nprint('started', flush=True)\ntime.sleep(120)\n")
    pid_dir = tmp_path / "pids"
    pid_dir.mkdir()
    cmd = [sys.executable, "-m", "eqpar.launch", "-n", "2", "--timeout", "3"]
    run = Run([*cmd, str(script)], pid_dir)
    try:
        code, out, elapsed = run.finish()
        assert code == 124
        assert elapsed < 30
        assert "[p0] started" in out and "[p1] started" in out
        assert "[launch] run failed with status 124: timed out after 3 s" in out
    finally:
        run.stop()
        left = left_running(run.pids())
    assert not left


@pytest.mark.programs
def test_the_launcher_loads_without_eqpar():
    # Each process runs eqpar/launch.py before its script: it must not import eqpar
    # (and so JAX) first, or a script could not configure JAX before importing it.
    code = (
        "import importlib.util, sys\n"
        "spec = importlib.util.spec_from_file_location('launch', sys.argv[1])\n"
        "spec.loader.exec_module(importlib.util.module_from_spec(spec))\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('eqpar', 'jax')))"
    )
    run = subprocess.run(
        [sys.executable, "-c", code, str(LAUNCH)], capture_output=True, text=True
    )
    assert run.returncode == 0 and run.stdout.strip() == "[]", run.stdout + run.stderr

"""The sandbox: run untrusted candidate code in its own process, folder and limits, and read back only data.

Every run gets a fresh temporary folder (its cwd, HOME and TMPDIR), its own session and process group, rlimits
(address space, CPU seconds, file size, open files, no core dumps; applied by `_runner.py` before any untrusted
code runs), one thread per numeric library, a minimal environment, and a wall clock of exactly `timeout_s`
enforced by this parent, which then kills the whole group. Results come back as `.npy` (loaded with
`allow_pickle=False`) or JSON, never as a pickle; the caller recomputes any score from them.

Two modes, reported as `mode`:

- "bwrap" (bubblewrap works here): no network, the host file system read-only (only the run's folder is
  writable), a private /tmp, no capabilities, and its own PID namespace, so nothing it forks outlives it.
- "rlimits" (fallback, or `isolation="none"`): the same limits and clean-up, but the host file system is NOT
  protected — the code can read and write whatever this process's user can — and it shares this machine's
  network. Guarded against accidents, not against malice.

Clean-up, done before `run_*` returns: the process group is killed, then every process that carries the run's
token in its environment or whose cwd lies in the run's folder is killed, repeatedly until none is left (a /proc
scan, ~5 ms with 100 processes). That catches children that left the group with setsid() or double-forked
into daemons. In rlimits mode a process that both clears its environment and leaves the folder escapes the
sweep (it keeps the CPU, memory and file rlimits); in bwrap mode the kernel kills it with the PID namespace
moments after bwrap exits.

Threads: several runs may go at once from threads of one parent. Each has its own folder, token and
anonymous stdout/stderr files, and nothing runs between fork and exec (no `preexec_fn`), so Popen may use
vfork — with a 2 GB parent, spawning took 3.9 ms this way against 13.7 ms with a `preexec_fn`.
"""

from __future__ import annotations

import contextlib
import glob
import json
import math
import os
import secrets
import select
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path, PurePath
from typing import IO, Any

import numpy as np

__all__ = ["ProcessResult", "SandboxLimits", "SandboxResult", "bwrap_available", "run_function", "run_program"]

_RUNNER = Path(__file__).with_name("_runner.py")
#: Seconds past `timeout_s` that killing and reaping a timed-out run may take; results come back by then.
GRACE_S = 2.0
_TAIL = 4000
_TOKEN_VAR = "DISCOVER_SANDBOX"
#: Rounds of the clean-up sweep; each kills everything found, so only a fork bomb needs more than two.
_SWEEP_ROUNDS = 50


@dataclass(frozen=True)
class SandboxLimits:
    """Resource limits of one sandboxed run. `isolation`: "auto" (bwrap if it works), "bwrap" or "none".

    `threads` caps the numeric libraries' thread pools and scales the CPU-seconds backstop
    (`timeout_s * threads + 1`), so a single-threaded loop always meets the wall clock first.
    """

    timeout_s: float = 60.0
    memory_mb: int = 4096
    file_mb: int = 512
    open_files: int = 256
    threads: int = 1
    isolation: str = "auto"

    def __post_init__(self) -> None:
        if not (isinstance(self.timeout_s, (int, float)) and 0 < self.timeout_s < math.inf):
            raise ValueError(f"timeout_s must be a positive finite number of seconds, got {self.timeout_s!r}")
        for name, least in (("memory_mb", 64), ("file_mb", 1), ("open_files", 16), ("threads", 1)):
            value = getattr(self, name)
            if not (isinstance(value, int) and value >= least):
                raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")
        if self.isolation not in ("auto", "bwrap", "none"):
            raise ValueError(f"isolation must be 'auto', 'bwrap' or 'none', got {self.isolation!r}")

    @property
    def cpu_s(self) -> int:
        return math.ceil(self.timeout_s * self.threads) + 1

    def _runner_arg(self) -> str:
        mb = 1 << 20
        return f"{self.memory_mb * mb},{self.cpu_s},{self.file_mb * mb},{self.open_files}"


@dataclass
class ProcessResult:
    """`returncode` follows Popen: -N when killed by signal N (bwrap's 128+N is translated), None on timeout.
    `status` says the same in words, e.g. "killed by signal SIGXCPU (CPU time limit exceeded)"."""

    returncode: int | None
    stdout: bytes
    stderr: bytes
    timed_out: bool
    wall_s: float
    mode: str
    status: str = ""


@dataclass
class SandboxResult:
    ok: bool
    value: Any
    error: str | None
    mode: str
    wall_s: float
    stdout: str = ""


@cache
def bwrap_available() -> bool:
    """True when bubblewrap exists and can actually build its namespaces here (it cannot in some containers)."""
    exe = shutil.which("bwrap")
    if exe is None:
        return False
    try:
        probe = subprocess.run([exe, *_bwrap_args("/tmp"), "true"], capture_output=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return probe.returncode == 0


def _bwrap_args(workdir: str) -> list[str]:
    # GPU device nodes pass through so code actions that use CUDA (the kernel env) can run; absent, no-op.
    gpus = [arg for dev in sorted(glob.glob("/dev/nvidia*")) for arg in ("--dev-bind", dev, dev)]
    # The private /tmp would hide an interpreter or checkout that lives under /tmp (as on some CI runners).
    needed = sorted({sys.prefix, sys.base_prefix, str(_RUNNER.parent)})
    under_tmp = [arg for path in needed if path.startswith("/tmp/") for arg in ("--ro-bind", path, path)]
    return [
        "--ro-bind", "/", "/",
        "--dev", "/dev",
        *gpus,
        "--proc", "/proc",
        "--tmpfs", "/tmp",
        *under_tmp,
        "--bind", workdir, workdir,
        "--chdir", workdir,
        "--unshare-all",
        # As root bwrap keeps every capability in its user namespace unless told; with them the code could
        # `mount -o remount,bind,rw /` and write to the host.
        "--cap-drop", "ALL",
        "--die-with-parent",
        "--new-session",
    ]  # fmt: skip


def _mode(limits: SandboxLimits) -> str:
    if limits.isolation == "none":
        return "rlimits"
    if bwrap_available():
        return "bwrap"
    if limits.isolation == "bwrap":
        raise RuntimeError("isolation='bwrap' was asked for, but bubblewrap is missing or cannot run here")
    return "rlimits"


def _child_env(workdir: str, threads: int, token: str) -> dict[str, str]:
    env = {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": workdir,
        "TMPDIR": workdir,
        "LANG": "C.UTF-8",
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONHASHSEED": "0",
        _TOKEN_VAR: token,
    }
    for var in (
        "OMP_NUM_THREADS",
        "OPENBLAS_NUM_THREADS",
        "MKL_NUM_THREADS",
        "NUMEXPR_NUM_THREADS",
        "BLIS_NUM_THREADS",
        "VECLIB_MAXIMUM_THREADS",
        "NUMBA_NUM_THREADS",
    ):
        env[var] = str(threads)
    for var in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "CUDA_VISIBLE_DEVICES"):
        if var in os.environ:
            env[var] = os.environ[var]
    return env


def run_program(
    argv: Sequence[str],
    limits: SandboxLimits,
    *,
    stdin: bytes = b"",
    files: Mapping[str, bytes] | None = None,
    workdir: str | None = None,
) -> ProcessResult:
    """Run `argv` sandboxed in `workdir` (a fresh temp folder unless given), writing `files` there first.

    stdout is kept up to `limits.file_mb`, stderr up to 1 MB. Under bwrap only the folder and read-only host
    paths outside /tmp are visible, so programs and their inputs belong in `files` or the folder. A given
    `workdir` must not be shared by runs that overlap in time: the clean-up kills processes whose cwd is in it.
    """
    if not argv:
        raise ValueError("argv must name a program to run")
    mode = _mode(limits)
    own_dir = workdir is None
    work = tempfile.mkdtemp(prefix="discover-sandbox-") if own_dir else os.path.abspath(workdir)
    try:
        for name, data in (files or {}).items():
            target = Path(work, _relative(name))
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        launcher = [sys.executable, "-I", "-S", str(_RUNNER), limits._runner_arg(), "--exec", *argv]
        return _run(launcher, limits, mode, work, stdin, stdout_cap=limits.file_mb << 20, tail=False)
    finally:
        if own_dir:
            shutil.rmtree(work, ignore_errors=True)


def _relative(name: str) -> str:
    path = PurePath(name)
    if not name or path.is_absolute() or ".." in path.parts:
        raise ValueError(f"file names must be relative paths inside the run's folder, got {name!r}")
    return name


def _run(
    argv: list[str], limits: SandboxLimits, mode: str, work: str, stdin: bytes, *, stdout_cap: int, tail: bool
) -> ProcessResult:
    token = secrets.token_hex(16)
    command = [shutil.which("bwrap") or "bwrap", *_bwrap_args(work), *argv] if mode == "bwrap" else argv
    # Anonymous files outside the folder: nothing the code does to its folder can swap them for a FIFO or link.
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err, tempfile.TemporaryFile() as inp:
        inp.write(stdin)
        inp.seek(0)
        start = time.perf_counter()
        proc = subprocess.Popen(
            command,
            cwd=work,
            env=_child_env(work, limits.threads, token),
            stdin=inp,
            stdout=out,
            stderr=err,
            start_new_session=True,
        )
        try:
            exited = _wait_unreaped(proc, limits.timeout_s)
        finally:
            _kill_group(proc.pid)
            returncode = proc.wait()
            # Also under bwrap: it may exit before the kernel has emptied its PID namespace (measured: ~20 ms
            # later); the sweep makes that teardown finish before we return.
            _sweep(token, work)
        wall = time.perf_counter() - start
        if mode == "bwrap" and returncode > 128 and returncode - 128 in signal.Signals._value2member_map_:
            returncode = 128 - returncode
        final = returncode if exited else None
        return ProcessResult(
            returncode=final,
            stdout=_read(out, stdout_cap, tail),
            stderr=_read(err, 1 << 20, tail=True),
            timed_out=not exited,
            wall_s=wall,
            mode=mode,
            status=_describe_exit(final, limits),
        )


def _wait_unreaped(proc: subprocess.Popen, timeout: float) -> bool:
    """Wait up to `timeout` s for the leader to exit, leaving it unreaped (its pid, the group id, stays
    reserved until `_kill_group` ran). Falls back to a reaping wait without pidfd (Linux < 5.3)."""
    try:
        fd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return False
        return True
    try:
        poller = select.poll()  # not select(): fds above 1024 are common in a large parent
        poller.register(fd, select.POLLIN)
        return bool(poller.poll(math.ceil(timeout * 1000)))
    finally:
        os.close(fd)


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def _sweep(token: str, work: str) -> None:
    """Kill the run's strays: processes with the token in their environment or their cwd in `work`.

    Killed processes turn into zombies, which have neither, so the loop ends once no live stray remains.
    """
    needle = f"\0{_TOKEN_VAR}={token}\0".encode()
    inside = work.rstrip("/") + "/"
    for _ in range(_SWEEP_ROUNDS):
        strays = [pid for pid in _pids() if _is_stray(pid, needle, inside)]
        if not strays:
            return
        for pid in strays:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)


def _pids() -> list[int]:
    try:
        names = os.listdir("/proc")
    except OSError:
        return []
    me = os.getpid()
    return [int(name) for name in names if name.isdigit() and int(name) != me]


def _is_stray(pid: int, needle: bytes, inside: str) -> bool:
    try:
        with open(f"/proc/{pid}/environ", "rb") as fh:
            if needle in b"\0" + fh.read():
                return True
        return (os.readlink(f"/proc/{pid}/cwd") + "/").startswith(inside)
    except OSError:
        return False


def _read(fh: IO[bytes], cap: int, tail: bool) -> bytes:
    size = fh.seek(0, os.SEEK_END)
    fh.seek(max(0, size - cap) if tail else 0)
    return fh.read(cap)


def run_function(code: str, entry: str, kwargs: Mapping[str, Any], limits: SandboxLimits) -> SandboxResult:
    """Define `code` in a sandboxed Python, call `entry(**kwargs)`, and return its value as data.

    numpy arrays in `kwargs` travel as `.npy`, other values as JSON. The value comes back as a numeric
    numpy array (from any array-like) or as a JSON scalar; anything else is an error, not a pickle. Every
    failure — load error, exception, crash, limit, timeout, bad value — is `ok=False` with a readable `error`.
    """
    work = tempfile.mkdtemp(prefix="discover-sandbox-")
    try:
        arrays = {k: v for k, v in kwargs.items() if isinstance(v, np.ndarray)}
        plain = {k: v for k, v in kwargs.items() if k not in arrays}
        for name, array in arrays.items():
            np.save(Path(work, f"in_{name}.npy"), array, allow_pickle=False)
        call = {"entry": entry, "arrays": sorted(arrays), "kwargs": plain}
        Path(work, "candidate.py").write_text(code)
        Path(work, "call.json").write_text(json.dumps(call))
        mode = _mode(limits)
        argv = [sys.executable, "-I", str(_RUNNER), limits._runner_arg(), work]
        proc = _run(argv, limits, mode, work, b"", stdout_cap=_TAIL, tail=True)
        stdout = proc.stdout.decode(errors="replace")
        if proc.timed_out:
            return SandboxResult(False, None, proc.status, proc.mode, proc.wall_s, stdout)
        return _read_result(Path(work), proc, stdout, limits)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _read_result(work: Path, proc: ProcessResult, stdout: str, limits: SandboxLimits) -> SandboxResult:
    def fail(message: str) -> SandboxResult:
        return SandboxResult(False, None, message, proc.mode, proc.wall_s, stdout)

    status_file = _open_regular(work / "result.json", 1 << 20)
    if status_file is None:
        stderr = proc.stderr[-_TAIL:].decode(errors="replace").strip()
        return fail(f"the code exited without a result: {proc.status}" + (f"\n{stderr}" if stderr else ""))
    try:
        with status_file:
            status = json.load(status_file)
    except (ValueError, UnicodeDecodeError):
        return fail("the result file is not valid JSON")
    if not isinstance(status, dict) or not status.get("ok"):
        message = status.get("error") if isinstance(status, dict) else None
        return fail(str(message) if message else "the code failed without a message")
    if status.get("kind") != "npy":
        return SandboxResult(True, status.get("value"), None, proc.mode, proc.wall_s, stdout)
    array_file = _open_regular(work / "result.npy", limits.file_mb << 20)
    if array_file is None:
        return fail("the returned array is missing or is not a regular file")
    try:
        with array_file:
            value = np.load(array_file, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        return fail(f"the returned array could not be read: {exc}")
    if not isinstance(value, np.ndarray) or value.dtype.kind not in "biuf":
        return fail(f"the returned array has dtype {getattr(value, 'dtype', '?')}, not numbers")
    return SandboxResult(True, value, None, proc.mode, proc.wall_s, stdout)


def _open_regular(path: Path, cap: int) -> IO[bytes] | None:
    """Open a file the code left behind only if it is a regular file (no link, FIFO or device) within `cap`."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_size > cap:
        os.close(fd)
        return None
    return os.fdopen(fd, "rb")


def _describe_exit(returncode: int | None, limits: SandboxLimits) -> str:
    if returncode is None:
        return f"timed out after {limits.timeout_s:g} s (wall clock)"
    if returncode >= 0:
        return f"exit status {returncode}"
    signum = -returncode
    name = signal.Signals(signum).name if signum in signal.Signals._value2member_map_ else str(signum)
    hint = {signal.SIGXCPU: " (CPU time limit exceeded)", signal.SIGXFSZ: " (file size limit exceeded)"}.get(signum, "")
    return f"killed by signal {name}{hint}"

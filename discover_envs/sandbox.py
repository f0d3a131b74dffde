"""The sandbox: run untrusted candidate code in its own process, folder and limits, and read back only data.

Every run gets a fresh temporary folder, its own process group (session), rlimits (address space, CPU
seconds, file size, open files, no core dumps), one thread per numeric library, a minimal environment, and a
wall clock enforced by this parent process, which kills the whole group on timeout. When bubblewrap (`bwrap`)
works on this machine the child also runs with no network, a read-only view of the host, a private /tmp and
its own PID namespace (so nothing it forks outlives it); otherwise the rlimits-only mode runs and says so in
`mode`. Results come back as `.npy` (loaded with `allow_pickle=False`) or JSON, never as a pickle.
"""

from __future__ import annotations

import json
import math
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["ProcessResult", "SandboxLimits", "SandboxResult", "bwrap_available", "run_function", "run_program"]

_RUNNER = Path(__file__).with_name("_runner.py")
#: Seconds granted past `timeout_s` for start-up and teardown before the parent gives up.
GRACE_S = 2.0
_TAIL = 4000


@dataclass(frozen=True)
class SandboxLimits:
    """Resource limits of one sandboxed run. `isolation`: "auto" (bwrap if it works), "bwrap" or "none"."""

    timeout_s: float = 60.0
    memory_mb: int = 4096
    file_mb: int = 512
    open_files: int = 256
    threads: int = 1
    isolation: str = "auto"


@dataclass
class ProcessResult:
    returncode: int | None
    stdout: bytes
    stderr: bytes
    timed_out: bool
    wall_s: float
    mode: str


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
        probe = subprocess.run(
            [exe, *_bwrap_args("/tmp"), "true"], capture_output=True, timeout=10, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return probe.returncode == 0


def _bwrap_args(workdir: str) -> list[str]:
    return [
        "--ro-bind", "/", "/",
        "--dev", "/dev",
        "--proc", "/proc",
        "--tmpfs", "/tmp",
        "--bind", workdir, workdir,
        "--chdir", workdir,
        "--unshare-all",
        "--die-with-parent",
        "--new-session",
    ]  # fmt: skip


def _mode(limits: SandboxLimits) -> str:
    if limits.isolation == "none":
        return "rlimits"
    if limits.isolation == "bwrap" and not bwrap_available():
        raise RuntimeError("isolation='bwrap' was asked for, but bubblewrap is missing or cannot run here")
    if limits.isolation not in ("auto", "bwrap"):
        raise ValueError(f"isolation must be 'auto', 'bwrap' or 'none', got {limits.isolation!r}")
    return "bwrap" if bwrap_available() else "rlimits"


def _child_env(workdir: str, threads: int) -> dict[str, str]:
    env = {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": workdir,
        "TMPDIR": workdir,
        "LANG": "C.UTF-8",
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONHASHSEED": "0",
    }
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
        env[var] = str(threads)
    for var in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "CUDA_VISIBLE_DEVICES"):
        if var in os.environ:
            env[var] = os.environ[var]
    return env


def _set_limits(limits: SandboxLimits) -> None:
    """Runs in the child between fork and exec."""
    mb = 1 << 20
    cpu = math.ceil(limits.timeout_s) + 1
    resource.setrlimit(resource.RLIMIT_AS, (limits.memory_mb * mb, limits.memory_mb * mb))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    resource.setrlimit(resource.RLIMIT_FSIZE, (limits.file_mb * mb, limits.file_mb * mb))
    resource.setrlimit(resource.RLIMIT_NOFILE, (limits.open_files, limits.open_files))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def run_program(
    argv: Sequence[str],
    limits: SandboxLimits,
    *,
    stdin: bytes = b"",
    files: Mapping[str, bytes] | None = None,
    workdir: str | None = None,
) -> ProcessResult:
    """Run `argv` sandboxed in `workdir` (a fresh temp folder unless given), writing `files` there first."""
    mode = _mode(limits)
    own_dir = workdir is None
    work = workdir or tempfile.mkdtemp(prefix="discover-sandbox-")
    try:
        for name, data in (files or {}).items():
            Path(work, name).write_bytes(data)
        command = [shutil.which("bwrap") or "bwrap", *_bwrap_args(work), *argv] if mode == "bwrap" else argv
        out_path, err_path = Path(work, ".stdout"), Path(work, ".stderr")
        start = time.perf_counter()
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            proc = subprocess.Popen(
                list(command),
                cwd=work,
                env=_child_env(work, limits.threads),
                stdin=subprocess.PIPE,
                stdout=out,
                stderr=err,
                start_new_session=True,
                preexec_fn=lambda: _set_limits(limits),
            )
            timed_out = False
            try:
                proc.communicate(stdin, timeout=limits.timeout_s + GRACE_S)
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                _kill_group(proc.pid)
                proc.wait()
        wall = time.perf_counter() - start
        timed_out = timed_out or wall > limits.timeout_s + GRACE_S
        return ProcessResult(
            returncode=None if timed_out else proc.returncode,
            stdout=_read_capped(out_path, limits.file_mb << 20),
            stderr=_read_capped(err_path, 1 << 20),
            timed_out=timed_out,
            wall_s=wall,
            mode=mode,
        )
    finally:
        if own_dir:
            shutil.rmtree(work, ignore_errors=True)


def _read_capped(path: Path, cap: int) -> bytes:
    with open(path, "rb") as fh:
        return fh.read(cap)


def run_function(
    code: str, entry: str, kwargs: Mapping[str, Any], limits: SandboxLimits
) -> SandboxResult:
    """Define `code` in a sandboxed Python, call `entry(**kwargs)`, and return its value as data.

    numpy arrays in `kwargs` travel as `.npy`, other values as JSON. The value comes back as a numeric
    numpy array (from any array-like) or as a JSON value; anything else is an error, not a pickle.
    """
    work = tempfile.mkdtemp(prefix="discover-sandbox-")
    try:
        arrays = {k: v for k, v in kwargs.items() if isinstance(v, np.ndarray)}
        plain = {k: v for k, v in kwargs.items() if k not in arrays}
        for name, array in arrays.items():
            np.save(Path(work, f"in_{name}.npy"), array, allow_pickle=False)
        call = {"entry": entry, "arrays": sorted(arrays), "kwargs": plain}
        files = {"candidate.py": code.encode(), "call.json": json.dumps(call).encode()}
        argv = [sys.executable, "-I", str(_RUNNER), work]
        proc = run_program(argv, limits, files=files, workdir=work)
        stdout = proc.stdout[-_TAIL:].decode(errors="replace")
        if proc.timed_out:
            return SandboxResult(
                False, None, f"timed out after {limits.timeout_s:g} s (wall clock)", proc.mode, proc.wall_s, stdout
            )
        return _read_result(Path(work), proc, stdout)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _read_result(work: Path, proc: ProcessResult, stdout: str) -> SandboxResult:
    def fail(message: str) -> SandboxResult:
        return SandboxResult(False, None, message, proc.mode, proc.wall_s, stdout)

    status_path = work / "result.json"
    if not status_path.is_file() or status_path.stat().st_size > 1 << 20:
        stderr = proc.stderr[-_TAIL:].decode(errors="replace").strip()
        why = _describe_exit(proc.returncode)
        return fail(f"the code produced no result ({why})" + (f": {stderr}" if stderr else ""))
    try:
        status = json.loads(status_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return fail("the result file is not valid JSON")
    if not isinstance(status, dict) or not status.get("ok"):
        message = status.get("error") if isinstance(status, dict) else None
        return fail(str(message) if message else "the code failed without a message")
    if status.get("kind") == "npy":
        try:
            value = np.load(work / "result.npy", allow_pickle=False)
        except (OSError, ValueError) as exc:
            return fail(f"the returned array could not be read: {exc}")
        if value.dtype.kind not in "biuf":
            return fail(f"the returned array has dtype {value.dtype}, not numbers")
    else:
        value = status.get("value")
    return SandboxResult(True, value, None, proc.mode, proc.wall_s, stdout)


def _describe_exit(returncode: int | None) -> str:
    if returncode is None:
        return "no exit status"
    if returncode < 0:
        name = signal.Signals(-returncode).name if -returncode in signal.Signals._value2member_map_ else "?"
        hint = " (CPU time limit)" if -returncode == signal.SIGXCPU else ""
        return f"killed by signal {name}{hint}"
    return f"exit status {returncode}"

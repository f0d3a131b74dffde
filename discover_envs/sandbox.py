"""The sandbox: run untrusted candidate code in its own process, folder and limits, and read back only data.

Every run gets a fresh folder (its cwd, HOME and TMPDIR; a tmpfs of `disk_mb` MB and `inodes` inodes where this
process is root, `runspace.py`), its own session and process group, rlimits (address space, CPU seconds, file
size, open files, no core dumps; applied by `_runner.py` before any untrusted code runs), a seccomp filter under
which no new namespace can be made (user, PID, mount, network...; `_runner.deny_namespaces`, where this machine
and kernel allow one), one thread per numeric library, a minimal environment, and a wall clock of exactly `timeout_s`
enforced by this parent: a run whose leader is seen to exit after it is a timeout, whatever it wrote. Results
come back as `.npy` (loaded with `allow_pickle=False`, its header checked against the file's size first) or
JSON, never as a pickle; the caller recomputes any score from them.

Candidate code never runs with privileges. When this process is root, `_runner.py` drops to uid/gid 65534
(`nobody`, no supplementary groups) and checks that no capability is left before any untrusted code or exec;
the run's folder is handed to that uid (without namespaces, a uid of the run's own, see "unsafe-none"). Modes,
reported as `mode` (and by `isolation_report()`):

- "bwrap" (bubblewrap works here): new PID, IPC, network, UTS (and cgroup) namespaces; a minimal read-only
  view of the host (/usr, the library folders, a few /etc files, this Python and its packages, the runner,
  of /sys only the CPU layout unless GPUs are passed through), /proc/sys read-only, no /root, no host /tmp; a
  private, sized /tmp and /dev/shm (their inodes count toward the run's memory); the run's folder the only
  writable host path; `limits.hide` paths masked. bwrap is started by root without a user namespace and keeps
  only CAP_SETUID/CAP_SETGID, which the runner then gives up with its uid.
- "rlimits" (no bubblewrap, not root): the same limits and clean-up, but the code sees the host's files and
  network with this user's rights. Guarded against accidents, not malice.
- "unsafe-none" (no bubblewrap, root, opted in with `unsafe_no_isolation`): as "rlimits", as a uid no other
  run holds meanwhile (`runspace.uid_slot`; 65534 where slots cannot work), so concurrent runs cannot signal or
  rewrite each other; "unsafe-root" where that uid could not even start this interpreter (e.g. it lives under
  root's 0700 home): then the code runs as root. Without the opt-in a root parent refuses to run candidate
  code (`IsolationUnavailable`).

Per-run limits (`cgroup.py`): where a writable cgroup hierarchy exists (v1 `memory` + `pids`, or v2 with both), each run
gets its own cgroup holding all its processes (`memory_mb` in total, `processes` tasks; `frozen` stops them
all), killed and removed afterwards. Without it, memory is bounded per process only, and tasks by RLIMIT_NPROC
of the dropped uid.

Clean-up, done before `run_*` returns: the process group is killed, then the run's cgroup is emptied, then every
process that carries the run's token in its environment or whose cwd lies in the run's folder (and, in
"unsafe-none", every process of the run's uid) is killed, repeatedly until none is left (a /proc scan, ~5 ms
with 100 processes). Under bwrap the PID namespace and
`--die-with-parent` also take everything down when this process is killed; without bwrap the runner asks the
kernel (PR_SET_PDEATHSIG) to kill the run's leader with it, and this process's reaper (`_reaper.py`, started
once) kills the rest through the run's cgroup or uid; it also removes the folders and cgroups of a killed agent.

Threads: several runs may go at once from threads of one parent. Each has its own folder, token, cgroup and
anonymous stdout/stderr files, and nothing runs between fork and exec (no `preexec_fn`), so Popen may use
vfork — with a 2 GB parent, spawning took 3.9 ms this way against 13.7 ms with a `preexec_fn`.
"""

from __future__ import annotations

import contextlib
import contextvars
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
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path, PurePath
from typing import IO, Any

import numpy as np

from discover_envs import runspace
from discover_envs._runner import NAMESPACE_SYSCALLS
from discover_envs.cgroup import RunCgroup, cgroup_kind, cgroup_parents
from discover_envs.runspace import frozen

__all__ = [
    "IsolationUnavailable",
    "ProcessResult",
    "SandboxLimits",
    "SandboxResult",
    "allow_unsafe_no_isolation",
    "bwrap_available",
    "frozen",
    "isolation_report",
    "recorded_modes",
    "run_function",
    "run_program",
]

_RUNNER = Path(__file__).with_name("_runner.py")
#: Seconds past `timeout_s` that killing and reaping a timed-out run may take; results come back by then.
GRACE_S = 2.0
_TAIL = 4000
_TOKEN_VAR = "DISCOVER_SANDBOX"
#: Rounds of the clean-up sweep; each kills everything found, so only a fork bomb needs more than two.
_SWEEP_ROUNDS = 50
#: The unprivileged uid/gid candidate code runs as when this process is root (`nobody`).
UNPRIVILEGED_ID = 65534
#: Host paths visible read-only under bwrap (those that exist), besides Python's prefixes and the runner.
_SYSTEM_PATHS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
#: What of /sys is visible under bwrap: the CPU and NUMA layout (libc, OpenMP, BLAS read it); with GPUs passed
#: through, all of /sys (read-only), where the CUDA driver looks its devices up.
_SYS_PATHS = ("/sys/devices/system/cpu", "/sys/devices/system/node")
_ETC_FILES = (
    "passwd", "group", "nsswitch.conf", "hosts", "localtime", "ld.so.cache", "ld.so.conf", "ld.so.conf.d",
    "alternatives", "os-release",
)  # fmt: skip
_MODES = ("auto", "bwrap", "none")
_UNSAFE_OPT_IN = False
_WARNED = False
_RECORDER: contextvars.ContextVar[list[str] | None] = contextvars.ContextVar("discover_sandbox_modes", default=None)


class IsolationUnavailable(RuntimeError):
    """The isolation asked for cannot be had here; no candidate code was run."""


@dataclass(frozen=True)
class SandboxLimits:
    """Resource limits of one sandboxed run.

    isolation: "auto" (bwrap if it works), "bwrap" (required) or "none" (no namespaces). Without namespaces a
    root parent runs nothing unless `unsafe_no_isolation` (or `allow_unsafe_no_isolation()`) says so.
    `threads` caps the numeric libraries' thread pools and scales the CPU-seconds backstop
    (`timeout_s * threads + 1`), so a single-threaded loop always meets the wall clock first.
    `processes`: tasks (processes and threads) of the whole run. `hide`: absolute host paths made invisible
    to the code (masked under bwrap; without bwrap they cannot be hidden, so the run is refused unless opted
    in to running unisolated). `disk_mb`, `inodes`: size and inode count of the run's folder, a tmpfs where
    this process is root (`isolation_report` says where it is not); `file_mb` caps each file within it.
    """

    timeout_s: float = 60.0
    memory_mb: int = 4096
    file_mb: int = 512
    open_files: int = 256
    threads: int = 1
    isolation: str = "auto"
    processes: int = 256
    hide: tuple[str, ...] = ()
    unsafe_no_isolation: bool = False
    disk_mb: int = 1024
    inodes: int = 10_000

    def __post_init__(self) -> None:
        if not (isinstance(self.timeout_s, (int, float)) and 0 < self.timeout_s < math.inf):
            raise ValueError(f"timeout_s must be a positive finite number of seconds, got {self.timeout_s!r}")
        for name, least in (
            ("memory_mb", 64), ("file_mb", 1), ("open_files", 16), ("threads", 1), ("processes", 8),
            ("disk_mb", 1), ("inodes", 16),
        ):  # fmt: skip
            value = getattr(self, name)
            if not (isinstance(value, int) and value >= least):
                raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")
        if self.isolation not in _MODES:
            raise ValueError(f"isolation must be 'auto', 'bwrap' or 'none', got {self.isolation!r}")
        if not (isinstance(self.hide, tuple) and all(isinstance(p, str) and os.path.isabs(p) for p in self.hide)):
            raise ValueError(f"hide must be a tuple of absolute paths, got {self.hide!r}")

    @property
    def cpu_s(self) -> int:
        return math.ceil(self.timeout_s * self.threads) + 1

    def _runner_arg(self, uid: int, nproc: int, parent: int) -> str:
        """LIMITS for `_runner.py`: bytes, seconds, bytes, files, tasks (0: none), uid (-1: keep), parent pid
        for PR_SET_PDEATHSIG (0: none), whether to install the namespace filter."""
        mb = 1 << 20
        deny = int(namespace_filter_missing() is None)
        return f"{self.memory_mb * mb},{self.cpu_s},{self.file_mb * mb},{self.open_files},{nproc},{uid},{parent},{deny}"


@dataclass
class ProcessResult:
    """`returncode` follows Popen: -N when killed by signal N (bwrap's 128+N is translated), None on timeout.
    `status` says the same in words, e.g. "killed by signal SIGXCPU (CPU time limit exceeded)". `cpu_s`: user
    + system CPU seconds of all the run's processes (from its cgroup; without one, of the leader and the
    descendants it reaped, or NaN under bwrap, whose namespace init is never reaped by the leader)."""

    returncode: int | None
    stdout: bytes
    stderr: bytes
    timed_out: bool
    wall_s: float
    mode: str
    status: str = ""
    cpu_s: float = 0.0


@dataclass
class SandboxResult:
    ok: bool
    value: Any
    error: str | None
    mode: str
    wall_s: float
    stdout: str = ""
    cpu_s: float = 0.0


def allow_unsafe_no_isolation(allowed: bool = True) -> None:
    """Process-wide opt-in: let a root parent run candidate code without namespaces (as uid 65534 if it can).

    Set by `DiscoverEnv(..., unsafe_no_isolation=True)` and the CLI's flag; without it such runs are refused."""
    global _UNSAFE_OPT_IN
    _UNSAFE_OPT_IN = bool(allowed)


@contextlib.contextmanager
def recorded_modes() -> Iterator[list[str]]:
    """Collect the mode of every run (or "refused") started in this context, e.g. during one `env.step`."""
    modes: list[str] = []
    token = _RECORDER.set(modes)
    try:
        yield modes
    finally:
        _RECORDER.reset(token)


def _record(mode: str) -> None:
    modes = _RECORDER.get()
    if modes is not None:
        modes.append(mode)


@cache
def bwrap_available() -> bool:
    """True when bubblewrap exists and can actually build its namespaces here (it cannot in some containers)."""
    exe = shutil.which("bwrap")
    if exe is None:
        return False
    with tempfile.TemporaryDirectory(prefix="discover-sandbox-probe-") as work:
        try:
            probe = subprocess.run(
                [exe, *_bwrap_args(work, SandboxLimits()), "true"], capture_output=True, timeout=10, check=False
            )
        except (OSError, subprocess.TimeoutExpired):
            return False
    return probe.returncode == 0


def _is_root() -> bool:
    return os.geteuid() == 0


@cache
def namespace_filter_missing() -> str | None:
    """None where every run gets the runner's seccomp filter (no new namespace can be made), else why not."""
    machine = os.uname().machine
    if machine not in NAMESPACE_SYSCALLS:
        return f"no namespace filter is written for {machine}"
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return "/proc/self/status is unreadable"
    return None if "\nSeccomp:" in status else "this kernel has no seccomp"


def _bwrap_args(work: str, limits: SandboxLimits) -> list[str]:
    args = ["--dev", "/dev"]
    # GPU device nodes pass through so code actions that use CUDA (the kernel env) can run; absent, no-op.
    args += [arg for dev in sorted(glob.glob("/dev/nvidia*")) for arg in ("--dev-bind", dev, dev)]
    tmp_bytes = str(limits.file_mb << 20)
    args += ["--perms", "1777", "--size", tmp_bytes, "--tmpfs", "/dev/shm"]
    args += ["--proc", "/proc", "--ro-bind", "/proc/sys", "/proc/sys"]
    # Sized private /tmp first: an interpreter or checkout under /tmp (some CI runners) is bound over it below.
    args += ["--perms", "1777", "--size", tmp_bytes, "--tmpfs", "/tmp"]
    for path in _SYSTEM_PATHS:
        if os.path.islink(path):
            args += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            args += ["--ro-bind", path, path]
    if glob.glob("/dev/nvidia*"):
        args += ["--ro-bind", "/sys", "/sys"]
    else:
        folders = ("/sys", "/sys/devices", "/sys/devices/system")
        args += [arg for folder in folders for arg in ("--perms", "0755", "--dir", folder)]
        args += [arg for path in _SYS_PATHS if os.path.isdir(path) for arg in ("--ro-bind", path, path)]
    # bwrap would make the folders above a bind 0700 root-owned, closed to the dropped uid: make them 0755.
    above = {str(parent) for path in (*_python_paths(), work) for parent in Path(path).parents} | {"/etc"}
    for folder in sorted(above, key=len):
        if folder not in ("/", "/tmp") and not any(Path(folder).is_relative_to(p) for p in _SYSTEM_PATHS):
            args += ["--perms", "0755", "--dir", folder]
    args += [arg for name in _ETC_FILES for arg in ("--ro-bind-try", f"/etc/{name}", f"/etc/{name}")]
    for path in _python_paths():
        args += ["--ro-bind", path, path]
    args += ["--bind", work, work]
    for path in limits.hide:
        if os.path.isdir(path):
            args += ["--tmpfs", path, "--remount-ro", path]
        elif os.path.lexists(path):
            args += ["--ro-bind", "/dev/null", path]
    args += ["--chdir", "/"]  # the runner enters the folder once it is the folder's owner
    # No --unshare-all: it includes a user namespace, in which root's uid 0 maps to the host's uid 0.
    args += ["--unshare-pid", "--unshare-ipc", "--unshare-net", "--unshare-uts", "--unshare-cgroup-try"]
    args += ["--cap-drop", "ALL"]
    if _is_root():
        args += ["--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]  # the runner's drop to nobody needs these
    return [*args, "--die-with-parent", "--new-session"]


@cache
def _python_paths() -> tuple[str, ...]:
    """This interpreter's prefixes (real and as named) and the runner: what `python -I _runner.py` reads."""
    names = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}
    names |= {os.path.realpath(p) for p in names} | {str(_RUNNER)}
    return tuple(sorted(p for p in names if os.path.exists(p) and p != "/"))


def _mode(limits: SandboxLimits) -> str:
    """The mode this run gets, or `IsolationUnavailable` (recorded as "refused") when none is allowed."""
    try:
        return _choose_mode(limits)
    except IsolationUnavailable:
        _record("refused")
        raise


def _choose_mode(limits: SandboxLimits) -> str:
    if limits.isolation != "none" and bwrap_available():
        return "bwrap"
    if limits.isolation == "bwrap":
        raise IsolationUnavailable("isolation='bwrap' was asked for, but bubblewrap is missing or cannot run here")
    opted_in = limits.unsafe_no_isolation or _UNSAFE_OPT_IN
    why = "bubblewrap cannot run here" if limits.isolation == "auto" else "isolation='none' was asked for"
    if _is_root() and not opted_in:
        raise IsolationUnavailable(
            f"refusing to run candidate code as root without isolation ({why}); install a working bubblewrap, "
            "run as an unprivileged user, or opt in with unsafe_no_isolation=True (the code then sees this "
            f"machine's files and network, as uid {UNPRIVILEGED_ID} where that uid can start this Python, else as root)"
        )
    if limits.hide and not opted_in:
        raise IsolationUnavailable(f"paths {list(limits.hide)} must be hidden from the code, which needs bubblewrap")
    mode = "rlimits" if not _is_root() else "unsafe-none" if _open_to_others() else "unsafe-root"
    _warn_once(f"discover sandbox: {why}; candidate code runs in mode {mode!r} (no namespace isolation)")
    return mode


@cache
def _open_to_others() -> bool:
    """Whether uid 65534 could run this interpreter: its prefixes, the runner and every folder above them
    readable and searchable by others (an interpreter under root's 0700 home is not)."""
    for path in _python_paths():
        for item in (Path(path), *Path(path).parents):
            try:
                if os.stat(item).st_mode & 0o005 != 0o005 and not (item == Path(path) and item.is_file()):
                    return False
            except OSError:
                return False
    return True


def _drops(mode: str) -> bool:
    """Whether a run in `mode` gives up root (only a root parent has anything to give up)."""
    return _is_root() and mode in ("bwrap", "unsafe-none")


def _warn_once(message: str) -> None:
    global _WARNED
    if not _WARNED:
        _WARNED = True
        print(message, file=sys.stderr, flush=True)


def isolation_report(limits: SandboxLimits | None = None) -> dict[str, Any]:
    """The mode candidate code gets here and which limits are enforced, for a run's config.json."""
    limits = limits or SandboxLimits()
    try:
        mode = _choose_mode(limits)
    except IsolationUnavailable as exc:
        return {"mode": "refused", "reason": str(exc)}
    bwrap = mode == "bwrap"
    cgroup = cgroup_kind()
    drop = _drops(mode)
    slots = mode == "unsafe-none" and runspace.slots_unavailable() is None
    unbounded, no_filter = runspace.folder_unbounded(), namespace_filter_missing()
    first, last = runspace.UID_BASE, runspace.UID_BASE + runspace.UID_SLOTS - 1
    sys_view = "all of /sys" if glob.glob("/dev/nvidia*") else "/sys only " + ", ".join(_SYS_PATHS)
    return {
        "mode": mode,
        "uid": (f"one per run, {first}-{last}" if slots else UNPRIVILEGED_ID) if drop else os.geteuid(),
        "namespaces": ["pid", "ipc", "net", "uts", "cgroup", "mount"] if bwrap else [],
        "new_namespaces": f"allowed ({no_filter})" if no_filter else "denied (seccomp: unshare, clone, setns)",
        "filesystem": f"minimal read-only host view ({sys_view}), run folder writable"
        if bwrap
        else "host, as the uid above",
        "folder": f"host folder, unbounded ({unbounded})"
        if unbounded
        else f"tmpfs of {limits.disk_mb} MB and {limits.inodes} inodes, counted in the run's memory",
        "tmp": f"private tmpfs of {limits.file_mb} MB" if bwrap else "host /tmp (TMPDIR is the run folder)",
        "network": "none" if bwrap else "host",
        "hidden_paths": list(limits.hide) if bwrap else [],
        "memory": f"cgroup {cgroup} per run + RLIMIT_AS per process" if cgroup else "RLIMIT_AS per process",
        "tasks": f"cgroup {cgroup} pids.max per run" if cgroup else ("RLIMIT_NPROC of the uid" if drop else "none"),
        "cpu": "RLIMIT_CPU per process",
        "wall_clock": "enforced by the parent; results seen after it are rejected",
        "dies_with_parent": "whole run (PID namespace)"
        if bwrap
        else f"leader (PR_SET_PDEATHSIG), the rest {_reaped(cgroup, slots)}",
        "leftovers": "folders and cgroups of a killed agent are removed by its reaper process (runspace.watch)",
    }


def _reaped(cgroup: str | None, slots: bool) -> str:
    """How the rest of an unisolated run dies with the agent: killed by the reaper through what it can find."""
    if cgroup:
        return "killed by the agent's reaper through the run's cgroup"
    return "killed by the agent's reaper by uid" if slots else "outlives it (no cgroup, shared uid)"


def _child_env(workdir: str, threads: int, token: str, drop: bool) -> dict[str, str]:
    env = {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": workdir,
        "TMPDIR": workdir,
        "USER": "nobody" if drop else os.environ.get("USER", "user"),
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


# -- running ----------------------------------------------------------------------------------------------------


def run_program(
    argv: Sequence[str],
    limits: SandboxLimits,
    *,
    stdin: bytes = b"",
    files: Mapping[str, bytes] | None = None,
    workdir: str | None = None,
) -> ProcessResult:
    """Run `argv` sandboxed in `workdir` (a fresh temp folder unless given), writing `files` there first.

    stdout is kept up to `limits.file_mb`, stderr up to 1 MB. Under bwrap only the folder and the read-only
    system paths are visible, so programs and their inputs belong in `files` or the folder. A given `workdir`
    must not be shared by runs that overlap in time: the clean-up kills processes whose cwd is in it; a folder
    an earlier run's code could write may hold anything, so give each run a fresh one; it is bounded by `disk_mb`
    and `inodes` only if made by `runspace.make_folder`. Raises `IsolationUnavailable` when no allowed mode
    exists (nothing is run), `ValueError` when `workdir` is a link.
    """
    if not argv:
        raise ValueError("argv must name a program to run")
    for name in files or {}:
        _relative(name)
    mode = _mode(limits)
    own_dir = workdir is None
    work = runspace.make_folder(limits.disk_mb, limits.inodes) if workdir is None else os.path.abspath(workdir)
    try:
        folder = _folder_identity(work)
        for name, data in (files or {}).items():
            _put(work, name, data)
        launcher = [sys.executable, "-I", "-S", str(_RUNNER), "LIMITS", work, "--exec", *argv]
        return _run(launcher, limits, mode, work, folder, stdin, stdout_cap=limits.file_mb << 20, tail=False)
    finally:
        if own_dir:
            runspace.remove_folder(work)


def _folder_identity(work: str) -> tuple[int, int]:
    """(device, inode) of the run's folder, which must be a folder, not a link: what `_hand_over` checks."""
    info = os.lstat(work)
    if not stat.S_ISDIR(info.st_mode):
        raise ValueError(f"the run's folder {work!r} is a link or not a folder; give each run a folder of its own")
    return info.st_dev, info.st_ino


def _hand_over(work: str, folder: tuple[int, int], uid: int) -> None:
    """Give the run's folder to the run's unprivileged `uid` through a descriptor opened without following a link and
    checked to be `folder`: a link or another folder put at its path is refused, never chowned (as root, a
    chown by path would follow a link planted by an earlier run's code to any host path)."""
    try:
        fd = os.open(work, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise ValueError(f"the run's folder {work!r} cannot be opened as a folder: {exc.strerror}") from None
    try:
        info = os.fstat(fd)
        if (info.st_dev, info.st_ino) != folder:
            raise ValueError(f"the run's folder {work!r} was replaced before the run; refusing to hand it over")
        os.fchown(fd, uid, uid)
    finally:
        os.close(fd)


def _relative(name: str) -> str:
    path = PurePath(name)
    if not name or path.is_absolute() or ".." in path.parts:
        raise ValueError(f"file names must be relative paths inside the run's folder, got {name!r}")
    return name


def _put(work: str, name: str, data: bytes) -> None:
    """Write `data` to `work/name` without following anything an earlier run in `work` left there (a link at
    the name or in a folder on the way would otherwise let it aim this process's writes at a host file)."""
    target = Path(work, name)
    root = os.path.realpath(work)
    if os.path.commonpath([root, os.path.realpath(target.parent)]) != root:
        raise ValueError(f"{name!r} leads out of the run's folder through a link")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".discover-{secrets.token_hex(8)}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    with os.fdopen(fd, "wb") as fh:
        os.fchmod(fh.fileno(), 0o644)
        fh.write(data)
    os.replace(tmp, target)


def _run(
    argv: list[str],
    limits: SandboxLimits,
    mode: str,
    work: str,
    folder: tuple[int, int],
    stdin: bytes,
    *,
    stdout_cap: int,
    tail: bool,
) -> ProcessResult:
    _record(mode)
    runspace.watch()
    token = secrets.token_hex(16)
    drop = _drops(mode)
    with _uid(mode) as uid:
        if drop:
            _hand_over(work, folder, uid)
        cgroup = RunCgroup.create(limits.memory_mb, limits.processes, token) if cgroup_parents() else None
        try:
            nproc = 0 if cgroup or not drop else limits.processes
            runner_arg = limits._runner_arg(uid if drop else -1, nproc, 0 if mode == "bwrap" else os.getpid())
            argv = [runner_arg if a == "LIMITS" else a for a in argv]
            command = [shutil.which("bwrap") or "bwrap", *_bwrap_args(work, limits), *argv] if mode == "bwrap" else argv
            if cgroup:
                command = cgroup.wrap(command)
            return _spawn(command, limits, mode, work, stdin, token, cgroup, stdout_cap=stdout_cap, tail=tail)
        finally:
            if cgroup:
                cgroup.remove()


def _uid(mode: str) -> contextlib.AbstractContextManager[int]:
    """The uid a run in `mode` drops to: a uid slot of its own without namespaces (where slots work here),
    else `UNPRIVILEGED_ID` (under bwrap, namespaces keep concurrent runs apart)."""
    if mode == "unsafe-none" and runspace.slots_unavailable() is None:
        return runspace.uid_slot()
    return contextlib.nullcontext(UNPRIVILEGED_ID)


def _spawn(
    command: list[str],
    limits: SandboxLimits,
    mode: str,
    work: str,
    stdin: bytes,
    token: str,
    cgroup: RunCgroup | None,
    *,
    stdout_cap: int,
    tail: bool,
) -> ProcessResult:
    # Anonymous files outside the folder: nothing the code does to its folder can swap them for a FIFO or link.
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err, tempfile.TemporaryFile() as inp:
        inp.write(stdin)
        inp.seek(0)
        start = time.perf_counter()
        proc = subprocess.Popen(
            command,
            cwd=work,
            env=_child_env(work, limits.threads, token, _drops(mode)),
            stdin=inp,
            stdout=out,
            stderr=err,
            start_new_session=True,
        )
        usage = None
        try:
            exited = _wait_unreaped(proc.pid, limits.timeout_s)
            # The parent may have been slow to see the exit (or stopped); a result it sees late is a timeout.
            exited = exited and time.perf_counter() - start <= limits.timeout_s
        finally:
            _kill_group(proc.pid)
            _, status, usage = os.wait4(proc.pid, 0)
            proc.returncode = os.waitstatus_to_exitcode(status)
            if cgroup:
                cgroup.kill_all()
            # Also under bwrap: it may exit before the kernel has emptied its PID namespace (measured: ~20 ms
            # later); the sweep makes that teardown finish before we return.
            _sweep(token, work)
        wall = time.perf_counter() - start
        returncode = proc.returncode
        if mode == "bwrap" and returncode > 128 and returncode - 128 in signal.Signals._value2member_map_:
            returncode = 128 - returncode
        final = returncode if exited else None
        oom = cgroup is not None and final == -signal.SIGKILL and cgroup.oom_killed()
        cpu = cgroup.cpu_s() if cgroup else None
        if cpu is None:
            # The leader's own and its reaped descendants' time; bwrap does not reap its namespace's init,
            # so there the figure would miss the code and is unknown instead.
            cpu = math.nan if mode == "bwrap" else usage.ru_utime + usage.ru_stime
        return ProcessResult(
            returncode=final,
            stdout=_read(out, stdout_cap, tail),
            stderr=_read(err, 1 << 20, tail=True),
            timed_out=not exited,
            wall_s=wall,
            mode=mode,
            status=_describe_exit(final, limits, oom),
            cpu_s=cpu,
        )


def _wait_unreaped(pid: int, timeout: float) -> bool:
    """Wait up to `timeout` s for the leader to exit, leaving it unreaped (its pid, the group id, stays
    reserved until `_kill_group` ran). Polls with waitid(WNOWAIT) without pidfd (Linux < 5.3)."""
    try:
        fd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        deadline = time.perf_counter() + timeout
        while time.perf_counter() < deadline:
            if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
                return True
            time.sleep(0.005)
        return False
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
    failure — load error, exception, crash, limit, timeout, bad value, code that is not valid text — is
    `ok=False` with a readable `error`; only a refused mode raises (`IsolationUnavailable`, nothing run).
    """
    mode = _mode(limits)
    try:
        source = code.encode("utf-8")
    except UnicodeEncodeError as exc:
        return SandboxResult(False, None, f"the code is not valid Unicode text: {exc.reason} at {exc.start}", mode, 0.0)
    work = runspace.make_folder(limits.disk_mb, limits.inodes)
    try:
        folder = _folder_identity(work)
        arrays = {k: v for k, v in kwargs.items() if isinstance(v, np.ndarray)}
        plain = {k: v for k, v in kwargs.items() if k not in arrays}
        for name, array in arrays.items():
            np.save(Path(work, f"in_{name}.npy"), array, allow_pickle=False)
        call = {"entry": entry, "arrays": sorted(arrays), "kwargs": plain}
        Path(work, "candidate.py").write_bytes(source)
        Path(work, "call.json").write_text(json.dumps(call))
        for name in os.listdir(work):
            os.chmod(Path(work, name), 0o644)
        argv = [sys.executable, "-I", str(_RUNNER), "LIMITS", work]
        proc = _run(argv, limits, mode, work, folder, b"", stdout_cap=_TAIL, tail=True)
        stdout = proc.stdout.decode(errors="replace")
        if proc.timed_out:
            return SandboxResult(False, None, proc.status, proc.mode, proc.wall_s, stdout, proc.cpu_s)
        return _read_result(Path(work), proc, stdout, limits)
    finally:
        runspace.remove_folder(work)


def _read_result(work: Path, proc: ProcessResult, stdout: str, limits: SandboxLimits) -> SandboxResult:
    def fail(message: str) -> SandboxResult:
        return SandboxResult(False, None, message[:_TAIL], proc.mode, proc.wall_s, stdout, proc.cpu_s)

    status_file = _open_regular(work / "result.json", 1 << 20)
    if status_file is None:
        stderr = proc.stderr[-_TAIL:].decode(errors="replace").strip()
        return fail(f"the code exited without a result: {proc.status}" + (f"\n{stderr}" if stderr else ""))
    try:
        with status_file:
            status = json.load(status_file)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return fail("the result file is not valid JSON (or is nested too deeply)")
    if not isinstance(status, dict) or not status.get("ok"):
        message = status.get("error") if isinstance(status, dict) else None
        return fail(str(message) if message else "the code failed without a message")
    if status.get("kind") != "npy":
        value = status.get("value")
        if not (value is None or isinstance(value, (bool, int, float, str))):
            return fail(f"the result file holds a {type(value).__name__}, not a number or string")
        return SandboxResult(True, value, None, proc.mode, proc.wall_s, stdout, proc.cpu_s)
    array_file = _open_regular(work / "result.npy", limits.file_mb << 20)
    if array_file is None:
        return fail("the returned array is missing or is not a regular file")
    try:
        with array_file:
            value = _load_npy(array_file)
    except (OSError, ValueError, EOFError, MemoryError) as exc:
        return fail(f"the returned array could not be read: {exc}")
    return SandboxResult(True, value, None, proc.mode, proc.wall_s, stdout, proc.cpu_s)


def _load_npy(fh: IO[bytes]) -> np.ndarray:
    """`np.load` of a numeric array whose header agrees with the file's size (a header may claim 10^12 items)."""
    size = os.fstat(fh.fileno()).st_size
    version = np.lib.format.read_magic(fh)
    if version not in ((1, 0), (2, 0)):
        raise ValueError(f"unsupported .npy version {version}")
    reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, _, dtype = reader(fh)
    if dtype.kind not in "biuf" or dtype.hasobject:
        raise ValueError(f"the array has dtype {dtype}, not numbers")
    if math.prod(shape) * dtype.itemsize != size - fh.tell():
        raise ValueError(f"the header claims shape {shape} of {dtype}, which does not match the file's {size} bytes")
    fh.seek(0)
    return np.load(fh, allow_pickle=False)


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


def _describe_exit(returncode: int | None, limits: SandboxLimits, oom: bool = False) -> str:
    if returncode is None:
        return f"timed out after {limits.timeout_s:g} s (wall clock)"
    if returncode >= 0:
        return f"exit status {returncode}"
    signum = -returncode
    name = signal.Signals(signum).name if signum in signal.Signals._value2member_map_ else str(signum)
    hints = {int(signal.SIGXCPU): " (CPU time limit exceeded)", int(signal.SIGXFSZ): " (file size limit exceeded)"}
    hint = hints.get(signum, "")
    if oom:
        hint = f" (the run's memory limit of {limits.memory_mb} MB was exceeded)"
    return f"killed by signal {name}{hint}"

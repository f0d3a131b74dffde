"""What a sandboxed run holds on the host besides its processes, and the switch that stops all of them at once.

- Folder (`make_folder`, `remove_folder`): a fresh `discover-sandbox-OWNER-X` in the temp folder. Where this
  process is root it is a tmpfs of `disk_mb` MB and `inodes` inodes (mode 0700, nosuid, nodev), so a run cannot
  fill the host's disk or inode table; its pages are charged to the writer's memory cgroup, so they count
  toward the run's memory too. Elsewhere it is a plain folder whose size nothing bounds (`folder_unbounded`).
- uid (`uid_slot`): without namespaces, concurrent runs as one uid could signal, trace or rewrite each other.
  Each such run takes one of `UID_SLOTS` uids from `UID_BASE`, held machine-wide by an flock on a file of a
  root-only folder for the run's duration; whatever still runs as that uid is killed on entry and on exit.
- Reaper (`watch`): a process per agent that removes the above (and the run cgroups) once the agent is gone,
  even after SIGKILL; see `_reaper.py`.
- Freezing (`frozen`): every process of a run stopped, through its cgroup's freezer where there is one.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from functools import cache
from pathlib import Path

from discover_envs._reaper import (
    FOLDER_PREFIX,
    UID_BASE,
    UID_SLOTS,
    kill_uid,
    lock_slot,
    owner_tag,
    remove_folder,
)
from discover_envs.cgroup import RunCgroup, cgroup_parents

__all__ = ["folder_unbounded", "frozen", "make_folder", "remove_folder", "slots_unavailable", "uid_slot", "watch"]

_REAPER = Path(__file__).with_name("_reaper.py")
MS_NOSUID, MS_NODEV = 2, 4
_watcher: tuple[int, subprocess.Popen[bytes], int] | None = None
_watch_lock = threading.Lock()


def _mount_tmpfs(path: str, size_mb: int, inodes: int) -> None:
    options = f"size={size_mb}m,nr_inodes={inodes},mode=0700".encode()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.mount(b"tmpfs", os.fsencode(path), b"tmpfs", MS_NOSUID | MS_NODEV, options) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"cannot mount a tmpfs for the run's folder {path}: {os.strerror(errno)}")


@cache
def folder_unbounded() -> str | None:
    """None where run folders are sized tmpfs mounts (a probe mount succeeded), else why they are plain."""
    if os.geteuid() != 0:
        return "mounting a tmpfs needs root"
    probe = tempfile.mkdtemp(prefix="discover-probe-")
    try:
        _mount_tmpfs(probe, 1, 16)
    except OSError as exc:
        return exc.strerror
    finally:
        remove_folder(probe)
    return None


def make_folder(disk_mb: int, inodes: int) -> str:
    """A fresh folder for one or more runs: a tmpfs of `disk_mb` MB and `inodes` inodes where possible.
    Remove it with `remove_folder`; the reaper does if this process dies first."""
    watch()
    path = tempfile.mkdtemp(prefix=f"{FOLDER_PREFIX}{owner_tag()}-")
    if folder_unbounded() is None:
        try:
            _mount_tmpfs(path, disk_mb, inodes)
        except OSError:
            os.rmdir(path)
            raise
    return path


@cache
def _slots_fd() -> int | str:
    """An fd of the root-only folder that holds the uid slots' locks, or why there is none."""
    if os.geteuid() != 0:
        return "not root"
    if not _mapped(UID_BASE, UID_SLOTS):
        return f"uids {UID_BASE}-{UID_BASE + UID_SLOTS - 1} are not mapped in this user namespace"
    path = os.path.join(tempfile.gettempdir(), "discover-uid-slots")
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, 0o700)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    info = os.fstat(fd)
    if info.st_uid != 0 or info.st_mode & 0o077:
        os.close(fd)
        return f"{path} is not a folder that only root can write"
    return fd


def _mapped(first: int, count: int) -> bool:
    try:
        lines = Path("/proc/self/uid_map").read_text().splitlines()
    except OSError:
        return True  # no user namespaces here: every uid is the host's
    return any(int(a) <= first and first + count <= int(a) + int(n) for a, _, n in (ln.split() for ln in lines))


def slots_unavailable() -> str | None:
    """None where unisolated runs get a uid each, else why they share `sandbox.UNPRIVILEGED_ID`."""
    fd = _slots_fd()
    return fd if isinstance(fd, str) else None


@contextlib.contextmanager
def uid_slot() -> Iterator[int]:
    """A uid no other run on this machine holds until the context ends; processes left running as it (by a run
    of an agent that was killed) are killed on entry, the run's own on exit."""
    fd = _slots_fd()
    if isinstance(fd, str):
        raise RuntimeError(f"no uid slots here: {fd}")
    start = secrets.randbelow(UID_SLOTS)
    for i in range(UID_SLOTS):
        uid = UID_BASE + (start + i) % UID_SLOTS
        held = lock_slot(fd, uid)
        if held is not None:
            break
    else:
        raise RuntimeError(f"all {UID_SLOTS} uids for unisolated runs are taken")
    try:
        kill_uid(uid)
        yield uid
    finally:
        kill_uid(uid)
        os.close(held)


def watch() -> None:
    """Start this process's reaper, once (again in a forked child): it removes the leftovers of dead agents,
    then waits for this process to end and removes its own (`_reaper.py`)."""
    global _watcher
    with _watch_lock:
        if _watcher is not None and _watcher[0] == os.getpid():
            return
        slots = os.path.join(tempfile.gettempdir(), "discover-uid-slots") if slots_unavailable() is None else ""
        parents = [folder for _, folder in cgroup_parents()]
        read, write = os.pipe()
        try:
            reaper = subprocess.Popen(
                [sys.executable, "-I", "-S", str(_REAPER), owner_tag(), tempfile.gettempdir(), slots, *parents],
                stdin=read,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,  # a signal to this process's group must not reach it
            )
        finally:
            os.close(read)
        _watcher = (os.getpid(), reaper, write)  # `write` stays open until this process is gone


@contextlib.contextmanager
def frozen(pid: int | None) -> Iterator[None]:
    """Stop every process of the sandboxed run that `pid` belongs to, for the duration.

    Through the run's cgroup where it has a freezer: every task, however started, stops and cannot leave.
    Else SIGSTOP (which no code can catch) to the processes of `pid`'s PID namespace (bubblewrap) or session;
    code escapes that with a nested namespace or a new session, which the namespace filter denies under
    bubblewrap (see `isolation_report`)."""
    cgroup = RunCgroup.holding(pid) if pid is not None else None
    with cgroup.frozen() if cgroup is not None else contextlib.nullcontext(False) as done:
        if done:
            yield
            return
        stopped: set[int] = set()
        try:
            for _ in range(3):  # a process forked while the first pass ran is caught by the next
                fresh = set(_run_pids(pid)) - stopped
                for each in fresh:
                    with contextlib.suppress(OSError):
                        os.kill(each, signal.SIGSTOP)
                stopped |= fresh
                if not fresh:
                    break
            yield
        finally:
            for each in stopped:
                with contextlib.suppress(OSError):
                    os.kill(each, signal.SIGCONT)


def _run_pids(pid: int | None) -> list[int]:
    """The processes of `pid`'s run: those in its PID namespace (bubblewrap), else those in its session."""
    if pid is None:
        return []
    try:
        namespace = os.readlink(f"/proc/{pid}/ns/pid")
        own = namespace != os.readlink("/proc/self/ns/pid")
        session = os.getsid(pid)
    except OSError:
        return []
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            if (os.readlink(f"/proc/{name}/ns/pid") == namespace) if own else os.getsid(int(name)) == session:
                found.append(int(name))
    return found

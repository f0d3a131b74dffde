"""The reaper: removes what sandboxed runs leave on the host once the process that started them is gone.

A run has a cgroup per controller (`discover-OWNER-TOKEN`), a folder (`discover-sandbox-OWNER-X`, a tmpfs
mount where the parent is root) and, without namespaces, processes of its own uid; the parent removes them
after each run, with the functions below. A parent killed with SIGKILL cannot, so `runspace.watch` starts this
script once per process, in a session of its own:

    python -I -S _reaper.py OWNER TMPDIR SLOTS CGROUP_PARENT...

with a pipe on its stdin that the parent never writes. It first removes the leftovers of owners that are dead
(agents killed earlier), then blocks until the pipe's end of file — the parent has exited or was killed — and
removes the parent's own: it kills every task of its cgroups (thawing them: a frozen v1 task does not die),
removes the cgroups, unmounts and deletes its folders, and kills the processes of every unisolated uid (SLOTS,
"" for none) that no live run holds. OWNER is "PID-namespace-inode-pid"; an owner is dead when it is in this
process's PID namespace and no process has its pid (a reused pid keeps its leftovers, never the reverse).
It imports the standard library only: it starts in milliseconds and trusts nothing of the project.
"""

import contextlib
import fcntl
import os
import shutil
import signal
import sys
import time

CGROUP_PREFIX = "discover-"
FOLDER_PREFIX = "discover-sandbox-"
#: Rounds of killing; each kills everything listed, so only a fork bomb needs more than two.
KILL_ROUNDS = 50
MNT_DETACH, UMOUNT_NOFOLLOW = 2, 8
#: Unisolated runs' uids: one per run slot, held by an flock on SLOTS/<uid> for the run's duration.
UID_BASE, UID_SLOTS = 2_000_000_000, 1024


def owner_tag() -> str:
    """This process as an owner of leftovers: its PID namespace and pid (recomputed after a fork)."""
    return f"{os.stat('/proc/self/ns/pid').st_ino}-{os.getpid()}"


def owner_of(name: str, prefix: str) -> str | None:
    """The owner in a leftover's name, or None for a name this protocol did not make."""
    if not name.startswith(prefix):
        return None
    parts = name[len(prefix) :].split("-")
    if len(parts) != 3 or not (parts[0].isdigit() and parts[1].isdigit()):
        return None
    return f"{parts[0]}-{parts[1]}"


def is_dead(owner: str) -> bool:
    namespace, pid = owner.split("-")
    if int(namespace) != os.stat("/proc/self/ns/pid").st_ino:
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except OSError:
        pass
    return False


def read_text(path: str) -> str:
    try:
        with open(path) as fh:
            return fh.read()
    except OSError:
        return ""


def set_frozen(folder: str, frozen: bool) -> bool:
    """Freeze or thaw the tasks of cgroup `folder` (v1 freezer or v2 cgroup.freeze); False if it has neither."""
    for name, value in (("freezer.state", "FROZEN" if frozen else "THAWED"), ("cgroup.freeze", "1" if frozen else "0")):
        path = os.path.join(folder, name)
        if os.path.exists(path):
            with contextlib.suppress(OSError), open(path, "w") as fh:
                fh.write(value)
            return True
    return False


def is_frozen(folder: str) -> bool:
    state = read_text(os.path.join(folder, "freezer.state")).strip()
    return state == "FROZEN" if state else "frozen 1" in read_text(os.path.join(folder, "cgroup.events"))


def kill_tasks(folders: list[str]) -> None:
    """SIGKILL every task of the cgroups `folders` until none is left; frozen ones are thawed after the signal
    is pending, so they die without running another instruction."""
    for round_ in range(KILL_ROUNDS):
        pids = {int(p) for f in folders for p in read_text(os.path.join(f, "cgroup.procs")).split()}
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        if round_ == 0:
            for folder in folders:
                set_frozen(folder, False)
        time.sleep(0.001)


def remove_cgroups(folders: list[str]) -> None:
    for folder in folders:
        for _ in range(200):  # the last tasks leave a moment after they are reaped
            try:
                os.rmdir(folder)
                break
            except FileNotFoundError:
                break
            except OSError:
                time.sleep(0.005)


def remove_folder(path: str) -> None:
    """Unmount the run's tmpfs (if it is one; lazily, so a process still inside cannot keep it) and delete."""
    if os.path.ismount(path):
        import ctypes

        ctypes.CDLL(None, use_errno=True).umount2(os.fsencode(path), MNT_DETACH | UMOUNT_NOFOLLOW)
    shutil.rmtree(path, ignore_errors=True)


def _live_uids() -> dict[int, set[int]]:
    """uid -> pids of the live (not zombie) processes with it as real, effective or saved uid."""
    found: dict[int, set[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        fields = dict(line.split(":", 1) for line in read_text(f"/proc/{name}/status").splitlines() if ":" in line)
        if not fields or fields.get("State", "").split()[:1] == ["Z"]:
            continue
        for uid in {int(u) for u in fields.get("Uid", "").split()[:3]}:
            found.setdefault(uid, set()).add(int(name))
    return found


def kill_uid(uid: int) -> None:
    """SIGKILL every live process running as `uid` until none is left."""
    for _ in range(KILL_ROUNDS):
        pids = _live_uids().get(uid, set()) - {os.getpid()}
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.001)


def lock_slot(slots_fd: int, uid: int) -> int | None:
    """An fd holding slot `uid`'s lock, or None if a live run holds it."""
    fd = os.open(str(uid), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=slots_fd)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def clean(owners, tmpdir: str, slots: str, parents: list[str]) -> None:
    """Remove the cgroups and folders whose owner `owners(owner)` selects, and the processes of free slots."""
    names: dict[str, list[str]] = {}
    for parent in parents:
        for name in _listdir(parent):
            owner = owner_of(name, CGROUP_PREFIX)
            if owner is not None and owners(owner):
                names.setdefault(name, []).append(os.path.join(parent, name))
    for folders in names.values():
        kill_tasks(folders)
        remove_cgroups(folders)
    for name in _listdir(tmpdir):
        owner = owner_of(name, FOLDER_PREFIX)
        if owner is not None and owners(owner):
            remove_folder(os.path.join(tmpdir, name))
    if slots:
        slots_fd = os.open(slots, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        try:
            for uid in sorted(set(_live_uids()) & set(range(UID_BASE, UID_BASE + UID_SLOTS))):
                held = lock_slot(slots_fd, uid)
                if held is not None:
                    kill_uid(uid)
                    os.close(held)
        finally:
            os.close(slots_fd)


def _listdir(folder: str) -> list[str]:
    try:
        return os.listdir(folder)
    except OSError:
        return []


def main(argv: list[str]) -> None:
    owner, tmpdir, slots, *parents = argv
    os.nice(10)  # housekeeping: it must not slow down the runs it starts next to
    clean(lambda o: o != owner and is_dead(o), tmpdir, slots, parents)
    while os.read(0, 4096):  # the parent never writes: this returns b"" once it is gone
        pass
    clean(lambda o: o == owner or is_dead(o), tmpdir, slots, parents)


if __name__ == "__main__":
    main(sys.argv[1:])

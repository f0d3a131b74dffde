"""Per-run cgroups: one memory and task limit for everything a sandboxed run starts, a list of it to kill, and
a switch that stops all of it at once.

rlimits bound each process; a run that forks could still hold several times its memory limit or fork without
bound. A cgroup per run (v1 memory + pids, with cpuacct and freezer where mounted, or one v2 folder), created
below this process's own so its limits still apply, bounds the run as a whole, counts its CPU time and can be
frozen: every task in it stops, however it was started (a nested PID namespace included), and the code cannot
leave it. Each is named after the process that made it (`_reaper.owner_tag`), so the reaper can remove what a
killed agent left. Where no hierarchy is writable, the sandbox falls back to rlimits and says so in its
isolation report.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shlex
import time
from collections.abc import Iterator
from functools import cache
from pathlib import Path

from discover_envs._reaper import (
    CGROUP_PREFIX,
    is_frozen,
    kill_tasks,
    owner_tag,
    read_text,
    remove_cgroups,
    set_frozen,
)

#: v1 controllers a run cgroup needs, and those used where mounted and writable; each with a file to check.
_V1_REQUIRED = {"memory": "memory.limit_in_bytes", "pids": "pids.max"}
_V1_OPTIONAL = {"cpuacct": "cpuacct.usage", "freezer": "freezer.state"}
#: Longest wait for a freeze to take hold; a task still freezing then is asleep in the kernel, not running.
FREEZE_WAIT_S = 0.5


@cache
def cgroup_parents() -> tuple[tuple[str, str], ...]:
    """(kind, folder to create run cgroups in) per controller: v1 memory and pids (cpuacct, freezer where
    possible), or one v2 folder; () if none is writable here. Run cgroups go below this process's own, so its
    limits still apply to them."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return ()
    own = {}
    for line in lines:
        _, controllers, path = line.split(":", 2)
        for controller in controllers.split(",") if controllers else ["unified"]:
            own[controller] = path
    root = Path("/sys/fs/cgroup")
    if "memory" in own and "pids" in own:
        wanted = {**_V1_REQUIRED, **{c: f for c, f in _V1_OPTIONAL.items() if c in own}}
        found: dict[str, tuple[str, tuple[str, ...]]] = {
            c: (str(root / c / own[c].lstrip("/")), (f,)) for c, f in wanted.items()
        }
        kind = "v1"
    elif "unified" in own and (root / "cgroup.controllers").exists():
        found = {"unified": (str(root / own["unified"].lstrip("/")), ("memory.max", "pids.max"))}
        kind = "v2"
    else:
        return ()
    parents = []
    for controller, (folder, files) in found.items():
        if _writable(folder, files):
            parents.append((kind, folder))
        elif controller not in _V1_OPTIONAL:
            return ()
    return tuple(parents)


def _writable(folder: str, files: tuple[str, ...]) -> bool:
    """Whether a cgroup with `files` can be made in `folder` (by making and removing one)."""
    probe = os.path.join(folder, f"discover-probe-{secrets.token_hex(4)}")
    try:
        os.mkdir(probe)
    except OSError:
        return False
    try:
        return all(os.path.exists(os.path.join(probe, name)) for name in files)
    finally:
        with contextlib.suppress(OSError):
            os.rmdir(probe)


def cgroup_kind() -> str | None:
    parents = cgroup_parents()
    return parents[0][0] if parents else None


class RunCgroup:
    """The cgroup(s) of one run: memory and task limits for everything the run starts, a list of it, a freezer."""

    def __init__(self, folders: list[str]) -> None:
        self.folders = folders
        self.kind = cgroup_kind()

    @classmethod
    def create(cls, memory_mb: int, processes: int, token: str) -> RunCgroup:
        folders: list[str] = []
        memory, tasks = str(memory_mb << 20), str(processes)
        for _, parent in cgroup_parents():
            folder = os.path.join(parent, f"{CGROUP_PREFIX}{owner_tag()}-{token}")
            os.mkdir(folder)
            folders.append(folder)
            for name, value in (
                ("memory.limit_in_bytes", memory), ("memory.memsw.limit_in_bytes", memory),
                ("memory.max", memory), ("memory.swap.max", "0"), ("pids.max", tasks),
            ):  # fmt: skip
                path = os.path.join(folder, name)
                if os.path.exists(path):
                    Path(path).write_text(value)
        return cls(folders)

    @classmethod
    def holding(cls, pid: int) -> RunCgroup | None:
        """The run cgroup(s) that process `pid` is in, if this process made them; else None."""
        mine = f"{CGROUP_PREFIX}{owner_tag()}-"
        for line in read_text(f"/proc/{pid}/cgroup").splitlines():
            name = line.rsplit("/", 1)[-1]
            if name.startswith(mine):
                folders = [os.path.join(parent, name) for _, parent in cgroup_parents()]
                return cls([f for f in folders if os.path.isdir(f)])
        return None

    def wrap(self, command: list[str]) -> list[str]:
        """`command` started by a shell that first moves itself into the cgroup(s), so nothing escapes them."""
        moves = " && ".join(f"echo $$ > {shlex.quote(os.path.join(f, 'cgroup.procs'))}" for f in self.folders)
        return ["/bin/sh", "-c", f'{moves} && exec "$@"', "sh", *command]

    def kill_all(self) -> None:
        kill_tasks(self.folders)

    @contextlib.contextmanager
    def frozen(self) -> Iterator[bool]:
        """Stop every task of the run for the duration (the kernel's freezer, which no code can resist or
        escape); yields False, stopping nothing, where this hierarchy has no freezer."""
        freezing = [f for f in self.folders if set_frozen(f, True)]
        try:
            deadline = time.monotonic() + FREEZE_WAIT_S
            while freezing and not all(is_frozen(f) for f in freezing) and time.monotonic() < deadline:
                time.sleep(0.0005)
            yield bool(freezing)
        finally:
            for folder in freezing:
                set_frozen(folder, False)

    def cpu_s(self) -> float | None:
        """CPU seconds of every task the run had, reaped or killed (None without a CPU controller)."""
        for folder in self.folders:
            usage = read_text(os.path.join(folder, "cpuacct.usage")).strip()
            if usage:
                return int(usage) / 1e9
            for line in read_text(os.path.join(folder, "cpu.stat")).splitlines():
                if line.startswith("usage_usec "):
                    return int(line.split()[1]) / 1e6
        return None

    def oom_killed(self) -> bool:
        for folder in self.folders:
            for name in ("memory.oom_control", "memory.events"):
                for line in read_text(os.path.join(folder, name)).splitlines():
                    if line.startswith("oom_kill ") and int(line.split()[1]) > 0:
                        return True
        return False

    def remove(self) -> None:
        remove_cgroups(self.folders)

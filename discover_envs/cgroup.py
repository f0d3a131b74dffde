"""Per-run cgroups: one memory and task limit for everything a sandboxed run starts, and a list of it to kill.

rlimits bound each process; a run that forks could still hold several times its memory limit or fork without
bound. A cgroup per run (v1 memory + pids + cpuacct, or one v2 folder), created below this process's own so its
limits still apply, bounds the run as a whole and counts its CPU time. Where no hierarchy is writable, the
sandbox falls back to rlimits and says so in its isolation report.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shlex
import signal
import time
from functools import cache
from pathlib import Path

#: Rounds of killing a run's tasks; each kills everything listed, so only a fork bomb needs more than two.
KILL_ROUNDS = 50


@cache
def cgroup_parents() -> tuple[tuple[str, str], ...]:
    """(kind, folder to create run cgroups in) per controller: v1 memory and pids, or one v2 folder; () if none
    is writable here. Run cgroups go below this process's own, so its limits still apply to them."""
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
        controllers = ("memory", "pids", "cpuacct") if "cpuacct" in own else ("memory", "pids")
        parents = tuple(("v1", str(root / c / own[c].lstrip("/"))) for c in controllers)
    elif "unified" in own and (root / "cgroup.controllers").exists():
        parents = (("v2", str(root / own["unified"].lstrip("/"))),)
    else:
        return ()
    probe = [(kind, os.path.join(folder, f"discover-probe-{secrets.token_hex(4)}")) for kind, folder in parents]
    try:
        for kind, folder in probe:
            os.mkdir(folder)
            wanted = (
                ("memory.limit_in_bytes", "pids.max", "cpuacct.usage") if kind == "v1" else ("memory.max", "pids.max")
            )
            if not any(os.path.exists(os.path.join(folder, name)) for name in wanted):
                return ()
            if kind == "v2" and not all(os.path.exists(os.path.join(folder, name)) for name in wanted):
                return ()
    except OSError:
        return ()
    finally:
        for _, folder in probe:
            with contextlib.suppress(OSError):
                os.rmdir(folder)
    return parents


def cgroup_kind() -> str | None:
    parents = cgroup_parents()
    return parents[0][0] if parents else None


class RunCgroup:
    """The cgroup(s) of one run: memory and task limits for everything the run starts, and a list of it."""

    def __init__(self, memory_mb: int, processes: int, token: str) -> None:
        self.folders: list[str] = []
        memory, tasks = str(memory_mb << 20), str(processes)
        for _, parent in cgroup_parents():
            folder = os.path.join(parent, f"discover-{token}")
            os.mkdir(folder)
            self.folders.append(folder)
            for name, value in (
                ("memory.limit_in_bytes", memory), ("memory.memsw.limit_in_bytes", memory),
                ("memory.max", memory), ("memory.swap.max", "0"), ("pids.max", tasks),
            ):  # fmt: skip
                path = os.path.join(folder, name)
                if os.path.exists(path):
                    Path(path).write_text(value)
        self.kind = cgroup_kind()

    def wrap(self, command: list[str]) -> list[str]:
        """`command` started by a shell that first moves itself into the cgroup(s), so nothing escapes them."""
        moves = " && ".join(f"echo $$ > {shlex.quote(os.path.join(f, 'cgroup.procs'))}" for f in self.folders)
        return ["/bin/sh", "-c", f'{moves} && exec "$@"', "sh", *command]

    def kill_all(self) -> None:
        for _ in range(KILL_ROUNDS):
            pids = {int(p) for f in self.folders for p in _read_text(os.path.join(f, "cgroup.procs")).split()}
            if not pids:
                return
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.001)

    def cpu_s(self) -> float | None:
        """CPU seconds of every task the run had, reaped or killed (None without a CPU controller)."""
        for folder in self.folders:
            usage = _read_text(os.path.join(folder, "cpuacct.usage")).strip()
            if usage:
                return int(usage) / 1e9
            for line in _read_text(os.path.join(folder, "cpu.stat")).splitlines():
                if line.startswith("usage_usec "):
                    return int(line.split()[1]) / 1e6
        return None

    def oom_killed(self) -> bool:
        for folder in self.folders:
            for name in ("memory.oom_control", "memory.events"):
                for line in _read_text(os.path.join(folder, name)).splitlines():
                    if line.startswith("oom_kill ") and int(line.split()[1]) > 0:
                        return True
        return False

    def remove(self) -> None:
        for folder in self.folders:
            for _ in range(200):  # the last tasks leave a moment after they are reaped
                try:
                    os.rmdir(folder)
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.005)


def _read_text(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""

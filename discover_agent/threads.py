"""Torch's CPU threads, fitted to the cores other processes leave free.

torch's OpenMP workers spin at every barrier until their peers arrive. When another busy process takes a core,
one of two workers is descheduled for whole time slices and every token step waits for it: on 2 cores a TTT
step beside one busy loop took 2x the time of a step with a single thread. Waiting passively instead gives the
second core up on a quiet machine too (a step 1.4x slower). So neither fixed setting is right; `CoreGovernor`
measures. Between token steps and update passes it reads how much CPU time other processes took over the last
half second (`/proc/stat` minus this process and its reaped children) and runs torch on the cores they leave
free: both cores on a quiet machine, one beside a busy neighbour, both again when it stops.

Niced neighbours count like any other: with the scheduler's autogroups (on by default on desktops and here) a
nice-19 process in another session gets a core's fair share all the same, and even without them a niced
compile beside 2 torch threads measured 0.5 of a core left to torch.
A user's explicit thread setting wins: with OMP_NUM_THREADS, MKL_NUM_THREADS or DISCOVER_THREADS in the
environment the governor does nothing (DISCOVER_THREADS=N fixes torch at N threads).
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass

#: Variables by which a user fixes the thread count; any of them turns the governor off.
USER_SETTINGS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "DISCOVER_THREADS")
#: Seconds of CPU accounting a decision is based on (50 clock ticks a core at the usual 100 Hz).
WINDOW_S = 0.5
#: Free cores are rounded up from this fraction: a neighbour using under 0.35 of a core leaves it to torch.
ROUND_UP_FROM = 0.65


@dataclass(frozen=True)
class CpuTimes:
    """Cumulative CPU seconds at one instant: busy time of all cores, and of this process with its reaped
    children (e.g. sandboxed evaluations), at wall time `at`."""

    at: float
    busy: float
    own: float


def read_cpu_times() -> CpuTimes:
    """One reading of /proc/stat (all cores) and /proc/self/stat (this process, children included)."""
    hz = os.sysconf("SC_CLK_TCK")
    with open("/proc/stat", encoding="ascii") as fh:
        fields = [int(x) for x in fh.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    with open("/proc/self/stat", encoding="ascii") as fh:
        own = fh.read().rpartition(")")[2].split()  # the command name may hold spaces
    utime, stime, cutime, cstime = (int(x) for x in own[11:15])
    return CpuTimes(
        at=time.monotonic(),
        busy=(user + nice + system + irq + softirq + steal) / hz,
        own=(utime + stime + cutime + cstime) / hz,
    )


def others_busy(before: CpuTimes, after: CpuTimes) -> float:
    """Cores other processes kept busy between two readings."""
    elapsed = after.at - before.at
    if elapsed <= 0:
        return 0.0
    return max(0.0, ((after.busy - before.busy) - (after.own - before.own)) / elapsed)


def threads_for(free_cores: float, most: int) -> int:
    """Threads for `free_cores` of free CPU: whole cores, rounding up from `ROUND_UP_FROM`, between 1 and
    `most`."""
    return max(1, min(most, math.floor(free_cores + 1 - ROUND_UP_FROM)))


class CoreGovernor:
    """Sets torch's intra-op threads from the cores others leave free; `adapt()` is cheap between decisions."""

    def __init__(self, most: int | None = None, window_s: float = WINDOW_S) -> None:
        self.cores = len(os.sched_getaffinity(0))
        self.most = most or self.cores
        self.window_s = window_s
        self._last = read_cpu_times()
        self.threads = self.most
        #: (seconds since start, threads) of every change, for benchmarks and logs.
        self.changes: list[tuple[float, int]] = []
        self._started = self._last.at

    def adapt(self) -> int:
        """Re-decide once a window has passed since the last reading; returns the thread count in force."""
        if time.monotonic() - self._last.at < self.window_s:
            return self.threads
        now = read_cpu_times()
        want = threads_for(self.cores - others_busy(self._last, now), self.most)
        self._last = now
        if want != self.threads:
            self._set(want, now.at)
        return self.threads

    def _set(self, threads: int, at: float) -> None:
        import torch

        torch.set_num_threads(threads)
        self.threads = threads
        self.changes.append((round(at - self._started, 2), threads))


_governor: CoreGovernor | None = None


def govern() -> CoreGovernor | None:
    """Start governing this process's torch threads (the CLI does it for `run`, `resume`, `bench` and `serve`);
    None where the user fixed the count: DISCOVER_THREADS=N is then applied, OMP_/MKL_NUM_THREADS left to torch.
    Safe to call again (returns the same governor)."""
    global _governor
    fixed = [name for name in USER_SETTINGS if os.environ.get(name)]
    if fixed:
        threads = os.environ.get("DISCOVER_THREADS")
        if threads:
            try:
                count = int(threads)
            except ValueError:
                raise ValueError(f"DISCOVER_THREADS must be a whole number of threads, got {threads!r}") from None
            if count < 1:
                raise ValueError(f"DISCOVER_THREADS must be >= 1, got {count}")
            import torch

            torch.set_num_threads(count)
        return None
    if _governor is None:
        _governor = CoreGovernor()
    return _governor


def stop() -> None:
    """Stop governing (tests, benchmarks); the thread count stays where it is."""
    global _governor
    _governor = None


def adapt() -> None:
    """Called between token steps and update passes: a no-op unless `govern()` was called."""
    if _governor is not None:
        _governor.adapt()

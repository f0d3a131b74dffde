"""The thread governor: torch runs on the cores other processes leave free, and a user's setting wins."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
import torch

from discover_agent import threads
from discover_agent.threads import CoreGovernor, CpuTimes, govern, others_busy, read_cpu_times, threads_for


@pytest.fixture(autouse=True)
def restore_threads(monkeypatch):
    for name in threads.USER_SETTINGS:
        monkeypatch.delenv(name, raising=False)
    saved = torch.get_num_threads()
    yield
    threads.stop()
    torch.set_num_threads(saved)


def test_threads_for_rounds_free_cores_down_unless_nearly_whole():
    assert threads_for(2.0, 2) == 2
    assert threads_for(1.7, 2) == 2  # a neighbour at 0.3 of a core leaves both
    assert threads_for(1.5, 2) == 1
    assert threads_for(1.0, 2) == 1
    assert threads_for(0.2, 2) == 1  # never below one thread
    assert threads_for(8.0, 4) == 4  # never above the most allowed


def test_others_busy_subtracts_this_process_and_its_children():
    before = CpuTimes(at=10.0, busy=100.0, own=40.0)
    after = CpuTimes(at=12.0, busy=103.0, own=41.0)  # 3 busy core-seconds in 2 s, 1 of them ours
    assert others_busy(before, after) == pytest.approx(1.0)
    assert others_busy(after, after) == 0.0


def test_read_cpu_times_counts_this_process_cpu():
    before = read_cpu_times()
    end = time.process_time() + 0.3
    while time.process_time() < end:
        pass
    after = read_cpu_times()
    assert after.own - before.own >= 0.2
    assert after.busy - before.busy >= after.own - before.own - 0.05  # clock ticks round both


def test_governor_follows_the_measured_load(monkeypatch):
    """Readings scripted as: quiet, then a neighbour on one core, then quiet again (2 cores)."""
    readings = iter([
        CpuTimes(0.0, 0.0, 0.0),  # at construction
        CpuTimes(1.0, 2.0, 2.0),  # all busy time is ours
        CpuTimes(2.0, 4.0, 3.0),  # a neighbour took a whole core
        CpuTimes(3.0, 6.0, 4.0),  # still there
        CpuTimes(4.0, 8.0, 6.0),  # gone
    ])  # fmt: skip
    clock = iter([0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0])
    monkeypatch.setattr(threads, "read_cpu_times", lambda: next(readings))
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda _: {0, 1})
    governor = CoreGovernor(window_s=1.0)
    monkeypatch.setattr(threads.time, "monotonic", lambda: next(clock))
    seen = [governor.adapt() for _ in range(8)]
    assert seen == [2, 2, 2, 1, 1, 1, 1, 2]
    assert torch.get_num_threads() == 2
    assert [t for _, t in governor.changes] == [1, 2]


def test_governor_gives_a_core_to_a_busy_neighbour():
    governor = CoreGovernor(window_s=0.3)
    if governor.cores < 2:
        pytest.skip("needs two cores to give one up")
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.6)
        assert governor.adapt() <= governor.cores - 1
        assert torch.get_num_threads() == governor.threads
    finally:
        busy.kill()
        busy.wait()


@pytest.mark.parametrize("name", ["OMP_NUM_THREADS", "MKL_NUM_THREADS"])
def test_a_users_thread_setting_turns_the_governor_off(monkeypatch, name):
    monkeypatch.setenv(name, "1")
    assert govern() is None
    threads.adapt()  # a no-op without a governor


def test_discover_threads_fixes_the_count(monkeypatch):
    monkeypatch.setenv("DISCOVER_THREADS", "1")
    assert govern() is None
    assert torch.get_num_threads() == 1


@pytest.mark.parametrize("value", ["two", "0"])
def test_a_bad_discover_threads_is_a_clear_error(monkeypatch, value):
    monkeypatch.setenv("DISCOVER_THREADS", value)
    with pytest.raises(ValueError, match="DISCOVER_THREADS"):
        govern()


def test_govern_returns_one_governor_per_process():
    assert govern() is govern() is not None

"""Issue 26's red-team findings against the sandbox, each replayed as the attack that worked on b74e6ad.

Code made user, PID and mount namespaces (the enabler of a forged TriMul speed-up); one step filled the disk
with 298,000 files; unisolated runs shared a uid and outlived a killed agent; all of /sys was visible; a local
Ray listened on every interface. (The TriMul freeze and a killed agent's leftovers are tested where their
earlier tests are: test_trimul.py, test_trust.py.) Run as root, these exercise the privilege drop, the mounts
and the uid slots.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import uuid
from pathlib import Path

import pytest
from procs import processes_with

from discover_envs import sandbox
from discover_envs.cgroup import cgroup_parents
from discover_envs.sandbox import SandboxLimits, bwrap_available, run_function, run_program

needs_bwrap = pytest.mark.skipif(not bwrap_available(), reason="bubblewrap cannot run here")
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="mounts, uid slots and the privilege drop need root")
CLONE_NEW = {"user": 0x10000000, "pid": 0x20000000, "mount": 0x20000, "net": 0x40000000, "uts": 0x04000000,
             "ipc": 0x08000000, "cgroup": 0x02000000}  # fmt: skip


def _unisolated(monkeypatch: pytest.MonkeyPatch) -> SandboxLimits:
    """Limits for the opt-in no-namespace mode as uid-dropping root ("unsafe-none"), even where this
    interpreter lives under root's 0700 home: the programs below are /bin/sh, exec'd after the drop."""
    monkeypatch.setattr(sandbox, "_open_to_others", lambda: True)
    return SandboxLimits(isolation="none", unsafe_no_isolation=True, timeout_s=30.0)


# -- namespaces inside the sandbox (medium) ---------------------------------------------------------------------

MAKE_NAMESPACES = f"""
import ctypes, os, subprocess, threading

def run():
    libc = ctypes.CDLL(None, use_errno=True)
    made = [name for name, flag in {CLONE_NEW!r}.items() if libc.unshare(flag) == 0]
    tool = subprocess.run(["unshare", "-U", "-r", "-m", "true"], capture_output=True)
    thread = threading.Thread(target=made.append, args=("thread ran",))
    thread.start()
    thread.join()
    child = subprocess.run(["sh", "-c", "echo child ran"], capture_output=True, text=True).stdout.strip()
    return " ".join(made + [f"unshare exit {{tool.returncode}}", child])
"""


@pytest.mark.parametrize(
    "isolation",
    [pytest.param("bwrap", marks=needs_bwrap), pytest.param("none", marks=needs_root)],
)
def test_no_namespace_can_be_made_in_the_sandbox_yet_threads_and_children_run(isolation):
    limits = SandboxLimits(isolation=isolation, unsafe_no_isolation=isolation == "none", timeout_s=30.0)
    result = run_function(MAKE_NAMESPACES, "run", {}, limits)
    assert result.ok, result.error
    assert result.value == "thread ran unshare exit 1 child ran"


def test_without_a_namespace_filter_runs_still_work_and_the_report_says_so(monkeypatch):
    monkeypatch.setattr(sandbox, "namespace_filter_missing", lambda: "no filter for this machine", raising=False)
    assert sandbox.isolation_report()["new_namespaces"] == "allowed (no filter for this machine)"
    result = run_function("def run():\n    return 7\n", "run", {}, SandboxLimits(timeout_s=30.0))
    assert result.ok and result.value == 7, result.error


# -- the run folder's disk and inodes (medium) ------------------------------------------------------------------

FILL = """
import os

def run(limit, size):
    made, chunk = 0, b"x" * size
    try:
        while made < limit:
            with open(f"f{made}", "wb") as fh:
                fh.write(chunk)
            made += 1
    except OSError:
        pass
    for last in range(max(0, made - 2), made):  # room for the result file
        os.remove(f"f{last}")
    return made
"""


@needs_root
def test_the_run_folder_bounds_its_inodes_by_default():
    result = run_function(FILL, "run", {"limit": 30_000, "size": 0}, SandboxLimits(timeout_s=60.0))
    assert result.ok, result.error
    assert result.value < 10_000  # the default `inodes`


@needs_root
@pytest.mark.parametrize("isolation", [pytest.param("bwrap", marks=needs_bwrap), "none"])
def test_the_run_folder_bounds_its_bytes(isolation):
    limits = SandboxLimits(isolation=isolation, unsafe_no_isolation=isolation == "none", timeout_s=60.0, disk_mb=8)
    result = run_function(FILL, "run", {"limit": 64, "size": 1 << 20}, limits)
    assert result.ok, result.error
    assert result.value <= 8
    assert sandbox.isolation_report(limits)["folder"].startswith("tmpfs of 8 MB and 10000 inodes")


# -- unisolated runs: one uid each, and they die with the agent (medium) ------------------------------------------


@needs_root
def test_concurrent_unisolated_runs_get_their_own_uid_and_cannot_write_into_each_other(monkeypatch):
    limits = _unisolated(monkeypatch)
    shared = tempfile.mkdtemp(prefix="discover-adversarial-")
    os.chmod(shared, 0o777)
    note = os.path.join(shared, "victim")
    victim = f"id -u; pwd > {note}; sleep 3"
    attacker = (
        f"id -u; while [ ! -s {note} ]; do sleep 0.05; done; "
        f'echo forged > "$(cat {note})/result.json" 2>/dev/null && echo wrote || echo denied'
    )
    outcomes: dict[str, sandbox.ProcessResult] = {}

    def start(name: str, script: str) -> None:
        outcomes[name] = run_program(["/bin/sh", "-c", script], limits)

    try:
        threads = [threading.Thread(target=start, args=item) for item in (("victim", victim), ("attacker", attacker))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        Path(note).unlink(missing_ok=True)
        os.rmdir(shared)
    assert outcomes["victim"].mode == outcomes["attacker"].mode == "unsafe-none"
    victim_uid = outcomes["victim"].stdout.split()[0]
    attacker_uid, verdict = outcomes["attacker"].stdout.split()
    assert victim_uid != attacker_uid and "0" not in (victim_uid, attacker_uid)
    assert verdict == b"denied"


def _agent(tmp_path: Path, script: str) -> subprocess.Popen:
    path = tmp_path / "agent.py"
    path.write_text(textwrap.dedent(script))
    return subprocess.Popen([sys.executable, str(path)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _wait(condition, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.05)
    return condition()


def _finish(agent: subprocess.Popen, marker: str) -> str:
    agent.kill()
    output = agent.communicate()[0].decode(errors="replace")
    for pid in processes_with(marker):  # never leave a leak of a failed test behind
        os.kill(pid, 9)
    return output


@needs_root
@pytest.mark.parametrize("through", ["cgroup", "uid"])
def test_an_unisolated_run_dies_with_a_killed_agent(tmp_path, through):
    """The run's session leader dies with the agent (PR_SET_PDEATHSIG); a daemon in a session of its own must
    too, killed by the agent's reaper through the run's cgroup or, where there is none, its uid."""
    if through == "cgroup" and not cgroup_parents():
        pytest.skip("no writable cgroup hierarchy here")
    marker = f"discover-adversarial-orphan-{uuid.uuid4().hex}"
    head, tail = marker[:20], marker[20:]  # only the daemon's command line holds the whole marker
    daemon = f"setsid sh -c 'while :; do sleep 1; done; : {head}''{tail}' & while :; do sleep 1; done"
    agent = _agent(
        tmp_path,
        f"""
        from discover_envs import runspace, sandbox
        sandbox._open_to_others = lambda: True
        if {through == "uid"}:
            sandbox.cgroup_parents = runspace.cgroup_parents = lambda: ()
        limits = sandbox.SandboxLimits(isolation="none", unsafe_no_isolation=True, timeout_s=600.0)
        print(sandbox.run_program(["/bin/sh", "-c", {daemon!r}], limits))
        """,
    )
    try:
        assert _wait(lambda: processes_with(marker), 60), f"the daemon never started: {_finish(agent, marker)}"
        agent.kill()
        agent.wait()
        assert _wait(lambda: not processes_with(marker), 10), "the daemon outlived the agent"
    finally:
        _finish(agent, marker)


# -- leftovers of a killed agent, /sys, Ray (low) ----------------------------------------------------------------


@needs_bwrap
@pytest.mark.skipif(bool(list(Path("/dev").glob("nvidia*"))), reason="with GPUs passed through all of /sys is seen")
def test_sys_shows_the_code_only_the_cpu_layout():
    result = run_function(
        "import os\ndef run():\n    return ' '.join(os.listdir('/sys') + os.listdir('/sys/devices/system'))",
        "run",
        {},
        SandboxLimits(timeout_s=30.0),
    )
    assert result.ok, result.error
    assert set(result.value.split()) <= {"devices", "cpu", "node"} and "cpu" in result.value


def _listening(pids: set[int]) -> list[str]:
    """Local addresses (hex, as /proc/net writes them) of the TCP sockets in LISTEN that `pids` hold."""
    inodes = set()
    for pid in pids:
        with_fds = Path(f"/proc/{pid}/fd")
        for fd in with_fds.glob("*") if with_fds.exists() else []:
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    found = []
    for table in ("tcp", "tcp6"):
        for row in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            fields = row.split()
            if fields[3] == "0A" and fields[9] in inodes:
                found.append(fields[1].split(":")[0])
    return found


def _descendants(root: int) -> set[int]:
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
    found, grown = {root}, True
    while grown:
        fresh = {pid for pid, parent in parents.items() if parent in found} - found
        found |= fresh
        grown = bool(fresh)
    return found


def _loopback(address: str) -> bool:
    """127.0.0.0/8, ::1 or ::ffff:127.x.x.x in /proc/net's little-endian hex."""
    if len(address) == 8:
        return address.endswith("7F")
    return address == "0" * 24 + "01000000" or (address[:24] == "0" * 16 + "FFFF0000" and address.endswith("7F"))


@pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="ray is not installed (pip install discover[ray])")
def test_a_local_ray_listens_on_the_loopback_only():
    import ray

    from discover_agent.executor import make_executor

    if ray.is_initialized():
        ray.shutdown()
    try:
        make_executor("ray", "discover/AC1-v0", {"n": 3}, 1, None)
        addresses = _listening(_descendants(os.getpid()))
    finally:
        ray.shutdown()
    assert addresses, "Ray started no listening socket"
    assert all(_loopback(a) for a in addresses), addresses

"""The trust boundary, attacked as a hostile candidate would: one test per class of attack (issue #10).

Candidate code must not reach the host (read a private file, write a kernel setting, signal the parent, mount,
outlive the run), must not beat the per-run limits or the wall clock, and nothing a reply or its code does
may raise out of `env.step`. Run as root these exercise the privilege drop; as another user, the same
attacks must fail for the sandbox's own reasons.
"""

from __future__ import annotations

import math
import os
import random
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
import zlib
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
from procs import processes_with

import discover_envs
from discover_envs import sandbox
from discover_envs.cgroup import cgroup_parents
from discover_envs.env import MAX_TEXT, DiscoverEnv
from discover_envs.problem import Evaluation, Problem, extract_block
from discover_envs.sandbox import SandboxLimits, bwrap_available, run_function, run_program

needs_bwrap = pytest.mark.skipif(not bwrap_available(), reason="bubblewrap cannot run here")
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="the privilege drop only happens under root")
needs_cgroup = pytest.mark.skipif(not cgroup_parents(), reason="no writable cgroup hierarchy here")


def attack(code: str, **limits) -> sandbox.SandboxResult:
    """Run `code`'s `run()` with the default (auto) isolation, as an agent would."""
    return run_function(textwrap.dedent(code), "run", {}, SandboxLimits(**{"timeout_s": 20.0, **limits}))


def revealed(result: sandbox.SandboxResult) -> str:
    return f"{result.value!r} {result.error} {result.stdout}"


# -- the host ---------------------------------------------------------------------------------------------------


@needs_bwrap
def test_a_private_file_and_the_password_hashes_cannot_be_read():
    secret = f"secret-{uuid.uuid4().hex}"
    planted = Path.home() / f"discover-trust-{uuid.uuid4().hex}"
    planted.write_text(secret)
    planted.chmod(0o600)
    try:
        result = attack(f"def run():\n    return open({str(planted)!r}).read()\n")
        shadow = attack("def run():\n    return len(open('/etc/shadow').read())\n")
    finally:
        planted.unlink()
    assert not result.ok and secret not in revealed(result)
    assert not shadow.ok, shadow.value


@needs_bwrap
def test_no_kernel_setting_under_proc_sys_opens_for_writing():
    result = attack(
        """
        import os
        def run():
            opened = []
            for folder, _, names in os.walk('/proc/sys'):
                for name in names:
                    try:
                        os.close(os.open(os.path.join(folder, name), os.O_WRONLY))
                        opened.append(os.path.join(folder, name))
                    except OSError:
                        pass
            return ' '.join(opened) or 'none'
        """
    )
    assert result.ok, result.error
    assert result.value == "none"


@needs_bwrap
@needs_root
def test_the_code_runs_unprivileged_with_no_capabilities():
    result = attack(
        """
        import os
        def run():
            caps = [line.split()[1] for line in open('/proc/self/status') if line.startswith(('CapEff', 'CapPrm'))]
            return f"{os.getresuid()} {os.getresgid()} {os.getgroups()} {caps}"
        """
    )
    assert result.value == "(65534, 65534, 65534) (65534, 65534, 65534) [] ['0000000000000000', '0000000000000000']"


@needs_bwrap
def test_the_parent_cannot_be_signalled_or_traced_and_nothing_mounts():
    result = run_function(
        textwrap.dedent(
            """
            import ctypes, os, subprocess
            def run(parent):
                done = []
                for sig in (0, 19, 9):
                    try:
                        os.kill(parent, sig)
                        done.append(f'kill {sig}')
                    except OSError:
                        pass
                if ctypes.CDLL(None).ptrace(16, parent, 0, 0) == 0:  # PTRACE_ATTACH
                    done.append('ptrace')
                if subprocess.run(['mount', '-t', 'tmpfs', 'none', os.getcwd()], capture_output=True).returncode == 0:
                    done.append('mount')
                return ' '.join(done) or 'none'
            """
        ),
        "run",
        {"parent": os.getpid()},
        SandboxLimits(timeout_s=20.0),
    )
    assert result.ok, result.error
    assert result.value == "none"


@needs_root
def test_without_isolation_a_root_parent_refuses_to_run_code(monkeypatch):
    monkeypatch.setattr(sandbox, "bwrap_available", lambda: False)
    marker = Path(tempfile.gettempdir(), f"discover-trust-ran-{uuid.uuid4().hex}")
    env = gym.make("discover/AC1-v0")
    env.reset(seed=0)
    code = (
        f"```python\ndef run(construction):\n    open({str(marker)!r}, 'w').write('ran')\n    return construction\n```"
    )
    _, reward, _, _, info = env.step(code)
    assert not marker.exists()
    assert (info["valid"], reward, info["sandbox"]) == (False, 0.0, "refused")
    assert "refusing to run candidate code as root" in info["error"]
    assert "unsafe_no_isolation=True" in info["error"]


def test_the_unsafe_opt_in_lets_a_root_parent_run_code_without_namespaces(monkeypatch):
    monkeypatch.setattr(sandbox, "bwrap_available", lambda: False)
    monkeypatch.setattr(sandbox, "_UNSAFE_OPT_IN", False)
    env = gym.make("discover/AC1-v0", unsafe_no_isolation=True)
    env.reset(seed=0)
    _, _, _, _, info = env.step("```python\ndef run(construction):\n    return construction\n```")
    assert info["valid"], info["error"]
    assert info["sandbox"] == (
        "rlimits" if os.geteuid() else "unsafe-none" if sandbox._open_to_others() else "unsafe-root"
    )


@needs_bwrap
def test_hidden_paths_are_invisible_to_the_code():
    hidden = os.path.join(os.path.dirname(np.__file__), "tests")
    result = attack(f"import os\ndef run():\n    return len(os.listdir({hidden!r}))\n", hide=(hidden,))
    assert result.ok, result.error
    assert result.value == 0 < len(os.listdir(hidden))


def test_a_link_left_in_a_reused_folder_does_not_redirect_the_parents_writes(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("intact")
    work = tempfile.mkdtemp(prefix="discover-trust-")
    try:
        limits = SandboxLimits(timeout_s=20.0, unsafe_no_isolation=True)
        run_program(
            ["/bin/sh", "-c", f"rm -f main.py; ln -s {victim} main.py"], limits, files={"main.py": b"1"}, workdir=work
        )
        run_program(["/bin/true"], limits, files={"main.py": b"overwritten"}, workdir=work)
    finally:
        subprocess.run(["rm", "-rf", work], check=True)
    assert victim.read_text() == "intact"


def test_a_link_left_at_a_reused_folders_path_is_refused_not_chowned(tmp_path, unisolated_as_nobody):
    """As root, the folder is handed to uid 65534 through a descriptor of the folder itself: before, a chown by
    path followed the link the first run's code left in its folder's place (issue #26)."""
    victim = tmp_path / "victim"
    victim.mkdir()
    work = tempfile.mkdtemp(prefix="discover-trust-")
    moved = f"{work}-moved"
    limits = SandboxLimits(timeout_s=20.0, isolation="none", unsafe_no_isolation=True)
    try:
        first = run_program(["/bin/sh", "-c", f'mv "$PWD" {moved} && ln -s {victim} {work}'], limits, workdir=work)
        assert first.returncode == 0, first.stderr
        with pytest.raises(ValueError, match="is a link or not a folder"):
            run_program(["/bin/true"], limits, workdir=work)
    finally:
        subprocess.run(["rm", "-rf", work, moved], check=True)
    assert victim.stat().st_uid == 0


@needs_bwrap
def test_the_run_dies_with_a_killed_agent_and_leaves_no_folder_or_cgroup(tmp_path):
    """kill -9 of the process that started a run takes the run's whole process tree with it, and its reaper
    removes the run's folder and cgroups (issue 26: both were left behind)."""
    marker = f"discover-trust-orphan-{uuid.uuid4().hex}"
    head, tail = marker[:20], marker[20:]  # only the sandboxed sleeper's command line holds the whole marker
    code = (
        "import pathlib, subprocess, sys, time\ndef run():\n"
        f"    pathlib.Path({marker!r}).touch()\n"
        f"    subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(1000)', {head!r} + {tail!r}])\n"
        "    time.sleep(1000)\n"
    )
    agent = tmp_path / "agent.py"
    agent.write_text(
        "from discover_envs.sandbox import SandboxLimits, run_function\n"
        f"print(run_function({code!r}, 'run', {{}}, SandboxLimits(timeout_s=600.0)))\n"
    )
    proc = subprocess.Popen([sys.executable, str(agent)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while not processes_with(marker) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert processes_with(marker), f"the sandboxed sleeper never started: {_output(proc)}"
        folder = next(Path(tempfile.gettempdir()).glob(f"discover-*/{marker}")).parent
        cgroups = _cgroup_folders(processes_with(marker)[0])
        proc.kill()
        proc.wait()
        deadline = time.monotonic() + 10

        def left() -> list:
            return processes_with(marker) + [p for p in [folder, *cgroups] if p.exists()]

        while left() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert left() == []
    finally:
        proc.kill()
        proc.communicate()
        for pid in processes_with(marker):
            os.kill(pid, 9)


def _cgroup_folders(pid: int) -> list[Path]:
    """The run cgroup folders (named discover-...) that process `pid` is in."""
    folders = []
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if Path(path).name.startswith("discover-"):
            folders.append(Path("/sys/fs/cgroup", controllers.split(",")[0], path.lstrip("/")))
    return folders


def _output(proc: subprocess.Popen) -> str:
    proc.kill()
    return proc.communicate()[0].decode(errors="replace")


# -- limits of the whole run -------------------------------------------------------------------------------------


@needs_cgroup
def test_memory_is_bounded_for_the_whole_run_not_per_process():
    result = attack(
        """
        import os, subprocess, sys, time
        HOLD = "import pathlib, sys, time; x = b'1' * (150 << 20); pathlib.Path(sys.argv[1]).touch(); time.sleep(60)"
        def run():
            children = [subprocess.Popen([sys.executable, "-c", HOLD, f"held{i}"]) for i in range(3)]
            while not all(os.path.exists(f"held{i}") for i in range(3)):
                if any(child.poll() is not None for child in children):
                    raise MemoryError("a child died")
                time.sleep(0.01)
            return 1.0
        """,
        memory_mb=300,
    )
    assert not result.ok, "three children held 450 MB under a 300 MB limit"


@needs_cgroup
def test_process_count_is_bounded_for_the_whole_run():
    result = attack(
        """
        import os, time
        def run():
            children = []
            try:
                for _ in range(100):
                    pid = os.fork()
                    if pid == 0:
                        time.sleep(30)
                        os._exit(0)
                    children.append(pid)
            finally:
                for pid in children:
                    os.kill(pid, 9)
            return len(children)
        """,
        processes=64,
    )
    assert not result.ok and "BlockingIOError" in result.error, (result.value, result.error)


@needs_bwrap
def test_private_tmp_is_sized():
    result = attack(
        """
        def run():
            for i in range(5):
                open(f'/tmp/fill{i}', 'wb').write(b'x' * (10 << 20))
            return 1.0
        """,
        file_mb=16,
    )
    assert not result.ok and "No space left on device" in result.error, result.error


def test_a_result_seen_after_the_wall_clock_is_a_timeout(monkeypatch):
    """The parent's own view is what counts: a late look (the parent was stopped or slow) rejects the result."""
    real = sandbox._wait_unreaped

    def late(target, timeout):
        exited = real(target, timeout)
        time.sleep(timeout + 0.2)
        return exited

    monkeypatch.setattr(sandbox, "_wait_unreaped", late)
    result = attack("def run():\n    return 1.0\n", timeout_s=1.0, unsafe_no_isolation=True)
    assert not result.ok
    assert result.error == "timed out after 1 s (wall clock)"


def test_cpu_time_of_the_run_is_measured():
    result = run_program(
        [sys.executable, "-c", "import time\nend = time.process_time() + 0.4\nwhile time.process_time() < end: pass"],
        SandboxLimits(timeout_s=20.0, unsafe_no_isolation=True),
    )
    assert result.returncode == 0, result.stderr
    if result.mode == "bwrap" and not cgroup_parents():
        assert math.isnan(result.cpu_s)  # unknown rather than wrong: bwrap does not reap its namespace's init
    else:
        assert 0.35 <= result.cpu_s <= result.wall_s + 0.5


# -- nothing raises out of env.step ---------------------------------------------------------------------------------


def construction_env() -> DiscoverEnv:
    env = gym.make("discover/AC1-v0", timeout_s=20.0)
    env.reset(seed=0)
    return env


@pytest.mark.parametrize(
    "reply",
    [
        pytest.param("```json\n[" + "9" * 400 + "]\n```", id="400-digit-integer"),
        pytest.param("```json\n[" + "9" * 5000 + "]\n```", id="5000-digit-integer"),
        pytest.param("```json\n" + "[" * 100_000 + "\n```", id="deep-json"),
        pytest.param("```python\ndef run(construction):\n    return '\ud800'\n```", id="lone-surrogate-in-code"),
        pytest.param("\ud800", id="lone-surrogate"),
        pytest.param("x" * (MAX_TEXT + 1), id="too-long"),
    ],
)
def test_hostile_replies_are_invalid_attempts(reply):
    _, reward, terminated, _, info = construction_env().step(reply)
    assert (info["valid"], reward, terminated) == (False, 0.0, True)
    assert info["error"]


@pytest.mark.parametrize(
    ("writes", "message"),
    [
        pytest.param(
            "open('result.json', 'w').write('[' * 200_000 + ']' * 200_000)", "not valid JSON", id="deep-result-json"
        ),
        pytest.param(
            "import numpy as np\n"
            "    header = {'descr': '<f8', 'fortran_order': False, 'shape': (10**12,)}\n"
            "    with open('result.npy', 'wb') as fh:\n"
            "        np.lib.format.write_array_header_1_0(fh, header)\n"
            "        fh.write(b'0' * 64)\n"
            "    open('result.json', 'w').write('{\"ok\": true, \"kind\": \"npy\"}')",
            "does not match the file",
            id="npy-header-of-10^12-items",
        ),
        pytest.param(
            "open('result.json', 'w').write('{\"ok\": true, \"value\": ' + '9' * 5000 + '}')",
            "not valid JSON",
            id="5000-digit-result",
        ),
    ],
)
def test_hostile_result_files_are_invalid_attempts(writes, message):
    code = f"```python\nimport os\ndef run(construction):\n    {writes}\n    os._exit(0)\n```"
    _, _, _, _, info = construction_env().step(code)
    assert info["valid"] is False
    assert message in info["error"]


def test_fence_openers_are_parsed_in_linear_time():
    """2 MB of unclosed fences took about an hour with a regular expression."""
    start = time.perf_counter()
    assert extract_block("```" * 700_000, ("json",)) is None
    assert extract_block("```json x\n" * 200_000 + "```json\n[1]\n", ("json",)) == ("json", "")
    assert time.perf_counter() - start < 1.0


class Exploding(Problem):
    title = "exploding"
    higher_is_better = True

    def statement(self) -> str:
        return "anything"

    def initial_state(self, rng):
        from discover_envs.state import make_state

        return make_state(score=0.0, reward=0.0, construction=[0.0])

    def evaluate(self, reply, state) -> Evaluation:
        return {}["a verifier bug"]

    def rescore(self, state) -> float:
        return 0.0

    def render_state(self, state) -> str:
        return "state"


def test_a_verifier_bug_is_an_invalid_attempt_that_names_the_exception(caplog):
    env = DiscoverEnv(Exploding)
    env.reset(seed=0)
    _, reward, _, _, info = env.step("anything")
    assert (info["valid"], reward) == (False, 0.0)
    assert info["error"] == "the verifier failed on this reply: KeyError: 'a verifier bug'"
    assert "the verifier failed on a reply" in caplog.text


def test_every_step_names_its_sandbox_mode():
    env = construction_env()
    json_reply = env.step("```json\n[1.0]\n```")[4]
    code_reply = env.step("```python\ndef run(construction):\n    raise ValueError('no')\n```")[4]
    assert json_reply["sandbox"] == "none-needed"
    assert code_reply["valid"] is False
    assert code_reply["sandbox"] == sandbox.isolation_report()["mode"]


def test_isolation_report_names_the_mode_and_the_limits():
    report = sandbox.isolation_report()
    assert report["mode"] in ("bwrap", "rlimits", "unsafe-none", "unsafe-root", "refused")
    if report["mode"] == "bwrap":
        assert report["network"] == "none" and "pid" in report["namespaces"]
        assert report["uid"] == (65534 if os.geteuid() == 0 else os.geteuid())


# -- fuzz over every environment ------------------------------------------------------------------------------------

#: Environments slow to build (a data set, a calibration run): fuzzed only in the slow suite.
SLOW_ENVS = {"discover/Denoising-v0", "discover/TriMul-v0"}
ADVERSARIAL = [
    "",
    "\ud800",
    "```" * 30_000,
    "```json\n[" + "9" * 400 + ", 1]\n```",
    "```json\n" + "9" * 5000 + "\n```",
    "```json\n" + "[" * 50_000 + "\n```",
    '```json\n{"a": [1, 2]}\n```',
    "```json\n[NaN, Infinity, -1e999]\n```",
    "```json\n[[1, 2, 3], [4, 5]]\n```",
    "```python\n\udfff\n```",
    "```cpp\n\ud800\n```",
    "```python\nraise SystemExit(3)\n```",
]
PIECES = ["```", "json", "python", "cpp", "py", "\n", " ", "[", "]", "{", "}", ",", "1", "-2.5e3", "1e999",
          "\"x\"", "null", "true", "def run(**k):", "    return", "\ud800", "é", "\x00", "9" * 30]  # fmt: skip


def fuzz_replies(seed: int, count: int) -> list[str]:
    rng = random.Random(seed)
    return ADVERSARIAL + ["".join(rng.choice(PIECES) for _ in range(rng.randint(1, 60))) for _ in range(count)]


@pytest.mark.parametrize(
    "env_id",
    [pytest.param(e, marks=pytest.mark.slow) if e in SLOW_ENVS else e for e in discover_envs.env_ids()],
)
def test_fuzzed_replies_never_raise_and_reward_finitely(env_id):
    env = gym.make(env_id)
    env.reset(seed=0)
    for reply in fuzz_replies(seed=zlib.crc32(env_id.encode()), count=40):
        obs, reward, terminated, truncated, info = env.step(reply)
        assert isinstance(obs, str) and math.isfinite(reward) and (terminated, truncated) == (True, False)
        assert isinstance(info["valid"], bool) and isinstance(info["sandbox"], str)
        assert info["valid"] or info["error"], reply[:80]

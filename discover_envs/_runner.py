"""Child side of the sandbox. Two forms, both started by `sandbox.py` in the run's folder:

    python -I _runner.py LIMITS WORKDIR                 call the candidate's function (`run_function`)
    python -I -S _runner.py LIMITS WORKDIR --exec ARGV  become ARGV in WORKDIR (`run_program`)

It first confines itself, before any untrusted code exists in the process; children inherit all of it.
LIMITS is "address-space bytes,CPU seconds,file bytes,open files,tasks,uid,parent pid,filter": the rlimits
(tasks 0: no RLIMIT_NPROC); then, unless uid is -1 (the parent is root), it gives up root for good (no
supplementary groups, gid and uid set to uid, no capability left, or exit status 126); then, unless parent pid
is 0 (no PID namespace holds the run), it asks the kernel to SIGKILL it when that parent dies (after the uid
change, which would clear the request); then, if filter is 1, it installs a seccomp filter under which no new
namespace can be made (`deny_namespaces`; exit status 126 if it cannot). Doing this here instead of in a
`preexec_fn` lets the parent spawn with vfork and
without running Python between fork and exec, which the subprocess docs call unsafe in a threaded parent.
It imports nothing from the project (and numpy only to call a function), so its start-up costs what
`python -c "import numpy"` costs. Values go back as `result.npy` or JSON in `result.json`.
"""

import json
import os
import resource
import signal
import struct
import sys

PR_SET_PDEATHSIG = 1
PR_SET_SECCOMP = 22
PR_SET_NO_NEW_PRIVS = 38
#: Per machine: (AUDIT_ARCH, clone, unshare, setns, clone3, first number of another ABI sharing the arch or 0).
NAMESPACE_SYSCALLS = {
    "x86_64": (0xC000003E, 56, 272, 308, 435, 0x40000000),  # x32 calls carry bit 30
    "aarch64": (0xC00000B7, 220, 97, 268, 435, 0),
}
#: CLONE_NEW{NS,CGROUP,UTS,IPC,USER,PID,NET}; unshare also takes CLONE_NEWTIME (0x80, a signal number in clone).
NEW_NAMESPACES = 0x7E020000
CLONE_NEWTIME = 0x80


def confine(spec: str) -> None:
    memory, cpu, fsize, nofile, nproc, uid, parent, deny = (int(x) for x in spec.split(","))
    set_limits(memory, cpu, fsize, nofile, nproc)
    if parent or deny:
        import ctypes  # before the drop: the interpreter's library may be closed to the new uid

        libc = ctypes.CDLL(None, use_errno=True)
    if uid != -1:
        drop_privileges(uid)
    if parent:
        die_with(parent, libc)
    if deny:
        deny_namespaces(libc)


def set_limits(memory: int, cpu: int, fsize: int, nofile: int, nproc: int) -> None:
    limits = [
        (resource.RLIMIT_AS, memory, memory),
        # SIGXCPU at the soft limit (reported by name), SIGKILL one second later if it is caught.
        (resource.RLIMIT_CPU, cpu, cpu + 1),
        (resource.RLIMIT_FSIZE, fsize, fsize),
        (resource.RLIMIT_NOFILE, nofile, nofile),
        (resource.RLIMIT_CORE, 0, 0),
    ]
    if nproc:
        limits.append((resource.RLIMIT_NPROC, nproc, nproc))
    for which, soft, hard in limits:
        ceiling = resource.getrlimit(which)[1]
        if ceiling != resource.RLIM_INFINITY:
            soft, hard = min(soft, ceiling), min(hard, ceiling)
        resource.setrlimit(which, (soft, hard))


def drop_privileges(uid: int) -> None:
    """Become `uid` (and gid `uid`) with no groups and no capabilities, or exit 126 before any code runs."""
    try:
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)
        with open("/proc/self/status") as fh:
            caps = {k: v.strip() for k, _, v in (line.partition(":") for line in fh) if k in ("CapEff", "CapPrm")}
        if os.getresuid() != (uid, uid, uid) or os.getresgid() != (uid, uid, uid) or os.getgroups():
            raise OSError(f"ids are {os.getresuid()}/{os.getresgid()}/{os.getgroups()}")
        if any(int(v, 16) for v in caps.values()) or len(caps) != 2:
            raise OSError(f"capabilities left: {caps}")
    except OSError as exc:
        sys.stderr.write(f"sandbox: cannot drop privileges to uid {uid}: {exc}\n")
        os._exit(126)


def die_with(parent: int, libc) -> None:
    """PR_SET_PDEATHSIG(SIGKILL); exit at once if `parent` is already gone (the request would never fire)."""
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        sys.stderr.write("sandbox: prctl(PR_SET_PDEATHSIG) failed\n")
        os._exit(126)
    if os.getppid() != parent:
        os._exit(126)


def namespace_filter(machine: str) -> bytes:
    """Classic BPF for seccomp: unshare, clone and setns that would make or enter a namespace fail with EPERM;
    clone3 (whose flags a filter cannot read) fails with ENOSYS, so libc falls back to clone; a call through
    another ABI (i386 or x32 on x86_64), which would dodge the numbers below, kills the process."""
    arch, clone, unshare, setns, clone3, other_abi = NAMESPACE_SYSCALLS[machine]
    load, jeq, jge, jset, ret = 0x20, 0x15, 0x35, 0x45, 0x06
    allow, kill, errno = 0x7FFF0000, 0x80000000, 0x00050000
    eperm, enosys = errno | 1, errno | 38
    program = [(load, 0, 0, 4), (jeq, 1, 0, arch), (ret, 0, 0, kill), (load, 0, 0, 0)]  # arch, then number
    if other_abi:
        program += [(jge, 0, 1, other_abi), (ret, 0, 0, kill)]
    program += [
        (jeq, 0, 1, clone3), (ret, 0, 0, enosys),
        (jeq, 0, 1, setns), (ret, 0, 0, eperm),
        (jeq, 2, 0, unshare), (jeq, 3, 0, clone), (ret, 0, 0, allow),
        (load, 0, 0, 16), (jset, 3, 2, NEW_NAMESPACES | CLONE_NEWTIME),  # unshare's flags (low word of arg 0)
        (load, 0, 0, 16), (jset, 1, 0, NEW_NAMESPACES),  # clone's flags
        (ret, 0, 0, allow), (ret, 0, 0, eperm),
    ]  # fmt: skip
    return b"".join(struct.pack("<HBBI", *op) for op in program)


def deny_namespaces(libc) -> None:
    """Install `namespace_filter` for this process and all it starts (no_new_privs first, as seccomp needs);
    exit 126 if the kernel refuses, as the parent promised the filter."""
    import ctypes

    program = namespace_filter(os.uname().machine)
    buffer = ctypes.create_string_buffer(program, len(program))

    class Program(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    fprog = Program(len(program) // 8, ctypes.addressof(buffer))
    zero = ctypes.c_ulong(0)
    if (
        libc.prctl(PR_SET_NO_NEW_PRIVS, ctypes.c_ulong(1), zero, zero, zero) != 0
        or libc.prctl(PR_SET_SECCOMP, ctypes.c_ulong(2), ctypes.byref(fprog), zero, zero) != 0
    ):
        sys.stderr.write(f"sandbox: cannot install the namespace filter: {os.strerror(ctypes.get_errno())}\n")
        os._exit(126)


def _write(work: str, status: dict) -> None:
    """Write via a fresh name and rename, so a `result.json` link planted by the code is replaced, not followed."""
    tmp = os.path.join(work, ".result.json.tmp")
    with open(tmp, "x") as fh:
        json.dump(status, fh)
    os.replace(tmp, os.path.join(work, "result.json"))


def _error(exc: BaseException, memory_mb: int) -> str:
    """One line naming the exception and the innermost line of the code it passed through.

    Walks the traceback by hand (no `traceback` import, which would cost ~5% of a trivial run's start-up) and
    clears the code's frames, whose locals may hold the memory that ran out."""
    message, line = (exc.msg, exc.lineno) if isinstance(exc, SyntaxError) else (str(exc), None)
    tb = exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == "candidate.py":
            line = tb.tb_lineno
            tb.tb_frame.clear()
        tb = tb.tb_next
    text = type(exc).__name__ + (f": {message}" if message else "")
    if line:
        text += f" at line {line} of the code"
    if isinstance(exc, MemoryError):
        text += f" (memory limit {memory_mb} MB)"
    return text


def call(work: str, memory_mb: int) -> None:
    import numpy as np

    with open(os.path.join(work, "call.json")) as fh:
        request = json.load(fh)
    entry_name = request["entry"]
    kwargs = dict(request["kwargs"])
    for name in request["arrays"]:
        kwargs[name] = np.load(os.path.join(work, f"in_{name}.npy"), allow_pickle=False)
    namespace = {"__name__": "candidate"}
    try:
        with open(os.path.join(work, "candidate.py")) as fh:
            source = fh.read()
        exec(compile(source, "candidate.py", "exec"), namespace)
    except BaseException as exc:
        _write(work, {"ok": False, "error": f"the code failed to load: {_error(exc, memory_mb)}"})
        return
    entry = namespace.get(entry_name)
    if not callable(entry):
        _write(work, {"ok": False, "error": f"the code does not define a function `{entry_name}`"})
        return
    try:
        value = entry(**kwargs)
    except BaseException as exc:
        _write(work, {"ok": False, "error": f"`{entry_name}` raised {_error(exc, memory_mb)}"})
        return
    if isinstance(value, (bool, int, float, str)) or value is None:
        _write(work, {"ok": True, "kind": "json", "value": value})
        return
    try:
        array = np.asarray(value)
    except Exception as exc:
        _write(work, {"ok": False, "error": f"the return value is not array-like: {_error(exc, memory_mb)}"})
        return
    if array.dtype.kind not in "biuf":
        kind = type(value).__name__
        _write(work, {"ok": False, "error": f"`{entry_name}` returned {kind} of dtype {array.dtype}, not numbers"})
        return
    try:
        np.save(os.path.join(work, "result.npy"), array, allow_pickle=False)
    except OSError as exc:
        _write(work, {"ok": False, "error": f"the returned array could not be saved ({array.nbytes} bytes): {exc}"})
        return
    _write(work, {"ok": True, "kind": "npy"})


def main(argv: list[str]) -> None:
    confine(argv[0])
    # Only now: a root bwrap without CAP_DAC_OVERRIDE cannot enter a folder that belongs to the dropped uid.
    os.chdir(argv[1])
    if argv[2:3] == ["--exec"]:
        # Python ignores these two; exec keeps ignored signals, and the program must get the usual defaults.
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
        signal.signal(signal.SIGXFSZ, signal.SIG_DFL)
        try:
            os.execvp(argv[3], argv[3:])
        except OSError as exc:
            sys.stderr.write(f"sandbox: cannot run {argv[3]!r}: {exc.strerror}\n")
            sys.exit(127)
    call(argv[1], int(argv[0].split(",")[0]) >> 20)


if __name__ == "__main__":
    main(sys.argv[1:])

"""TriMul's clock: the sandboxed worker process that runs a kernel on fresh inputs, and the parent's side of it.

Timing is held by the (trusted) parent. The candidate runs in a sandboxed worker process that serves calls
over a Unix socket in its run folder: the parent draws a seed from OS randomness, sends it, and timestamps the
reply, which must carry the whole output; the inputs exist nowhere before the seed is sent, so nothing can be
computed ahead, and nothing in the worker's memory is worth reading or forging. The worker's program is built
from this module's own functions (`worker_source`: GPUMode's reference, its input generation and the serving
loop); `Worker` is the parent's end, `check_output` compares outputs in bounded chunks.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib
import inspect
import json
import math
import os
import signal
import socket
import struct
import sys
import threading
import time
import traceback
from functools import cache
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from discover_envs import runspace
from discover_envs.sandbox import ProcessResult, frozen, run_program

#: The worker's socket, in its run folder (the only host folder it can write).
SOCKET_NAME = "clock.sock"
WORKER_FILE = "trimul_worker.py"
#: Longest JSON header of a worker message (errors included); longer is a protocol violation.
MAX_HEADER_BYTES = 1 << 16
#: A worker's own wall clock runs this much past the evaluation's, so the parent's deadline speaks first.
WORKER_GRACE_S = 5.0
#: Output elements compared at a time: GPUMode's largest test shape has 805M, which compared at once in float64
#: would take tens of GB in the parent.
CHECK_CHUNK = 1 << 24

#: The `task` module a GPUMode submission imports (`from task import input_t, output_t`).
TASK_MODULE = '''\
"""Types of GPUMode's TriMul task: data = (input, mask, weights, config) -> output."""
from typing import Dict, Tuple, TypeVar

import torch

input_t = TypeVar("input_t", bound=Tuple[torch.Tensor, torch.Tensor, Dict[str, torch.Tensor], Dict])
output_t = TypeVar("output_t", bound=torch.Tensor)
'''


def reference_trimul(data):
    """GPUMode's reference: outgoing triangle multiplicative update (AlphaFold 2, Algorithm 11) in plain torch.

    data = (input, mask, weights, config): input (bs, seqlen, seqlen, dim) float32, mask (bs, seqlen, seqlen)
    of 0/1 (integer when masked, float ones otherwise), weights keyed as GPUMode's nn.Module state dict,
    config {"dim", "hidden_dim"}. Returns to_out(LayerNorm(sum_k left[i, k] * right[j, k]) * sigmoid(out_gate)).
    """
    x, mask, w, config = data
    x = F.layer_norm(x, (config["dim"],), w["norm.weight"], w["norm.bias"])
    m = mask.unsqueeze(-1)
    left = F.linear(x, w["left_proj.weight"]) * m * torch.sigmoid(F.linear(x, w["left_gate.weight"]))
    right = F.linear(x, w["right_proj.weight"]) * m * torch.sigmoid(F.linear(x, w["right_gate.weight"]))
    out = torch.einsum("... i k d, ... j k d -> ... i j d", left, right)
    out = F.layer_norm(out, (config["hidden_dim"],), w["to_out_norm.weight"], w["to_out_norm.bias"])
    out = out * torch.sigmoid(F.linear(x, w["out_gate.weight"]))
    return F.linear(out, w["to_out.weight"])


def make_inputs(spec, seed, device):
    """GPUMode's inputs for one shape from `seed`: normal or Cauchy(0, 2) input, integer mask (or ones),
    LayerNorm parameters ~ N(0, 1), projections ~ N(0, 1) / sqrt(hidden), to_out ~ N(0, 1) / sqrt(dim)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    bs, n, dim, hidden = spec["bs"], spec["seqlen"], spec["dim"], spec["hidden_dim"]

    def normal(*shape):
        return torch.randn(*shape, generator=gen, device=device)

    if spec["distribution"] == "cauchy":
        u = torch.empty(bs, n, n, dim, device=device).uniform_(0.0, 1.0, generator=gen)
        x = 2.0 * torch.tan(math.pi * (u - 0.5))
    else:
        x = normal(bs, n, n, dim)
    if spec["nomask"]:
        mask = torch.ones(bs, n, n, device=device)
    else:
        mask = torch.randint(0, 2, (bs, n, n), generator=gen, device=device)
    weights = {"norm.weight": normal(dim), "norm.bias": normal(dim)}
    for name in ("left_proj", "right_proj", "left_gate", "right_gate", "out_gate"):
        weights[f"{name}.weight"] = normal(hidden, dim) / math.sqrt(hidden)
    weights.update({"to_out_norm.weight": normal(hidden), "to_out_norm.bias": normal(hidden)})
    weights["to_out.weight"] = normal(dim, hidden) / math.sqrt(dim)
    return x, mask, weights, {"dim": dim, "hidden_dim": hidden}


def describe_error(exc):
    """The exception and the line of the candidate's code it came from."""
    frames = traceback.extract_tb(exc.__traceback__)
    where = next((f.lineno for f in reversed(frames) if f.filename.endswith("submission.py")), None)
    return f"{type(exc).__name__}: {exc}" + (f" (line {where} of the code)" if where else "")


def serve(device, shapes, visible_devices):
    """Sandbox side: load `submission.py`, say ready, then for each request draw the inputs from its seed, call
    `custom_kernel` and send back its whole output. Messages are 8 bytes (header and payload lengths), a JSON
    header, the payload. Nothing here is secret: the clock and the checks are in the parent."""
    if visible_devices is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = visible_devices
    channel = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    channel.connect("clock.sock")

    def send(header, payload=b""):
        text = json.dumps(header).encode()
        channel.sendall(struct.pack("<II", len(text), len(payload)) + text)
        if payload:
            channel.sendall(payload)

    def receive():
        data = b""
        while len(data) < 8 or len(data) < 8 + struct.unpack("<II", data[:8])[0]:
            chunk = channel.recv(1 << 16)
            if not chunk:
                return None
            data += chunk
        return json.loads(data[8:])

    try:
        kernel = getattr(importlib.import_module("submission"), "custom_kernel", None)
    except BaseException as exc:
        return send({"error": f"the code failed to load: {describe_error(exc)}"})
    if not callable(kernel):
        return send({"error": "the code does not define a function `custom_kernel`"})
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    send({"ready": True})
    while (request := receive()) is not None:
        data = make_inputs(shapes[request["shape"]], request["seed"], device)
        try:
            out = kernel(data)
            sync()
        except BaseException as exc:
            return send({"error": f"custom_kernel raised {describe_error(exc)}"})
        if not isinstance(out, torch.Tensor):
            return send({"error": f"custom_kernel returned {type(out).__name__}, not a torch.Tensor"})
        if not out.is_floating_point() or out.device.type != device:
            return send(
                {"error": f"custom_kernel returned a {out.dtype} tensor on {out.device}; want float on {device}"}
            )
        array = out.detach().to(device="cpu", dtype=torch.float32).contiguous().numpy()
        send({"shape": list(array.shape)}, array.data.cast("B"))


_WORKER_IMPORTS = """\
import importlib
import json
import math
import os
import socket
import struct
import sys
import traceback

import torch
"""


@cache
def worker_source() -> str:
    """The sandbox program: the functions above, as written here, and a call of `serve`."""
    functions = (make_inputs, describe_error, serve)
    main = "\n\nif __name__ == '__main__':\n    serve(**json.loads(sys.argv[1]))\n"
    return "\n\n".join([_WORKER_IMPORTS, *(inspect.getsource(f) for f in functions)]) + main


#: The start state: the reference itself, as a candidate would write it.


def check_output(out: np.ndarray, expected: np.ndarray, atol: float, rtol: float) -> tuple[str | None, float]:
    """(why `out` is wrong or None, largest |out - expected|); wrong means |out - ref| > atol + rtol*|ref|.
    Compared CHECK_CHUNK elements at a time, so the parent's memory stays bounded whatever the shape."""
    flat_out, flat_expected = out.reshape(-1), expected.reshape(-1)
    worst, most, where = 0.0, 0.0, None
    for start in range(0, flat_out.size, CHECK_CHUNK):
        chunk = flat_out[start : start + CHECK_CHUNK]
        finite = np.isfinite(chunk)
        if not finite.all():
            index = tuple(int(i) for i in np.unravel_index(start + int(np.argmin(finite)), out.shape))
            return f"custom_kernel returned a non-finite value at index {index}", math.inf
        reference = flat_expected[start : start + CHECK_CHUNK]
        diff = np.abs(chunk.astype(np.float64) - reference)
        worst = max(worst, float(diff.max()))
        excess = diff - (atol + rtol * np.abs(reference))
        k = int(excess.argmax())
        if excess[k] > most:
            most, where = float(excess[k]), start + k
    if where is not None:
        at = tuple(int(i) for i in np.unravel_index(where, out.shape))
        return (
            f"max |out - ref| = {worst:.4g}; at index {at} out = {float(out[at]):.6g}, ref = "
            f"{float(expected[at]):.6g}, beyond atol + rtol*|ref| (atol = {atol:g}, rtol = {rtol:g})"
        ), worst
    return None, worst


class WorkerFailed(Exception):
    """A worker broke the protocol, raised, exited or ran out of time; the message says which."""


class Worker:
    """One sandboxed process serving `custom_kernel` calls; this side holds the clock.

    The process runs `run_program` in a thread; it connects to a socket this side made in its run folder. A
    call sends a seed and times until the last byte of the output is in; on CPU it also reads the process's
    CPU clock (the kernel's accounting, which the code cannot write) to see whether it used more than a core.
    """

    def __init__(self, code: str, config: dict[str, Any], limits: Any, *, is_reference: bool = False) -> None:
        self.is_reference = is_reference
        self.work = runspace.make_folder(limits.disk_mb, limits.inodes)
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(os.path.join(self.work, SOCKET_NAME))
        os.chmod(os.path.join(self.work, SOCKET_NAME), 0o666)  # the worker runs as an unprivileged uid
        self.listener.listen(1)
        self.conn: socket.socket | None = None
        self.pid: int | None = None
        self.outcome: ProcessResult | BaseException | None = None
        files = {
            "task.py": TASK_MODULE.encode(),
            "submission.py": code.encode(errors="replace"),
            WORKER_FILE: worker_source().encode(),
        }
        argv = [sys.executable, "-s", WORKER_FILE, json.dumps(config)]
        # In this context's copy, so that the sandbox mode lands in the caller's `recorded_modes()`.
        context = contextvars.copy_context()
        self.thread = threading.Thread(target=context.run, args=(self._run, argv, limits, files), daemon=True)
        self.thread.start()

    def _run(self, argv: list[str], limits: Any, files: dict[str, bytes]) -> None:
        try:
            self.outcome = run_program(argv, limits, files=files, workdir=self.work)
        except BaseException as exc:  # re-raised in the caller's thread by `failure`
            self.outcome = exc

    def connect(self, deadline: float) -> None:
        """Wait for the worker to connect and say it loaded the code."""
        self.listener.settimeout(0.2)
        while self.conn is None:
            try:
                self.conn, _ = self.listener.accept()
            except TimeoutError:
                if not self.thread.is_alive() or time.monotonic() > deadline:
                    raise self.failure(deadline) from None
        self.listener.close()
        with contextlib.suppress(OSError):
            self.pid = struct.unpack("3i", self.conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[0]
        header, _ = self._receive(deadline, 0)
        if header.get("ready") is not True:
            raise WorkerFailed(f"the worker sent {str(header)[:200]} instead of saying it is ready")

    def call(self, index: int, seed: int, shape: tuple[int, ...], deadline: float) -> tuple[np.ndarray, float, float]:
        """(output, wall seconds, CPU seconds or nan) of one call on fresh inputs drawn from `seed`."""
        request = json.dumps({"shape": index, "seed": seed}).encode()
        assert self.conn is not None, "call() before the worker connected"
        cpu = self._cpu_s()
        start = time.perf_counter()
        self.conn.sendall(struct.pack("<II", len(request), 0) + request)
        header, payload = self._receive(deadline, 4 * math.prod(shape))
        wall = time.perf_counter() - start
        cpu = self._cpu_s() - cpu
        if header.get("shape") != list(shape):
            raise WorkerFailed(f"custom_kernel returned shape {str(header.get('shape'))[:100]}, expected {list(shape)}")
        return np.frombuffer(payload, dtype=np.float32).reshape(shape), wall, cpu

    def _cpu_s(self) -> float:
        """CPU seconds of the worker process so far (all its threads), from the kernel; nan if unreadable."""
        if self.pid is None:
            return math.nan
        try:
            return time.clock_gettime((~self.pid << 3) | 2)  # CPUCLOCK_SCHED of process `pid` (Linux)
        except OSError:
            return math.nan

    def _receive(self, deadline: float, payload_bytes: int) -> tuple[dict[str, Any], bytes]:
        """One message: an error header raises; otherwise the payload must be exactly `payload_bytes`."""
        sizes = self._read(8, deadline)
        header_len, payload_len = struct.unpack("<II", sizes)
        if header_len > MAX_HEADER_BYTES:
            raise WorkerFailed(f"the worker sent a {header_len}-byte header (the limit is {MAX_HEADER_BYTES})")
        try:
            header = json.loads(self._read(header_len, deadline))
        except (ValueError, RecursionError):
            raise WorkerFailed("the worker sent a header that is not JSON") from None
        if not isinstance(header, dict):
            raise WorkerFailed("the worker sent a header that is not a JSON object")
        if "error" in header:
            raise WorkerFailed(str(header["error"])[:4000])
        if payload_len != payload_bytes:
            raise WorkerFailed(f"the worker sent {payload_len} bytes of output, expected {payload_bytes}")
        return header, self._read(payload_len, deadline)

    def _read(self, size: int, deadline: float) -> bytes:
        buffer = bytearray(size)
        view, got = memoryview(buffer), 0
        assert self.conn is not None, "a read before the worker connected"
        while got < size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise self.failure(deadline)
            self.conn.settimeout(remaining)
            try:
                n = self.conn.recv_into(view[got:])
            except TimeoutError:
                raise self.failure(deadline) from None
            except OSError as exc:
                raise WorkerFailed(f"the connection to the worker failed: {exc}") from None
            if n == 0:
                raise self.failure(deadline)
            got += n
        return bytes(buffer)

    def failure(self, deadline: float) -> WorkerFailed:
        """Why the worker stopped answering: its deadline, or how its process ended (with its stderr)."""
        if time.monotonic() > deadline:
            return WorkerFailed("timed out")
        self.thread.join(max(0.0, deadline - time.monotonic()) + WORKER_GRACE_S)
        outcome = self.outcome
        if isinstance(outcome, BaseException):
            raise outcome
        if outcome is None:
            return WorkerFailed("timed out")
        stderr = outcome.stderr[-2000:].decode(errors="replace").strip()
        ended = f"the code's process ended before answering ({outcome.status})"
        return WorkerFailed(ended + (f": {stderr}" if stderr else ""))

    def frozen(self) -> contextlib.AbstractContextManager[None]:
        """Every process of this worker's sandbox stopped for the duration (its cgroup's freezer where there is
        one), so nothing it left running competes with the other worker's timed calls."""
        return frozen(self.pid)

    def close(self) -> None:
        """Hang up, give the worker a moment to exit, then kill it; remove its folder once it is gone."""
        for closing in (self.conn, self.listener):
            if closing is not None:
                closing.close()
        self.thread.join(1.0)
        if self.thread.is_alive() and self.pid is not None:
            with contextlib.suppress(OSError):
                os.kill(self.pid, signal.SIGKILL)
        self.thread.join()
        runspace.remove_folder(self.work)

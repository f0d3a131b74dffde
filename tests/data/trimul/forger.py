"""A hostile TriMul candidate: it hunts the harness's secrets and channels in its own process (calling frames,
every object the garbage collector knows, module globals) and writes a timing report of 0.001 us through
each one it finds, then computes the right answer so that nothing else gives it away."""

import contextlib
import gc
import json
import os
import socket
import sys

import torch
import torch.nn.functional as F

FAKE_TIME_US = 0.001
#: Also write the fake report into every socket found (the test flips it to check the quiet variant too).
FORGE_SOCKETS = True
_done = []


def _reference(data):
    x, mask, w, _ = data
    x = F.layer_norm(x, (x.shape[-1],), w["norm.weight"], w["norm.bias"])
    m = mask.unsqueeze(-1)
    left = F.linear(x, w["left_proj.weight"]) * m * torch.sigmoid(F.linear(x, w["left_gate.weight"]))
    right = F.linear(x, w["right_proj.weight"]) * m * torch.sigmoid(F.linear(x, w["right_gate.weight"]))
    out = torch.einsum("... i k d, ... j k d -> ... i j d", left, right)
    out = F.layer_norm(out, (out.shape[-1],), w["to_out_norm.weight"], w["to_out_norm.bias"])
    out = out * torch.sigmoid(F.linear(x, w["out_gate.weight"]))
    return F.linear(out, w["to_out.weight"])


def _secrets():
    """Every value named like a per-run secret in the calling frames, the gc heap and loaded modules."""
    found = {}
    frame = sys._getframe(1)
    while frame is not None:
        found.update({k: v for k, v in frame.f_locals.items() if k in ("nonce", "seed", "shapes")})
        frame = frame.f_back
    for obj in gc.get_objects():
        if isinstance(obj, dict) and "nonce" in obj and isinstance(obj.get("nonce"), str):
            found.setdefault("nonce", obj["nonce"])
    for module in list(sys.modules.values()):
        namespace = getattr(module, "__dict__", {})
        if isinstance(namespace.get("nonce"), str):
            found.setdefault("nonce", namespace["nonce"])
    return found


def _forge():
    found = _secrets()
    shapes = found.get("shapes") or [None] * 3
    entry = {"candidate_us": FAKE_TIME_US, "reference_us": 1000.0, "max_error": 0.0}
    report = json.dumps({"nonce": found.get("nonce", "unknown"), "shapes": [entry] * len(shapes)})
    with open("result.json", "w") as fh:
        json.dump({"ok": True, "kind": "json", "value": report}, fh)
    for obj in gc.get_objects() if FORGE_SOCKETS else ():
        if isinstance(obj, socket.socket):
            with contextlib.suppress(OSError):
                obj.sendall(report.encode())
    if "nonce" in found:  # a report the harness will not overwrite
        os._exit(0)


def custom_kernel(data):
    if not _done:
        _done.append(True)
        _forge()
    return _reference(data)

"""Child side of `sandbox.run_function`; runs as `python -I _runner.py WORKDIR` inside the sandbox.

Imports nothing from this project (so start-up stays as cheap as `python -c "import numpy"`), defines the
candidate's code, calls its entry point and writes the value as `result.npy` or JSON in `result.json`.
"""

import json
import sys
import traceback
from pathlib import Path

import numpy as np


def _write(work: Path, status: dict) -> None:
    (work / "result.json").write_text(json.dumps(status))


def _error(exc: BaseException) -> str:
    frames = traceback.extract_tb(exc.__traceback__)
    where = next((f"line {f.lineno}" for f in reversed(frames) if f.filename == "candidate.py"), None)
    return f"{type(exc).__name__}: {exc}" + (f" ({where} of the code)" if where else "")


def main(work: Path) -> None:
    call = json.loads((work / "call.json").read_text())
    kwargs = dict(call["kwargs"])
    for name in call["arrays"]:
        kwargs[name] = np.load(work / f"in_{name}.npy", allow_pickle=False)
    namespace = {"__name__": "candidate"}
    try:
        exec(compile((work / "candidate.py").read_text(), "candidate.py", "exec"), namespace)
    except BaseException as exc:
        _write(work, {"ok": False, "error": f"the code failed to load: {_error(exc)}"})
        return
    entry = namespace.get(call["entry"])
    if not callable(entry):
        _write(work, {"ok": False, "error": f"the code does not define a function `{call['entry']}`"})
        return
    try:
        value = entry(**kwargs)
    except BaseException as exc:
        _write(work, {"ok": False, "error": f"`{call['entry']}` raised {_error(exc)}"})
        return
    if isinstance(value, (bool, int, float, str)) or value is None:
        _write(work, {"ok": True, "kind": "json", "value": value})
        return
    try:
        array = np.asarray(value)
    except Exception as exc:
        _write(work, {"ok": False, "error": f"the return value is not array-like: {_error(exc)}"})
        return
    if array.dtype.kind not in "biuf":
        kind = type(value).__name__
        _write(work, {"ok": False, "error": f"`{call['entry']}` returned {kind} of dtype {array.dtype}, not numbers"})
        return
    np.save(work / "result.npy", array, allow_pickle=False)
    _write(work, {"ok": True, "kind": "npy"})


if __name__ == "__main__":
    main(Path(sys.argv[1]))

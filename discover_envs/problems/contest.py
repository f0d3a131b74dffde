"""What the AtCoder Heuristic Contest tasks share: a program action is compiled once, run once per test case in
the sandbox under the contest harness's time rule, and its output is judged exactly in the parent.

Test cases come from seeds (the task's generator) or from a folder of official input files (`cases_dir`), so
scores on the contest's public inputs are comparable case by case with the contest's. A subclass supplies the
case format (`generate_input`, `parse_input`) and the judge (`judge` for a fresh output, `rejudge` for the
stored result of one, which is how restart states are re-checked without rerunning any program).

Every case runs in a fresh folder of its own, as the contest runs cases independently: nothing a run leaves
there (files, links) reaches the next case or this process. The case folders live in a root-owned folder the
code cannot write, so the code cannot move its folder away and leave a link in its place for this process to
follow.
"""

from __future__ import annotations

import copy
import math
import os
import re
import shutil
import sys
from abc import abstractmethod
from dataclasses import dataclass
from functools import cache, lru_cache
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from discover_envs import runspace
from discover_envs.problem import Evaluation, InvalidSolution, InvalidState, Problem, extract_block
from discover_envs.sandbox import ProcessResult, SandboxLimits, _open_regular, run_program
from discover_envs.state import make_state

LANGUAGES = {"python": "python", "py": "python", "cpp": "cpp", "c++": "cpp"}
MAX_CASES = 10_000
#: Largest official input file read from `cases_dir`; the contests' inputs are at most a few hundred kB.
MAX_INPUT_BYTES = 16 << 20
#: Largest compiled C++ program, held in memory and copied into every case's folder (contest programs: < 5 MB).
MAX_PROGRAM_BYTES = 64 << 20


@dataclass(frozen=True)
class TimeRule:
    """The harness's rule: a case times out when the program uses more than `cpu_s` seconds of CPU time, or
    more than `cpu_s + wall_tolerance_s` of wall clock. What the sandbox itself spends before the program runs
    (bubblewrap, the launcher that sets the limits), measured once per process on a no-op program, is taken off
    both figures: it is not the candidate's time. A Python interpreter's start-up is, as in the contest.

    Where the sandbox cannot measure CPU time (bubblewrap without a writable cgroup: `cpu_s` is NaN), the
    "wall" rule applies instead: at most `cpu_s` seconds of wall clock, no tolerance. It bounds a program on
    one core as the CPU rule does, but not one that computes on several cores at once; `basis` names the rule
    a run was judged by, and the task reports it per case (`case_time_rule`)."""

    cpu_s: float = 2.0
    wall_tolerance_s: float = 0.5

    def __post_init__(self) -> None:
        if not 0 < self.cpu_s < 3600:
            raise ValueError(f"timeout_s (CPU seconds per case) must be in (0, 3600), got {self.cpu_s!r}")
        if not 0 <= self.wall_tolerance_s < 3600:
            raise ValueError(f"wall_tolerance_s must be in [0, 3600), got {self.wall_tolerance_s!r}")

    def limits(self, memory_mb: int, output_mb: int) -> SandboxLimits:
        """Sandbox limits whose wall clock kills a run as soon as the rule can no longer be met."""
        wall = self.cpu_s + self.wall_tolerance_s + _start_overhead()[0]
        return SandboxLimits(timeout_s=wall, memory_mb=memory_mb, file_mb=output_mb)

    @staticmethod
    def basis(proc: ProcessResult) -> str:
        """The rule a run is judged by: "cpu" (its CPU time was measured) or "wall" (unknown here)."""
        return "wall" if math.isnan(proc.cpu_s) else "cpu"

    def verdict(self, proc: ProcessResult) -> str | None:
        """The time-out message for a run, or None when it kept to the rule."""
        wall0, cpu0 = _start_overhead()
        wall = max(0.0, proc.wall_s - wall0)
        if self.basis(proc) == "wall":
            if proc.timed_out or wall > self.cpu_s:
                return (
                    f"timed out: {wall:.2f} s of wall clock > {self.cpu_s:g} s allowed (CPU time cannot be "
                    "measured here, so the wall clock alone counts)"
                )
            return None
        cpu = max(0.0, proc.cpu_s - (0.0 if math.isnan(cpu0) else cpu0))
        if proc.timed_out or wall > self.cpu_s + self.wall_tolerance_s:
            return f"timed out: {wall:.2f} s of wall clock > {self.cpu_s:g} + {self.wall_tolerance_s:g} s allowed"
        if cpu > self.cpu_s:
            return f"timed out: {cpu:.2f} s of CPU time > {self.cpu_s:g} s allowed"
        return None


@cache
def _start_overhead() -> tuple[float, float]:
    """(wall, CPU) seconds of the sandbox running a program that does nothing: the least of three runs."""
    true = shutil.which("true") or "/bin/true"
    runs = [run_program([true], SandboxLimits(timeout_s=30.0, memory_mb=256)) for _ in range(3)]
    return min(r.wall_s for r in runs), min(r.cpu_s for r in runs)


def read_cases_dir(folder: str | Path, n_cases: int | None) -> list[tuple[str, bytes]]:
    """(file name, content) of the first `n_cases` `*.txt` files of `folder` sorted by name (all when None)."""
    path = Path(folder)
    if not path.is_dir():
        raise ValueError(f"cases_dir {str(folder)!r} is not a folder")
    files = sorted(p for p in path.glob("*.txt") if p.is_file())
    if not files:
        raise ValueError(f"cases_dir {str(folder)!r} holds no *.txt input files")
    if n_cases is not None and len(files) < n_cases:
        raise ValueError(f"n_cases={n_cases} but cases_dir {str(folder)!r} holds only {len(files)} *.txt files")
    chosen = files[: n_cases or len(files)]
    too_big = [p.name for p in chosen if p.stat().st_size > MAX_INPUT_BYTES]
    if too_big:
        raise ValueError(f"input file {too_big[0]!r} is larger than {MAX_INPUT_BYTES >> 20} MB")
    return [(p.name, p.read_bytes()) for p in chosen]


#: Unicode White_Space, what the official testers (Rust: `char::is_whitespace`, `split_whitespace`, `trim`)
#: separate tokens on: ASCII tab to carriage return and space, and these beyond ASCII (U+00A0 among them).
#: Not Python's `str.split()`, which also splits on U+001C..U+001F.
_WIDE_SPACE = "\x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
_WHITESPACE = re.compile(f"[\t-\r {_WIDE_SPACE}]+")
_WIDE_WHITESPACE = re.compile(f"[{_WIDE_SPACE}]+")
_INTEGER = re.compile(r"[+-]?[0-9]+")


def read_text(stdout: bytes) -> str:
    """A program's output as the official testers read it: UTF-8 text, else a wrong answer (`InvalidSolution`)."""
    try:
        return stdout.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidSolution(
            f"the output is not UTF-8 text (byte {stdout[exc.start]:#04x} at offset {exc.start}); the official "
            "tester rejects it"
        ) from None


def split_whitespace(text: str) -> list[str]:
    """The tokens of `text` separated by Unicode whitespace, as Rust's `split_whitespace` gives them."""
    return [token for token in _WHITESPACE.split(text) if token]


def ascii_spaces(stdout: bytes) -> bytes:
    """`stdout` with every non-ASCII whitespace character replaced by an ASCII space, for byte-level parsers;
    raise `InvalidSolution` unless it is UTF-8. ASCII output is returned as it is."""
    if stdout.isascii():
        return stdout
    return _WIDE_WHITESPACE.sub(" ", read_text(stdout)).encode("utf-8")


def read_int(token: str) -> int | None:
    """`token` as a 64-bit integer as Rust's `str::parse::<i64>` reads it (an optional sign and ASCII digits:
    "-01" is -1, "+7" is 7), or None when it is not one."""
    if not _INTEGER.fullmatch(token):
        return None
    digits = token.lstrip("+-").lstrip("0") or "0"  # int() refuses over 4300 digits, leading zeros included
    if len(digits) > 19:
        return None
    value = -int(digits) if token[0] == "-" else int(digits)
    return value if -(2**63) <= value < 2**63 else None


class ContestProblem(Problem):
    """A heuristic-contest task: the reply is a Python or C++ program, run on every test case; see a subclass's
    docstring for its rules. Construction of a state: {"language", "cases", `output_key`}, the judged output of
    each case (None where the case failed); its code is the program."""

    higher_is_better: ClassVar[bool] = True
    kl_coef: ClassVar[float] = 0.01  # the paper's lambda for algorithm engineering
    failure_reward: ClassVar[float] = -1.0
    #: Construction key of the per-case judged outputs, e.g. "polygons".
    output_key: ClassVar[str]
    #: Cap on a case's stdout; parsing holds at most a small multiple of it in memory.
    output_mb: ClassVar[int]
    #: The start program (Python), trusted code.
    baseline: ClassVar[str]
    #: Shown after the start state's mean score, e.g. "best possible per case: 5001".
    score_note: ClassVar[str] = ""

    def __init__(
        self,
        *,
        n_cases: int | None = None,
        first_seed: int = 0,
        cases_dir: str | Path | None = None,
        timeout_s: float = 2.0,
        wall_tolerance_s: float = 0.5,
        memory_mb: int = 1024,
        compile_timeout_s: float = 60.0,
    ) -> None:
        super().__init__(timeout_s=timeout_s, memory_mb=memory_mb)
        if n_cases is not None and not 1 <= n_cases <= MAX_CASES:
            raise ValueError(f"n_cases must be in 1..{MAX_CASES}, got {n_cases!r}")
        if first_seed < 0:
            raise ValueError(f"first_seed must be >= 0, got {first_seed!r}")
        if not compile_timeout_s > 0:
            raise ValueError(f"compile_timeout_s must be positive, got {compile_timeout_s!r}")
        self.rule = TimeRule(float(timeout_s), float(wall_tolerance_s))
        self.memory_mb = int(memory_mb)
        self.compile_limits = SandboxLimits(
            timeout_s=float(compile_timeout_s), memory_mb=max(2048, int(memory_mb)), file_mb=256
        )
        self._files: list[tuple[str, bytes, Any]] | None = None
        if cases_dir is None:
            self.cases: list[int | str] = list(range(first_seed, first_seed + (n_cases or 10)))
        else:
            if first_seed:
                raise ValueError("first_seed applies to generated cases; leave it at 0 with cases_dir")
            self._files = [
                (name, data, self._parse_file(name, data)) for name, data in read_cases_dir(cases_dir, n_cases)
            ]
            self.cases = [name for name, _, _ in self._files]
        self._start: dict[str, Any] | None = None

    # --- what a task supplies ---

    @classmethod
    @abstractmethod
    def generate_input(cls, seed: int) -> bytes:
        """Test case `seed` in the official input format."""

    @classmethod
    @abstractmethod
    def parse_input(cls, data: bytes) -> Any:
        """An official input file as the judge's data; raise `ValueError` naming what is malformed."""

    @abstractmethod
    def judge(self, stdout: bytes, case: Any) -> tuple[Any, int]:
        """(JSON-able result to store, case score) of a program's output; raise `InvalidSolution`."""

    @abstractmethod
    def rejudge(self, stored: Any, case: Any) -> int:
        """The case score of a stored result, checked as strictly as `judge`; raise `InvalidSolution`."""

    # --- cases ---

    def _parse_file(self, name: str, data: bytes) -> Any:
        try:
            return self.parse_input(data)
        except ValueError as exc:
            raise ValueError(f"input file {name!r} is not in the official format: {exc}") from None

    def case(self, k: int) -> tuple[bytes, Any]:
        """(input bytes, judge's data) of the k-th test case."""
        if self._files is not None:
            return self._files[k][1], self._files[k][2]
        return _generated(type(self), int(self.cases[k]))

    def label(self, k: int) -> str:
        return f"seed {self.cases[k]}" if self._files is None else str(self.cases[k])

    def time_rule_text(self) -> str:
        return (
            f"Your program is run on {len(self.cases)} test cases, each with a limit of {self.rule.cpu_s:g} s of CPU "
            f"time\n(and {self.rule.cpu_s + self.rule.wall_tolerance_s:g} s of wall clock; a Python interpreter's "
            "start-up counts); the reward is\nthe mean case score. A case that crashes, runs out of time or "
            "breaks the output rules scores 0.\n\n"
            "## How to answer\n"
            "Write one complete program in a ```python block (run as `python main.py`, numpy available) or a\n"
            "```cpp block (C++20, compiled with g++ -O2). The last such block counts."
        )

    # --- Problem API ---

    def initial_state(self, rng: np.random.Generator) -> dict[str, Any]:
        """The start program's state; it does not depend on `rng`, so it is computed once and reused. Being our
        own code it runs without the time rule, so a busy machine cannot change the start."""
        if self._start is None:
            relaxed = TimeRule(max(60.0, self.rule.cpu_s), self.rule.wall_tolerance_s)
            result = self._score_program("python", self.baseline, relaxed)
            self._start = make_state(
                score=result.score, reward=result.reward, construction=result.construction, code=result.code
            )
        return copy.deepcopy(self._start)

    def evaluate(self, reply: str, state: dict[str, Any]) -> Evaluation:
        block = extract_block(reply, tuple(LANGUAGES))
        if block is None:
            raise InvalidSolution("the reply has no fenced ```python or ```cpp block")
        tag, code = block
        return self._score_program(LANGUAGES[tag], code, self.rule)

    def _score_program(self, language: str, code: str, rule: TimeRule) -> Evaluation:
        outputs, scores, errors, walls, cpus, bases = [], [], [], [], [], []
        limits = rule.limits(self.memory_mb, self.output_mb)
        # Root-owned, searchable but not writable by the code's uid: the case folders inside stay put. A sized
        # tmpfs where possible (`runspace.make_folder`), so the cases' disk and inode use is bounded.
        parent = runspace.make_folder(limits.disk_mb, limits.inodes)
        os.chmod(parent, 0o711)
        try:
            argv, files = self._prepare(language, code, parent)
            for k in range(len(self.cases)):
                data, case = self.case(k)
                work = _case_folder(parent, k, files)
                try:
                    proc = run_program(argv, limits, stdin=data, workdir=work)
                finally:
                    shutil.rmtree(work, ignore_errors=True)
                capped = len(proc.stdout) >= self.output_mb << 20
                error = rule.verdict(proc) or (f"the output reached the {self.output_mb} MB cap" if capped else None)
                stored, score, error = None, 0, error or _failure(proc)
                if error is None:
                    try:
                        stored, score = self.judge(proc.stdout, case)
                    except InvalidSolution as exc:
                        error = str(exc)
                outputs.append(stored)
                scores.append(score)
                errors.append(None if error is None else f"{self.label(k)}: {error}")
                walls.append(round(proc.wall_s, 3))
                cpus.append(None if math.isnan(proc.cpu_s) else round(proc.cpu_s, 3))
                bases.append(rule.basis(proc))
        finally:
            runspace.remove_folder(parent)
        if all(e is not None for e in errors):
            raise InvalidSolution(f"the program failed on every test case; first error: {errors[0]}")
        mean = float(np.mean(scores))
        construction = {"language": language, "cases": list(self.cases), self.output_key: outputs}
        details = {
            "case_scores": scores, "case_errors": errors, "case_wall_s": walls, "case_cpu_s": cpus,
            "case_time_rule": bases,
        }  # fmt: skip
        return Evaluation(score=mean, reward=self.reward(mean), construction=construction, code=code, details=details)

    def _prepare(self, language: str, code: str, parent: str) -> tuple[list[str], dict[str, tuple[bytes, int]]]:
        """(argv, {file name: (content, mode)} to put in every case's folder); C++ is compiled once, here, in a
        folder of its own, and only the compiled program's bytes are kept."""
        if language == "python":
            return [sys.executable, "-I", "main.py"], {"main.py": (code.encode(errors="replace"), 0o644)}
        if shutil.which("g++") is None:
            raise InvalidSolution("C++ answers need g++, which is not installed on this machine; answer in Python")
        build = os.path.join(parent, "build")
        os.mkdir(build, 0o700)
        try:
            argv = ["g++", "-std=gnu++20", "-O2", "-o", "main", "main.cpp"]
            files = {"main.cpp": code.encode(errors="replace")}
            proc = run_program(argv, self.compile_limits, files=files, workdir=build)
            if proc.timed_out:
                raise InvalidSolution(f"compilation timed out after {self.compile_limits.timeout_s:g} s")
            if proc.returncode != 0:
                stderr = proc.stderr[-2000:].decode(errors="replace").strip()
                raise InvalidSolution(f"the C++ code does not compile (exit status {proc.returncode}): {stderr}")
            binary = _open_regular(Path(build, "main"), MAX_PROGRAM_BYTES)
            if binary is None:
                raise InvalidSolution(f"the compiled program is missing or larger than {MAX_PROGRAM_BYTES >> 20} MB")
            with binary:
                return ["./main"], {"main": (binary.read(), 0o755)}
        finally:
            shutil.rmtree(build, ignore_errors=True)

    def rescore(self, state: dict[str, Any]) -> float:
        construction = state.get("construction")
        keys = {"language", "cases", self.output_key}
        if not isinstance(construction, dict) or set(construction) != keys:
            raise InvalidState(f"state construction must be a dict with keys {sorted(keys)}")
        if construction["cases"] != self.cases:
            raise InvalidState(
                f"state was scored on cases {_span(construction['cases'])}, this env uses {_span(self.cases)}"
            )
        outputs = construction[self.output_key]
        if not isinstance(outputs, list) or len(outputs) != len(self.cases):
            raise InvalidState(f"state must hold one result (or null) per case, {len(self.cases)} in all")
        if all(o is None for o in outputs):
            raise InvalidState("state has no result at all; a valid attempt has at least one")
        scores = []
        for k, stored in enumerate(outputs):
            try:
                scores.append(0 if stored is None else self.rejudge(stored, self.case(k)[1]))
            except InvalidSolution as exc:
                raise InvalidState(f"state result for {self.label(k)} is invalid: {exc}") from None
        return float(np.mean(scores))

    def draw(self, state: dict[str, Any], fig: Any) -> None:
        """The score of every test case, re-judged from the state's stored outputs (failed cases red, 0)."""
        construction = state.get("construction") or {}
        outputs = construction.get(self.output_key)
        if construction.get("cases") != self.cases or not isinstance(outputs, list):
            super().draw(state, fig)  # scored on other cases: only the card
            return
        scores, failed = [], []
        for k, stored in enumerate(outputs):
            try:
                scores.append(0 if stored is None else self.rejudge(stored, self.case(k)[1]))
                failed.append(stored is None)
            except InvalidSolution:
                scores.append(0)
                failed.append(True)
        ax = fig.add_subplot()
        labels = [self.label(k) for k in range(len(self.cases))]
        ax.bar(range(len(scores)), scores, color=["C3" if f else "C0" for f in failed])
        ax.axhline(float(np.mean(scores)), color="black", linestyle="--", label=f"mean {np.mean(scores):.6g}")
        bad = [k for k, f in enumerate(failed) if f]
        ax.plot(bad, [0] * len(bad), "X", color="C3", markersize=12, clip_on=False)  # a 0 bar is invisible
        ax.set_xticks(range(len(scores)), labels, rotation=90 if len(scores) > 10 else 0, fontsize=7)
        ax.set(ylabel="case score")
        ax.set_title(f"{self.title}: score per test case (red: failed)", fontsize=10)
        ax.legend()

    def render_state(self, state: dict[str, Any]) -> str:
        construction = state["construction"]
        failed = sum(o is None for o in construction[self.output_key])
        note = f" ({self.score_note})" if self.score_note else ""
        parts = [
            f"## Start state\nMean score over {len(construction['cases'])} test cases: {state['score']:.2f}{note}"
            + (f"; {failed} case(s) failed and scored 0" if failed else "")
        ]
        if state.get("code"):
            parts.append(f"Program that produced it:\n```{construction['language']}\n{state['code'].rstrip()}\n```")
        return "\n\n".join(parts)


@lru_cache(maxsize=256)
def _generated(problem: type[ContestProblem], seed: int) -> tuple[bytes, Any]:
    data = problem.generate_input(seed)
    return data, problem.parse_input(data)


def _case_folder(parent: str, k: int, files: dict[str, tuple[bytes, int]]) -> str:
    """A fresh folder for case `k` holding the program's files, owned by this process (the code may read or
    run them, not change them); `run_program` hands the folder itself to the code's uid."""
    folder = os.path.join(parent, f"case-{k}")
    os.mkdir(folder, 0o700)
    for name, (data, mode) in files.items():
        fd = os.open(os.path.join(folder, name), os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
        with os.fdopen(fd, "wb") as fh:
            os.fchmod(fh.fileno(), mode)  # not narrowed by this process's umask
            fh.write(data)
    return folder


def _failure(proc: ProcessResult) -> str | None:
    if proc.returncode == 0:
        return None
    stderr = proc.stderr[-600:].decode(errors="replace").strip()
    why = proc.status or f"exit status {proc.returncode}"
    return f"the program failed: {why}" + (f": {stderr}" if stderr else "")


def _span(cases: Any) -> str:
    if isinstance(cases, list) and cases and all(type(c) in (int, str) for c in cases):
        return f"{cases[0]}..{cases[-1]} ({len(cases)})"
    return repr(cases)[:40]

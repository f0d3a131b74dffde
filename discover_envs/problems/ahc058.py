"""AtCoder Heuristic Contest 058, "apple machines": grow apples over T turns by strengthening a tower of machines.

The generator, the output reader and the exact simulation live here together because they share the
contest's constants. Counts and apples outgrow 64 bits within a few hundred turns, so the simulation uses
Python integers; it touches only machines with power, so 500 turns take milliseconds (see the benchmark).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from discover_envs.problem import InvalidSolution
from discover_envs.problems.contest import ContestProblem, read_int, read_text, split_whitespace

N_IDS, LEVELS, TURNS, START_APPLES = 10, 4, 500, 1
#: Generation (statement): A_0 = 1, A_j = round(10^u) for j > 0, sorted ascending; C_{0,0} = 1, otherwise
#: C_{i,j} = round(A_j * 500^i * 10^u); every u uniform in [0, 2].
LEVEL_FACTOR = 500
SPREAD_DECADES = 2.0
#: Output cap per case: 500 short lines plus room for comments.
OUTPUT_MB = 1
_INT = re.compile(rb"[+-]?[0-9]{1,18}")


@dataclass(frozen=True)
class Case:
    """One test case: N ids, L levels, T turns, K apples at the start, capacities A_j and costs C[i][j]."""

    n: int
    levels: int
    turns: int
    apples: int
    capacity: tuple[int, ...]
    cost: tuple[tuple[int, ...], ...]


def generate_case(seed: int) -> Case:
    """Test case `seed`, drawn as the statement says (numpy's RNG, not the contest's)."""
    rng = np.random.default_rng(seed)
    capacity = sorted([1] + [_round_half_up(10 ** rng.uniform(0, SPREAD_DECADES)) for _ in range(N_IDS - 1)])
    cost = [
        [
            1 if i == j == 0 else _round_half_up(a * LEVEL_FACTOR**i * 10 ** rng.uniform(0, SPREAD_DECADES))
            for j, a in enumerate(capacity)
        ]
        for i in range(LEVELS)
    ]
    return Case(N_IDS, LEVELS, TURNS, START_APPLES, tuple(capacity), tuple(map(tuple, cost)))


def _round_half_up(x: float) -> int:
    return math.floor(x + 0.5)


def format_case(case: Case) -> bytes:
    """A case in the official input format: "N L T K", the N capacities, then L lines of N costs."""
    lines = [f"{case.n} {case.levels} {case.turns} {case.apples}", " ".join(map(str, case.capacity))]
    lines += [" ".join(map(str, row)) for row in case.cost]
    return ("\n".join(lines) + "\n").encode()


def read_case(data: bytes) -> Case:
    """An official input file as a `Case`; raise `ValueError` naming what is malformed."""
    tokens = data.split()
    if not all(_INT.fullmatch(t) for t in tokens):
        raise ValueError("the input holds something other than integers of at most 18 digits")
    numbers = [int(t) for t in tokens]
    if len(numbers) < 4:
        raise ValueError("the first line must be 'N L T K'")
    n, levels, turns, apples = numbers[:4]
    if not (1 <= n <= 100 and 1 <= levels <= 10 and 1 <= turns <= 10_000 and apples >= 0):
        raise ValueError(f"N L T K = {n} {levels} {turns} {apples} are out of range")
    if len(numbers) != 4 + n + levels * n:
        raise ValueError(f"expected {n} capacities and {levels} x {n} costs after 'N L T K'")
    body = numbers[4:]
    if min(body) < 1:
        raise ValueError("capacities and costs must be positive")
    cost = tuple(tuple(body[n + i * n : n + (i + 1) * n]) for i in range(levels))
    return Case(n, levels, turns, apples, tuple(body[:n]), cost)


def parse_actions(data: bytes, case: Case) -> list[tuple[int, int] | None]:
    """The T actions of an output, read as the official tester reads them (the rules are in `AppleMachines`'s
    docstring): None for "do nothing". Raise `InvalidSolution` with the turn and the reason."""
    actions: list[tuple[int, int] | None] = []
    for line in read_text(data).split("\n"):
        if len(actions) == case.turns:
            break  # the tester reads T actions; whatever follows is ignored
        tokens = split_whitespace(line)
        if not tokens or tokens[0].startswith("#"):
            continue
        turn = len(actions)
        read = [read_int(t) for t in tokens]
        values = [v for v in read if v is not None]
        if len(values) != len(read):
            raise InvalidSolution(f"turn {turn}: {_show(line)} is neither 'i j' nor '-1'")
        if values == [-1]:
            actions.append(None)
            continue
        if len(values) != 2:
            raise InvalidSolution(f"turn {turn}: {_show(line)} is neither 'i j' nor '-1'")
        i, j = values
        if not 0 <= i < case.levels:
            raise InvalidSolution(f"turn {turn}: level {i} does not exist (levels are 0..{case.levels - 1})")
        if not 0 <= j < case.n:
            raise InvalidSolution(f"turn {turn}: machine id {j} does not exist (ids are 0..{case.n - 1})")
        actions.append((i, j))
    if len(actions) < case.turns:
        raise InvalidSolution(f"the output has {len(actions)} actions; T = {case.turns} are needed, one per turn")
    return actions


def _show(line: str) -> str:
    line = line.strip()
    return repr(line[:40]) + ("..." if len(line) > 40 else "")


def simulate(case: Case, actions: list[tuple[int, int] | None]) -> int:
    """Apples after the T turns, exactly. Each turn: the action (strengthening (i, j) costs C[i][j] * (P + 1)
    apples and adds 1 to its power P), then levels 0..L-1 in order: a level-0 machine adds A_j * B * P apples,
    a machine of level i >= 1 adds B * P to the count B of machine (i - 1, j). Raise `InvalidSolution` on an
    unaffordable strengthening, naming the turn."""
    count = [[1] * case.n for _ in range(case.levels)]
    power = [[0] * case.n for _ in range(case.levels)]
    active: list[tuple[int, int]] = []  # machines with power, sorted by level: the only ones that produce
    apples = case.apples
    for turn, action in enumerate(actions):
        if action is not None:
            i, j = action
            price = case.cost[i][j] * (power[i][j] + 1)
            if price > apples:
                raise InvalidSolution(
                    f"turn {turn}: strengthening machine (level {i}, id {j}) costs {price} apples, "
                    f"only {apples} are available"
                )
            apples -= price
            if power[i][j] == 0:
                active.append((i, j))
                active.sort()
            power[i][j] += 1
        for i, j in active:
            if i == 0:
                apples += case.capacity[j] * count[0][j] * power[0][j]
            else:
                count[i - 1][j] += count[i][j] * power[i][j]
    return apples


def case_score(apples: int) -> int:
    """round(1e5 * log2(S)), rounding halves up as the tester does; 0 when no apple is left."""
    return _round_half_up(1e5 * math.log2(apples)) if apples > 0 else 0


#: Start program: each turn, the machine whose next strengthening returns the most apples per apple spent by
#: the end of the game, estimated as the output it adds carried down the levels over the remaining turns; bought
#: when affordable, else the best affordable one, else nothing.
BASELINE = """\
import sys


def main():
    data = list(map(int, sys.stdin.read().split()))
    n, levels, turns, apples = data[:4]
    a = data[4 : 4 + n]
    cost = [data[4 + n + i * n : 4 + n + (i + 1) * n] for i in range(levels)]
    count = [[1] * n for _ in range(levels)]
    power = [[0] * n for _ in range(levels)]
    out = []
    for t in range(turns):
        left = turns - t
        best = affordable = None
        best_ratio = affordable_ratio = 1.0
        for i in range(levels):
            for j in range(n):
                # one more power on (i, j) adds count[i][j] a turn to level i - 1, ... down to apples:
                # about a_j * count * (powers below) * left^(i+1) / (i+1)! apples by the end
                gain = a[j] * count[i][j]
                for k in range(i):
                    gain *= power[k][j]
                for s in range(1, i + 2):
                    gain = gain * max(left - s + 1, 0) // s
                price = cost[i][j] * (power[i][j] + 1)
                ratio = gain / price
                if ratio > best_ratio:
                    best, best_ratio = (i, j, price), ratio
                if price <= apples and ratio > affordable_ratio:
                    affordable, affordable_ratio = (i, j, price), ratio
        if best is not None and best[2] > apples:
            best = affordable
        if best is None:
            out.append("-1")
        else:
            i, j, price = best
            apples -= price
            power[i][j] += 1
            out.append(f"{i} {j}")
        for i in range(levels):
            for j in range(n):
                if i == 0:
                    apples += a[j] * count[0][j] * power[0][j]
                else:
                    count[i - 1][j] += count[i][j] * power[i][j]
    print("\\n".join(out))


main()
"""


class AppleMachines(ContestProblem):
    """AHC058 "apple machines": write a program that plans T turns of strengthening machines to end rich in apples.

    ## Description
    There are N = 10 machine ids and L = 4 levels; machine (i, j) has a count B (starts at 1) and a power P
    (starts at 0); the player starts with K = 1 apple. Level-0 machine j has a production capacity A_j, and
    every machine an initial cost C_{i,j}. Each of the T = 500 turns, the player either strengthens one machine
    (i, j), paying C_{i,j} * (P_{i,j} + 1) apples (never more than they have), which adds 1 to P_{i,j}, or
    does nothing; then, levels 0, 1, 2, 3 in order, each level-0 machine adds A_j * B_{0,j} * P_{0,j} apples
    and each machine of level i >= 1 adds B_{i,j} * P_{i,j} to B_{i-1,j}. A test case scores
    round(1e5 * log2(S)) for the S apples after the last turn. The statement in the prompt is our own wording
    of AtCoder Heuristic Contest 058. Test case `s` is `generate_case(s)`, drawn as the statement says
    (A_0 = 1, A_j = round(10^u) sorted; C_{0,0} = 1, C_{i,j} = round(A_j * 500^i * 10^u); u uniform in
    [0, 2]) with numpy's RNG: the contest's distribution, other cases.

    ## Official inputs
    `cases_dir=PATH` scores on the `*.txt` files of a folder in the official input format ("N L T K", the N
    capacities, L lines of N costs), sorted by name, the first `n_cases` of them (all by default), so case
    scores on the contest's public inputs are comparable with the contest's.

    ## Action
    A reply whose last ```python (or ```py) block is a complete program, run as `python -I main.py` with
    numpy available, or whose last ```cpp (or ```c++) block is a C++20 program compiled once with
    `g++ -std=gnu++20 -O2`. It reads one case from stdin and prints T lines, one action per turn from turn 0:
    "i j" to strengthen machine (level i, id j) or "-1" to do nothing; lines starting with "#" are comments.

    ## How the output is read (as the official tester reads it)
    - The output must be UTF-8 text; any other byte, even in a comment, is a wrong answer.
    - Lines are separated by "\n"; a line's tokens by Unicode whitespace (Rust's `split_whitespace`: ASCII
      space, tab, CR, ..., and U+00A0, U+3000 and the other White_Space characters).
    - A line with no token, or whose first token starts with "#", is skipped; every other line is one action.
    - Tokens are read as 64-bit integers: an optional sign and ASCII digits ("-01" is -1, "+0" is 0; "1.0",
      "1_000" and non-ASCII digits are not integers). An action is the single integer -1, or two integers i j.
    - Reading stops after the T-th action: lines after it (a debug line, an extra "-1") are ignored.

    ## Verifier/metric
    The program runs in the sandbox once per case under the contest harness's time rule: `timeout_s` (2.0)
    seconds of CPU time and `timeout_s + wall_tolerance_s` (2.5) of wall clock, the sandbox's own start not
    counted (`contest.TimeRule`). Its output is simulated exactly in Python integers in the parent. A wrong
    answer scores the case 0 with the turn and the reason in `info["case_errors"]`: an unaffordable
    strengthening, a level or id that does not exist, a line that is not an action, fewer than T actions,
    output that is not UTF-8. (In the contest one wrong answer fails the whole submission; here only its
    case, as for AHC039.) Output is capped at 1 MB a case. The score is the mean case score.

    ## Reward and failure reward
    reward = mean case score (higher is better). A reply with no code block, a C++ compile error or a program
    that fails on every case is invalid and gets `failure_reward` = -1, below every valid reward (>= 0).

    ## States and rescoring
    A state's construction is {"language", "cases", "actions"}: the case seeds (or file names) and, per case,
    the program's actions as normalised text ("i j" or "-1" lines; null for a failed case). `rescore` does not
    rerun the program: it replays the stored actions, which is exact. The start state is BASELINE (a greedy on
    the estimated apples returned per apple spent), run once per problem object without the time limit:
    mean 3,613,160 on the ten official inputs in tests/data/ahc058 (the start state's score with
    `gym.make("discover/AHC058-v0", cases_dir="tests/data/ahc058")`).

    ## Published figures (totals over the contest's 150 cases)
    Best human 847,674,723; previous best AI 848,373,282; TTT-Discover 848,414,228 (about 5,656,095 a case).

    ## Arguments
    n_cases: test cases per evaluation (default 10 generated cases; with cases_dir, all files of the folder).
    first_seed: seed of the first generated case (default 0). cases_dir: folder of official input files.
    timeout_s: CPU seconds per case (default 2.0). wall_tolerance_s: extra wall clock allowed (default 0.5).
    memory_mb: address-space limit (default 1024, the contest's). compile_timeout_s: wall clock for g++ (60).

    ## Version history
    v0: first release. Revised: output read as the official tester reads it (T actions, then the rest
    ignored; integers as integers; Unicode whitespace; UTF-8 only).
    """

    title: ClassVar[str] = "AtCoder Heuristic Contest 058: apple machines"
    output_key: ClassVar[str] = "actions"
    output_mb: ClassVar[int] = OUTPUT_MB
    baseline: ClassVar[str] = BASELINE

    @classmethod
    def generate_input(cls, seed: int) -> bytes:
        return format_case(generate_case(seed))

    @classmethod
    def parse_input(cls, data: bytes) -> Case:
        return read_case(data)

    def judge(self, stdout: bytes, case: Case) -> tuple[Any, int]:
        actions = parse_actions(stdout, case)
        score = case_score(simulate(case, actions))
        return "\n".join("-1" if a is None else f"{a[0]} {a[1]}" for a in actions), score

    def rejudge(self, stored: Any, case: Case) -> int:
        if not isinstance(stored, str) or len(stored) > OUTPUT_MB << 20:
            raise InvalidSolution("stored actions must be a text of 'i j' / '-1' lines")
        return case_score(simulate(case, parse_actions(stored.encode(errors="replace"), case)))

    def statement(self) -> str:
        return (
            f"# {self.title}\n"
            f"There are N = {N_IDS} machine ids and L = {LEVELS} levels; machine (i, j) is the level-i machine "
            "of id j.\nEach machine has a count B (initially 1) and a power P (initially 0). You start with "
            f"K = {START_APPLES} apple.\nLevel-0 machine j has a production capacity A_j; machine (i, j) has an "
            "initial cost C_{i,j}.\n\n"
            f"The game lasts T = {TURNS} turns. Each turn:\n"
            "1. Either strengthen one machine (i, j): pay C_{i,j} * (P_{i,j} + 1) apples (you may not go below\n"
            "   0 apples), then P_{i,j} += 1; or do nothing.\n"
            "2. Then, for levels 0, 1, 2, 3 in this order: every level-0 machine j adds A_j * B_{0,j} * P_{0,j}\n"
            "   apples; every machine (i, j) with i >= 1 adds B_{i,j} * P_{i,j} to B_{i-1,j}.\n"
            "Numbers grow beyond 64 bits: use big integers or floating point estimates with care.\n"
            "With S apples after the last turn, a test case scores round(100000 * log2(S)).\n\n"
            'Input (stdin): "N L T K", then a line of the N values A_j (sorted ascending, A_0 = 1), then L\n'
            "lines of N costs C_{i,j} (line i is level i; C_{0,0} = 1, other costs up to about 1.25e12).\n"
            'Output (stdout): exactly T lines, one per turn from turn 0: "i j" to strengthen machine\n'
            '(level i, id j), or "-1" to do nothing. Lines starting with "#" are comments. An unaffordable\n'
            "strengthening, a level or id that does not exist, or fewer than T actions scores the case 0.\n\n"
            f"{self.time_rule_text()}"
        )

"""AHC058 apple machines: exact simulation, wrong answers, official inputs, generator, programs and states."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

import discover_envs  # noqa: F401 - registers the ids
from discover_envs.problem import InvalidSolution, InvalidState
from discover_envs.problems import contest
from discover_envs.problems.ahc058 import (
    AppleMachines,
    Case,
    case_score,
    format_case,
    generate_case,
    parse_actions,
    read_case,
    simulate,
)

OFFICIAL = Path(__file__).parent / "data" / "ahc058"
SEEDS = 2
#: Generous per-case limit, so a busy test machine cannot fail the end-to-end checks (the rule is tested in
#: tests/test_ahc039.py, through the same shared runner).
TIMEOUT_S = 10.0
#: Turn 0 buys machine (0, 0) for its 1 apple; then it yields 1 apple a turn: 500 apples at the end, whatever
#: the case (A_0 = C_{0,0} = 1 always).
ONE_MACHINE = "0 0\n" + "-1\n" * 499
ONE_MACHINE_SCORE = round(1e5 * math.log2(500))

# Two ids, two levels, three turns, one apple; capacities (1, 3); costs: level 0 (1, 2), level 1 (1, 10).
SMALL = Case(n=2, levels=2, turns=3, apples=1, capacity=(1, 3), cost=((1, 2), (1, 10)))


def python(code: str) -> str:
    return f"My plan.\n```python\n{code}\n```\n"


def printing(text: str) -> str:
    return python(f"print({text!r}, end='')")


@pytest.fixture(scope="module")
def env():
    env = gym.make("discover/AHC058-v0", n_cases=SEEDS, timeout_s=TIMEOUT_S)
    yield env
    env.close()


@pytest.fixture(scope="module")
def one_machine_step(env):
    env.reset(seed=0)
    return env.step(printing(ONE_MACHINE))


# --- simulation, by hand --------------------------------------------------------------------------------


def test_three_turns_with_a_level_one_machine_by_hand():
    # t0: buy (0,0) for 1 -> 0 apples; level 0 makes 1*1*1 -> 1.
    # t1: buy (1,0) for 1 -> 0; level 0 makes 1 (B00 still 1) -> 1; then level 1 adds 1*1 to B00 -> 2.
    # t2: nothing; level 0 makes 1*2*1 -> 3; B00 -> 3.
    assert simulate(SMALL, [(0, 0), (1, 0), None]) == 3
    assert case_score(3) == round(1e5 * math.log2(3)) == 158_496


def test_the_price_grows_with_power_by_hand():
    # t0: buy (0,0) for 1 -> 0, +1 -> 1. t1: nothing, +1 -> 2. t2: buy (0,0) again for 1*2 -> 0, +1*1*2 -> 2.
    assert simulate(SMALL, [(0, 0), None, (0, 0)]) == 2
    assert case_score(2) == 100_000 and case_score(1) == 0


def test_capacity_multiplies_production_by_hand():
    case = Case(n=2, levels=1, turns=2, apples=2, capacity=(1, 3), cost=((1, 2),))
    # t0: buy (0,1) for 2 -> 0, +3*1*1 -> 3. t1: buy (0,0) for 1 -> 2, +1 +3 -> 6.
    assert simulate(case, [(0, 1), (0, 0)]) == 6


def test_counts_beyond_64_bits_stay_exact():
    case = Case(n=1, levels=4, turns=400, apples=10**30, capacity=(1,), cost=((1,), (1,), (1,), (1,)))
    apples = simulate(case, [(0, 0), (1, 0), (2, 0), (3, 0)] + [None] * 396)
    assert apples > 2**64 and isinstance(apples, int)
    # Machine (i, 0) works from turn i on: apples += B0, then B0 += B1, B1 += B2, B2 += B3 (= 1).
    expected, b = 10**30 - 4, [1, 1, 1, 1]
    for turn in range(400):
        expected += b[0]
        for level in range(1, min(turn, 3) + 1):
            b[level - 1] += b[level]
    assert apples == expected


# --- wrong answers ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("output", "message"),
    [
        ("0 0\n0 0\n-1\n", "turn 1: strengthening machine (level 0, id 0) costs 2 apples, only 1 are available"),
        ("-1\n1 1\n-1\n", "turn 1: strengthening machine (level 1, id 1) costs 10 apples, only 1 are available"),
        ("0 0\n2 0\n-1\n", "turn 1: level 2 does not exist (levels are 0..1)"),
        ("0 0\n-1\n0 -1\n", "turn 2: machine id -1 does not exist (ids are 0..1)"),
        ("0 0\n-1\n", "the output has 2 actions; T = 3 are needed"),
        ("", "the output has 0 actions"),
        ("0 0\nbuy 0 0\n", "turn 1: 'buy 0 0' is neither 'i j' nor '-1'"),
        ("0 0\n0 0 0\n", "turn 1: '0 0 0' is neither"),
        ("0 1.0\n", "turn 0: '0 1.0' is neither"),
        ("0 15_000\n", "turn 0: '0 15_000' is neither"),
        ("0 " + "9" * 100_000 + "\n", "turn 0: '0 9999"),
    ],
)
def test_wrong_answer_names_the_turn_and_the_reason(output, message):
    with pytest.raises(InvalidSolution) as exc:
        simulate(SMALL, parse_actions(output.encode(), SMALL))
    assert message in str(exc.value)


def test_comments_and_blank_lines_are_not_actions():
    output = b"# plan\n0 0\n\n# more\n  -1  \r\n1 0\n"
    assert parse_actions(output, SMALL) == [(0, 0), None, (1, 0)]


# --- read as the official tester reads it (its verdicts on these outputs, from the audit in issue 23) --------


@pytest.fixture(scope="module")
def official_case() -> Case:
    return read_case((OFFICIAL / "0000.txt").read_bytes())


@pytest.mark.parametrize(
    "tail",
    ["debug: done\n", "-1\n", "0 0\n", "not an action at all\n", "-1\n" * 50],
    ids=["debug-line", "extra-minus-one", "extra-action", "garbage", "many-extra"],
)
def test_lines_after_the_t_th_action_are_ignored(official_case, tail):
    """Tester: accepted, the same score as without the tail (the env gave a wrong answer before)."""
    problem = AppleMachines(n_cases=1)
    assert problem.judge((ONE_MACHINE + tail).encode(), official_case)[1] == ONE_MACHINE_SCORE
    assert parse_actions(b"0 0\n-1\n-1\n-1\n# x\n", SMALL) == [(0, 0), None, None]


@pytest.mark.parametrize(
    "output",
    [b"# caf\xe9\n" + ONE_MACHINE.encode(), ONE_MACHINE.encode() + b"# \xff\n", b"0 0\xc0\n" + b"-1\n" * 499],
    ids=["in-a-comment", "after-the-last-action", "in-an-action"],
)
def test_output_that_is_not_utf8_is_a_wrong_answer(official_case, output):
    """Tester: rejected (it reads the output as UTF-8 text); the env accepted a bad byte in a comment before."""
    with pytest.raises(InvalidSolution, match="not UTF-8 text"):
        AppleMachines(n_cases=1).judge(output, official_case)


@pytest.mark.parametrize("space", ["\u00a0", "\u3000", "\u2003", "\x85", "\x0b"], ids=repr)
def test_unicode_whitespace_separates_tokens(official_case, space):
    """Tester: accepted (Rust's `split_whitespace` is Unicode-aware); the env refused U+00A0 before."""
    output = f"0{space}0{space}\n" + ONE_MACHINE.split("\n", 1)[1]
    assert AppleMachines(n_cases=1).judge(output.encode(), official_case)[1] == ONE_MACHINE_SCORE


@pytest.mark.parametrize("separator", ["\x1f", "\u200b"], ids=["unit-separator", "zero-width-space"])
def test_characters_outside_unicode_white_space_do_not_separate_tokens(separator):
    """Python's `str.split` would split on U+001F; the tester (Unicode White_Space) does not."""
    with pytest.raises(InvalidSolution, match=r"turn 0: .* is neither 'i j' nor '-1'"):
        parse_actions(f"0{separator}0\n-1\n-1\n".encode(), SMALL)


@pytest.mark.parametrize(
    ("line", "action"),
    [("-01", None), ("-0000000000000000000000001", None), ("+0 00", (0, 0)), ("000 +000000", (0, 0))],
)
def test_integers_are_read_as_integers(official_case, line, action):
    """Tester: "-01" is -1 (it parses integers); the env refused it before."""
    assert parse_actions(f"{line}\n-1\n-1\n".encode(), SMALL)[0] == action
    first, rest = ONE_MACHINE.split("\n", 1)
    # In place of the second action ("-1") when it reads as "do nothing", of the first ("0 0") otherwise.
    output = (f"{first}\n{line}\n" + rest.split("\n", 1)[1]) if action is None else f"{line}\n{rest}"
    assert AppleMachines(n_cases=1).judge(output.encode(), official_case)[1] == ONE_MACHINE_SCORE


# --- official inputs and the generator ------------------------------------------------------------------


def test_official_inputs_parse_and_round_trip():
    files = sorted(OFFICIAL.glob("*.txt"))
    assert len(files) == 10
    for path in files:
        case = read_case(path.read_bytes())
        assert (case.n, case.levels, case.turns, case.apples) == (10, 4, 500, 1)
        assert format_case(case).split() == path.read_bytes().split()
    assert read_case(format_case(generate_case(3))) == generate_case(3)


def _decades(case: Case) -> np.ndarray:
    """log10 of each cost over its scale A_j * 500^i: uniform in [0, 2] by the statement (C_{0,0} left out)."""
    scale = np.array(case.capacity, dtype=float) * 500.0 ** np.arange(case.levels)[:, None]
    return np.delete(np.log10(np.array(case.cost, dtype=float) / scale).ravel(), 0)


def test_generator_follows_the_statement_like_the_official_inputs():
    official = [read_case(path.read_bytes()) for path in sorted(OFFICIAL.glob("*.txt"))]
    generated = [generate_case(seed) for seed in range(30)]
    for case in official + generated:
        assert case.capacity[0] == 1 and list(case.capacity) == sorted(case.capacity) and case.capacity[-1] <= 100
        assert case.cost[0][0] == 1 and max(map(max, case.cost)) <= 1.25e12
        u = _decades(case)
        assert u.min() > -0.01 and u.max() < 2.01
    for stat in (lambda c: _decades(c).mean(), lambda c: np.log10(c.capacity[1:]).mean()):
        assert abs(np.mean([stat(c) for c in official]) - np.mean([stat(c) for c in generated])) < 0.15


def test_generator_is_deterministic_per_seed():
    assert generate_case(5) == generate_case(5) != generate_case(6)


# --- programs, end to end --------------------------------------------------------------------------------


def test_python_program_is_run_per_case_and_simulated(one_machine_step):
    _, reward, terminated, truncated, info = one_machine_step
    assert info["valid"] and terminated and not truncated, info["error"]
    assert info["case_scores"] == [ONE_MACHINE_SCORE] * SEEDS and info["case_errors"] == [None] * SEEDS
    assert reward == info["score"] == ONE_MACHINE_SCORE
    assert len(info["case_cpu_s"]) == len(info["case_wall_s"]) == SEEDS


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")
def test_cpp_program_is_compiled_once_and_scored(env):
    env.reset(seed=0)
    code = '#include <cstdio>\nint main() { std::puts("0 0"); for (int t = 1; t < 500; ++t) std::puts("-1"); }\n'
    _, _, _, _, info = env.step(f"```cpp\n{code}```")
    assert info["valid"], info["error"]
    assert info["case_scores"] == [ONE_MACHINE_SCORE] * SEEDS
    assert info["next_state"]["construction"]["language"] == "cpp"


def test_wrong_answer_scores_its_case_zero_with_the_turn_in_info(env):
    # Case 1 alone gets an unaffordable second purchase at turn 1.
    code = (
        "import sys\nseed_one = sys.stdin.read() == SECOND\nprint('0 0')\nprint('0 0' if seed_one else '-1')\n"
        "print('-1\\n' * 498, end='')\n"
    ).replace("SECOND", repr(AppleMachines(n_cases=2).case(1)[0].decode()))
    env.reset(seed=0)
    _, reward, _, _, info = env.step(python(code))
    assert info["valid"] and info["case_scores"][1] == 0 and info["case_errors"][0] is None
    assert (
        info["case_errors"][1]
        == "seed 1: turn 1: strengthening machine (level 0, id 0) costs 2 apples, only 1 are available"
    )
    assert info["next_state"]["construction"]["actions"][1] is None
    assert reward == info["case_scores"][0] / 2


def test_program_failing_every_case_is_invalid(env):
    env.reset(seed=0)
    _, reward, _, _, info = env.step(printing("0 0\n"))
    assert not info["valid"] and reward == -1.0
    assert "failed on every test case; first error: seed 0: the output has 1 actions" in info["error"]


def test_huge_token_output_is_an_invalid_attempt_not_an_exception(env):
    env.reset(seed=0)
    _, reward, _, _, info = env.step(python("import sys\nsys.stdout.write('7' * 900_000)"))
    assert not info["valid"] and reward == -1.0 and "turn 0: '7777" in info["error"]


def test_cases_dir_scores_on_official_inputs():
    problem = AppleMachines(cases_dir=OFFICIAL, n_cases=3, timeout_s=TIMEOUT_S)
    assert problem.cases == ["0000.txt", "0001.txt", "0002.txt"]
    result = problem.evaluate(printing(ONE_MACHINE), {})
    assert result.details["case_scores"] == [ONE_MACHINE_SCORE] * 3


# --- states ------------------------------------------------------------------------------------------------


def test_stored_state_is_replayed_in_a_fresh_problem_without_running_any_program(one_machine_step, monkeypatch):
    state = one_machine_step[4]["next_state"]
    assert state["construction"]["actions"] == [ONE_MACHINE.strip()] * SEEDS

    def refuse(*args, **kwargs):
        raise AssertionError("rescore must not run a program")

    monkeypatch.setattr(contest, "run_program", refuse)
    assert AppleMachines(n_cases=SEEDS).rescore(state) == state["score"]


def test_reset_from_a_tampered_state_is_rejected(env, one_machine_step):
    state = dict(one_machine_step[4]["next_state"])
    state["score"] += 1
    with pytest.raises(InvalidState, match="does not match the recomputed score"):
        env.reset(options={"state": state})
    actions = ["0 0\n0 0\n" + "-1\n" * 498, *state["construction"]["actions"][1:]]
    state.update(construction={**state["construction"], "actions": actions}, id=None)
    with pytest.raises(InvalidState, match=r"result for seed 0 is invalid: turn 1: strengthening .* costs 2 apples"):
        env.reset(options={"state": state})


def test_reset_from_state_shows_its_program_and_score(env, one_machine_step):
    state = one_machine_step[4]["next_state"]
    prompt, info = env.reset(options={"state": state})
    assert info["state"]["id"] == state["id"] and f"{state['score']:.2f}" in prompt and "```python" in prompt


def test_start_state_is_a_greedy_that_beats_a_single_machine():
    problem = AppleMachines(n_cases=1, timeout_s=TIMEOUT_S)
    state = problem.initial_state(np.random.default_rng(0))
    assert state["score"] > 3 * ONE_MACHINE_SCORE


def test_env_passes_the_gymnasium_checker(env):
    check_env(env.unwrapped, skip_render_check=True)

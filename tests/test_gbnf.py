"""GBNF grammars of constructions: exactly the fenced arrays of the spec's length, bounds and decimals."""

from __future__ import annotations

import itertools
import json
import math
import re
from fractions import Fraction

import gymnasium as gym
import pytest
from test_env_contract import MATH_IDS

from discover_agent.gbnf import construction_grammar
from discover_agent.json_schema import out_of_spec
from discover_envs.problem import ConstructionSpec, extract_block

NUMBER = re.compile(r"-?(0|[1-9][0-9]*)(\.[0-9]+)?")


def as_regex(grammar: str) -> re.Pattern[str]:
    """The grammar as a Python regex (it has no recursion): rules inlined, literals escaped."""
    rules = dict(line.split(" ::= ", 1) for line in grammar.strip().splitlines())

    def expand(expression: str) -> str:
        out = []
        for token in re.findall(r'"(?:\\.|[^"\\])*"|\[[^\]]*\]|[()|?*]|[a-z]+', expression):
            if token.startswith('"'):
                out.append(re.escape(json.loads(token)))
            elif token in rules:
                out.append(f"(?:{expand(rules[token])})")
            else:
                out.append("(?:" if token == "(" else token)
        return "".join(out)

    return re.compile(expand(rules["root"]), re.DOTALL)


def candidates(max_integer: int, decimals: int, signed: bool) -> list[str]:
    """Every canonical number up to `max_integer` with up to `decimals + 1` decimals (one more than allowed)."""
    fractions = [""] + ["." + "".join(d) for k in range(1, decimals + 2) for d in itertools.product("0459", repeat=k)]
    texts = [f"{i}{f}" for i in [*range(0, 12), 99, 100, 101, 999, 1000, max_integer] for f in fractions]
    return texts + (["-" + t for t in texts] if signed else [])


@pytest.mark.parametrize(
    ("low", "high"),
    [(0.0, 1.0), (0.0, 1e6), (-0.25, 1.5), (0.45, 0.9), (1.0, 1.0), (0.0499, 0.95), (-100.5, -0.5), (2.0, 999.0)],
)
def test_numbers_in_the_grammar_are_exactly_those_in_bounds_with_the_allowed_decimals_and_width(low, high):
    decimals = 3
    spec = ConstructionSpec("sequence", 1, 1, low, high)
    width = 1 + 1 + decimals + (1 if low < 0 else 0)
    pattern = as_regex(construction_grammar(spec, decimals=decimals))
    for text in candidates(10**6, decimals, signed=low < 0):
        places = len(text.split(".")[1]) if "." in text else 0
        expected = low <= Fraction(text) <= high and places <= decimals and len(text) <= width
        assert bool(pattern.fullmatch(f"```json\n[{text}]\n```")) == expected, text


def test_the_array_has_the_length_and_shape_of_the_spec_inside_the_json_fence():
    pattern = as_regex(construction_grammar(ConstructionSpec("tuples", 2, 3, 0.0, 1.0, arity=3)))
    triple = "[0.5, 0.25, 1]"
    for count in range(5):
        reply = "```json\n[" + ", ".join([triple] * count) + "]\n```"
        assert bool(pattern.fullmatch(reply)) == (2 <= count <= 3), count
    assert not pattern.fullmatch("```json\n[[0.5, 0.25], [0.5, 0.25]]\n```"), "arity 3"
    assert not pattern.fullmatch("[[0.5, 0.25, 1], [0.5, 0.25, 1]]"), "the fence is part of the grammar"


def test_every_reply_the_grammar_allows_is_read_by_the_env_as_an_in_spec_construction():
    spec = ConstructionSpec("sequence", 16, 16, 0.0, 1.0)
    pattern = as_regex(construction_grammar(spec))
    reply = "```json\n[" + ", ".join(["0.1234", "1", "0", "0.5"] * 4) + "]\n```"
    assert pattern.fullmatch(reply)
    language, body = extract_block(reply, ("json",))
    assert language == "json" and not out_of_spec(json.loads(body), spec)


def test_long_free_lengths_leave_the_tail_open_and_impossible_bounds_are_refused():
    assert '(", " item)*' in construction_grammar(ConstructionSpec("sequence", 1, 200_000, 0.0, 1.0))
    unbounded = as_regex(construction_grammar(ConstructionSpec("sequence", 1, 1, -math.inf, math.inf)))
    fits = ("-123456", "1234567", "0.1234", "-1.234")  # 7 characters: room for a sign, as the reply budget has
    assert all(unbounded.fullmatch(f"```json\n[{x}]\n```") for x in fits)
    too_long = ("12345678", "-1234567", "0.12345", "1e5")
    assert not any(unbounded.fullmatch(f"```json\n[{x}]\n```") for x in too_long)
    with pytest.raises(ValueError, match="no number of at most 6 characters"):
        construction_grammar(ConstructionSpec("sequence", 1, 1, 1e7, 2e7))


def test_llama_cpp_parses_the_grammars_of_every_construction_env():
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (the llamacpp extra)")
    for env_id in MATH_IDS:
        spec = gym.make(env_id).metadata["construction_spec"]
        assert llama_cpp.LlamaGrammar.from_string(construction_grammar(spec)), env_id

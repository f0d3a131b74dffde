"""The JSON-array grammar of a `ConstructionSpec`, by characters and without torch.

`ArrayGrammar.step` is the character automaton that `discover_agent.constrained.JsonArrayConstraint` runs over
tokens' texts; `Numbers` decides which number prefixes can still end inside the bounds; `default_max_new_tokens`
sizes a reply budget, which an agent on an endpoint needs without loading torch.

    array  := "[" elements "]"      elements separated by "," or ", " (one optional space, nowhere else)
    tuple  := "[" number ("," | ", ") ... "]"  with exactly `arity` numbers (kind "tuples")
    number := -?(0|[1-9][0-9]*)(.[0-9]{1,max_decimals})?    (no exponent, no leading zeros, no -0)
Every number prefix must still be completable to a value in [low, high], and a finished number must lie in
it; values are compared exactly (as fractions), so the float that `json.loads` gives is within the bounds.
"""

from __future__ import annotations

import math
import re
from fractions import Fraction
from typing import Any, NamedTuple

from discover_envs.problem import ConstructionSpec

__all__ = ["ALPHABET", "ArrayGrammar", "Numbers", "State", "default_max_new_tokens", "shortest_chars"]

#: Characters a constrained reply may contain; tokens with any other character are never allowed.
ALPHABET = frozenset("0123456789.-,[] ")

_PREFIX = re.compile(r"(-?)(0|[1-9][0-9]*)?(\.[0-9]*)?")

# Automaton phases. "open"/"comma"/"space" are the outer list; "t_*" the inside of one tuple.
START, OPEN, COMMA, SPACE, NUMBER = "start", "open", "comma", "space", "number"
T_OPEN, T_COMMA, T_SPACE, AFTER_TUPLE, DONE, END = "t_open", "t_comma", "t_space", "after", "done", "end"


class State(NamedTuple):
    """Where the reply is: how many `elements` are finished, `inner` finished numbers of the open tuple, the
    text of the number being written (phase "number") and the tokens `left` (None: no budget)."""

    phase: str
    elements: int = 0
    inner: int = 0
    number: str = ""
    left: int | None = None


def default_max_new_tokens(spec: ConstructionSpec, decimals: int = 4, length: int | None = None) -> int:
    """A reply budget with room for every number of `spec` at `decimals` decimals ("0.1234, "), counted in
    characters, which bounds the tokens of any tokenizer from above (one character per token at worst).

    `length` is how many elements to leave room for; default `spec.min_length`, the fixed length of every
    construction env at its preset (a free-length spec gets room for at least 16 elements).
    """
    if decimals < 0:
        raise ValueError(f"decimals must be >= 0, got {decimals!r}")
    elements = max(spec.min_length, 16 if spec.min_length < spec.max_length else 1) if length is None else length
    if elements < 1:
        raise ValueError(f"length must be >= 1, got {length!r}")
    number = 1 + (decimals + 1 if decimals else 0)  # "0" or "0.1234"
    if spec.low < 0:
        number += 1  # "-"
    element = number if spec.kind == "sequence" else spec.arity * number + 2 * (spec.arity - 1) + 2
    return 2 + elements * (element + 2) - 2  # "[" + elements joined by ", " + "]"


def shortest_chars(spec: ConstructionSpec, elements: int) -> int:
    """A lower bound on the characters of an array of `elements` elements that the grammar accepts for `spec`:
    the fewest integer digits (and "-") any number in [low, high] needs, commas without spaces."""
    if elements < 1:
        return 2  # "[]"
    if spec.low <= 0 <= spec.high:
        number = 1
    elif spec.low > 0:
        number = len(str(math.floor(spec.low)))
    else:
        number = 1 + len(str(math.floor(-spec.high)))
    element = number if spec.kind == "sequence" else 2 + spec.arity * number + spec.arity - 1
    return 2 + elements * element + elements - 1


class Numbers:
    """Plain decimals with at most `decimals` fractional digits whose value lies in [low, high].

    Values are counted in units of 10**-decimals; a bound of ±inf is None.
    """

    def __init__(self, low: float, high: float, decimals: int) -> None:
        self.decimals = decimals
        self.scale = 10**decimals
        self.lo = None if low == -math.inf else self._first_unit(low, 1)
        self.hi = None if high == math.inf else self._first_unit(high, -1)
        if self.lo is not None and self.hi is not None and self.lo > self.hi:
            raise ValueError(f"no number with at most {decimals} decimals lies in [{low}, {high}]")
        self._memo: dict[str, bool] = {}
        self._keys: dict[str, Any] = {}

    def _first_unit(self, bound: float, direction: int) -> int:
        """The lowest (direction 1) or highest (-1) unit count whose float is inside `bound`, the way the
        verifier compares: as floats, so "0.1" meets a bound of 0.1 though 1/10 < float(0.1) exactly."""

        def inside(units: int) -> bool:
            try:
                value = units / self.scale  # int / int is correctly rounded, like json.loads of the decimal
            except OverflowError:  # past the largest float: json.loads reads such a decimal as +-inf
                value = math.inf if units > 0 else -math.inf
            return value >= bound if direction == 1 else value <= bound

        exact = Fraction(bound) * self.scale
        units = math.ceil(exact) if direction == 1 else math.floor(exact)
        step = 1
        while inside(units - direction * step):  # rounding may admit a few more units: gallop, then bisect
            step *= 2
        outside, found = units - direction * step, units - direction * (step // 2) if step > 1 else units
        while abs(found - outside) > 1:
            middle = (found + outside) // 2
            if inside(middle):
                found = middle
            else:
                outside = middle
        return found

    def _split(self, text: str) -> tuple[bool, str, str | None] | None:
        """(negative, integer digits, fraction digits or None when no '.') of a syntactic number prefix."""
        match = _PREFIX.fullmatch(text)
        if match is None:
            return None
        sign, integer, fraction = match.group(1), match.group(2) or "", match.group(3)
        if fraction is not None and (not integer or not self.decimals or len(fraction) - 1 > self.decimals):
            return None
        return sign == "-", integer, None if fraction is None else fraction[1:]

    def _overlaps(self, negative: bool, low_mag: int, high_mag: float) -> bool:
        """Whether a value with magnitude in [low_mag, high_mag] (units) and this sign lies in the bounds."""
        low: float
        high: float
        if negative:
            low_mag = max(low_mag, 1)  # "-0" is not written
            if low_mag > high_mag:
                return False
            low, high = -high_mag, -low_mag
        else:
            low, high = low_mag, high_mag
        return (self.hi is None or low <= self.hi) and (self.lo is None or high >= self.lo)

    def _interval(self, integer: str, fraction: str) -> tuple[int, int]:
        """Magnitudes (units) reachable from digits "integer.fraction" by adding fraction digits."""
        free = 10 ** (self.decimals - len(fraction))
        base = (int(integer) * 10 ** len(fraction) + int(fraction or "0")) * free
        return base, base + free - 1

    def feasible(self, text: str) -> bool:
        """Whether `text` starts a number that can still end inside the bounds."""
        if text not in self._memo:
            self._memo[text] = self._feasible(text)
        return self._memo[text]

    def _feasible(self, text: str) -> bool:
        parts = self._split(text)
        if parts is None:
            return False
        negative, integer, fraction = parts
        if fraction is not None:
            return self._overlaps(negative, *self._interval(integer, fraction))
        if integer == "0":
            return self._overlaps(negative, 0, self.scale - 1)
        if not integer:
            return self._overlaps(negative, 0, math.inf)
        # More integer digits multiply the magnitude by 10**k: test each decade until past the bound.
        bound = self.lo if negative else self.hi
        if bound is None:
            return True
        limit = -bound if negative else bound
        low = int(integer) * self.scale
        while low <= limit:
            if self._overlaps(negative, low, low + low // int(integer) - 1):
                return True
            low *= 10
        return False

    def complete(self, text: str) -> bool:
        """Whether `text` is a finished number inside the bounds."""
        parts = self._split(text)
        if parts is None or not parts[1] or parts[2] == "":
            return False
        negative, integer, fraction = parts
        magnitude = self._interval(integer, fraction or "")[0]
        return self._overlaps(negative, magnitude, magnitude)

    def key(self, text: str) -> Any:
        """A cache key: numbers past the '.' whose every continuation is in bounds behave alike, and so do
        integer prefixes of one sign and length with the same `_levels` (else the search over a bound that
        excludes short numbers, such as [1e7, 9e7], would visit every prefix: 10**7 of them)."""
        if text not in self._keys:
            self._keys[text] = self._key(text)
        return self._keys[text]

    def _key(self, text: str) -> Any:
        negative, integer, fraction = self._split(text) or (False, "", None)
        if fraction is not None:
            low, high = self._interval(integer, fraction)
            if self._overlaps(negative, low, low) and self._overlaps(negative, high, high):
                return negative, len(fraction)
        elif integer not in ("", "0"):  # "0" takes no more digits, unlike other prefixes
            levels = self._levels(negative, int(integer))
            if levels is not None:
                return negative, len(integer), levels
        return text

    def _levels(self, negative: bool, prefix: int) -> tuple[bool, ...] | None:
        """For k = 0, 1, ... more integer digits: whether every number so written from the integer `prefix` is
        in bounds (True) or none is (False); None if some k is partly in. Up to the k past every finite bound,
        from which on the answer no longer changes. A digit appended to the prefix shifts this tuple by one,
        so equal tuples (and length, sign) have equal futures."""
        limit = max((abs(b) for b in (self.lo, self.hi) if b is not None), default=0)
        levels = []
        low, width = prefix * self.scale, self.scale
        while True:
            high = low + width - 1
            inside = self._overlaps(negative, low, low) and self._overlaps(negative, high, high)
            if not inside and self._overlaps(negative, low, high):
                return None
            levels.append(inside)
            if low > limit:
                return tuple(levels)
            low, width = low * 10, width * 10


class ArrayGrammar:
    """The character automaton of arrays of `spec`'s shape, numbers with at most `max_decimals` decimals."""

    def __init__(self, spec: ConstructionSpec, max_decimals: int) -> None:
        if spec.kind not in ("sequence", "tuples"):
            raise ValueError(f"spec.kind must be 'sequence' or 'tuples', got {spec.kind!r}")
        if spec.arity < 1 or not 0 <= spec.min_length <= spec.max_length:
            raise ValueError(f"spec needs arity >= 1 and 0 <= min_length <= max_length, got {spec}")
        if not (spec.low <= spec.high and spec.low < math.inf and spec.high > -math.inf):
            raise ValueError(f"spec needs low <= high and a finite number between, got [{spec.low}, {spec.high}]")
        if not (isinstance(max_decimals, int) and max_decimals >= 0):
            raise ValueError(f"max_decimals must be a non-negative int, got {max_decimals!r}")
        self.spec = spec
        self.tuples = spec.kind == "tuples"
        self.numbers = Numbers(spec.low, spec.high, max_decimals)

    def _element_start(self, state: State, char: str) -> State | None:
        if self.tuples:
            return State(T_OPEN, state.elements) if char == "[" else None
        return self._number_char(state, char)

    def _number_char(self, state: State, char: str) -> State | None:
        text = state.number + char
        return state._replace(phase=NUMBER, number=text) if self.numbers.feasible(text) else None

    def _end_number(self, state: State, char: str) -> State | None:
        """',' or ']' after a number: the number must be finished and the counts must allow it."""
        if char not in ",]" or not self.numbers.complete(state.number):
            return None
        spec = self.spec
        if self.tuples:
            inner = state.inner + 1
            if char == "," and inner < spec.arity:
                return State(T_COMMA, state.elements, inner)
            if char == "]" and inner == spec.arity:
                return State(AFTER_TUPLE, state.elements + 1)
            return None
        count = state.elements + 1
        if char == "," and count < spec.max_length:
            return State(COMMA, count)
        if char == "]" and count >= spec.min_length:
            return State(DONE, count)
        return None

    def step(self, state: State, char: str) -> State | None:
        """The state after one more character, or None if the character breaks the grammar."""
        phase = state.phase
        if phase == START:
            return State(OPEN) if char == "[" else None
        if phase == NUMBER:
            return self._end_number(state, char) if char in ",]" else self._number_char(state, char)
        if phase in (OPEN, AFTER_TUPLE) and char == "]":
            return State(DONE, state.elements) if state.elements >= self.spec.min_length else None
        if phase == AFTER_TUPLE:
            return State(COMMA, state.elements) if char == "," and state.elements < self.spec.max_length else None
        if phase in (COMMA, T_COMMA) and char == " ":
            return state._replace(phase=SPACE if phase == COMMA else T_SPACE)
        if phase in (OPEN, COMMA, SPACE):
            return self._element_start(state, char)
        if phase in (T_OPEN, T_COMMA, T_SPACE):
            return self._number_char(state, char)
        return None

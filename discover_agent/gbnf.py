"""GBNF grammars of construction replies, for servers that take a `grammar` field (llama.cpp, llama-cpp-python).

A JSON schema reaches llama.cpp servers as a grammar that fixes the array's length but not number bounds, so a
small model writes 1.45 or 5239074379 where [0, 1] is asked. `construction_grammar(spec)` states everything the
spec says in the grammar itself: the ```json fence, the array's length, each number's bounds (decided on its
decimal digits, exactly) and its decimals, so the server can only sample valid-shaped constructions:

    root   ::= "```json\\n" array "\\n```"
    array  ::= "[" item (", " item){min-1..max-1} "]"        item: a number, or "[" number (", " number)* "]"
    number ::= the decimal numbers in [low, high] with at most `decimals` decimals and `width` characters

`width` defaults to the width `json_grammar.default_max_new_tokens` sizes the reply budget for ("0.1234"), so a
reply under the grammar fits the budget and is never cut. Numbers have no exponent and no leading zeros.
"""

from __future__ import annotations

import math
from fractions import Fraction

from discover_envs.problem import ConstructionSpec

__all__ = ["FENCE", "construction_grammar", "number_width"]

#: What the grammar wraps the array in: exactly what the env reads as a ```json block.
FENCE = ("```json\n", "\n```")
#: Longest length range written out in the grammar; beyond it the array's tail is open (`*`), and a reply longer
#: than the spec is counted as out of spec by the caller.
MAX_SPELLED = 4096


def number_width(spec: ConstructionSpec, decimals: int) -> int:
    """Characters of a number at `decimals` decimals, as `default_max_new_tokens` counts them ("0.1234")."""
    return 1 + (decimals + 1 if decimals else 0) + (1 if spec.low < 0 else 0)


def construction_grammar(spec: ConstructionSpec, decimals: int = 4, width: int | None = None) -> str:
    """The GBNF grammar of a fenced construction of `spec` (see the module docstring)."""
    if not (isinstance(decimals, int) and decimals >= 0):
        raise ValueError(f"decimals must be a non-negative int, got {decimals!r}")
    width = number_width(spec, decimals) if width is None else width
    number = _number(Fraction(spec.low) if math.isfinite(spec.low) else None,
                     Fraction(spec.high) if math.isfinite(spec.high) else None, decimals, width)  # fmt: skip
    if number is None:
        raise ValueError(
            f"no number of at most {width} characters and {decimals} decimals lies in [{spec.low}, {spec.high}]"
        )
    item = "number" if spec.kind == "sequence" else '"[" number' + ' ", " number' * (spec.arity - 1) + ' "]"'
    head, tail = (_literal(part) for part in FENCE)
    return "\n".join([
        f"root ::= {head} array {tail}",
        f'array ::= "[" {_items(spec.min_length, spec.max_length)} "]"',
        f"item ::= {item}",
        f"number ::= {number}",
    ]) + "\n"  # fmt: skip


def _items(low: int, high: int) -> str:
    """`low` to `high` items separated by ", "."""
    if high == 0:
        return ""
    rest_low, rest_high = max(low - 1, 0), high - 1
    if rest_low > MAX_SPELLED:
        raise ValueError(f"a grammar of at least {low} items is too long to send; give the spec a shorter length")
    required = ' ", " item' * rest_low
    if rest_high - rest_low > MAX_SPELLED:
        optional = ' (", " item)*'
    else:
        optional = ""
        for _ in range(rest_high - rest_low):
            optional = f' (", " item{optional})?'
    body = f"item{required}{optional}"
    return body if low >= 1 else f"({body})?"


def _literal(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


# --- numbers: decimal strings in [low, high], decided digit by digit ---


def _number(low: Fraction | None, high: Fraction | None, decimals: int, width: int) -> str | None:
    """Alternatives for the numbers in [low, high] (None: unbounded), or None if there are none."""
    parts = []
    if high is None or high >= 0:
        positive = _magnitudes(max(low, Fraction(0)) if low is not None else Fraction(0), high, decimals, width)
        parts += [positive] if positive else []
    if low is None or low < 0:
        top = -low if low is not None else None
        negative = _magnitudes(max(-high, Fraction(0)) if high is not None else Fraction(0), top, decimals, width - 1)
        parts += [f'"-" ({negative})'] if negative else []
    return " | ".join(parts) or None


def _magnitudes(low: Fraction, high: Fraction | None, decimals: int, width: int) -> str | None:
    """Non-negative numbers I(.F)? in [low, high]: per integer part, the fractions it may take."""
    scale = 10**decimals
    lo = math.ceil(low * scale)  # in units of 10^-decimals, rounded inwards: exact bounds on written values
    hi = math.floor(high * scale) if high is not None else 10**width * scale
    if lo > hi or width < 1:
        return None
    alternatives = []
    first, last = lo // scale, hi // scale
    for length in range(len(str(first)), width + 1):
        start, stop = max(first, 10 ** (length - 1) if length > 1 else 0), min(last, 10**length - 1)
        if start > stop:
            continue
        places = min(decimals, width - length - 1)  # digits the fraction may have at this integer length
        # the integer parts whose fractions are bounded (first, last) apart from the free ones between
        for begin, end in _split(start, stop, first, last):
            frac_lo = _digits(lo - begin * scale, decimals) if begin == first else "0" * decimals
            frac_hi = _digits(hi - end * scale, decimals) if end == last else "9" * decimals
            integer = _int_range(str(begin), str(end))
            fraction = _fraction(frac_lo, frac_hi, places) if places > 0 else None
            bare = set(frac_lo) <= {"0"}  # the integer alone (fraction 0) is allowed
            if fraction is None and not bare:
                continue
            tail = "" if fraction is None else f' ("." ({fraction}))' + ("?" if bare else "")
            alternatives.append(f"{integer}{tail}")
    return " | ".join(f"({a})" for a in alternatives) or None


def _split(start: int, stop: int, first: int, last: int) -> list[tuple[int, int]]:
    """[start, stop] cut so that `first` and `last`, the integer parts whose fractions are bounded, stand alone."""
    pieces = [(first, first)] if start == first else []
    inner = (max(start, first + 1), min(stop, last - 1))
    if inner[0] <= inner[1]:
        pieces.append(inner)
    if stop == last and last != first:
        pieces.append((last, last))
    return pieces


def _digits(value: int, decimals: int) -> str:
    return str(value).zfill(decimals) if decimals else ""


def _int_range(low: str, high: str) -> str:
    """Integers from `low` to `high`, both written with the same number of digits (no leading zeros)."""
    if len(low) != len(high):
        raise ValueError(f"{low} and {high} differ in length")
    if low == high:
        return _literal(low)
    if len(low) == 1:
        return _digit_class(int(low), int(high))
    head_low, head_high = int(low[0]), int(high[0])
    if head_low == head_high:
        return f"{_literal(low[0])} ({_int_range(low[1:], high[1:])})"
    if set(low[1:]) <= {"0"} and set(high[1:]) <= {"9"}:
        return _digit_class(head_low, head_high) + " [0-9]" * (len(low) - 1)
    parts = [f"{_literal(low[0])} ({_int_range(low[1:], '9' * (len(low) - 1))})"]
    if head_high - head_low > 1:
        parts.append(_digit_class(head_low + 1, head_high - 1) + " [0-9]" * (len(low) - 1))
    parts.append(f"{_literal(high[0])} ({_int_range('0' * (len(high) - 1), high[1:])})")
    return "(" + " | ".join(parts) + ")"


def _fraction(low: str, high: str, places: int) -> str | None:
    """Digit strings s of 1..`places` digits whose value, s padded with zeros to len(low), is in [low, high]."""
    if set(low) <= {"0"} and set(high) <= {"9"}:
        free = _any_digits(places - 1)
        return "[0-9]" + (f" {free}" if free else "")
    alternatives = []
    head_low, head_high = int(low[0]), int(high[0])
    for head in sorted({head_low, head_high}):
        rest_low = low[1:] if head == head_low else "0" * (len(low) - 1)
        rest_high = high[1:] if head == head_high else "9" * (len(high) - 1)
        more = _fraction(rest_low, rest_high, places - 1) if places > 1 and rest_low else None
        stop = set(rest_low) <= {"0"}  # the digits after `head` may all be left out (zeros)
        if more is not None:
            alternatives.append(f'"{head}" ({more})' + ("?" if stop else ""))
        elif stop:
            alternatives.append(f'"{head}"')
    if head_high - head_low > 1:
        free = _any_digits(places - 1)
        alternatives.append(_digit_class(head_low + 1, head_high - 1) + (f" {free}" if free else ""))
    return " | ".join(f"({a})" for a in alternatives) or None


def _digit_class(low: int, high: int) -> str:
    return f'"{low}"' if low == high else f"[{low}-{high}]"


def _any_digits(places: int) -> str:
    """0..`places` free digits."""
    text = ""
    for _ in range(places):
        text = f"([0-9]{(' ' + text) if text else ''})?"
    return text

"""Grammar-constrained decoding of ```json construction actions, driven by an env's `construction_spec`.

A small model asked for "20 numbers in [0, 1]" rarely writes a valid list, and a group of replies with no
valid one teaches nothing (every advantage is 0). `JsonArrayConstraint` masks the logits so that only tokens
keeping the reply a valid JSON array of the spec's shape and bounds can be sampled (the idea of guided
decoding in vLLM/outlines); `token_masks` replays the grammar over a sampled completion so the trainer can
take log-probs under the same constrained distribution.

Budget: given `max_new_tokens`, the grammar also counts the tokens left. `_cost` is the length (in tokens
of this tokenizer) of the shortest way to close the array from a state, found by search over the grammar
(restricted to never lengthening an already finished number); a token is allowed only if the array can still
be closed with the tokens left after it. So when the budget gets tight the model is steered to shorter
numbers and then the closing bracket, and every reply that stops at `max_new_tokens` is a complete array;
a budget below the shortest array is refused up front, naming the minimum. The tokens left are part of the
state, so `token_masks` replays the budget exactly.

The grammar works on characters of the tokens' decoded text:
    array  := "[" elements "]"      elements separated by "," or ", " (one optional space, nowhere else)
    tuple  := "[" number ("," | ", ") ... "]"  with exactly `arity` numbers (kind "tuples")
    number := -?(0|[1-9][0-9]*)(.[0-9]{1,max_decimals})?    (no exponent, no leading zeros, no -0)
Every number prefix must still be completable to a value in [low, high], and a finished number must lie in
it; values are compared exactly (as fractions), so the float that `json.loads` gives is within the bounds.
"""

from __future__ import annotations

import json
import math
import re
from fractions import Fraction
from typing import Any, NamedTuple

import torch
from transformers import LogitsProcessor, PreTrainedTokenizerBase

from discover_envs.problem import ConstructionSpec

__all__ = ["JsonArrayConstraint", "default_max_new_tokens", "row_index", "token_texts"]

#: Characters a constrained reply may contain; tokens with any other character are never allowed.
ALPHABET = frozenset("0123456789.-,[] ")

_PREFIX = re.compile(r"(-?)(0|[1-9][0-9]*)?(\.[0-9]*)?")

# Automaton phases. "open"/"comma"/"space" are the outer list; "t_*" the inside of one tuple.
_START, _OPEN, _COMMA, _SPACE, _NUMBER = "start", "open", "comma", "space", "number"
_T_OPEN, _T_COMMA, _T_SPACE, _AFTER_TUPLE, _DONE, _END = "t_open", "t_comma", "t_space", "after", "done", "end"


class _State(NamedTuple):
    """Where the reply is: `count` finished elements, `inner` finished numbers of the open tuple, the
    text of the number being written (phase "number") and the tokens `left` (None: no budget)."""

    phase: str
    count: int = 0
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


def _shortest_chars(spec: ConstructionSpec, elements: int) -> int:
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


def token_texts(tokenizer: PreTrainedTokenizerBase) -> list[str]:
    """The text each token id adds to a reply, decoded by the tokenizer's own decoder.

    Each token is decoded after an anchor token ("0") and the anchor's text is cut off, so decoders that drop
    a leading space on the first token (SentencePiece "▁") still report it. Incomplete UTF-8 byte tokens
    decode to "\ufffd", outside the JSON alphabet, and are thus never allowed.
    """
    decoder = tokenizer.backend_tokenizer.decoder
    tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    if decoder is None:
        return [token or "" for token in tokens]
    anchor = decoder.decode(["0"])
    texts = []
    for token in tokens:
        text = decoder.decode(["0", token]) if token is not None else ""
        texts.append(text[len(anchor) :] if text.startswith(anchor) else "")
    return texts


class _Numbers:
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


class _Node:
    """A character trie over the candidate tokens' texts."""

    __slots__ = ("children", "ids")

    def __init__(self) -> None:
        self.children: dict[str, _Node] = {}
        self.ids: list[int] = []


class JsonArrayConstraint:
    """Allowed next tokens for a ```json construction of `spec`'s shape, for generation and for training.

    `prefix` goes at the end of the prompt, the model writes the array, and `suffix` is appended after the
    end of generation: the reply is prefix + decoded completion + suffix. With `max_new_tokens` (the reply
    budget of generation) every allowed token leaves room to close the array in time; `min_new_tokens` is
    the shortest array's length in tokens, and a smaller budget raises ValueError.
    """

    prefix = "```json\n"
    suffix = "\n```"

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        spec: ConstructionSpec,
        max_decimals: int = 6,
        eos_token_id: int | None = None,
        max_new_tokens: int | None = None,
    ) -> None:
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
        self.numbers = _Numbers(spec.low, spec.high, max_decimals)
        self.eos_token_id = tokenizer.eos_token_id if eos_token_id is None else eos_token_id
        if self.eos_token_id is None:
            raise ValueError("the tokenizer has no eos_token_id; pass eos_token_id")
        self.vocab_size = len(tokenizer)
        self.texts = token_texts(tokenizer)
        special = set(tokenizer.all_special_ids)
        self._trie = _Node()
        longest = 0
        for token_id, text in enumerate(self.texts):
            if text and token_id not in special and set(text) <= ALPHABET:
                node = self._trie
                for char in text:
                    node = node.children.setdefault(char, _Node())
                node.ids.append(token_id)
                longest = max(longest, len(text))
        self._check_single_chars(max_decimals)
        #: A token completes at most `longest` elements, so counts further than that from the length
        #: limits behave alike (see `_key`).
        self._horizon = longest + 1
        self._allowed: dict[Any, torch.Tensor] = {}
        # Budget bookkeeping: moves per `_key` (ids and relative state after each token), shortest closing
        # costs per `_cost_key`, the slack above which the budget masks nothing, and budget-tight masks.
        self._moves: dict[Any, list[tuple[list[int], _State]]] = {}
        self._costs: dict[Any, int] = {}
        self._caps: dict[Any, int] = {}
        self._tight: dict[Any, torch.Tensor] = {}
        self.max_new_tokens = max_new_tokens
        self.min_new_tokens: int | None = None
        if max_new_tokens is not None:
            if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
                raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
            self._check_fits(max_new_tokens, longest)
            self.min_new_tokens = self._cost(_State(_START))
            if self.min_new_tokens > max_new_tokens:
                raise ValueError(
                    f"max_new_tokens={max_new_tokens} cannot hold a construction of this spec: the shortest valid "
                    f"array ({spec.min_length} {'tuples' if self.tuples else 'numbers'}) takes "
                    f"{self.min_new_tokens} tokens of this tokenizer; raise --max-new-tokens to at least "
                    f"{self.min_new_tokens}"
                )

    def _check_single_chars(self, max_decimals: int) -> None:
        """Single-character tokens for every character the grammar may need, so it never reaches a state
        that no token can continue."""
        needed = set("0123456789,[]") | ({"."} if max_decimals > 0 else set())
        if self.numbers.lo is None or self.numbers.lo < 0:
            needed.add("-")
        singles = {char for char, node in self._trie.children.items() if node.ids}
        missing = sorted(needed - singles)
        if missing:
            raise ValueError(f"the tokenizer has no single-character token for {missing}")

    def _check_fits(self, max_new_tokens: int, longest: int) -> None:
        """Refuse, by arithmetic and before any search, a spec whose shortest array (or, when it may be empty,
        whose one element) has more characters than `max_new_tokens` tokens of at most `longest` characters
        can hold: the closing search walks every element count and tuple position up to that size, so an
        unbounded spec (minItems = 10**9) would cost unbounded time and memory."""
        spec = self.spec
        elements = min(max(spec.min_length, 1), spec.max_length)
        chars = _shortest_chars(spec, elements)
        if chars > max_new_tokens * longest:
            what = f"{elements} {'tuples' if self.tuples else 'numbers'}"
            raise ValueError(
                f"max_new_tokens={max_new_tokens} cannot hold a construction of this spec: the shortest array of "
                f"{what} has {chars} characters, and a token of this tokenizer holds at most {longest}; raise "
                f"--max-new-tokens to at least {-(-chars // longest)}"
            )

    # -- the automaton ---------------------------------------------------------------------------------

    def _element_start(self, state: _State, char: str) -> _State | None:
        if self.tuples:
            return _State(_T_OPEN, state.count) if char == "[" else None
        return self._number_char(state, char)

    def _number_char(self, state: _State, char: str) -> _State | None:
        text = state.number + char
        return state._replace(phase=_NUMBER, number=text) if self.numbers.feasible(text) else None

    def _end_number(self, state: _State, char: str) -> _State | None:
        """',' or ']' after a number: the number must be finished and the counts must allow it."""
        if char not in ",]" or not self.numbers.complete(state.number):
            return None
        spec = self.spec
        if self.tuples:
            inner = state.inner + 1
            if char == "," and inner < spec.arity:
                return _State(_T_COMMA, state.count, inner)
            if char == "]" and inner == spec.arity:
                return _State(_AFTER_TUPLE, state.count + 1)
            return None
        count = state.count + 1
        if char == "," and count < spec.max_length:
            return _State(_COMMA, count)
        if char == "]" and count >= spec.min_length:
            return _State(_DONE, count)
        return None

    def step(self, state: _State, char: str) -> _State | None:
        """The state after one more character, or None if the character breaks the grammar."""
        phase = state.phase
        if phase == _START:
            return _State(_OPEN) if char == "[" else None
        if phase == _NUMBER:
            return self._end_number(state, char) if char in ",]" else self._number_char(state, char)
        if phase in (_OPEN, _AFTER_TUPLE) and char == "]":
            return _State(_DONE, state.count) if state.count >= self.spec.min_length else None
        if phase == _AFTER_TUPLE:
            return _State(_COMMA, state.count) if char == "," and state.count < self.spec.max_length else None
        if phase in (_COMMA, _T_COMMA) and char == " ":
            return state._replace(phase=_SPACE if phase == _COMMA else _T_SPACE)
        if phase in (_OPEN, _COMMA, _SPACE):
            return self._element_start(state, char)
        if phase in (_T_OPEN, _T_COMMA, _T_SPACE):
            return self._number_char(state, char)
        return None

    def _key(self, state: _State) -> Any:
        """States with equal keys allow the same tokens; the cache of masks is keyed by it."""
        if state.phase in (_DONE, _END):
            return _DONE
        horizon = self._horizon
        to_min = min(max(self.spec.min_length - state.count, 0), horizon)
        to_max = min(self.spec.max_length - state.count, horizon)
        number = self.numbers.key(state.number) if state.phase == _NUMBER else ""
        return state.phase, to_min, to_max, state.inner, number

    def _walk(self, state: _State, node: _Node, allowed: list[int]) -> None:
        for char, child in node.children.items():
            after = self.step(state, char)
            if after is not None:
                allowed.extend(child.ids)
                self._walk(after, child, allowed)

    def allowed_ids(self, state: _State) -> torch.Tensor:
        """Ids [k] of the tokens allowed in `state` (only EOS once the array is closed), cached by `_key`:
        a few hundred ids at most, so masking costs one fill of the logits instead of vocab-wide masks.
        With a budget, only the tokens after which the array can still be closed in the tokens left."""
        if state.left is not None:
            return self._budget_ids(state)
        key = self._key(state)
        ids = self._allowed.get(key)
        if ids is None:
            found: list[int] = []
            if key == _DONE:
                found.append(self.eos_token_id)
            else:
                self._walk(state, self._trie, found)
            ids = self._allowed[key] = torch.tensor(sorted(found), dtype=torch.long)
        return ids

    def allowed(self, state: _State) -> torch.Tensor:
        """Bool mask [vocab] of the tokens allowed in `state`."""
        mask = torch.zeros(self.vocab_size, dtype=torch.bool)
        mask[self.allowed_ids(state)] = True
        return mask

    def advance(self, state: _State, token_id: int) -> _State | None:
        """The state after a token, or None if the grammar (or the budget) does not allow it there."""
        left = state.left
        if left is not None and left < 1:
            return None
        if state.phase == _DONE:
            after = _State(_END, state.count) if token_id == self.eos_token_id else None
        else:
            after = self._advance_free(state._replace(left=None), token_id)
        if after is None or left is None:
            return after
        if self._cost(after) > left - 1:
            return None
        return after._replace(left=left - 1)

    def _advance_free(self, state: _State, token_id: int) -> _State | None:
        """`advance` by the grammar alone, on a state without budget."""
        if token_id == self.eos_token_id or not 0 <= token_id < self.vocab_size:
            return None
        for char in self.texts[token_id]:
            state = self.step(state, char)
            if state is None:
                return None
        return state

    @property
    def start(self) -> _State:
        """The state before the first token, holding the whole budget `max_new_tokens`."""
        return _State(_START, left=self.max_new_tokens)

    # -- the budget ------------------------------------------------------------------------------------

    def _cost_key(self, state: _State) -> Any:
        """States with equal keys need equally many tokens to close: exact counts to the minimum length;
        a finished number counts as one class, since `_successors` only closes it."""
        if state.phase in (_DONE, _END):
            return _DONE
        number = ""
        if state.phase == _NUMBER:
            number = "#" if self.numbers.complete(state.number) else self.numbers.key(state.number)
        to_min = max(self.spec.min_length - state.count, 0)
        return state.phase, to_min, min(self.spec.max_length - state.count, self._horizon), state.inner, number

    def _moves_from(self, state: _State) -> list[tuple[list[int], _State]]:
        """Every allowed token of a budget-free `state` with the state after it, counts relative to `state`
        (cached by `_key`, which fixes what the tokens do)."""
        key = self._key(state)
        moves = self._moves.get(key)
        if moves is None:
            found: dict[_State, list[int]] = {}
            self._walk_states(state, self._trie, found)
            moves = self._moves[key] = [(ids, s._replace(count=s.count - state.count)) for s, ids in found.items()]
        return moves

    def _walk_states(self, state: _State, node: _Node, found: dict[_State, list[int]]) -> None:
        for char, child in node.children.items():
            after = self.step(state, char)
            if after is not None:
                if child.ids:
                    found.setdefault(after, []).extend(child.ids)
                self._walk_states(after, child, found)

    def _successors(self, state: _State) -> list[_State]:
        """States one token on, for the closing search: any token, except that a finished number is only
        closed (",", "]"), never lengthened, and no element is started past the minimum length. Neither
        makes a reply shorter; leaving them out keeps the search finite and free of cycles, so its result
        does not depend on the order in which states are asked for."""
        finished = state.phase == _NUMBER and self.numbers.complete(state.number)
        found = []
        for ids, moved in self._moves_from(state):
            after = moved._replace(count=moved.count + state.count)
            if finished and not any(self.texts[i][0] in ",]" for i in ids):
                continue
            if after.phase in (_COMMA, _SPACE) and after.count >= self.spec.min_length:
                continue
            found.append(after)
        return found

    def _cost(self, state: _State) -> int:
        """Fewest tokens that close the array from a budget-free `state` (0 once closed), by a depth-first
        search memoised on `_cost_key`. Every step of the grammar moves forward (more characters, never an
        earlier phase), so the search graph has no cycles other than a number keeping its key."""
        costs = self._costs
        root = self._cost_key(state)
        if root in costs:
            return costs[root]
        stack, open_keys = [state], set()
        while stack:
            current = stack[-1]
            key = self._cost_key(current)
            if key in costs:
                stack.pop()
                continue
            if key == _DONE:
                costs[key] = 0
                stack.pop()
                continue
            open_keys.add(key)
            after = [(self._cost_key(s), s) for s in self._successors(current)]
            pending = [s for k, s in after if k not in costs and k not in open_keys]
            if pending:
                stack.extend(pending)
                continue
            known = [costs[k] for k, _ in after if k in costs]
            costs[key] = 1 + min(known) if known else math.inf
            open_keys.discard(key)
            stack.pop()
        return costs[root]

    def _budget_ids(self, state: _State) -> torch.Tensor:
        """`allowed_ids` under a budget: the grammar's tokens after which `_cost` fits in the tokens left."""
        free = state._replace(left=None)
        if state.phase in (_DONE, _END):
            return self.allowed_ids(free)  # EOS, also for rows padded after it
        key = self._cost_key(free)
        cost = self._cost(free)
        cap = self._caps.get(key)
        if cap is None:
            worst = max(self._cost(after) for after in self._after_states(free))
            cap = self._caps[key] = worst - cost + 1
        slack = state.left - cost
        if slack >= cap:
            return self.allowed_ids(free)
        tight_key = (self._key(free), key, slack)
        ids = self._tight.get(tight_key)
        if ids is None:
            limit = state.left - 1
            found = [
                i
                for token_ids, after in self._moves_from(free)
                if self._cost(after._replace(count=after.count + free.count)) <= limit
                for i in token_ids
            ]
            ids = self._tight[tight_key] = torch.tensor(sorted(found), dtype=torch.long)
        return ids

    def _after_states(self, state: _State) -> list[_State]:
        return [after._replace(count=after.count + state.count) for _, after in self._moves_from(state)]

    # -- the public face -------------------------------------------------------------------------------

    def logits_processor(self, prompt_length: int) -> LogitsProcessor:
        """A processor for `generate` on prompts (left-padded to `prompt_length`) that end with `prefix`."""
        return _ConstraintProcessor(self, prompt_length)

    def token_masks(self, completion_ids: list[int]) -> torch.Tensor:
        """Bool [T, vocab]: the tokens allowed at each position of a sampled completion (ending at EOS, or
        cut short); raises ValueError naming the first token that breaks the grammar."""
        allowed = self.token_allowed_ids(completion_ids)
        masks = torch.zeros(len(allowed), self.vocab_size, dtype=torch.bool)
        if allowed:
            masks[row_index(allowed), torch.cat(allowed)] = True
        return masks

    def token_allowed_ids(self, completion_ids: list[int]) -> list[torch.Tensor]:
        """`token_masks` as the ids allowed at each position, for callers that compute only those logits."""
        ids = [int(i) for i in completion_ids]
        allowed: list[torch.Tensor] = []
        state = self.start
        for position, token_id in enumerate(ids):
            if state.phase == _END:
                raise ValueError(f"completion has tokens after EOS (position {position}, id {token_id})")
            allowed.append(self.allowed_ids(state))
            after = self.advance(state, token_id)
            if after is None:
                written = "".join(self.texts[i] for i in ids[:position])
                shown = self.texts[token_id] if 0 <= token_id < self.vocab_size else "?"
                raise ValueError(
                    f"token {position} (id {token_id}, {shown!r}) breaks the {self.spec.kind} grammar after {written!r}"
                )
            state = after
        return allowed

    def parse(self, text: str) -> list:
        """The array text (without prefix/suffix) as a Python list."""
        value = json.loads(text)
        if not isinstance(value, list):
            raise ValueError(f"expected a JSON array, got {type(value).__name__}")
        return value


class _ConstraintProcessor(LogitsProcessor):
    """Masks each row's logits to what the grammar allows after the tokens that row generated so far.

    Rows are followed incrementally (one token per call); a new batch, or a shorter one, starts over. A row
    that has emitted EOS is finished: `generate` pads it, and the padding is not read.
    """

    def __init__(self, constraint: JsonArrayConstraint, prompt_length: int) -> None:
        if prompt_length < 0:
            raise ValueError(f"prompt_length must be >= 0, got {prompt_length}")
        self.constraint = constraint
        self.prompt_length = prompt_length
        self.states: list[_State] = []
        self.seen = 0

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        allowed = self.allowed_ids(input_ids)
        rows, cols = row_index(allowed).to(scores.device), torch.cat(allowed).to(scores.device)
        masked = torch.full_like(scores, -math.inf)
        masked[rows, cols] = scores[rows, cols]
        return masked

    def allowed_ids(self, input_ids: torch.LongTensor) -> list[torch.Tensor]:
        """Ids of the tokens each row may take next, after the tokens it generated so far: what `__call__`
        masks to, for callers that compute only those logits."""
        generated = input_ids.shape[1] - self.prompt_length
        if generated < 0:
            raise ValueError(f"input has {input_ids.shape[1]} tokens, fewer than prompt_length {self.prompt_length}")
        if len(self.states) != input_ids.shape[0] or generated < self.seen:
            self.states = [self.constraint.start] * input_ids.shape[0]
            self.seen = 0
        if generated > self.seen:
            new = input_ids[:, self.prompt_length + self.seen :].tolist()
            for row, tokens in enumerate(new):
                for token_id in tokens:
                    state = self.states[row]
                    if state.phase == _END:
                        break
                    after = self.constraint.advance(state, token_id)
                    if after is None:
                        raise ValueError(f"row {row} generated token {token_id}, which the grammar forbids")
                    self.states[row] = after
            self.seen = generated
        return [self.constraint.allowed_ids(state) for state in self.states]


def row_index(ids: list[torch.Tensor]) -> torch.Tensor:
    """Row number of every entry of `torch.cat(ids)`."""
    return torch.cat([torch.full((len(row),), i, dtype=torch.long) for i, row in enumerate(ids)])

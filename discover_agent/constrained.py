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

The grammar itself (`discover_agent.json_grammar.ArrayGrammar`) works on characters of the tokens' decoded
text; this module walks it over a trie of the vocabulary's texts.
"""

from __future__ import annotations

import json
import math
from typing import Any

import torch
from transformers import LogitsProcessor, PreTrainedTokenizerBase

from discover_agent.constraint_processor import ConstraintProcessor, row_index
from discover_agent.json_grammar import (
    ALPHABET,
    COMMA,
    DONE,
    END,
    NUMBER,
    SPACE,
    START,
    ArrayGrammar,
    State,
    shortest_chars,
)
from discover_envs.problem import ConstructionSpec

__all__ = ["JsonArrayConstraint", "token_texts"]


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


class _Node:
    """A character trie over the candidate tokens' texts."""

    __slots__ = ("children", "ids")

    def __init__(self) -> None:
        self.children: dict[str, _Node] = {}
        self.ids: list[int] = []


class JsonArrayConstraint(ArrayGrammar):
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
        super().__init__(spec, max_decimals)
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
        self._moves: dict[Any, list[tuple[list[int], State]]] = {}
        self._costs: dict[Any, float] = {}
        self._caps: dict[Any, float] = {}
        self._tight: dict[Any, torch.Tensor] = {}
        self.max_new_tokens = max_new_tokens
        self.min_new_tokens: int | None = None
        if max_new_tokens is not None:
            if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
                raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
            self._check_fits(max_new_tokens, longest)
            shortest = self._cost(State(START))
            if shortest > max_new_tokens:
                raise ValueError(
                    f"max_new_tokens={max_new_tokens} cannot hold a construction of this spec: the shortest valid "
                    f"array ({spec.min_length} {'tuples' if self.tuples else 'numbers'}) takes "
                    f"{shortest} tokens of this tokenizer; raise --max-new-tokens to at least {shortest}"
                )
            self.min_new_tokens = int(shortest)

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
        chars = shortest_chars(spec, elements)
        if chars > max_new_tokens * longest:
            what = f"{elements} {'tuples' if self.tuples else 'numbers'}"
            raise ValueError(
                f"max_new_tokens={max_new_tokens} cannot hold a construction of this spec: the shortest array of "
                f"{what} has {chars} characters, and a token of this tokenizer holds at most {longest}; raise "
                f"--max-new-tokens to at least {-(-chars // longest)}"
            )

    def _key(self, state: State) -> Any:
        """States with equal keys allow the same tokens; the cache of masks is keyed by it."""
        if state.phase in (DONE, END):
            return DONE
        horizon = self._horizon
        to_min = min(max(self.spec.min_length - state.elements, 0), horizon)
        to_max = min(self.spec.max_length - state.elements, horizon)
        number = self.numbers.key(state.number) if state.phase == NUMBER else ""
        return state.phase, to_min, to_max, state.inner, number

    def _walk(self, state: State, node: _Node, allowed: list[int]) -> None:
        for char, child in node.children.items():
            after = self.step(state, char)
            if after is not None:
                allowed.extend(child.ids)
                self._walk(after, child, allowed)

    def allowed_ids(self, state: State) -> torch.Tensor:
        """Ids [k] of the tokens allowed in `state` (only EOS once the array is closed), cached by `_key`:
        a few hundred ids at most, so masking costs one fill of the logits instead of vocab-wide masks.
        With a budget, only the tokens after which the array can still be closed in the tokens left."""
        if state.left is not None:
            return self._budget_ids(state, state.left)
        key = self._key(state)
        ids = self._allowed.get(key)
        if ids is None:
            found: list[int] = []
            if key == DONE:
                found.append(self.eos_token_id)
            else:
                self._walk(state, self._trie, found)
            ids = self._allowed[key] = torch.tensor(sorted(found), dtype=torch.long)
        return ids

    def allowed(self, state: State) -> torch.Tensor:
        """Bool mask [vocab] of the tokens allowed in `state`."""
        mask = torch.zeros(self.vocab_size, dtype=torch.bool)
        mask[self.allowed_ids(state)] = True
        return mask

    def advance(self, state: State, token_id: int) -> State | None:
        """The state after a token, or None if the grammar (or the budget) does not allow it there."""
        left = state.left
        if left is not None and left < 1:
            return None
        if state.phase == DONE:
            after = State(END, state.elements) if token_id == self.eos_token_id else None
        else:
            after = self._advance_free(state._replace(left=None), token_id)
        if after is None or left is None:
            return after
        if self._cost(after) > left - 1:
            return None
        return after._replace(left=left - 1)

    def _advance_free(self, state: State, token_id: int) -> State | None:
        """`advance` by the grammar alone, on a state without budget."""
        if token_id == self.eos_token_id or not 0 <= token_id < self.vocab_size:
            return None
        for char in self.texts[token_id]:
            after = self.step(state, char)
            if after is None:
                return None
            state = after
        return state

    @property
    def start(self) -> State:
        """The state before the first token, holding the whole budget `max_new_tokens`."""
        return State(START, left=self.max_new_tokens)

    # -- the budget ------------------------------------------------------------------------------------

    def _cost_key(self, state: State) -> Any:
        """States with equal keys need equally many tokens to close: exact counts to the minimum length;
        a finished number counts as one class, since `_successors` only closes it."""
        if state.phase in (DONE, END):
            return DONE
        number = ""
        if state.phase == NUMBER:
            number = "#" if self.numbers.complete(state.number) else self.numbers.key(state.number)
        to_min = max(self.spec.min_length - state.elements, 0)
        return state.phase, to_min, min(self.spec.max_length - state.elements, self._horizon), state.inner, number

    def _moves_from(self, state: State) -> list[tuple[list[int], State]]:
        """Every allowed token of a budget-free `state` with the state after it, counts relative to `state`
        (cached by `_key`, which fixes what the tokens do)."""
        key = self._key(state)
        moves = self._moves.get(key)
        if moves is None:
            found: dict[State, list[int]] = {}
            self._walk_states(state, self._trie, found)
            moves = self._moves[key] = [
                (ids, s._replace(elements=s.elements - state.elements)) for s, ids in found.items()
            ]
        return moves

    def _walk_states(self, state: State, node: _Node, found: dict[State, list[int]]) -> None:
        for char, child in node.children.items():
            after = self.step(state, char)
            if after is not None:
                if child.ids:
                    found.setdefault(after, []).extend(child.ids)
                self._walk_states(after, child, found)

    def _successors(self, state: State) -> list[State]:
        """States one token on, for the closing search: any token, except that a finished number is only
        closed (",", "]"), never lengthened, and no element is started past the minimum length. Neither
        makes a reply shorter; leaving them out keeps the search finite and free of cycles, so its result
        does not depend on the order in which states are asked for."""
        finished = state.phase == NUMBER and self.numbers.complete(state.number)
        found = []
        for ids, moved in self._moves_from(state):
            after = moved._replace(elements=moved.elements + state.elements)
            if finished and not any(self.texts[i][0] in ",]" for i in ids):
                continue
            if after.phase in (COMMA, SPACE) and after.elements >= self.spec.min_length:
                continue
            found.append(after)
        return found

    def _cost(self, state: State) -> float:
        """Fewest tokens that close the array from a budget-free `state` (0 once closed, inf if it cannot be),
        by a depth-first search memoised on `_cost_key`. Every step of the grammar moves forward (more characters,
        never an earlier phase), so the search graph has no cycles other than a number keeping its key."""
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
            if key == DONE:
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

    def _budget_ids(self, state: State, left: int) -> torch.Tensor:
        """`allowed_ids` under a budget: the grammar's tokens after which `_cost` fits in the `left` tokens."""
        free = state._replace(left=None)
        if state.phase in (DONE, END):
            return self.allowed_ids(free)  # EOS, also for rows padded after it
        key = self._cost_key(free)
        cost = self._cost(free)
        cap = self._caps.get(key)
        if cap is None:
            worst = max(self._cost(after) for after in self._after_states(free))
            cap = self._caps[key] = worst - cost + 1
        slack = left - cost
        if slack >= cap:
            return self.allowed_ids(free)
        tight_key = (self._key(free), key, slack)
        ids = self._tight.get(tight_key)
        if ids is None:
            limit = left - 1
            found = [
                i
                for token_ids, after in self._moves_from(free)
                if self._cost(after._replace(elements=after.elements + free.elements)) <= limit
                for i in token_ids
            ]
            ids = self._tight[tight_key] = torch.tensor(sorted(found), dtype=torch.long)
        return ids

    def _after_states(self, state: State) -> list[State]:
        return [after._replace(elements=after.elements + state.elements) for _, after in self._moves_from(state)]

    # -- the public face -------------------------------------------------------------------------------

    def logits_processor(self, prompt_length: int) -> LogitsProcessor:
        """A processor for `generate` on prompts (left-padded to `prompt_length`) that end with `prefix`."""
        return ConstraintProcessor(self, prompt_length)

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
            if state.phase == END:
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

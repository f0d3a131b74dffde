"""The problem: what the model is asked (prompt), how its reply is read (parse), how it is scored (verify).

A task is one subclass of `Problem` in `discover_envs/problems/` plus one line in `registry.py`.
Construction tasks (the mathematics suite) subclass `ConstructionProblem`, which already knows how to read a
```json construction or run a ```python `run(**kwargs)` in the sandbox; they only add `validate` and `score`.
"""

from __future__ import annotations

import json
import math
import re
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np

from discover_envs.sandbox import SandboxLimits, run_function
from discover_envs.state import make_state

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "ConstructionProblem",
    "ConstructionSpec",
    "Evaluation",
    "InvalidSolution",
    "InvalidState",
    "Problem",
    "checked_int",
    "extract_block",
    "parse_json",
]


class InvalidSolution(ValueError):
    """The reply or its construction breaks the problem's rules; the message says which rule and where."""


class InvalidState(ValueError):
    """A restart state handed to `reset(options={"state": ...})` failed validation."""


@dataclass(frozen=True)
class ConstructionSpec:
    """Machine-readable shape of a construction, so agents can constrain decoding to valid JSON.

    kind: "sequence" (a flat list of numbers) or "tuples" (a list of `arity`-number lists, e.g. [x, y, r]).
    min_length/max_length: how many elements the list may have. low/high: bounds of every number.
    """

    kind: Literal["sequence", "tuples"]
    min_length: int
    max_length: int
    low: float
    high: float
    arity: int = 1

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Evaluation:
    """A verified attempt: the problem's own figure, the RL reward, and what produced it."""

    score: float
    reward: float
    construction: Any = None
    code: str | None = None
    details: dict[str, Any] = field(default_factory=dict)


#: The paper's closing line for a start state: only a real step forward pays.
MEANINGFUL_IMPROVEMENT = (
    "Try to do something different from this construction: unless you make a meaningful improvement, you will "
    "not be rewarded."
)
_TAG = re.compile(r"[ \t]*([A-Za-z0-9_+-]*)")
_FENCE = "```"


def extract_block(reply: str, languages: tuple[str, ...]) -> tuple[str, str] | None:
    """Return (language, body) of the last fenced block whose tag is in `languages`, else None.

    The last block wins because models often restate the start state before giving their answer. A block is
    a fence, a tag and the rest of its line, then a body up to the next fence. One left-to-right pass (each
    character is looked at a bounded number of times), so a reply of unclosed fences costs linear time.
    """
    found = None
    start = 0
    while True:
        opener = reply.find(_FENCE, start)
        if opener < 0:
            return found
        newline = reply.find("\n", opener + 3)
        closer = reply.find(_FENCE, newline + 1) if newline >= 0 else -1
        if closer < 0:  # no later opener can have a newline and a closer after it either
            return found
        match = _TAG.match(reply, opener + 3, newline)
        tag = match.group(1).lower() if match else ""  # the pattern matches the empty string, so always
        if tag in languages:
            found = (tag, reply[newline + 1 : closer])
        start = closer + 3


def parse_json(text: str, what: str) -> Any:
    """`json.loads` that raises only `InvalidSolution`: integers too long for an exact float become floats
    (inf beyond float range, which number checks then refuse by name), and deep nesting is an error."""
    try:
        return json.loads(text, parse_int=_parse_int)
    except (ValueError, RecursionError) as exc:
        raise InvalidSolution(f"{what} is not valid JSON: {exc or 'nested too deeply'}") from None


def _parse_int(digits: str) -> int | float:
    # Python refuses int() of over 4300 digits (and float(int) of over ~309); float() of the text never does.
    return int(digits) if len(digits) <= 18 else float(digits)


def checked_int(name: str, value: Any, low: int, high: int | None = None) -> int:
    """A constructor argument that must be an integer in [low, high] (high None: no upper bound), as an int;
    numpy integers pass, bools, floats and strings do not: ValueError naming the argument and its value."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer, got {value!r:.40} ({type(value).__name__})")
    if value < low or (high is not None and value > high):
        span = f"in {low}..{high}" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be an integer {span}, got {value!r}")
    return int(value)


class Problem(ABC):
    """One scientific task with an exact verifier. Subclasses are the environments' manuals.

    Every score is recomputed here, in the trusted parent process: nothing a candidate reports is believed.
    """

    title: ClassVar[str]
    higher_is_better: ClassVar[bool]
    #: Reward of an invalid attempt; below every valid reward.
    failure_reward: ClassVar[float] = 0.0
    #: Relative tolerance when `reset` compares a restart state's score with `rescore`. Deterministic float64
    #: verifiers leave room only for JSON rounding; tasks whose score depends on BLAS threading loosen it.
    score_rtol: ClassVar[float] = 1e-12
    #: Size in inches (100 pixels an inch) of the figure `draw` fills.
    draw_size: ClassVar[tuple[float, float]] = (6.4, 4.8)

    def __init__(self, *, timeout_s: float = 60.0, memory_mb: int = 4096) -> None:
        if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or not 0 < timeout_s < math.inf:
            raise ValueError(f"timeout_s must be a positive finite number of seconds, got {timeout_s!r}")
        self.limits = SandboxLimits(timeout_s=float(timeout_s), memory_mb=checked_int("memory_mb", memory_mb, 64))

    @abstractmethod
    def statement(self) -> str:
        """Problem text and rules, shown at the top of every prompt."""

    @abstractmethod
    def initial_state(self, rng: np.random.Generator) -> dict[str, Any]:
        """The start state of a fresh episode (built with `make_state`), drawn from `rng` when random."""

    @abstractmethod
    def evaluate(self, reply: str, state: dict[str, Any]) -> Evaluation:
        """Read and verify a reply made from `state`; raise `InvalidSolution` with a clear message."""

    @abstractmethod
    def rescore(self, state: dict[str, Any]) -> float:
        """Recompute the score of a restart state from its content; raise `InvalidState` if invalid."""

    @abstractmethod
    def render_state(self, state: dict[str, Any]) -> str:
        """The start-state section of the prompt (construction and/or code, and its score)."""

    #: lambda of TTT-Discover's KL penalty for this task (0.01 for algorithm engineering, 0.1 elsewhere).
    kl_coef: ClassVar[float] = 0.1
    #: Constructor arguments of a small instance a 135M model on 2 CPU cores can act on (e.g. n = 16); agents
    #: use them when no env arguments are given (`discover_envs.cpu_preset`).
    cpu_preset: ClassVar[dict[str, Any]] = {}
    #: The literature's figures for this problem as (who, value), best last; see `published`.
    published_figures: ClassVar[tuple[tuple[str, float], ...]] = ()

    def published(self) -> list[tuple[str, float]]:
        """The published figures for this instance (context for prompts and leaderboards; often full size)."""
        return list(self.published_figures)

    def target(self) -> float | None:
        """The best published figure, the target the prompt names; None where nothing is published."""
        values = [value for _, value in self.published()]
        if not values:
            return None
        return max(values) if self.higher_is_better else min(values)

    def is_copy(self, parent: dict[str, Any], child: dict[str, Any]) -> bool:
        """Whether `child` only restates `parent` (a diagnostic of the agent, not a rule): same content."""
        return child["id"] == parent["id"]

    def draw(self, state: dict[str, Any], fig: Figure) -> None:
        """Draw `state` on the empty matplotlib figure `fig` (`render_mode="rgb_array"`, `discover report`).
        The default is a card with the score and the head of the code; a problem whose states have a picture
        (a step function, a packing, per-case scores) overrides it. Drawing is for people: it never scores."""
        from discover_envs.drawing import text_card

        text_card(fig, self.title, [f"{getattr(self, 'figure', 'score')}: {state['score']:.10g}"], state.get("code"))

    def pinned_kwargs(self) -> dict[str, Any]:
        """Constructor arguments this instance drew itself (e.g. a secret seed) that another instance needs to
        score states the same way: agents pin them in the run's config, so evaluators and a resumed run agree.
        Most problems draw nothing: {}."""
        return {}

    def reward(self, score: float) -> float:
        """Map the problem's figure to a reward where higher is better: the figure itself, or for problems
        that minimise a positive bound its reciprocal (as TTT-Discover does), so `failure_reward` = 0 sits
        below every valid attempt."""
        if self.higher_is_better:
            return float(score)
        if not score > 0:
            raise ValueError(f"{self.title}: a minimised bound must be positive, got {score!r}")
        return 1.0 / float(score)

    def prompt(self, state: dict[str, Any]) -> str:
        budget = f"Time budget: your code may run for at most {self.limits.timeout_s:g} seconds."
        return f"{self.statement().strip()}\n\n{self.render_state(state).strip()}\n\n{budget}\n"


class ConstructionProblem(Problem):
    """A problem whose solution is a list of numbers (or of number tuples) checked by an exact formula.

    Actions: a ```json block with the construction itself, or a ```python block defining `run(**kwargs)` that
    returns it; `run` receives the start state's construction as the numpy keyword `construction`.
    """

    spec: ConstructionSpec
    #: The problem's own name for its figure, e.g. "C5 upper bound".
    figure: ClassVar[str]
    #: Decimal places of the score shown in prompts.
    shown_digits: ClassVar[int] = 10
    #: Most decimal places of a construction's numbers in prompts (trailing zeros dropped). Four keep a prompt
    #: and a reply that copies it short (~8 tokens a number, see `constrained.default_max_new_tokens`) where
    #: full floats take ~20; finer numbers are shown rounded (`run` still receives them exactly).
    shown_decimals: ClassVar[int] = 4
    #: Longest construction text shown in a prompt; longer ones are summarised (code still gets all of it).
    max_shown_chars: ClassVar[int] = 4000

    @property
    def construction_spec(self) -> ConstructionSpec:
        return self.spec

    @abstractmethod
    def validate(self, construction: Any) -> np.ndarray:
        """Check a construction strictly and return it as a float64 array; raise `InvalidSolution`."""

    @abstractmethod
    def score(self, construction: np.ndarray) -> float:
        """The problem's figure for a construction that passed `validate`."""

    @abstractmethod
    def initial_construction(self, rng: np.random.Generator) -> np.ndarray:
        """A valid start construction drawn from `rng`."""

    def check_array(self, construction: Any) -> np.ndarray:
        """Shared boundary checks: numbers only (no bools/strings), finite, shape and bounds of `spec`."""
        spec = self.spec
        if isinstance(construction, np.ndarray):
            if construction.dtype.kind not in "iuf":
                raise InvalidSolution(f"construction must hold numbers, got dtype {construction.dtype}")
            array = construction.astype(np.float64)
        else:
            try:
                _reject_non_numbers(construction)
            except RecursionError:
                raise InvalidSolution("construction is nested too deeply") from None
            try:
                array = np.asarray(construction, dtype=np.float64)
            except (TypeError, ValueError) as exc:
                raise InvalidSolution(f"construction is not a rectangular list of numbers: {exc}") from None
        want_ndim = 1 if spec.kind == "sequence" else 2
        if array.ndim != want_ndim or (want_ndim == 2 and array.shape[1] != spec.arity):
            shape = "a flat list" if want_ndim == 1 else f"a list of {spec.arity}-number lists"
            raise InvalidSolution(f"construction must be {shape}, got an array of shape {array.shape}")
        n = array.shape[0]
        if not spec.min_length <= n <= spec.max_length:
            raise InvalidSolution(f"construction has {n} elements; allowed {spec.min_length}..{spec.max_length}")
        bad = ~np.isfinite(array)
        if bad.any():
            index = tuple(int(i) for i in np.argwhere(bad)[0])
            raise InvalidSolution(f"construction has a non-finite value {array[index]} at index {index}")
        outside = (array < spec.low) | (array > spec.high)
        if outside.any():
            index = tuple(int(i) for i in np.argwhere(outside)[0])
            raise InvalidSolution(f"value {array[index]!r} at index {index} is outside [{spec.low}, {spec.high}]")
        return array

    def verify(self, construction: Any) -> tuple[np.ndarray, float]:
        array = self.validate(construction)
        return array, float(self.score(array))

    def initial_state(self, rng: np.random.Generator) -> dict[str, Any]:
        array, score = self.verify(self.initial_construction(rng))
        return make_state(score=score, reward=self.reward(score), construction=array.tolist())

    def evaluate(self, reply: str, state: dict[str, Any]) -> Evaluation:
        block = extract_block(reply, ("json", "python", "py"))
        if block is None:
            raise InvalidSolution("the reply has no fenced ```json or ```python block")
        language, body = block
        code = None
        if language == "json":
            construction = parse_json(body, "the ```json block")
        else:
            code = body
            start = np.asarray(state["construction"], dtype=np.float64)
            result = run_function(code, "run", {"construction": start}, self.limits)
            if not result.ok:
                raise InvalidSolution(result.error)
            construction = result.value
        array, score = self.verify(construction)
        return Evaluation(score=score, reward=self.reward(score), construction=array.tolist(), code=code)

    def rescore(self, state: dict[str, Any]) -> float:
        try:
            return self.verify(state["construction"])[1]
        except InvalidSolution as exc:
            raise InvalidState(f"state construction is invalid: {exc}") from None

    def is_copy(self, parent: dict[str, Any], child: dict[str, Any]) -> bool:
        """A copy is within the prompt's rounding of its parent: every number within one unit of the last shown
        decimal (relative to the largest, since verifiers may rescale a construction)."""
        a, b = np.asarray(parent["construction"], np.float64), np.asarray(child["construction"], np.float64)
        if a.shape != b.shape:
            return False
        scale = max(1.0, float(np.abs(a).max(initial=0.0)))
        return bool(np.all(np.abs(a - b) <= 10.0**-self.shown_decimals * scale))

    def render_state(self, state: dict[str, Any]) -> str:
        """The start state as the paper's prompts show it: its value after its parent's ("before and after:
        a -> b", or the current value for a root), the target and the gap to it, the construction, and the line
        that only a meaningful improvement is rewarded."""
        text = format_numbers(state["construction"], self.shown_decimals)
        if len(text) > self.max_shown_chars:
            array = np.asarray(state["construction"])
            text = (
                f"(a construction of {array.shape[0]} elements, too long to show; it is passed to `run` as "
                f"`construction`; min {array.min():.6g}, max {array.max():.6g}, mean {array.mean():.6g})"
            )
        name, digits = self.figure.partition(" (")[0], self.shown_digits
        if state.get("parent_score") is None:
            values = [f"Current {name}: {state['score']:.{digits}f}"]
        else:
            values = [
                f"{name} before and after this construction: {state['parent_score']:.{digits}f} -> "
                f"{state['score']:.{digits}f}"
            ]
        target = self.target()
        if target is not None:
            verb = "raise it to at least" if self.higher_is_better else "lower it to at most"
            gap = target - state["score"] if self.higher_is_better else state["score"] - target
            values.append(f"Target: {verb} {target:.10g} (best known); gap {gap:.{digits}f}.")
        parts = ["## Start state\n" + "\n".join(values)]
        if state.get("code"):
            parts.append(f"Code that produced it:\n```python\n{state['code'].rstrip()}\n```")
        parts.append(f"Construction:\n{text}")
        parts.append(MEANINGFUL_IMPROVEMENT)
        return "\n\n".join(parts)

    def drawable(self, state: dict[str, Any]) -> tuple[np.ndarray, str | None]:
        """(construction as the verifier sees it, None), or (the raw numbers, why they are invalid) so a
        drawing can still show and mark a broken construction."""
        try:
            return self.validate(state["construction"]), None
        except InvalidSolution as exc:
            return np.asarray(state["construction"], dtype=np.float64), str(exc)

    def draw(self, state: dict[str, Any], fig: Figure) -> None:
        """The construction's numbers by index (one line per coordinate for tuples), titled with the score."""
        values, error = self.drawable(state)
        ax = fig.add_subplot()
        if values.ndim == 1:
            ax.stairs(values, np.arange(values.size + 1), fill=True, alpha=0.5)
        else:
            for column in range(values.shape[1]):
                ax.plot(values[:, column], marker=".", label=f"coordinate {column}")
            ax.legend()
        ax.set(xlabel="element", ylabel="value")
        ax.set_title(error or f"{self.figure}: {state['score']:.10g}", fontsize=10)

    def output_rules(self) -> str:
        """How to answer; construction problems share it so every prompt reads the same."""
        spec = self.spec
        length = (
            f"exactly {spec.min_length}"
            if spec.min_length == spec.max_length
            else f"{spec.min_length} to {spec.max_length}"
        )
        element = "number" if spec.kind == "sequence" else f"[{', '.join(['number'] * spec.arity)}] list"
        return (
            "## How to answer\n"
            f"Give an improved construction: a list of {length} elements, each a {element} in "
            f"[{spec.low:g}, {spec.high:g}]. Either write it directly in one ```json block, or write one "
            "```python block defining `run(**kwargs)` that returns it (numpy is available; `run` receives "
            "the start state's construction as the numpy array keyword `construction`). "
            "The last such block counts."
        )


def format_numbers(value: Any, decimals: int) -> str:
    """JSON text of a number or nested list of numbers, each rounded to at most `decimals` decimal places
    with trailing zeros dropped ("0.25", "1", not "0.250000" or "1.0"); the prompt's view of a state."""
    if isinstance(value, (list, tuple, np.ndarray)):
        return "[" + ", ".join(format_numbers(item, decimals) for item in value) + "]"
    text = f"{float(value):.{decimals}f}"
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return "0" if text == "-0" else text


def _reject_non_numbers(value: Any, path: str = "construction") -> None:
    """Bools and strings parse as numbers in numpy; a strict verifier refuses them by name."""
    if isinstance(value, (bool, np.bool_)):
        raise InvalidSolution(f"{path} is a boolean ({value!r}), not a number")
    if isinstance(value, (str, bytes)):
        raise InvalidSolution(f"{path} is a string ({str(value)[:40]!r}), not a number")
    if isinstance(value, dict):
        raise InvalidSolution(f"{path} is an object, not a number or list")
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _reject_non_numbers(item, f"{path}[{i}]")
    elif value is None:
        raise InvalidSolution(f"{path} is null, not a number")

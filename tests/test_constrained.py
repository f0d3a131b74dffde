"""Grammar-constrained decoding: every constrained sample is a valid construction of the env's spec."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList

import discover_envs
from discover_agent import json_grammar
from discover_agent.constrained import JsonArrayConstraint, token_texts
from discover_agent.json_grammar import default_max_new_tokens
from discover_envs.problem import ConstructionSpec, format_numbers

sys.path.insert(0, str(Path(__file__).parent))
from tiny_model import build_model, build_tokenizer

SEQUENCE_01 = ConstructionSpec("sequence", 5, 5, 0.0, 1.0)
SEQUENCE_WIDE = ConstructionSpec("sequence", 3, 7, -2.0, 3.0)
TUPLES_01 = ConstructionSpec("tuples", 4, 4, 0.0, 1.0, arity=3)

#: The construction envs (a small CPU preset each where the problem has one).
CONSTRUCTION_ENVS = ["discover/AC1-v0", "discover/AC2-v0", "discover/CirclePacking26-v0", "discover/CirclePacking32-v0",
                     "discover/ErdosMinOverlap-v0"]  # fmt: skip


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="module")
def model(tokenizer):
    """One thread while this module runs: a 32-wide model gains nothing from more, and they thrash a busy CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield build_model(tokenizer)
    torch.set_num_threads(threads)


class _MaskRecorder(LogitsProcessor):
    """Placed right after the constraint: keeps which logits it left finite at each step."""

    def __init__(self) -> None:
        self.steps: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self.steps.append(torch.isfinite(scores))
        return scores


def _draw(model, tokenizer, constraint, n, seed, recorder, repeats, **sampling) -> list[list[int]]:
    """`n` rows of generated ids under `constraint` from left-padded prompts of `repeats` varied lengths."""
    prompts = [tokenizer(f"{'give numbers ' * (1 + i % repeats)}{constraint.prefix}")["input_ids"] for i in range(n)]
    width = max(len(p) for p in prompts)
    input_ids = torch.full((n, width), tokenizer.pad_token_id)
    attention = torch.zeros((n, width), dtype=torch.long)
    for i, ids in enumerate(prompts):
        input_ids[i, width - len(ids) :] = torch.tensor(ids)
        attention[i, width - len(ids) :] = 1
    processors = LogitsProcessorList([constraint.logits_processor(width)])
    if recorder is not None:
        processors.append(recorder)
    torch.manual_seed(seed)
    out = model.generate(
        input_ids=input_ids,
        attention_mask=attention,
        do_sample=True,
        temperature=1.3,
        logits_processor=processors,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **sampling,
    )
    return out[:, width:].tolist()


def _sample(model, tokenizer, constraint, n: int, seed: int = 0, recorder=None) -> list[list[int]]:
    """`n` constrained completions (up to and including EOS) from left-padded prompts of varied lengths."""
    completions = []
    for row in _draw(model, tokenizer, constraint, n, seed, recorder, 4, top_p=0.95, max_new_tokens=200):
        assert tokenizer.eos_token_id in row, f"generation hit max_new_tokens: {tokenizer.decode(row)!r}"
        completions.append(row[: row.index(tokenizer.eos_token_id) + 1])
    return completions


def _char_ids(constraint: JsonArrayConstraint, text: str) -> list[int]:
    """`text` written one single-character token at a time."""
    single = {t: i for i, t in enumerate(constraint.texts) if len(t) == 1}
    return [single[c] for c in text]


def _meets_spec(value, spec: ConstructionSpec, max_decimals: int = 6) -> None:
    assert isinstance(value, list)
    assert spec.min_length <= len(value) <= spec.max_length
    numbers = value
    if spec.kind == "tuples":
        assert all(isinstance(t, list) and len(t) == spec.arity for t in value)
        numbers = [x for t in value for x in t]
    for x in numbers:
        assert isinstance(x, (int, float)) and not isinstance(x, bool)
        assert spec.low <= x <= spec.high


@pytest.mark.parametrize(("spec", "n"), [(SEQUENCE_01, 17), (SEQUENCE_WIDE, 17), (TUPLES_01, 16)])
def test_every_constrained_sample_parses_and_meets_the_spec(model, tokenizer, spec, n):
    constraint = JsonArrayConstraint(tokenizer, spec)
    for completion in _sample(model, tokenizer, constraint, n):
        text = tokenizer.decode(completion, skip_special_tokens=True)
        _meets_spec(constraint.parse(text), spec)
        assert all(len(digits) <= 6 for digits in re.findall(r"\.([0-9]+)", text))


def test_erdos_env_verifies_constrained_replies_up_to_its_rescaling_rule(model, tokenizer):
    """The grammar guarantees shape and bounds; only Erdős's extra rule (rescaled h <= 1, positive sum) is
    beyond it."""
    env = gym.make("discover/ErdosMinOverlap-v0", n=5)
    spec = env.unwrapped.construction_spec
    constraint = JsonArrayConstraint(tokenizer, spec)
    env.reset(seed=0)
    for completion in _sample(model, tokenizer, constraint, 8, seed=1):
        body = tokenizer.decode(completion, skip_special_tokens=True)
        env.unwrapped.problem.check_array(json.loads(body))
        _, reward, _, _, info = env.step(constraint.prefix + body + constraint.suffix)
        if info["valid"]:
            assert reward > 0
        else:
            assert info["error"].startswith(("after rescaling", "h sums to 0")), info["error"]


def test_autocorrelation_env_accepts_every_constrained_reply_with_a_positive_height(model, tokenizer):
    env = gym.make("discover/AC1-v0", n=6)
    constraint = JsonArrayConstraint(tokenizer, env.unwrapped.construction_spec)
    env.reset(seed=0)
    for completion in _sample(model, tokenizer, constraint, 8, seed=2):
        body = tokenizer.decode(completion, skip_special_tokens=True)
        _, _, _, _, info = env.step(constraint.prefix + body + constraint.suffix)
        assert info["valid"] == any(x > 0 for x in json.loads(body)), (body, info["error"])


def test_token_masks_replay_equals_the_masks_used_during_generation(model, tokenizer):
    constraint = JsonArrayConstraint(tokenizer, SEQUENCE_WIDE)
    recorder = _MaskRecorder()
    completions = _sample(model, tokenizer, constraint, 6, seed=3, recorder=recorder)
    for row, completion in enumerate(completions):
        replay = constraint.token_masks(completion)
        assert replay.shape == (len(completion), len(tokenizer))
        for t in range(len(completion)):
            assert torch.equal(replay[t], recorder.steps[t][row])


def test_cached_masks_equal_a_token_by_token_check_of_the_grammar(model, tokenizer):
    """The mask cache merges states by a key; each mask must equal the direct per-token verdict."""
    constraint = JsonArrayConstraint(tokenizer, TUPLES_01)
    fresh = JsonArrayConstraint(tokenizer, TUPLES_01)
    for completion in _sample(model, tokenizer, constraint, 4, seed=4):
        state = fresh.start
        for token_id in completion[:-1]:
            direct = [fresh.advance(state, t) is not None for t in range(len(tokenizer))]
            assert torch.equal(constraint.allowed(state), torch.tensor(direct))
            state = fresh.advance(state, token_id)


def test_eos_is_the_only_token_once_the_array_is_closed(tokenizer):
    constraint = JsonArrayConstraint(tokenizer, SEQUENCE_WIDE)
    ids = tokenizer("[0.5, -1, 3]")["input_ids"] + [tokenizer.eos_token_id]
    masks = constraint.token_masks(ids)
    assert masks[-1].nonzero().flatten().tolist() == [tokenizer.eos_token_id]
    assert not masks[:-1, tokenizer.eos_token_id].any()


def test_processor_forces_eos_and_ignores_padding_after_it(tokenizer):
    constraint = JsonArrayConstraint(tokenizer, SEQUENCE_WIDE)
    processor = constraint.logits_processor(prompt_length=1)
    closed = _char_ids(constraint, "[1, 2, 3]")
    rows = torch.tensor([[0, *closed, tokenizer.eos_token_id, 0, 0], [0, *_char_ids(constraint, "[1, 2, 3, 0.")]])
    vocab = len(tokenizer) + 8  # models often pad the embedding past the tokenizer
    scores = processor(rows[:, :2], torch.zeros(2, vocab))
    scores = processor(rows, torch.zeros(2, vocab))
    assert torch.isfinite(scores[0]).nonzero().flatten().tolist() == [tokenizer.eos_token_id]
    digits = {str(d) for d in range(10)}
    assert {constraint.texts[int(i)][0] for i in torch.isfinite(scores[1]).nonzero()} <= digits
    assert not torch.isfinite(scores[:, len(tokenizer) :]).any()


@pytest.mark.parametrize(
    ("spec", "valid", "bad"),
    [
        (SEQUENCE_01, "[0.5, 1.", "5"),  # out of bounds
        (SEQUENCE_01, "[0.5, 0.5", "]"),  # too short
        (SEQUENCE_01, "[0.5, 0", "1"),  # leading zero
        (SEQUENCE_01, "[0.123456", "7"),  # too many decimals
        (SEQUENCE_01, "[1", "e"),  # exponent
        (SEQUENCE_01, "[", "-"),  # negative zero is the only negative left in [0, 1]
        (SEQUENCE_01, "[0.5, ", " "),  # two spaces
        (SEQUENCE_01, "[0.5", " "),  # space before a comma
        (SEQUENCE_WIDE, "[1, 2, 3, 1, 2, 3, 1", ","),  # too long
        (TUPLES_01, "[[0, 1", "]"),  # wrong arity
        (TUPLES_01, "[", "0"),  # bare number where a tuple belongs
    ],
)
def test_token_masks_reject_a_completion_that_breaks_the_grammar(tokenizer, spec, valid, bad):
    constraint = JsonArrayConstraint(tokenizer, spec)
    constraint.token_masks(_char_ids(constraint, valid))
    with pytest.raises(ValueError, match="breaks the") as caught:
        constraint.token_masks(_char_ids(constraint, valid + bad))
    assert f"{bad!r}) breaks the {spec.kind} grammar after {valid!r}" in str(caught.value)


def test_token_masks_reject_early_eos_and_tokens_after_eos(tokenizer):
    constraint = JsonArrayConstraint(tokenizer, SEQUENCE_WIDE)
    eos = tokenizer.eos_token_id
    with pytest.raises(ValueError, match="breaks the"):
        constraint.token_masks([*tokenizer("[1, 2")["input_ids"], eos])
    with pytest.raises(ValueError, match="after EOS"):
        constraint.token_masks([*tokenizer("[1, 2, 3]")["input_ids"], eos, eos])


def test_a_completion_cut_short_by_max_new_tokens_still_replays(tokenizer):
    constraint = JsonArrayConstraint(tokenizer, TUPLES_01)
    ids = tokenizer("[[0.25, 1, 0], [0.")["input_ids"]
    assert constraint.token_masks(ids).shape == (len(ids), len(tokenizer))


@pytest.mark.parametrize(
    ("low", "high", "decimals", "accepted", "refused"),
    [
        (0.0, 1.0, 6, ["0", "1", "1.000000", "0.999999", "0.5"], ["1.000001", "-0.5", "2", "1.", "-0", "-0.0"]),
        (-2.0, 3.0, 2, ["-2", "-2.00", "-0.01", "3", "0"], ["-2.01", "3.01", "-3", "0.001", "30"]),
        (0.1, 0.3, 1, ["0.1", "0.2", "0.3"], ["0", "0.0", "0.4", "0.15"]),
        (-np.inf, 1000.0, 0, ["1000", "-99999999", "7"], ["1001", "10000", "1.5"]),
    ],
)
def test_finished_numbers_must_lie_in_the_bounds(tokenizer, low, high, decimals, accepted, refused):
    constraint = JsonArrayConstraint(tokenizer, ConstructionSpec("sequence", 1, 1, low, high), max_decimals=decimals)
    for number in accepted:
        constraint.token_masks(tokenizer(f"[{number}]")["input_ids"] + [tokenizer.eos_token_id])
    for number in refused:
        with pytest.raises(ValueError, match="breaks the"):
            constraint.token_masks(tokenizer(f"[{number}]")["input_ids"])


def test_number_prefixes_that_cannot_end_in_bounds_are_refused_early(tokenizer):
    """In [0.1, 0.3] "0.0" can never be completed, so the '0' after "0." is already masked."""
    constraint = JsonArrayConstraint(tokenizer, ConstructionSpec("sequence", 1, 1, 0.1, 0.3))
    with pytest.raises(ValueError, match=r"token 3 .*'0'.* after '\[0\.'"):
        constraint.token_masks(_char_ids(constraint, "[0.0"))


def test_integers_only_when_max_decimals_is_zero(tokenizer):
    constraint = JsonArrayConstraint(tokenizer, ConstructionSpec("sequence", 1, 2, 0.0, 50.0), max_decimals=0)
    with pytest.raises(ValueError, match=r"'\.'\) breaks the sequence grammar after '\[12'"):
        constraint.token_masks(_char_ids(constraint, "[12."))


@pytest.mark.parametrize(
    ("spec", "decimals", "message"),
    [
        (ConstructionSpec("matrix", 1, 2, 0.0, 1.0), 6, "spec.kind"),  # type: ignore[arg-type]
        (ConstructionSpec("sequence", 3, 2, 0.0, 1.0), 6, "min_length <= max_length"),
        (ConstructionSpec("tuples", 1, 2, 0.0, 1.0, arity=0), 6, "arity >= 1"),
        (ConstructionSpec("sequence", 1, 2, 1.0, 0.0), 6, "low <= high"),
        (ConstructionSpec("sequence", 1, 2, 0.11, 0.12), 1, "no number with at most 1 decimals"),
        (ConstructionSpec("sequence", 1, 2, 0.0, 1.0), -1, "max_decimals"),
    ],
)
def test_an_unusable_spec_is_refused_with_its_reason(tokenizer, spec, decimals, message):
    with pytest.raises(ValueError, match=message):
        JsonArrayConstraint(tokenizer, spec, max_decimals=decimals)


def test_token_texts_concatenate_to_the_decoded_reply(tokenizer):
    texts = token_texts(tokenizer)
    for reply in ["[0.5, 0.25, 1.0]", "[[0.1, 0.2, 0.05], [0.9, 0.8, 0.1]]", "[-1, 2.5,  3]"]:
        assert "".join(texts[i] for i in tokenizer(reply)["input_ids"]) == reply


def test_parse_returns_the_list_and_refuses_other_json(tokenizer):
    constraint = JsonArrayConstraint(tokenizer, TUPLES_01)
    assert constraint.parse("[[1, 0.5, 0]]") == [[1, 0.5, 0]]
    with pytest.raises(ValueError, match="expected a JSON array"):
        constraint.parse('{"a": 1}')


# -- the reply budget ----------------------------------------------------------------------------------

CPU_ENVS = CONSTRUCTION_ENVS


def _sample_budget(model, tokenizer, constraint, n: int, seed: int = 0, recorder=None) -> list[list[int]]:
    """`n` completions drawn under `constraint`'s budget: `generate` stops at EOS or at max_new_tokens."""
    rows = _draw(model, tokenizer, constraint, n, seed, recorder, 3, max_new_tokens=constraint.max_new_tokens)
    eos = tokenizer.eos_token_id
    return [row[: row.index(eos) + 1] if eos in row else row for row in rows]


def _shortest_by_search(constraint: JsonArrayConstraint) -> int:
    """Fewest tokens to a closed array, by breadth-first search over every token (states merged by `_key`,
    which decides what every later token does)."""
    frontier, seen, depth = [constraint.start], set(), 0
    while frontier:
        depth += 1
        following = []
        for state in frontier:
            for token_id in constraint.allowed_ids(state).tolist():
                after = constraint.advance(state, token_id)
                if after.phase == "done":
                    return depth
                if constraint._key(after) not in seen:
                    seen.add(constraint._key(after))
                    following.append(after)
        frontier = following
    raise AssertionError("no closed array is reachable")


@pytest.mark.parametrize(
    "spec",
    [
        SEQUENCE_01,
        SEQUENCE_WIDE,
        ConstructionSpec("tuples", 2, 2, 0.0, 1.0, arity=2),
        ConstructionSpec("sequence", 2, 2, 0.1, 0.3),
    ],
)
def test_min_new_tokens_is_the_shortest_array_in_tokens(tokenizer, spec):
    budgeted = JsonArrayConstraint(tokenizer, spec, max_new_tokens=500)
    assert budgeted.min_new_tokens == _shortest_by_search(JsonArrayConstraint(tokenizer, spec))


def test_a_budget_below_the_shortest_array_is_refused_naming_the_minimum(tokenizer):
    least = JsonArrayConstraint(tokenizer, TUPLES_01, max_new_tokens=500).min_new_tokens
    with pytest.raises(ValueError, match=rf"takes {least} tokens.*raise --max-new-tokens to at least {least}$"):
        JsonArrayConstraint(tokenizer, TUPLES_01, max_new_tokens=least - 1)
    assert JsonArrayConstraint(tokenizer, TUPLES_01, max_new_tokens=least).start.left == least
    with pytest.raises(ValueError, match="max_new_tokens must be a positive int"):
        JsonArrayConstraint(tokenizer, TUPLES_01, max_new_tokens=0)


@pytest.mark.parametrize(
    "spec", [SEQUENCE_01, SEQUENCE_WIDE, TUPLES_01, ConstructionSpec("tuples", 12, 12, 0.0, 1.0, 3)]
)
@pytest.mark.parametrize("extra", [0, 1, 4])
def test_every_reply_completes_when_the_budget_is_just_above_the_minimum(model, tokenizer, spec, extra):
    least = JsonArrayConstraint(tokenizer, spec, max_new_tokens=500).min_new_tokens
    constraint = JsonArrayConstraint(tokenizer, spec, max_new_tokens=least + extra)
    for completion in _sample_budget(model, tokenizer, constraint, 12, seed=extra):
        assert len(completion) <= least + extra
        _meets_spec(constraint.parse(tokenizer.decode(completion, skip_special_tokens=True)), spec)


def test_budget_masks_replay_exactly_and_equal_a_token_by_token_check(model, tokenizer):
    spec = ConstructionSpec("tuples", 6, 6, 0.0, 1.0, 3)
    least = JsonArrayConstraint(tokenizer, spec, max_new_tokens=500).min_new_tokens
    constraint = JsonArrayConstraint(tokenizer, spec, max_new_tokens=least + 6)
    recorder = _MaskRecorder()
    completions = _sample_budget(model, tokenizer, constraint, 6, seed=5, recorder=recorder)
    fresh = JsonArrayConstraint(tokenizer, spec, max_new_tokens=least + 6)
    for row, completion in enumerate(completions):
        replay = fresh.token_masks(completion)
        state = fresh.start
        for t, token_id in enumerate(completion):
            assert torch.equal(replay[t], recorder.steps[t][row])
            direct = [fresh.advance(state, i) is not None for i in range(len(tokenizer))]
            assert torch.equal(replay[t], torch.tensor(direct))
            state = fresh.advance(state, token_id)


class _PrefixByPrefix(json_grammar.Numbers):
    """The grammar's numbers with every integer prefix its own state (no merging by `_levels`): the reference."""

    def _levels(self, negative: bool, prefix: int) -> None:
        return None


@pytest.mark.parametrize(
    "spec",
    [
        ConstructionSpec("sequence", 3, 3, 123.0, 4567.0),
        ConstructionSpec("sequence", 2, 3, -9999.0, -1000.0),
        ConstructionSpec("tuples", 2, 2, 10.0, 99.5, arity=2),
    ],
)
def test_merged_integer_prefixes_give_the_masks_of_a_prefix_by_prefix_grammar(model, tokenizer, monkeypatch, spec):
    """Bounds that exclude short numbers ([1e7, 9e7]) made the closing search visit every integer prefix;
    prefixes are now merged by their `_levels`, which must not change a single mask or budget."""
    least = JsonArrayConstraint(tokenizer, spec, max_new_tokens=500).min_new_tokens
    merged = JsonArrayConstraint(tokenizer, spec, max_new_tokens=least + 3)
    monkeypatch.setattr(json_grammar, "Numbers", _PrefixByPrefix)
    reference = JsonArrayConstraint(tokenizer, spec, max_new_tokens=least + 3)
    assert merged.min_new_tokens == reference.min_new_tokens
    assert len(merged._costs) < len(reference._costs)  # prefixes were merged
    for completion in _sample_budget(model, tokenizer, merged, 8, seed=1):
        assert torch.equal(merged.token_masks(completion), reference.token_masks(completion))


def test_token_masks_refuse_a_completion_that_overruns_the_budget(tokenizer):
    spec = ConstructionSpec("sequence", 3, 3, 0.0, 1.0)
    least = JsonArrayConstraint(tokenizer, spec, max_new_tokens=500).min_new_tokens
    constraint = JsonArrayConstraint(tokenizer, spec, max_new_tokens=least)
    with pytest.raises(ValueError, match="breaks the"):
        constraint.token_masks(_char_ids(constraint, "[0.5"))  # "[0.5,0,0]" takes more than the minimum


@pytest.mark.parametrize("env_id", CPU_ENVS)
def test_default_budget_lets_every_reply_of_a_random_model_parse_at_the_cpu_preset(make_tiny_policy, env_id):
    """The defaults: budget `default_max_new_tokens(spec)`, grammar from the policy's own factory. Every reply
    is a complete array of the right shape (geometry may still fail), and copying the start state as the
    prompt shows it fits in the budget."""
    env = gym.make(env_id, **discover_envs.cpu_preset(env_id))
    prompt, info = env.reset(seed=0)
    spec = env.unwrapped.construction_spec
    policy = make_tiny_policy(max_new_tokens=default_max_new_tokens(spec), batch_size=8)
    [group] = policy.sample([prompt], n=8, constraint_spec=spec)
    for sample in group:
        block = sample.text[len(JsonArrayConstraint.prefix) : -len(JsonArrayConstraint.suffix)]
        env.unwrapped.problem.check_array(json.loads(block))
    shown = format_numbers(info["state"]["construction"], env.unwrapped.problem.shown_decimals)
    assert shown in prompt
    copy = policy.tokenizer(shown, add_special_tokens=False)["input_ids"]
    policy.constraint(spec).token_masks(copy)  # the copy is allowed, within the budget
    copied = env.unwrapped.problem.rescore({"construction": json.loads(shown)})  # and valid
    assert copied == pytest.approx(info["state"]["score"], rel=1e-3)


def test_format_numbers_rounds_to_at_most_the_given_decimals_without_trailing_zeros():
    assert format_numbers([[0.5, 1.0, -0.0], [1e-7, 0.123456789, 2]], 4) == "[[0.5, 1, 0], [0, 0.1235, 2]]"
    assert format_numbers(np.array([0.25, 1e6]), 4) == "[0.25, 1000000]"


def test_erdos_prompt_shows_the_start_construction_at_four_decimals():
    """Full floats took ~20 tokens a number (about half of the n = 16 prompt); the state itself stays exact."""
    env = gym.make("discover/ErdosMinOverlap-v0", n=16)
    prompt, info = env.reset(seed=0)
    shown = prompt.split("Construction:\n", 1)[1].split("\n", 1)[0]
    assert all(len(decimals) <= 4 for decimals in re.findall(r"\.([0-9]+)", shown))
    assert np.allclose(json.loads(shown), info["state"]["construction"], rtol=0, atol=5e-5)
    assert any(len(repr(x)) > 10 for x in info["state"]["construction"])

import json
import math

import gymnasium as gym
import numpy as np
import pytest

import discover_agent.storage as storage
import discover_envs
from discover_agent.sampler import FixedSampler, GreedySampler, PUCTSampler
from discover_envs.state import make_state

#: The construction envs (a small CPU preset each where the problem has one).
CONSTRUCTION_ENVS = ["discover/AC1-v0", "discover/AC2-v0", "discover/CirclePacking26-v0", "discover/CirclePacking32-v0",
                     "discover/ErdosMinOverlap-v0"]  # fmt: skip


def st(name, reward, parent=None):
    """A state whose content (and so id) is its name."""
    return make_state(score=reward, reward=reward, construction=[name], parent_id=parent["id"] if parent else None)


def ids(states):
    return [s["construction"][0] for s in states]


@pytest.fixture
def tree():
    """R (initial, 0) -> A (1), B (3); B -> C (2)."""
    root = st("R", 0.0)
    a, b = st("A", 1.0, root), st("B", 3.0, root)
    c = st("C", 2.0, b)
    return root, a, b, c


def test_puct_scores_match_hand_computation(tree):
    root, a, b, c = tree
    s = PUCTSampler([root], c=1.0)
    s.update(root, [a, b])
    # T = 1, n(R) = 1, Q(R) = 3; scale = 3 - 1 = 2 (initial state excluded); priors by rank 3:2:1 -> /6
    expected = {
        root["id"]: 3 + 2 * (1 / 6) * math.sqrt(2) / 2,
        a["id"]: 1 + 2 * (2 / 6) * math.sqrt(2),
        b["id"]: 3 + 2 * (3 / 6) * math.sqrt(2),
    }
    assert s.scores() == pytest.approx(expected, rel=1e-12)
    s.update(b, [c])
    # T = 2, n(R) = 2, n(B) = 1, Q(B) = 2; scale = 3 - 1 = 2; priors 4:3:2:1 (B, C, A, R) -> /10
    expected = {
        root["id"]: 3 + 2 * 0.1 * math.sqrt(3) / 3,
        a["id"]: 1 + 2 * 0.2 * math.sqrt(3),
        b["id"]: 2 + 2 * 0.4 * math.sqrt(3) / 2,
        c["id"]: 2 + 2 * 0.3 * math.sqrt(3),
    }
    assert s.scores() == pytest.approx(expected, rel=1e-12)
    assert ids(s.select(1)) == ["R"]


def test_puct_scale_falls_back_to_one_with_fewer_than_two_non_initial_states():
    root = st("R", 5.0)
    s = PUCTSampler([root], c=1.0)
    assert s.scores() == pytest.approx({root["id"]: 5.0 + 1.0})
    child = st("A", 7.0, root)
    s.update(root, [child])
    # priors 2:1 (A, R) -> /3; T = 1; n(R) = 1, Q(R) = 7
    assert s.scores() == pytest.approx(
        {root["id"]: 7 + (1 / 3) * math.sqrt(2) / 2, child["id"]: 7 + (2 / 3) * math.sqrt(2)}
    )


def test_select_blocks_ancestors_and_descendants_of_each_pick_then_repeats():
    r1, r2 = st("R1", 0.0), st("R2", 0.1)
    a, b = st("A", 5.0, r1), st("B", 1.0, r1)
    c = st("C", 6.0, a)
    s = PUCTSampler([r1, r2], c=0.0)  # c = 0: score = Q, so the order is C, A (tie, lower reward), R1, B, R2
    s.update(r1, [a, b])
    s.update(a, [c])
    # C blocks A and R1 (ancestors); B is only a sibling of A, so it stays open.
    assert ids(s.select(3)) == ["C", "B", "R2"]
    assert ids(s.select(5)) == ["C", "B", "R2", "C", "B"]
    # picking R1 first blocks its whole subtree, though A (Q = 4) outscores R2 (Q = 0.1)
    s = PUCTSampler([r1, r2], c=0.0)
    s.update(r1, [a, b])
    s.update(a, [st("D", 4.0, a)])
    assert ids(s.select(2)) == ["R1", "R2"]


def test_visits_are_back_propagated_to_every_ancestor(tree):
    root, a, b, c = tree
    d = st("D", 2.5, c)
    s = PUCTSampler([root])
    s.update(root, [a, b])
    s.update(b, [c])
    s.update(c, [d])
    s.update(c, [])  # a group with no valid child still counts as an expansion
    d_ = s.state_dict()
    assert d_["visits"] == {root["id"]: 4, b["id"]: 3, c["id"]: 2}
    assert d_["total_expansions"] == 4
    assert d_["best_child_reward"] == {root["id"]: 3.0, b["id"]: 2.0, c["id"]: 2.5}


def test_children_are_deduplicated_by_content():
    root = st("R", 0.0)
    s = PUCTSampler([root])
    s.update(root, [st("A", 1.0, root), st("A", 1.0, root), st("R", 0.0, root)])
    assert sorted(ids(s.states())) == ["A", "R"]
    s.update(root, [st("A", 1.0, root)])
    assert sorted(ids(s.states())) == ["A", "R"]


def test_each_parent_keeps_only_its_best_children():
    root = st("R", 0.0)
    s = PUCTSampler([root], children_per_parent=2)
    s.update(root, [st("a1", 1.0, root), st("a2", 3.0, root), st("a3", 2.0, root)])
    assert sorted(ids(s.states())) == ["R", "a2", "a3"]
    s.update(root, [st("a4", 2.5, root)])
    assert sorted(ids(s.states())) == ["R", "a2", "a4"]
    # the Q of the parent still remembers its best child ever, pruned or not
    assert s.state_dict()["best_child_reward"][root["id"]] == 3.0


def test_cap_evicts_the_worst_but_keeps_initial_and_best():
    root = st("R", -10.0)
    s = PUCTSampler([root], max_size=3)
    parent = root
    for i, reward in enumerate([1.0, 5.0, 2.0, 4.0]):
        child = st(f"x{i}", reward, parent)
        s.update(parent, [child])
        parent = child
    assert sorted(ids(s.states())) == ["R", "x1", "x3"]
    assert ids([s.best()]) == ["x1"]
    # visits still reach R through the evicted x0 and x2
    s.update(parent, [])
    assert s.state_dict()["visits"][root["id"]] == 5


def test_rediscovered_evicted_state_keeps_its_first_parent():
    root = st("R", 0.0)
    s = PUCTSampler([root], children_per_parent=1)
    low = st("L", 1.0, root)
    high = st("H", 2.0, root)
    s.update(root, [low])
    s.update(root, [high])  # L is pruned
    again = st("L", 1.0, high)  # same content, now produced from H
    s.update(high, [again])
    assert s.state_dict()["parent_of"][low["id"]] == root["id"]
    assert sorted(ids(s.states())) == ["H", "R"]  # L competes with H under R again and loses


def test_update_rejects_unknown_parents_and_foreign_children():
    root = st("R", 0.0)
    s = PUCTSampler([root])
    stranger = st("S", 1.0)
    with pytest.raises(ValueError, match="never in this sampler"):
        s.update(stranger, [])
    with pytest.raises(ValueError, match="parent_id"):
        s.update(root, [st("A", 1.0, stranger)])
    with pytest.raises(ValueError, match="finite 'reward'"):
        s.update(root, [{**st("A", 1.0, root), "reward": float("nan")}])
    with pytest.raises(ValueError, match="k must be"):
        s.select(0)


def test_constructor_rejects_bad_settings():
    root = st("R", 0.0)
    with pytest.raises(ValueError, match="max_size"):
        PUCTSampler([root], max_size=1)
    with pytest.raises(ValueError, match="duplicate"):
        PUCTSampler([root, root])
    with pytest.raises(ValueError, match="non-empty"):
        FixedSampler([])
    with pytest.raises(ValueError, match="epsilon"):
        GreedySampler([root], epsilon=1.5)


def _drive(sampler, rng, steps, log):
    """Random rollouts with coarse (often tied) rewards, so tie-breaking draws matter."""
    for step in range(steps):
        picks = sampler.select(3)
        log.append([p["id"] for p in picks])
        for j, parent in enumerate(picks):
            children = [
                st(f"s{step}-{j}-{i}", float(rng.integers(0, 4)), parent) for i in range(int(rng.integers(0, 4)))
            ]
            sampler.update(parent, children)


@pytest.mark.parametrize(
    "make",
    [
        lambda init: PUCTSampler(init, c=0.5, max_size=12, seed=3),
        lambda init: GreedySampler(init, epsilon=0.5, top_k=4, seed=3),
        lambda init: FixedSampler(init),
    ],
)
def test_save_and_load_resume_with_identical_future_selections(tmp_path, make):
    init = [st("R", 0.0)]
    original = make(init)
    _drive(original, np.random.default_rng(0), 5, [])
    path = tmp_path / "buffer.json"
    original.save(path)
    resumed = make(init)
    resumed.load(path)
    assert resumed.state_dict() == original.state_dict()
    future_a, future_b = [], []
    _drive(original, np.random.default_rng(1), 6, future_a)
    _drive(resumed, np.random.default_rng(1), 6, future_b)
    assert future_a == future_b
    assert resumed.best() == original.best()


def test_interrupted_save_leaves_the_previous_file_intact(tmp_path, monkeypatch):
    root = st("R", 0.0)
    s = PUCTSampler([root])
    path = tmp_path / "buffer.json"
    s.save(path)
    before = path.read_text()
    s.update(root, [st("A", 1.0, root)])

    def crash(fd):
        raise OSError("disk went away")

    monkeypatch.setattr(storage.os, "fsync", crash)
    with pytest.raises(OSError, match="disk went away"):
        s.save(path)
    assert path.read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["buffer.json"]  # no temp file left
    assert json.loads(before)["buffer"] == [root]


def test_load_rejects_a_state_dict_from_another_sampler_or_config():
    root = st("R", 0.0)
    with pytest.raises(ValueError, match="GreedySampler"):
        PUCTSampler([root]).load_state_dict(GreedySampler([root]).state_dict())
    with pytest.raises(ValueError, match="config"):
        PUCTSampler([root], c=2.0).load_state_dict(PUCTSampler([root], c=1.0).state_dict())
    broken = PUCTSampler([root]).state_dict()
    del broken["visits"]
    with pytest.raises(ValueError, match="malformed"):
        PUCTSampler([root]).load_state_dict(broken)


def test_greedy_exploits_the_best_and_explores_its_top_k():
    root = st("R", 0.0)
    children = [st(f"c{i}", float(i), root) for i in range(6)]
    exploit = GreedySampler([root], epsilon=0.0, top_k=3)
    exploit.update(root, children)
    assert ids(exploit.states()) == ["c5", "c4", "c3"]
    assert ids(exploit.select(4)) == ["c5"] * 4
    explore = GreedySampler([root], epsilon=1.0, top_k=3, seed=1)
    explore.update(root, children)
    assert set(ids(explore.select(200))) == {"c5", "c4", "c3"}
    explore.update(children[5], [])
    assert ids([explore.best()]) == ["c5"]


def test_fixed_always_starts_from_the_initial_states_and_keeps_the_best():
    r1, r2 = st("R1", 0.0), st("R2", 1.0)
    s = FixedSampler([r1, r2])
    s.update(r1, [st("A", 0.5, r1), st("B", 4.0, r1)])
    s.update(r2, [st("C", 2.0, r2)])
    assert ids(s.select(3)) == ["R1", "R2", "R1"]
    assert ids([s.best()]) == ["B"]
    assert ids(s.states()) == ["R1", "R2", "B"]


def test_fixed_samples_every_initial_state_when_they_outnumber_the_groups():
    """Four start states, two groups a step: steps alternate 0, 1 / 2, 3 (the first two were all it drew)."""
    s = FixedSampler([st(f"R{i}", 0.0) for i in range(4)])
    assert [ids(s.select(2)) for _ in range(3)] == [["R0", "R1"], ["R2", "R3"], ["R0", "R1"]]
    resumed = FixedSampler([st(f"R{i}", 0.0) for i in range(4)])
    resumed.load_state_dict(s.state_dict())
    assert ids(resumed.select(2)) == ids(s.select(2)) == ["R2", "R3"]


def test_expansion_counting_is_the_default_and_ignores_group_size(tree):
    root, a, b, _ = tree
    small, large = PUCTSampler([root]), PUCTSampler([root])
    small.update(root, [a, b], rollouts=2)
    large.update(root, [a, b], rollouts=16)
    assert small.state_dict()["visits"] == large.state_dict()["visits"] == {root["id"]: 1}
    assert small.scores() == large.scores()


def test_rollout_counting_weighs_each_reply_failed_ones_included(tree):
    root, a, b, c = tree
    s = PUCTSampler([root], c=1.0, visits="rollouts")
    s.update(root, [a, b], rollouts=8)
    s.update(b, [c], rollouts=4)
    # T = 12, n(R) = 12, n(B) = 4; scale = 3 - 1 = 2; priors 4:3:2:1 (B, C, A, R) -> /10
    expected = {
        root["id"]: 3 + 2 * 0.1 * math.sqrt(13) / 13,
        a["id"]: 1 + 2 * 0.2 * math.sqrt(13),
        b["id"]: 2 + 2 * 0.4 * math.sqrt(13) / 5,
        c["id"]: 2 + 2 * 0.3 * math.sqrt(13),
    }
    assert s.scores() == pytest.approx(expected, rel=1e-12)
    with pytest.raises(ValueError, match="counts replies: pass update"):
        s.update(root, [])
    with pytest.raises(ValueError, match="rollouts must be an int >= the 2 valid children"):
        s.update(root, [a, b], rollouts=1)
    with pytest.raises(ValueError, match="visits must be one of"):
        PUCTSampler([root], visits="groups")


def test_load_refuses_a_buffer_counted_in_other_visits(tree):
    root = tree[0]
    saved = PUCTSampler([root], visits="rollouts").state_dict()
    with pytest.raises(ValueError, match="saved with config"):
        PUCTSampler([root]).load_state_dict(saved)


@pytest.mark.parametrize(
    ("make", "k", "expected"),
    [
        (lambda init: PUCTSampler(init[:1]), 3, [("I0", 12)]),  # one start state: one group of 3 x 4
        (lambda init: PUCTSampler(init), 3, [("I2", 4), ("I1", 4), ("I0", 4)]),  # distinct picks stay apart
        (lambda init: PUCTSampler(init[:2]), 3, [("I1", 8), ("I0", 4)]),  # the repeat joins its first pick
        (lambda init: FixedSampler(init[:2]), 4, [("I0", 8), ("I1", 8)]),
        (lambda init: GreedySampler(init, epsilon=0.0), 2, [("I2", 8)]),
    ],
)
def test_select_groups_merges_picks_of_one_state_into_one_larger_group(make, k, expected):
    initial = [st(f"I{i}", 0.1 * i) for i in range(3)]
    groups = make(initial).select_groups(k, group_size=4)
    assert [(state["construction"][0], size) for state, size in groups] == expected
    with pytest.raises(ValueError, match="group_size"):
        make(initial).select_groups(k, group_size=0)


@pytest.mark.parametrize("env_id", CONSTRUCTION_ENVS)
def test_reset_seeds_give_distinct_initial_states_that_start_distinct_groups(env_id):
    """The paper initialises the buffer with random states: a construction env's `reset(seed=...)` gives
    a different valid start state per seed, and a buffer seeded with k of them starts k separate groups."""
    env = gym.make(env_id, **discover_envs.cpu_preset(env_id))
    states = [env.reset(seed=seed)[1]["state"] for seed in range(4)]
    assert len({s["id"] for s in states}) == 4
    assert env.reset(seed=2)[1]["state"]["id"] == states[2]["id"]
    groups = PUCTSampler(states, seed=0).select_groups(4, group_size=2)
    assert sorted(state["id"] for state, _ in groups) == sorted(s["id"] for s in states)
    assert [size for _, size in groups] == [2, 2, 2, 2]

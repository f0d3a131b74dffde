"""Start-state samplers: which earlier attempts the next rollout groups start from.

Each strategy keeps a buffer of states (the JSON dicts the envs produce; `reward` is higher-is-better and
`id` a content hash) and has the same five methods, so the trainer can swap them:
`select(k)` start states for one step, `update(parent, children, rollouts)` once per rollout group with the
group's valid child states and how many replies it sampled, `best()`, `states()`, and `state_dict()` /
`load_state_dict()` for exact resumption (random generator included). `save(path)` writes atomically, so a
crash mid-write keeps the last buffer. `select_groups(k, group_size)` is `select` with the groups that
start from one state merged into one larger group. A buffer may start from several initial states (the
paper initialises it with random states; an env gives distinct ones for distinct `reset(seed=...)`).

- `PUCTSampler`: TTT-Discover's reuse rule, a PUCT score that trades a state's best outcome so far against
  how little it and its descendants have been tried.
- `GreedySampler`: ε-greedy over the best few states, a simple hill-climbing baseline.
- `FixedSampler`: always the initial state(s); what best-of-N sampling uses.
"""

from __future__ import annotations

import json
import math
import os
from abc import ABC, abstractmethod
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from discover_agent.storage import write_json

State = dict[str, Any]

#: How `PUCTSampler` counts visits: per expanded parent (the paper) or per reply (the released code).
VISIT_UNITS = ("expansions", "rollouts")


def _checked_state(state: Any, what: str) -> State:
    if not isinstance(state, dict):
        raise TypeError(f"{what} must be a state dict, got {type(state).__name__}")
    if not isinstance(state.get("id"), str) or not state["id"]:
        raise ValueError(f"{what} needs a non-empty str 'id', got {state.get('id')!r}")
    reward = state.get("reward")
    if isinstance(reward, bool) or not isinstance(reward, (int, float)) or not math.isfinite(reward):
        raise ValueError(f"{what} {state['id']} needs a finite 'reward', got {reward!r}")
    return state


def _checked_update(parent: Any, children: Any) -> tuple[State, list[State]]:
    parent = _checked_state(parent, "parent")
    if not isinstance(children, (list, tuple)):
        raise TypeError(f"children must be a list of states, got {type(children).__name__}")
    checked = [_checked_state(child, "child") for child in children]
    for child in checked:
        if child.get("parent_id") != parent["id"]:
            raise ValueError(
                f"child {child['id']} has parent_id {child.get('parent_id')!r}, not the parent {parent['id']}"
            )
    return parent, checked


def _checked_rollouts(rollouts: Any, children: list[State]) -> int:
    """The replies of a group: at least its valid children; None means exactly those."""
    if rollouts is None:
        return len(children)
    if isinstance(rollouts, bool) or not isinstance(rollouts, int) or rollouts < len(children):
        raise ValueError(f"rollouts must be an int >= the {len(children)} valid children, got {rollouts!r}")
    return rollouts


def _checked_initial(initial_states: Any) -> list[State]:
    if not isinstance(initial_states, (list, tuple)) or not initial_states:
        raise ValueError("initial_states must be a non-empty list of states")
    states = [_checked_state(s, "initial state") for s in initial_states]
    ids = [s["id"] for s in states]
    if len(set(ids)) != len(ids):
        raise ValueError(f"initial_states contain duplicate ids: {ids}")
    return states


def _ranked(states: Iterable[State]) -> list[State]:
    """Best first: higher reward, then earlier in the buffer (a stable sort keeps buffer order on ties)."""
    return sorted(states, key=lambda s: -s["reward"])


def _check_k(k: Any) -> int:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an int >= 1, got {k!r}")
    return k


class Sampler(ABC):
    """Common interface; subclasses keep their whole state in plain JSON types so that it can be saved."""

    @abstractmethod
    def select(self, k: int) -> list[State]:
        """k start states for this step (repeats allowed: several groups may start from one state)."""

    @abstractmethod
    def update(self, parent: State, children: list[State], rollouts: int | None = None) -> None:
        """Record one rollout group started from `parent`; `children` are its valid child states and
        `rollouts` the replies it sampled, valid or not (None: unknown, as many as `children`)."""

    def select_groups(self, k: int, group_size: int) -> list[tuple[State, int]]:
        """`select(k)` as (start state, replies) pairs: picks of the same state become one group of
        group_size x picks replies, in first-pick order. When the sampler runs out of distinct states
        (e.g. at the start, with one initial state), the repeats then share one advantage baseline over all
        their replies instead of forming small groups that each see a part of them."""
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
            raise ValueError(f"group_size must be an int >= 1, got {group_size!r}")
        merged: dict[str, tuple[State, int]] = {}
        for state in self.select(k):
            first, picks = merged.get(state["id"], (state, 0))
            merged[state["id"]] = (first, picks + 1)
        return [(state, picks * group_size) for state, picks in merged.values()]

    @abstractmethod
    def best(self) -> State:
        """The highest-reward state seen (the earliest one on ties)."""

    @abstractmethod
    def states(self) -> list[State]:
        """The buffer, as shallow copies in buffer order."""

    @abstractmethod
    def _config(self) -> dict[str, Any]:
        """Hyperparameters that a saved state must have been made with."""

    @abstractmethod
    def _payload(self) -> dict[str, Any]:
        """Everything else needed to resume: buffer, statistics, random generator."""

    @abstractmethod
    def _restore(self, payload: dict[str, Any]) -> None:
        """Inverse of `_payload`."""

    def _json(self) -> str:
        return json.dumps({"kind": type(self).__name__, "config": self._config(), **self._payload()}, allow_nan=False)

    def state_dict(self) -> dict[str, Any]:
        """A deep copy in plain JSON types (lists, dicts, str, finite floats, ints, None)."""
        return json.loads(self._json())

    def load_state_dict(self, d: dict[str, Any]) -> None:
        """Restore a `state_dict()`; the sampler must have been built with the same hyperparameters."""
        if not isinstance(d, dict):
            raise TypeError(f"state dict must be a dict, got {type(d).__name__}")
        if d.get("kind") != type(self).__name__:
            raise ValueError(f"state dict is for {d.get('kind')!r}, not {type(self).__name__}")
        if d.get("config") != self._config():
            raise ValueError(
                f"state dict was saved with config {d.get('config')!r}, this sampler has {self._config()!r}"
            )
        try:
            self._restore(json.loads(json.dumps(d)))
        except (KeyError, TypeError) as exc:
            raise ValueError(f"state dict for {type(self).__name__} is malformed: {exc!r}") from exc

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write `state_dict()` as JSON atomically (see `storage.write_json`)."""
        write_json(path, self.state_dict())

    def load(self, path: str | os.PathLike[str]) -> None:
        self.load_state_dict(json.loads(Path(path).read_text(encoding="utf-8")))


class PUCTSampler(Sampler):
    """TTT-Discover's reuse rule: pick states by score(s) = Q(s) + c * scale * P(s) * sqrt(1 + T) / (1 + n(s)).

    Q(s): the best reward among s's children ever reported (s's own reward until it has one), so a state
    whose attempts all came out worse loses its pull. P(s): rank prior, weight N - rank with rank = how many
    buffer states have a strictly higher reward (ties share a rank), normalised to sum 1. scale: max - min
    reward over non-initial buffer states, so a poor initial state does not inflate exploration; 1.0 while
    there are fewer than two of them or they all tie. n(s): `update` calls on s or any descendant (each
    call counts once for the parent and every ancestor); T: all `update` calls.

    Visit counting (`visits`): "expansions" (default) counts n(s) and T in expanded parents, one per
    rollout group, as the paper's appendix on PUCT state reuse defines them (n(s): expansions of s or a
    descendant; T: all expansions). It is the default because it is the published definition and keeps
    the exploration bonus independent of the group size, a knob the CPU presets vary. "rollouts" counts
    replies instead, as the released code does (tinker_cookbook/recipes/ttt/sampler.py counts a visit per
    rollout): a group of 8 then weighs twice a group of 4. Invalid replies count too, so `update` needs
    `rollouts` in this mode.

    Buffer: children enter unless their id (a content hash) is already there; each parent keeps only its
    `children_per_parent` best children; above `max_size` the worst states go, but never an initial state
    nor the best one. Lineage links and statistics of evicted states are kept, so visits still reach
    ancestors through them and a rediscovered state keeps its history.

    `select(k)` takes states in score order and blocks each pick's whole lineage (ancestors and
    descendants) so the k groups explore different branches; when fewer than k states remain unblocked, it
    fills the rest by cycling through the picks in score order (at the start, every group starts from the
    initial state, as in the paper). Equal scores are ordered by higher reward, then by a draw from the
    seeded generator.
    """

    def __init__(
        self,
        initial_states: list[State],
        c: float = 1.0,
        max_size: int = 1000,
        children_per_parent: int = 2,
        seed: int = 0,
        visits: str = "expansions",
    ) -> None:
        initial = _checked_initial(initial_states)
        if visits not in VISIT_UNITS:
            raise ValueError(f"visits must be one of {VISIT_UNITS}, got {visits!r}")
        if not (isinstance(c, (int, float)) and math.isfinite(c) and c >= 0):
            raise ValueError(f"c must be a finite number >= 0, got {c!r}")
        if not isinstance(max_size, int) or max_size <= len(initial):
            raise ValueError(
                f"max_size must be an int above the number of initial states ({len(initial)}), got {max_size!r}"
            )
        if not isinstance(children_per_parent, int) or children_per_parent < 1:
            raise ValueError(f"children_per_parent must be an int >= 1, got {children_per_parent!r}")
        self.c = float(c)
        self.max_size = max_size
        self.children_per_parent = children_per_parent
        self.visits = visits
        self._rng = np.random.default_rng(seed)
        self._buffer: dict[str, State] = {s["id"]: dict(s) for s in initial}
        self._initial_ids: list[str] = [s["id"] for s in initial]
        self._parent_of: dict[str, str | None] = {s["id"]: None for s in initial}
        self._visits: dict[str, int] = {}
        self._best_child: dict[str, float] = {}
        self._total = 0

    def _config(self) -> dict[str, Any]:
        return {
            "c": self.c,
            "max_size": self.max_size,
            "children_per_parent": self.children_per_parent,
            "visits": self.visits,
        }

    def _payload(self) -> dict[str, Any]:
        return {
            "buffer": list(self._buffer.values()),
            "initial_ids": self._initial_ids,
            "parent_of": self._parent_of,
            "visits": self._visits,
            "best_child_reward": self._best_child,
            "total_expansions": self._total,
            "rng": self._rng.bit_generator.state,
        }

    def _restore(self, payload: dict[str, Any]) -> None:
        buffer = {s["id"]: _checked_state(s, "buffer state") for s in payload["buffer"]}
        missing = [i for i in payload["initial_ids"] if i not in buffer]
        if missing:
            raise ValueError(f"state dict lacks its initial states {missing}")
        rng = np.random.default_rng()
        rng.bit_generator.state = payload["rng"]
        self._buffer = buffer
        self._initial_ids = list(payload["initial_ids"])
        self._parent_of = dict(payload["parent_of"])
        self._visits = {k: int(v) for k, v in payload["visits"].items()}
        self._best_child = {k: float(v) for k, v in payload["best_child_reward"].items()}
        self._total = int(payload["total_expansions"])
        self._rng = rng

    def best(self) -> State:
        return dict(_ranked(self._buffer.values())[0])

    def states(self) -> list[State]:
        return [dict(s) for s in self._buffer.values()]

    def _ancestors(self, state_id: str) -> list[str]:
        chain = []
        parent = self._parent_of.get(state_id)
        while parent is not None:
            chain.append(parent)
            parent = self._parent_of.get(parent)
        return chain

    def _scale(self) -> float:
        initial = set(self._initial_ids)
        rewards = [s["reward"] for i, s in self._buffer.items() if i not in initial]
        spread = max(rewards) - min(rewards) if len(rewards) >= 2 else 0.0
        return spread if spread > 0 else 1.0

    def scores(self) -> dict[str, float]:
        """PUCT score of every buffer state, by id (also useful for logging)."""
        rewards = np.array([s["reward"] for s in self._buffer.values()], dtype=np.float64)
        n_states = rewards.size
        higher = n_states - np.searchsorted(np.sort(rewards), rewards, side="right")
        weights = n_states - higher
        prior = weights / weights.sum()
        bonus = self.c * self._scale() * math.sqrt(1 + self._total)
        return {
            sid: self._best_child.get(sid, float(s["reward"])) + bonus * float(p) / (1 + self._visits.get(sid, 0))
            for (sid, s), p in zip(self._buffer.items(), prior, strict=True)
        }

    def select(self, k: int) -> list[State]:
        _check_k(k)
        scores = self.scores()
        draws = self._rng.random(len(self._buffer))
        order = sorted(
            zip(self._buffer.values(), draws, strict=True),
            key=lambda pair: (-scores[pair[0]["id"]], -pair[0]["reward"], pair[1]),
        )
        children: dict[str, list[str]] = {}
        for sid, parent in self._parent_of.items():
            if parent is not None:
                children.setdefault(parent, []).append(sid)
        picks: list[State] = []
        blocked: set[str] = set()
        for state, _ in order:
            if len(picks) == k:
                break
            if state["id"] in blocked:
                continue
            picks.append(state)
            blocked.add(state["id"])
            blocked.update(self._ancestors(state["id"]))
            stack = [state["id"]]
            while stack:
                for child in children.get(stack.pop(), []):
                    if child not in blocked:
                        blocked.add(child)
                        stack.append(child)
        return [dict(picks[i % len(picks)]) for i in range(k)]

    def update(self, parent: State, children: list[State], rollouts: int | None = None) -> None:
        parent, children = _checked_update(parent, children)
        _checked_rollouts(rollouts, children)
        pid = parent["id"]
        if pid not in self._parent_of:
            raise ValueError(f"parent {pid} was never in this sampler's buffer")
        count = 1
        if self.visits == "rollouts":
            if rollouts is None:
                raise ValueError("visits='rollouts' counts replies: pass update(..., rollouts=replies in the group)")
            count = _checked_rollouts(rollouts, children)
        self._total += count
        for sid in [pid, *self._ancestors(pid)]:
            self._visits[sid] = self._visits.get(sid, 0) + count
        if not children:
            return
        self._best_child[pid] = max(self._best_child.get(pid, -math.inf), *(s["reward"] for s in children))
        touched = set()
        for child in children:
            cid = child["id"]
            if cid in self._buffer:
                continue
            # A rediscovered state keeps its first parent; relinking could close a cycle in the lineage.
            self._parent_of.setdefault(cid, pid)
            self._buffer[cid] = dict(child)
            touched.add(self._parent_of[cid])
        for owner in touched:
            siblings = _ranked(s for i, s in self._buffer.items() if self._parent_of[i] == owner)
            for extra in siblings[self.children_per_parent :]:
                del self._buffer[extra["id"]]
        self._enforce_cap()

    def _enforce_cap(self) -> None:
        excess = len(self._buffer) - self.max_size
        if excess <= 0:
            return
        ranked = _ranked(self._buffer.values())
        keep = {*self._initial_ids, ranked[0]["id"]}
        for state in reversed(ranked):
            if excess == 0:
                break
            if state["id"] not in keep:
                del self._buffer[state["id"]]
                excess -= 1


class GreedySampler(Sampler):
    """ε-greedy hill climbing: each start state is the best one with probability 1 - ε, else one of the
    `top_k` best states drawn uniformly. The buffer keeps only those `top_k` (distinct ids, initial states
    compete like any other); groups with no valid child leave it unchanged."""

    def __init__(self, initial_states: list[State], epsilon: float = 0.1, top_k: int = 8, seed: int = 0) -> None:
        initial = _checked_initial(initial_states)
        if not (isinstance(epsilon, (int, float)) and 0.0 <= epsilon <= 1.0):
            raise ValueError(f"epsilon must be a probability in [0, 1], got {epsilon!r}")
        if not isinstance(top_k, int) or top_k < 1:
            raise ValueError(f"top_k must be an int >= 1, got {top_k!r}")
        self.epsilon = float(epsilon)
        self.top_k = top_k
        self._rng = np.random.default_rng(seed)
        self._buffer: list[State] = _ranked(dict(s) for s in initial)[:top_k]

    def _config(self) -> dict[str, Any]:
        return {"epsilon": self.epsilon, "top_k": self.top_k}

    def _payload(self) -> dict[str, Any]:
        return {"buffer": self._buffer, "rng": self._rng.bit_generator.state}

    def _restore(self, payload: dict[str, Any]) -> None:
        buffer = [_checked_state(s, "buffer state") for s in payload["buffer"]]
        if not buffer:
            raise ValueError("state dict has an empty buffer")
        rng = np.random.default_rng()
        rng.bit_generator.state = payload["rng"]
        self._buffer, self._rng = buffer, rng

    def best(self) -> State:
        return dict(self._buffer[0])

    def states(self) -> list[State]:
        return [dict(s) for s in self._buffer]

    def select(self, k: int) -> list[State]:
        _check_k(k)
        explore = self._rng.random(k) < self.epsilon
        draws = self._rng.integers(len(self._buffer), size=k)
        return [dict(self._buffer[int(d)] if e else self._buffer[0]) for e, d in zip(explore, draws, strict=True)]

    def update(self, parent: State, children: list[State], rollouts: int | None = None) -> None:
        _, children = _checked_update(parent, children)
        _checked_rollouts(rollouts, children)
        known = {s["id"] for s in self._buffer}
        for child in children:
            if child["id"] not in known:
                known.add(child["id"])
                self._buffer.append(dict(child))
        self._buffer = _ranked(self._buffer)[: self.top_k]


class FixedSampler(Sampler):
    """Best-of-N: every group starts from an initial state, cycling through them across steps (with 4 initial
    states and 2 groups a step, steps alternate between states 0, 1 and 2, 3). The buffer is the initial
    states plus the best child seen, so a saved run keeps its result."""

    def __init__(self, initial_states: list[State]) -> None:
        self._initial = [dict(s) for s in _checked_initial(initial_states)]
        self._best = _ranked(self._initial)[0]
        self._next = 0

    def _config(self) -> dict[str, Any]:
        return {}

    def _payload(self) -> dict[str, Any]:
        return {"initial": self._initial, "best": self._best, "next": self._next}

    def _restore(self, payload: dict[str, Any]) -> None:
        initial = _checked_initial(payload["initial"])
        self._initial, self._best = initial, _checked_state(payload["best"], "best state")
        cursor = payload.get("next", 0)  # buffers written before the cursor existed start over at state 0
        if isinstance(cursor, bool) or not isinstance(cursor, int) or cursor < 0:
            raise ValueError(f"FixedSampler cursor must be an int >= 0, got {cursor!r}")
        self._next = cursor % len(initial)

    def best(self) -> State:
        return dict(self._best)

    def states(self) -> list[State]:
        extra = [] if any(s["id"] == self._best["id"] for s in self._initial) else [self._best]
        return [dict(s) for s in self._initial + extra]

    def select(self, k: int) -> list[State]:
        _check_k(k)
        picks = [dict(self._initial[(self._next + i) % len(self._initial)]) for i in range(k)]
        self._next = (self._next + k) % len(self._initial)
        return picks

    def update(self, parent: State, children: list[State], rollouts: int | None = None) -> None:
        _, children = _checked_update(parent, children)
        _checked_rollouts(rollouts, children)
        self._best = _ranked([self._best, *(dict(s) for s in children)])[0]

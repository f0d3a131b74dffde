"""The envs' verifiers as TRL rewards: train any model on these tasks with `trl.GRPOTrainer`.

    from trl import GRPOConfig, GRPOTrainer
    from discover_envs import trl_prompt_dataset, trl_reward_func

    env_id, kwargs = "discover/ErdosMinOverlap-v0", {"n": 16}
    trainer = GRPOTrainer(model=..., reward_funcs=trl_reward_func(env_id, **kwargs),
                          train_dataset=trl_prompt_dataset(env_id, 64, **kwargs), args=GRPOConfig(...))

A reply is judged from the state its prompt showed, so the dataset carries that state in a "state" column
(JSON text); TRL hands every extra column to reward functions as a keyword. The reward is exactly
`env.step`'s: the env's reward for a valid reply, its `failure_reward` for anything else.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import gymnasium as gym

from discover_envs.env import DiscoverEnv

__all__ = ["trl_prompt_dataset", "trl_reward_func"]


def _make(env_id: str, env_kwargs: dict[str, Any]) -> DiscoverEnv:
    try:
        env = gym.make(env_id, **env_kwargs).unwrapped
    except gym.error.Error as exc:
        raise ValueError(f"unknown or broken env {env_id!r}: {exc} (see `discover envs`)") from None
    if not isinstance(env, DiscoverEnv):
        raise ValueError(f"{env_id} is not a discover env (a DiscoverEnv): the TRL reward needs its problem")
    return env


def _reply(completion: Any) -> str:
    """The reply text of a TRL completion: a string, or (conversational) a list of messages."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list) and all(isinstance(m, dict) for m in completion):
        return "".join(str(m.get("content") or "") for m in completion if m.get("role", "assistant") == "assistant")
    raise TypeError(f"a completion must be a str or a list of messages, got {type(completion).__name__}")


def trl_reward_func(env_id: str, **env_kwargs: Any) -> Callable[..., list[float]]:
    """A reward function for `GRPOTrainer(reward_funcs=...)`: one float per completion, `env.step`'s reward
    from the completion's "state" (a dataset column, from `trl_prompt_dataset`). Runs the verifier in this
    process, one completion after another (code actions run in the env's sandbox)."""
    env = _make(env_id, env_kwargs)

    def reward(prompts: list[Any], completions: list[Any], state: list[Any] | None = None, **_: Any) -> list[float]:
        if state is None:
            raise ValueError(
                f"{reward.__name__} needs the start state of each prompt: a 'state' column in the dataset "
                "(build it with discover_envs.trl_prompt_dataset)"
            )
        rewards = []
        for completion, start in zip(completions, state, strict=True):
            env.reset(options={"state": json.loads(start) if isinstance(start, str) else start})
            rewards.append(env.step(_reply(completion))[1])
        return rewards

    reward.__name__ = reward.__qualname__ = "discover_" + env_id.removeprefix("discover/").replace("-", "_")
    return reward


def trl_prompt_dataset(env_id: str, size: int, seed: int = 0, **env_kwargs: Any) -> Any:
    """A `datasets.Dataset` of `size` conversational prompts from start states reset with seeds seed..seed+size-1
    (distinct where the env draws its start state at random), with the "state" column the reward reads."""
    from datasets import Dataset

    if size < 1:
        raise ValueError(f"size must be >= 1, got {size!r}")
    env = _make(env_id, env_kwargs)
    rows: dict[str, list[Any]] = {"prompt": [], "state": []}
    for offset in range(size):
        prompt, info = env.reset(seed=seed + offset)
        rows["prompt"].append([{"role": "user", "content": prompt}])
        rows["state"].append(json.dumps(info["state"]))
    return Dataset.from_dict(rows)

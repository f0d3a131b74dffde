"""`trl_reward_func` gives exactly `env.step`'s rewards, and drives a real `trl.GRPOTrainer` on the tiny model."""

from __future__ import annotations

import json

import gymnasium as gym
import pytest
from tiny_model import build_model

import discover_envs
from discover_envs import trl_prompt_dataset, trl_reward_func

ENV, KWARGS = "discover/ErdosMinOverlap-v0", {"n": 4}

COMPLETIONS = [
    "```json\n[0.5, 0.25, 0.75, 1.0]\n```",  # valid
    "Here it is:\n```json\n[0.5, 0.5, 0.5, 0.5]\n```",  # valid, with text around it
    "```json\n[0.5, 0.25, 9.0, 1.0]\n```",  # invalid: out of bounds
    "```json\n[0.5, 0.25]\n```",  # invalid: wrong length
    "```python\ndef run(construction, **kwargs):\n    return [0.1, 0.2, 0.3, 0.4]\n```",  # valid, as code
    "\x00\ufffd}}} not a construction",  # garbage
    "",
]


def step_reward(state: dict, reply: str) -> float:
    env = gym.make(ENV, **KWARGS).unwrapped
    env.reset(options={"state": state})
    return env.step(reply)[1]


def test_rewards_equal_env_step_on_valid_invalid_and_garbage_replies():
    dataset = trl_prompt_dataset(ENV, 2, seed=5, **KWARGS)
    states = [dataset["state"][i % 2] for i in range(len(COMPLETIONS))]
    rewards = trl_reward_func(ENV, **KWARGS)(prompts=[None] * len(COMPLETIONS), completions=COMPLETIONS, state=states)
    expected = [step_reward(json.loads(s), c) for s, c in zip(states, COMPLETIONS, strict=True)]
    assert rewards == expected
    failure = gym.make(ENV, **KWARGS).unwrapped.problem.failure_reward
    assert [r == failure for r in rewards] == [False, False, True, True, False, True, True]


def test_conversational_completions_are_read_from_the_assistant_message():
    state = trl_prompt_dataset(ENV, 1, **KWARGS)["state"][0]
    reward = trl_reward_func(ENV, **KWARGS)
    as_messages = reward(
        prompts=[None], completions=[[{"role": "assistant", "content": COMPLETIONS[0]}]], state=[state]
    )
    assert as_messages == [step_reward(json.loads(state), COMPLETIONS[0])]


def test_dataset_prompts_show_the_state_the_reward_starts_from():
    dataset = trl_prompt_dataset(ENV, 3, seed=1, **KWARGS)
    env = gym.make(ENV, **KWARGS).unwrapped
    for i, row in enumerate(dataset):
        prompt, info = env.reset(seed=1 + i)
        assert row["prompt"] == [{"role": "user", "content": prompt}] and json.loads(row["state"]) == info["state"]


def test_a_dataset_without_states_is_refused_by_name():
    with pytest.raises(ValueError, match="'state' column"):
        trl_reward_func(ENV, **KWARGS)(prompts=["p"], completions=["c"])
    with pytest.raises(ValueError, match="unknown or broken env"):
        trl_reward_func("discover/NoSuchEnv-v0")


def test_exported_from_the_package():
    assert discover_envs.trl_reward_func is trl_reward_func


def test_grpo_trainer_trains_two_steps_on_env_rewards(tiny_tokenizer, one_thread, tmp_path):
    trl = pytest.importorskip("trl", reason="trl is not installed")
    reward = trl_reward_func(ENV, **KWARGS)
    seen: list[tuple[list, list]] = []

    def spy(prompts, completions, **kwargs):
        rewards = reward(prompts, completions, **kwargs)
        seen.append((completions, kwargs["state"], rewards))
        return rewards

    spy.__name__ = reward.__name__
    args = trl.GRPOConfig(
        output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=4, max_completion_length=8,
        max_steps=2, learning_rate=1e-3, use_cpu=True, report_to="none", save_strategy="no", logging_steps=1,
        bf16=False, seed=0,
    )  # fmt: skip
    tokenizer = tiny_tokenizer
    trainer = trl.GRPOTrainer(
        model=build_model(tokenizer), reward_funcs=spy, args=args, processing_class=tokenizer,
        train_dataset=trl_prompt_dataset(ENV, 4, **KWARGS),
    )  # fmt: skip
    trainer.train()
    assert trainer.state.global_step == 2 and len(seen) == 2
    for completions, states, rewards in seen:
        assert len(completions) == len(rewards) == 4
        replies = [c[-1]["content"] for c in completions]
        assert rewards == [step_reward(json.loads(s), r) for s, r in zip(states, replies, strict=True)]
    logged = [row for row in trainer.state.log_history if f"rewards/{reward.__name__}/mean" in row]
    assert len(logged) == 2

